"""The ``data`` keys of issue 25: ``source: insightface_rec`` (with an optional validation split)
and ``align: {landmarks, size}``; each wrong use is one error naming its key."""

from __future__ import annotations

import pytest
from pipeline_testing import shipped_raw

from angular.config import ConfigError, parse_params
from angular.config.data import Align


def data_of(**data):
    raw = shipped_raw()
    raw["data"].update(data)
    raw["train"]["preload_images"] = False  # refused with a RecordIO set: tested below
    return parse_params(raw).data


def test_a_record_set_is_never_preloaded():
    raw = shipped_raw()
    raw["data"].update(REC)
    raw["train"]["preload_images"] = True
    with pytest.raises(ConfigError) as caught:
        parse_params(raw)
    assert caught.value.key == "train.preload_images"
    assert "RecordIO" in str(caught.value) and "\n" not in str(caught.value)


REC = dict(source="insightface_rec", path="sets/casia")
FOLDER = dict(source="imagefolder", path="faces")
ALIGN = {"landmarks": "faces/landmarks.tsv"}


def test_defaults_keep_older_params_files_valid():
    raw = shipped_raw()
    raw["data"].pop("align", None)
    assert parse_params(raw).data.align is None


def test_a_record_set_is_a_source_with_an_optional_validation_split():
    config = data_of(**REC, val_fraction=0.0)
    assert config.source == "insightface_rec" and config.path == "sets/casia"
    assert config.val_fraction == 0.0 and isinstance(config.val_fraction, float)
    assert data_of(**REC, val_fraction=0.1).val_fraction == 0.1
    assert data_of(**REC | {"path": "sets/casia/train.rec"}).path.endswith("train.rec")


def test_align_has_a_default_size():
    config = data_of(**FOLDER, align=ALIGN)
    assert config.align == Align(landmarks="faces/landmarks.tsv", size=112)
    assert data_of(**FOLDER, align=ALIGN | {"size": 96}).align.size == 96


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (dict(source="insightface_rec"), "data.path: required when data.source is insightface_rec"),
        (dict(source="imagefolder"), "data.path: required when data.source is imagefolder"),
        (dict(path="x"), "data.path: only used when data.source is imagefolder or insightface_rec"),
        (
            REC | dict(test_path="t", test_fraction=0.0),
            "data.test_path: only used when data.source is imagefolder (it is insightface_rec)",
        ),
        (REC | dict(crop={"central": 0.5}), "data.crop: not used with data.source insightface_rec"),
        (REC | dict(align=ALIGN), "data.align: only used when data.source is imagefolder"),
        (dict(align=ALIGN), "data.align: only used when data.source is imagefolder (it is digits)"),
        (
            FOLDER | dict(align=ALIGN, crop=[0, 0, 4, 4]),
            "data.align: give data.align or data.crop, not both",
        ),
        (
            FOLDER | dict(align=ALIGN, test_path="t", test_fraction=0.0),
            "data.align: not supported with data.test_path",
        ),
        (FOLDER | dict(align={"size": 112}), "data.align.landmarks: missing"),
        (FOLDER | dict(align=ALIGN | {"size": 0}), "data.align.size: must be an integer >= 1"),
        (FOLDER | dict(align=ALIGN | {"size": 112.0}), "data.align.size: must be an integer >= 1"),
        (
            FOLDER | dict(align=ALIGN | {"landmarks": ""}),
            "data.align.landmarks: must be a non-empty",
        ),
        (FOLDER | dict(align=ALIGN | {"scale": 1}), "data.align.scale: unknown key"),
        (FOLDER | dict(align="faces/landmarks.tsv"), "data.align: must be a mapping"),
        (
            FOLDER | dict(val_fraction=0.0),
            "data.val_fraction: must be a number in (0, 1), got 0.0 (0, no validation split, only "
            "with data.source insightface_rec)",
        ),
        (dict(val_fraction=0), "data.val_fraction: must be a number in (0, 1), got 0 (0, no"),
        (REC | dict(val_fraction=-0.1), "data.val_fraction: must be a number in (0, 1), got -0.1"),
        (REC | dict(val_fraction=1.0), "data.val_fraction: must be a number in (0, 1), got 1.0"),
        (
            REC | dict(val_fraction=False),
            "data.val_fraction: must be a number in (0, 1), got False",
        ),
        (
            REC | dict(val_fraction=0.0, test_fraction=0.0),
            "data.test_fraction: must be > 0 (the test split is drawn from data.path",
        ),
    ],
)
def test_each_wrong_use_names_its_key(data, message):
    with pytest.raises(ConfigError) as caught:
        data_of(**data)
    assert str(caught.value).startswith(message), str(caught.value)
    assert caught.value.key == message.split(":")[0]
    assert "\n" not in str(caught.value)
