"""The one typed, validated loader of ``params.yaml`` (docs/design.md, Pipeline).

:func:`load_params` reads the file as DVC does (YAML 1.2) and validates it with the pydantic models
below, one per section, into a frozen :class:`Params`. Every key is required (the shipped
``params.yaml`` is the single place where the experiment's numbers live, and DVC needs each key a
stage reads to exist there), except a head's ``straight_through`` (default ``false``) and
``fused_linear`` (default ``null``), ``data.max_images_per_class`` and ``data.crop`` (default
``null``), and
``evaluate.verification.pairs_file`` and ``pairs_root`` (default ``null``),
``evaluate.unknown_far`` (default ``0.05``) and ``flip_test`` (default ``false``), and
``tracking.register_model`` (default ``null``). An
unknown key, a missing key or a bad value raises :class:`ConfigError`, whose message starts with
the dotted key, e.g. ``train.epochs: must be an integer >= 1, got 0``.

Sections: ``data`` (read by prepare, and the image format by train), ``model``, ``heads``
(``heads.<name>`` is a margin head, or a ``joint`` group of heads sharing one backbone), ``train``,
``calibrate``, ``evaluate``, ``tracking``. ``params.yaml`` documents each key.

Adding a key: one line in its section's model, typed with a helper that states the rule and the
wording of its error, e.g. ``patience: integer(low=1)``, ``on_collapse: choice("stop", "warn")``,
``margin: number(0.0, 1.0, high_open=True)``, ``name: text(optional=True)``, ``enabled: flag()``
(``= default`` only for a key older files may lack). A rule between keys goes in the model's
``@model_validator(mode="after")`` and raises ``_problem("must be ...", "key")``. Then give the key
its value (and a comment) in ``params.yaml``, ``experiments/faces/params.yaml`` and
``experiments/lfw-dev/params.yaml``, regenerate the
JSON schema editors check the file with (``python -m angular.config --schema >
params.schema.json``), and list its bad values in tests/config/test_config_errors.py.
"""

import dataclasses
import json
import math
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    WrapValidator,
    field_validator,
    model_validator,
)
from pydantic.json_schema import GenerateJsonSchema
from pydantic_core import PydanticCustomError

from angular.eval.ensemble import MEMBER_RULES, RULES
from angular.nn.adaptive import ADAPTIVE_HEADS, build_adaptive_head
from angular.nn.backbones import BACKBONES, FACE_BACKBONES, MIN_FACE_INPUT
from angular.nn.heads import PRESETS, LambdaSchedule, MarginSpec

SOURCES = ("digits", "imagefolder")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "step", "constant")
SMOOTHING_MODES = ("all", "others")
NONFINITE_POLICIES = ("stop", "skip")
COLLAPSE_POLICIES = ("stop", "warn")
DEVICES = ("auto", "cpu", "cuda")
CALIBRATION_METHODS = ("fit", "fixed")
HEAD_TYPES = (*PRESETS, *ADAPTIVE_HEADS)  # arcface, cosface, sphereface, combined, adaface, ...
JOINT = "joint"
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
SCHEMA_FILE = "params.schema.json"


class ConfigError(ValueError):
    """A bad ``params.yaml``: ``key`` is the dotted key, the message says what is wrong with it."""

    def __init__(self, key: str, problem: str):
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}" if key else problem)


# --------------------------------------------------------------------------------------------------
# Field types. Each helper is the type pydantic checks (and writes into the JSON schema) plus the
# plain words of its error, so that a message reads `train.epochs: must be an integer >= 1, got 0`
# rather than pydantic's own.


def _describe(value) -> str:
    return f"{value!r} ({type(value).__name__})" if isinstance(value, str) else repr(value)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _problem(text: str, *at: str | int) -> PydanticCustomError:
    """An error with our wording; ``at`` names the key below the one being validated, if any."""
    return PydanticCustomError("params", "{text}", {"text": text, "at": at})


def _must(base: Any, requirement: str, *, optional: bool = False, show=_describe) -> Any:
    """``base``, where any failure reads ``must be <requirement>, got <value>``."""
    if optional:
        base, requirement = base | None, f"{requirement} (or null)"

    def check(value, handler):
        try:
            return handler(value)
        except ValidationError:
            raise _problem(f"must be {requirement}, got {show(value)}") from None

    return Annotated[base, WrapValidator(check)]


def integer(low: int | None = None, *, optional: bool = False) -> Any:
    """An int (not a bool, not 2.0)."""
    bound = "" if low is None else f" >= {low}"
    strict = Annotated[int, Field(strict=True, ge=low)]
    return _must(strict, f"an integer{bound}", optional=optional)


