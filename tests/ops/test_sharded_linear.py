"""The fused linear op in shard mode (angular.ops.sharded.sharded_linear_margin_cross_entropy) on one
process: the classes cut into W shards, each shard's partials from the kernel, combined as the
all-reduce combines them, and each shard's backward given the global log-sum-exp, equal the fp64
unfused composition on the whole head (loss, grad_x summed over the shards, grad_weight of each
shard). Real processes (gloo, W = 1..4) are tests/distributed/test_sharded_exactness.py.

Fresh random inputs each run (the seed is in each failure message); tolerances as
tests/ops/test_fused_linear.py: relative, with a floor of the same size times the largest reference
magnitude (the logit floor where a margin makes the loss a difference of large logits)."""

from __future__ import annotations

import random

import pytest
import torch
from test_fused import REQUIRE_EXTENSION
from test_fused_linear import TOLERANCE, assert_close_floor, make_inputs
from test_op_registration import allocation_peak

from angular.ops import reference, sharded

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MARGINS = [
    dict(s=64.0, m2=0.5),  # ArcFace: targets past pi - m wrap
    dict(s=30.0, m3=0.35, label_smoothing=0.1),  # CosFace, smoothed over the global C
    dict(s=16.0, m1=0.9, m2=0.3, m3=0.2, straight_through=True),
    dict(s=30.0, m1=4.0, lam=5.0),  # SphereFace with its lambda
]


@pytest.fixture(autouse=True)
def _linear_shard_kernels():
    if not sharded.has_linear_kernel("cpu"):
        pytest.fail("angular.ops._C was built without sharded_linear_margin_partials: rebuild it")


@pytest.fixture
def seed() -> int:
    return random.SystemRandom().randrange(2**31)


def bounds(classes: int, shards: int) -> list[tuple[int, int]]:
    return [sharded.shard_range(classes, shards, rank) for rank in range(shards)]


def local_labels(labels: torch.Tensor, start: int, count: int) -> torch.Tensor:
    inside = (labels >= start) & (labels < start + count)
    return torch.where(inside, labels - start, -1)


def sharded_loss_and_grads(x, weight, labels, shards, upstream, margin):
    """What W ranks compute, in one process: per-row losses, grad_x (the sum of the shards'), and
    grad_weight (the shards' rows), for the upstream gradient ``upstream`` of the per-row losses."""
    margin = dict(margin)
    eps = margin.pop("label_smoothing", 0.0)
    straight = margin.pop("straight_through", False)
    args = [margin["s"], margin.get("m1", 1.0), margin.get("m2", 0.0), margin.get("m3", 0.0)]
    args.append(margin.get("lam", 0.0))
    has_target = labels >= 0
    parts = []
    for start, count in bounds(weight.shape[0], shards):
        mine = local_labels(labels, start, count)
        w = weight[start : start + count]
        parts.append((mine, w, torch.ops.angular.sharded_linear_margin_partials(x, w, mine, *args)))
    # The all-reduce: the maximum, then the rescaled sums.
    row_max = torch.stack([p[2][0] for p in parts]).amax(0)
    sum_exp = sum(p[2][1] * torch.exp(p[2][0] - row_max) for p in parts)
    target = sum(p[2][2] for p in parts)
    logit_sum = sum(p[2][3] for p in parts)
    lse = row_max + torch.log(sum_exp)
    loss = (1 - eps) * (lse - target) + eps * (lse - logit_sum / weight.shape[0])
    loss = torch.where(has_target, loss, 0.0)
    grad_rows = torch.where(has_target, upstream.to(lse.dtype), 0.0)
    grad_x, grad_weight = 0, []
    for mine, w, (_, _, _, _, x_norm, w_norm) in parts:
        gx, gw = torch.ops.angular.sharded_linear_margin_backward(
            grad_rows, x, w, mine, lse, x_norm, w_norm, *args, eps, weight.shape[0], straight
        )
        grad_x = grad_x + gx.double()
        grad_weight.append(gw)
    return loss, grad_x, torch.cat(grad_weight)


def check(x, weight, labels, shards, margin, seed, context, rtol=None):
    rtol = rtol or TOLERANCE[x.dtype]
    generator = torch.Generator().manual_seed(seed)
    upstream = torch.rand(x.shape[0], generator=generator, dtype=torch.float64).to(x.device) + 0.1
    loss, grad_x, grad_weight = sharded_loss_and_grads(x, weight, labels, shards, upstream, margin)
    ref_x, ref_w = (t.detach().double().requires_grad_() for t in (x, weight))
    want = reference.linear_margin_cross_entropy(ref_x, ref_w, labels, reduction="none", **margin)
    (want * upstream).sum().backward()
    where = f"{context} W={shards} {margin} seed {seed}"
    # The logit floor (test_fused_linear's logit_floor): s times the tolerance, over the smallest
    # norm for the gradients.
    smallest = torch.cat([ref_x.norm(dim=1), ref_w.norm(dim=1)]).min().clamp(min=1e-12).item()
    floor = rtol * margin["s"]
    assert loss.dtype == reference.compute_dtype(x.dtype), where
    assert_close_floor(loss, want, rtol, f"{where}: loss", atol=floor)
    assert grad_weight.dtype == weight.dtype, where
    for name, got, ref in (
        ("grad_x", grad_x, ref_x.grad),
        ("grad_weight", grad_weight, ref_w.grad),
    ):
        assert torch.isfinite(got).all(), f"{where}: {name} not finite"
        assert_close_floor(got, ref, rtol, f"{where}: {name}", atol=floor * 2 / smallest)
    assert (grad_x[labels < 0] == 0).all(), f"{where}: rows without a target get gradient 0"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shards", [1, 2, 3])
