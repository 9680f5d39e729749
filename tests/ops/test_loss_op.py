"""The reduced loss op behind ``ops.margin_cross_entropy`` (scalar margins): autograd registered in
C++ at the Autograd key, the reduction and the label check in the kernels (issue 26, parts 1-2).

- Gradients are bitwise equal to the previous implementation's, which stays reachable here: the
  per-row op ``torch.ops.angular.margin_cross_entropy`` (autograd by ``torch.library``, in Python)
  reduced by ``reference.reduce_rows`` (autograd of torch's sum and division), on fresh random
  inputs, every dtype, reduction, smoothing, strided ``cos``, B = 1 and rows without a target.
- The loss is the per-row loss reduced in row order (in double, rounded once); ``mean`` divides by
  the rows with a target.
- lse and the divisor are not differentiable, and the backward allocates nothing for them: a
  forward and backward runs exactly two ops below autograd (on CUDA: the forward kernel, the
  reduction kernel, the backward kernel).
- Bad arguments give the checked path's exact exception type and message.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_fused import make_inputs, require_fused
from test_ops_api import invalid_cases
from torch.utils._python_dispatch import TorchDispatchMode

from angular import ops
from angular.ops import reference

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MARGINS = dict(s=32.0, m1=1.0, m2=0.5, m3=0.1, lam=0.0)
CODES = ops.margin.REDUCTION_CODES


@pytest.fixture(autouse=True)
def _fused_cpu_kernels():
    require_fused("cpu")


@pytest.fixture
def seed() -> int:
    return torch.seed() % 2**31


def previous_implementation(
    cos, labels, *, label_smoothing, straight_through, reduction, s, m1, m2, m3, lam
):
    """What ``ops.margin_cross_entropy`` ran before the reduced op: the per-row op (Python
    autograd) reduced in Python."""
    per_row, _ = torch.ops.angular.margin_cross_entropy(
        cos, labels, s, m1, m2, m3, lam, label_smoothing, straight_through
    )
    return reference.reduce_rows(per_row, labels >= 0, reduction)


def layouts(batch, classes, dtype, seed):
    cos, labels = make_inputs(batch, classes, dtype, seed)
    yield "contiguous", cos, labels
    yield "transposed", cos.t().contiguous().t(), labels
    wide, _ = make_inputs(batch, 2 * classes, dtype, seed + 1)
    yield "sliced", wide[:, ::2], labels


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("batch,classes", [(1, 5), (13, 37), (7, 300)])
def test_gradients_bitwise_equal_previous_implementation(seed, dtype, batch, classes):
    for layout, cos, labels in layouts(batch, classes, dtype, seed):
        for reduction in ("mean", "sum", "none"):
            for smoothing, straight_through in ((0.0, False), (0.1, True)):
                args = dict(
                    label_smoothing=smoothing,
                    straight_through=straight_through,
                    reduction=reduction,
                    **MARGINS,
                )
                new = cos.detach().clone().requires_grad_()
                old = cos.detach().clone().requires_grad_()
                loss_new = ops.margin_cross_entropy(new, labels, **args)
                loss_old = previous_implementation(old, labels, **args)
                upstream = torch.rand(loss_new.shape, dtype=loss_new.dtype) + 0.5
                (grad_new,) = torch.autograd.grad(loss_new, new, upstream)
                (grad_old,) = torch.autograd.grad(loss_old, old, upstream)
                context = f"seed={seed} {layout} {dtype} B={batch} C={classes} {args}"
                assert grad_new.dtype == dtype and grad_new.shape == cos.shape, context
                assert torch.equal(grad_new, grad_old), context
                if reduction == "none":
                    assert torch.equal(loss_new, loss_old), context
                else:
                    torch.testing.assert_close(loss_new, loss_old, msg=lambda m, c=context: c + m)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reduction_is_the_row_order_sum(seed, dtype):
    cos, labels = make_inputs(29, 41, dtype, seed)
    labels[[3, 17]] = -1
    args = dict(label_smoothing=0.1, **MARGINS)
    per_row = ops.margin_cross_entropy(cos, labels, reduction="none", **args)
    total = 0.0
    for value in per_row.tolist():  # Python floats are doubles: the kernel's order and precision
        total += value
    want_sum = torch.tensor(total, dtype=per_row.dtype)
    got_sum = ops.margin_cross_entropy(cos, labels, reduction="sum", **args)
    assert torch.equal(got_sum, want_sum)
    got_mean = ops.margin_cross_entropy(cos, labels, reduction="mean", **args)
    targets = int((labels >= 0).sum())
    assert targets < 29
    assert torch.equal(got_mean, want_sum / torch.tensor(float(targets), dtype=per_row.dtype))
    # Deterministic: the same inputs give the same bits.
    assert torch.equal(ops.margin_cross_entropy(cos, labels, reduction="sum", **args), got_sum)
    # Against the fp64 reference.
    want = reference.margin_cross_entropy(cos.double(), labels, reduction="mean", **args)
    torch.testing.assert_close(got_mean.double(), want, rtol=1e-5, atol=1e-6)


def test_no_target_anywhere_has_mean_zero_and_zero_gradient():
    cos, _ = make_inputs(4, 6, torch.float32, 1)
    cos.requires_grad_()
    loss = ops.margin_cross_entropy(cos, torch.full((4,), -1), **MARGINS)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(cos.grad, torch.zeros_like(cos))


def test_lse_and_divisor_are_not_differentiable():
    cos, labels = make_inputs(6, 9, torch.float32, 2)
    cos.requires_grad_()
    loss, lse, divisor = torch.ops.angular.margin_cross_entropy_loss(
        cos, labels, 16.0, 1.0, 0.5, 0.0, 0.0, 0.0, False, CODES["mean"]
    )
    assert loss.requires_grad and type(loss.grad_fn).__name__ == "CppFunction"
    assert not lse.requires_grad and not divisor.requires_grad
    assert divisor.item() == float((labels >= 0).sum())
    with pytest.raises(RuntimeError, match="does not require grad"):
        torch.autograd.grad(lse.sum(), cos)


class RecordOps(TorchDispatchMode):
    """The ops that run below autograd (each a kernel, or a few, on a device)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_forward_and_backward_run_two_ops_and_nothing_for_lse(reduction):
    """No zeros for lse's gradient, no reduction ops, no checks as ops: the forward op and the
    backward op only. On CUDA these are at most 3 kernel launches without row splits (forward,
    reduction, backward; tests/ops/test_loss_op_cuda.py counts them with the profiler)."""
    cos, labels = make_inputs(8, 33, torch.float32, 3)
    cos.requires_grad_()
    with RecordOps() as recorded:
        loss = ops.margin_cross_entropy(cos, labels, reduction=reduction, **MARGINS)
        torch.autograd.grad(loss, cos, torch.ones_like(loss))
    recorded.names.remove("aten.ones_like.default")  # the upstream gradient made above
    assert recorded.names == [
        "angular.margin_cross_entropy_loss.default",
        "angular.margin_cross_entropy_loss_backward.default",
    ]


