"""Helpers of the pipeline tests: the shipped params made small, image folders, and the fixtures that
conftest.py re-exports (a uniquely named module, so that no other conftest.py can shadow it).

Every test that runs a stage works in its own temporary project folder (the stages read and write
paths relative to the current directory), with a copy of a prepared data set.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[2]

from angular.config import TrackingConfig, parse_params  # noqa: E402
from angular.data import prepare_dataset  # noqa: E402
from angular.train.loop import TrainPaths  # noqa: E402
from angular.train.tracking import StageRun  # noqa: E402

SHIPPED_PARAMS = REPO / "params.yaml"
ORL = REPO / "../shared/data/orl"
STEPS_PER_EPOCH = 15  # 935 training digits (shipped data params) in batches of 64


def shipped_raw() -> dict:
    return yaml.safe_load(SHIPPED_PARAMS.read_text(encoding="utf-8"))


def set_key(raw: dict, dotted: str, value) -> None:
    """Set ``raw["a"]["b"] = value`` for ``"a.b"`` (creating nothing: the path must exist but the last key)."""
    *parents, last = dotted.split(".")
    node = raw
    for part in parents:
        node = node[part]
    node[last] = value


def delete_key(raw: dict, dotted: str) -> None:
    *parents, last = dotted.split(".")
    node = raw
    for part in parents:
        node = node[part]
    del node[last]


def tiny_raw(**overrides) -> dict:
    """The shipped params, shrunk so a training epoch on digits takes a fraction of a second.
    ``overrides`` use ``__`` for dots: ``train__epochs=3``."""
    raw = copy.deepcopy(shipped_raw())
    raw["model"]["embedding_dim"] = 16
    raw["model"]["small_cnn"]["width"] = 8
    raw["train"].update(epochs=2, batch_size=64, augment=[], num_threads=1, keep_checkpoints=2)
    raw["calibrate"]["num_threads"] = 1
    raw["evaluate"].update(num_threads=1, embedding_plot=False)
    raw["tracking"]["enabled"] = False
    for key, value in overrides.items():
        set_key(raw, key.replace("__", "."), value)
    return raw


def write_params(folder: Path, raw: dict) -> Path:
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def make_image_folder(
    root: Path, counts: dict[str, int], *, size=(12, 10), suffix=".png", seed=0
) -> Path:
    """One sub-folder per identity with ``counts[identity]`` random greyscale images."""
    rng = np.random.default_rng(seed)
    for identity, count in counts.items():
        folder = root / identity
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            pixels = rng.integers(0, 256, size=size, dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{index}{suffix}")
    return root


@pytest.fixture(scope="session")
def digits_prepared(tmp_path_factory) -> Path:
    """The digits data set prepared once per session with the shipped data params."""
    out = tmp_path_factory.mktemp("digits") / "prepared"
    prepare_dataset(parse_params(shipped_raw()).data, out)
    return out


@pytest.fixture
def project(tmp_path, monkeypatch, digits_prepared):
    """A temporary project folder (the current directory) holding prepared digits at data/prepared
    and tiny params; returns the folder."""
    shutil.copytree(digits_prepared, tmp_path / "data" / "prepared")
    write_params(tmp_path, tiny_raw())
    monkeypatch.chdir(tmp_path)
    return tmp_path


def paths_in(folder: Path) -> TrainPaths:
    """A training run's output paths, all inside ``folder``."""
    return TrainPaths(
        model=folder / "model.pt",
        checkpoints=folder / "checkpoints",
        metrics=folder / "metrics.json",
        loss_plot=folder / "loss.tsv",
        accuracy_plot=folder / "accuracy.tsv",
        collapse_plot=folder / "collapse.tsv",
    )


def create_empty_store(folder: Path) -> Path:
    """An MLflow SQLite store in ``folder`` with its tables created; tests copy it, because a
    fresh store costs seconds of migrations."""
    path = folder / "mlflow.db"
    setup = TrackingConfig(
        enabled=True, uri=f"sqlite:///{path}", experiment="setup", required=False
    )
    with StageRun(setup, stage="setup") as run:
        assert run.active
    return path


def model_state(path: Path) -> dict:
    return torch.load(path, weights_only=True)["state_dict"]


def assert_same_state(first: dict, second: dict) -> None:
    """Bitwise equality of two state dicts."""
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
