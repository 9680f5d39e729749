"""The ``data`` section: the images, their split and format (read by prepare, the format also
by train)."""

import math
from collections.abc import Mapping
from typing import Annotated

from pydantic import (
    BeforeValidator,
    Field,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from angular.config.rules import (
    UNIQUE,
    Section,
    choice,
    describe,
    flag,
    integer,
    is_number,
    must,
    number,
    problem,
    text,
)

SOURCES = ("digits", "imagefolder", "insightface_rec")
RECORDIO = "insightface_rec"  # an insightface RecordIO set: train.rec, train.idx, property


def _unknown_identities(value):
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise problem(f"a count must be >= 0, got {value}")
    elif is_number(value):
        if not 0.0 < value < 1.0:
            raise problem(f"a fraction must lie in (0, 1), got {value}")
    elif not (isinstance(value, list) and all(isinstance(n, str) and n for n in value)):
        raise problem(
            "must be a count (integer >= 0), a fraction in (0, 1) or a list of identity names, "
            f"got {value!r}"
        )
    elif len(set(value)) != len(value):
        raise problem(f"lists an identity twice: {value}")
    return value


class Crop(Section):
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
            raise problem(f"must be {_CROP_WORDS}, got {value!r}")
        return {"box": tuple(value)}
    if isinstance(value, Mapping) and set(value) == {"central"}:
        fraction = value["central"]
        if not (is_number(fraction) and 0.0 < fraction <= 1.0):
            raise problem(f"central must be a fraction in (0, 1], got {fraction!r}")
        return {"central": float(fraction)}
    raise problem(f"must be {_CROP_WORDS}, got {describe(value)}")


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


class Align(Section):
    """``data.align``: align each face onto the ArcFace template from five landmarks
    (:mod:`angular.data.align`) into a ``size`` x ``size`` crop, which is then resized to
    ``data.image_size`` like any image. ``landmarks``: a TSV, header ``path score x1 y1 ... x5
    y5``, one row per image, ``path`` relative to ``data.path``."""

    landmarks: text()
    size: integer(1) = 112  # the template's 112x112 scaled to this side (insightface's rule)


def _per_channel_schema(low: dict) -> WithJsonSchema:
    one = {"type": "number", **low}
    return WithJsonSchema({"anyOf": [one, {"type": "array", "items": one, "minItems": 1}]})


class DataConfig(Section):
    """``data``: the images, their split and format (prepare; the format also train)."""

    source: choice(*SOURCES)
    path: text(optional=True)
    test_path: text(optional=True)
    unknown_identities: Annotated[
        Annotated[int, Field(strict=True, ge=0)]  # a count,
        | Annotated[float, Field(strict=True, gt=0, lt=1)]  # a fraction or names
        | Annotated[tuple[Annotated[str, Field(min_length=1)], ...], UNIQUE],
        BeforeValidator(_unknown_identities),
    ]
    # (0, 1); 0 (no validation split) only for insightface_rec, whose sets are validated on
    # verification bins: see _val_may_be_empty.
    val_fraction: Annotated[
        number(0.0, 1.0, low_open=True, high_open=True),
        WithJsonSchema({"type": "number", "minimum": 0, "exclusiveMaximum": 1}),
    ]
    test_fraction: number(0.0, 1.0, high_open=True)
    min_images_per_class: integer(1)
    skip_bad_images: flag()
    seed: integer(0)
    # A seeded choice of at most this many images of each identity, known or unknown, made before
    # splitting (None: every image).
    max_images_per_class: integer(1, optional=True) = None
    crop: Annotated[Crop | None, BeforeValidator(_crop), _CROP_SCHEMA] = None  # before resizing
    align: Align | None = None  # imagefolder: faces aligned from landmarks, before resizing
    image_size: must(
        tuple[Annotated[int, Field(strict=True, ge=1)], Annotated[int, Field(strict=True, ge=1)]],
        "[height, width], two integers >= 1",
        show=repr,
    )
    channels: choice(1, 3, requirement="1 (grey) or 3 (RGB)")
    # A number or one per channel; stored as one per channel.
    mean: Annotated[tuple[float, ...], _per_channel_schema({})]
    std: Annotated[tuple[float, ...], _per_channel_schema({"exclusiveMinimum": 0})]

    @field_validator("val_fraction", mode="wrap")
    @classmethod
    def _val_may_be_empty(cls, value, handler, info: ValidationInfo):
        if is_number(value) and value == 0:
            if info.data.get("source") == RECORDIO:
                return 0.0
            raise problem(
                f"must be a number in (0, 1), got {value!r} (0, no validation split, only with "
                f"data.source {RECORDIO})"
            )
        return handler(value)

    @field_validator("mean", "std", mode="before")
    @classmethod
    def _one_per_channel(cls, value, info: ValidationInfo):
        channels = info.data.get("channels", 1)  # absent when bad: its own error comes first
        positive = info.field_name == "std"
        values = value if isinstance(value, list) else [value]
        good = all(is_number(v) and math.isfinite(v) and (v > 0 or not positive) for v in values)
        if not good or len(values) not in (1, channels):
            kind = "a positive number" if positive else "a number"
            raise problem(
                f"must be {kind} or a list of {channels} (one per channel), got {value!r}"
            )
        return tuple(float(v) for v in values) * (channels if len(values) == 1 else 1)

    @model_validator(mode="after")
    def _sources_and_splits_agree(self):
        if self.source != "digits" and self.path is None:
            what = "a RecordIO set's folder or .rec" if self.source == RECORDIO else "a folder"
            raise problem(f"required when data.source is {self.source} ({what})", "path")
        if self.source == "digits" and self.path is not None:
            raise problem(
                "only used when data.source is imagefolder or insightface_rec (it is digits); "
                "set it to null",
                "path",
            )
        for name in ("test_path", "align"):
            if self.source != "imagefolder" and getattr(self, name) is not None:
                raise problem(
                    f"only used when data.source is imagefolder (it is {self.source}); "
                    "set it to null",
                    name,
                )
        if self.source == RECORDIO and self.crop is not None:
            raise problem(
                f"not used with data.source {RECORDIO} (its faces are read as stored, "
                "aligned by whoever packed them); set it to null",
                "crop",
            )
        if self.align is not None and self.crop is not None:
            raise problem(
                "give data.align or data.crop, not both (an aligned face is already cut to the "
                "template)",
                "align",
            )
        if self.align is not None and self.test_path is not None:
            raise problem(
                "not supported with data.test_path (the landmarks name images of data.path): "
                "put the test identities under data.path, or align them with `angular pack "
                "images --landmarks`",
                "align",
            )
        if self.val_fraction + self.test_fraction >= 1.0:
            raise problem(
                "val_fraction + test_fraction must be < 1 (training needs images), got "
                f"{self.val_fraction} + {self.test_fraction}",
                "test_fraction",
            )
        if self.test_path is not None and self.test_fraction != 0.0:
            raise problem(
                "must be 0 when data.test_path is set (the test images come from data.test_path)",
                "test_fraction",
            )
        if self.test_path is None and self.test_fraction == 0.0:
            raise problem(
                "must be > 0 (the test split is drawn from data.path unless data.test_path is set)",
                "test_fraction",
            )
        return self
