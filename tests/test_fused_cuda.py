"""The fused CUDA kernels against the fp64 reference (docs/design.md, Testing), plus what only a
GPU shows: row splitting for few huge rows, the grid-row loop for many rows, 16-byte packs versus
misaligned rows, agreement with the CPU kernels, a side stream, opcheck, torch.compile and peak
memory.

Marked ``cuda`` and skipped without a GPU; ``benchmarks/gpu_check.sh`` runs them (``pytest -m
cuda``) on a GPU machine. With a GPU but without CUDA kernels in ``angular._C`` they skip, or fail
under ``ANGULAR_REQUIRE_EXTENSION=1``.
"""

from __future__ import annotations

import random

import pytest
import torch
from test_fused import (
    DTYPES,
    PRESETS,
    assert_close,
    check_against_reference,
    make_inputs,
    non_contiguous_views,
    require_fused,
)
from test_op_registration import compiled_matches_eager, run_opcheck

from angular import ops
from angular.nn import heads
from angular.ops import reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]
DEVICE = "cuda"


@pytest.fixture(autouse=True)
def _fused_cuda_kernels():
    require_fused(DEVICE)


@pytest.fixture
def seed() -> int:
    return random.SystemRandom().randrange(2**31)


def test_backend_is_cuda():
    assert ops.backend() == "cuda"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("preset", PRESETS)
def test_presets_match_reference(seed, preset, dtype):
    m1, m2, m3, lam = PRESETS[preset]
    cos, labels = make_inputs(12, 1027, dtype, seed, device=DEVICE)
    for straight_through, eps in ((False, 0.1), (True, 0.0)):
        check_against_reference(
            cos, labels, s=64.0, m1=m1, m2=m2, m3=m3, lam=lam, eps=eps,
            straight_through=straight_through, context=f"cuda seed={seed} {preset} {dtype}",
        )  # fmt: skip


@pytest.mark.parametrize("draw", range(4))
def test_random_margins_match_reference(seed, draw):
    rng = random.Random(seed)
    margin = dict(
        s=rng.uniform(0.5, 100.0),
        m1=rng.uniform(0.5, 5.0),
        m2=rng.choice([0.0, rng.uniform(0.0, 1.5)]),
        m3=rng.uniform(-0.5, 0.5),
        lam=rng.choice([0.0, rng.uniform(0.0, 10.0), rng.uniform(100.0, 2000.0)]),
        eps=rng.choice([0.0, rng.uniform(0.0, 0.5)]),
        straight_through=rng.random() < 0.5,
    )
    batch, classes = rng.randint(1, 300), rng.randint(1, 5000)
    for dtype in (torch.float32, torch.float64):
        cos, labels = make_inputs(batch, classes, dtype, seed, device=DEVICE)
        check_against_reference(
            cos, labels, **margin, context=f"cuda seed={seed} B={batch} C={classes} {dtype}"
        )


@pytest.mark.parametrize(
    ("batch", "classes", "dtype"),
    [
        (1, 1, torch.float32),
        (5, 1, torch.bfloat16),
        (1, 70001, torch.float32),
        (4, 1_000_000, torch.float32),  # one row split over hundreds of blocks
        (128, 200_003, torch.bfloat16),  # odd C: most rows misaligned for 16-byte packs
        (70_000, 5, torch.float16),  # more rows than gridDim.y allows
    ],
)
def test_shapes(seed, batch, classes, dtype):
    cos, labels = make_inputs(batch, classes, dtype, seed, device=DEVICE)
    check_against_reference(
        cos, labels, s=64.0, m1=1.0, m2=0.5, m3=0.0, lam=0.0, eps=0.1, straight_through=False,
        context=f"cuda seed={seed} B={batch} C={classes} {dtype}",
    )  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_non_contiguous_cos(seed, dtype):
    cos, labels = make_inputs(11, 300, dtype, seed, device=DEVICE)
    for name, view in non_contiguous_views(cos):
        check_against_reference(
            view, labels, s=30.0, m1=1.0, m2=0.3, m3=0.2, lam=0.0, eps=0.05,
            straight_through=False, context=f"cuda seed={seed} {name} {dtype}",
        )  # fmt: skip


def test_rows_without_target_and_out_of_range_labels(seed):
    cos, _ = make_inputs(5, 6, torch.float32, seed, device=DEVICE, hard=False)
    labels = torch.tensor([6, 10**12, -(10**12), -1, 2], device=DEVICE)
    margin = (10.0, 1.0, 0.5, 0.0, 0.0)
    logits = torch.ops.angular.margin_logits(cos, labels, *margin, False)
    assert torch.equal(logits[:4], 10.0 * cos[:4])
    loss, lse = torch.ops.angular.margin_cross_entropy(cos, labels, *margin, 0.1, False)
    assert (loss[:4] == 0).all() and (lse[:4] == 0).all() and loss[4] > 0
    grad = torch.ops.angular.margin_cross_entropy_backward(
        torch.ones(5, device=DEVICE), cos, labels, lse, *margin, 0.1, False
    )
    assert (grad[:4] == 0).all() and (grad[4] != 0).any()


def test_cuda_matches_cpu_kernels(seed):
    cos, labels = make_inputs(64, 5000, torch.float32, seed)
    margin = dict(s=64.0, m1=1.0, m2=0.3, m3=0.2, label_smoothing=0.1, reduction="none")
    results = {}
    for device in ("cpu", DEVICE):
        leaf = cos.to(device).requires_grad_()
        loss = ops.margin_cross_entropy(leaf, labels.to(device), **margin)
        (grad,) = torch.autograd.grad(loss.sum(), leaf)
        results[device] = (loss.cpu(), grad.cpu())
    assert_close(results[DEVICE][0], results["cpu"][0], 1e-5, f"seed={seed} loss")
    assert_close(results[DEVICE][1], results["cpu"][1], 1e-4, f"seed={seed} grad")


def test_side_stream(seed):
    """The kernels run on the current stream: results on a side stream, synchronised through it."""
    cos, labels = make_inputs(256, 4099, torch.float32, seed, device=DEVICE)
    want = reference.margin_cross_entropy(cos.double(), labels, s=64.0, m2=0.5, reduction="none")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = ops.margin_cross_entropy(cos, labels, s=64.0, m2=0.5, reduction="none")
    torch.cuda.current_stream().wait_stream(side)
    assert_close(got, want, 1e-5, f"seed={seed} side stream")


def test_opcheck_cuda():
    run_opcheck(DEVICE)


def test_compile_fullgraph_matches_eager_cuda():
    """Dynamo and AOT autograd through the CUDA op (inductor's handling of the op as an extern
    kernel is the same on both devices and is tested on CPU; triton compiles would not fit the
    GPU script's few minutes)."""
    compiled_matches_eager(lambda: heads.ArcFace(16, 50, s=32.0), DEVICE, "aot_eager")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_allocates_one_matrix_cuda(dtype):
    batch, classes = 512, 100_000
    cos, labels = make_inputs(batch, classes, dtype, 5, device=DEVICE)
    leaf = cos.detach().clone().requires_grad_()
    matrix = batch * classes * cos.element_size()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    (grad,) = torch.autograd.grad(
        ops.margin_cross_entropy(leaf, labels, s=64.0, m2=0.5, label_smoothing=0.1), leaf
    )
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    # The caching allocator rounds blocks up (2 MiB granularity for large ones); the workspace
    # is B x splits x 3 numbers, the per-row outputs B numbers each.
    assert matrix <= extra <= matrix + 8 * 2**20, f"peak extra {extra} B, one matrix {matrix} B"
    del grad
