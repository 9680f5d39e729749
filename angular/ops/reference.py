"""The margin math (docs/design.md, Math) in plain eager PyTorch: the yardstick every kernel is tested against.

For a row with target ``y`` and ``theta = acos(cos_y)``::

    t   = m1 * theta + m2,  k = floor(t / pi)
    psi = (-1)^k * cos(t) - 2k - m3
    f_y = (lam * cos_y + psi) / (1 + lam)
    z_y = s * f_y,  z_j = s * cos_j (j != y)

The margin touches only the B target entries (gather, transform, scatter), so this is also the best
eager formulation of the op: one ``s * cos`` over B x C, then ``F.cross_entropy``.

Gradient guard. ``d psi / d cos = (-1)^k m1 sin(t) / sin(theta)`` is unbounded as ``|cos| -> 1``. The
derivative is evaluated at ``theta`` clamped to ``[THETA_MIN, pi - THETA_MIN]`` (``THETA_MIN = 0.01``
rad, i.e. ``|cos| > 0.99995``): the forward value stays exact, the gradient stays finite in every dtype,
and wherever ``|cos| <= 1 - 1e-4`` it is the exact derivative. The fused kernels use the same guard.

Non-finite cosines are not checked for (that would cost a pass over B x C); they go through the
arithmetic like any value, as ``F.cross_entropy`` would take them: NaN or +inf anywhere in a row with
a target, or a non-finite target cosine, makes that row's logits and loss non-finite; -inf at a
non-target column gives that class probability 0 (finite loss without smoothing, +inf with it). Other
rows are unaffected, and a row without a target has loss 0 and gradient 0 whatever it holds.

Per-row margins and negative modulation (docs/design.md, Per-row margins and negative modulation).
``m1``, ``m2``, ``m3`` and ``lam`` may each be a float or a (B,) tensor of per-row values: they
broadcast inside :func:`target_logit`, and autograd gives ``d loss / d m`` per row (the derivative of
the forward value, at the exact angle: the gradient guard concerns ``d / d cos`` only). With
``negative_t = t`` (CurricularFace), every non-target entry of a row with a target whose cosine is
strictly above that row's ``f_y`` becomes ``cos_j * (t + cos_j)`` (derivative ``t + 2 cos_j``); an entry
equal to ``f_y`` is left as it is. ``t`` is a constant: it gets no gradient, and neither does the
threshold ``f_y`` through the comparison.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Below this angle (and above pi minus it) the derivative is taken at the clamped angle; see module doc.
THETA_MIN = 0.01
COS_MAX = math.cos(THETA_MIN)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic dtype for an input dtype: fp64 stays fp64, everything else computes in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# A margin parameter: one float for every row, or a (B,) tensor of per-row values.
Margin = float | torch.Tensor


def psi_of_theta(theta: torch.Tensor, m1: Margin, m2: Margin, m3: Margin) -> torch.Tensor:
    """The margin-extended target cosine ``(-1)^k cos(t) - 2k - m3`` with ``t = m1 theta + m2``."""
    t = m1 * theta + m2
    k = torch.floor(t / math.pi).detach()
    sign = 1.0 - 2.0 * torch.remainder(k, 2.0)
    return sign * torch.cos(t) - 2.0 * k - m3


def _in_dtype(value: Margin, dtype: torch.dtype) -> Margin:
    """A per-row tensor in the arithmetic dtype (autograd casts its gradient back); a float as is."""
    return value.to(dtype) if isinstance(value, torch.Tensor) else value


def _detached(value: Margin) -> Margin:
    return value.detach() if isinstance(value, torch.Tensor) else value


def target_logit(
    cos_y: torch.Tensor,
    *,
    m1: Margin,
    m2: Margin,
    m3: Margin,
    lam: Margin,
    straight_through: bool = False,
) -> torch.Tensor:
    """``f_y`` for target cosines ``cos_y``, differentiable by autograd with the guard above.

    Per-row tensors broadcast with ``cos_y`` (a (B,) tensor with (B,) margins). The value and the
    margin gradients come from the exact angle; ``d f_y / d cos_y`` from the clamped one, and is 1
    with ``straight_through=True`` (the margin gradients stay those of the value).
    """
    m1, m2, m3, lam = (_in_dtype(m, cos_y.dtype) for m in (m1, m2, m3, lam))
    c = cos_y.detach()
    psi = psi_of_theta(torch.acos(c.clamp(-1.0, 1.0)), m1, m2, m3)
    f_exact = (lam * c + psi) / (1.0 + lam)  # the value; gradients for the margins only
    if straight_through:
        return f_exact + (cos_y - c)
    # Clamp the angle for the cos gradient only: c_safe has cos_y's gradient (a plain clamp would
    # zero it at the bounds) but a value inside +-COS_MAX, where acos has a finite derivative.
    c_safe = cos_y - (cos_y - cos_y.clamp(-COS_MAX, COS_MAX)).detach()
    m1, m2, m3, lam = (_detached(m) for m in (m1, m2, m3, lam))
    f_safe = (lam * cos_y + psi_of_theta(torch.acos(c_safe), m1, m2, m3)) / (1.0 + lam)
    return f_exact + (f_safe - f_safe.detach())


def modulate_negatives(
    work: torch.Tensor, f_y: torch.Tensor, has_target: torch.Tensor, t: float
) -> torch.Tensor:
    """CurricularFace's negative modulation of a (B, C) cosine matrix: ``cos_j (t + cos_j)`` where
    ``cos_j > f_y`` of its row (strictly) and the row has a target. The caller overwrites the
    target column afterwards."""
    hard = (work > f_y.detach().unsqueeze(1)) & has_target.unsqueeze(1)
    # Modulate a copy that is 0 off the hard entries, so that an inf there cannot reach the
    # gradient as 0 * inf through the unused branch.
    picked = torch.where(hard, work, 0.0)
    return torch.where(hard, picked * (t + picked), work)


def margin_logits(
    cos: torch.Tensor,
    labels: torch.Tensor,
    *,
    s: float,
    m1: Margin = 1.0,
    m2: Margin = 0.0,
    m3: Margin = 0.0,
    lam: Margin = 0.0,
    straight_through: bool = False,
    negative_t: float | None = None,
    negative_threshold: torch.Tensor | None = None,
) -> torch.Tensor:
    """``z = s * cos`` with the margin applied to each row's target column (and, with
    ``negative_t``, the hard negatives modulated); rows with a negative label get neither. Computed
    in fp32 (fp64 for fp64 input); returned in the input dtype.

    ``negative_threshold`` (B,), detached: the ``f_y`` that decides which entries are hard in
    place of the row's own (a sharded head holds a shard of the columns, and the target may live on
    another shard: docs/design.md, "Sharded softmax"); every row is modulated against it, +inf
    leaves a row alone."""
    work = cos.to(compute_dtype(cos.dtype))
    has_target = labels >= 0
    safe_labels = labels.clamp(min=0).unsqueeze(1)
    cos_y = work.gather(1, safe_labels).squeeze(1)
    # Rows without a target hand the margin a harmless 0: the unused branch of the where then has a
    # finite derivative, so a NaN in such a row cannot reach the gradient as 0 * NaN.
    f_y = target_logit(
        torch.where(has_target, cos_y, 0.0),
        m1=m1,
        m2=m2,
        m3=m3,
        lam=lam,
        straight_through=straight_through,
    )
    if negative_t is not None and negative_threshold is not None:
        every_row = torch.ones_like(has_target)
        work = modulate_negatives(work, negative_threshold.to(work.dtype), every_row, negative_t)
    elif negative_t is not None:
        work = modulate_negatives(work, f_y, has_target, negative_t)
    # A row without a target writes back its own (possibly modulated) column 0.
    f_y = torch.where(has_target, f_y, work.gather(1, safe_labels).squeeze(1))
    logits = (s * work).scatter(1, safe_labels, (s * f_y).unsqueeze(1))
    return logits.to(cos.dtype)


def reduce_rows(per_row: torch.Tensor, has_target: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce per-row losses; ``mean`` divides by the rows that have a target (0 when none has)."""
    if reduction == "none":
        return per_row
    total = per_row.sum()
    if reduction == "sum":
        return total
    return total / has_target.sum().clamp(min=1).to(per_row.dtype)


