"""Angular-margin classification heads (docs/design.md, Heads and backbones).

A :class:`MarginHead` owns the class centres ``W`` (C x D). It computes ``cos = normalize(x) @
normalize(W).T`` with one matmul and hands it to :mod:`angular.ops`. ``forward(x, labels)`` returns
margin logits, ``loss(x, labels)`` the fused margin cross-entropy, ``logits(x)`` plain ``s * cos`` for
inference. ``ArcFace``, ``CosFace``, ``SphereFace`` and ``CombinedMargin`` are presets.

With ``fused_linear=True`` (the default from ``FUSED_LINEAR_MIN_CLASSES`` classes on), ``loss`` never
forms the (B, C) cosines: :func:`angular.ops.linear_margin_cross_entropy` fuses the matmul with the
margin and the cross-entropy, chunk by chunk over the classes (same function, same gradients).

The head family: a head is a margin rule over a set of centres. The rule is the fixed ``margin``
here, a per-row one in :mod:`angular.nn.adaptive` (:meth:`MarginHead.per_row_margins`); the
centres are ``weight`` here, a shard with class sampling in :mod:`angular.nn.sharded`, whose head
is a :class:`MarginHead` too. Every head type registers itself once
(:func:`angular.nn.registry.register_head`) with its options; the config's head models follow.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from angular import ops
from angular.nn.backbones import check_size
from angular.nn.registry import HEADS, Group, Number, Option, register_head
from angular.ops import reference

# From this many classes on, a head's loss uses the fused linear op by default. On CPU (B = 256,
# D = 512, fp32, 2 threads) it ran 1.0x the matmul + fused margin op at C = 2048, 1.8x at 8192 and
# 1.9x at 32768 and 100,000, and it holds no B x C buffer (BENCHMARKS.md, "Fused linear + margin +
# cross-entropy"); on GPU it has not been measured yet.
FUSED_LINEAR_MIN_CLASSES = 8192


# Initial centres of a run on several processes whose heads are too large for one (angular.train:
# train.distributed.gather_head_mib): (world size, rank) of the class block this process keeps.
_kept_shard: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar(
    "kept_shard", default=None
)
DRAW_BLOCK = 2**22  # elements per block of a kept-shard draw (a multiple of 16, see draw_centres)


@contextlib.contextmanager
def keeping_shard(world_size: int, rank: int):
    """Heads built inside keep only rank ``rank``'s block of classes of their initial centres
    (:func:`angular.ops.sharded.shard_range`), drawn as :func:`draw_centres` says."""
    token = _kept_shard.set((world_size, rank))
    try:
        yield
    finally:
        _kept_shard.reset(token)


def draw_centres(num_classes: int, per_class: int, dim: int) -> tuple[torch.Tensor, tuple | None]:
    """The N(0, 0.01) initial centres, ``(num_classes * per_class, dim)`` class-major, from torch's
    global random stream, and None. Inside :func:`keeping_shard`: the same draws, made in blocks of
    which only this rank's classes are kept, ``(count * per_class, dim)``, and ``(start, count)``.

    The blocks leave the same numbers and the same stream behind as one draw of the whole matrix:
    CPU ``normal_`` draws one uniform per element and transforms them 16 at a time, redrawing the
    last 16 when the size is not a multiple of 16; blocks of a multiple of 16 elements, the last
    one at least 16, do exactly that (tests/nn/test_kept_shard.py checks it)."""
    shard = _kept_shard.get()
    if shard is None:
        weight = torch.empty(num_classes * per_class, dim)
        nn.init.normal_(weight, std=0.01)
        return weight, None
    start, count = ops.sharded.shard_range(num_classes, *shard)
    total = num_classes * per_class * dim
    first, end = start * per_class * dim, (start + count) * per_class * dim
    kept = torch.empty(count * per_class, dim)
    flat = kept.view(-1)
    offset = 0
    while offset < total:
        size = DRAW_BLOCK if total - offset >= DRAW_BLOCK + 16 else total - offset
        block = torch.empty(size)
        nn.init.normal_(block, std=0.01)
        low, high = max(offset, first), min(offset + size, end)
        if low < high:
            flat[low - first : high - first] = block[low - offset : high - offset]
        offset += size
    return kept, (start, count)


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


class RowContext:
    """What a margin rule (:meth:`MarginHead.per_row_margins`) may read of the batch's cosines:
    their dtype and device, and (:meth:`target_cos`) each row's detached target cosine, 0 for rows
    without a target. The one-process head reads it off its (B, C) cosines; the sharded head
    all-reduces it (B floats), only when a rule asks for it."""

    def __init__(self, cos: torch.Tensor, target_cos):
        self.dtype = reference.compute_dtype(cos.dtype)  # the ops' arithmetic dtype
        self.device = cos.device
        self._target_cos = target_cos
        self._value = None

    def target_cos(self) -> torch.Tensor:
        if self._value is None:
            self._value = self._target_cos()
        return self._value

    @classmethod
    def of(cls, cos: torch.Tensor, labels: torch.Tensor) -> RowContext:
        return cls(cos, lambda: _target_cos(cos, labels))


def _target_cos(cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``cos[i, labels[i]]`` (detached), 0 for rows without a target (negative label)."""
    rows = cos.detach().gather(1, labels.clamp(min=0).unsqueeze(1)).squeeze(1)
    return torch.where(labels >= 0, rows, torch.zeros_like(rows))


