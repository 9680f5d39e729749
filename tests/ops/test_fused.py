"""The fused CPU kernels (``angular.ops._C``) against the fp64 reference (docs/design.md, Testing).

Every check draws fresh random cosines (the seed is in each failure message) and compares the fused
op, called through :mod:`angular.ops` in the input dtype, with :mod:`angular.ops.reference` evaluated in
fp64 on exactly the same (rounded) values. Tolerances (docs/design.md, Testing) are relative,
with an absolute floor of the same relative size times the largest reference magnitude (so entries
that underflow, such as softmax terms of e^-100, are judged against the scale of the result): fp32
values 1e-5 and gradients 1e-4, fp16/bf16 1e-2, fp64 1e-12 and 1e-10.

Gradients at a target with ``|cos| > 1 - 1e-4`` lie in the guard zone (docs/design.md, Math:
derivative taken at a clamped angle): in fp64 they are compared too (same guard as the reference),
in the other dtypes they are only checked to be finite, as fp32 cannot resolve ``1 - cos^2`` there.

When the extension is missing these tests skip with the reason, except in CI
(``ANGULAR_REQUIRE_EXTENSION=1``), where they fail. ``tests/ops/test_fused_cuda.py`` runs the same checks
on a GPU.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from angular import ops
from angular.ops import _extension, reference

REQUIRE_EXTENSION = os.environ.get("ANGULAR_REQUIRE_EXTENSION", "").strip().lower() in (
    "1",
    "true",
    "yes",
)

# (m1, m2, m3, lam) of the presets (docs/design.md, Math); SphereFace at the ends and the middle of its lam schedule.
PRESETS = {
    "arcface": (1.0, 0.5, 0.0, 0.0),
    "cosface": (1.0, 0.0, 0.35, 0.0),
    "sphereface-lam0": (4.0, 0.0, 0.0, 0.0),
    "sphereface-lam5": (4.0, 0.0, 0.0, 5.0),
    "sphereface-lam1000": (4.0, 0.0, 0.0, 1000.0),
    "combined": (1.0, 0.3, 0.2, 0.0),
}
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# (values, gradients) relative tolerances.
TOLERANCE = {
    torch.float64: (1e-12, 1e-10),
    torch.float32: (1e-5, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (1e-2, 1e-2),
}
GUARD_ZONE = 1.0 - 1e-4  # |cos_y| above this: the gradient guard (docs/design.md, Math) applies
# Target cosines planted in the first rows: exactly +-1, within 1e-6 of +-1, just outside the guard
# zone, and theta near pi (t > pi for ArcFace; SphereFace has t > pi for most rows anyway).
HARD_TARGETS = (1.0, -1.0, 1.0 - 1e-7, -(1.0 - 1e-7), 1.0 - 1e-6, 0.999, -0.95, -0.999)


def require_fused(device_type: str) -> None:
    """Skip, or fail under ANGULAR_REQUIRE_EXTENSION=1, unless the fused kernels serve device_type."""
    loaded, reason = _extension.load()
    if loaded and _extension.has_kernel(device_type):
        return
    why = reason or f"angular.ops._C has no {device_type} kernel"
    if REQUIRE_EXTENSION:
        pytest.fail(
            f"ANGULAR_REQUIRE_EXTENSION=1 but the fused {device_type} kernels are missing: {why}"
        )
    pytest.skip(f"fused {device_type} kernels unavailable: {why}")


@pytest.fixture(autouse=True)
def _fused_cpu_kernels():
    require_fused("cpu")


@pytest.fixture
def seed() -> int:
    return random.SystemRandom().randrange(2**31)


@pytest.fixture
def threads():
    """Restores the intra-op thread count a test changes (row splitting depends on it)."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------------
# Helpers, shared with tests/ops/test_fused_cuda.py and the capability subprocesses below.


def make_inputs(batch, classes, dtype, seed, *, device="cpu", hard=True, no_target_row=True):
    """Random cosines in [-1, 1] and labels; the first rows get HARD_TARGETS, one row gets no
    target, and the last row a non-target entry of exactly 1."""
    generator = torch.Generator().manual_seed(seed)
    cos = torch.rand(batch, classes, generator=generator, dtype=torch.float64) * 2 - 1
    labels = torch.randint(0, classes, (batch,), generator=generator)
    if hard:
        for row, value in enumerate(HARD_TARGETS[:batch]):
            cos[row, labels[row]] = value
        if classes > 1:
            cos[-1, (labels[-1] + 1) % classes] = 1.0
    if no_target_row and batch > len(HARD_TARGETS):
        labels[len(HARD_TARGETS)] = -1
    return cos.to(dtype).to(device), labels.to(device)


