"""params.yaml validation: the shipped file loads; every bad key or value names its dotted key."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pydantic
import pytest
import torch
import torch.nn.functional as F
from pipeline_testing import (
    REPO,
    SHIPPED_PARAMS,
    delete_key,
    set_key,
    shipped_raw,
    tiny_raw,
    write_params,
)

from angular.config import (
    SCHEMA_FILE,
    ConfigError,
    load_params,
    params_schema,
    parse_params,
    read_yaml,
)
from angular.data import build_augmentation
from angular.eval.ensemble import RULES
from angular.nn.backbones import BACKBONES
from angular.nn.heads import PRESETS
from angular.train.loop import effective_label_smoothing


def test_shipped_params_load_with_the_documented_defaults():
    params = load_params(SHIPPED_PARAMS)
    assert params.train.items == ("arcface", "cosface", "sphereface")
    assert set(params.heads) >= {"arcface", "cosface", "sphereface", "combined", "joint"}
    assert params.heads["arcface"].heads["arcface"].margin.m2 == 0.5
    assert params.heads["cosface"].heads["cosface"].margin.m3 == 0.35
    sphere = params.heads["sphereface"].heads["sphereface"].margin
    assert sphere.m1 == 4.0 and sphere.lam_schedule.lam_base == 1000.0
    joint = params.heads["joint"]
    assert joint.joint and list(joint.heads) == [
        "joint_arcface",
        "joint_cosface",
        "joint_sphereface",
    ]
    assert params.data.source == "digits" and params.data.unknown_identities == 2
    assert params.train.label_smoothing == 0.1 and params.train.optimizer == "adam"
    assert params.evaluate.rules == RULES
    assert list(params.members()) == ["arcface", "cosface", "sphereface"]


def test_head_types_are_the_presets_and_adaptive_heads_of_angular_nn():
    from angular.config import HEAD_TYPES
    from angular.nn.adaptive import ADAPTIVE_HEADS

    assert set(HEAD_TYPES) == set(PRESETS) | set(ADAPTIVE_HEADS)


def test_the_original_repositorys_settings_are_expressible():
    raw = shipped_raw()
    raw["heads"] = {
        "arcface": {"type": "arcface", "s": 128.0, "m": 0.5},
        "cosface": {"type": "cosface", "s": 128.0, "m": 0.4},
        "sphereface": {
            "type": "sphereface",
            "s": 128.0,
            "m": 1.4,
            "lam": {"base": 0.0, "gamma": 0.0, "power": 1.0, "min": 0.0},
        },
    }
    set_key(raw, "train.label_smoothing_mode", "others")
    set_key(raw, "calibrate.method", "fixed")
    set_key(raw, "calibrate.temperature", 3.0)
    set_key(raw, "evaluate.threshold", 0.9)
    params = parse_params(raw)
    assert params.heads["cosface"].heads["cosface"].margin.s == 128.0
    assert params.heads["sphereface"].heads["sphereface"].margin.m1 == 1.4
    assert params.heads["sphereface"].heads["sphereface"].margin.lam(10) == 0.0
    assert params.evaluate.threshold == 0.9 and params.calibrate.temperature == 3.0


BAD_VALUES = [
    ("train.epochs", 0, "train.epochs: must be an integer >= 1, got 0"),
    ("train.epochs", 2.5, "train.epochs: must be an integer >= 1"),
    ("train.epochs", True, "train.epochs: must be an integer >= 1"),
    ("train.batch_size", "64", "train.batch_size: must be an integer >= 1"),
    ("train.lr", -0.1, "train.lr: must be a number > 0"),
    ("train.lr", float("nan"), "train.lr: must be a number > 0"),
    ("train.optimizer", "rmsprop", "train.optimizer: must be one of adam, adamw, sgd"),
    ("train.schedule", "linear", "train.schedule: must be one of"),
    ("train.label_smoothing", 1.0, "train.label_smoothing: must be a number in [0, 1)"),
    (
        "train.label_smoothing_mode",
        "none",
        "train.label_smoothing_mode: must be one of all, others",
    ),
    ("train.on_nonfinite", "ignore", "train.on_nonfinite: must be one of stop, skip"),
    ("train.device", "tpu", "train.device: must be one of auto, cpu, cuda"),
    ("train.bf16", "yes", "train.bf16: must be true or false"),
    ("train.precision", "fp8", "train.precision: must be one of fp32, bf16, fp16"),
    ("train.accumulate", 5, "train.accumulate: 5 does not divide train.batch_size (64)"),
    ("train.schedule", "polynomial", "train.schedule: must be one of cosine, step, constant, poly"),
    ("train.items", ["arcface", "nope"], "train.items: 'nope' is not a head defined in heads"),
    ("train.items", [], "train.items: must be a non-empty list"),
    ("train.items", ["arcface", "arcface"], "train.items: lists an item twice"),
    (
        "train.augment",
        [{"degrees": 3}],
        "train.augment[0]: must be a mapping with a transform name",
    ),
    ("train.grad_clip_norm", 0, "train.grad_clip_norm: must be a number > 0 (or null)"),
    ("model.backbone", "vgg16", f"model.backbone: must be one of {', '.join(BACKBONES)}"),
    ("model.embedding_dim", 0, "model.embedding_dim: must be an integer >= 1"),
    ("model.small_cnn.dropout", 1.0, "model.small_cnn.dropout: must be a number in [0, 1)"),
    ("heads.arcface.type", "sphereface2", "heads.arcface.type: must be one of"),
    ("heads.arcface.s", 0, "heads.arcface.s: must be a number > 0"),
    ("heads.arcface.m", -0.5, "heads.arcface.m: must be a number >= 0"),
    ("heads.sphereface.lam.gamma", -1, "heads.sphereface.lam.gamma: must be a number >= 0"),
    ("heads.combined.m1", 0.0, "heads.combined.m1: must be a number > 0"),
    ("heads.joint.heads.cosface.s", -1, "heads.joint.heads.cosface.s: must be a number > 0"),
    ("heads.joint.heads.cosface.type", "joint", "heads.joint.heads.cosface.type: a joint group"),
    ("data.source", "mnist", "data.source: must be one of digits, imagefolder"),
    ("data.path", "faces/", "data.path: only used when data.source is imagefolder"),
    ("data.unknown_identities", -1, "data.unknown_identities: a count must be >= 0"),
    ("data.unknown_identities", 1.5, "data.unknown_identities: a fraction must lie in (0, 1)"),
    ("data.unknown_identities", True, "data.unknown_identities: must be a count"),
    ("data.unknown_identities", ["3", "3"], "data.unknown_identities: lists an identity twice"),
    ("data.val_fraction", 0.0, "data.val_fraction: must be a number in (0, 1)"),
    ("data.test_fraction", 0.9, "data.test_fraction: val_fraction + test_fraction must be < 1"),
    ("data.image_size", [8], "data.image_size: must be [height, width]"),
    ("data.channels", 2, "data.channels: must be 1 (grey) or 3 (RGB)"),
    ("data.std", 0, "data.std: must be a positive number or a list of 1"),
    ("data.mean", [0.5, 0.5], "data.mean: must be a number or a list of 1"),
    ("data.min_images_per_class", 0, "data.min_images_per_class: must be an integer >= 1"),
    ("data.seed", -1, "data.seed: must be an integer >= 0"),
    ("calibrate.method", "isotonic", "calibrate.method: must be one of fit, fixed"),
    ("calibrate.temperature", 0, "calibrate.temperature: must be a number > 0"),
    ("evaluate.rules", ["median"], "evaluate.rules: unknown ensemble rule 'median'"),
    ("evaluate.threshold", 1.5, "evaluate.threshold: must be val"),
    ("evaluate.threshold", "auto", "evaluate.threshold: must be val"),
    ("evaluate.known_rate", 0, "evaluate.known_rate: must be a number in (0, 1]"),
    ("evaluate.verification.folds", 1, "evaluate.verification.folds: must be an integer >= 2"),
    ("tracking.required", "no", "tracking.required: must be true or false"),
    ("tracking.experiment", "", "tracking.experiment: must be a non-empty string"),
]


@pytest.mark.parametrize(
    ("key", "value", "message"), BAD_VALUES, ids=[f"{k}={v!r}" for k, v, _ in BAD_VALUES]
)
def test_a_bad_value_names_its_key(key, value, message):
    raw = shipped_raw()
    set_key(raw, key, value)
    with pytest.raises(ConfigError) as caught:
        parse_params(raw)
    assert str(caught.value).startswith(message), str(caught.value)
    assert caught.value.key == message.split(":")[0]


@pytest.mark.parametrize(
    "key",
    [
        "extra",
        "train.epoch",
        "data.shuffle",
        "heads.arcface.margin",
        "heads.joint.heads.arcface.k",
        "heads.sphereface.lam.max",
        "evaluate.verification.pairs",
        "model.small_cnn.depth",
    ],
)
def test_an_unknown_key_is_an_error_naming_it(key):
    raw = shipped_raw()
    set_key(raw, key, 1)
    with pytest.raises(ConfigError, match="^" + re.escape(key) + ": unknown key"):
        parse_params(raw)


@pytest.mark.parametrize(
    "key", ["train.seed", "data.image_size", "heads.arcface.m", "evaluate", "tracking.uri"]
)
def test_a_missing_key_is_an_error_naming_it(key):
    raw = shipped_raw()
    delete_key(raw, key)
    with pytest.raises(ConfigError, match="^" + re.escape(key) + ": missing"):
        parse_params(raw)


def test_imagefolder_needs_a_path_and_test_path_excludes_a_test_fraction():
    raw = shipped_raw()
    set_key(raw, "data.source", "imagefolder")
    with pytest.raises(
        ConfigError, match=r"^data\.path: required when data\.source is imagefolder"
    ):
        parse_params(raw)
    set_key(raw, "data.path", "faces")
    set_key(raw, "data.test_path", "faces_test")
    with pytest.raises(ConfigError, match=r"^data\.test_fraction: must be 0 when data\.test_path"):
        parse_params(raw)
    set_key(raw, "data.test_fraction", 0.0)
    assert parse_params(raw).data.test_path == "faces_test"


def test_unreadable_or_invalid_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_params(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [epochs: 1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="params: must be a mapping"):
        load_params(bad)


def test_a_bad_augmentation_is_reported_by_its_entry():
    raw = tiny_raw(train__augment=[{"name": "RandomFlip"}])
    with pytest.raises(
        ConfigError, match=r"^train\.augment\[0\]\.name: 'RandomFlip' is not a transform"
    ):
        build_augmentation(parse_params(raw).train.augment)
    raw = tiny_raw(train__augment=[{"name": "RandomRotation", "degree": 5}])
    with pytest.raises(ConfigError, match=r"^train\.augment\[0\]: RandomRotation"):
        build_augmentation(parse_params(raw).train.augment)
    raw = tiny_raw(train__augment=[{"name": "RandomRotation", "degrees": 5}])
    transform = build_augmentation(parse_params(raw).train.augment)
    image = torch.rand(1, 8, 8)
    assert transform(image).shape == (1, 8, 8)


@pytest.mark.parametrize("classes", [2, 8, 40])
def test_label_smoothing_over_the_other_classes_matches_the_original_definition(classes):
    generator = torch.Generator().manual_seed(classes)
    logits = torch.randn(32, classes, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, classes, (32,), generator=generator)
    epsilon = 0.1
    # The original: the true class keeps 1 - eps, each other class gets eps / (C - 1).
    target = torch.full((32, classes), epsilon / (classes - 1), dtype=torch.float64)
    target[torch.arange(32), labels] = 1.0 - epsilon
    expected = -(target * F.log_softmax(logits, dim=1)).sum(1).mean()
    smoothing = effective_label_smoothing(epsilon, classes, "others")
    actual = F.cross_entropy(logits, labels, label_smoothing=smoothing)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    assert effective_label_smoothing(epsilon, classes, "all") == epsilon


def test_a_stage_with_a_bad_params_file_exits_non_zero_naming_the_key(tmp_path):
    params = write_params(tmp_path, tiny_raw(train__epochs=0))
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.train", "arcface", "--params", str(params)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "train.epochs: must be an integer >= 1, got 0" in result.stderr
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------------------------------
# params.schema.json: generated from the models, so editors complete and check params.yaml.


def schema_validator():
    jsonschema = pytest.importorskip("jsonschema")  # a dev dependency (pyproject.toml)
    schema = json.loads((REPO / SCHEMA_FILE).read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_the_committed_schema_is_the_generated_one():
    committed = (REPO / SCHEMA_FILE).read_text(encoding="utf-8")
    assert committed == params_schema(), (
        "params.schema.json is stale: run `python -m angular.config --schema > params.schema.json`"
    )


@pytest.mark.parametrize(
    ("path", "schema"),
    [
        (SHIPPED_PARAMS, "params.schema.json"),
        (REPO / "experiments" / "faces" / "params.yaml", "../../params.schema.json"),
    ],
)
def test_params_files_name_the_schema_and_satisfy_it(path, schema):
    text = path.read_text(encoding="utf-8")
    assert text.splitlines()[0] == f"# yaml-language-server: $schema={schema}"
    assert (path.parent / schema).resolve() == (REPO / SCHEMA_FILE).resolve()
    errors = list(schema_validator().iter_errors(read_yaml(text, path)))
    assert not errors, [error.message for error in errors]


# The schema says what the loader says for keys, types and ranges (rules between keys are the
# loader's alone: the (0, 1) share of val_fraction + test_fraction, train.items naming heads).
SCHEMA_CASES = [
    ("extra", 1),
    ("train.epoch", 1),
    ("heads.arcface.margin", 1),
    ("heads.sphereface.lam.max", 1),
    ("heads.joint.heads.arcface.k", 1),
    ("train.epochs", 0),
    ("train.epochs", 2.5),
    ("train.epochs", True),
    ("train.lr", "fast"),
    ("train.optimizer", "rmsprop"),
    ("train.bf16", "no"),
    ("train.precision", "fp8"),
    ("train.accumulate", 0),
    ("train.warmup_steps", -1),
    ("train.items", []),
    ("train.items", ["arcface", "arcface"]),
    ("train.augment", [{"degrees": 3}]),
    ("heads.arcface.type", "sphereface2"),
    ("heads.arcface.m", -0.5),
    ("heads.joint.heads.cosface.type", "joint"),
    ("heads.sphereface.lam", [1, 2]),
    ("data.image_size", [8]),
    ("data.std", 0),
    ("data.unknown_identities", 1.5),
    ("data.unknown_identities", ["3", "3"]),
    ("evaluate.threshold", "auto"),
    ("evaluate.rules", ["median"]),
    ("tracking.experiment", ""),
]


@pytest.mark.parametrize(
    ("key", "value"), SCHEMA_CASES, ids=[f"{k}={v!r}" for k, v in SCHEMA_CASES]
)
def test_the_schema_rejects_what_the_loader_rejects(key, value):
    raw = shipped_raw()
    set_key(raw, key, value)
    with pytest.raises(ConfigError):
        parse_params(raw)
    assert not schema_validator().is_valid(raw)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("data.path", None),
        ("train.augment", None),
        ("evaluate.threshold", 0.9),
        ("data.mean", [0.5]),
        ("data.unknown_identities", ["a", "b"]),
        ("heads.arcface.straight_through", True),
    ],
)
def test_the_schema_accepts_what_the_loader_accepts(key, value):
    raw = shipped_raw()
    set_key(raw, key, value)
    parse_params(raw)
    assert schema_validator().is_valid(raw)


def test_config_objects_are_frozen_pydantic_models():
    params = load_params(SHIPPED_PARAMS)
    with pytest.raises(pydantic.ValidationError):
        params.train.epochs = 3
    with pytest.raises(pydantic.ValidationError):
        params.heads["arcface"].heads["arcface"].straight_through = True
    changed = params.train.model_copy(update={"epochs": 3})
    assert changed.epochs == 3 and params.train.epochs == 12
    assert params.train.model_dump()["augment"][0]["name"] == "RandomAffine"
