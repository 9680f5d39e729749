"""Angular-margin classification heads (docs/design.md, Heads and backbones).

A :class:`MarginHead` owns the class centres ``W`` (C x D). It computes ``cos = normalize(x) @
normalize(W).T`` with one matmul and hands it to :mod:`angular.ops`. ``forward(x, labels)`` returns
margin logits, ``loss(x, labels)`` the fused margin cross-entropy, ``logits(x)`` plain ``s * cos`` for
inference. ``ArcFace``, ``CosFace``, ``SphereFace`` and ``CombinedMargin`` are presets.

With ``fused_linear=True`` (the default from ``FUSED_LINEAR_MIN_CLASSES`` classes on), ``loss`` never
forms the (B, C) cosines: :func:`angular.ops.linear_margin_cross_entropy` fuses the matmul with the
margin and the cross-entropy, chunk by chunk over the classes (same function, same gradients).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from angular import ops
from angular.nn.backbones import check_size

# From this many classes on, a head's loss uses the fused linear op by default. On CPU (B = 256,
# D = 512, fp32, 2 threads) it ran 1.0x the matmul + fused margin op at C = 2048, 1.8x at 8192 and
# 1.9x at 32768 and 100,000, and it holds no B x C buffer (BENCHMARKS.md, "Fused linear + margin +
# cross-entropy"); on GPU it has not been measured yet.
FUSED_LINEAR_MIN_CLASSES = 8192


@dataclasses.dataclass(frozen=True)
class LambdaSchedule:
    """SphereFace's annealing weight ``lam = max(lam_min, lam_base * (1 + gamma * step) ** -power)``."""

    lam_base: float = 1000.0
    gamma: float = 0.12
    power: float = 1.0
    lam_min: float = 5.0

    def __post_init__(self):
        for name in ("lam_base", "gamma", "power", "lam_min"):
            value = ops.check_number(name, getattr(self, name), low=0.0)
            object.__setattr__(self, name, value)

    def __call__(self, step: int) -> float:
        return max(self.lam_min, self.lam_base * (1.0 + self.gamma * step) ** -self.power)


@dataclasses.dataclass(frozen=True)
class MarginSpec:
    """The margin ``(s, m1, m2, m3)`` (docs/design.md, Math), plus an optional SphereFace ``lam`` schedule."""

    s: float = 64.0
    m1: float = 1.0
    m2: float = 0.0
    m3: float = 0.0
    lam_schedule: LambdaSchedule | None = None

    def __post_init__(self):
        s, m1, m2, m3, _ = ops.check_margin(self.s, self.m1, self.m2, self.m3, 0.0)
        for name, value in (("s", s), ("m1", m1), ("m2", m2), ("m3", m3)):
            object.__setattr__(self, name, value)
        if self.lam_schedule is not None and not isinstance(self.lam_schedule, LambdaSchedule):
            raise TypeError(
                f"lam_schedule must be a LambdaSchedule or None, got {type(self.lam_schedule).__name__}"
            )

    def lam(self, step: int) -> float:
        return 0.0 if self.lam_schedule is None else self.lam_schedule(step)

    @classmethod
    def arcface(cls, s: float = 64.0, m: float = 0.5) -> MarginSpec:
        return cls(s=s, m1=1.0, m2=m, m3=0.0)

    @classmethod
    def cosface(cls, s: float = 64.0, m: float = 0.35) -> MarginSpec:
        return cls(s=s, m1=1.0, m2=0.0, m3=m)

    @classmethod
    def sphereface(
        cls, s: float = 64.0, m: float = 4.0, schedule: LambdaSchedule | None = None
    ) -> MarginSpec:
        return cls(s=s, m1=m, m2=0.0, m3=0.0, lam_schedule=schedule or LambdaSchedule())

    @classmethod
    def combined(
        cls, s: float = 64.0, m1: float = 1.0, m2: float = 0.3, m3: float = 0.2
    ) -> MarginSpec:
        return cls(s=s, m1=m1, m2=m2, m3=m3)


