"""The fused linear + margin + cross-entropy op against its unfused composition.

The yardstick is :func:`angular.ops.reference.linear_margin_cross_entropy` (normalise, matmul,
reference ``margin_cross_entropy``) evaluated in fp64 on the same (rounded) inputs; every check draws
fresh random embeddings and centres (the seed is in each failure message). Tolerances are relative,
with an absolute floor of the same size times the largest reference magnitude: fp64 1e-10 (values
and gradients), fp32 1e-5 (values and gradients), fp16/bf16 1e-2 as the other fused ops.

The CPU kernel cuts the classes into chunks of 64 to 1024 columns (csrc/cpu/linear_margin_cpu.cpp);
C = 2500 at small B is three chunks, the last one partial, spread over the threads.
"""

from __future__ import annotations

import functools
import random
import zlib

import pytest
import torch
from test_fused import PRESETS, REQUIRE_EXTENSION, RecordOps, assert_close, require_fused
from test_op_registration import allocation_peak

from angular import ops
from angular.nn import heads
from angular.ops import linear, reference

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def _fused_cpu_kernels():
    require_fused("cpu")
    if not linear.has_kernel("cpu"):
        pytest.fail("angular.ops._C was built without linear_margin_cross_entropy: rebuild it")


def assert_close_floor(got, want, rtol, context, *, atol=0.0):
    """test_fused's assert_close (relative, with a floor of rtol times the largest magnitude of
    want), with the floor raised to at least atol."""
    floor = max(rtol * want.detach().abs().max().item(), atol)
    torch.testing.assert_close(
        got.detach().double(),
        want.detach().double(),
        rtol=rtol,
        atol=floor,
        equal_nan=True,
        msg=lambda message: f"{context}\n{message}",
    )


@pytest.fixture
def seed() -> int:
    return random.SystemRandom().randrange(2**31)


