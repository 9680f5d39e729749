"""Baseline formulations of the margin ops that the benchmark times against the fused kernel.

``insightface`` is the eager formulation used by insightface's ``recognition/arcface_torch`` and by the
original repository this project descends from: ``acos`` of the whole B x C cosine matrix, the margin
``cos(m1 * theta + m2) - m3`` evaluated for every entry, a one-hot mask that keeps it only in the target
column, then ``F.cross_entropy``. It computes the same function as :mod:`angular.ops.reference` wherever
``t = m1 * theta_y + m2 <= pi`` (CosFace everywhere, ArcFace for ``theta_y + m2 < pi``); past ``pi``
it has no ``(-1)^k ... - 2k`` extension, exactly like the code it stands for, so SphereFace with
``m1 = 4`` computes plain ``cos(4 theta)`` there. Its cost is what matters here: several elementwise
passes and several B x C temporaries kept alive for autograd.

Unlike arcface_torch (which wraps the ArcFace ``acos``/``cos`` in ``torch.no_grad()``, i.e. a
straight-through gradient), this version is differentiated by autograd end to end, as the original
repository was, so its gradient equals the reference's (``straight_through=False``, the default of
docs/design.md, Math).

The ``reference`` provider is :mod:`angular.ops.reference` itself (called, not copied), and ``compiled`` is
``torch.compile`` of it; see ``bench_margin.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from angular.ops import reference

# acos is clamped just inside [-1, 1] so that its derivative stays finite over the whole matrix (in
# non-target entries that derivative is multiplied by a zero mask, and inf * 0 would be NaN).
ACOS_EPS = 1e-7


def insightface_margin_logits(
    cos: torch.Tensor,
    labels: torch.Tensor,
    *,
    s: float,
    m1: float = 1.0,
    m2: float = 0.0,
    m3: float = 0.0,
) -> torch.Tensor:
    """``s * (one_hot * (cos(m1 acos(cos) + m2) - m3) + (1 - one_hot) * cos)`` over the whole matrix.

    Rows with a negative label get an all-zero mask (no margin). Arithmetic in fp32 (fp64 for fp64
    input), result in the input dtype, like the reference.
    """
    work = cos.to(reference.compute_dtype(cos.dtype))
    has_target = (labels >= 0).unsqueeze(1)
    one_hot = torch.zeros_like(work).scatter_(1, labels.clamp(min=0).unsqueeze(1), 1.0)
    one_hot = one_hot * has_target
    theta = torch.acos(work.clamp(-1.0 + ACOS_EPS, 1.0 - ACOS_EPS))
    target = torch.cos(m1 * theta + m2) - m3
    logits = s * (one_hot * target + (1.0 - one_hot) * work)
    return logits.to(cos.dtype)


def insightface_margin_cross_entropy(
    cos: torch.Tensor,
    labels: torch.Tensor,
    *,
    s: float,
    m1: float = 1.0,
    m2: float = 0.0,
    m3: float = 0.0,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """``F.cross_entropy`` of :func:`insightface_margin_logits` (computed in fp32, or fp64 for fp64
    input); rows with a negative label are ignored the way the reference ignores them."""
    work = cos.to(reference.compute_dtype(cos.dtype))
    logits = insightface_margin_logits(work, labels, s=s, m1=m1, m2=m2, m3=m3)
    has_target = labels >= 0
    per_row = F.cross_entropy(
        logits, labels.clamp(min=0), reduction="none", label_smoothing=label_smoothing
    )
    per_row = torch.where(has_target, per_row, torch.zeros_like(per_row))
    return reference.reduce_rows(per_row, has_target, reduction)
