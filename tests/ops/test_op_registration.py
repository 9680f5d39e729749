"""The compiled ops as torch.library ops (docs/design.md, Ops): ``torch.library.opcheck`` (schema, fake
kernels, autograd registration, AOT dispatch), ``torch.compile(fullgraph=True)`` through a margin
head, and the memory contract of ``margin_cross_entropy`` (no B x C buffer besides the gradient).

CUDA variants of the opcheck and compile tests are in ``tests/ops/test_fused_cuda.py``.
"""

from __future__ import annotations

import pytest
import torch
from test_fused import make_inputs, require_fused
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from angular import ops
from angular.nn import heads
from angular.ops import reference


@pytest.fixture(autouse=True)
def _fused_cpu_kernels():
    require_fused("cpu")


def opcheck_samples(device: str):
    """(op, args) samples for every op: several dtypes, strides, margins and label patterns."""
    samples = []
    variants = [
        (torch.float32, False, (16.0, 1.0, 0.5, 0.0, 0.0), 0.0, False),
        (torch.bfloat16, True, (64.0, 4.0, 0.0, 0.0, 5.0), 0.1, False),
        (torch.float64, False, (30.0, 1.0, 0.3, 0.2, 0.0), 0.2, True),
        (torch.float16, True, (8.0, 1.0, 0.0, 0.35, 0.0), 0.0, False),
    ]
    for index, (dtype, transpose, margin, eps, straight_through) in enumerate(variants):
        cos, labels = make_inputs(6, 37, dtype, 100 + index, device=device)
        labels[1] = -1
        if transpose:
            cos = cos.t().contiguous().t()
        grad_cos = cos.detach().clone().requires_grad_()
        loss, lse = torch.ops.angular.margin_cross_entropy(
            cos, labels, *margin, eps, straight_through
        )
        grad_rows = torch.rand_like(loss)
        grad_logits = torch.randn_like(cos)
        reduction = index % 3  # none, mean, sum (ops.margin.REDUCTION_CODES)
        reduced, lse_reduced, divisor = torch.ops.angular.margin_cross_entropy_loss(
            cos, labels, *margin, eps, straight_through, reduction
        )
        grad_loss = torch.rand_like(reduced) + 0.5
        samples += [
            (torch.ops.angular.margin_logits, (grad_cos, labels, *margin, straight_through)),
            (
                torch.ops.angular.margin_cross_entropy,
                (grad_cos, labels, *margin, eps, straight_through),
            ),
            (
                torch.ops.angular.margin_logits_backward,
                (grad_logits, cos, labels, *margin, straight_through),
            ),
            (
                torch.ops.angular.margin_cross_entropy_backward,
                (grad_rows, cos, labels, lse, *margin, eps, straight_through),
            ),
            (
                torch.ops.angular.margin_cross_entropy_loss,
                (grad_cos, labels, *margin, eps, straight_through, reduction),
            ),
            (
                torch.ops.angular.margin_cross_entropy_loss_backward,
                (
                    grad_loss,
                    cos,
                    labels,
                    lse_reduced,
                    divisor,
                    *margin,
                    eps,
                    straight_through,
                    reduction,
                ),
            ),
        ]
    return samples


def run_opcheck(device: str) -> None:
    ops.margin_logits(*make_inputs(2, 3, torch.float32, 0, device=device), s=1.0)  # registers fakes
    samples = opcheck_samples(device)
    assert {op for op, _ in samples} == {
        torch.ops.angular.margin_logits,
        torch.ops.angular.margin_logits_backward,
        torch.ops.angular.margin_cross_entropy,
        torch.ops.angular.margin_cross_entropy_backward,
        torch.ops.angular.margin_cross_entropy_loss,
        torch.ops.angular.margin_cross_entropy_loss_backward,
    }
    for op, args in samples:
        torch.library.opcheck(op, args)


def test_opcheck_cpu():
    run_opcheck("cpu")


# --------------------------------------------------------------------------------------------------
# torch.compile