def make_inputs(
    batch, dim, classes, dtype, seed, *, weight_dtype=None, device="cpu", on_centre=False
):
    """Random embeddings and centres of uneven norms; labels with one row without target (-1) and
    one with a very negative label, when B allows. ``on_centre``: row 3's target centre is a
    multiple of its embedding (cos = 1 up to rounding: the gradient guard zone)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    x *= torch.rand(batch, 1, generator=generator, dtype=torch.float64) * 3 + 0.1
    weight = torch.randn(classes, dim, generator=generator, dtype=torch.float64)
    weight *= torch.rand(classes, 1, generator=generator, dtype=torch.float64) * 2 + 0.05
    labels = torch.randint(0, classes, (batch,), generator=generator)
    if batch >= 4:
        labels[1] = -1
        labels[2] = -(10**12)
        if on_centre:
            weight[labels[3]] = 2.0 * x[3]
    x, weight = x.to(dtype), weight.to(weight_dtype or dtype)
    return x.to(device), weight.to(device), labels.to(device)


def check_against_reference(
    x, weight, labels, *, rtol=None, atol=0.0, logit_floor=False, context, **margin
):
    """Loss (each reduction) and both gradients, fused vs the fp64 unfused composition. ``atol``
    raises the absolute floor where the exact result is 0 (C = 1: loss 0; D = 1: grad_x 0).

    ``logit_floor``: the floor is also rtol on the scale of the logits, s (times the upstream
    gradient over the smallest norm of x and weight rows, for gradients). The fused op's cosines
    carry the rounding of a GEMM in the arithmetic dtype (the reference's are exact), which s turns
    into an absolute error of the logits; where a margin makes the target dominate (m1 < 1, m3 < 0),
    the loss is a tiny difference of two large logits and only that absolute scale is meaningful."""
    rtol = rtol or TOLERANCE[x.dtype]
    norms = torch.cat([x.detach().double().norm(dim=1), weight.detach().double().norm(dim=1)])
    smallest = max(norms.min().item(), 1e-12)
    targets = max(int(((labels >= 0) & (labels < weight.shape[0])).sum()), 1)
    context = f"{context} {margin}"
    generator = torch.Generator().manual_seed(zlib.crc32(context.encode()))
    for reduction in ("none", "mean", "sum"):
        got_x, got_w = (t.detach().clone().requires_grad_() for t in (x, weight))
        ref_x, ref_w = (t.detach().double().requires_grad_() for t in (x, weight))
        got = ops.linear_margin_cross_entropy(got_x, got_w, labels, reduction=reduction, **margin)
        want = reference.linear_margin_cross_entropy(
            ref_x, ref_w, labels, reduction=reduction, **margin
        )
        where = f"{context} {reduction}"
        upstream = 1.0 if reduction == "mean" else float(targets)  # none: weights in [0, 1)
        scale = margin["s"] if logit_floor else 0.0
        loss_floor = rtol * scale * (upstream if reduction == "sum" else 1.0)
        assert_close = functools.partial(assert_close_floor, atol=max(atol, loss_floor))
        assert got.dtype == reference.compute_dtype(x.dtype) and got.shape == want.shape, where
        assert_close(got, want, rtol, f"{where}: loss")
        if reduction == "none":
            assert (got[labels < 0] == 0).all(), f"{where}: rows without target have loss 0"
            weights = torch.rand(x.shape[0], generator=generator, dtype=torch.float64)
            (got * weights.to(got)).sum().backward()
            (want * weights.to(want)).sum().backward()
        else:
            got.backward()
            want.backward()
        grad_floor = rtol * scale * upstream / smallest
        assert_close = functools.partial(assert_close_floor, atol=max(atol, grad_floor))
        for name, got_grad, want_grad, source in (
            ("grad_x", got_x.grad, ref_x.grad, x),
            ("grad_weight", got_w.grad, ref_w.grad, weight),
        ):
            assert got_grad.dtype == source.dtype and got_grad.shape == source.shape, where
            assert torch.isfinite(got_grad).all(), f"{where}: {name} not finite"
            assert_close(got_grad, want_grad, rtol, f"{where}: {name}")
        assert (got_x.grad[labels < 0] == 0).all(), f"{where}: rows without target get grad 0"


def test_dispatches_to_the_fused_kernels():
    x, weight, labels = make_inputs(4, 8, 30, torch.float32, 0)
    x.requires_grad_()
    weight.requires_grad_()
    with RecordOps() as recorded:
        ops.linear_margin_cross_entropy(x, weight, labels, s=8.0, m2=0.5).backward()
    names = [name for name in recorded.names if name.startswith("angular.")]
    assert names == [
        "angular.linear_margin_cross_entropy.default",
        "angular.linear_margin_cross_entropy_backward.default",
    ]
    # Nothing of shape (B, C) goes through the dispatcher either.
    assert "aten.mm.default" not in recorded.names


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("preset", PRESETS)
def test_presets_match_reference(seed, preset, dtype):
    m1, m2, m3, lam = PRESETS[preset]
    x, weight, labels = make_inputs(12, 37, 2500, dtype, seed)  # D odd, C = 3 uneven chunks
    for straight_through, eps in ((False, 0.1), (True, 0.0)):
        check_against_reference(
            x, weight, labels, s=64.0, m1=m1, m2=m2, m3=m3, lam=lam, label_smoothing=eps,
            straight_through=straight_through, context=f"seed={seed} {preset} {dtype}",
        )  # fmt: skip


@pytest.mark.parametrize("draw", range(4))
def test_random_margins_and_shapes(seed, draw):
    rng = random.Random(seed + draw)
    margin = dict(
        s=rng.uniform(1.0, 100.0),
        m1=rng.uniform(0.5, 5.0),
        m2=rng.choice([0.0, rng.uniform(0.0, 1.5)]),
        m3=rng.uniform(-0.5, 0.5),
        lam=rng.choice([0.0, rng.uniform(0.0, 10.0)]),
        label_smoothing=rng.choice([0.0, rng.uniform(0.0, 0.5)]),
        straight_through=rng.random() < 0.5,
    )
    batch, dim, classes = rng.randint(1, 70), rng.randint(2, 90), rng.randint(2, 3000)
    for dtype in (torch.float32, torch.float64):
        x, weight, labels = make_inputs(batch, dim, classes, dtype, seed)
        check_against_reference(
            x, weight, labels, logit_floor=True,
            context=f"seed={seed} B={batch} D={dim} C={classes} {dtype}", **margin,
        )  # fmt: skip


@pytest.mark.parametrize(
    ("batch", "dim", "classes"), [(1, 5, 1), (6, 3, 1), (1, 1, 40), (1, 9, 1025), (300, 17, 700)]
)
def test_edge_shapes(seed, batch, dim, classes):
    """C = 1, B = 1, D = 1 (every cosine is +-1), one column past a chunk, B above the chunk."""
    for dtype in (torch.float32, torch.float64):
        x, weight, labels = make_inputs(batch, dim, classes, dtype, seed)
        # Exact zeros (C = 1: the loss; D = 1: both gradients) come out of cancellations between
        # terms of size s / |v|: that is the scale their rounding is judged against.
        smallest = min(x.double().norm(dim=1).min(), weight.double().norm(dim=1).min()).item()
        check_against_reference(
            x, weight, labels, atol=TOLERANCE[dtype] * 30.0 / min(smallest, 1.0), s=30.0, m1=1.0,
            m2=0.5,
            label_smoothing=0.1, context=f"seed={seed} B={batch} D={dim} C={classes} {dtype}",
        )  # fmt: skip


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_weight_in_another_dtype(seed, x_dtype):
    """fp32 centres with low-precision embeddings (a head under autocast), and the other way."""
    for weight_dtype in (torch.float32, torch.bfloat16):
        x, weight, labels = make_inputs(9, 20, 1500, x_dtype, seed, weight_dtype=weight_dtype)
        rtol = max(TOLERANCE[x_dtype], TOLERANCE[weight_dtype])
        check_against_reference(
            x, weight, labels, rtol=rtol, s=64.0, m2=0.5, label_smoothing=0.1,
            context=f"seed={seed} x {x_dtype} weight {weight_dtype}",
        )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_target_on_its_centre(seed, dtype):
    """cos = 1 up to rounding at a target. acos amplifies a rounding error d of the cosine to
    sqrt(2 d) in the angle, so the fused op and the composition (which round the cosine in
    different orders) agree to about s * sqrt(eps) there, and gradients stay finite (the guard)."""
    x, weight, labels = make_inputs(8, 16, 700, dtype, seed, on_centre=True)
    check_against_reference(
        x, weight, labels, rtol=1e-6 if dtype == torch.float64 else 1e-2, s=64.0, m1=1.0,
        m2=0.5, label_smoothing=0.1, context=f"seed={seed} on centre {dtype}",
    )  # fmt: skip


def test_non_contiguous_inputs(seed):
    x, weight, labels = make_inputs(10, 24, 1300, torch.float64, seed)
    views = {
        "transposed": (x.t().contiguous().t(), weight.t().contiguous().t()),
        "column-step": (
            torch.zeros(10, 48, dtype=x.dtype).index_copy_(1, torch.arange(0, 48, 2), x)[:, ::2],
            torch.zeros(1300, 48, dtype=x.dtype).index_copy_(1, torch.arange(0, 48, 2), weight)[
                :, ::2
            ],
        ),
        "row-slice": (x, torch.cat([weight, weight[:7]])[:1300]),
    }
    for name, (x_view, weight_view) in views.items():
        assert torch.equal(x_view, x) and torch.equal(weight_view, weight), name
        check_against_reference(
            x_view, weight_view, labels, s=16.0, m1=1.0, m2=0.3, m3=0.2, label_smoothing=0.05,
            context=f"seed={seed} {name}",
        )  # fmt: skip


def test_zero_rows_follow_normalize(seed):
    """A zero embedding or centre: F.normalize's eps (v / 1e-12) in value and gradient."""
    x, weight, labels = make_inputs(6, 10, 200, torch.float64, seed)
    x[0] = 0.0
    weight[(labels[4] + 1) % 200] = 0.0
    check_against_reference(
        x, weight, labels, s=8.0, m2=0.5, label_smoothing=0.1, context=f"seed={seed} zero rows"
    )


def test_rows_without_target(seed):
    x, weight, _ = make_inputs(5, 12, 300, torch.float32, seed)
    labels = torch.tensor([-1, -5, -1, -(10**12), -1])
    x.requires_grad_()
    weight.requires_grad_()
    for reduction in ("none", "mean", "sum"):
        loss = ops.linear_margin_cross_entropy(x, weight, labels, s=10.0, reduction=reduction)
        assert (loss == 0).all()
        x.grad = weight.grad = None
        loss.sum().backward()
        assert (x.grad == 0).all() and (weight.grad == 0).all()


def test_gradcheck_fp64():
    generator = torch.Generator().manual_seed(99)
    x = torch.randn(4, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([1, -1, 6, 0])
    for m1, m2, m3, lam in [PRESETS["arcface"], PRESETS["sphereface-lam5"], (1.5, 0.2, 0.1, 0.7)]:
        margin = dict(s=3.0, m1=m1, m2=m2, m3=m3, lam=lam, label_smoothing=0.1)
        assert torch.autograd.gradcheck(
            lambda a, b, margin=margin: ops.linear_margin_cross_entropy(
                a, b, labels, reduction="none", **margin
            ),
            (x, weight),
            fast_mode=False,
        )


def test_opcheck():
    x, weight, labels = make_inputs(6, 11, 1100, torch.float32, 5)
    ops.linear_margin_cross_entropy(x, weight, labels, s=4.0)  # registers the Python parts
    samples = []
    for dtype, weight_dtype, margin, eps, straight in (
        (torch.float32, torch.float32, (16.0, 1.0, 0.5, 0.0, 0.0), 0.0, False),
        (torch.float64, torch.float64, (30.0, 1.0, 0.3, 0.2, 0.0), 0.2, True),
        (torch.bfloat16, torch.float32, (64.0, 4.0, 0.0, 0.0, 5.0), 0.1, False),
    ):
        x, weight, labels = make_inputs(6, 11, 1100, dtype, 7, weight_dtype=weight_dtype)
        args = (x.requires_grad_(), weight.requires_grad_(), labels, *margin, eps, straight)
        _, lse, x_norm, w_norm = torch.ops.angular.linear_margin_cross_entropy(*args)
        grad_rows = torch.rand(6, dtype=lse.dtype)
        samples.append((torch.ops.angular.linear_margin_cross_entropy, args))
        samples.append(
            (
                torch.ops.angular.linear_margin_cross_entropy_backward,
                (grad_rows, x.detach(), weight.detach(), labels, lse, x_norm, w_norm, *margin)
                + (eps, straight),
            )
        )
    for op, args in samples:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(backend):
    x, weight, labels = make_inputs(8, 16, 600, torch.float32, 11)
    fn = torch.compile(
        lambda a, b, y, m: ops.linear_margin_cross_entropy(
            a, b, y, s=32.0, m2=m, label_smoothing=0.1
        ),
        fullgraph=True,
        backend=backend,
    )
    for margin in (0.5, 0.3):
        got_x, got_w = (t.clone().requires_grad_() for t in (x, weight))
        ref_x, ref_w = (t.double().requires_grad_() for t in (x, weight))
        got = fn(got_x, got_w, labels, margin)
        want = reference.linear_margin_cross_entropy(
            ref_x, ref_w, labels, s=32.0, m2=margin, label_smoothing=0.1
        )
        got.backward()
        want.backward()
        assert_close(got, want, 1e-5, f"{backend} m2={margin} loss")
        assert_close(got_x.grad, ref_x.grad, 1e-5, f"{backend} m2={margin} grad_x")
        assert_close(got_w.grad, ref_w.grad, 1e-5, f"{backend} m2={margin} grad_weight")


def test_no_batch_by_classes_buffer():
    """Forward + backward allocate grad_weight, grad_x and small buffers; the unfused composition,
    measured the same way, allocates several B x C buffers (so the measurement can tell). The
    profiler sees the calling thread's allocations; worker threads only add per-thread tiles."""
    batch, dim, classes = 64, 16, 50000
    x, weight, labels = make_inputs(batch, dim, classes, torch.float32, 3)
    matrix = batch * classes * 4
    # grad_weight, two tiles of at most 1024 columns per thread, per-class norms, 1 MiB of slack.
    allowed = classes * dim * 4 + 2 * torch.get_num_threads() * batch * 1024 * 4 + classes * 4
    allowed += 2**20
    assert allowed < matrix

    def step(loss_fn):
        a, b = x.clone().requires_grad_(), weight.clone().requires_grad_()
        return lambda: torch.autograd.grad(loss_fn(a, b, labels, s=64.0, m2=0.5), (a, b))

    fused = allocation_peak(step(ops.linear_margin_cross_entropy))
    assert fused <= allowed, f"fused peak {fused} B, allowed {allowed} B, B x C {matrix} B"
    unfused = allocation_peak(step(reference.linear_margin_cross_entropy))
    assert unfused >= 2 * matrix, f"unfused peak {unfused} B: the measurement misses allocations"


def test_falls_back_to_the_composition(seed, monkeypatch):
    """Without a kernel for the device, the same function through normalise + matmul + the margin
    op (a warning says so once, tested in test_ops_api for the shared mechanism)."""
    x, weight, labels = make_inputs(7, 9, 50, torch.float64, seed)
    monkeypatch.setattr(linear, "_fused_for", lambda device_type: False)
    got = linear.linear_margin_cross_entropy(x, weight, labels, s=20.0, m2=0.4)
    want = reference.linear_margin_cross_entropy(x, weight, labels, s=20.0, m2=0.4)
    assert_close(got, want, 1e-12, f"seed={seed} fallback")


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (dict(x=torch.randn(3)), ValueError, "x must have shape"),
        (dict(weight=torch.randn(5)), ValueError, "weight must have shape"),
        (dict(x=torch.randn(4, 6)), ValueError, "weight has D = 8"),
        (dict(x=torch.ones(4, 8, dtype=torch.int32)), TypeError, "x must be float"),
        (dict(weight=torch.ones(5, 8, dtype=torch.int64)), TypeError, "weight must be float"),
        (dict(labels=torch.zeros(4, dtype=torch.int32)), TypeError, "labels must be int64"),
        (dict(labels=torch.zeros(3, dtype=torch.int64)), ValueError, "labels has 3 entries"),
        (dict(labels=torch.tensor([0, 1, 5, 2])), ValueError, "labels must be < C = 5"),
        (dict(weight=torch.randn(0, 8)), ValueError, "weight must have C >= 1"),
        (dict(x=torch.randn(0, 8), labels=torch.zeros(0, dtype=torch.int64)), ValueError, "B >= 1"),
        (dict(x=[[1.0]]), TypeError, "x must be a torch.Tensor"),
        (dict(s=0.0), ValueError, "s must be > 0"),
        (dict(m2=float("nan")), ValueError, "m2 must be finite"),
        (dict(label_smoothing=1.5), ValueError, "label_smoothing must be in"),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
    ],
)
def test_bad_input_names_the_argument(change, error, match):
    args = dict(x=torch.randn(4, 8), weight=torch.randn(5, 8), labels=torch.tensor([0, 1, 4, -1]))
    args.update(change)
    margin = {key: args.pop(key) for key in list(args) if key not in ("x", "weight", "labels")}
    margin.setdefault("s", 10.0)
    with pytest.raises(error, match=match):
        ops.linear_margin_cross_entropy(args["x"], args["weight"], args["labels"], **margin)


