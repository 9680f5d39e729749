"""Every key of params.yaml is validated (type, range, known names), and an invalid file stops each
stage with the key and the reason and a non-zero exit status (docs/reliability.md, Config).

The keys come from the shipped ``params.yaml`` itself, so a key added there is covered at once: it
gets wrong-typed values derived from its shipped value, and must have an entry in ``BAD_VALUES``
(right type, value out of range or an unknown name) unless it is a boolean (the only keys where a
right-typed value cannot be wrong).
"""

from __future__ import annotations

import copy
import math

import pytest
import yaml
from reliability_testing import run_stage_process, set_key, shipped_raw, tiny_raw, write_params

from angular.config import ConfigError, load_params, parse_params
from angular.data import build_augmentation
from pipeline import EXIT_CONFIG, run_stage
from pipeline import prepare as prepare_stage
from pipeline import train as train_stage

HEAD_TYPES = ["sphereface2", "ArcFace", ""]  # unknown names (the presets are lower-case)

# Right-typed values that are still wrong: out of range, an unknown name, a bad combination.
BAD_VALUES: dict[str, list] = {
    "data.source": ["mnist", "Digits"],
    "data.path": ["", "faces/"],  # empty; set while data.source is digits
    "data.test_path": ["", "test/"],
    "data.unknown_identities": [-1, 1.5, 0.0, ["3", "3"], [""]],
    "data.val_fraction": [0.0, 1.0, -0.1, math.inf],
    "data.test_fraction": [0.0, 1.0, -0.1, 0.9],
    "data.min_images_per_class": [0, -2],
    "data.seed": [-1],
    "data.max_images_per_class": [0, -3],
    "data.crop": [
        [3, 1, 2, 4],
        [0, 0, 8],
        [0, -1, 4, 4],
        {"central": 0},
        {"central": 1.5},
        {"box": [0, 0, 4, 4]},
    ],
    "data.image_size": [[0, 8], [8], [8, 8, 8], [-8, 8]],
    "data.channels": [2, 0, 4],
    "data.mean": [math.inf, math.nan, [0.5, 0.5]],
    "data.std": [0.0, -0.5, math.inf, [0.5, 0.5]],
    "model.backbone": ["vgg16", "resnet50", "Small_CNN"],
    "model.embedding_dim": [0, -64],
    "model.small_cnn.width": [0],
    "model.small_cnn.dropout": [1.0, -0.1],
    "model.small_cnn.blocks": [0, 1.5, "3"],
    "model.small_cnn.convs_per_block": [0, -1, True],
    "model.mobilefacenet.scale": [0, 1.5, True],
    "model.iresnet.dropout": [1.0, -0.1, "0"],
    "heads.arcface.type": HEAD_TYPES,
    "heads.arcface.s": [0.0, -64.0, math.inf],
    "heads.arcface.m": [-0.5, math.nan],
    "heads.cosface.type": HEAD_TYPES,
    "heads.cosface.s": [0.0, -1.0],
    "heads.cosface.m": [-0.35, math.inf],
    "heads.sphereface.type": HEAD_TYPES,
    "heads.sphereface.s": [0.0],
    "heads.sphereface.m": [0.0, -4.0],
    "heads.sphereface.lam.base": [-1.0, math.inf],
    "heads.sphereface.lam.gamma": [-0.12],
    "heads.sphereface.lam.power": [-1.0],
    "heads.sphereface.lam.min": [-5.0],
    "heads.combined.type": HEAD_TYPES,
    "heads.combined.s": [0.0],
    "heads.combined.m1": [0.0, -1.0],
    "heads.combined.m2": [-0.3],
    "heads.combined.m3": [math.inf, -math.inf, math.nan],  # any finite number is allowed
    "heads.adaface.type": HEAD_TYPES,
    "heads.adaface.s": [0.0],
    "heads.adaface.m": [-0.4],
    "heads.adaface.h": [-0.1, math.inf],
    "heads.adaface.t_alpha": [-0.01, 1.5],
    "heads.elasticface_arc.type": HEAD_TYPES,
    "heads.elasticface_arc.s": [0.0],
    "heads.elasticface_arc.m": [-0.5],
    "heads.elasticface_arc.std": [-0.05, math.nan],
    "heads.elasticface_cos.type": HEAD_TYPES,
    "heads.elasticface_cos.s": [-1.0],
    "heads.elasticface_cos.m": [-0.35],
    "heads.elasticface_cos.std": [-1.0],
    "heads.magface.type": HEAD_TYPES,
    "heads.magface.s": [0.0],
    "heads.magface.l_a": [0.0, -10.0],
    "heads.magface.u_a": [0.0, 5.0],  # u_a <= l_a
    "heads.magface.l_m": [-0.1],
    "heads.magface.u_m": [-0.8, 0.4],  # u_m < l_m
    "heads.magface.lambda_g": [-1.0, 20.0],  # below MagFace's bound (22.6 at s = 64)
    "heads.curricularface.type": HEAD_TYPES,
    "heads.curricularface.s": [0.0],
    "heads.curricularface.m": [-0.5],
    "heads.subcenter_arcface.type": HEAD_TYPES,
    "heads.subcenter_arcface.s": [0.0],
    "heads.subcenter_arcface.m": [-0.5],
    "heads.subcenter_arcface.k": [0, -3],
    "heads.joint.type": HEAD_TYPES,
    "heads.joint.heads.arcface.type": HEAD_TYPES + ["joint"],
    "heads.joint.heads.arcface.s": [0.0],
    "heads.joint.heads.arcface.m": [-0.5],
    "heads.joint.heads.cosface.type": HEAD_TYPES + ["joint"],
    "heads.joint.heads.cosface.s": [-64.0],
    "heads.joint.heads.cosface.m": [-1.0],
    "heads.joint.heads.sphereface.type": HEAD_TYPES + ["joint"],
    "heads.joint.heads.sphereface.s": [0.0],
    "heads.joint.heads.sphereface.m": [0.0],
    "heads.joint.heads.sphereface.lam.base": [-1.0],
    "heads.joint.heads.sphereface.lam.gamma": [-1.0],
    "heads.joint.heads.sphereface.lam.power": [-1.0],
    "heads.joint.heads.sphereface.lam.min": [-1.0],
    "train.items": [[], ["nope"], ["arcface", "arcface"], ["arcface", "joint", "combined", "Arc"]],
    "train.epochs": [0, -1],
    "train.batch_size": [0],
    "train.optimizer": ["rmsprop", "Adam"],
    "train.lr": [0.0, -0.003, math.inf, math.nan],
    "train.weight_decay": [-0.1],
    "train.momentum": [1.0, -0.1],
    "train.schedule": ["linear"],
    "train.poly_power": [0.0, -2.0, math.inf],
    "train.warmup_steps": [-1, 1.5],
    "train.warmup_epochs": [-0.5, math.nan],
    "train.accumulate": [0, 3, -1],  # 3 does not divide the batch
    "train.precision": ["fp8", "FP16", "half"],
    "train.step_size": [0],
    "train.gamma": [0.0, 1.5],
    "train.label_smoothing": [1.0, -0.1],
    "train.label_smoothing_mode": ["none", "All"],
    "train.grad_clip_norm": [0.0, -5.0],
    "train.augment": [[{"degrees": 3}], ["RandomAffine"], [{"name": 3}]],
    "train.device": ["tpu", "gpu", "cuda:0"],
    "train.seed": [-1],
    "train.num_threads": [-1],
    "train.num_workers": [-1],
    "train.on_nonfinite": ["ignore", "raise"],
    "train.on_collapse": ["skip", "STOP"],
    "train.centre_norm": [0.0, -1.0, math.inf, math.nan],
    "train.collapse.max_centre_cosine": [-1.5, 1.01, math.nan],
    "train.collapse.max_accuracy_drop": [0.0, 1.0, -0.1],
    "train.collapse.min_room": [-1.0, math.inf],
    "train.keep_checkpoints": [0],
    "train.distributed.world_size": [0, -2],
    "train.distributed.backend": ["mpi", "NCCL"],
    "train.distributed.sample_rate": [0.0, 1.5, -0.1, math.nan],
    "train.distributed.timeout_s": [0.0, -1.0, math.inf],
    "train.distributed.gather_head_mib": [-1.0, math.inf, "big"],
    "train.sampler": ["priority", "Uniform", ""],
    "train.prioritized.alpha": [-0.6, math.inf],
    "train.prioritized.beta": [-0.1, 1.5],
    "train.prioritized.eps": [0.0, -1e-6],
    "calibrate.method": ["isotonic"],
    "calibrate.temperature": [0.0, -1.0],
    "calibrate.n_bins": [0],
    "calibrate.max_iter": [0],
    "calibrate.batch_size": [0],
    "calibrate.num_threads": [-1],
    "evaluate.rules": [["median"], ["vote", "vote"]],
    "evaluate.threshold": ["auto", 1.5, -0.1],
    "evaluate.known_rate": [0.0, 1.5],
    "evaluate.members.rule": ["best", "mean_prob"],
    "evaluate.members.threshold": [-0.1, 1.5, math.nan],
    "evaluate.n_bins": [0],
    "evaluate.batch_size": [0],
    "evaluate.num_threads": [-1],
    "evaluate.verification.impostors_per_genuine": [0.0, -1.0],
    "evaluate.verification.max_impostors": [0],
    "evaluate.verification.folds": [1, 0],
    "evaluate.verification.seed": [-1],
    "evaluate.verification.pairs_file": [""],
    "evaluate.verification.pairs_root": ["", " "],
    "evaluate.unknown_far": [0.0, 1.0, -0.1, math.nan],
    "tracking.register_model": ["", "  "],
    "evaluate.verification.gallery_far": [0.0, 1.0, -0.1, "1e-2"],
    "tracking.uri": [""],
    "tracking.experiment": [""],
    "evaluate.verification.bins": ["lfw.bin", [1], ["a/lfw.bin", "b/lfw.bin"]],
    "evaluate.verification.fars": [[], [0.0], [1.0], [0.001, 0.001]],
    "model.init_from": [
        {"format": "onnx", "path": "b.pth"},
        {"format": "insightface", "path": ""},
        {"format": "insightface", "path": "b.pth"},  # the shipped small_cnn is not an iresnet
    ],
    "data.align": [{"size": 112}, {"landmarks": "l.tsv", "size": 0}, {"landmarks": "l.tsv"}],
    "train.checkpoint_every_steps": [-1, 1.5],
    "train.verification": [{"bins": []}, {"bins": ["lfw.bin"], "every_steps": 0}],
}
# Keys whose documented value may be null (a wrong-typed null is tested for every other key).
NULLABLE = {
    "data.path",
    "data.max_images_per_class",
    "data.crop",
    "train.centre_norm",
    "data.test_path",
    "train.grad_clip_norm",
    "train.augment",
    "evaluate.verification.impostors_per_genuine",
    "evaluate.verification.max_impostors",
    "evaluate.verification.pairs_file",
    "evaluate.verification.pairs_root",
    "tracking.register_model",
    "tracking.uri",
    "model.init_from",
    "data.align",
    "train.verification",
}


