"""The one typed, validated loader of ``params.yaml`` (DESIGN §5).

:func:`load_params` reads the file and returns a frozen :class:`Params`. Every key is required (the
shipped ``params.yaml`` is the single place where the experiment's numbers live, and DVC needs each
key a stage reads to exist there), except a head's ``straight_through`` (default ``false``) and
``evaluate.verification.pairs_file`` (default ``null``) and ``flip_test`` (default ``false``). An
unknown key, a missing key or a bad value raises :class:`ConfigError`, whose message starts with
the dotted key, e.g. ``train.epochs: must be an integer >= 1, got 0``.

Sections: ``data`` (read by prepare, and the image format by train), ``model``, ``heads``
(``heads.<name>`` is a margin head, or a ``joint`` group of heads sharing one backbone), ``train``,
``calibrate``, ``evaluate``, ``tracking``. ``params.yaml`` documents each key.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from angular.eval.ensemble import RULES
from angular.nn.backbones import BACKBONES
from angular.nn.heads import PRESETS, LambdaSchedule, MarginSpec

__all__ = [
    "ConfigError",
    "Params",
    "DataConfig",
    "ModelConfig",
    "HeadConfig",
    "TrainItem",
    "AugmentSpec",
    "TrainConfig",
    "CalibrateConfig",
    "VerificationConfig",
    "EvaluateConfig",
    "TrackingConfig",
    "load_params",
    "read_yaml",
    "parse_params",
    "SOURCES",
    "OPTIMIZERS",
    "SCHEDULES",
    "SMOOTHING_MODES",
    "NONFINITE_POLICIES",
    "DEVICES",
    "CALIBRATION_METHODS",
]

SOURCES = ("digits", "imagefolder")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "step", "constant")
SMOOTHING_MODES = ("all", "others")
NONFINITE_POLICIES = ("stop", "skip")
DEVICES = ("auto", "cpu", "cuda")
CALIBRATION_METHODS = ("fit", "fixed")
HEAD_TYPES = tuple(PRESETS)  # arcface, cosface, sphereface, combined
JOINT = "joint"
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
_MISSING = object()


class ConfigError(ValueError):
    """A bad ``params.yaml``: ``key`` is the dotted key, the message says what is wrong with it."""

    def __init__(self, key: str, problem: str):
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}" if key else problem)


# --------------------------------------------------------------------------------------------------
# Reading one mapping: each accessor validates one key and marks it as known.


def _describe(value) -> str:
    return f"{value!r} ({type(value).__name__})" if isinstance(value, str) else repr(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class _Section:
    def __init__(self, mapping, prefix: str):
        if not isinstance(mapping, Mapping):
            raise ConfigError(prefix or "params", f"must be a mapping, got {_describe(mapping)}")
        for key in mapping:
            if not isinstance(key, str):
                raise ConfigError(prefix or "params", f"keys must be strings, got {key!r}")
        self.mapping = mapping
        self.prefix = prefix
        self.seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def raw(self, name: str, default=_MISSING):
        self.seen.add(name)
        if name not in self.mapping:
            if default is _MISSING:
                raise ConfigError(self.key(name), "missing (every key of params.yaml is required)")
            return default
        return self.mapping[name]

    def integer(self, name: str, *, low: int | None = None, optional: bool = False) -> int | None:
        value = self.raw(name)
        if value is None and optional:
            return None
        if not _is_int(value) or (low is not None and value < low):
            bound = f" >= {low}" if low is not None else ""
            none = " (or null)" if optional else ""
            raise ConfigError(
                self.key(name), f"must be an integer{bound}{none}, got {_describe(value)}"
            )
        return int(value)

    def number(
        self,
        name: str,
        *,
        low: float | None = None,
        high: float | None = None,
        low_open: bool = False,
        high_open: bool = False,
        optional: bool = False,
    ) -> float | None:
        value = self.raw(name)
        if value is None and optional:
            return None
        ok = _is_number(value) and math.isfinite(value)
        if ok and low is not None:
            ok = value > low if low_open else value >= low
        if ok and high is not None:
            ok = value < high if high_open else value <= high
        if not ok:
            raise ConfigError(
                self.key(name),
                f"must be {_range_text(low, high, low_open, high_open)}"
                f"{' (or null)' if optional else ''}, got {_describe(value)}",
            )
        return float(value)

    def boolean(self, name: str, default=_MISSING) -> bool:
        value = self.raw(name, default)
        if not isinstance(value, bool):
            raise ConfigError(self.key(name), f"must be true or false, got {_describe(value)}")
        return value

    def choice(self, name: str, choices: tuple[str, ...]) -> str:
        value = self.raw(name)
        if value not in choices:
            raise ConfigError(
                self.key(name), f"must be one of {', '.join(choices)}, got {_describe(value)}"
            )
        return value

    def string(self, name: str, *, optional: bool = False, default=_MISSING) -> str | None:
        value = self.raw(name, default)
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value.strip():
            none = " (or null)" if optional else ""
            raise ConfigError(self.key(name), f"must be a non-empty string{none}, got {value!r}")
        return value

    def section(self, name: str) -> _Section:
        return _Section(self.raw(name), self.key(name))

    def finish(self) -> None:
        unknown = [key for key in self.mapping if key not in self.seen]
        if unknown:
            known = ", ".join(sorted(self.seen))
            raise ConfigError(self.key(unknown[0]), f"unknown key (known keys here: {known})")


def _range_text(low, high, low_open, high_open) -> str:
    if low is not None and high is not None:
        return f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"a number {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"a number {'<' if high_open else '<='} {high:g}"
    return "a finite number"


def _check_name(key: str, name: str, what: str) -> None:
    if not _NAME.match(name):
        raise ConfigError(
            key, f"{what} {name!r} must start with a letter and use only letters, digits, _ and -"
        )


# --------------------------------------------------------------------------------------------------
# Sections.


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str
    path: str | None
    test_path: str | None
    unknown_identities: int | float | tuple[str, ...]
    val_fraction: float
    test_fraction: float
    min_images_per_class: int
    skip_bad_images: bool
    seed: int
    image_size: tuple[int, int]
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def _per_channel(section: _Section, name: str, channels: int, *, positive: bool):
    value = section.raw(name)
    values = value if isinstance(value, list) else [value]
    good = all(_is_number(v) and math.isfinite(v) and (v > 0 or not positive) for v in values)
    if not good or len(values) not in (1, channels):
        kind = "a positive number" if positive else "a number"
        raise ConfigError(
            section.key(name),
            f"must be {kind} or a list of {channels} (one per channel), got {value!r}",
        )
    return tuple(float(v) for v in values) * (channels if len(values) == 1 else 1)


def _parse_data(section: _Section) -> DataConfig:
    source = section.choice("source", SOURCES)
    path = section.string("path", optional=True)
    test_path = section.string("test_path", optional=True)
    if source == "imagefolder" and path is None:
        raise ConfigError(section.key("path"), "required when data.source is imagefolder")
    if source != "imagefolder":
        for name, value in (("path", path), ("test_path", test_path)):
            if value is not None:
                raise ConfigError(
                    section.key(name),
                    f"only used when data.source is imagefolder (it is {source}); set it to null",
                )

    unknown = section.raw("unknown_identities")
    key = section.key("unknown_identities")
    if _is_int(unknown):
        if unknown < 0:
            raise ConfigError(key, f"a count must be >= 0, got {unknown}")
    elif _is_number(unknown):
        if not 0.0 < unknown < 1.0:
            raise ConfigError(key, f"a fraction must lie in (0, 1), got {unknown}")
    elif isinstance(unknown, list) and all(isinstance(n, str) and n for n in unknown):
        if len(set(unknown)) != len(unknown):
            raise ConfigError(key, f"lists an identity twice: {unknown}")
        unknown = tuple(unknown)
    else:
        raise ConfigError(
            key,
            "must be a count (integer >= 0), a fraction in (0, 1) or a list of identity names, "
            f"got {unknown!r}",
        )

    val_fraction = section.number("val_fraction", low=0.0, high=1.0, low_open=True, high_open=True)
    test_fraction = section.number("test_fraction", low=0.0, high=1.0, high_open=True)
    if val_fraction + test_fraction >= 1.0:
        raise ConfigError(
            section.key("test_fraction"),
            f"val_fraction + test_fraction must be < 1 (training needs images), got "
            f"{val_fraction} + {test_fraction}",
        )
    if test_path is not None and test_fraction != 0.0:
        raise ConfigError(
            section.key("test_fraction"),
            "must be 0 when data.test_path is set (the test images come from data.test_path)",
        )
    if test_path is None and test_fraction == 0.0:
        raise ConfigError(
            section.key("test_fraction"),
            "must be > 0 (the test split is drawn from data.path unless data.test_path is set)",
        )
    min_images = section.integer("min_images_per_class", low=1)
    skip_bad = section.boolean("skip_bad_images")
    seed = section.integer("seed", low=0)

    size = section.raw("image_size")
    if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) and v >= 1 for v in size)):
        raise ConfigError(
            section.key("image_size"), f"must be [height, width], two integers >= 1, got {size!r}"
        )
    channels = section.raw("channels")
    if channels not in (1, 3) or isinstance(channels, bool):
        raise ConfigError(
            section.key("channels"), f"must be 1 (grey) or 3 (RGB), got {_describe(channels)}"
        )
    mean = _per_channel(section, "mean", channels, positive=False)
    std = _per_channel(section, "std", channels, positive=True)
    section.finish()
    return DataConfig(
        source=source,
        path=path,
        test_path=test_path,
        unknown_identities=unknown,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        min_images_per_class=min_images,
        skip_bad_images=skip_bad,
        seed=seed,
        image_size=(int(size[0]), int(size[1])),
        channels=int(channels),
        mean=mean,
        std=std,
    )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    backbone: str
    embedding_dim: int
    options: dict[str, Any]  # keyword arguments of the backbone (small_cnn: width, dropout)

    def backbone_kwargs(self) -> dict[str, Any]:
        return dict(self.options)


def _parse_model(section: _Section) -> ModelConfig:
    backbone = section.choice("backbone", BACKBONES)
    embedding_dim = section.integer("embedding_dim", low=1)
    small = section.section("small_cnn")
    width = small.integer("width", low=1)
    dropout = small.number("dropout", low=0.0, high=1.0, high_open=True)
    blocks = small.integer("blocks", low=1)
    convs_per_block = small.integer("convs_per_block", low=1)
    small.finish()
    section.finish()
    options = {}
    if backbone == "small_cnn":
        options = dict(width=width, dropout=dropout, blocks=blocks, convs_per_block=convs_per_block)
    return ModelConfig(backbone=backbone, embedding_dim=embedding_dim, options=options)


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    """One margin head: its preset ``type`` and the resolved margin ``(s, m1, m2, m3, lam)``."""

    name: str
    type: str
    margin: MarginSpec
    straight_through: bool

    def to_dict(self) -> dict[str, Any]:
        m = self.margin
        schedule = None if m.lam_schedule is None else dataclasses.asdict(m.lam_schedule)
        return {
            "type": self.type,
            "s": m.s,
            "m1": m.m1,
            "m2": m.m2,
            "m3": m.m3,
            "lam_schedule": schedule,
            "straight_through": self.straight_through,
        }


def _parse_head(section: _Section, name: str) -> HeadConfig:
    kind = section.choice("type", HEAD_TYPES)
    s = section.number("s", low=0.0, low_open=True)
    if kind == "arcface":
        margin = MarginSpec.arcface(s, section.number("m", low=0.0))
    elif kind == "cosface":
        margin = MarginSpec.cosface(s, section.number("m", low=0.0))
    elif kind == "sphereface":
        m = section.number("m", low=0.0, low_open=True)
        lam = section.section("lam")
        schedule = LambdaSchedule(
            lam_base=lam.number("base", low=0.0),
            gamma=lam.number("gamma", low=0.0),
            power=lam.number("power", low=0.0),
            lam_min=lam.number("min", low=0.0),
        )
        lam.finish()
        margin = MarginSpec.sphereface(s, m, schedule)
    else:
        margin = MarginSpec.combined(
            s,
            section.number("m1", low=0.0, low_open=True),
            section.number("m2", low=0.0),
            section.number("m3"),
        )
    straight_through = section.boolean("straight_through", default=False)
    section.finish()
    return HeadConfig(name=name, type=kind, margin=margin, straight_through=straight_through)


@dataclasses.dataclass(frozen=True)
class TrainItem:
    """What one ``train@<name>`` stage trains: one backbone with one head, or (``joint``) several
    heads on one shared backbone with their losses summed. ``heads`` maps each ensemble member's
    name to its head: the item's own name for a single head, ``<item>_<head>`` in a joint group."""

    name: str
    joint: bool
    heads: dict[str, HeadConfig]