class MarginHead(nn.Module):
    """Class centres plus an angular margin. ``step`` (a buffer, saved in checkpoints) drives the
    SphereFace ``lam`` schedule; it advances once per :meth:`loss` call in training mode.

    ``fused_linear``: whether :meth:`loss` uses the fused linear + margin + cross-entropy op (no
    (B, C) buffer); ``None`` (default) turns it on from ``FUSED_LINEAR_MIN_CLASSES`` classes."""

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        margin: MarginSpec,
        *,
        label_smoothing: float = 0.0,
        straight_through: bool = False,
        fused_linear: bool | None = None,
    ):
        super().__init__()
        embedding_dim = check_size("embedding_dim", embedding_dim)
        num_classes = check_size("num_classes", num_classes)
        if not isinstance(margin, MarginSpec):
            raise TypeError(f"margin must be a MarginSpec, got {type(margin).__name__}")
        label_smoothing = ops.check_number("label_smoothing", label_smoothing, low=0.0)
        if label_smoothing > 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
        self.embedding_dim = embedding_dim
        self.num_classes = num_classes
        self.margin = margin
        self.label_smoothing = label_smoothing
        self.straight_through = straight_through
        if fused_linear is not None and not isinstance(fused_linear, bool):
            raise TypeError(f"fused_linear must be True, False or None, got {fused_linear!r}")
        self.fused_linear = (
            num_classes >= FUSED_LINEAR_MIN_CLASSES if fused_linear is None else fused_linear
        )
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.normal_(self.weight, std=0.01)
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    @property
    def lam(self) -> float:
        if self.margin.lam_schedule is None:  # no read of the step: on a GPU that would sync
            return 0.0
        return self.margin.lam(int(self.step))

    def _check_x(self, x: torch.Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self.embedding_dim:
            raise ValueError(f"x must have shape (B, {self.embedding_dim}), got {tuple(x.shape)}")

    def cosine(self, x: torch.Tensor) -> torch.Tensor:
        """``cos`` of each embedding with each class centre: (B, D) -> (B, C)."""
        self._check_x(x)
        weight = self.weight.to(x.dtype) if x.dtype != self.weight.dtype else self.weight
        return F.linear(F.normalize(x, dim=1), F.normalize(weight, dim=1))

    def _margin_args(self) -> dict:
        m = self.margin
        return dict(
            s=m.s, m1=m.m1, m2=m.m2, m3=m.m3, lam=self.lam, straight_through=self.straight_through
        )

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Margin logits (B, C) for training-time inspection or a custom loss."""
        return ops.margin_logits(self.cosine(x), labels, **self._margin_args())

    def loss(self, x: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Fused margin cross-entropy; advances the ``lam`` schedule in training mode."""
        if self.fused_linear:
            self._check_x(x)
            # The centres keep their dtype (the op converts them chunk by chunk).
            loss = ops.linear_margin_cross_entropy(
                x,
                self.weight,
                labels,
                label_smoothing=self.label_smoothing,
                reduction=reduction,
                **self._margin_args(),
            )
        else:
            loss = ops.margin_cross_entropy(
                self.cosine(x),
                labels,
                label_smoothing=self.label_smoothing,
                reduction=reduction,
                **self._margin_args(),
            )
        if self.training:
            self.step += 1
        return loss

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Inference logits ``s * cos``, no margin."""
        return self.margin.s * self.cosine(x)

    def extra_repr(self) -> str:
        m = self.margin
        return (
            f"embedding_dim={self.embedding_dim}, num_classes={self.num_classes}, "
            f"s={m.s}, m1={m.m1}, m2={m.m2}, m3={m.m3}, lam_schedule={m.lam_schedule}, "
            f"fused_linear={self.fused_linear}"
        )


class ArcFace(MarginHead):
    """Additive angular margin: ``cos(theta + m)``."""

    def __init__(self, embedding_dim: int, num_classes: int, s: float = 64.0, m: float = 0.5, **kw):
        super().__init__(embedding_dim, num_classes, MarginSpec.arcface(s, m), **kw)


class CosFace(MarginHead):
    """Additive cosine margin: ``cos(theta) - m``."""

    def __init__(
        self, embedding_dim: int, num_classes: int, s: float = 64.0, m: float = 0.35, **kw
    ):
        super().__init__(embedding_dim, num_classes, MarginSpec.cosface(s, m), **kw)


class SphereFace(MarginHead):
    """Multiplicative angular margin ``cos(m theta)`` (monotonic extension), annealed by ``lam``."""

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        s: float = 64.0,
        m: float = 4.0,
        schedule: LambdaSchedule | None = None,
        **kw,
    ):
        super().__init__(embedding_dim, num_classes, MarginSpec.sphereface(s, m, schedule), **kw)


class CombinedMargin(MarginHead):
    """All three margins at once: ``cos(m1 theta + m2) - m3``."""

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        s: float = 64.0,
        m1: float = 1.0,
        m2: float = 0.3,
        m3: float = 0.2,
        **kw,
    ):
        super().__init__(embedding_dim, num_classes, MarginSpec.combined(s, m1, m2, m3), **kw)


PRESETS = {
    "arcface": ArcFace,
    "cosface": CosFace,
    "sphereface": SphereFace,
    "combined": CombinedMargin,
}
