"""The tiled Triton fused linear op (angular/ops/triton_linear.py) against the fp64 composition.

Without a GPU the kernels run under Triton's interpreter on CPU tensors. The interpreter has to be
on (TRITON_INTERPRET=1) when triton is first imported, and ``import angular`` imports it (through
torch), so no test process of this suite can switch to it: ``test_under_the_interpreter`` runs this
file again in a child pytest with TRITON_INTERPRET=1, where the tests marked ``interpreted`` run
(in this process they are skipped, and the child's failures fail that one test). This process
compiles every kernel variant for sm_90 (Triton's compiler and ptxas need no GPU). With a GPU the
``@pytest.mark.cuda`` tests run the compiled kernels at B = 512, D = 512, C = 20000.

The yardstick is :func:`angular.ops.reference.linear_margin_cross_entropy` in fp64 on the same
(rounded) inputs, with fresh random inputs each run (the seed is in every failure message), as in
tests/ops/test_fused_linear.py, whose input maker and tolerance check this file borrows: fp32 1e-5
relative (gradient filter off), bf16/fp16 1e-2. The interpreter runs every program in Python, so
shapes stay small; the blocks are 16 rows x 32 classes x 32 dims there, so C = 150 is five class
tiles (the last partial), B = 20 two row blocks, D = 37 two D blocks, and the forward's three
class splits and the backward's three persistent programs are all exercised.
"""

from __future__ import annotations

import functools
import os
import random
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from test_fused import PRESETS
from test_fused_linear import assert_close_floor, make_inputs

from angular.ops import reference, triton_linear

pytest.importorskip("triton")

TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
ARCFACE = dict(s=64.0, m1=1.0, m2=0.5, label_smoothing=0.1)


@pytest.fixture
def seed() -> int:
    return random.SystemRandom().randrange(2**31)


@pytest.fixture
def interpreted():
    """The CPU tests need triton (and so the kernels) decorated for its interpreter."""
    if not triton_linear.INTERPRETED:
        pytest.skip("runs in test_under_the_interpreter's child process (TRITON_INTERPRET=1)")


def test_under_the_interpreter():
    """This file's CPU tests, run by a child pytest whose triton was imported for the interpreter."""
    if triton_linear.INTERPRETED:
        pytest.skip("this process is the interpreter's")
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, TRITON_INTERPRET="1")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not cuda",
               "-k", "not test_under_the_interpreter and not test_kernels_compile_for_hopper",
               str(Path(__file__).resolve())]  # fmt: skip
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-40:])
    assert done.returncode == 0, f"the interpreter run failed:\n{tail}"
    assert " passed" in tail and "skipped" not in tail.splitlines()[-1], tail


def check(x, weight, labels, *, context, rtol=None, atol=0.0, grad_filter=None,
          reductions=("none", "mean"), **margin):  # fmt: skip
    """Loss and both gradients of the Triton op against fp64 autograd of the composition, each
    reduction ("none" with random row weights, so that every row has its own upstream gradient)."""
    rtol = rtol or max(TOLERANCE[x.dtype], TOLERANCE[weight.dtype])
    context = f"{context} {margin} filter={grad_filter}"
    generator = torch.Generator().manual_seed(zlib.crc32(context.encode()))
    for reduction in reductions:
        got_x, got_w = (t.detach().clone().requires_grad_() for t in (x, weight))
        ref_x, ref_w = (t.detach().double().requires_grad_() for t in (x, weight))
        got = triton_linear.linear_margin_cross_entropy_triton(
            got_x, got_w, labels, reduction=reduction, grad_filter=grad_filter, **margin
        )
        want = reference.linear_margin_cross_entropy(
            ref_x, ref_w, labels, reduction=reduction, **margin
        )
        where = f"{context} {reduction}"
        close = functools.partial(assert_close_floor, atol=atol)
        assert got.dtype == torch.float32 and got.shape == want.shape, where
        close(got, want, rtol, f"{where}: loss")
        if reduction == "none":
            assert (got[labels < 0] == 0).all(), f"{where}: rows without target have loss 0"
            weights = torch.rand(x.shape[0], generator=generator, dtype=torch.float64)
            (got * weights.to(got)).sum().backward()
            (want * weights).sum().backward()
        else:
            got.backward()
            want.backward()
        for name, got_grad, want_grad, source in (
            ("grad_x", got_x.grad, ref_x.grad, x),
            ("grad_weight", got_w.grad, ref_w.grad, weight),
        ):
            assert got_grad.dtype == source.dtype and got_grad.shape == source.shape, where
            assert torch.isfinite(got_grad).all(), f"{where}: {name} not finite"
            close(got_grad, want_grad, rtol, f"{where}: {name}")
        assert (got_x.grad[labels < 0] == 0).all(), f"{where}: rows without target get grad 0"


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_fp32(interpreted, seed, preset):
    """Every preset, with label smoothing and with straight-through; D odd, C = 5 uneven tiles."""
    m1, m2, m3, lam = PRESETS[preset]
    x, weight, labels = make_inputs(20, 37, 150, torch.float32, seed)
    for straight_through, eps, reductions in (
        (False, 0.1, ("none", "mean")),
        (True, 0.0, ("none",)),
    ):
        check(
            x, weight, labels, s=64.0, m1=m1, m2=m2, m3=m3, lam=lam, label_smoothing=eps,
            straight_through=straight_through, reductions=reductions,
            context=f"seed={seed} {preset}",
        )  # fmt: skip


