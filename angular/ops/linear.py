"""Fused linear + margin + cross-entropy: the loss of a margin head without its (B, C) cosines.

``linear_margin_cross_entropy(x, weight, labels, ...)`` is the same function as
``margin_cross_entropy(normalize(x) @ normalize(weight).T, labels, ...)`` (the unfused composition,
:func:`angular.ops.reference.linear_margin_cross_entropy`), but the kernels go over the classes in
chunks: each chunk's cosine tile is computed from the normalised embeddings and the chunk's weight
rows, the margin is applied on the target column, and an online log-sum-exp per row is kept. The
forward saves one log-sum-exp and one norm per row, and one norm per class. The backward recomputes
each tile and accumulates ``grad_x`` and ``grad_weight`` chunk by chunk (the chain rule through both
normalisations, docs/design.md, "Normalisation inside a fused linear op"), writing the weight's
gradient rows in place. No (B, C) buffer exists at any point, so the classes a device can hold are
bounded by the centres and their gradient, not by B x C.

The compiled ops (schemas in ``csrc/ops.cpp``; CPU kernel ``csrc/cpu/linear_margin_cpu.cpp``, CUDA
``csrc/cuda/linear_margin_cuda.cpp``)::

    linear_margin_cross_entropy(x, weight, labels, s, m1, m2, m3, lam, label_smoothing,
                                straight_through) -> (loss per row, lse per row, |x| per row,
                                                      |weight| per class)
    linear_margin_cross_entropy_backward(grad_rows, x, weight, labels, lse, x_norm, weight_norm,
                                         s, m1, m2, m3, lam, label_smoothing, straight_through)
        -> (grad_x, grad_weight)

Precision: arithmetic in fp32 (fp64 for fp64 ``x``); ``weight`` may have another dtype than ``x``
(a head's fp32 centres under bf16 autocast): it is converted chunk by chunk, never as a whole. The
loss is fp32 (fp64); ``grad_x`` comes back in ``x``'s dtype, ``grad_weight`` in ``weight``'s.
Normalisation is ``F.normalize``'s: ``v / max(|v|, 1e-12)``.
"""

from __future__ import annotations

import torch

from angular.ops import _extension, reference
from angular.ops.margin import (
    FLOAT_DTYPES,
    check_loss_options,
    check_margin,
    margin_cross_entropy,
)

__all__ = ["linear_margin_cross_entropy"]

OP = "angular::linear_margin_cross_entropy"


def check_tensors(x, weight, labels) -> None:
    """The shapes, dtypes and devices of the fused linear op's tensors, and labels < C."""
    for name, value in (("x", x), ("weight", weight), ("labels", labels)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x must have shape (B, D), got {x.dim()} dimensions {tuple(x.shape)}")
    if weight.dim() != 2:
        raise ValueError(
            f"weight must have shape (C, D), got {weight.dim()} dimensions {tuple(weight.shape)}"
        )
    for name, value in (("x", x), ("weight", weight)):
        if value.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"{name} must be float16, bfloat16, float32 or float64, got {value.dtype}"
            )
    if labels.dim() != 1:
        raise ValueError(f"labels must have shape (B,), got {tuple(labels.shape)}")
    if labels.dtype != torch.int64:
        raise TypeError(f"labels must be int64, got {labels.dtype}")
    batch, dim = x.shape
    classes = weight.shape[0]
    if batch == 0 or dim == 0:
        raise ValueError(f"x must have B >= 1 and D >= 1, got shape {tuple(x.shape)}")
    if classes == 0:
        raise ValueError(f"weight must have C >= 1 rows, got shape {tuple(weight.shape)}")
    if weight.shape[1] != dim:
        raise ValueError(
            f"weight has D = {weight.shape[1]} columns but x has D = {dim} "
            f"(x {tuple(x.shape)}, weight {tuple(weight.shape)})"
        )
    if labels.shape[0] != batch:
        raise ValueError(f"labels has {labels.shape[0]} entries but x has B = {batch} rows")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    if labels.device != x.device:
        raise ValueError(f"labels is on {labels.device} but x is on {x.device}")
    if not torch.compiler.is_compiling():  # data-dependent: would break the graph
        largest = int(labels.max())
        if largest >= classes:
            raise ValueError(f"labels must be < C = {classes}, got a label {largest}")