def number(low=None, high=None, *, low_open=False, high_open=False, optional=False) -> Any:
    """A finite int or float (not a bool, not a string) in the range; stored as a float."""
    bounds = {"gt" if low_open else "ge": low, "lt" if high_open else "le": high}
    strict = Annotated[float, Field(strict=True, allow_inf_nan=False, **bounds)]
    if low is not None and high is not None:
        words = (
            f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        )
    elif low is not None:
        words = f"a number {'>' if low_open else '>='} {low:g}"
    elif high is not None:
        words = f"a number {'<' if high_open else '<='} {high:g}"
    else:
        words = "a finite number"
    return _must(strict, words, optional=optional)


def flag() -> Any:
    """true or false (YAML 1.2: not yes/no/on/off, not 0/1)."""
    return _must(Annotated[bool, Field(strict=True)], "true or false")


def text(*, optional: bool = False) -> Any:
    """A string with something besides blanks."""
    strict = Annotated[str, Field(strict=True, pattern=r"\S")]
    return _must(strict, "a non-empty string", optional=optional, show=repr)


def choice(*options, requirement: str | None = None) -> Any:
    """One of ``options``, of the same type (``channels: true`` is not 1)."""
    requirement = requirement or f"one of {', '.join(map(str, options))}"

    def check(value, handler):
        if not any(type(value) is type(option) and value == option for option in options):
            raise _problem(f"must be {requirement}, got {_describe(value)}")
        return handler(value)

    return Annotated[Literal[options], WrapValidator(check)]


_UNIQUE = Field(json_schema_extra={"uniqueItems": True})
_HEAD_NAMES = Field(
    json_schema_extra={"propertyNames": {"pattern": _NAME.pattern}, "minProperties": 1}
)


def _unique(what: str):
    def check(values):
        if len(set(values)) != len(values):
            raise _problem(f"lists {what} twice: {list(values)}")
        return values

    return AfterValidator(check)