def add_row_term(
    rows: torch.Tensor, extra: torch.Tensor | None, labels: torch.Tensor, reduction: str
) -> torch.Tensor:
    """Per-row losses plus a rule's extra per-row term (rows with a target only), reduced."""
    has_target = labels >= 0
    if extra is not None:
        rows = rows + torch.where(has_target, extra.to(rows.dtype), torch.zeros_like(rows))
    return reference.reduce_rows(rows, has_target, reduction)


def check_reduction(reduction: str) -> None:
    if reduction not in ops.REDUCTIONS:
        raise ValueError(f"reduction must be one of {ops.REDUCTIONS}, got {reduction!r}")


class MarginHead(nn.Module):
    """Class centres plus an angular margin. ``step`` (a buffer, saved in checkpoints) drives the
    SphereFace ``lam`` schedule; it advances once per :meth:`loss` call in training mode.

    ``fused_linear``: whether :meth:`loss` uses the fused linear + margin + cross-entropy op (no
    (B, C) buffer); ``None`` (default) turns it on from ``FUSED_LINEAR_MIN_CLASSES`` classes.

    A head is a margin rule over a set of centres. The rule here is the fixed ``margin``; an
    adaptive head (:mod:`angular.nn.adaptive`, ``per_row = True``) overrides
    :meth:`per_row_margins`. The centres are ``weight`` (C x D); ``centres=False`` leaves them out
    (``weight`` None): the rule alone, or a head whose centres are a shard
    (:class:`angular.nn.sharded.ShardedMarginHead`, which runs this class's loss on one rank)."""

    per_row = False  # whether per_row_margins computes margins per row (then: no fused linear op)

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        margin: MarginSpec,
        *,
        label_smoothing: float = 0.0,
        straight_through: bool = False,
        fused_linear: bool | None = None,
        centres: bool = True,
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
        # kept_classes: (start, count) when the centres are one shard's only (keeping_shard).
        self.kept_classes = None
        if centres:
            weight, self.kept_classes = draw_centres(num_classes, 1, embedding_dim)
            self.weight = nn.Parameter(weight)
        else:
            self.register_parameter("weight", None)
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    @classmethod
    def margin_spec(cls, s: float, options: dict) -> MarginSpec:
        """The head type's :class:`MarginSpec` for scale ``s`` and its registered ``options``."""
        raise NotImplementedError

    @property
    def lam(self) -> float:
        if self.margin.lam_schedule is None:  # no read of the step: on a GPU that would sync
            return 0.0
        return self.margin.lam(int(self.step))

    def check_x(self, x: torch.Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self.embedding_dim:
            raise ValueError(f"x must have shape (B, {self.embedding_dim}), got {tuple(x.shape)}")

    def cosine(self, x: torch.Tensor) -> torch.Tensor:
        """``cos`` of each embedding with each class centre: (B, D) -> (B, C)."""
        self.check_x(x)
        weight = self.weight.to(x.dtype) if x.dtype != self.weight.dtype else self.weight
        return F.linear(F.normalize(x, dim=1), F.normalize(weight, dim=1))

    def dense_cosine(self, x: torch.Tensor) -> torch.Tensor:
        """The (B, C) cosines the one-process loss takes: :meth:`cosine`."""
        return self.cosine(x)

    def margin_arguments(self) -> dict:
        """The fixed margin's arguments of the ops."""
        m = self.margin
        return dict(
            s=m.s, m1=m.m1, m2=m.m2, m3=m.m3, lam=self.lam, straight_through=self.straight_through
        )

    def per_row_margins(
        self, x: torch.Tensor, rows: RowContext, labels: torch.Tensor, update: bool
    ) -> tuple[dict, torch.Tensor | None]:
        """The margin rule: overrides of :meth:`margin_arguments` (per-row tensors allowed), and an
        optional per-row term added to the loss. ``x`` and ``labels``: the whole batch (gathered,
        for a sharded head); ``update``: the rule's state may advance (training-mode loss). The
        fixed margin overrides nothing."""
        return {}, None

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Margin logits (B, C) for training-time inspection or a custom loss (the rule's state
        is used as it stands)."""
        cos = self.cosine(x)
        overrides, _ = self.per_row_margins(x, RowContext.of(cos, labels), labels, update=False)
        return ops.margin_logits(cos, labels, **{**self.margin_arguments(), **overrides})

    def loss(self, x: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Fused margin cross-entropy; advances the ``lam`` schedule (and the rule's state) in
        training mode."""
        loss = self.batch_loss(x, labels, reduction)
        if self.training:
            self.step += 1
        return loss

    def batch_loss(self, x: torch.Tensor, labels: torch.Tensor, reduction: str) -> torch.Tensor:
        """:meth:`loss` without advancing ``step``: over the (B, C) cosines with the rule's
        margins, or (``fused_linear``) the fused linear op on ``x`` and the centres."""
        if self.per_row:
            check_reduction(reduction)
        if not self.fused_linear:
            return self.cosine_loss(self.dense_cosine(x), x, labels, reduction)
        self.check_x(x)
        # The centres keep their dtype (the op converts them chunk by chunk).
        return ops.linear_margin_cross_entropy(
            x,
            self.weight,
            labels,
            label_smoothing=self.label_smoothing,
            reduction=reduction,
            **self.margin_arguments(),
        )

    def cosine_loss(
        self, cos: torch.Tensor, x: torch.Tensor, labels: torch.Tensor, reduction: str
    ) -> torch.Tensor:
        """The margin cross-entropy of the (B, C) cosines of ``x`` with the rule's margins."""
        overrides, extra = self.per_row_margins(
            x, RowContext.of(cos, labels), labels, self.training
        )
        common = dict(label_smoothing=self.label_smoothing, **self.margin_arguments())
        common.update(overrides)
        if extra is None:
            return ops.margin_cross_entropy(cos, labels, reduction=reduction, **common)
        rows = ops.margin_cross_entropy(cos, labels, reduction="none", **common)
        return add_row_term(rows, extra, labels, reduction)

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


def _m(default: float, **bounds) -> Option:
    return Option("m", default, Number(**bounds))


@register_head("arcface", options=(_m(0.5, low=0.0),), formula="cos(theta + m).")
class ArcFace(MarginHead):
    """Additive angular margin: ``cos(theta + m)``."""

    def __init__(self, embedding_dim: int, num_classes: int, s: float = 64.0, m: float = 0.5, **kw):
        super().__init__(embedding_dim, num_classes, MarginSpec.arcface(s, m), **kw)

    @classmethod
    def margin_spec(cls, s, options):
        return MarginSpec.arcface(s, options["m"])


@register_head("cosface", options=(_m(0.35, low=0.0),), formula="cos(theta) - m.")
class CosFace(MarginHead):
    """Additive cosine margin: ``cos(theta) - m``."""

    def __init__(
        self, embedding_dim: int, num_classes: int, s: float = 64.0, m: float = 0.35, **kw
    ):
        super().__init__(embedding_dim, num_classes, MarginSpec.cosface(s, m), **kw)

    @classmethod
    def margin_spec(cls, s, options):
        return MarginSpec.cosface(s, options["m"])


# SphereFace's lam: params.yaml's keys for LambdaSchedule's fields.
_LAMBDA_KEYS = {"base": "lam_base", "gamma": "gamma", "power": "power", "min": "lam_min"}
_LAMBDA = Group(
    "SphereFaceLambda",
    "lam = max(min, base (1 + gamma step)^-power).",
    tuple(
        Option(key, LambdaSchedule.__dataclass_fields__[field].default, Number(low=0.0))
        for key, field in _LAMBDA_KEYS.items()
    ),
)


@register_head(
    "sphereface",
    options=(_m(4.0, low=0.0, low_open=True), Option("lam", None, _LAMBDA)),
    formula="cos(m theta), annealed by lam.",
)
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

    @classmethod
    def margin_spec(cls, s, options):
        lam = options["lam"]
        schedule = LambdaSchedule(*(lam[key] for key in _LAMBDA_KEYS))
        return MarginSpec.sphereface(s, options["m"], schedule)


@register_head(
    "combined",
    options=(
        Option("m1", 1.0, Number(low=0.0, low_open=True)),
        Option("m2", 0.3, Number(low=0.0)),
        Option("m3", 0.2, Number()),
    ),
    formula="cos(m1 theta + m2) - m3.",
    title="CombinedHead",
)
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

    @classmethod
    def margin_spec(cls, s, options):
        return MarginSpec.combined(s, options["m1"], options["m2"], options["m3"])


PRESETS = {name: head.cls for name, head in HEADS.items() if not head.adaptive}
