"""train.verification: the verification sets scored by step while training, logged by step, the
best kept (its scores in the checkpoints, its model file at paths.best_model), the numbers those of
an independent scoring of the saved models; a bad set refused in one line before training."""

from __future__ import annotations

import math

import pytest
import torch
from pipeline_testing import (
    REPO,
    STEPS_PER_EPOCH,
    assert_same_state,
    model_state,
    paths_in,
    tiny_raw,
)
from verification_testing import synthetic_bin

from angular.config import ConfigError, parse_params
from angular.data import read_manifest
from angular.nn.recognition import load_model
from angular.train import epoch as training_epoch
from angular.train.bins import verify_bins
from angular.train.loop import train_item

LFW_DEV_BIN = REPO / "../shared/data/insightface/lfw-dev.bin"


class Recorder:
    """Stands in for an MLflow StageRun: what was logged, at which step."""

    def __init__(self):
        self.logged: list[tuple[dict, int | None]] = []

    def log_metrics(self, metrics, step=None):
        self.logged.append((dict(metrics), step))

    def verification(self) -> dict[int, dict]:
        return {
            step: metrics
            for metrics, step in self.logged
            if "verification/mean_accuracy" in metrics
        }


def verification_raw(bins, every_steps: int, **overrides) -> dict:
    raw = tiny_raw(**{"train__epochs": 2, **overrides})
    raw["train"]["verification"] = {
        "bins": [str(path) for path in bins],
        "every_steps": every_steps,
    }
    return raw


def scores_of(model_path, bins, params) -> dict:
    """An independent scoring: the saved model file, loaded, embeds the sets."""
    loaded = load_model(model_path).model.eval()
    return verify_bins(loaded, bins, params.data, params.evaluate.verification.fars)


def test_the_sets_are_scored_by_step_logged_and_the_best_kept(project):
    bins = [synthetic_bin(project / "synthetic.bin")]
    params = parse_params(verification_raw(bins, 7))
    manifest = read_manifest("data/prepared")
    paths = paths_in(project / "run")
    paths = type(paths)(**{**paths.__dict__, "best_model": project / "run" / "best.pt"})
    run = Recorder()
    metrics = train_item(params, "arcface", manifest, paths, run=run)

    logged = run.verification()
    last_step = 2 * STEPS_PER_EPOCH
    assert sorted(logged) == [7, 14, 21, 28, last_step]  # every 7 steps, and at the end
    for metrics_at in logged.values():
        assert {"verification/synthetic/accuracy", "verification/synthetic/auc"} <= set(metrics_at)
        assert math.isclose(
            metrics_at["verification/mean_accuracy"], metrics_at["verification/synthetic/accuracy"]
        )
    means = {step: values["verification/mean_accuracy"] for step, values in logged.items()}
    best_step = max(means, key=lambda step: (means[step], -step))  # the first of the best
    verification = metrics["verification"]
    assert verification["best"]["step"] == best_step
    assert verification["last"]["step"] == last_step

    # The numbers are those of the saved models, scored again from their files.
    final = scores_of(paths.model, bins, params)["synthetic"]
    assert final["accuracy"] == verification["last"]["sets"]["synthetic"]["accuracy"]
    assert final["auc"] == logged[last_step]["verification/synthetic/auc"]
    best = scores_of(paths.best_model, bins, params)["synthetic"]
    assert best["accuracy"] == means[best_step]
    record = torch.load(paths.best_model, weights_only=True)["training"]["final"]["verification"]
    assert record["step"] == best_step


class Interrupt(BaseException):
    pass


def test_a_resumed_run_keeps_its_best_and_scores_as_the_uninterrupted_one(project, monkeypatch):
    bins = [synthetic_bin(project / "synthetic.bin")]
    params = parse_params(verification_raw(bins, 5, train__checkpoint_every_steps=4))
    manifest = read_manifest("data/prepared")
    reference = paths_in(project / "reference")
    expected = train_item(params, "arcface", manifest, reference)

    paths = paths_in(project / "resumed")
    original, count = training_epoch.batch_loss, {"n": 0}

    def interrupted(model, *args, **kwargs):
        if model.training:
            count["n"] += 1
            if count["n"] == STEPS_PER_EPOCH + 10:
                raise Interrupt
        return original(model, *args, **kwargs)

    monkeypatch.setattr(training_epoch, "batch_loss", interrupted)
    with pytest.raises(Interrupt):
        train_item(params, "arcface", manifest, paths)
    monkeypatch.undo()
    monkeypatch.chdir(project)
    resumed = train_item(params, "arcface", manifest, paths)
    assert resumed["verification"] == expected["verification"]
    assert_same_state(model_state(reference.model), model_state(paths.model))


def test_a_bad_set_is_refused_in_one_line_before_training(project, capsys):
    broken = project / "broken.bin"
    broken.write_bytes(b"not a pickle")
    params = parse_params(verification_raw([broken], 5))
    manifest = read_manifest("data/prepared")
    paths = paths_in(project / "run")
    with pytest.raises(ConfigError) as caught:
        train_item(params, "arcface", manifest, paths)
    assert caught.value.key == "train.verification.bins"
    message = str(caught.value)
    assert str(broken) in message and "\n" not in message
    assert not paths.model.exists()


@pytest.mark.skipif(not LFW_DEV_BIN.is_file(), reason="no ../shared/data/insightface/lfw-dev.bin")
def test_the_lfw_dev_fixture_is_scored_while_training(project):
    params = parse_params(verification_raw([LFW_DEV_BIN], STEPS_PER_EPOCH, train__epochs=1))
    manifest = read_manifest("data/prepared")
    paths = paths_in(project / "run")
    run = Recorder()
    metrics = train_item(params, "arcface", manifest, paths, run=run)
    assert sorted(run.verification()) == [STEPS_PER_EPOCH]
    scores = metrics["verification"]["last"]["sets"]["lfw-dev"]
    assert 0.0 <= scores["accuracy"] <= 1.0 and 0.0 <= scores["auc"] <= 1.0
    again = scores_of(paths.model, [LFW_DEV_BIN], params)["lfw-dev"]
    assert again["accuracy"] == scores["accuracy"] and again["auc"] == scores["auc"]