def test_every_reduction_fp32(interpreted, seed):
    x, weight, labels = make_inputs(9, 20, 70, torch.float32, seed)
    check(x, weight, labels, reductions=("none", "mean", "sum"), context=f"seed={seed}", **ARCFACE)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision(interpreted, seed, dtype):
    """bf16/fp16 with the default (the gradient filter on) and with it off."""
    x, weight, labels = make_inputs(20, 37, 150, dtype, seed)
    for grad_filter, reductions in ((None, ("none", "mean")), (False, ("none",))):
        check(
            x, weight, labels, grad_filter=grad_filter, reductions=reductions,
            context=f"seed={seed} {dtype}", **ARCFACE,
        )  # fmt: skip
    check(
        x, weight, labels, reductions=("none",), context=f"seed={seed} {dtype} cosface", s=64.0,
        m3=0.35,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("x_dtype", "weight_dtype"),
    [(torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.float32, torch.bfloat16)],
    ids=str,
)  # fmt: skip
def test_weight_in_another_dtype(interpreted, seed, x_dtype, weight_dtype):
    """fp32 centres with low-precision embeddings (a head under autocast), and the other way."""
    x, weight, labels = make_inputs(12, 20, 100, x_dtype, seed, weight_dtype=weight_dtype)
    check(x, weight, labels, context=f"seed={seed} x {x_dtype} w {weight_dtype}", **ARCFACE)


@pytest.mark.parametrize(
    ("batch", "dim", "classes"), [(1, 5, 1), (1, 9, 70), (17, 3, 33), (6, 1, 40)]
)
def test_edge_shapes(interpreted, seed, batch, dim, classes):
    """B = 1, C = 1 (loss 0), D below a block, D = 1 (every cosine +-1), one class past a tile."""
    x, weight, labels = make_inputs(batch, dim, classes, torch.float32, seed)
    # Exact zeros (C = 1: the loss; D = 1: both gradients) come out of cancellations of terms of
    # size s / |v|, as in test_fused_linear.test_edge_shapes.
    smallest = min(x.norm(dim=1).min(), weight.norm(dim=1).min()).item()
    check(
        x, weight, labels, atol=1e-5 * 30.0 / min(smallest, 1.0), s=30.0, m2=0.5,
        label_smoothing=0.1, context=f"seed={seed} B={batch} D={dim} C={classes}",
    )  # fmt: skip


def test_rows_without_target(interpreted, seed):
    """Every row without a target: loss 0 (mean over no rows is 0), gradients 0."""
    x, weight, _ = make_inputs(5, 8, 40, torch.float32, seed)
    labels = torch.tensor([-1, -5, -(10**12), -1, -2])
    x.requires_grad_()
    weight.requires_grad_()
    loss = triton_linear.linear_margin_cross_entropy_triton(x, weight, labels, **ARCFACE)
    loss.backward()
    assert loss.item() == 0.0, f"seed={seed}"
    assert (x.grad == 0).all() and (weight.grad == 0).all(), f"seed={seed}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_target_on_its_centre(interpreted, seed, dtype):
    """cos = 1 up to rounding at a target (the gradient guard zone): finite gradients, and the
    composition agreed with to about s * sqrt(eps) (test_fused_linear.test_target_on_its_centre)."""
    x, weight, labels = make_inputs(8, 16, 70, dtype, seed, on_centre=True)
    check(x, weight, labels, rtol=1e-2, context=f"seed={seed} on centre {dtype}", **ARCFACE)


def test_non_contiguous_inputs(interpreted, seed):
    x, weight, labels = make_inputs(10, 24, 70, torch.float32, seed)
    x_view, weight_view = x.t().contiguous().t(), torch.cat([weight, weight[:7]])[:70]
    check(x_view, weight_view, labels, context=f"seed={seed} strided", **ARCFACE)