def assert_close(got, want, rtol, context):
    """Relative tolerance with an absolute floor of rtol times the largest magnitude of want."""
    floor = rtol * max(want.detach().abs().max().item(), 1e-30) if want.numel() else 0.0
    torch.testing.assert_close(
        got.detach().double().cpu(),
        want.detach().double().cpu(),
        rtol=rtol,
        atol=floor,
        equal_nan=True,
        msg=lambda message: f"{context}\n{message}",
    )


def gradient_mask(cos, labels):
    """Where a gradient is compared: everywhere in fp64; elsewhere not at guard-zone targets."""
    mask = torch.ones(cos.shape, dtype=torch.bool, device=cos.device)
    if cos.dtype != torch.float64:
        rows = torch.nonzero(labels >= 0).flatten()
        cols = labels[rows]
        mask[rows, cols] = cos[rows, cols].double().abs() <= GUARD_ZONE
    return mask


def assert_gradients(got, want, cos, labels, rtol, context):
    assert torch.isfinite(got).all(), f"{context}: non-finite gradient"
    assert got.dtype == cos.dtype and got.shape == cos.shape, context
    mask = gradient_mask(cos, labels)
    assert_close(got[mask], want[mask], rtol, context)


def with_grad_in_layout(cos: torch.Tensor) -> torch.Tensor:
    """A tensor with ``cos``'s values, strides and storage offset whose ``.grad`` fills in on
    backward. ``clone()`` would make a step-sliced or offset view contiguous, and then the
    non-contiguous kernels would go untested."""
    base = cos._base
    if base is None or not base.is_contiguous() or base.storage_offset() != 0:
        return cos.detach().clone().requires_grad_()
    leaf = base.detach().clone().requires_grad_()
    view = leaf.as_strided(cos.size(), cos.stride(), cos.storage_offset())
    view.retain_grad()
    assert view.stride() == cos.stride() and view.storage_offset() == cos.storage_offset()
    return view


def check_against_reference(cos, labels, *, s, m1, m2, m3, lam, eps, straight_through, context):
    """margin_logits and margin_cross_entropy (every reduction), values and gradients, through
    angular.ops on cos's dtype and device, against the fp64 reference on the same values."""
    value_tol, grad_tol = TOLERANCE[cos.dtype]
    margin = dict(s=s, m1=m1, m2=m2, m3=m3, lam=lam, straight_through=straight_through)
    context = f"{context} s={s} m=({m1}, {m2}, {m3}) lam={lam} eps={eps} st={straight_through}"
    generator = torch.Generator().manual_seed(zlib.crc32(context.encode()))

    got_cos = with_grad_in_layout(cos)
    ref_cos = cos.detach().double().requires_grad_()
    got = ops.margin_logits(got_cos, labels, **margin)
    want = reference.margin_logits(ref_cos, labels, **margin)
    assert got.dtype == cos.dtype and got.shape == cos.shape, context
    assert_close(got, want, value_tol, f"{context}: logits")
    upstream = torch.randn(cos.shape, generator=generator, dtype=torch.float64).to(cos.dtype)
    got.backward(upstream.to(cos.device))
    want.backward(upstream.double().to(cos.device))
    assert_gradients(got_cos.grad, ref_cos.grad, cos, labels, grad_tol, f"{context}: logits grad")

    loss_dtype = reference.compute_dtype(cos.dtype)
    for reduction in ("none", "mean", "sum"):
        got_cos = with_grad_in_layout(cos)
        ref_cos = cos.detach().double().requires_grad_()
        ce = dict(label_smoothing=eps, reduction=reduction, **margin)
        got = ops.margin_cross_entropy(got_cos, labels, **ce)
        want = reference.margin_cross_entropy(ref_cos, labels, **ce)
        where = f"{context}: loss {reduction}"
        assert got.dtype == loss_dtype and got.shape == want.shape, where
        assert_close(got, want, value_tol, where)
        if reduction == "none":
            assert (got[labels < 0] == 0).all(), f"{where}: rows without target must have loss 0"
            weights = torch.rand(cos.shape[0], generator=generator, dtype=torch.float64)
            (got * weights.to(got)).sum().backward()
            (want * weights.to(want)).sum().backward()
        else:
            got.backward()
            want.backward()
        assert_gradients(got_cos.grad, ref_cos.grad, cos, labels, grad_tol, f"{where} grad")
        assert (got_cos.grad[labels < 0] == 0).all(), f"{where}: rows without target get grad 0"