class _Section(BaseModel):
    """A mapping of params.yaml: frozen, with only the keys its model declares."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _a_mapping_of_known_keys(cls, value):
        # Checked before the fields (pydantic's extra="forbid" alone would not list the known keys).
        if not isinstance(value, Mapping):
            raise _problem(f"must be a mapping, got {_describe(value)}")
        for key in value:
            if not isinstance(key, str):
                raise _problem(f"keys must be strings, got {key!r}")
            if key not in cls.model_fields:
                known = ", ".join(sorted(cls.model_fields))
                raise _problem(f"unknown key (known keys here: {known})", key)
        return value


# --------------------------------------------------------------------------------------------------
# data


def _unknown_identities(value):
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise _problem(f"a count must be >= 0, got {value}")
    elif _is_number(value):
        if not 0.0 < value < 1.0:
            raise _problem(f"a fraction must lie in (0, 1), got {value}")
    elif not (isinstance(value, list) and all(isinstance(n, str) and n for n in value)):
        raise _problem(
            "must be a count (integer >= 0), a fraction in (0, 1) or a list of identity names, "
            f"got {value!r}"
        )
    elif len(set(value)) != len(value):
        raise _problem(f"lists an identity twice: {value}")
    return value


class Crop(_Section):
    """``data.crop``: the region of each source image kept, before resizing: a ``box`` (left, top,
    right, bottom in source pixels, right and bottom exclusive) or the ``central`` fraction of its
    width and height."""

    box: tuple[int, int, int, int] | None = None
    central: float | None = None


_CROP_WORDS = (
    "null, a box [left, top, right, bottom] in source pixels (integers >= 0, left < right, "
    "top < bottom) or {central: f} with 0 < f <= 1"
)


def _crop(value):
    if value is None:
        return None
    if isinstance(value, list):
        whole = len(value) == 4 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        )
        if not whole or min(value) < 0 or value[0] >= value[2] or value[1] >= value[3]:
            raise _problem(f"must be {_CROP_WORDS}, got {value!r}")
        return {"box": tuple(value)}
    if isinstance(value, Mapping) and set(value) == {"central"}:
        fraction = value["central"]
        if not (_is_number(fraction) and 0.0 < fraction <= 1.0):
            raise _problem(f"central must be a fraction in (0, 1], got {fraction!r}")
        return {"central": float(fraction)}
    raise _problem(f"must be {_CROP_WORDS}, got {_describe(value)}")


_CROP_SCHEMA = WithJsonSchema(
    {
        "anyOf": [
            {"type": "null"},
            {
                "type": "array",
                "items": {"type": "integer", "minimum": 0},
                "minItems": 4,
                "maxItems": 4,
            },
            {
                "type": "object",
                "properties": {"central": {"type": "number", "exclusiveMinimum": 0, "maximum": 1}},
                "required": ["central"],
                "additionalProperties": False,
            },
        ]
    }
)


def _per_channel_schema(low: dict) -> WithJsonSchema:
    one = {"type": "number", **low}
    return WithJsonSchema({"anyOf": [one, {"type": "array", "items": one, "minItems": 1}]})


class DataConfig(_Section):
    """``data``: the images, their split and format (prepare; the format also train)."""

    source: choice(*SOURCES)
    path: text(optional=True)
    test_path: text(optional=True)
    unknown_identities: Annotated[
        Annotated[int, Field(strict=True, ge=0)]  # a count,
        | Annotated[float, Field(strict=True, gt=0, lt=1)]  # a fraction or names
        | Annotated[tuple[Annotated[str, Field(min_length=1)], ...], _UNIQUE],
        BeforeValidator(_unknown_identities),
    ]
    val_fraction: number(0.0, 1.0, low_open=True, high_open=True)
    test_fraction: number(0.0, 1.0, high_open=True)
    min_images_per_class: integer(1)
    skip_bad_images: flag()
    seed: integer(0)
    # A seeded choice of at most this many images of each identity, known or unknown, made before
    # splitting (None: every image).
    max_images_per_class: integer(1, optional=True) = None
    crop: Annotated[Crop | None, BeforeValidator(_crop), _CROP_SCHEMA] = None  # before resizing
    image_size: _must(
        tuple[Annotated[int, Field(strict=True, ge=1)], Annotated[int, Field(strict=True, ge=1)]],
        "[height, width], two integers >= 1",
        show=repr,
    )
    channels: choice(1, 3, requirement="1 (grey) or 3 (RGB)")
    # A number or one per channel; stored as one per channel.
    mean: Annotated[tuple[float, ...], _per_channel_schema({})]
    std: Annotated[tuple[float, ...], _per_channel_schema({"exclusiveMinimum": 0})]

    @field_validator("mean", "std", mode="before")
    @classmethod
    def _one_per_channel(cls, value, info: ValidationInfo):
        channels = info.data.get("channels", 1)  # absent when bad: its own error comes first
        positive = info.field_name == "std"
        values = value if isinstance(value, list) else [value]
        good = all(_is_number(v) and math.isfinite(v) and (v > 0 or not positive) for v in values)
        if not good or len(values) not in (1, channels):
            kind = "a positive number" if positive else "a number"
            raise _problem(
                f"must be {kind} or a list of {channels} (one per channel), got {value!r}"
            )
        return tuple(float(v) for v in values) * (channels if len(values) == 1 else 1)

    @model_validator(mode="after")
    def _sources_and_splits_agree(self):
        if self.source == "imagefolder" and self.path is None:
            raise _problem("required when data.source is imagefolder", "path")
        for name in ("path", "test_path"):
            if self.source != "imagefolder" and getattr(self, name) is not None:
                raise _problem(
                    f"only used when data.source is imagefolder (it is {self.source}); "
                    "set it to null",
                    name,
                )
        if self.val_fraction + self.test_fraction >= 1.0:
            raise _problem(
                "val_fraction + test_fraction must be < 1 (training needs images), got "
                f"{self.val_fraction} + {self.test_fraction}",
                "test_fraction",
            )
        if self.test_path is not None and self.test_fraction != 0.0:
            raise _problem(
                "must be 0 when data.test_path is set (the test images come from data.test_path)",
                "test_fraction",
            )
        if self.test_path is None and self.test_fraction == 0.0:
            raise _problem(
                "must be > 0 (the test split is drawn from data.path unless data.test_path is set)",
                "test_fraction",
            )
        return self


# --------------------------------------------------------------------------------------------------
# model


class SmallCnnOptions(_Section):
    """``model.small_cnn``: options of the small_cnn backbone (present, unused, for the resnets)."""

    width: integer(1)
    dropout: number(0.0, 1.0, high_open=True)
    blocks: integer(1)
    convs_per_block: integer(1)


class MobileFaceNetOptions(_Section):
    """``model.mobilefacenet``: options of the mobilefacenet backbone."""

    scale: integer(1)  # channel width multiplier: 1 is the paper's ~1M parameters


class IResNetOptions(_Section):
    """``model.iresnet``: options of the iresnet18/34/50 backbones."""

    dropout: number(0.0, 1.0, high_open=True)  # before the embedding FC (arcface_torch: 0)


class ModelConfig(_Section):
    """``model``: the backbone that maps an image to its embedding."""

    backbone: choice(*BACKBONES)
    embedding_dim: integer(1)
    small_cnn: SmallCnnOptions
    # Optional: files older than the face backbones lack them.
    mobilefacenet: MobileFaceNetOptions = MobileFaceNetOptions(scale=1)
    iresnet: IResNetOptions = IResNetOptions(dropout=0.0)

    @property
    def options(self) -> dict[str, Any]:
        """Keyword arguments of the backbone from this section (none for the torchvision resnets)."""
        if self.backbone == "small_cnn":
            return self.small_cnn.model_dump()
        if self.backbone == "mobilefacenet":
            return self.mobilefacenet.model_dump()
        if self.backbone.startswith("iresnet"):
            return self.iresnet.model_dump()
        return {}

    def backbone_kwargs(self, image_size=None) -> dict[str, Any]:
        """:attr:`options`, plus the ``input_size`` (``data.image_size``) a face backbone's
        embedding layer is built for."""
        if self.backbone in FACE_BACKBONES:
            if image_size is None:
                raise ValueError(f"image_size: required by the {self.backbone} backbone")
            return {**self.options, "input_size": list(image_size)}
        return dict(self.options)


# --------------------------------------------------------------------------------------------------
# heads: in the file, each ``heads.<name>`` is a head (its fields depend on its ``type``) or a joint
# group; validated, :attr:`Params.heads` holds one :class:`TrainItem` per name.


class HeadConfig(BaseModel):
    """One margin head: its preset ``type`` and the resolved margin ``(s, m1, m2, m3, lam)``."""

    model_config = ConfigDict(frozen=True)

    name: str
    type: str
    margin: MarginSpec
    straight_through: bool
    fused_linear: bool | None = None  # None: MarginHead decides by the class count
    options: dict[str, Any] = {}  # an adaptive head's other arguments (angular.nn.adaptive)

    def to_dict(self) -> dict[str, Any]:
        m, lam = self.margin, self.margin.lam_schedule
        schedule = None if lam is None else dataclasses.asdict(lam)
        margin = {"s": m.s, "m1": m.m1, "m2": m.m2, "m3": m.m3, "lam_schedule": schedule}
        return {
            "type": self.type,
            **margin,
            "straight_through": self.straight_through,
            "fused_linear": self.fused_linear,
            **({"options": dict(self.options)} if self.options else {}),
        }


class TrainItem(BaseModel):
    """What one ``train@<name>`` stage trains: one backbone with one head, or (``joint``) several
    heads on one shared backbone with their losses summed. ``heads`` maps each ensemble member's
    name to its head: the item's own name for a single head, ``<item>_<head>`` in a joint group."""

    model_config = ConfigDict(frozen=True)

    name: str
    joint: bool
    heads: dict[str, HeadConfig]