# --------------------------------------------------------------------------------------------------
# Heads


@pytest.mark.parametrize("preset", sorted(heads.PRESETS))
def test_head_fused_linear_matches_the_unfused_head(preset):
    """Same centres, same batches: loss, grad of x and of the centres, and the lam schedule."""
    torch.manual_seed(0)
    unfused = heads.PRESETS[preset](24, 3000, s=32.0, label_smoothing=0.1, fused_linear=False)
    fused = heads.PRESETS[preset](24, 3000, s=32.0, label_smoothing=0.1, fused_linear=True)
    fused.load_state_dict(unfused.state_dict())
    assert fused.fused_linear and not unfused.fused_linear
    for step in range(2):
        x = torch.randn(16, 24)
        labels = torch.randint(0, 3000, (16,))
        labels[5] = -1
        results = []
        for head in (unfused, fused):
            head.weight.grad = None
            leaf = x.clone().requires_grad_()
            loss = head.loss(leaf, labels)
            loss.backward()
            results.append((loss, leaf.grad, head.weight.grad))
        for name, got, want in zip(("loss", "grad_x", "grad_weight"), results[1], results[0]):
            assert_close(got, want, 1e-5, f"{preset} step {step} {name}")
    assert int(fused.step) == int(unfused.step) == 2