# --------------------------------------------------------------------------------------------------
# The op really is the fused one.


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_ops_dispatch_to_the_fused_kernels():
    assert ops.backend() in ("cpp", "cuda")
    cos, labels = make_inputs(4, 9, torch.float32, 0)
    cos.requires_grad_()
    with RecordOps() as recorded:
        ops.margin_logits(cos, labels, s=8.0, m2=0.5).sum().backward()
        ops.margin_cross_entropy(cos, labels, s=8.0, m2=0.5).backward()
    angular_ops = [name for name in recorded.names if name.startswith("angular.")]
    assert angular_ops == [
        "angular.margin_logits.default",
        "angular.margin_logits_backward.default",
        "angular.margin_cross_entropy_loss.default",
        "angular.margin_cross_entropy_loss_backward.default",
    ]


# --------------------------------------------------------------------------------------------------
# Against the reference.


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("preset", PRESETS)
def test_presets_match_reference(seed, preset, dtype):
    m1, m2, m3, lam = PRESETS[preset]
    cos, labels = make_inputs(12, 257, dtype, seed)  # 257: vector loops with a tail
    for straight_through, eps in ((False, 0.1), (True, 0.0)):
        check_against_reference(
            cos, labels, s=64.0, m1=m1, m2=m2, m3=m3, lam=lam, eps=eps,
            straight_through=straight_through, context=f"seed={seed} {preset} {dtype}",
        )  # fmt: skip


@pytest.mark.parametrize("draw", range(6))
def test_random_margins_match_reference(seed, draw):
    rng = random.Random(seed)
    m1 = rng.uniform(0.5, 5.0)
    m2 = rng.choice([0.0, rng.uniform(0.0, 1.5)])
    m3 = rng.uniform(-0.5, 0.5)
    lam = rng.choice([0.0, rng.uniform(0.0, 10.0), rng.uniform(100.0, 2000.0)])
    s = rng.uniform(1.0, 100.0)
    eps = rng.choice([0.0, rng.uniform(0.0, 0.5)])
    batch, classes = rng.randint(1, 40), rng.randint(1, 600)
    for dtype in (torch.float32, torch.float64):
        cos, labels = make_inputs(batch, classes, dtype, seed)
        check_against_reference(
            cos, labels, s=s, m1=m1, m2=m2, m3=m3, lam=lam, eps=eps,
            straight_through=rng.random() < 0.5,
            context=f"seed={seed} draw={draw} B={batch} C={classes} {dtype}",
        )  # fmt: skip


@pytest.mark.parametrize(
    ("batch", "classes", "num_threads"),
    [(1, 1, 1), (1, 7, 1), (5, 1, 1), (1, 70001, 1), (1, 70001, 4), (3, 70001, 4), (2, 40000, 3)],
)
def test_shapes(seed, threads, batch, classes, num_threads):
    """B = 1, C = 1, C > 65536; with more threads than rows, each row is split into chunks."""
    threads(num_threads)
    for dtype in (torch.float32, torch.bfloat16):
        cos, labels = make_inputs(batch, classes, dtype, seed, no_target_row=False)
        check_against_reference(
            cos, labels, s=64.0, m1=1.0, m2=0.5, m3=0.0, lam=0.0, eps=0.1, straight_through=False,
            context=f"seed={seed} B={batch} C={classes} threads={num_threads} {dtype}",
        )  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_small_scale_and_negative_rows(seed, dtype):
    """Logits at most 0 and s <= 1: every term of the log-sum-exp counts, including vector tails."""
    for classes in (257, 1030):
        cos, labels = make_inputs(10, classes, dtype, seed)
        cos = -cos.abs()
        for s in (0.5, 1.0):
            check_against_reference(
                cos, labels, s=s, m1=1.0, m2=0.5, m3=0.0, lam=0.0, eps=0.1,
                straight_through=False, context=f"seed={seed} C={classes} s={s} {dtype}",
            )  # fmt: skip