class _Head(_Section):
    type: str
    s: number(0.0, low_open=True)
    straight_through: flag() = False  # d f_y / d cos_y = 1
    # The loss by angular.ops.linear_margin_cross_entropy (no B x C buffer); null: from
    # angular.nn.heads.FUSED_LINEAR_MIN_CLASSES classes on.
    fused_linear: _must(Annotated[bool, Field(strict=True)], "true or false", optional=True) = None

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


class SphereFaceLambda(_Section):
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


_TAG = "type="  # pydantic puts the chosen union member's tag into an error's location: not a key


def _by_type(value) -> str | None:
    return f"{_TAG}{value['type']}" if isinstance(value, Mapping) and "type" in value else None


def _typed(types: tuple[str, ...]) -> BeforeValidator:
    """A mapping whose ``type`` is one of ``types`` (checked before the member is picked by it)."""

    def check(value):
        if not isinstance(value, Mapping):
            raise _problem(f"must be a mapping, got {_describe(value)}")
        if "type" not in value:
            raise _problem("missing (every key of params.yaml is required)", "type")
        if value["type"] == JOINT and JOINT not in types:
            raise _problem("a joint group cannot contain a joint", "type")
        if value["type"] not in types:
            raise _problem(
                f"must be one of {', '.join(types)}, got {_describe(value['type'])}", "type"
            )
        return value

    return BeforeValidator(check)