def test_head_chooses_fused_linear_by_class_count():
    small = heads.ArcFace(8, heads.FUSED_LINEAR_MIN_CLASSES - 1)
    large = heads.ArcFace(8, heads.FUSED_LINEAR_MIN_CLASSES)
    assert not small.fused_linear and large.fused_linear
    assert "fused_linear=True" in repr(large)
    with RecordOps() as recorded:
        large.loss(torch.randn(3, 8), torch.tensor([0, 5, -1]))
    assert "angular.linear_margin_cross_entropy.default" in recorded.names
    with pytest.raises(TypeError, match="fused_linear"):
        heads.ArcFace(8, 10, fused_linear="yes")
    with pytest.raises(ValueError, match=r"x must have shape \(B, 8\)"):
        large.loss(torch.randn(3, 7), torch.tensor([0, 5, -1]))


def test_head_fused_linear_compiles_fullgraph():
    torch.manual_seed(1)
    head = heads.CosFace(16, 500, s=32.0, fused_linear=True)
    x = torch.randn(12, 16)
    labels = torch.randint(0, 500, (12,))
    want = head.loss(x, labels)
    got = torch.compile(head.loss, fullgraph=True, backend="aot_eager")(x, labels)
    assert_close(got, want, 1e-6, "compiled head loss")