def non_contiguous_views(cos):
    """(name, view) pairs: the same values as (B, C) tensors with other strides."""
    batch, classes = cos.shape
    transposed = cos.t().contiguous().t()  # column-major: stride (1, B)
    wide = torch.zeros(batch * 2, classes * 3, dtype=cos.dtype, device=cos.device)
    wide[::2, ::3] = cos
    offset = torch.zeros(batch, classes + 1, dtype=cos.dtype, device=cos.device)
    offset[:, 1:] = cos  # rows start one element off any vector alignment
    return [("transposed", transposed), ("step-slice", wide[::2, ::3]), ("offset", offset[:, 1:])]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_non_contiguous_cos(seed, dtype):
    cos, labels = make_inputs(11, 300, dtype, seed)
    for name, view in non_contiguous_views(cos):
        assert torch.equal(view, cos) and not view.is_contiguous(), name
        check_against_reference(
            view, labels, s=30.0, m1=1.0, m2=0.3, m3=0.2, lam=0.0, eps=0.05,
            straight_through=False, context=f"seed={seed} {name} {dtype}",
        )  # fmt: skip


def test_broadcast_rows_and_expanded_gradient(seed):
    """A (B, C) view with row stride 0, and the stride-0 upstream gradient of ``.sum()``."""
    row, _ = make_inputs(1, 500, torch.float32, seed, hard=False)
    cos = row.expand(6, 500)
    labels = torch.tensor([0, 499, -1, 250, 3, 3])
    check_against_reference(
        cos, labels, s=64.0, m1=1.0, m2=0.5, m3=0.0, lam=0.0, eps=0.1, straight_through=False,
        context=f"seed={seed} expanded rows",
    )  # fmt: skip
    got_cos = cos.detach().clone().requires_grad_()
    ref_cos = cos.detach().double().requires_grad_()
    ops.margin_logits(got_cos, labels, s=64.0, m2=0.5).sum().backward()
    reference.margin_logits(ref_cos, labels, s=64.0, m2=0.5).sum().backward()
    assert_close(got_cos.grad, ref_cos.grad, 1e-4, f"seed={seed} logits sum grad")


def test_rows_without_target(seed):
    cos, labels = make_inputs(5, 40, torch.float32, seed, hard=False)
    labels = torch.full_like(labels, -1)
    labels[2] = -(10**12)
    cos.requires_grad_()
    logits = ops.margin_logits(cos, labels, s=10.0, m2=0.5)
    assert torch.equal(logits, 10.0 * cos.detach())
    for reduction in ("none", "mean", "sum"):
        loss = ops.margin_cross_entropy(cos, labels, s=10.0, m2=0.5, reduction=reduction)
        assert (loss == 0).all()
        cos.grad = None
        loss.sum().backward()
        assert (cos.grad == 0).all()


def test_labels_out_of_range_never_read_out_of_bounds(seed):
    """Bypassing the Python validation, labels >= C or very negative mean 'no target'."""
    cos, _ = make_inputs(5, 6, torch.float32, seed, hard=False)
    labels = torch.tensor([6, 10**12, -(10**12), -1, 2])
    margin = (10.0, 1.0, 0.5, 0.0, 0.0)
    logits = torch.ops.angular.margin_logits(cos, labels, *margin, False)
    assert torch.equal(logits[:4], 10.0 * cos[:4])
    loss, lse = torch.ops.angular.margin_cross_entropy(cos, labels, *margin, 0.1, False)
    assert (loss[:4] == 0).all() and (lse[:4] == 0).all() and loss[4] > 0
    grad = torch.ops.angular.margin_cross_entropy_backward(
        torch.ones(5), cos, labels, lse, *margin, 0.1, False
    )
    assert (grad[:4] == 0).all() and (grad[4] != 0).any()
    grad = torch.ops.angular.margin_logits_backward(
        torch.ones_like(cos), cos, labels, *margin, False
    )
    assert torch.equal(grad[:4], torch.full_like(grad[:4], 10.0))


def test_nan_stays_in_its_row(seed):
    cos, labels = make_inputs(4, 50, torch.float32, seed, hard=False)
    cos[1, (labels[1] + 1) % 50] = float("nan")
    loss = ops.margin_cross_entropy(cos, labels, s=16.0, m2=0.5, reduction="none")
    want = reference.margin_cross_entropy(cos.double(), labels, s=16.0, m2=0.5, reduction="none")
    assert torch.isnan(loss[1]) and torch.isnan(want[1])
    keep = torch.tensor([0, 2, 3])
    assert_close(loss[keep], want[keep], 1e-5, f"seed={seed} rows without NaN")