def _parse_heads(section: _Section) -> dict[str, TrainItem]:
    items: dict[str, TrainItem] = {}
    if not section.mapping:
        raise ConfigError(section.prefix, "must define at least one head")
    for name in section.mapping:
        key = section.key(name)
        _check_name(key, name, "a head name")
        entry = section.section(name)
        if entry.mapping.get("type") != JOINT:
            items[name] = TrainItem(name, False, {name: _parse_head(entry, name)})
            continue
        entry.raw("type")
        members = entry.section("heads")
        if not members.mapping:
            raise ConfigError(members.prefix, "a joint group needs at least one head")
        heads = {}
        for head_name in members.mapping:
            _check_name(members.key(head_name), head_name, "a head name")
            head_section = members.section(head_name)
            if head_section.mapping.get("type") == JOINT:
                raise ConfigError(head_section.key("type"), "a joint group cannot contain a joint")
            heads[f"{name}_{head_name}"] = _parse_head(head_section, head_name)
        members.finish()
        entry.finish()
        items[name] = TrainItem(name, True, heads)
    section.finish()
    return items


@dataclasses.dataclass(frozen=True)
class AugmentSpec:
    """One torchvision transform (``torchvision.transforms.v2.<name>(**kwargs)``), applied to each
    training image. Built (and its arguments checked) when training starts."""

    name: str
    kwargs: dict[str, Any]
    key: str  # its place in params.yaml, for error messages


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    items: tuple[str, ...]
    epochs: int
    batch_size: int
    optimizer: str
    lr: float
    weight_decay: float
    momentum: float
    schedule: str
    step_size: int
    gamma: float
    label_smoothing: float
    label_smoothing_mode: str
    grad_clip_norm: float | None
    augment: tuple[AugmentSpec, ...]
    bf16: bool
    device: str
    seed: int
    deterministic: bool
    num_threads: int
    num_workers: int
    preload_images: bool
    on_nonfinite: str
    keep_checkpoints: int