def has_kernel(device_type: str) -> bool:
    """Whether the extension has the fused linear + margin kernel for ``device_type`` tensors."""
    loaded, _ = _extension.load()
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if not loaded or key is None or not hasattr(torch.ops.angular, "linear_margin_cross_entropy"):
        return False  # an extension built before this op existed has no schema for it
    return torch._C._dispatch_has_kernel_for_dispatch_key(OP, key)


@torch.compiler.assume_constant_result
def _fused_for(device_type: str) -> bool:
    if has_kernel(device_type):
        _register_python_parts()
        return True
    loaded, reason = _extension.load()
    if loaded:
        reason = (
            f"the extension has no linear_margin_cross_entropy kernel for {device_type} tensors"
        )
    _extension.warn_fallback_once(reason)
    return False


def linear_margin_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    s: float,
    m1: float = 1.0,
    m2: float = 0.0,
    m3: float = 0.0,
    lam: float = 0.0,
    label_smoothing: float = 0.0,
    straight_through: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    """``margin_cross_entropy(normalize(x) @ normalize(weight).T, labels, ...)`` without the (B, C)
    cosines: x is (B, D), weight (C, D), labels int64 (B,) (negative: no target, loss 0, gradient 0,
    not counted by ``"mean"``). Margin arguments as :func:`angular.ops.margin_cross_entropy`.

    When the extension has no kernel for the device, the unfused composition runs instead
    (normalise, matmul, :func:`angular.ops.margin_cross_entropy`) and a warning says so once.
    """
    s, m1, m2, m3, lam = check_margin(s, m1, m2, m3, lam)
    label_smoothing = check_loss_options(label_smoothing, reduction)
    check_tensors(x, weight, labels)
    margin = dict(s=s, m1=m1, m2=m2, m3=m3, lam=lam, straight_through=bool(straight_through))
    if not _fused_for(x.device.type):
        cos = torch.nn.functional.linear(
            torch.nn.functional.normalize(x, dim=1),
            torch.nn.functional.normalize(weight.to(x.dtype), dim=1),
        )
        return margin_cross_entropy(
            cos, labels, label_smoothing=label_smoothing, reduction=reduction, **margin
        )
    per_row, *_ = torch.ops.angular.linear_margin_cross_entropy(
        x, weight, labels, s, m1, m2, m3, lam, label_smoothing, bool(straight_through)
    )
    return reference.reduce_rows(per_row, labels >= 0, reduction)


# --------------------------------------------------------------------------------------------------
# Python halves of the compiled ops: fake (meta) implementations and autograd.

_registered = False


def _register_python_parts() -> None:
    global _registered
    if _registered:
        return
    _registered = True

    @torch.library.register_fake(OP)
    def _(x, weight, labels, s, m1, m2, m3, lam, label_smoothing, straight_through):
        dtype = reference.compute_dtype(x.dtype)
        rows = x.new_empty(x.shape[0], dtype=dtype)
        return (
            rows,
            torch.empty_like(rows),
            torch.empty_like(rows),
            x.new_empty(weight.shape[0], dtype=dtype),
        )

    @torch.library.register_fake(OP + "_backward")
    def _(grad_rows, x, weight, labels, lse, x_norm, w_norm, *params):
        return (
            torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(weight, memory_format=torch.contiguous_format),
        )

    def setup(ctx, inputs, output):
        x, weight, labels, *params = inputs
        _, lse, x_norm, w_norm = output
        ctx.mark_non_differentiable(lse, x_norm, w_norm)  # saved for the backward, not a loss
        ctx.save_for_backward(x, weight, labels, lse, x_norm, w_norm)
        ctx.params = params

    def backward(ctx, grad_rows, *_unused):
        x, weight, labels, lse, x_norm, w_norm = ctx.saved_tensors
        grad_x, grad_weight = torch.ops.angular.linear_margin_cross_entropy_backward(
            grad_rows, x, weight, labels, lse, x_norm, w_norm, *ctx.params
        )
        return grad_x, grad_weight, None, None, None, None, None, None, None, None

    torch.library.register_autograd(OP, backward, setup_context=setup)
