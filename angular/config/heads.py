"""The ``heads`` section: each ``heads.<name>`` is a margin head, whose fields depend on its
``type``, or a ``joint`` group of heads sharing one backbone; validated, :attr:`Params.heads`
holds one :class:`TrainItem` per name (:data:`HeadEntries`).

The head models are generated from the head registry (:data:`angular.nn.registry.HEADS`), one per
registered type and in its order: ``type``, ``s``, ``straight_through`` and ``fused_linear``, then
the type's options, each typed by its rule (:func:`field_type`), the model described by the type's
formula. A new head registered in angular.nn appears here and in the JSON schema by itself.
"""

import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Union

import torch
from pydantic import (
    AfterValidator,
    BeforeValidator,
    Discriminator,
    Field,
    Tag,
    create_model,
    model_validator,
)

from angular.config.items import HeadConfig, TrainItem
from angular.config.rules import TAG, Section, describe, flag, integer, must, number, problem
from angular.nn import HEADS, build_adaptive_head
from angular.nn.heads import MarginSpec
from angular.nn.registry import Flag, Group, HeadType, Integer, Number

HEAD_TYPES = tuple(HEADS)  # arcface, cosface, sphereface, combined, adaface, ...
JOINT = "joint"
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
_HEAD_NAMES = Field(
    json_schema_extra={"propertyNames": {"pattern": _NAME.pattern}, "minProperties": 1}
)
_COMMON = ("type", "s", "straight_through", "fused_linear")


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
            options=self.options() if HEADS[self.type].adaptive else {},
        )

    def options(self) -> dict[str, Any]:
        """The type's registered options, as the head's constructor takes them."""
        return self.model_dump(exclude=set(_COMMON))

    def margin(self) -> MarginSpec:
        return HEADS[self.type].margin(self.s, self.options())


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
    """A head of angular.nn.adaptive: its options are its constructor's, which it checks itself
    (e.g. MagFace's lambda_g bound)."""

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


def field_type(rule: Number | Integer | Flag | Group) -> Any:
    """The config's field type (with its error wording) for a registered option's rule."""
    if isinstance(rule, Number):
        return number(rule.low, rule.high, low_open=rule.low_open, high_open=rule.high_open)
    if isinstance(rule, Integer):
        return integer(rule.low)
    if isinstance(rule, Flag):
        return flag()
    fields = {option.name: (field_type(option.rule), ...) for option in rule.options}
    return create_model(
        rule.title, __base__=Section, __doc__=rule.doc, __module__=__name__, **fields
    )


def head_model(head: HeadType) -> type[_Head]:
    """The config model of a registered head type: every option required."""
    fields = {option.name: (field_type(option.rule), ...) for option in head.options}
    return create_model(
        head.title,
        __base__=_AdaptiveHead if head.adaptive else _Head,
        __doc__=head.formula,
        __module__=__name__,
        type=(Literal[head.name], ...),
        **fields,
    )


HEAD_MODELS = {name: head_model(head) for name, head in HEADS.items()}
_MARGIN_HEADS = Union[  # noqa: UP007 (a union of a computed tuple)
    tuple(Annotated[model, Tag(f"{TAG}{name}")] for name, model in HEAD_MODELS.items())
]
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


# The generated models under the names angular.config exports.
ArcFaceHead = HEAD_MODELS["arcface"]
CosFaceHead = HEAD_MODELS["cosface"]
SphereFaceHead = HEAD_MODELS["sphereface"]
SphereFaceLambda = SphereFaceHead.model_fields["lam"].annotation
CombinedHead = HEAD_MODELS["combined"]
AdaFaceHead = HEAD_MODELS["adaface"]
ElasticArcFaceHead = HEAD_MODELS["elasticface_arc"]
ElasticCosFaceHead = HEAD_MODELS["elasticface_cos"]
MagFaceHead = HEAD_MODELS["magface"]
CurricularFaceHead = HEAD_MODELS["curricularface"]
SubCenterArcFaceHead = HEAD_MODELS["subcenter_arcface"]