def leaves(node, prefix: str = ""):
    """``(dotted key, value)`` of every leaf (a scalar or a list) of the params mapping."""
    for key, value in node.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and value:
            yield from leaves(value, dotted)
        else:
            yield dotted, value


def sections(node, prefix: str = ""):
    for key, value in node.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            yield dotted
            yield from sections(value, dotted)


SHIPPED = dict(leaves(shipped_raw()))


def wrong_types(value) -> list:
    """Values of another type than the shipped ``value`` (none of them valid for any key)."""
    if isinstance(value, bool):
        return ["yes", "true", 1, 0, None]
    if isinstance(value, int):
        return ["3", 2.5, True, None, {}]
    if isinstance(value, float):
        return ["0.5", True, None, {"value": value}]
    if isinstance(value, str):
        return [3, True, None, {}, [value]]
    if isinstance(value, list):
        return ["x", 3, True, None, {}]
    if isinstance(value, dict):
        return ["x", 3, True, None, [value]]
    assert value is None, f"unexpected shipped value {value!r}"
    return [5, True, {}, [1]]


# Keys shipped as null whose other values are numbers: wrong types are those of a number.
NUMBER_OR_NULL = {"train.centre_norm": 1.0, "data.max_images_per_class": 30}
# Keys shipped as null whose other values are mappings: wrong types are those of a mapping (a mapping
# that lacks a key is in BAD_VALUES).
MAPPING_OR_NULL = {
    "model.init_from": {"format": "insightface", "path": "backbone.pth"},
    "data.align": {"landmarks": "landmarks.tsv", "size": 112},
    "train.verification": {"bins": ["lfw.bin"], "every_steps": 100},
}

