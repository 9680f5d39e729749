"""Heads whose margin changes per sample (docs/design.md, Heads and backbones): AdaFace, ElasticFace,
MagFace, CurricularFace and sub-center ArcFace, each after its paper's reference code.

They run on the unfused cosine path: ``cos = self.cosine(x)``, then :func:`angular.ops.margin_cross_entropy`
with per-row tensors for ``m2``/``m3`` (and CurricularFace's ``negative_t``), which the ops read in
the same single pass as a scalar margin. The fused linear op takes scalar margins only, so these
heads refuse ``fused_linear=True``.

Each head's ``margin`` (a :class:`MarginSpec`) is its representative scalar margin, used where the
project needs one number (the collapse bound of docs/design.md, Collapse, and the model file):
AdaFace at ``ms = 0`` (CosFace ``m``), ElasticFace at the mean of its draws, MagFace at ``u_m``
(its largest margin), CurricularFace and sub-center ArcFace at their ArcFace ``m``. ``options``
holds the head's other constructor arguments; :func:`build_adaptive_head` rebuilds a head from
``(type, s, options)``, which is what the model file stores.

Under torch.distributed (docs/design.md, "Sharded softmax"): :class:`angular.nn.sharded.ShardedAdaptiveHead`
shards any of these heads by class, reusing :meth:`AdaptiveMarginHead.per_row_margins` on the gathered
batch. A head that stays whole on every rank (replicated, each rank its own local batch, e.g. in a
DDP model) all-reduces the batch statistics its state follows (AdaFace's norm mean and std,
CurricularFace's mean target cosine) over ``process_group`` (None: the default group) whenever
torch.distributed is initialised with more than one rank, so its buffers stay the same on every
rank: those of one process on the concatenated batch. ``sync_statistics=False`` turns that off.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from angular import ops
from angular.nn.heads import MarginHead, MarginSpec, RowContext, draw_centres
from angular.nn.registry import HEADS, Flag, Integer, Number, Option, register_head
from angular.ops import sharded

__all__ = [
    "ADAPTIVE_HEADS",
    "AdaFace",
    "AdaptiveMarginHead",
    "CurricularFace",
    "ElasticArcFace",
    "ElasticCosFace",
    "MagFace",
    "SubCenterArcFace",
    "build_adaptive_head",
    "magface_min_lambda_g",
]


class AdaptiveMarginHead(MarginHead):
    """A :class:`MarginHead` whose margin arguments are computed per batch by
    :meth:`per_row_margins`.

    State that the paper keeps between steps (EMA buffers, a generator) changes only in
    :meth:`loss` in training mode; :meth:`forward` and evaluation use it as it stands.

    ``sync_statistics`` and ``process_group``: with torch.distributed initialised and more than one
    rank in ``process_group`` (None: the default group), the batch statistics that AdaFace's and
    CurricularFace's buffers follow are all-reduced in :meth:`loss` (training mode; a collective:
    every rank calls it), so a head replicated on every rank keeps the same buffers everywhere (see
    the module doc); ``sync_statistics=False``: each rank its own batch's."""

    per_row = True
    type_name: str  # set by register_head
    centres_per_class = 1  # sub-center ArcFace: k

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        s: float,
        options: dict[str, Any],
        *,
        fused_linear: bool | None = None,
        sync_statistics: bool = True,
        process_group=None,
        **kw,
    ):
        if fused_linear:
            raise ValueError(
                f"fused_linear must be false or null for {type(self).__name__}: its per-row "
                "margins need the (B, C) cosines (the fused linear op takes scalar margins)"
            )
        margin = self.margin_spec(s, options)
        if not isinstance(sync_statistics, bool):
            raise TypeError(f"sync_statistics must be true or false, got {sync_statistics!r}")
        super().__init__(embedding_dim, num_classes, margin, fused_linear=False, **kw)
        self.options = dict(options)
        self.sync_statistics = sync_statistics
        self.process_group = process_group

    def statistics_group(self):
        """The group to all-reduce batch statistics over, or None: one process, or turned off."""
        if not self.sync_statistics or sharded.world_of(self.process_group)[1] == 1:
            return None
        return (
            self.process_group if self.process_group is not None else torch.distributed.group.WORLD
        )

    @classmethod
    def margin_spec(cls, s: float, options: dict[str, Any]) -> MarginSpec:
        """The head's representative scalar margin (see the module doc): ArcFace ``m`` here."""
        return MarginSpec.arcface(s, options["m"])

    def per_row_margins(self, x, rows, labels, update):
        raise NotImplementedError

    def margin_rule(self, **arguments) -> AdaptiveMarginHead:
        """This head's margin rule and its state, without the centres (a sharded head's rule): a
        head of the same type and options with ``centres=False``, whose buffers are copies of this
        head's. Its statistics see the gathered batch already, so it does not all-reduce them."""
        rule = type(self)(
            self.embedding_dim,
            self.num_classes,
            s=self.margin.s,
            **self.options,
            **arguments,
            label_smoothing=self.label_smoothing,
            straight_through=self.straight_through,
            sync_statistics=False,
            process_group=self.process_group,
            centres=False,
        )
        with torch.no_grad():
            for name, buffer in self.named_buffers():
                setattr(rule, name, buffer.detach().clone())
        return rule

    def extra_repr(self) -> str:
        options = ", ".join(f"{key}={value}" for key, value in self.options.items())
        return f"{super().extra_repr()}, {options}"


