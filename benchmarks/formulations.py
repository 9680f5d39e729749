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

import math

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


# --------------------------------------------------------------------------------------------------
# Heads with per-row margins or negative modulation, written the way their authors wrote them (the
# eager baselines of the per-row benchmark, docs/design.md, Per-row margins and negative modulation).
# Each returns the scaled logits of its head's forward; the loss is F.cross_entropy of them.


def adaface_logits(
    cos: torch.Tensor,
    labels: torch.Tensor,
    norms: torch.Tensor,
    *,
    batch_mean: float,
    batch_std: float,
    s: float = 64.0,
    m: float = 0.4,
    h: float = 0.333,
    eps: float = 1e-3,
) -> torch.Tensor:
    """AdaFace's published head forward: the margin scaler from the detached feature norms, then an
    angular part (``acos`` and ``cos`` over the whole B x C matrix, a one-hot mask) and an additive
    part (another one-hot mask)."""
    cosine = cos.clamp(-1 + eps, 1 - eps)
    safe_norms = torch.clip(norms.view(-1, 1), min=0.001, max=100).clone().detach()  # (B, 1)
    margin_scaler = torch.clip((safe_norms - batch_mean) / (batch_std + eps) * h, -1, 1)
    m_arc = torch.zeros(labels.size(0), cosine.size(1), device=cosine.device)
    m_arc.scatter_(1, labels.reshape(-1, 1), 1.0)
    m_arc = m_arc * (m * margin_scaler * -1)
    theta = cosine.acos()
    theta_m = torch.clip(theta + m_arc, min=eps, max=math.pi - eps)
    cosine = theta_m.cos()
    m_cos = torch.zeros(labels.size(0), cosine.size(1), device=cosine.device)
    m_cos.scatter_(1, labels.reshape(-1, 1), 1.0)
    m_cos = m_cos * (m + m * margin_scaler)
    return (cosine - m_cos) * s


def magface_logits(
    cos: torch.Tensor, labels: torch.Tensor, margins: torch.Tensor, *, s: float = 64.0
) -> torch.Tensor:
    """MagFace's published forward and loss: the per-row margin ``margins`` (a function of the
    norm, with its gradient) applied to every entry of the B x C matrix, then a one-hot mix."""
    ada_margin = margins.unsqueeze(1)
    cos_m, sin_m = torch.cos(ada_margin), torch.sin(ada_margin)
    cos_theta = cos.clamp(-1, 1)
    sin_theta = torch.sqrt(1.0 - torch.pow(cos_theta, 2))
    cos_theta_m = cos_theta * cos_m - sin_theta * sin_m
    mm = torch.sin(math.pi - ada_margin) * ada_margin
    threshold = torch.cos(math.pi - ada_margin)
    cos_theta_m = torch.where(cos_theta > threshold, cos_theta_m, cos_theta - mm)
    one_hot = torch.zeros_like(cos_theta)
    one_hot.scatter_(1, labels.view(-1, 1), 1.0)
    return s * (one_hot * cos_theta_m + (1.0 - one_hot) * cos_theta)


def curricularface_logits(
    cos: torch.Tensor, labels: torch.Tensor, *, t: float, s: float = 64.0, m: float = 0.5
) -> torch.Tensor:
    """CurricularFace's published head forward (``t`` passed in, as its buffer): ArcFace's target
    with the ``target - mm`` branch past ``pi - m``, and every non-target cosine above the target's
    modulated to ``cos (t + cos)`` by boolean indexing."""
    cos_theta = cos.clamp(-1, 1)
    target_logit = cos_theta[torch.arange(0, cos.size(0)), labels].view(-1, 1)
    sin_theta = torch.sqrt(1.0 - torch.pow(target_logit, 2))
    cos_theta_m = target_logit * math.cos(m) - sin_theta * math.sin(m)
    mask = cos_theta > cos_theta_m
    final_target_logit = torch.where(
        target_logit > math.cos(math.pi - m), cos_theta_m, target_logit - math.sin(math.pi - m) * m
    )
    hard_example = cos_theta[mask]
    cos_theta[mask] = hard_example * (t + hard_example)
    cos_theta.scatter_(1, labels.view(-1, 1), final_target_logit)
    return cos_theta * s