def _head_names(empty: str) -> BeforeValidator:
    def check(value):
        if not isinstance(value, Mapping):
            raise _problem(f"must be a mapping, got {_describe(value)}")
        if not value:
            raise _problem(empty)
        for name in value:
            if not (isinstance(name, str) and _NAME.match(name)):
                raise _problem(
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
            raise _problem(
                "must be false or null for an adaptive head (its per-row margins need the "
                "(B, C) cosines), got True",
                "fused_linear",
            )
        options = self.options()
        try:
            with torch.random.fork_rng(devices=[]):  # ElasticFace seeds itself from torch's RNG
                build_adaptive_head(self.type, 1, 1, s=self.s, options=options)
        except (TypeError, ValueError) as error:
            key, _, problem = str(error).partition(" ")
            raise _problem(problem, key) if key in options else _problem(str(error)) from None
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
    Annotated[ArcFaceHead, Tag(f"{_TAG}arcface")]
    | Annotated[CosFaceHead, Tag(f"{_TAG}cosface")]
    | Annotated[SphereFaceHead, Tag(f"{_TAG}sphereface")]
    | Annotated[CombinedHead, Tag(f"{_TAG}combined")]
    | Annotated[AdaFaceHead, Tag(f"{_TAG}adaface")]
    | Annotated[ElasticArcFaceHead, Tag(f"{_TAG}elasticface_arc")]
    | Annotated[ElasticCosFaceHead, Tag(f"{_TAG}elasticface_cos")]
    | Annotated[MagFaceHead, Tag(f"{_TAG}magface")]
    | Annotated[CurricularFaceHead, Tag(f"{_TAG}curricularface")]
    | Annotated[SubCenterArcFaceHead, Tag(f"{_TAG}subcenter_arcface")]
)
MarginHeadSpec = Annotated[_MARGIN_HEADS, Discriminator(_by_type), _typed(HEAD_TYPES)]


class JointGroup(_Section):
    """Heads trained together on one shared backbone (losses summed); each joins the ensemble as
    ``<group>_<head>``."""

    type: Literal["joint"]
    heads: Annotated[
        dict[str, MarginHeadSpec], _head_names("a joint group needs at least one head"), _HEAD_NAMES
    ]