def _parse_augment(section: _Section) -> tuple[AugmentSpec, ...]:
    value = section.raw("augment")
    key = section.key("augment")
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError(key, f"must be a list of transforms ({{name: ..., ...}}), got {value!r}")
    specs = []
    for index, entry in enumerate(value):
        entry_key = f"{key}[{index}]"
        if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
            raise ConfigError(
                entry_key,
                f"must be a mapping with a transform name, e.g. {{name: RandomAffine, degrees: 10}}; "
                f"got {entry!r}",
            )
        kwargs = {k: v for k, v in entry.items() if k != "name"}
        specs.append(AugmentSpec(name=entry["name"], kwargs=kwargs, key=entry_key))
    return tuple(specs)


def _parse_train(section: _Section, heads: dict[str, TrainItem]) -> TrainConfig:
    items = section.raw("items")
    key = section.key("items")
    if not isinstance(items, list) or not items or not all(isinstance(i, str) for i in items):
        raise ConfigError(key, f"must be a non-empty list of head names, got {items!r}")
    for name in items:
        if name not in heads:
            raise ConfigError(key, f"{name!r} is not a head defined in heads ({', '.join(heads)})")
    if len(set(items)) != len(items):
        raise ConfigError(key, f"lists an item twice: {items}")
    members = [member for name in items for member in heads[name].heads]
    duplicates = sorted({m for m in members if members.count(m) > 1})
    if duplicates:
        raise ConfigError(key, f"two items give an ensemble member the same name: {duplicates}")

    config = TrainConfig(
        items=tuple(items),
        epochs=section.integer("epochs", low=1),
        batch_size=section.integer("batch_size", low=1),
        optimizer=section.choice("optimizer", OPTIMIZERS),
        lr=section.number("lr", low=0.0, low_open=True),
        weight_decay=section.number("weight_decay", low=0.0),
        momentum=section.number("momentum", low=0.0, high=1.0, high_open=True),
        schedule=section.choice("schedule", SCHEDULES),
        step_size=section.integer("step_size", low=1),
        gamma=section.number("gamma", low=0.0, high=1.0, low_open=True),
        label_smoothing=section.number("label_smoothing", low=0.0, high=1.0, high_open=True),
        label_smoothing_mode=section.choice("label_smoothing_mode", SMOOTHING_MODES),
        grad_clip_norm=section.number("grad_clip_norm", low=0.0, low_open=True, optional=True),
        augment=_parse_augment(section),
        bf16=section.boolean("bf16"),
        device=section.choice("device", DEVICES),
        seed=section.integer("seed", low=0),
        deterministic=section.boolean("deterministic"),
        num_threads=section.integer("num_threads", low=0),
        num_workers=section.integer("num_workers", low=0),
        preload_images=section.boolean("preload_images"),
        on_nonfinite=section.choice("on_nonfinite", NONFINITE_POLICIES),
        keep_checkpoints=section.integer("keep_checkpoints", low=1),
    )
    section.finish()
    return config


