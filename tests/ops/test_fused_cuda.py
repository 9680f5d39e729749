"""The fused CUDA kernels against the fp64 reference (docs/design.md, Testing), plus what only a
GPU shows: row splitting for few huge rows, the grid-row loop for many rows, 16-byte packs versus
misaligned rows, agreement with the CPU kernels, a side stream, opcheck, torch.compile and peak
memory.

Marked ``cuda`` and skipped without a GPU; ``benchmarks/gpu_check.sh`` runs them (``pytest -m
cuda``) on a GPU machine. With a GPU but without CUDA kernels in ``angular.ops._C`` they skip, or
fail under ``ANGULAR_REQUIRE_EXTENSION=1``.
"""

from __future__ import annotations

import copy
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_fused import (
    DTYPES,
    PRESETS,
    TOLERANCE,
    assert_close,
    assert_gradients,
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
ROOT = Path(__file__).resolve().parents[2]


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
        (16, 360_232, torch.float16),  # Glint360K's class count: C % 8 != 0, many splits
        (512, 85_742, torch.bfloat16),  # MS1MV2's class count at the benchmark's batch
        (3000, 93_431, torch.float32),  # MS1MV3's: more rows than resident blocks, one split
        (20_000, 300, torch.bfloat16),  # large B, small C: a warp per row
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


# (B, C) around the kernels' paths: a warp per row (rows of at most 4 KiB), a block per row with
# one split, a block per row with many splits; none of the C is a multiple of any pack size.
ODD_SHAPES = [(64, 37), (33, 1001), (40, 5003), (3, 85_742)]
# Where the rows start: the storage offset (in elements) puts the first row off any 16-byte
# boundary, "rows+2" also gives every row a different misalignment from the contiguous output's.
LAYOUTS = ["aligned", "offset+1", "offset+3", "rows+2"]


def laid_out(cos: torch.Tensor, layout: str) -> torch.Tensor:
    """A leaf with cos's values in the given layout (NaN around it: a stray read shows)."""
    batch, classes = cos.shape
    if layout == "aligned":
        view = cos.detach().clone()
    elif layout.startswith("offset+"):
        offset = int(layout.removeprefix("offset+"))
        flat = torch.full((batch * classes + offset,), float("nan"), dtype=cos.dtype, device=DEVICE)
        view = flat[offset:].view(batch, classes)
        view.copy_(cos)
        assert view.storage_offset() == offset and view.is_contiguous()
    else:
        padded = torch.full((batch, classes + 5), float("nan"), dtype=cos.dtype, device=DEVICE)
        view = padded[:, 2 : 2 + classes]
        view.copy_(cos)
        assert view.stride() == (classes + 5, 1)
    return view.requires_grad_()  # a view of a tensor without grad is a leaf: keeps its layout


def check_layout_against_reference(cos, labels, layout, context):
    """Both ops, values and gradients, on cos in the given layout (check_against_reference clones
    its input, which would drop a storage offset or row padding), against the fp64 reference."""
    value_tol, grad_tol = TOLERANCE[cos.dtype]
    margin = dict(s=64.0, m1=1.0, m2=0.5, m3=0.1, lam=0.0)
    upstream = torch.randn(cos.shape, dtype=torch.float64, device=DEVICE)
    weights = torch.rand(cos.shape[0], dtype=torch.float64, device=DEVICE)
    for op, extra in (("margin_logits", {}), ("margin_cross_entropy", dict(label_smoothing=0.1))):
        got_cos = laid_out(cos, layout)
        ref_cos = cos.detach().double().requires_grad_()
        if op == "margin_logits":
            got = ops.margin_logits(got_cos, labels, **margin)
            want = reference.margin_logits(ref_cos, labels, **margin)
            got.backward(upstream.to(cos.dtype))
            want.backward(upstream)
        else:
            got = ops.margin_cross_entropy(got_cos, labels, reduction="none", **margin, **extra)
            want = reference.margin_cross_entropy(
                ref_cos, labels, reduction="none", **margin, **extra
            )
            (got * weights.to(got.dtype)).sum().backward()
            (want * weights).sum().backward()
        assert_close(got, want, value_tol, f"{context}: {op}")
        assert_gradients(got_cos.grad, ref_cos.grad, cos, labels, grad_tol, f"{context}: {op} grad")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("batch", "classes"), ODD_SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_odd_classes_and_storage_offsets(seed, dtype, batch, classes, layout):
    cos, labels = make_inputs(batch, classes, dtype, seed, device=DEVICE)
    if batch > 10:  # targets in a row's scalar head and tail too
        labels[-2], labels[-3] = 0, classes - 1
    context = f"cuda seed={seed} B={batch} C={classes} {dtype} {layout}"
    check_layout_against_reference(cos, labels, layout, context)


def test_no_host_synchronisation():
    """Forward and backward of both ops never wait for the GPU (the label check included): under
    sync debug mode "error", any synchronising call raises."""
    cos, labels = make_inputs(64, 3001, torch.float32, 1, device=DEVICE)
    leaf = cos.detach().clone().requires_grad_()
    grad_out = torch.randn_like(cos)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = ops.margin_cross_entropy(leaf, labels, s=64.0, m2=0.5, label_smoothing=0.1)
        loss.backward()
        logits = ops.margin_logits(leaf, labels, s=64.0, m2=0.5)
        logits.backward(grad_out)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss) and torch.isfinite(leaf.grad).all()