HeadSpec = Annotated[
    _MARGIN_HEADS | Annotated[JointGroup, Tag(f"{_TAG}{JOINT}")],
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


class AugmentSpec(BaseModel):
    """One torchvision transform (``torchvision.transforms.v2.<name>(**kwargs)``), applied to each
    training image. Built (and its arguments checked) when training starts."""

    model_config = ConfigDict(frozen=True)

    name: str
    kwargs: dict[str, Any]
    key: str  # its place in params.yaml, for error messages


def _augment(value) -> tuple[AugmentSpec, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _problem(f"must be a list of transforms ({{name: ..., ...}}), got {value!r}")
    specs = []
    for index, entry in enumerate(value):
        if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
            raise _problem(
                "must be a mapping with a transform name, e.g. {name: RandomAffine, degrees: 10}; "
                f"got {entry!r}",
                index,
            )
        kwargs = {k: v for k, v in entry.items() if k != "name"}
        specs.append(AugmentSpec(name=entry["name"], kwargs=kwargs, key=f"train.augment[{index}]"))
    return tuple(specs)


_TRANSFORM = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}


class CollapseConfig(_Section):
    """``train.collapse``: when a head counts as collapsed (docs/design.md, Collapse)."""

    max_centre_cosine: number(-1.0, 1.0)
    max_accuracy_drop: number(0.0, 1.0, low_open=True, high_open=True)
    min_room: number(0.0)


BACKENDS = ("auto", "gloo", "nccl")


class DistributedConfig(_Section):
    """``train.distributed``: data-parallel training over torchrun workers (README, Scaling out)."""

    world_size: integer(1)  # 1: one process, today's path
    backend: choice(*BACKENDS)  # auto: nccl with CUDA, else gloo
    sample_rate: number(0.0, 1.0, low_open=True)  # share of each shard's centres per step
    timeout_s: number(0.0, low_open=True)  # a collective waiting longer fails the stage


SAMPLERS = ("uniform", "prioritized")


class PrioritizedConfig(_Section):
    """``train.prioritized``: the prioritized sampler (angular.train.sampler): priority
    ``(loss + eps)^alpha``, importance weight ``(N P)^-beta`` over its largest."""

    alpha: number(0.0)
    beta: number(0.0, 1.0)
    eps: number(0.0, low_open=True)


class TrainConfig(_Section):
    """``train``: which items train (one stage each) and how."""

    items: Annotated[
        _must(
            Annotated[tuple[Annotated[str, Field(strict=True)], ...], Field(min_length=1)],
            "a non-empty list of head names",
            show=repr,
        ),
        _unique("an item"),
        _UNIQUE,
    ]
    epochs: integer(1)
    batch_size: integer(1)
    optimizer: choice(*OPTIMIZERS)
    lr: number(0.0, low_open=True)
    weight_decay: number(0.0)
    momentum: number(0.0, 1.0, high_open=True)
    schedule: choice(*SCHEDULES)
    step_size: integer(1)
    gamma: number(0.0, 1.0, low_open=True)
    label_smoothing: number(0.0, 1.0, high_open=True)
    label_smoothing_mode: choice(*SMOOTHING_MODES)
    grad_clip_norm: number(0.0, low_open=True, optional=True)
    augment: Annotated[
        tuple[AugmentSpec, ...],
        BeforeValidator(_augment),
        WithJsonSchema({"anyOf": [{"type": "array", "items": _TRANSFORM}, {"type": "null"}]}),
    ]
    bf16: flag()
    # NHWC conv backbones (BENCHMARKS.md, "Face backbones on CPU"); optional: older files lack it.
    channels_last: flag() = False
    device: choice(*DEVICES)
    seed: integer(0)
    deterministic: flag()
    num_threads: integer(0)
    num_workers: integer(0)
    preload_images: flag()
    on_nonfinite: choice(*NONFINITE_POLICIES)
    centre_norm: number(0.0, low_open=True, optional=True)  # null: keep N(0, 0.01) centres
    on_collapse: choice(*COLLAPSE_POLICIES)
    collapse: CollapseConfig
    keep_checkpoints: integer(1)
    distributed: DistributedConfig
    sampler: choice(*SAMPLERS)
    prioritized: PrioritizedConfig  # sampler: prioritized only

    @model_validator(mode="after")
    def _sampler_runs_in_one_process(self):
        if self.sampler == "prioritized" and self.distributed.world_size > 1:
            raise _problem(
                "must be uniform when train.distributed.world_size > 1 (the prioritized "
                "sampler runs in one process), got 'prioritized'",
                "sampler",
            )
        return self


# --------------------------------------------------------------------------------------------------
# calibrate, evaluate, tracking


class CalibrateConfig(_Section):
    """``calibrate``: the softmax temperature of each member."""

    method: choice(*CALIBRATION_METHODS)
    temperature: number(0.0, low_open=True)
    n_bins: integer(1)
    max_iter: integer(1)
    batch_size: integer(1)
    num_threads: integer(0)


class VerificationConfig(_Section):
    """``evaluate.verification``: pairs of test images and of unknown images."""

    impostors_per_genuine: number(0.0, low_open=True, optional=True)  # null: every impostor pair
    max_impostors: integer(1, optional=True)
    folds: integer(2)
    seed: integer(0)
    # An LFW-style pairs.txt (relative to the folder the stage runs in): its pairs of test and
    # unknown images are scored besides the drawn ones (None: only the drawn pairs).
    pairs_file: text(optional=True) = None
    # A folder under which the pairs file's images are found (anywhere below it, by the file name
    # <name>_<NNNN>.<ext>), embedded by each model; pairs that touch a known (training) identity are
    # dropped and counted. None: the pairs name test or unknown images of the prepared data.
    pairs_root: text(optional=True) = None
    # Embed each image and its horizontal mirror and add the two normalised embeddings.
    flip_test: flag() = False
    # The false accept rate whose threshold (threshold@far=F of each embedding, on these pairs)
    # `angular identify` uses by default to reject people who are not in the gallery.
    gallery_far: number(0.0, 1.0, low_open=True, high_open=True) = 1e-2

    @model_validator(mode="after")
    def _root_of_a_pairs_file(self):
        if self.pairs_root is not None and self.pairs_file is None:
            raise _problem(
                "only used with evaluate.verification.pairs_file; set it to null", "pairs_root"
            )
        return self


def _rules(value):
    if not isinstance(value, list) or not all(isinstance(r, str) for r in value):
        raise _problem(f"must be a list of ensemble rules ({', '.join(RULES)}), got {value!r}")
    for rule in value:
        if rule not in RULES:
            raise _problem(f"unknown ensemble rule {rule!r}; known: {', '.join(RULES)}")
    return value


def _threshold(value):
    if value == "val":
        return None
    if not (_is_number(value) and 0.0 <= value <= 1.0):
        raise _problem(
            f"must be val (chosen on the validation split) or a confidence in [0, 1], got {value!r}"
        )
    return float(value)


class MembersConfig(_Section):
    """``evaluate.members``: which heads join the ensembles, judged on the validation split."""

    rule: choice(*MEMBER_RULES)
    threshold: number(0.0, 1.0)


class EvaluateConfig(_Section):
    """``evaluate``: the ensemble rules, the open-set threshold and verification."""

    rules: Annotated[
        tuple[Literal[RULES], ...], BeforeValidator(_rules), _unique("a rule"), _UNIQUE
    ]
    # None: chosen on the validation split (threshold: val)
    threshold: Annotated[
        float | None,
        BeforeValidator(_threshold),
        WithJsonSchema(
            {"anyOf": [{"const": "val"}, {"type": "number", "minimum": 0, "maximum": 1}]}
        ),
    ]
    known_rate: number(0.0, 1.0, low_open=True)
    # The second open-set operating point: the threshold that accepts at most this share of the
    # unknown people's images (chosen on one half of the unknown people, applied to the other).
    unknown_far: number(0.0, 1.0, low_open=True, high_open=True) = 0.05
    n_bins: integer(1)
    batch_size: integer(1)
    num_threads: integer(0)
    embedding_plot: flag()
    members: MembersConfig
    verification: VerificationConfig


class TrackingConfig(_Section):
    """``tracking``: MLflow (not a parameter of any stage)."""

    enabled: flag()
    uri: text(optional=True)  # None: $MLFLOW_TRACKING_URI, else the SQLite store in the project
    experiment: text()
    required: flag()
    # The evaluate stage registers its best model under this name in MLflow's model registry
    # (None: no registration).
    register_model: text(optional=True) = None


# --------------------------------------------------------------------------------------------------
# The whole file.


class Params(_Section):
    """params.yaml of the angular project (angular/config.py validates it; every key is required
    unless marked optional)."""

    data: DataConfig
    model: ModelConfig
    # The file's heads.<name> entries; validated, one TrainItem per name.
    heads: Annotated[
        dict[str, HeadSpec],
        _head_names("must define at least one head"),
        _HEAD_NAMES,
        AfterValidator(_train_items),
    ]
    train: TrainConfig
    calibrate: CalibrateConfig
    evaluate: EvaluateConfig
    tracking: TrackingConfig
    _raw: dict[str, Any] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _items_are_heads(self):
        items = self.train.items
        for name in items:
            if name not in self.heads:
                defined = ", ".join(self.heads)
                raise _problem(
                    f"{name!r} is not a head defined in heads ({defined})", "train", "items"
                )
        members = [member for name in items for member in self.heads[name].heads]
        duplicates = sorted({m for m in members if members.count(m) > 1})
        if duplicates:
            raise _problem(
                f"two items give an ensemble member the same name: {duplicates}", "train", "items"
            )
        return self

    @model_validator(mode="after")
    def _face_backbone_fits_the_images(self):
        if self.model.backbone in FACE_BACKBONES and min(self.data.image_size) < MIN_FACE_INPUT:
            raise _problem(
                f"{self.model.backbone} needs data.image_size of at least "
                f"[{MIN_FACE_INPUT}, {MIN_FACE_INPUT}] (four stride-2 stages), got "
                f"{list(self.data.image_size)}; use small_cnn, resnet18 or resnet34",
                "model",
                "backbone",
            )
        return self

    @property
    def raw(self) -> dict[str, Any]:
        """The file as read (for logging the parameters to MLflow)."""
        return self._raw

    def item(self, name: str) -> TrainItem:
        """A train item by name; a clear error when it is not in ``train.items``."""
        if name not in self.train.items:
            raise ConfigError(
                "train.items", f"{name!r} is not listed (listed: {', '.join(self.train.items)})"
            )
        return self.heads[name]

    def members(self) -> dict[str, tuple[str, HeadConfig]]:
        """Every ensemble member (a head of a trained item): ``name -> (item, head config)``."""
        return {
            member: (item, head)
            for item in self.train.items
            for member, head in self.heads[item].heads.items()
        }


SECTIONS = tuple(Params.model_fields)


def _dotted(parts) -> str:
    key = ""
    for part in parts:
        if isinstance(part, int):
            key += f"[{part}]"
        elif part != "[key]" and not part.startswith(_TAG):
            key += f".{part}" if key else part
    return key


def _config_error(error: ValidationError) -> ConfigError:
    """The first of pydantic's errors as a :class:`ConfigError` naming its dotted key."""
    first = error.errors(include_url=False)[0]
    parts = list(first["loc"])
    if first["type"] == "params":
        parts += first["ctx"]["at"]
        problem = first["ctx"]["text"]
    elif first["type"] == "missing":
        problem = "missing (every key of params.yaml is required)"
    else:  # a check without a helper's wording (should not happen)
        problem = f"{first['msg']}, got {_describe(first['input'])}"
    return ConfigError(_dotted(parts) or "params", problem)


def parse_params(raw: Mapping[str, Any]) -> Params:
    """Validate an already-parsed ``params.yaml`` mapping."""
    try:
        params = Params.model_validate(raw)
    except ValidationError as error:
        raise _config_error(error) from None
    params._raw = dict(raw)
    return params


class _Schema(GenerateJsonSchema):
    def field_title_should_be_set(self, schema) -> bool:
        return False  # "title": "Epochs" next to "epochs" says nothing


def params_schema() -> str:
    """The JSON schema of params.yaml (``params.schema.json``), as text."""
    schema = Params.model_json_schema(schema_generator=_Schema)
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
    return json.dumps(schema, indent=2) + "\n"


# --------------------------------------------------------------------------------------------------
# Reading the file as DVC does. DVC parses params.yaml with ruamel.yaml (YAML 1.2); PyYAML's safe
# loader follows YAML 1.1, where `1e-3` is a string, `yes`/`on` are booleans, `010` is eight and
# `1:20` is eighty, and a key given twice silently keeps the last value (DVC refuses the file). The
# loader below reads scalars by the YAML 1.2 rules and reports duplicate keys, so that the stages,
# `dvc params diff` and `dvc exp run -S` all see the same values.

_BOOL_TAG = "tag:yaml.org,2002:bool"
_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_NUMBER_START = list("-+0123456789")


class _ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 booleans, integers and floats."""

    def construct_yaml_int(self, node) -> int:
        value = self.construct_scalar(node).replace("_", "")
        sign = -1 if value.startswith("-") else 1
        value = value.lstrip("+-")
        base = {"0b": 2, "0o": 8, "0x": 16}.get(value[:2].lower())
        return sign * (int(value[2:], base) if base else int(value, 10))


_ParamsLoader.yaml_implicit_resolvers = {
    first: [
        (tag, regexp) for tag, regexp in resolvers if tag not in (_BOOL_TAG, _INT_TAG, _FLOAT_TAG)
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_ParamsLoader.add_implicit_resolver(
    _BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_ParamsLoader.add_implicit_resolver(
    _INT_TAG,
    re.compile(r"^[-+]?(?:[0-9][0-9_]*|0b[01_]+|0o[0-7_]+|0x[0-9a-fA-F_]+)$"),
    _NUMBER_START,
)
_ParamsLoader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?
        |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    _NUMBER_START + ["."],
)
_ParamsLoader.add_constructor(_INT_TAG, _ParamsLoader.construct_yaml_int)


def _check_duplicate_keys(node, source: str, prefix: str = "") -> None:
    """A key given twice in one mapping is a :class:`ConfigError` naming it and both lines."""
    if isinstance(node, yaml.MappingNode):
        lines: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            dotted = f"{prefix}.{key}" if prefix else key
            line = key_node.start_mark.line + 1
            if key in lines:
                raise ConfigError(
                    dotted, f"given twice (lines {lines[key]} and {line} of {source}); keep one"
                )
            lines[key] = line
            _check_duplicate_keys(value_node, source, dotted)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _check_duplicate_keys(item, source, f"{prefix}[{index}]")


def read_yaml(text: str, source: str | Path = "params.yaml") -> Any:
    """Parse YAML text as DVC does (YAML 1.2 scalars, no duplicate keys); ``source`` names the
    file in error messages."""
    loader = _ParamsLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_duplicate_keys(node, str(source))
        return loader.construct_document(node)
    except yaml.YAMLError as error:
        raise ConfigError("", f"{source}: not valid YAML: {error}") from None
    finally:
        loader.dispose()


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``params.yaml``; :class:`ConfigError` names the bad key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            "", f"{path}: no such file (run the stages from the project root)"
        ) from None
    except OSError as error:
        raise ConfigError("", f"{path}: cannot read it ({error.strerror})") from None
    except UnicodeDecodeError as error:
        raise ConfigError("", f"{path}: not UTF-8 text ({error.reason})") from None
    raw = read_yaml(text, path)
    if raw is None:
        raise ConfigError("", f"{path} is empty")
    return parse_params(raw)


if __name__ == "__main__":
    if sys.argv[1:] != ["--schema"]:
        sys.exit("usage: python -m angular.config --schema > params.schema.json")
    sys.stdout.write(params_schema())