@dataclasses.dataclass(frozen=True)
class CalibrateConfig:
    method: str
    temperature: float
    n_bins: int
    max_iter: int
    batch_size: int
    num_threads: int


def _parse_calibrate(section: _Section) -> CalibrateConfig:
    config = CalibrateConfig(
        method=section.choice("method", CALIBRATION_METHODS),
        temperature=section.number("temperature", low=0.0, low_open=True),
        n_bins=section.integer("n_bins", low=1),
        max_iter=section.integer("max_iter", low=1),
        batch_size=section.integer("batch_size", low=1),
        num_threads=section.integer("num_threads", low=0),
    )
    section.finish()
    return config


@dataclasses.dataclass(frozen=True)
class VerificationConfig:
    impostors_per_genuine: float | None  # None: every impostor pair (up to max_impostors)
    max_impostors: int | None
    folds: int
    seed: int
    # An LFW-style pairs.txt (relative to the folder the stage runs in): its pairs of test and
    # unknown images are scored besides the drawn ones (None: only the drawn pairs).
    pairs_file: str | None = None
    # Embed each image and its horizontal mirror and add the two normalised embeddings.
    flip_test: bool = False


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    rules: tuple[str, ...]
    threshold: float | None  # None: chosen on the validation split (threshold: val)
    known_rate: float
    n_bins: int
    batch_size: int
    num_threads: int
    embedding_plot: bool
    verification: VerificationConfig