def _far_tile_inputs(seed):
    """Embeddings near one direction, targets in the first two class tiles (32 classes each), and a
    third tile of centres nearly orthogonal to every embedding: its probabilities are about
    exp(-64 * 0.9) ~ 1e-25, so each |G| there is far below 2^-12 but not 0 in fp32. The third
    tile's centres share a second direction, so that label smoothing's share of their gradient,
    -s g eps / C per entry, adds up over them instead of cancelling."""
    generator = torch.Generator().manual_seed(seed)
    direction = torch.zeros(32)
    direction[0] = 1.0
    x = direction + 0.05 * torch.randn(16, 32, generator=generator)
    weight = torch.randn(96, 32, generator=generator)
    weight[:64, 0] = 6.0  # the first two tiles point roughly along x
    weight[64:, 0] = 0.0  # the third is orthogonal to the common direction
    weight[64:, 1] = 6.0
    labels = torch.randint(0, 64, (16,), generator=generator)
    return x, weight, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_filter_skips_tiles_of_tiny_gradients(interpreted, monkeypatch, seed, dtype):
    """With the filter, the far tile is skipped (the hook counts it) and its centres' gradient is
    exactly 0; without it, nothing is skipped and that gradient is tiny but not 0. Everything
    else agrees to the dtype's tolerance."""
    x, weight, labels = _far_tile_inputs(seed)
    x, weight = x.to(dtype), weight.to(dtype)
    counts = []
    monkeypatch.setattr(
        triton_linear, "skip_hook", lambda skipped: counts.append(int(skipped.sum()))
    )
    grads = {}
    for grad_filter in (True, False):
        got_x, got_w = (t.clone().requires_grad_() for t in (x, weight))
        loss = triton_linear.linear_margin_cross_entropy_triton(
            got_x, got_w, labels, s=64.0, m2=0.5, reduction="sum", grad_filter=grad_filter
        )
        loss.backward()
        grads[grad_filter] = (got_x.grad.double(), got_w.grad.double())
    filtered, exact = counts
    context = f"seed={seed} {dtype}: skipped {counts}"
    assert filtered >= 1 and exact == 0, context
    assert (grads[True][1][64:] == 0).all(), context
    assert (grads[False][1][64:] != 0).any(), context
    rtol = TOLERANCE[dtype]
    assert_close_floor(grads[True][0], grads[False][0], rtol, f"{context} grad_x")
    assert_close_floor(grads[True][1], grads[False][1], rtol, f"{context} grad_weight")


@pytest.mark.parametrize(
    ("x_dtype", "weight_dtype"),
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)],
    ids=str,
)  # fmt: skip
def test_filter_keeps_label_smoothing_exact(interpreted, monkeypatch, seed, x_dtype, weight_dtype):
    """Smoothing gives every entry -s g eps / C: each below 2^-12, but over the skipped tile they
    add up to about s g eps * 32 / 96 in grad_x (a few percent of it here). The filter leaves that
    part to an exact computation outside the tiles, so the skipped run still matches the fp64
    composition, to 1e-5 in fp32 (the entries it drops are about 1e-25), and every centre gets
    its (dense) smoothing gradient: each row of grad_weight is checked on its own scale too (the
    rows of non-target classes are mostly that smoothing part)."""
    x, weight, labels = _far_tile_inputs(seed)
    x, weight = x.to(x_dtype), weight.to(weight_dtype)
    counts = []
    monkeypatch.setattr(
        triton_linear, "skip_hook", lambda skipped: counts.append(int(skipped.sum()))
    )
    margin = dict(s=64.0, m2=0.5, label_smoothing=0.1)
    context = f"seed={seed} x {x_dtype} w {weight_dtype} filter with smoothing"
    check(
        x, weight, labels, grad_filter=True, reductions=("none", "mean", "sum"), context=context,
        **margin,
    )  # fmt: skip
    assert counts and min(counts) >= 1, f"{context}: skipped {counts}"
    got_w = weight.clone().requires_grad_()
    triton_linear.linear_margin_cross_entropy_triton(
        x, got_w, labels, grad_filter=True, reduction="sum", **margin
    ).backward()
    ref_w = weight.double().requires_grad_()
    reference.linear_margin_cross_entropy(
        x.double(), ref_w, labels, reduction="sum", **margin
    ).backward()
    error = (got_w.grad.double() - ref_w.grad).abs().amax(1)
    scale = ref_w.grad.abs().amax(1)
    # bf16: a row that is a difference of a softmax part and the smoothing part carries their
    # roundings (2^-9 of each) on its smaller scale; dropping the smoothing part is off by 100%.
    rtol = 1e-4 if weight_dtype == torch.float32 else 5e-2
    worst = int((error / scale).argmax())
    assert (error <= rtol * scale).all(), (
        f"{context}: grad_weight row {worst} off by {error[worst]:.3g} on a scale of "
        f"{scale[worst]:.3g}"
    )


