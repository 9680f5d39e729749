"""Public margin ops (docs/design.md, Ops): one entry point, validated, served by the fused kernels
or the reference.

``margin_logits`` and ``margin_cross_entropy`` check their arguments, then run the compiled
``torch.ops.angular.*`` kernels when the extension has one for the tensors' device, and the
pure-PyTorch reference (:mod:`angular.ops.reference`) otherwise, saying so once in a warning.

The compiled ops (schemas in ``csrc/ops.cpp``)::

    margin_logits(cos, labels, s, m1, m2, m3, lam, straight_through) -> logits
    margin_logits_backward(grad, cos, labels, s, m1, m2, m3, lam, straight_through) -> grad_cos
    margin_cross_entropy(cos, labels, s, m1, m2, m3, lam, label_smoothing, straight_through)
        -> (loss per row, log-sum-exp per row)
    margin_cross_entropy_backward(grad_loss_rows, cos, labels, lse, s, m1, m2, m3, lam,
                                  label_smoothing, straight_through) -> grad_cos

Per-row margins and negative modulation (docs/design.md, Per-row margins and negative modulation)
go to their ``*_rows`` variants, which take the four margins as one (4, B) tensor in the arithmetic
dtype (floats repeated) and ``negative_t`` (None: off); their backwards also return d loss / d margins::

    margin_logits_rows(cos, labels, margins, s, straight_through, negative_t) -> logits
    margin_logits_rows_backward(grad, cos, labels, margins, s, straight_through, negative_t)
        -> (grad_cos, grad_margins)
    margin_cross_entropy_rows(cos, labels, margins, s, label_smoothing, straight_through, negative_t)
        -> (loss per row, log-sum-exp per row)
    margin_cross_entropy_rows_backward(grad_loss_rows, cos, labels, lse, margins, s, label_smoothing,
                                       straight_through, negative_t) -> (grad_cos, grad_margins)

With scalar margins (what a training step with a fixed margin calls), ``margin_cross_entropy`` is one
call of the reduced loss op, whose kernels check every argument (the same messages as the Python
checks below), reduce the per-row losses in a fixed order, and whose autograd is registered in C++
(``csrc/autograd.cpp``)::

    margin_cross_entropy_loss(cos, labels, s, m1, m2, m3, lam, label_smoothing, straight_through,
                              reduction) -> (loss, lse, divisor)
    margin_cross_entropy_loss_backward(grad_loss, cos, labels, lse, divisor, s, m1, m2, m3, lam,
                                       label_smoothing, straight_through, reduction) -> grad_cos

``reduction`` is a code of ``REDUCTION_CODES``; ``divisor`` is what the backward divides the
upstream gradient by (the rows with a target for ``mean``, else 1). Per-row losses are 0 for rows
with a negative label. The ``*_rows`` path reduces its per-row losses here, in Python.

Non-finite values inside ``cos`` are not checked for (that would cost a pass over B x C); they act
row by row, as in ``F.cross_entropy``: NaN or +inf anywhere in a row with a target, or a non-finite
target value, makes that row's loss non-finite (and so a ``mean``/``sum``); -inf at a non-target
column gives that class probability 0 (a finite loss without smoothing, +inf with it); rows without
a target have loss 0 and gradient 0 whatever they hold; other rows are unaffected.
"""

from __future__ import annotations

import math
import numbers

import torch

from angular.ops import _extension, reference