def test_inference_mode_and_no_grad_skip_autograd():
    cos, labels = make_inputs(5, 7, torch.float32, 4)
    want = ops.margin_cross_entropy(cos, labels, **MARGINS)
    with torch.inference_mode():
        assert torch.equal(ops.margin_cross_entropy(cos, labels, **MARGINS), want)
        with pytest.raises(ValueError, match=r"labels must be < C = 7, got a label 9"):
            ops.margin_cross_entropy(cos, torch.tensor([0, 1, 9, 2, 3]), **MARGINS)
    with torch.no_grad():
        assert not ops.margin_cross_entropy(cos.requires_grad_(), labels, **MARGINS).requires_grad


@pytest.mark.parametrize(
    "case_id,argument,call",
    [case for case in invalid_cases() if case[0].startswith("margin_cross_entropy")],
    ids=lambda value: value if isinstance(value, str) and "-" in value else "",
)
def test_bad_arguments_give_the_checked_paths_message(case_id, argument, call, monkeypatch):
    """Each invalid case raises on the fast path (checks in C++) exactly what the Python checks
    raise: the same exception type and message."""
    with pytest.raises((ValueError, TypeError)) as fast:
        call()
    # The same call through the checked path: margin values that are not plain numbers.
    original = ops.margin.margin_cross_entropy

    def checked(cos, labels, *, s, **kwargs):
        return original(cos, labels, s=np.float64(s) if type(s) is float else s, **kwargs)

    monkeypatch.setattr(ops, "margin_cross_entropy", checked)
    with pytest.raises((ValueError, TypeError)) as slow:
        call()
    assert (type(fast.value), str(fast.value)) == (type(slow.value), str(slow.value))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_logits_autograd_is_the_backward_op(seed, dtype):
    """margin_logits's autograd (also in C++, csrc/autograd.cpp) gives what the previous Python
    registration computed: the backward op applied to the upstream gradient, bit for bit."""
    for layout, cos, labels in layouts(9, 70, dtype, seed):
        for straight_through in (False, True):
            leaf = cos.detach().clone().requires_grad_()
            margin = dict(s=30.0, m1=1.0, m2=0.4, m3=0.1, lam=0.0)
            logits = ops.margin_logits(leaf, labels, straight_through=straight_through, **margin)
            assert type(logits.grad_fn).__name__ == "CppFunction"
            upstream = torch.randn_like(logits)
            (got,) = torch.autograd.grad(logits, leaf, upstream)
            want = torch.ops.angular.margin_logits_backward(
                upstream, cos, labels, *margin.values(), straight_through
            )
            assert torch.equal(got, want), f"seed={seed} {layout} {dtype} {straight_through}"
    with RecordOps() as recorded:
        torch.autograd.grad(ops.margin_logits(leaf, labels, **margin), leaf, upstream)
    # (margin_logits still checks its labels in Python: aten.max and its item come first.)
    assert [name for name in recorded.names if name.startswith("angular.")] == [
        "angular.margin_logits.default",
        "angular.margin_logits_backward.default",
    ]