# --------------------------------------------------------------------------------------------------
# CUDA (benchmarks/gpu_check.sh runs `pytest -m cuda`; skipped without a GPU)


def require_cuda_kernel():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if not linear.has_kernel("cuda"):
        message = "angular.ops._C has no CUDA linear_margin_cross_entropy kernel"
        if REQUIRE_EXTENSION:
            pytest.fail(message)
        pytest.skip(message)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_cuda_matches_reference(seed, dtype):
    """B = 2048 makes the CUDA chunks 4096 (fp32) or 8192 (bf16/fp16) columns: C = 9000 is
    several chunks, the last one partial."""
    require_cuda_kernel()
    x, weight, labels = make_inputs(2048, 37, 9000, dtype, seed, device="cuda")
    for preset in ("arcface", "sphereface-lam5", "combined"):
        m1, m2, m3, lam = PRESETS[preset]
        check_against_reference(
            x, weight, labels, s=64.0, m1=m1, m2=m2, m3=m3, lam=lam, label_smoothing=0.1,
            context=f"seed={seed} cuda {preset} {dtype}",
        )  # fmt: skip
    x, weight, labels = make_inputs(9, 20, 1500, torch.bfloat16, seed, weight_dtype=torch.float32)
    check_against_reference(
        x.cuda(), weight.cuda(), labels.cuda(), s=64.0, m2=0.5, label_smoothing=0.1,
        context=f"seed={seed} cuda bf16 x, fp32 weight",
    )  # fmt: skip