__all__ = ["backend", "margin_logits", "margin_cross_entropy"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("mean", "sum", "none")
# The reduction argument of the margin_cross_entropy_loss op (enum Reduction in csrc/op_common.h).
REDUCTION_CODES = {"none": 0, "mean": 1, "sum": 2}
# Margin and scalar arguments the fast path hands to the op unchecked (its kernels check their
# values); anything else (bool, numpy numbers, symbolic floats) takes the checked path.
_PLAIN_NUMBERS = (float, int)


def backend() -> str:
    """What serves tensors on this machine: ``"cuda"``, ``"cpp"`` or ``"python"``."""
    if torch.cuda.is_available() and _extension.has_kernel("cuda"):
        return "cuda"
    if _extension.has_kernel("cpu"):
        return "cpp"
    return "python"


# --------------------------------------------------------------------------------------------------
# Validation: every message names the argument and what was wrong.


def check_number(name: str, value, *, low: float | None = None, strict: bool = False) -> float:
    """``value`` as a finite float (>= ``low``, or > ``low`` when ``strict``); else an error naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if torch.compiler.is_compiling():
        # torch.compile may trace a float that changes between calls as a symbolic value, which
        # cannot be compared here without a graph break; eager calls check every value.
        return value
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value <= low if strict else value < low):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {low}, got {value}")
    return value


def check_margin(s, m1, m2, m3, lam) -> tuple[float, float, float, float, float]:
    """Validate margin parameters (also used by :class:`angular.nn.heads.MarginSpec`)."""
    return (
        check_number("s", s, low=0.0, strict=True),
        check_number("m1", m1, low=0.0, strict=True),
        check_number("m2", m2, low=0.0),
        check_number("m3", m3),
        check_number("lam", lam, low=0.0),
    )


def check_loss_options(label_smoothing, reduction: str) -> float:
    """Validate the loss options every margin loss takes; returns ``label_smoothing`` as a float."""
    label_smoothing = check_number("label_smoothing", label_smoothing, low=0.0)
    if label_smoothing > 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return label_smoothing


ROW_DTYPES = (torch.float32, torch.float64)


def _check_row_values(
    name: str, value, cos: torch.Tensor, *, low: float | None = None, strict: bool = False
):
    """A margin parameter: a float (as :func:`check_number`) or a (B,) float32/float64 tensor of
    per-row values on ``cos``'s device, finite and within the same bounds; else an error naming it."""
    if not isinstance(value, torch.Tensor):
        return check_number(name, value, low=low, strict=strict)
    batch = cos.shape[0]
    if value.dim() != 1 or value.shape[0] != batch:
        raise ValueError(
            f"{name} must be a float or a (B,) tensor with B = {batch}, got shape "
            f"{tuple(value.shape)}"
        )
    if value.dtype not in ROW_DTYPES:
        raise TypeError(f"{name} must be float32 or float64 per-row values, got {value.dtype}")
    if value.device != cos.device:
        raise ValueError(f"{name} is on {value.device} but cos is on {cos.device}")
    if torch.compiler.is_compiling():
        return value  # data-dependent checks would break the graph; eager calls check every value
    values = value.detach()
    finite = torch.isfinite(values).all()
    in_range = (
        (values > low).all() if strict else (values >= low).all() if low is not None else None
    )
    if values.device.type == "cpu":
        if not finite:
            bad = values[~torch.isfinite(values)][0].item()
            raise ValueError(f"{name} must be finite in every row, got {bad}")
        if in_range is not None and not in_range:
            raise ValueError(
                f"{name} must be {'>' if strict else '>='} {low} in every row, got "
                f"{values.min().item()}"
            )
    else:
        # No host sync on a GPU (see labels in _check_tensors): a device-side assert.
        torch._assert_async(finite, f"{name} must be finite in every row")
        if in_range is not None:
            torch._assert_async(in_range, f"{name} must be {'>' if strict else '>='} {low}")
    return value


def _check_margins(cos, m1, m2, m3, lam) -> tuple:
    """Per-row or scalar ``m1, m2, m3, lam`` with the bounds of :func:`check_margin`, except that a
    per-row ``m2`` may be negative: AdaFace's angular part ``-m ms`` is, for rows with ``ms > 0``
    (docs/design.md, Per-row margins and negative modulation)."""
    return (
        _check_row_values("m1", m1, cos, low=0.0, strict=True),
        _check_row_values("m2", m2, cos, low=None if isinstance(m2, torch.Tensor) else 0.0),
        _check_row_values("m3", m3, cos),
        _check_row_values("lam", lam, cos, low=0.0),
    )


def _check_negative_t(negative_t) -> float | None:
    return None if negative_t is None else check_number("negative_t", negative_t)


def _check_tensors(cos, labels) -> None:
    if not isinstance(cos, torch.Tensor):
        raise TypeError(f"cos must be a torch.Tensor, got {type(cos).__name__}")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if cos.dim() != 2:
        raise ValueError(
            f"cos must have shape (B, C), got {cos.dim()} dimensions {tuple(cos.shape)}"
        )
    if cos.dtype not in FLOAT_DTYPES:
        raise TypeError(f"cos must be float16, bfloat16, float32 or float64, got {cos.dtype}")
    if labels.dim() != 1:
        raise ValueError(f"labels must have shape (B,), got {tuple(labels.shape)}")
    if labels.dtype != torch.int64:
        raise TypeError(f"labels must be int64, got {labels.dtype}")
    batch, classes = cos.shape
    if batch == 0 or classes == 0:
        raise ValueError(f"cos must have B >= 1 and C >= 1, got shape {tuple(cos.shape)}")
    if labels.shape[0] != batch:
        raise ValueError(f"labels has {labels.shape[0]} entries but cos has B = {batch} rows")
    if labels.device != cos.device:
        raise ValueError(f"labels is on {labels.device} but cos is on {cos.device}")
    # A data-dependent check: skipped while torch.compile traces (it would break the graph).
    if torch.compiler.is_compiling():
        return
    if labels.device.type == "cpu":
        largest = int(labels.max())
        if largest >= classes:
            raise ValueError(f"labels must be < C = {classes}, got a label {largest}")
    else:
        # No host sync on a GPU (it would stall every step, break CUDA-graph capture and pad every
        # timing): a device-side assert, as F.cross_entropy does there. It fires at a later
        # synchronisation and leaves the CUDA context unusable, like any device-side assert.
        torch._assert_async((labels < classes).all(), f"labels must be < C = {classes}")


# Whether the fused kernels serve a device type, decided at its first call: the answer cannot
# change within a process, and the dispatcher query costs more than the fused op's forward at
# small shapes.
_fused_devices: dict[str, bool] = {}


# Evaluated once per device type while torch.compile traces, so that the dispatcher query and the
# one-time registration stay out of the graph.
@torch.compiler.assume_constant_result
def _fused_for(device_type: str) -> bool:
    fused = _fused_devices.get(device_type)
    if fused is not None:
        return fused
    fused = _fused_devices[device_type] = _extension.has_kernel(device_type)
    if fused:
        _register_python_parts()
        return True
    loaded, reason = _extension.load()
    if loaded:
        reason = f"the extension has no kernel for {device_type} tensors"
    _extension.warn_fallback_once(reason)
    return False


# --------------------------------------------------------------------------------------------------
# Public API.


def margin_logits(
    cos: torch.Tensor,
    labels: torch.Tensor,
    *,
    s: float,
    m1: float | torch.Tensor = 1.0,
    m2: float | torch.Tensor = 0.0,
    m3: float | torch.Tensor = 0.0,
    lam: float | torch.Tensor = 0.0,
    straight_through: bool = False,
    negative_t: float | None = None,
) -> torch.Tensor:
    """Margin logits (docs/design.md, Math): ``s * cos`` with the target column of each row
    replaced by ``s * f_y``; rows whose label is negative get no margin. Returned in ``cos``'s
    dtype.

    ``m1``, ``m2``, ``m3``, ``lam``: a float, or a (B,) float32/float64 tensor of per-row values
    (gradients flow to it when it requires grad). ``negative_t``: None, or CurricularFace's ``t``
    (docs/design.md, Per-row margins and negative modulation)."""
    s = check_number("s", s, low=0.0, strict=True)
    negative_t = _check_negative_t(negative_t)
    _check_tensors(cos, labels)
    m1, m2, m3, lam = _check_margins(cos, m1, m2, m3, lam)
    if _fused_for(cos.device.type):
        if negative_t is None and not _any_tensor(m1, m2, m3, lam):
            return torch.ops.angular.margin_logits(
                cos, labels, s, m1, m2, m3, lam, bool(straight_through)
            )
        margins = _margin_rows(cos, m1, m2, m3, lam)
        return torch.ops.angular.margin_logits_rows(
            cos, labels, margins, s, bool(straight_through), negative_t
        )
    return reference.margin_logits(
        cos,
        labels,
        s=s,
        m1=m1,
        m2=m2,
        m3=m3,
        lam=lam,
        straight_through=straight_through,
        negative_t=negative_t,
    )


def _loss_op(cos, labels, s, m1, m2, m3, lam, label_smoothing, straight_through, reduction):
    """The one compiled loss op for scalar margins (autograd, checks and reduction in C++)."""
    return torch.ops.angular.margin_cross_entropy_loss.default(
        cos,
        labels,
        s,
        m1,
        m2,
        m3,
        lam,
        label_smoothing,
        bool(straight_through),
        REDUCTION_CODES[reduction],
    )[0]


def margin_cross_entropy(
    cos: torch.Tensor,
    labels: torch.Tensor,
    *,
    s: float,
    m1: float | torch.Tensor = 1.0,
    m2: float | torch.Tensor = 0.0,
    m3: float | torch.Tensor = 0.0,
    lam: float | torch.Tensor = 0.0,
    label_smoothing: float = 0.0,
    straight_through: bool = False,
    reduction: str = "mean",
    negative_t: float | None = None,
) -> torch.Tensor:
    """``F.cross_entropy(margin_logits(cos, labels), labels, label_smoothing=...)`` in one fused pass.

    Rows with a negative label have loss 0 and gradient 0 and are not counted by ``"mean"`` (a batch
    with no target at all has mean loss 0). The loss is fp32 (fp64 for fp64 ``cos``). Per-row
    margins and ``negative_t`` as in :func:`margin_logits`.
    """
    if (
        isinstance(cos, torch.Tensor)
        and isinstance(labels, torch.Tensor)
        and negative_t is None
        and type(s) in _PLAIN_NUMBERS
        and type(m1) in _PLAIN_NUMBERS
        and type(m2) in _PLAIN_NUMBERS
        and type(m3) in _PLAIN_NUMBERS
        and type(lam) in _PLAIN_NUMBERS
        and type(label_smoothing) in _PLAIN_NUMBERS
        and reduction in REDUCTION_CODES
        and _fused_for(cos.device.type)
    ):
        # The op checks every argument (messages as below), in its kernels and autograd.
        return _loss_op(
            cos, labels, s, m1, m2, m3, lam, label_smoothing, straight_through, reduction
        )
    s = check_number("s", s, low=0.0, strict=True)
    label_smoothing = check_loss_options(label_smoothing, reduction)
    negative_t = _check_negative_t(negative_t)
    _check_tensors(cos, labels)
    m1, m2, m3, lam = _check_margins(cos, m1, m2, m3, lam)
    if not _fused_for(cos.device.type):
        return reference.margin_cross_entropy(
            cos,
            labels,
            s=s,
            m1=m1,
            m2=m2,
            m3=m3,
            lam=lam,
            label_smoothing=label_smoothing,
            straight_through=straight_through,
            reduction=reduction,
            negative_t=negative_t,
        )
    if negative_t is None and not _any_tensor(m1, m2, m3, lam):
        # Margins that are not plain Python numbers (symbolic floats under torch.compile, numpy
        # scalars), checked above: the same op as the fast path.
        return _loss_op(
            cos, labels, s, m1, m2, m3, lam, label_smoothing, straight_through, reduction
        )
    per_row, _ = torch.ops.angular.margin_cross_entropy_rows(
        cos,
        labels,
        _margin_rows(cos, m1, m2, m3, lam),
        s,
        label_smoothing,
        bool(straight_through),
        negative_t,
    )
    return reference.reduce_rows(per_row, labels >= 0, reduction)


def _any_tensor(*values) -> bool:
    return any(isinstance(value, torch.Tensor) for value in values)


def _margin_rows(cos: torch.Tensor, *margins) -> torch.Tensor:
    """The (4, B) per-row margins of the *_rows ops, in the arithmetic dtype of ``cos``: tensors
    cast (autograd casts their gradient back), floats repeated over the rows."""
    dtype = reference.compute_dtype(cos.dtype)
    batch = cos.shape[0]
    return torch.stack(
        [
            value.to(dtype)
            if isinstance(value, torch.Tensor)
            else torch.full((batch,), value, dtype=dtype, device=cos.device)
            for value in margins
        ]
    )


# --------------------------------------------------------------------------------------------------
# Python halves of the compiled ops: fake (meta) implementations for torch.compile, and the autograd
# of the ops whose autograd is not in C++ (csrc/autograd.cpp).

_registered = False


def _register_python_parts() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    ops = torch.ops.angular

    @torch.library.register_fake("angular::margin_logits")
    def _(cos, labels, s, m1, m2, m3, lam, straight_through):
        return torch.empty_like(cos, memory_format=torch.contiguous_format)

    @torch.library.register_fake("angular::margin_logits_backward")
    def _(grad, cos, labels, s, m1, m2, m3, lam, straight_through):
        return torch.empty_like(cos, memory_format=torch.contiguous_format)

    @torch.library.register_fake("angular::margin_cross_entropy")
    def _(cos, labels, s, m1, m2, m3, lam, label_smoothing, straight_through):
        rows = cos.new_empty(cos.shape[0], dtype=reference.compute_dtype(cos.dtype))
        return rows, torch.empty_like(rows)

    @torch.library.register_fake("angular::margin_cross_entropy_backward")
    def _(grad_rows, cos, labels, lse, s, m1, m2, m3, lam, label_smoothing, straight_through):
        return torch.empty_like(cos, memory_format=torch.contiguous_format)

    @torch.library.register_fake("angular::margin_cross_entropy_loss")
    def _(cos, labels, s, m1, m2, m3, lam, label_smoothing, straight_through, reduction):
        dtype = reference.compute_dtype(cos.dtype)
        batch = cos.shape[0]
        loss_shape = (batch,) if reduction == REDUCTION_CODES["none"] else ()
        return (
            cos.new_empty(loss_shape, dtype=dtype),
            cos.new_empty(batch, dtype=dtype),
            cos.new_empty((), dtype=dtype),
        )

    @torch.library.register_fake("angular::margin_cross_entropy_loss_backward")
    def _(grad, cos, labels, lse, divisor, s, m1, m2, m3, lam, label_smoothing, st, reduction):
        return torch.empty_like(cos, memory_format=torch.contiguous_format)

    @torch.library.register_fake("angular::margin_logits_rows")
    def _(cos, labels, margins, s, straight_through, negative_t):
        return torch.empty_like(cos, memory_format=torch.contiguous_format)

    @torch.library.register_fake("angular::margin_logits_rows_backward")
    def _(grad, cos, labels, margins, s, straight_through, negative_t):
        return torch.empty_like(cos, memory_format=torch.contiguous_format), torch.empty_like(
            margins, memory_format=torch.contiguous_format
        )

    @torch.library.register_fake("angular::margin_cross_entropy_rows")
    def _(cos, labels, margins, s, label_smoothing, straight_through, negative_t):
        rows = cos.new_empty(cos.shape[0], dtype=reference.compute_dtype(cos.dtype))
        return rows, torch.empty_like(rows)

    @torch.library.register_fake("angular::margin_cross_entropy_rows_backward")
    def _(grad_rows, cos, labels, lse, margins, s, label_smoothing, straight_through, negative_t):
        return torch.empty_like(cos, memory_format=torch.contiguous_format), torch.empty_like(
            margins, memory_format=torch.contiguous_format
        )

    # margin_logits and margin_cross_entropy_loss have their autograd in C++ (csrc/autograd.cpp).

    def ce_setup(ctx, inputs, output):
        cos, labels, *params = inputs
        ctx.save_for_backward(cos, labels, output[1])
        ctx.params = params

    def ce_backward(ctx, grad_rows, _grad_lse):
        cos, labels, lse = ctx.saved_tensors
        grad_cos = ops.margin_cross_entropy_backward(grad_rows, cos, labels, lse, *ctx.params)
        return grad_cos, None, None, None, None, None, None, None, None

    torch.library.register_autograd(
        "angular::margin_cross_entropy", ce_backward, setup_context=ce_setup
    )

    # The *_rows ops: (cos, labels, margins, *scalars); the backwards also give d / d margins.
    def rows_setup(ctx, inputs, output):
        cos, labels, margins, *params = inputs
        ctx.save_for_backward(cos, labels, margins)
        ctx.params = params

    def logits_rows_backward(ctx, grad):
        cos, labels, margins = ctx.saved_tensors
        grad_cos, grad_margins = ops.margin_logits_rows_backward(
            grad, cos, labels, margins, *ctx.params
        )
        return grad_cos, None, grad_margins, None, None, None

    torch.library.register_autograd(
        "angular::margin_logits_rows", logits_rows_backward, setup_context=rows_setup
    )

    def ce_rows_setup(ctx, inputs, output):
        cos, labels, margins, *params = inputs
        ctx.save_for_backward(cos, labels, margins, output[1])
        ctx.params = params

    def ce_rows_backward(ctx, grad_rows, _grad_lse):
        cos, labels, margins, lse = ctx.saved_tensors
        grad_cos, grad_margins = ops.margin_cross_entropy_rows_backward(
            grad_rows, cos, labels, lse, margins, *ctx.params
        )
        return grad_cos, None, grad_margins, None, None, None, None

    torch.library.register_autograd(
        "angular::margin_cross_entropy_rows", ce_rows_backward, setup_context=ce_rows_setup
    )
