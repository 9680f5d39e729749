"""The ``heads`` section: each ``heads.<name>`` is a margin head, whose fields depend on its
``type``, or a ``joint`` group of heads sharing one backbone; validated, :attr:`Params.heads`
holds one :class:`TrainItem` per name (:data:`HeadEntries`)."""

import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import torch
from pydantic import (
    AfterValidator,
    BeforeValidator,
    Discriminator,
    Field,
    Tag,
    model_validator,
)

from angular.config.items import HeadConfig, TrainItem
from angular.config.rules import TAG, Section, describe, flag, integer, must, number, problem
from angular.nn.adaptive import ADAPTIVE_HEADS, build_adaptive_head
from angular.nn.heads import PRESETS, LambdaSchedule, MarginSpec

HEAD_TYPES = (*PRESETS, *ADAPTIVE_HEADS)  # arcface, cosface, sphereface, combined, adaface, ...
JOINT = "joint"
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
_HEAD_NAMES = Field(
    json_schema_extra={"propertyNames": {"pattern": _NAME.pattern}, "minProperties": 1}
)


class _Head(Section):
    type: str
    s: number(0.0, low_open=True)
    straight_through: flag() = False  # d f_y / d cos_y = 1
    # The loss by angular.ops.linear_margin_cross_entropy (no B x C buffer); null: from
    # angular.nn.heads.FUSED_LINEAR_MIN_CLASSES classes on.
    fused_linear: must(Annotated[bool, Field(strict=True)], "true or false", optional=True) = None

    def config(self, name: str) -> HeadConfig:
        return HeadConfig(
            name=name,
            type=self.type,
            margin=self.margin(),
            straight_through=self.straight_through,
            fused_linear=self.fused_linear,
            options=self.options(),
        )

    def options(self) -> dict[str, Any]:
        return {}


class ArcFaceHead(_Head):
    """cos(theta + m)."""

    type: Literal["arcface"]
    m: number(0.0)

    def margin(self) -> MarginSpec:
        return MarginSpec.arcface(self.s, self.m)


class CosFaceHead(_Head):
    """cos(theta) - m."""

    type: Literal["cosface"]
    m: number(0.0)

    def margin(self) -> MarginSpec:
        return MarginSpec.cosface(self.s, self.m)


class SphereFaceLambda(Section):
    """lam = max(min, base (1 + gamma step)^-power)."""

    base: number(0.0)
    gamma: number(0.0)
    power: number(0.0)
    min: number(0.0)


class SphereFaceHead(_Head):
    """cos(m theta), annealed by lam."""

    type: Literal["sphereface"]
    m: number(0.0, low_open=True)
    lam: SphereFaceLambda

    def margin(self) -> MarginSpec:
        lam = self.lam
        schedule = LambdaSchedule(lam.base, lam.gamma, lam.power, lam.min)
        return MarginSpec.sphereface(self.s, self.m, schedule)


class CombinedHead(_Head):
    """cos(m1 theta + m2) - m3."""

    type: Literal["combined"]
    m1: number(0.0, low_open=True)
    m2: number(0.0)
    m3: number()

    def margin(self) -> MarginSpec:
        return MarginSpec.combined(self.s, self.m1, self.m2, self.m3)


def _by_type(value) -> str | None:
    return f"{TAG}{value['type']}" if isinstance(value, Mapping) and "type" in value else None


def _typed(types: tuple[str, ...]) -> BeforeValidator:
    """A mapping whose ``type`` is one of ``types`` (checked before the member is picked by it)."""

    def check(value):
        if not isinstance(value, Mapping):
            raise problem(f"must be a mapping, got {describe(value)}")
        if "type" not in value:
            raise problem("missing (every key of params.yaml is required)", "type")
        if value["type"] == JOINT and JOINT not in types:
            raise problem("a joint group cannot contain a joint", "type")
        if value["type"] not in types:
            raise problem(
                f"must be one of {', '.join(types)}, got {describe(value['type'])}", "type"
            )
        return value

    return BeforeValidator(check)


def _head_names(empty: str) -> BeforeValidator:
    def check(value):
        if not isinstance(value, Mapping):
            raise problem(f"must be a mapping, got {describe(value)}")
        if not value:
            raise problem(empty)
        for name in value:
            if not (isinstance(name, str) and _NAME.match(name)):
                raise problem(
                    f"a head name {name!r} must start with a letter and use only letters, "
                    "digits, _ and -",
                    name,
                )
        return value

    return BeforeValidator(check)