def test_training_step_captures_in_a_cuda_graph(seed):
    """A whole training step (embedding, cosine, fused loss, backward, SGD) captured with
    torch.cuda.graph and replayed on new data matches the same step run eagerly."""
    torch.manual_seed(seed)
    batch, features, dim, classes = 48, 32, 16, 4099
    model = torch.nn.ModuleDict(
        dict(embed=torch.nn.Linear(features, dim), centres=torch.nn.Embedding(classes, dim))
    ).to(DEVICE)
    eager = copy.deepcopy(model)

    def step(net, optimizer, x, labels):
        optimizer.zero_grad(set_to_none=False)
        cos = F.linear(
            F.normalize(net["embed"](x), dim=1), F.normalize(net["centres"].weight, dim=1)
        )
        loss = ops.margin_cross_entropy(cos, labels, s=64.0, m2=0.5, label_smoothing=0.1)
        loss.backward()
        optimizer.step()
        return loss

    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    eager_optimizer = torch.optim.SGD(eager.parameters(), lr=0.5)
    static_x = torch.randn(batch, features, device=DEVICE)
    static_labels = torch.randint(0, classes, (batch,), device=DEVICE)
    static_labels[5] = -1  # a row without a target
    # Warm-up on a side stream (the recipe of torch.cuda.graph's documentation), on both copies.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step(model, optimizer, static_x, static_labels)
            step(eager, eager_optimizer, static_x, static_labels)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step(model, optimizer, static_x, static_labels)
    # Capture records without running: both copies still hold the same parameters.
    for _ in range(3):
        x = torch.randn(batch, features, device=DEVICE)
        labels = torch.randint(0, classes, (batch,), device=DEVICE)
        static_x.copy_(x)
        static_labels.copy_(labels)
        graph.replay()
        want = step(eager, eager_optimizer, x, labels)
        assert_close(static_loss, want, 1e-5, f"seed={seed} captured loss")
        for (name, got), wanted in zip(model.named_parameters(), eager.parameters()):
            assert_close(got, wanted, 1e-5, f"seed={seed} parameter {name} after the step")


def test_label_out_of_range_is_a_device_side_assert():
    """On CUDA, labels >= C is checked on the device (the reduction kernel of
    margin_cross_entropy_loss asserts and prints the message, no host sync). The
    assert fires when the device reaches it: at the next synchronisation, or already at the op's
    next launch when the device is fast (the first H200 run saw the latter), so the test asks only
    that it fires, names the label bound, and is never silent. Run in a process of its own: a
    device-side assert leaves the CUDA context unusable."""
    code = textwrap.dedent(
        """
        import torch
        from angular import ops
        cos = torch.rand(4, 5, device="cuda")
        labels = torch.tensor([0, 5, 1, 2], device="cuda")
        ops.margin_cross_entropy(cos, labels, s=64.0)
        torch.cuda.synchronize()
        print("no assert", flush=True)
        """
    )
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert "no assert" not in result.stdout
    assert result.returncode != 0
    assert "device-side assert" in result.stderr, result.stderr[-3000:]
    # The kernel's printf goes to stdout, torch._assert_async's message (the other ops) to stderr.
    output = result.stdout + result.stderr
    assert "labels must be < C = 5" in output, output[-3000:]