WRONG = [
    (key, bad)
    for key, value in SHIPPED.items()
    for bad in wrong_types(NUMBER_OR_NULL.get(key, MAPPING_OR_NULL.get(key, value)))
    if not (bad is None and key in NULLABLE)
]
RANGE = [(key, bad) for key, values in BAD_VALUES.items() for bad in values]


def assert_rejected(key: str, value) -> ConfigError:
    raw = shipped_raw()
    set_key(raw, key, value)
    try:
        parse_params(raw)
    except ConfigError as caught:
        error = caught
    else:
        pytest.fail(
            f"{key}: {value!r} was accepted. If it is a valid value now, update NULLABLE or "
            "BAD_VALUES in tests/config/test_config_errors.py; else validate it."
        )
    # A list entry or a mapping's key may be named more precisely: train.augment[0], data.align.size.
    assert error.key == key or error.key.startswith((f"{key}[", f"{key}.")), (
        f"{key}={value!r}: {error}"
    )
    assert str(error).startswith(f"{error.key}: ") and len(error.problem) > 10, str(error)
    return error


def test_the_key_tables_cover_every_key_of_the_shipped_file():
    booleans = {key for key, value in SHIPPED.items() if isinstance(value, bool)}
    missing = sorted(set(SHIPPED) - booleans - set(BAD_VALUES))
    assert not missing, f"add these keys of params.yaml to BAD_VALUES: {missing}"
    stale = sorted(set(BAD_VALUES) - set(SHIPPED))
    assert not stale, f"BAD_VALUES lists keys params.yaml no longer has: {stale}"
    assert booleans >= {"data.skip_bad_images", "train.deterministic", "tracking.required"}
    assert len(SHIPPED) >= 80