def test_filter_default_follows_dtype(interpreted, monkeypatch, seed):
    """On by default for bf16/fp16 x, off for fp32 (which is held to 1e-5)."""
    x, weight, labels = _far_tile_inputs(seed)
    counts = []
    monkeypatch.setattr(
        triton_linear, "skip_hook", lambda skipped: counts.append(int(skipped.sum()))
    )
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        got_x = x.to(dtype).requires_grad_()
        triton_linear.linear_margin_cross_entropy_triton(
            got_x, weight.to(dtype), labels, s=64.0, m2=0.5
        ).backward()
    assert counts[0] == 0 and counts[1] >= 1 and counts[2] >= 1, f"seed={seed} {counts}"


def test_bad_input_gets_one_clear_error(monkeypatch):
    x, weight, labels = make_inputs(4, 8, 40, torch.float32, 0)
    call = triton_linear.linear_margin_cross_entropy_triton
    with pytest.raises(TypeError, match="float64"):
        call(x.double(), weight.double(), labels, s=8.0)
    with pytest.raises(TypeError, match="weight.*float64"):
        call(x, weight.double(), labels, s=8.0)
    with pytest.raises(ValueError, match="labels must be < C = 40"):
        call(x, weight, torch.tensor([0, 1, 2, 40]), s=8.0)
    with pytest.raises(ValueError, match="reduction"):
        call(x, weight, labels, s=8.0, reduction="avg")
    with pytest.raises(TypeError, match="grad_filter"):
        call(x, weight, labels, s=8.0, grad_filter="yes")
    with pytest.raises(ValueError, match="weight has D = 7"):
        call(x, weight[:, :7], labels, s=8.0)
    monkeypatch.setattr(triton_linear, "INTERPRETED", False)  # CPU tensors, no interpreter
    with pytest.raises(RuntimeError, match="runs on CUDA tensors, got cpu.*TRITON_INTERPRET=1"):
        call(x, weight, labels, s=8.0)


@pytest.mark.parametrize(
    ("x_dtype", "weight_dtype"),
    [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32), (torch.bfloat16, torch.float32)],
    ids=str,
)  # fmt: skip
def test_kernels_compile_for_hopper(monkeypatch, tmp_path, x_dtype, weight_dtype):
    """Every kernel variant the op launches on CUDA goes through Triton's compiler to an sm_90
    cubin, no GPU needed: what the interpreter cannot show (it runs the code as Python)."""
    if triton_linear.INTERPRETED:
        pytest.skip("compiled in the parent process, whose triton is not the interpreter's")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # compile, do not reuse a cache
    kernels = triton_linear.compile_kernels(x_dtype, weight_dtype, arch=90)
    assert set(kernels) == {"forward", "backward", "backward, smoothing", "smoothing", "row norms"}
    for name, kernel in kernels.items():
        assert kernel.asm.get("cubin"), f"{name} ({x_dtype}, {weight_dtype}): no cubin"


# --------------------------------------------------------------------------------------------------
# CUDA (benchmarks/gpu_check.sh runs `pytest -m cuda`; skipped without a GPU)


def require_compiled_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if triton_linear.INTERPRETED:
        pytest.skip("TRITON_INTERPRET=1: the kernels were decorated for the interpreter")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_cuda_matches_reference(seed, dtype):
    """The compiled kernels at B = 512, D = 512, C = 20000 (several programs' worth of tiles, the
    last one partial), each preset's kind of margin, the filter at its default."""
    require_compiled_cuda()
    x, weight, labels = make_inputs(512, 512, 20000, dtype, seed, device="cuda")
    for preset in ("arcface", "sphereface-lam5", "combined"):
        m1, m2, m3, lam = PRESETS[preset]
        check(
            x, weight, labels, s=64.0, m1=m1, m2=m2, m3=m3, lam=lam, label_smoothing=0.1,
            context=f"seed={seed} cuda {preset} {dtype}",
        )  # fmt: skip


@pytest.mark.cuda
def test_cuda_mixed_dtype_and_filter(seed):
    require_compiled_cuda()
    x, weight, labels = make_inputs(512, 512, 20000, torch.bfloat16, seed, device="cuda")
    check(x, weight.float(), labels, context=f"seed={seed} cuda bf16 x fp32 w", **ARCFACE)
    check(x, weight, labels, grad_filter=False, context=f"seed={seed} cuda bf16", **ARCFACE)
