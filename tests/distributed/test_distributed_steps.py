"""Checkpoints within an epoch and verification by step on several processes (torchrun workers on
gloo): a SIGKILLed worker's rerun resumes from the step checkpoint every rank has and ends with the
model, metrics (verification included) and best model of the uninterrupted run, bitwise."""

from __future__ import annotations

import json
import shutil

import pytest
from pipeline_testing import assert_same_state, model_state, tiny_raw, write_params
from verification_testing import synthetic_bin

from angular.train import world
from pipeline import EXIT_FAILURE, run_stage
from pipeline import train as train_stage

MODEL = "outputs/models/arcface.pt"
BEST = "outputs/best/arcface.pt"
METRICS = "metrics/train/arcface.json"
CHECKPOINTS = "outputs/checkpoints/arcface"


@pytest.mark.slow
def test_a_killed_worker_resumes_within_the_epoch_to_the_uninterrupted_result(
    project, monkeypatch, capfd
):
    synthetic_bin(project / "synthetic.bin")
    raw = tiny_raw(
        train__epochs=2,
        train__checkpoint_every_steps=4,
        train__distributed__world_size=2,
        train__distributed__backend="gloo",
        train__distributed__timeout_s=30.0,
    )
    raw["train"]["verification"] = {"bins": ["synthetic.bin"], "every_steps": 6}
    write_params(project, raw)
    assert run_stage(train_stage.main, ["arcface"]) == 0
    uninterrupted = model_state(project / MODEL)
    best = model_state(project / BEST)
    metrics = json.loads((project / METRICS).read_text())
    assert metrics["verification"]["last"]["step"] == 30  # 15 steps an epoch on 2 ranks
    assert metrics["verification"]["best"]["step"] in (6, 12, 18, 24, 30)
    shutil.rmtree(project / "outputs")
    (project / METRICS).unlink()

    # Run steps 4, 8, 12 and 16 (epoch 2, step 1) write checkpoints; rank 1 dies before step 3.
    monkeypatch.setenv(world.FAULT_ENV, "1:kill:2:3")
    assert run_stage(train_stage.main, ["arcface"]) == EXIT_FAILURE
    for rank in (0, 1):
        assert (project / CHECKPOINTS / f"rank-{rank}-of-2" / "epoch-0001-step-000001.pt").is_file()
    monkeypatch.delenv(world.FAULT_ENV)
    capfd.readouterr()
    assert run_stage(train_stage.main, ["arcface"]) == 0
    assert "resuming at step 1 of epoch 2 of 2" in capfd.readouterr().err
    assert_same_state(model_state(project / MODEL), uninterrupted)
    assert_same_state(model_state(project / BEST), best)
    assert json.loads((project / METRICS).read_text()) == metrics