@pytest.mark.parametrize("key", sorted(NULLABLE))
def test_nullable_keys_really_accept_null(key):
    raw = shipped_raw()
    set_key(raw, key, None)
    parse_params(raw)


@pytest.mark.parametrize(("key", "value"), WRONG, ids=[f"{k}={v!r}" for k, v in WRONG])
def test_a_wrong_typed_value_names_its_key(key, value):
    error = assert_rejected(key, value)
    assert "must" in error.problem or "only used" in error.problem, str(error)


@pytest.mark.parametrize(("key", "value"), RANGE, ids=[f"{k}={v!r}" for k, v in RANGE])
def test_an_out_of_range_value_or_unknown_name_names_its_key(key, value):
    assert_rejected(key, value)


@pytest.mark.parametrize("key", list(sections(shipped_raw())))
def test_a_section_that_is_not_a_mapping_names_its_key(key):
    for value in ([1, 2], "x", 3):
        raw = shipped_raw()
        set_key(raw, key, value)
        with pytest.raises(ConfigError) as caught:
            parse_params(raw)
        assert caught.value.key == key, str(caught.value)


# Keys that may be left out (older params files): their default (angular/config.py's docstring).
OPTIONAL = {
    "train.channels_last": False,
    "train.poly_power": 2.0,
    "train.warmup_steps": 0,
    "train.warmup_epochs": 0.0,
    "train.accumulate": 1,
    "model.mobilefacenet.checkpoint": False,
    "model.iresnet.checkpoint": False,
    "data.max_images_per_class": None,
    "data.crop": None,
    "evaluate.verification.pairs_file": None,
    "evaluate.verification.pairs_root": None,
    "evaluate.unknown_far": 0.05,
    "evaluate.verification.flip_test": False,
    "evaluate.verification.gallery_far": 0.01,
    "tracking.register_model": None,
    "data.align": None,
    "model.init_from": None,
    "train.checkpoint_every_steps": 0,
    "train.verification": None,
    "evaluate.verification.bins": (),
    "evaluate.verification.fars": (0.1, 0.01, 0.001),
    "train.distributed.gather_head_mib": 1024.0,
}


RENAMED = {"train.bf16": "train.precision"}  # deprecated key: the key that replaced it