def _parse_evaluate(section: _Section) -> EvaluateConfig:

    rules = section.raw("rules")
    key = section.key("rules")
    if not isinstance(rules, list) or not all(isinstance(r, str) for r in rules):
        raise ConfigError(
            key, f"must be a list of ensemble rules ({', '.join(RULES)}), got {rules!r}"
        )
    for rule in rules:
        if rule not in RULES:
            raise ConfigError(key, f"unknown ensemble rule {rule!r}; known: {', '.join(RULES)}")
    if len(set(rules)) != len(rules):
        raise ConfigError(key, f"lists a rule twice: {rules}")

    threshold = section.raw("threshold")
    if threshold == "val":
        threshold = None
    elif not (_is_number(threshold) and 0.0 <= threshold <= 1.0):
        raise ConfigError(
            section.key("threshold"),
            f"must be val (chosen on the validation split) or a confidence in [0, 1], "
            f"got {threshold!r}",
        )
    known_rate = section.number("known_rate", low=0.0, high=1.0, low_open=True)
    n_bins = section.integer("n_bins", low=1)
    batch_size = section.integer("batch_size", low=1)
    num_threads = section.integer("num_threads", low=0)
    embedding_plot = section.boolean("embedding_plot")
    verification = section.section("verification")
    verification_config = VerificationConfig(
        impostors_per_genuine=verification.number(
            "impostors_per_genuine", low=0.0, low_open=True, optional=True
        ),
        max_impostors=verification.integer("max_impostors", low=1, optional=True),
        folds=verification.integer("folds", low=2),
        seed=verification.integer("seed", low=0),
        pairs_file=verification.string("pairs_file", optional=True, default=None),
        flip_test=verification.boolean("flip_test", default=False),
    )
    verification.finish()
    section.finish()
    return EvaluateConfig(
        rules=tuple(rules),
        threshold=None if threshold is None else float(threshold),
        known_rate=known_rate,
        n_bins=n_bins,
        batch_size=batch_size,
        num_threads=num_threads,
        embedding_plot=embedding_plot,
        verification=verification_config,
    )


@dataclasses.dataclass(frozen=True)
class TrackingConfig:
    enabled: bool
    uri: str | None  # None: $MLFLOW_TRACKING_URI, else the SQLite store in the project
    experiment: str
    required: bool


def _parse_tracking(section: _Section) -> TrackingConfig:
    config = TrackingConfig(
        enabled=section.boolean("enabled"),
        uri=section.string("uri", optional=True),
        experiment=section.string("experiment"),
        required=section.boolean("required"),
    )
    section.finish()
    return config


@dataclasses.dataclass(frozen=True)
class Params:
    data: DataConfig
    model: ModelConfig
    heads: dict[str, TrainItem]
    train: TrainConfig
    calibrate: CalibrateConfig
    evaluate: EvaluateConfig
    tracking: TrackingConfig
    raw: dict[str, Any]  # the file as read (for logging the parameters to MLflow)

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


SECTIONS = ("data", "model", "heads", "train", "calibrate", "evaluate", "tracking")


def parse_params(raw: Mapping[str, Any]) -> Params:
    """Validate an already-parsed ``params.yaml`` mapping."""
    top = _Section(raw, "")
    data = _parse_data(top.section("data"))
    model = _parse_model(top.section("model"))
    heads = _parse_heads(top.section("heads"))
    train = _parse_train(top.section("train"), heads)
    calibrate = _parse_calibrate(top.section("calibrate"))
    evaluate = _parse_evaluate(top.section("evaluate"))
    tracking = _parse_tracking(top.section("tracking"))
    top.finish()
    return Params(data, model, heads, train, calibrate, evaluate, tracking, dict(raw))


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
