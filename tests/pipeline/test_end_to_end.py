"""The whole pipeline: repeatable results, and `dvc repro` that reruns exactly what changed and resumes
training after a SIGKILL (docs/reliability.md: determinism, faults lose nothing)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from pipeline_testing import REPO, tiny_raw, write_params

from angular.config import parse_params
from angular.data import read_manifest
from angular.train.loop import TrainPaths, train_item
from pipeline import calibrate, evaluate, prepare, run_stage
from pipeline import train as train_stage

pytestmark = pytest.mark.slow


def run_pipeline(folder: Path, raw: dict, monkeypatch) -> dict[str, bytes]:
    """prepare -> train -> calibrate -> evaluate in ``folder``; every metrics and plots file."""
    folder.mkdir()
    write_params(folder, raw)
    monkeypatch.chdir(folder)
    assert run_stage(prepare.main, []) == 0
    for item in raw["train"]["items"]:
        assert run_stage(train_stage.main, [item]) == 0
        assert run_stage(calibrate.main, [item]) == 0
    assert run_stage(evaluate.main, []) == 0
    files = sorted(p for d in ("metrics", "plots") for p in (folder / d).rglob("*") if p.is_file())
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in files}


def test_the_same_params_give_identical_metrics_and_another_seed_does_not(tmp_path, monkeypatch):
    raw = tiny_raw(train__items=["arcface", "cosface"], evaluate__rules=["mean_prob", "vote"])
    first = run_pipeline(tmp_path / "first", raw, monkeypatch)
    second = run_pipeline(tmp_path / "second", raw, monkeypatch)
    assert list(first) == [
        "metrics/calibrate/arcface.json",
        "metrics/calibrate/cosface.json",
        "metrics/evaluate.json",
        "metrics/prepare.json",
        "metrics/train/arcface.json",
        "metrics/train/cosface.json",
        "plots/accuracy/arcface.tsv",
        "plots/accuracy/cosface.tsv",
        "plots/collapse/arcface.tsv",
        "plots/collapse/cosface.tsv",
        "plots/loss/arcface.tsv",
        "plots/loss/cosface.tsv",
        "plots/lr/arcface.tsv",
        "plots/lr/cosface.tsv",
    ]
    assert first == second
    reseeded = tiny_raw(
        train__items=["arcface", "cosface"], evaluate__rules=["mean_prob", "vote"], train__seed=1
    )
    other = run_pipeline(tmp_path / "other", reseeded, monkeypatch)
    # A train seed: the data split and the learning-rate schedule do not depend on it.
    seedless = ("metrics/prepare.json", "plots/lr/arcface.tsv", "plots/lr/cosface.tsv")
    for name in first:
        if name in seedless:
            assert other[name] == first[name], name
        else:
            assert other[name] != first[name], name


def dvc(folder: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=folder,
        env=stage_environment(),
        capture_output=True,
        text=True,
        timeout=300,
        **kwargs,
    )


def stage_environment() -> dict:
    """The stages run `python -m ...`: this interpreter must come first on the PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def stages_run(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")]


def set_epochs(folder: Path, epochs: int) -> None:
    raw = yaml.safe_load((folder / "params.yaml").read_text())
    raw["train"]["epochs"] = epochs
    write_params(folder, raw)


def test_dvc_reruns_what_changed_and_resumes_training_after_a_kill(tmp_path):
    folder = tmp_path / "project"
    folder.mkdir()
    for name in ("angular", "pipeline", "csrc"):
        shutil.copytree(
            REPO / name, folder / name, ignore=shutil.ignore_patterns("__pycache__", "*.o")
        )
    shutil.copy(REPO / "dvc.yaml", folder)
    write_params(
        folder, tiny_raw(train__items=["arcface"], train__epochs=3, evaluate__rules=["vote"])
    )
    assert dvc(folder, "init", "--no-scm", "-q").returncode == 0
    assert dvc(folder, "config", "core.analytics", "false").returncode == 0

    first = dvc(folder, "repro")
    assert first.returncode == 0, first.stdout + first.stderr
    assert stages_run(first.stdout) == ["prepare", "train@arcface", "calibrate@arcface", "evaluate"]

    again = dvc(folder, "repro")
    assert again.returncode == 0 and stages_run(again.stdout) == []
    assert "up to date" in again.stdout

    # More epochs: train, calibrate and evaluate rerun, prepare does not. Kill training midway.
    set_epochs(folder, 12)
    process = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro"],
        cwd=folder,
        env=stage_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    loss_plot = folder / "plots" / "loss" / "arcface.tsv"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        # dvc removes the plot before the stage runs; it comes back with one row per epoch.
        if loss_plot.exists() and len(loss_plot.read_text().splitlines()) >= 1 + 4:
            os.killpg(process.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    killed_output = process.communicate(timeout=60)[0]
    assert process.returncode == -signal.SIGKILL, killed_output
    assert stages_run(killed_output) == ["train@arcface"]
    assert not (folder / "outputs" / "models" / "arcface.pt").exists()

    resumed = dvc(folder, "repro")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert stages_run(resumed.stdout) == ["train@arcface", "calibrate@arcface", "evaluate"]
    assert "train@arcface: resuming after epoch" in resumed.stdout + resumed.stderr
    assert stages_run(dvc(folder, "repro").stdout) == []

    # The model equals an uninterrupted run's at the same seed (bitwise, on CPU).
    params = parse_params(yaml.safe_load((folder / "params.yaml").read_text()))
    reference = tmp_path / "reference"
    paths = TrainPaths(
        model=reference / "model.pt",
        checkpoints=reference / "checkpoints",
        metrics=reference / "metrics.json",
        loss_plot=reference / "loss.tsv",
        accuracy_plot=reference / "accuracy.tsv",
    )
    train_item(params, "arcface", read_manifest(folder / "data" / "prepared"), paths)
    resumed_state = torch.load(folder / "outputs" / "models" / "arcface.pt", weights_only=True)
    reference_state = torch.load(paths.model, weights_only=True)
    for key, value in reference_state["state_dict"].items():
        assert torch.equal(value, resumed_state["state_dict"][key]), key
    assert paths.metrics.read_text() == (folder / "metrics" / "train" / "arcface.json").read_text()