@pytest.mark.parametrize("key", list(SHIPPED))
def test_a_misspelt_or_missing_key_names_it(key):
    raw = shipped_raw()
    *parents, last = key.split(".")
    node = raw
    for part in parents:
        node = node[part]
    value = node.pop(last)
    if key in OPTIONAL:
        section = parse_params(raw)
        for part in parents:
            section = getattr(section, part)
        assert getattr(section, last) == OPTIONAL[key]
    else:
        with pytest.raises(ConfigError) as caught:
            parse_params(raw)
        # Without the deprecated train.bf16 the key that replaced it is missing.
        missing = RENAMED.get(key, key)
        assert caught.value.key == missing and "missing" in caught.value.problem, str(caught.value)
    node[last + "s"] = value
    with pytest.raises(ConfigError) as caught:
        parse_params(raw)
    assert caught.value.key in (key, f"{key}s"), str(caught.value)


# --------------------------------------------------------------------------------------------------
# train.augment: each entry is a torchvision transform, built (so checked) before training starts.

BAD_TRANSFORMS = [
    ({"name": "RandomAffine", "degrees": "ten"}, "train.augment[0]"),
    ({"name": "RandomAffine", "degrees": 10, "translate": 0.1}, "train.augment[0]"),
    ({"name": "RandomAffine", "degrees": 10, "scale": [0.9, "x"]}, "train.augment[0]"),
    ({"name": "RandomAffine", "degree": 10}, "train.augment[0]"),
    ({"name": "RandomFlip"}, "train.augment[0].name"),
    ({"name": "to_image"}, "train.augment[0].name"),  # a function of v2, not a transform
]


@pytest.mark.parametrize(("entry", "key"), BAD_TRANSFORMS, ids=[str(e) for e, _ in BAD_TRANSFORMS])
def test_a_bad_transform_names_its_entry(entry, key):
    params = parse_params(tiny_raw(train__augment=[entry]))
    with pytest.raises(ConfigError) as caught:
        build_augmentation(params.train.augment)
    assert caught.value.key == key, str(caught.value)


def test_the_train_stage_rejects_a_bad_transform_before_training(project, capsys):
    write_params(project, tiny_raw(train__augment=[{"name": "RandomAffine", "degrees": "ten"}]))
    assert run_stage(train_stage.main, ["arcface"]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "error in params.yaml: train.augment[0]: RandomAffine" in err and "degrees" in err
    checkpoints = project / "outputs" / "checkpoints" / "arcface"
    assert not checkpoints.exists() or not list(checkpoints.iterdir())


def test_an_item_not_in_train_items_is_a_config_error_of_the_stage(project, capsys):
    assert run_stage(train_stage.main, ["combined"]) == EXIT_CONFIG
    assert "train.items: 'combined' is not listed" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# The file is read as DVC reads it (YAML 1.2, as `dvc params diff` and `dvc exp run -S` see it).

# (text of a value, what DVC's parser makes of it)
SCALARS = [
    "1e-3",
    "3E-4",
    "-2.5e+2",
    "1.0e-3",
    ".5",
    "2.",
    "1_000",
    "0.003",
    "10",
    ".inf",
    "-.inf",
    "true",
    "False",
    "yes",
    "no",
    "on",
    "off",
    "y",
    "null",
    "~",
    "0x1F",
    "arcface",
    "'1e-3'",
]


def dvc_parse(text: str):
    from dvc.utils.serialize import parse_yaml

    return parse_yaml(text, "params.yaml")


@pytest.mark.parametrize("scalar", SCALARS)
def test_values_are_read_as_dvc_reads_them(tmp_path, scalar):
    from angular.config import read_yaml

    text = f"a:\n  b: {scalar}\n"
    ours = read_yaml(text, tmp_path / "params.yaml")
    theirs = dvc_parse(text)
    assert type(ours["a"]["b"]) is type(theirs["a"]["b"]), (ours, theirs)
    assert ours == theirs or (math.isnan(ours["a"]["b"]) and math.isnan(theirs["a"]["b"]))


def test_a_learning_rate_in_exponent_notation_is_a_number(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tiny_raw(), sort_keys=False).replace("lr: 0.003", "lr: 3e-3"))
    assert "lr: 3e-3" in path.read_text()
    assert load_params(path).train.lr == 0.003
    assert dvc_parse(path.read_text())["train"]["lr"] == 0.003