@register_head(
    "adaface",
    options=(
        Option("m", 0.4, Number(low=0.0)),
        Option("h", 0.333, Number(low=0.0)),
        Option("t_alpha", 0.01, Number(low=0.0, high=1.0)),
    ),
    formula="cos(theta - m ms) - (m + m ms), ms = clip(h (|x| - mean) / (std + 1e-3), -1, 1).",
    adaptive=True,
)
class AdaFace(AdaptiveMarginHead):
    """AdaFace (Kim et al., CVPR 2022): the feature norm, a proxy for image quality, sets the margin.

    ``ms = clip(h (|x| - mean) / (std + 1e-3), -1, 1)`` with the norm detached and clipped to
    [0.001, 100]; angular margin ``m2 = -m ms``, additive ``m3 = m + m ms``. ``batch_mean`` and
    ``batch_std`` (buffers, 20 and 100 at the start, as the reference) are EMAs with weight
    ``t_alpha`` of the batch's mean and unbiased std of the norms, updated before ``ms`` is taken."""

    EPS = 1e-3

    @classmethod
    def margin_spec(cls, s, options):
        return MarginSpec.cosface(s, options["m"])  # ms = 0: no angular part

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        s: float = 64.0,
        m: float = 0.4,
        h: float = 0.333,
        t_alpha: float = 0.01,
        **kw,
    ):
        m = ops.check_number("m", m, low=0.0)
        h = ops.check_number("h", h, low=0.0)
        t_alpha = ops.check_number("t_alpha", t_alpha, low=0.0)
        if t_alpha > 1.0:
            raise ValueError(f"t_alpha must be in [0, 1], got {t_alpha}")
        options = {"m": m, "h": h, "t_alpha": t_alpha}
        super().__init__(embedding_dim, num_classes, s, options, **kw)
        self.m, self.h, self.t_alpha = m, h, t_alpha
        self.register_buffer("batch_mean", torch.full((), 20.0))
        self.register_buffer("batch_std", torch.full((), 100.0))

    def margin_scaler(self, x: torch.Tensor, update: bool) -> torch.Tensor:
        """``ms`` per row (in the buffers' dtype), updating the EMA first when ``update``."""
        norms = x.detach().to(self.batch_mean.dtype).norm(dim=1).clamp(0.001, 100.0)
        if update:
            group = self.statistics_group()
            if group is None:
                mean = norms.mean()
                std = norms.std() if norms.numel() > 1 else torch.zeros_like(self.batch_std)
            else:
                mean, std = _global_mean_std(norms, group)
            self.batch_mean.lerp_(mean.to(self.batch_mean.dtype), self.t_alpha)
            self.batch_std.lerp_(std.to(self.batch_std.dtype), self.t_alpha)
        scaled = self.h * (norms - self.batch_mean) / (self.batch_std + self.EPS)
        return scaled.clamp(-1.0, 1.0)

    def per_row_margins(self, x, rows, labels, update):
        ms = self.margin_scaler(x, update).to(rows.dtype)
        return {"m2": -self.m * ms, "m3": self.m + self.m * ms}, None


def _elastic_options(m: float) -> tuple[Option, ...]:
    return (
        Option("m", m, Number(low=0.0)),
        Option("std", 0.05, Number(low=0.0)),
        Option("plus", False, Flag()),
    )