def compiled_matches_eager(head_factory, device: str, backend: str) -> None:
    torch.manual_seed(0)
    eager_head = head_factory().to(device)
    compiled_head = head_factory().to(device)
    compiled_head.load_state_dict(eager_head.state_dict())
    x = torch.randn(12, 16, device=device)
    labels = torch.randint(0, 50, (12,), device=device)
    labels[3] = -1
    loss_fn = torch.compile(compiled_head.loss, fullgraph=True, backend=backend)
    logits_fn = torch.compile(compiled_head.forward, fullgraph=True, backend=backend)
    results = []
    for head, loss_of, logits_of in (
        (eager_head, eager_head.loss, eager_head.forward),
        (compiled_head, loss_fn, logits_fn),
    ):
        x_leaf = x.clone().requires_grad_()
        loss = loss_of(x_leaf, labels)
        loss.backward()
        results.append(
            {
                "loss": loss,
                "x grad": x_leaf.grad,
                "W grad": head.weight.grad,
                "logits": logits_of(x, labels),
            }
        )
    eager, compiled = results
    for name in eager:
        torch.testing.assert_close(
            compiled[name],
            eager[name],
            rtol=1e-5,
            atol=1e-5,
            msg=lambda m, name=name: f"{name}: {m}",
        )


@pytest.mark.slow
def test_compile_fullgraph_inductor_matches_eager():
    """A margin head's loss (matmul, normalisation, fused op, backward) under inductor."""
    compiled_matches_eager(lambda: heads.ArcFace(16, 50, s=32.0), "cpu", "inductor")


@pytest.mark.parametrize("preset", ["cosface", "combined"])
def test_compile_fullgraph_matches_eager(preset):
    """Dynamo + AOT autograd trace the op through its fake and autograd registrations."""
    compiled_matches_eager(lambda: heads.PRESETS[preset](16, 50, s=32.0), "cpu", "aot_eager")


def test_compile_with_changing_margins():
    """A compiled function called with other margin values (traced as symbolic floats on the
    second call) still runs the op and matches the reference."""
    cos, labels = make_inputs(8, 40, torch.float32, 7)
    fn = torch.compile(
        lambda c, y, m: ops.margin_cross_entropy(c, y, s=16.0, m2=m),
        fullgraph=True,
        backend="aot_eager",
    )
    for margin in (0.5, 0.3, 0.2):
        want = reference.margin_cross_entropy(cos.double(), labels, s=16.0, m2=margin)
        torch.testing.assert_close(fn(cos, labels, margin).double(), want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Memory


def allocation_peak(fn) -> int:
    """Peak bytes allocated (above the level at the start) while fn runs, from the profiler's
    allocation events (each carries its signed size; the profiler's own bookkeeping is excluded)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation:
            events.append((event.start_time_ns, event.extra_fields.alloc_size))
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_allocates_one_matrix(dtype):
    """Forward + backward allocate the gradient and O(B) extras only; the reference, measured the
    same way, allocates several B x C buffers (so the measurement can tell)."""
    batch, classes = 64, 8192
    cos, labels = make_inputs(batch, classes, dtype, 3)
    matrix = batch * classes * cos.element_size()

    def step(loss_fn, source):
        # autograd.grad rather than .backward(): accumulating into a leaf's .grad may copy the
        # gradient to the leaf's strides, which is autograd's allocation, not the op's.
        leaf = source.detach().clone().requires_grad_()
        return lambda: torch.autograd.grad(
            loss_fn(leaf, labels, s=64.0, m2=0.5, label_smoothing=0.1), leaf
        )

    fused = allocation_peak(step(ops.margin_cross_entropy, cos))
    assert matrix <= fused <= matrix + 64 * batch * 8, (
        f"fused peak {fused} B, one matrix {matrix} B"
    )
    eager = allocation_peak(step(reference.margin_cross_entropy, cos))
    assert eager >= 2 * matrix, f"reference peak {eager} B: the measurement misses allocations"
    transposed = allocation_peak(step(ops.margin_cross_entropy, cos.t().contiguous().t()))
    assert transposed <= matrix + 64 * batch * 8, "a strided cos must not be copied"