def margin_cross_entropy(
    cos: torch.Tensor,
    labels: torch.Tensor,
    *,
    s: float,
    m1: Margin = 1.0,
    m2: Margin = 0.0,
    m3: Margin = 0.0,
    lam: Margin = 0.0,
    label_smoothing: float = 0.0,
    straight_through: bool = False,
    reduction: str = "mean",
    negative_t: float | None = None,
) -> torch.Tensor:
    """``F.cross_entropy`` of the margin logits (smoothing mass spread over all C classes). Rows with a
    negative label contribute loss 0 and gradient 0 and are not counted by ``mean``. The loss is fp32
    (fp64 for fp64 input)."""
    has_target = labels >= 0
    # Rows without a target are zeroed before the softmax, so that whatever they hold (NaN, inf)
    # their loss and gradient are exactly 0, as in the fused kernels, which skip them.
    work = torch.where(has_target.unsqueeze(1), cos.to(compute_dtype(cos.dtype)), 0.0)
    logits = margin_logits(
        work,
        labels,
        s=s,
        m1=m1,
        m2=m2,
        m3=m3,
        lam=lam,
        straight_through=straight_through,
        negative_t=negative_t,
    )
    per_row = F.cross_entropy(
        logits, labels.clamp(min=0), reduction="none", label_smoothing=label_smoothing
    )
    per_row = torch.where(has_target, per_row, torch.zeros_like(per_row))
    return reduce_rows(per_row, has_target, reduction)


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
    """The unfused composition the fused linear op computes: normalise the embeddings ``x`` (B, D)
    and the class centres ``weight`` (C, D, cast to ``x``'s dtype, as a head does), one matmul for
    the (B, C) cosines, then :func:`margin_cross_entropy`."""
    cos = F.linear(F.normalize(x, dim=1), F.normalize(weight.to(x.dtype), dim=1))
    return margin_cross_entropy(
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
    )