class _ElasticFace(AdaptiveMarginHead):
    """ElasticFace (Boutros et al., CVPRW 2022): a margin drawn per row from N(m, std) in training.

    Draws come from the head's own generator (seeded by ``seed``; None: a seed drawn from torch's
    global generator, so ``torch.manual_seed`` fixes it); its state is the module's extra state, so
    checkpoints carry it and a resumed run draws what an uninterrupted one would. With ``plus``, the
    drawn margins are sorted ascending and row ``i`` takes the one at the position of row ``i`` in
    the descending order of the target cosines (``margin[argsort(-cos_y)]``, as the reference
    indexes). Evaluation uses the mean ``m``."""

    margin_key: str  # "m2" (arc) or "m3" (cos)

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        s: float,
        m: float,
        std: float,
        plus: bool = False,
        seed: int | None = None,
        **kw,
    ):
        m = ops.check_number("m", m, low=0.0)
        std = ops.check_number("std", std, low=0.0)
        if not isinstance(plus, bool):
            raise TypeError(f"plus must be true or false, got {plus!r}")
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        elif isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0 or None, got {seed!r}")
        options = {"m": m, "std": std, "plus": plus}
        super().__init__(embedding_dim, num_classes, s, options, **kw)
        self.m, self.std, self.plus = m, std, plus
        self.generator = torch.Generator().manual_seed(seed)

    def get_extra_state(self) -> torch.Tensor:
        return self.generator.get_state()

    def margin_rule(self) -> _ElasticFace:
        rule = super().margin_rule(seed=0)  # no draw from torch's generator: the state follows
        rule.generator.set_state(self.generator.get_state())
        return rule

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state.cpu())

    def draw_margins(self, rows: RowContext, labels: torch.Tensor) -> torch.Tensor:
        """One margin per row from N(m, std) (on the CPU generator, so every device draws alike)."""
        margins = torch.normal(self.m, self.std, (labels.shape[0],), generator=self.generator)
        margins = margins.to(device=rows.device, dtype=rows.dtype)
        if self.plus:
            valid = (labels >= 0).nonzero().squeeze(1)
            order = rows.target_cos()[valid].argsort(descending=True, stable=True)
            margins = margins.clone()
            margins[valid] = margins[valid].sort().values[order]
        return margins

    def per_row_margins(self, x, rows, labels, update):
        if not update:
            return {}, None  # the mean margin (the head's MarginSpec)
        return {self.margin_key: self.draw_margins(rows, labels)}, None


@register_head(
    "elasticface_arc",
    options=_elastic_options(0.5),
    formula="cos(theta + m_i), m_i ~ N(m, std) per sample.",
    adaptive=True,
)
class ElasticArcFace(_ElasticFace):
    """ElasticFace-Arc: ``cos(theta + m_i)``, ``m_i ~ N(0.5, 0.05)``."""

    margin_key = "m2"

    def __init__(self, embedding_dim, num_classes, s=64.0, m=0.5, std=0.05, plus=False, **kw):
        super().__init__(embedding_dim, num_classes, s, m, std, plus, **kw)


@register_head(
    "elasticface_cos",
    options=_elastic_options(0.35),
    formula="cos(theta) - m_i, m_i ~ N(m, std) per sample.",
    adaptive=True,
)
class ElasticCosFace(_ElasticFace):
    """ElasticFace-Cos: ``cos(theta) - m_i``, ``m_i ~ N(0.35, 0.05)``."""

    margin_key = "m3"

    @classmethod
    def margin_spec(cls, s, options):
        return MarginSpec.cosface(s, options["m"])

    def __init__(self, embedding_dim, num_classes, s=64.0, m=0.35, std=0.05, plus=False, **kw):
        super().__init__(embedding_dim, num_classes, s, m, std, plus, **kw)