def test_gradcheck_fp64():
    """Exact-mode gradcheck of both fused ops, away from |cos| = 1."""
    generator = torch.Generator().manual_seed(1234)
    cos = (torch.rand(4, 6, generator=generator, dtype=torch.float64) * 1.9 - 0.95).requires_grad_()
    labels = torch.tensor([1, -1, 5, 0])
    for m1, m2, m3, lam in [PRESETS["arcface"], PRESETS["sphereface-lam5"], (1.5, 0.2, 0.1, 0.7)]:
        margin = dict(s=3.0, m1=m1, m2=m2, m3=m3, lam=lam)
        assert torch.autograd.gradcheck(
            lambda c, margin=margin: ops.margin_logits(c, labels, **margin), (cos,), fast_mode=False
        )
        assert torch.autograd.gradcheck(
            lambda c, margin=margin: ops.margin_cross_entropy(
                c, labels, label_smoothing=0.1, reduction="none", **margin
            ),
            (cos,),
            fast_mode=False,
        )


# --------------------------------------------------------------------------------------------------
# Every CPU capability the kernels are compiled for (AVX512, AVX2, DEFAULT), in subprocesses: the
# capability is fixed per process (ATEN_CPU_CAPABILITY); this process covers the native one.

CAPABILITY_ORDER = ("DEFAULT", "AVX2", "AVX512")

CAPABILITY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    import test_fused as t
    seed = int(sys.argv[1])
    for dtype in t.DTYPES:
        cos, labels = t.make_inputs(9, 1030, dtype, seed)
        for name, view in [("contiguous", cos)] + t.non_contiguous_views(cos)[:1]:
            t.check_against_reference(
                view, labels, s=64.0, m1=4.0, m2=0.0, m3=0.0, lam=5.0, eps=0.1,
                straight_through=False, context=f"seed={seed} {name} {dtype}")
    print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability()}))
    """
)


def run_at_capability(script: str, seed: int, capability: str) -> None:
    """Run ``script`` (which imports a test module) in a process pinned to CPU ``capability``;
    skip when that is this process's capability or one this CPU lacks."""
    native = torch.backends.cpu.get_cpu_capability()
    if native not in CAPABILITY_ORDER or native == capability:
        pytest.skip(f"{capability} is this process's capability ({native}), tested above")
    if CAPABILITY_ORDER.index(capability) > CAPABILITY_ORDER.index(native):
        pytest.skip(f"this CPU does not support {capability} (it has {native})")
    # The child imports a test module: it gets this process's import path.
    env = dict(
        os.environ,
        ATEN_CPU_CAPABILITY=capability.lower(),
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(sys.path),
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(seed)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, f"seed={seed} {capability}:\n{done.stdout}\n{done.stderr[-4000:]}"
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["capability"] == capability


@pytest.mark.parametrize("capability", ["DEFAULT", "AVX2"])
def test_other_cpu_capabilities(seed, capability):
    run_at_capability(CAPABILITY_SCRIPT, seed, capability)


def test_guard_zone_gradient_is_the_references(seed):
    """In fp64 the derivative inside the guard zone is the reference's (same clamp), and finite in
    every dtype for |cos| = 1 exactly."""
    for value in (1.0, -1.0, 1 - 1e-9, math.cos(0.005), -math.cos(0.009)):
        cos = torch.tensor([[value, 0.3, -0.2]], dtype=torch.float64, requires_grad=True)
        ref = cos.detach().clone().requires_grad_()
        labels = torch.tensor([0])
        ops.margin_logits(cos, labels, s=1.0, m1=4.0, lam=1.0).sum().backward()
        reference.margin_logits(ref, labels, s=1.0, m1=4.0, lam=1.0).sum().backward()
        assert_close(cos.grad, ref.grad, 1e-12, f"cos_y={value}")
        for dtype in DTYPES[:3]:
            low = cos.detach().to(dtype).requires_grad_()
            ops.margin_cross_entropy(low, labels, s=64.0, m1=4.0).backward()
            assert torch.isfinite(low.grad).all(), f"cos_y={value} {dtype}"