def test_yes_is_not_a_boolean(tmp_path):
    """YAML 1.1 read ``yes`` as true; DVC (YAML 1.2) reads a string: the stage says so."""
    path = tmp_path / "params.yaml"
    text = yaml.safe_dump(tiny_raw(), sort_keys=False)
    path.write_text(text.replace("deterministic: true", "deterministic: no"))
    with pytest.raises(
        ConfigError, match=r"^train\.deterministic: must be true or false, got 'no'"
    ):
        load_params(path)


def test_a_key_given_twice_is_an_error_naming_it_and_its_lines(tmp_path):
    raw = tiny_raw()
    text = yaml.safe_dump(raw, sort_keys=False)
    text = text.replace("  epochs: 2\n", "  epochs: 2\n  batch_size: 32\n  epochs: 5\n", 1)
    path = tmp_path / "params.yaml"
    path.write_text(text)
    lines = text.splitlines()
    first = lines.index("  epochs: 2") + 1
    second = lines.index("  epochs: 5") + 1
    with pytest.raises(ConfigError) as caught:
        load_params(path)
    assert caught.value.key == "train.epochs", str(caught.value)
    assert f"lines {first} and {second}" in str(caught.value), str(caught.value)
    # DVC refuses the file too (its message only says the file is corrupted).
    from dvc.utils.serialize import YAMLFileCorruptedError

    with pytest.raises(YAMLFileCorruptedError):
        dvc_parse(text)


def test_a_top_level_key_given_twice_and_nested_duplicates(tmp_path):
    path = tmp_path / "params.yaml"
    text = yaml.safe_dump(tiny_raw(), sort_keys=False)
    path.write_text(text + "tracking:\n  enabled: true\n")
    with pytest.raises(ConfigError, match=r"^tracking: given twice"):
        load_params(path)
    path.write_text(text.replace("    m: 0.5\n", "    m: 0.5\n    m: 0.6\n", 1))
    with pytest.raises(ConfigError, match=r"^heads\.arcface\.m: given twice"):
        load_params(path)


# --------------------------------------------------------------------------------------------------
# Every stage, as a process: a bad file stops it with exit code 2, the key and the reason, no traceback.

STAGE_CASES = [
    ("prepare", [], "data.val_fraction", 1.5, "data.val_fraction: must be a number in (0, 1)"),
    ("train", ["arcface"], "train.lr", "fast", "train.lr: must be a number > 0, got 'fast' (str)"),
    ("calibrate", ["arcface"], "calibrate.extra", 1, "calibrate.extra: unknown key"),
    ("evaluate", [], "evaluate.rules", ["median"], "evaluate.rules: unknown ensemble rule"),
]


@pytest.mark.parametrize(
    ("stage", "args", "key", "value", "message"), STAGE_CASES, ids=[c[0] for c in STAGE_CASES]
)
def test_each_stage_stops_on_a_bad_file_with_the_key_and_exit_code_2(
    tmp_path, stage, args, key, value, message
):
    raw = tiny_raw()
    set_key(raw, key, value)
    write_params(tmp_path, raw)
    result = run_stage_process(tmp_path, stage, *args)
    assert result.returncode == EXIT_CONFIG, result.stderr
    assert f"error in params.yaml: {message}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "outputs").exists()


def test_a_stage_stops_on_a_file_that_is_not_yaml_or_missing(tmp_path, monkeypatch, capsys):
    (tmp_path / "params.yaml").write_text("train: [epochs: 1\n")
    result = run_stage_process(tmp_path, "prepare")
    assert result.returncode == EXIT_CONFIG
    assert "params.yaml: not valid YAML" in result.stderr and "Traceback" not in result.stderr
    (tmp_path / "params.yaml").unlink()
    monkeypatch.chdir(tmp_path)  # the same exit in-process (a process per case costs seconds)
    assert run_stage(prepare_stage.main, []) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "params.yaml: no such file" in err and "Traceback" not in err


def test_copies_of_the_shipped_file_parse(tmp_path):
    """The tables above start from a valid file: the shipped one and its tiny copy."""
    parse_params(shipped_raw())
    parse_params(copy.deepcopy(tiny_raw()))