def test_shards_combined_equal_the_whole_head(seed, dtype, shards):
    """Uneven shards of C = 2500 (several chunks each, the last partial), rows without a target
    (-1 and a very negative label)."""
    x, weight, labels = make_inputs(12, 24, 2500, dtype, seed)
    for margin in MARGINS:
        check(x, weight, labels, shards, margin, seed, f"{dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_target_on_its_centre(seed, dtype):
    """cos = 1 up to rounding at a target: acos turns a rounding d of the cosine into sqrt(2 d) of
    the angle, so the kernel and the composition agree to about s sqrt(eps) there (as
    test_fused_linear's test of the same name), and the gradients stay finite."""
    x, weight, labels = make_inputs(8, 16, 700, dtype, seed, on_centre=True)
    rtol = 1e-6 if dtype == torch.float64 else 1e-2
    check(x, weight, labels, 2, dict(s=64.0, m2=0.5, label_smoothing=0.1), seed, "on centre", rtol)


@pytest.mark.parametrize("batch,dim,classes,shards", [(1, 5, 3, 3), (3, 1, 7, 2), (5, 8, 1031, 4)])
def test_edge_shapes(seed, batch, dim, classes, shards):
    """B = 1, D = 1 (every cosine is +-1), a shard of one class, C not a multiple of W."""
    x, weight, labels = make_inputs(batch, dim, classes, torch.float64, seed)
    for margin in MARGINS:
        check(x, weight, labels, shards, margin, seed, f"B={batch} D={dim} C={classes}")


def test_weight_in_another_dtype_and_non_contiguous_inputs(seed):
    """bf16 embeddings with fp32 centres (a head under autocast); strided x and weight."""
    x, weight, labels = make_inputs(9, 16, 600, torch.bfloat16, seed, weight_dtype=torch.float32)
    check(x, weight, labels, 2, MARGINS[0], seed, "bf16 x, fp32 weight")
    x, weight, labels = make_inputs(9, 32, 600, torch.float32, seed)
    x, weight = x[:, ::2], weight[:, ::2]
    assert not x.is_contiguous() and not weight.is_contiguous()
    check(x, weight, labels, 3, MARGINS[1], seed, "strided")


def test_a_row_whose_upstream_gradient_is_zero_gets_zero_whatever_it_holds(seed):
    x, weight, labels = make_inputs(6, 8, 40, torch.float32, seed)
    labels = local_labels(labels, 0, 20)
    w = weight[:20]
    partials = torch.ops.angular.sharded_linear_margin_partials(x, w, labels, 64.0, 1.0, 0.5, 0, 0)
    lse = torch.full((6,), -1e4)  # would overflow exp(z - lse) where the gradient is computed
    grad_rows = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    grad_x, grad_w = torch.ops.angular.sharded_linear_margin_backward(
        grad_rows, x, w, labels, lse, partials[4], partials[5], 64.0, 1.0, 0.5, 0, 0, 0.0, 40, False
    )
    assert (grad_x[grad_rows == 0] == 0).all()
    assert not torch.isfinite(grad_x[1]).all()  # the live row does see the (absurd) lse


def test_no_batch_by_classes_buffer():
    """One rank's forward + backward through the public function allocates the shard's
    grad_weight, grad_x and small buffers, not B x C_local (measured as test_fused_linear's)."""
    batch, dim, classes = 64, 16, 50000
    x, weight, labels = make_inputs(batch, dim, classes, torch.float32, 3)
    matrix = batch * classes * 4
    allowed = classes * dim * 4 + 2 * torch.get_num_threads() * batch * 1024 * 4 + classes * 4
    allowed += 2**20
    assert allowed < matrix

    a, b = x.clone().requires_grad_(), weight.clone().requires_grad_()  # not counted

    def step():
        loss = sharded.sharded_linear_margin_cross_entropy(
            a, b, labels.clamp(min=-1), labels >= 0, num_classes=classes, s=64.0, m2=0.5
        )
        torch.autograd.grad(loss, (a, b))

    peak = allocation_peak(step)
    assert peak <= allowed, f"peak {peak} B, allowed {allowed} B, B x C {matrix} B"


def test_matches_the_composition_over_the_shard_cosines(seed):
    """The public function (one process, W = 1) equals sharded_margin_cross_entropy of the
    shard's cosines, the path it takes without the kernel."""
    x, weight, labels = make_inputs(10, 12, 300, torch.float64, seed)
    labels = labels.clamp(min=-1)
    for margin in MARGINS:
        got_x, got_w = (t.clone().requires_grad_() for t in (x, weight))
        ref_x, ref_w = (t.clone().requires_grad_() for t in (x, weight))
        common = dict(num_classes=300, **margin)
        got = sharded.sharded_linear_margin_cross_entropy(
            got_x, got_w, labels, labels >= 0, **common
        )
        want = sharded.sharded_margin_cross_entropy(
            sharded.shard_cosine(ref_x, ref_w), labels, labels >= 0, **common
        )
        got.backward()
        want.backward()
        context = f"{margin} seed {seed}"
        assert_close_floor(got, want, 1e-10, f"{context}: loss")
        assert_close_floor(got_x.grad, ref_x.grad, 1e-10, f"{context}: grad_x")
        assert_close_floor(got_w.grad, ref_w.grad, 1e-10, f"{context}: grad_weight")


def test_opcheck():
    x, weight, labels = make_inputs(6, 11, 1100, torch.float32, 5)
    labels = labels.clamp(min=-1)
    sharded.sharded_linear_margin_cross_entropy(
        x, weight, labels, labels >= 0, num_classes=1100, s=4.0
    )  # registers the fake kernels
    for dtype, weight_dtype, margin, eps, straight in (
        (torch.float32, torch.float32, (16.0, 1.0, 0.5, 0.0, 0.0), 0.0, False),
        (torch.float64, torch.float64, (30.0, 1.0, 0.3, 0.2, 0.0), 0.2, True),
        (torch.bfloat16, torch.float32, (64.0, 4.0, 0.0, 0.0, 5.0), 0.1, False),
    ):
        x, weight, labels = make_inputs(6, 11, 1100, dtype, 7, weight_dtype=weight_dtype)
        labels = labels.clamp(min=-1)
        partials = torch.ops.angular.sharded_linear_margin_partials(x, weight, labels, *margin)
        torch.library.opcheck(
            torch.ops.angular.sharded_linear_margin_partials, (x, weight, labels, *margin)
        )
        grad_rows = torch.rand(6, dtype=partials[0].dtype)
        lse = partials[0] + torch.log(partials[1])
        torch.library.opcheck(
            torch.ops.angular.sharded_linear_margin_backward,
            (
                grad_rows,
                x,
                weight,
                labels,
                lse,
                partials[4],
                partials[5],
                *margin,
                eps,
                2000,
                straight,
            ),
        )


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(num_classes=10), ValueError, r"num_classes must be >= C_local = 40"),
        (dict(labels=torch.tensor([0, 40, 1])), ValueError, r"labels must be < C = 40"),
        (dict(weight=torch.randn(40, 5)), ValueError, r"weight has D = 5 columns but x has D = 8"),
        (dict(has_target=torch.tensor([1, 1, 1])), ValueError, r"has_target must be bool"),
        (dict(s=float("nan")), ValueError, r"s must be"),
    ],
)
def test_bad_input_names_the_argument(change, error, match):
    arguments = dict(
        x=torch.randn(3, 8),
        weight=torch.randn(40, 8),
        labels=torch.tensor([0, -1, 5]),
        has_target=torch.tensor([True, True, True]),
        num_classes=80,
        s=16.0,
    )
    arguments.update(change)
    with pytest.raises(error, match=match):
        sharded.sharded_linear_margin_cross_entropy(**arguments)


# --------------------------------------------------------------------------------------------------
# CUDA (benchmarks/gpu_check.sh runs `pytest -m cuda`; skipped without a GPU)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_cuda_shards_combined_equal_the_whole_head(seed, dtype):
    """B = 2048: the CUDA chunks are 4096 (fp32) or 8192 (bf16/fp16) columns, so shards of
    C = 20000 over W = 3 are several chunks each, the last one partial."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if not sharded.has_linear_kernel("cuda"):
        message = "angular.ops._C has no CUDA sharded_linear_margin_partials kernel"
        if REQUIRE_EXTENSION:
            pytest.fail(message)
        pytest.skip(message)
    x, weight, labels = make_inputs(2048, 37, 20000, dtype, seed, device="cuda")
    for margin in MARGINS:
        check(x, weight, labels, 3, margin, seed, f"cuda {dtype}")
    x, weight, labels = make_inputs(
        9, 20, 1500, torch.bfloat16, seed, weight_dtype=torch.float32, device="cuda"
    )
    check(x, weight, labels, 2, MARGINS[1], seed, "cuda bf16 x, fp32 weight")