def _global_mean_std(values: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased std of ``values`` over every rank of ``group`` (count, sum and sum of
    squares all-reduced, in fp64); std 0 for fewer than two values in all."""
    work = values.double()
    sums = torch.stack([work.new_tensor(float(work.numel())), work.sum(), work.square().sum()])
    count, total, squares = sharded.all_reduce_sum(sums, group)
    mean = total / count
    variance = (
        (squares - count * mean * mean) / (count - 1) if count > 1 else torch.zeros_like(mean)
    )
    return mean, variance.clamp(min=0.0).sqrt()


def magface_min_lambda_g(s: float, l_a: float, u_a: float, l_m: float, u_m: float) -> float:
    """The smallest ``lambda_g`` for which MagFace's loss has a unique optimal norm (its paper's
    Theorem 1; its trainer prints it): ``s k u_a^2 l_a^2 / (u_a^2 - l_a^2)``, ``k`` the margin's
    slope ``(u_m - l_m) / (u_a - l_a)``. About 22.6 for the defaults (s = 64)."""
    slope = (u_m - l_m) / (u_a - l_a)
    return s * slope * u_a**2 * l_a**2 / (u_a**2 - l_a**2)


@register_head(
    "magface",
    options=(
        Option("l_a", 10.0, Number(low=0.0, low_open=True)),
        Option("u_a", 110.0, Number(low=0.0, low_open=True)),
        Option("l_m", 0.45, Number(low=0.0)),
        Option("u_m", 0.8, Number(low=0.0)),
        Option("lambda_g", 35.0, Number(low=0.0)),
    ),
    formula="cos(theta + m(a)) + lambda_g g(a), a = clamp(|x|, l_a, u_a).",
    adaptive=True,
)
class MagFace(AdaptiveMarginHead):
    """MagFace (Meng et al., CVPR 2021): an ArcFace margin linear in the clamped feature norm
    ``a = clamp(|x|, l_a, u_a)``, from ``l_m`` at ``l_a`` to ``u_m`` at ``u_a``, plus ``lambda_g g(a)``
    with ``g(a) = a / u_a^2 + 1 / a``. The margin is not detached: its gradient reaches the norm
    (the ops return d loss / d m2). The embedding must be unnormalised (our backbones end in a
    BatchNorm1d, as insightface's). A ``lambda_g`` below :func:`magface_min_lambda_g` is refused."""

    @classmethod
    def margin_spec(cls, s, options):
        return MarginSpec.arcface(s, options["u_m"])  # its largest margin

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        s: float = 64.0,
        l_a: float = 10.0,
        u_a: float = 110.0,
        l_m: float = 0.45,
        u_m: float = 0.8,
        lambda_g: float = 35.0,
        **kw,
    ):
        l_a = ops.check_number("l_a", l_a, low=0.0, strict=True)
        u_a = ops.check_number("u_a", u_a, low=0.0, strict=True)
        l_m = ops.check_number("l_m", l_m, low=0.0)
        u_m = ops.check_number("u_m", u_m, low=0.0)
        lambda_g = ops.check_number("lambda_g", lambda_g, low=0.0)
        if u_a <= l_a:
            raise ValueError(f"u_a must be > l_a = {l_a}, got {u_a}")
        if u_m < l_m:
            raise ValueError(f"u_m must be >= l_m = {l_m}, got {u_m}")
        s = ops.check_number("s", s, low=0.0, strict=True)
        bound = magface_min_lambda_g(s, l_a, u_a, l_m, u_m)
        if lambda_g < bound:
            raise ValueError(
                f"lambda_g must be >= {bound:.4g} for s = {s}, l_a = {l_a}, u_a = {u_a}, "
                f"l_m = {l_m}, u_m = {u_m} (MagFace's lower bound s k u_a^2 l_a^2 / (u_a^2 - "
                f"l_a^2), k = (u_m - l_m) / (u_a - l_a), below which the optimal norm is not "
                f"unique), got {lambda_g}"
            )
        options = {"l_a": l_a, "u_a": u_a, "l_m": l_m, "u_m": u_m, "lambda_g": lambda_g}
        super().__init__(embedding_dim, num_classes, s, options, **kw)
        self.l_a, self.u_a, self.l_m, self.u_m, self.lambda_g = l_a, u_a, l_m, u_m, lambda_g

    def per_row_margins(self, x, rows, labels, update):
        norms = x.to(rows.dtype).norm(dim=1).clamp(self.l_a, self.u_a)
        margins = (self.u_m - self.l_m) / (self.u_a - self.l_a) * (norms - self.l_a) + self.l_m
        regulariser = norms / self.u_a**2 + 1.0 / norms
        return {"m2": margins}, self.lambda_g * regulariser


@register_head(
    "curricularface",
    options=(Option("m", 0.5, Number(low=0.0)),),
    formula="cos(theta + m); hard negatives cos_j (t + cos_j).",
    adaptive=True,
)
class CurricularFace(AdaptiveMarginHead):
    """CurricularFace (Huang et al., CVPR 2020): ArcFace ``cos(theta + m)`` for the target; a
    non-target ``cos_j`` above the target's ``f_y`` becomes ``cos_j (t + cos_j)``. ``t`` (a buffer, 0
    at the start) is the EMA, momentum 0.01, of the batch's mean target cosine, updated before use
    as in the reference, and passed to the ops detached."""

    MOMENTUM = 0.01

    def __init__(self, embedding_dim: int, num_classes: int, s: float = 64.0, m: float = 0.5, **kw):
        m = ops.check_number("m", m, low=0.0)
        super().__init__(embedding_dim, num_classes, s, {"m": m}, **kw)
        self.register_buffer("t", torch.zeros(()))

    def per_row_margins(self, x, rows, labels, update):
        if update:
            has_target = labels >= 0
            group = self.statistics_group()
            if group is None:
                if bool(has_target.any()):
                    mean = rows.target_cos()[has_target].to(self.t.dtype).mean()
                    self.t.lerp_(mean, self.MOMENTUM)
            else:
                target = torch.where(has_target, rows.target_cos().double(), 0.0)
                count, total = sharded.all_reduce_sum(
                    torch.stack([has_target.sum().double(), target.sum()]), group
                )
                if count > 0:
                    self.t.lerp_((total / count).to(self.t.dtype), self.MOMENTUM)
        return {"negative_t": float(self.t)}, None


