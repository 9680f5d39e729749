"""The reduced loss op on CUDA (issue 26, part 2): at most 3 kernel launches for a forward and
backward without row splits (forward, reduction, backward; one more, the combine, when rows are
split), counted by the profiler; gradients bitwise equal to the previous implementation (per-row op
reduced by torch); a deterministic reduction.

Marked ``cuda`` and skipped without a GPU; ``benchmarks/gpu_check.sh`` runs them (``pytest -m cuda``).
"""

from __future__ import annotations

import pytest
import torch
from test_fused import make_inputs, require_fused
from test_loss_op import MARGINS, previous_implementation
from torch.profiler import ProfilerActivity, profile

from angular import ops

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]
DEVICE = "cuda"


@pytest.fixture(autouse=True)
def _fused_cuda_kernels():
    require_fused(DEVICE)


def kernel_launches(step) -> list[str]:
    """Names of the CUDA kernels ``step()`` launches (memcpy and memset included, as launches)."""
    step()  # warm-up: lazy initialisation stays out of the count
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return [event.name for event in prof.events() if event.device_type.name == "CUDA"]


@pytest.mark.parametrize(
    "batch,classes,most",
    [(4096, 2000, 3), (512, 100_000, 3), (16, 1_000_000, 4)],  # the last one splits its rows
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_backward_launch_at_most_3_kernels(batch, classes, most, dtype):
    cos, labels = make_inputs(batch, classes, dtype, 0, device=DEVICE)
    leaf = cos.requires_grad_()
    upstream = torch.ones((), device=DEVICE)

    def step():
        loss = ops.margin_cross_entropy(leaf, labels, label_smoothing=0.1, **MARGINS)
        torch.autograd.grad(loss, leaf, upstream)

    launched = kernel_launches(step)
    assert len(launched) <= most, launched


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradients_bitwise_equal_previous_implementation(dtype, reduction):
    cos, labels = make_inputs(300, 4099, dtype, 1, device=DEVICE)
    args = dict(label_smoothing=0.1, straight_through=False, reduction=reduction, **MARGINS)
    new = cos.clone().requires_grad_()
    old = cos.clone().requires_grad_()
    loss_new = ops.margin_cross_entropy(new, labels, **args)
    loss_old = previous_implementation(old, labels, **args)
    upstream = torch.rand(loss_new.shape, dtype=loss_new.dtype, device=DEVICE) + 0.5
    (grad_new,) = torch.autograd.grad(loss_new, new, upstream)
    (grad_old,) = torch.autograd.grad(loss_old, old, upstream)
    assert torch.equal(grad_new, grad_old)
    torch.testing.assert_close(loss_new, loss_old)


def test_reduction_is_deterministic_and_matches_cpu():
    cos, labels = make_inputs(3000, 257, torch.float32, 2, device=DEVICE)
    first = ops.margin_cross_entropy(cos, labels, reduction="sum", **MARGINS)
    for _ in range(5):
        assert torch.equal(ops.margin_cross_entropy(cos, labels, reduction="sum", **MARGINS), first)
    on_cpu = ops.margin_cross_entropy(cos.cpu(), labels.cpu(), reduction="sum", **MARGINS)
    torch.testing.assert_close(first.cpu(), on_cpu, rtol=1e-6, atol=1e-4)
    mean = ops.margin_cross_entropy(cos, labels, reduction="mean", **MARGINS)
    assert torch.equal(mean, first / (labels >= 0).sum().float())