class _AdaptiveHead(_Head):
    """A head of angular.nn.adaptive: its fields besides type, s, straight_through and
    fused_linear are its constructor's options, which it checks itself (e.g. MagFace's lambda_g
    bound)."""

    def options(self) -> dict[str, Any]:
        return self.model_dump(exclude={"type", "s", "straight_through", "fused_linear"})

    def margin(self) -> MarginSpec:
        return ADAPTIVE_HEADS[self.type].margin_spec(self.s, self.options())

    @model_validator(mode="after")
    def _head_accepts(self):
        if self.fused_linear:
            raise problem(
                "must be false or null for an adaptive head (its per-row margins need the "
                "(B, C) cosines), got True",
                "fused_linear",
            )
        options = self.options()
        try:
            with torch.random.fork_rng(devices=[]):  # ElasticFace seeds itself from torch's RNG
                build_adaptive_head(self.type, 1, 1, s=self.s, options=options)
        except (TypeError, ValueError) as error:
            key, _, wrong = str(error).partition(" ")
            raise problem(wrong, key) if key in options else problem(str(error)) from None
        return self


class AdaFaceHead(_AdaptiveHead):
    """cos(theta - m ms) - (m + m ms), ms = clip(h (|x| - mean) / (std + 1e-3), -1, 1)."""

    type: Literal["adaface"]
    m: number(0.0)
    h: number(0.0)
    t_alpha: number(0.0, 1.0)


class ElasticArcFaceHead(_AdaptiveHead):
    """cos(theta + m_i), m_i ~ N(m, std) per sample."""

    type: Literal["elasticface_arc"]
    m: number(0.0)
    std: number(0.0)
    plus: flag()


class ElasticCosFaceHead(_AdaptiveHead):
    """cos(theta) - m_i, m_i ~ N(m, std) per sample."""

    type: Literal["elasticface_cos"]
    m: number(0.0)
    std: number(0.0)
    plus: flag()


class MagFaceHead(_AdaptiveHead):
    """cos(theta + m(a)) + lambda_g g(a), a = clamp(|x|, l_a, u_a)."""

    type: Literal["magface"]
    l_a: number(0.0, low_open=True)
    u_a: number(0.0, low_open=True)
    l_m: number(0.0)
    u_m: number(0.0)
    lambda_g: number(0.0)


class CurricularFaceHead(_AdaptiveHead):
    """cos(theta + m); hard negatives cos_j (t + cos_j)."""

    type: Literal["curricularface"]
    m: number(0.0)


class SubCenterArcFaceHead(_AdaptiveHead):
    """cos(theta + m) on the max over k sub-centres per class."""

    type: Literal["subcenter_arcface"]
    m: number(0.0)
    k: integer(1)


_MARGIN_HEADS = (
    Annotated[ArcFaceHead, Tag(f"{TAG}arcface")]
    | Annotated[CosFaceHead, Tag(f"{TAG}cosface")]
    | Annotated[SphereFaceHead, Tag(f"{TAG}sphereface")]
    | Annotated[CombinedHead, Tag(f"{TAG}combined")]
    | Annotated[AdaFaceHead, Tag(f"{TAG}adaface")]
    | Annotated[ElasticArcFaceHead, Tag(f"{TAG}elasticface_arc")]
    | Annotated[ElasticCosFaceHead, Tag(f"{TAG}elasticface_cos")]
    | Annotated[MagFaceHead, Tag(f"{TAG}magface")]
    | Annotated[CurricularFaceHead, Tag(f"{TAG}curricularface")]
    | Annotated[SubCenterArcFaceHead, Tag(f"{TAG}subcenter_arcface")]
)
MarginHeadSpec = Annotated[_MARGIN_HEADS, Discriminator(_by_type), _typed(HEAD_TYPES)]


class JointGroup(Section):
    """Heads trained together on one shared backbone (losses summed); each joins the ensemble as
    ``<group>_<head>``."""

    type: Literal["joint"]
    heads: Annotated[
        dict[str, MarginHeadSpec], _head_names("a joint group needs at least one head"), _HEAD_NAMES
    ]


HeadSpec = Annotated[
    _MARGIN_HEADS | Annotated[JointGroup, Tag(f"{TAG}{JOINT}")],
    Discriminator(_by_type),
    _typed((*HEAD_TYPES, JOINT)),
]


def _train_items(entries: dict[str, Any]) -> dict[str, TrainItem]:
    items = {}
    for name, entry in entries.items():
        if isinstance(entry, JointGroup):
            heads = {
                f"{name}_{member}": head.config(member) for member, head in entry.heads.items()
            }
        else:
            heads = {name: entry.config(name)}
        items[name] = TrainItem(name=name, joint=isinstance(entry, JointGroup), heads=heads)
    return items


# --------------------------------------------------------------------------------------------------
# train


# Params.heads: the file's heads.<name> entries; validated, one TrainItem per name.
HeadEntries = Annotated[
    dict[str, HeadSpec],
    _head_names("must define at least one head"),
    _HEAD_NAMES,
    AfterValidator(_train_items),
]