@pytest.mark.cuda
def test_cuda_opcheck_and_compile():
    require_cuda_kernel()
    x, weight, labels = make_inputs(6, 11, 1100, torch.float32, 5, device="cuda")
    args = (x.requires_grad_(), weight.requires_grad_(), labels, 16.0, 1.0, 0.5, 0.0, 0.0, 0.1)
    torch.library.opcheck(torch.ops.angular.linear_margin_cross_entropy, (*args, False))
    fn = torch.compile(
        lambda a, b, y: ops.linear_margin_cross_entropy(a, b, y, s=16.0, m2=0.5),
        fullgraph=True,
        backend="aot_eager",
    )
    got = fn(x, weight, labels)
    want = reference.linear_margin_cross_entropy(
        x.double(), weight.double(), labels, s=16.0, m2=0.5
    )
    assert_close(got, want, 1e-5, "cuda compiled loss")


# --------------------------------------------------------------------------------------------------
# The pipeline's key: heads.<name>.fused_linear (params.yaml)


def test_params_yaml_key_reaches_the_head():
    from pathlib import Path

    import yaml

    from angular import config
    from angular.nn.recognition import build_model

    raw = yaml.safe_load((Path(__file__).parents[2] / "params.yaml").read_text())
    for value in (True, False, None):
        raw["heads"]["arcface"]["fused_linear"] = value
        head = config.parse_params(raw).heads["arcface"].heads["arcface"]
        assert head.fused_linear is value and head.to_dict()["fused_linear"] is value
        backbone = dict(name="small_cnn", in_channels=1, embedding_dim=8, options={})
        model = build_model(backbone, {"arcface": head.to_dict()}, num_classes=5)
        assert model.heads["arcface"].fused_linear is bool(value)  # None: 5 classes, off
    raw["heads"]["arcface"]["fused_linear"] = "yes"
    with pytest.raises(config.ConfigError, match="heads.arcface.fused_linear: must be true or"):
        config.parse_params(raw)