@register_head(
    "subcenter_arcface",
    options=(Option("m", 0.5, Number(low=0.0)), Option("k", 3, Integer(low=1))),
    formula="cos(theta + m) on the max over k sub-centres per class.",
    adaptive=True,
)
class SubCenterArcFace(AdaptiveMarginHead):
    """Sub-center ArcFace (Deng et al., ECCV 2020): ``K`` centres per class, laid out class-major
    (row ``c K + k`` of ``weight``, as insightface); a class's cosine is the max over its ``K``
    sub-centres, then the ArcFace margin.

    Inference uses that max by default. :meth:`keep_dominant` picks, per class, the sub-centre that
    most of the given training samples are closest to (the ``dominant`` buffer, saved in the model
    file); from then on :meth:`cosine` (training and inference) uses that one sub-centre per class."""

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        s: float = 64.0,
        m: float = 0.5,
        k: int = 3,
        **kw,
    ):
        m = ops.check_number("m", m, low=0.0)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        super().__init__(embedding_dim, num_classes, s, {"m": m, "k": k}, **kw)
        self.k = self.centres_per_class = k
        if self.weight is not None:  # a head with centres (not a sharded head's rule)
            weight, self.kept_classes = draw_centres(num_classes, k, self.embedding_dim)
            self.weight = torch.nn.Parameter(weight)
        self.register_buffer("dominant", torch.full((num_classes,), -1, dtype=torch.int64))
        # Mirrors "dominant is set" on the host, so that cosine() never reads the buffer back from
        # the device (a sync per call on a GPU, a constant baked in by tracing).
        self.uses_dominant = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.uses_dominant = bool((self.dominant >= 0).all())

    def subcenter_cosine(self, x: torch.Tensor) -> torch.Tensor:
        """Cosines with every sub-centre: (B, D) -> (B, C, K)."""
        self.check_x(x)
        weight = self.weight.to(x.dtype) if x.dtype != self.weight.dtype else self.weight
        cos = F.linear(F.normalize(x, dim=1), F.normalize(weight, dim=1))
        return cos.view(x.shape[0], self.num_classes, self.k)

    def cosine(self, x: torch.Tensor) -> torch.Tensor:
        cos = self.subcenter_cosine(x)
        if self.uses_dominant:
            index = self.dominant.view(1, -1, 1).expand(cos.shape[0], -1, 1)
            return cos.gather(2, index).squeeze(2)
        return cos.amax(dim=2)

    @torch.no_grad()
    def keep_dominant(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Set (and return) each class's dominant sub-centre: the one most of its samples in
        ``embeddings`` are closest to (sub-centre 0 for a class without samples)."""
        if labels.shape != (embeddings.shape[0],):
            raise ValueError(
                f"labels must have shape ({embeddings.shape[0]},), got {tuple(labels.shape)}"
            )
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"labels must be in [0, {self.num_classes}), got {labels.tolist()}")
        own = self.subcenter_cosine(embeddings)[torch.arange(labels.shape[0]), labels]
        votes = torch.bincount(
            labels * self.k + own.argmax(dim=1), minlength=self.num_classes * self.k
        )
        self.dominant.copy_(votes.view(self.num_classes, self.k).argmax(dim=1))
        self.uses_dominant = True
        return self.dominant.clone()

    def per_row_margins(self, x, rows, labels, update):
        return {}, None


ADAPTIVE_HEADS: dict[str, type[AdaptiveMarginHead]] = {
    name: head.cls for name, head in HEADS.items() if head.adaptive
}


def build_adaptive_head(
    type_name: str, embedding_dim: int, num_classes: int, *, s: float, options: dict, **kw
) -> AdaptiveMarginHead:
    """The head of ``type_name`` with scale ``s`` and its ``options`` (as a model file stores them)."""
    if type_name not in ADAPTIVE_HEADS:
        raise ValueError(f"type must be one of {', '.join(ADAPTIVE_HEADS)}, got {type_name!r}")
    return ADAPTIVE_HEADS[type_name](embedding_dim, num_classes, s=s, **dict(options), **kw)
