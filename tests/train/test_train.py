"""train: a loadable model, checkpoints written atomically, exact resume, non-finite losses, seeds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from pipeline_testing import (
    STEPS_PER_EPOCH,
    assert_same_state,
    model_state,
    paths_in,
    tiny_raw,
    write_params,
)

from angular.config import ConfigError, parse_params
from angular.data import read_manifest
from angular.nn.heads import MarginHead
from angular.nn.recognition import load_model
from angular.serve.inference import run_model
from angular.train import epoch as training_epoch
from angular.train import loop as training
from angular.train.collapse import CollapseError
from angular.train.loop import train_item
from pipeline import run_stage
from pipeline import train as train_stage


class Interrupt(BaseException):
    """Stands in for a kill: not an Exception, so nothing in training catches it."""


def interrupt_training_at(monkeypatch, call: int) -> None:
    """Raise :class:`Interrupt` on the ``call``-th training batch (1-based, counted over epochs)."""
    original = training_epoch.batch_loss
    count = {"n": 0}

    def counting(model, *args, **kwargs):
        if model.training:
            count["n"] += 1
            if count["n"] == call:
                raise Interrupt
        return original(model, *args, **kwargs)

    monkeypatch.setattr(training_epoch, "batch_loss", counting)


def test_one_epoch_through_the_stage_writes_a_model_loadable_without_params(project):
    write_params(project, tiny_raw(train__epochs=1))
    assert run_stage(train_stage.main, ["arcface"]) == 0
    model_file = project / "outputs" / "models" / "arcface.pt"
    loaded = load_model(model_file)
    manifest = read_manifest(project / "data" / "prepared")
    assert loaded.classes == list(manifest.classes) and loaded.members == ["arcface"]
    assert loaded.image == {
        "size": [8, 8],
        "channels": 1,
        "mean": [0.5],
        "std": [0.5],
        "crop": None,
    }
    outputs = run_model(loaded, manifest.paths("test")[:5], manifest.labels("test")[:5], ["x"] * 5)
    assert outputs.embeddings.shape == (5, 16) and outputs.logits["arcface"].shape == (5, 8)
    # s * cos: every logit lies in [-s, s].
    assert abs(outputs.logits["arcface"]).max() <= 64.0 + 1e-4
    metrics = json.loads((project / "metrics" / "train" / "arcface.json").read_text())
    assert set(metrics) == {
        "epoch",
        "train_loss",
        "train_accuracy",
        "val_loss",
        "val_accuracy",
        "skipped_steps",
        "centre_cosine",
        "embedding_spread",
        "collapse_epoch",
        "collapse_room",
        "drift_epoch",
        "centre_cosine_rise",  # spread_drop needs 5 epochs (a nan is left out)
    }
    assert metrics["epoch"] == 1 and metrics["skipped_steps"] == 0
    assert metrics["drift_epoch"] == 0 and metrics["centre_cosine_rise"] == 0.0
    assert metrics["collapse_epoch"] == 0 and -1.0 <= metrics["centre_cosine"] < 0.5
    assert 0.0 < metrics["embedding_spread"] < 1.0 and metrics["collapse_room"] > 1.0
    assert 0.3 < metrics["val_accuracy"] <= 1.0  # well above chance (1/8) after one epoch
    loss = (project / "plots" / "loss" / "arcface.tsv").read_text().splitlines()
    accuracy = (project / "plots" / "accuracy" / "arcface.tsv").read_text().splitlines()
    assert loss[0] == "epoch\ttrain_loss\tval_loss" and len(loss) == 2
    assert accuracy[0] == "epoch\ttrain_accuracy\tval_accuracy" and len(accuracy) == 2
    collapse = (project / "plots" / "collapse" / "arcface.tsv").read_text().splitlines()
    assert collapse[0] == "epoch\tcentre_cosine\tembedding_spread" and len(collapse) == 2
    # A finished run leaves no checkpoint behind (the model file holds the result).
    assert list((project / "outputs" / "checkpoints" / "arcface").iterdir()) == []


def test_resume_after_an_interruption_equals_an_uninterrupted_run(project, monkeypatch, capsys):
    params = parse_params(tiny_raw(train__epochs=4))
    manifest = read_manifest("data/prepared")
    reference = paths_in(project / "reference")
    train_item(params, "arcface", manifest, reference)

    resumed = paths_in(project / "resumed")
    interrupt_training_at(monkeypatch, 2 * STEPS_PER_EPOCH + 5)  # epoch 3, step 5
    with pytest.raises(Interrupt):
        train_item(params, "arcface", manifest, resumed)
    assert sorted(p.name for p in resumed.checkpoints.iterdir()) == [
        "epoch-0001.pt",
        "epoch-0002.pt",
    ]
    assert not resumed.model.exists()
    monkeypatch.undo()
    monkeypatch.chdir(project)  # undo() also undid the project fixture's chdir
    train_item(params, "arcface", manifest, resumed)
    assert "resuming after epoch 2 of 4" in capsys.readouterr().err

    assert_same_state(model_state(reference.model), model_state(resumed.model))
    for name in ("metrics", "loss_plot", "accuracy_plot"):
        assert getattr(resumed, name).read_text() == getattr(reference, name).read_text()
    assert list(resumed.checkpoints.iterdir()) == []


def test_a_kill_during_a_checkpoint_save_leaves_the_last_good_one(project, monkeypatch, capsys):
    params = parse_params(tiny_raw(train__epochs=3))
    manifest = read_manifest("data/prepared")
    reference = paths_in(project / "reference")
    train_item(params, "arcface", manifest, reference)

    paths = paths_in(project / "run")
    real_save = torch.save

    def dying_save(obj, handle, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("epoch") == 2:
            handle.write(b"PK\x03\x04 half a checkpoint")
            raise Interrupt
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(Interrupt):
        train_item(params, "arcface", manifest, paths)
    monkeypatch.undo()
    monkeypatch.chdir(project)  # undo() also undid the project fixture's chdir
    assert [p.name for p in paths.checkpoints.iterdir()] == ["epoch-0001.pt"]  # no partial file
    torch.load(paths.checkpoints / "epoch-0001.pt", weights_only=True)

    # A SIGKILL gives the cleanup no chance: a temp file stays behind, and is ignored.
    (paths.checkpoints / ".epoch-0002.pt.abc123.tmp").write_bytes(b"garbage")
    train_item(params, "arcface", manifest, paths)
    assert "resuming after epoch 1 of 3" in capsys.readouterr().err
    assert not list(paths.checkpoints.glob(".*.tmp"))
    assert_same_state(model_state(reference.model), model_state(paths.model))


def test_an_unreadable_newest_checkpoint_falls_back_to_the_previous(project, monkeypatch, capsys):
    params = parse_params(tiny_raw(train__epochs=3))
    manifest = read_manifest("data/prepared")
    reference = paths_in(project / "reference")
    train_item(params, "arcface", manifest, reference)

    paths = paths_in(project / "run")
    interrupt_training_at(monkeypatch, 2 * STEPS_PER_EPOCH + 1)
    with pytest.raises(Interrupt):
        train_item(params, "arcface", manifest, paths)
    monkeypatch.undo()
    monkeypatch.chdir(project)  # undo() also undid the project fixture's chdir
    newest = paths.checkpoints / "epoch-0002.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # damaged behind our back
    train_item(params, "arcface", manifest, paths)
    err = capsys.readouterr().err
    assert f"checkpoint {newest} is unreadable" in err and "resuming after epoch 1 of 3" in err
    assert_same_state(model_state(reference.model), model_state(paths.model))


def test_checkpoints_of_other_params_are_not_resumed(project, monkeypatch, capsys):
    manifest = read_manifest("data/prepared")
    paths = paths_in(project / "run")
    interrupt_training_at(monkeypatch, STEPS_PER_EPOCH + 1)
    with pytest.raises(Interrupt):
        train_item(parse_params(tiny_raw(train__epochs=2)), "arcface", manifest, paths)
    monkeypatch.undo()
    monkeypatch.chdir(project)  # undo() also undid the project fixture's chdir
    assert [p.name for p in paths.checkpoints.iterdir()] == ["epoch-0001.pt"]
    changed = parse_params(tiny_raw(train__epochs=2, train__lr=0.01))
    train_item(changed, "arcface", manifest, paths)
    assert "come from other params; starting afresh" in capsys.readouterr().err
    fresh = paths_in(project / "fresh")
    train_item(changed, "arcface", manifest, fresh)
    assert_same_state(model_state(fresh.model), model_state(paths.model))


def nan_loss_at(monkeypatch, calls: set[int]) -> None:
    original = MarginHead.loss
    count = {"n": 0}

    def loss(self, x, labels, reduction="mean"):
        value = original(self, x, labels, reduction)
        if self.training:
            count["n"] += 1
            if count["n"] in calls:
                return value * float("nan")
        return value

    monkeypatch.setattr(MarginHead, "loss", loss)


def test_a_non_finite_loss_stops_naming_epoch_and_step_and_keeps_the_checkpoint(
    project, monkeypatch, capsys
):
    write_params(project, tiny_raw(train__epochs=3))
    nan_loss_at(monkeypatch, {STEPS_PER_EPOCH + 3})  # epoch 2, step 3
    assert run_stage(train_stage.main, ["arcface"]) == 1
    err = capsys.readouterr().err
    checkpoint = Path("outputs/checkpoints/arcface/epoch-0001.pt")
    assert "train@arcface: the loss is nan at epoch 2, step 3" in err
    assert f"the last good checkpoint {checkpoint} is kept" in err
    assert "Traceback" not in err
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 1
    assert not Path("outputs/models/arcface.pt").exists()


def test_non_finite_steps_can_be_skipped_and_counted(project, monkeypatch):
    params = parse_params(tiny_raw(train__epochs=2, train__on_nonfinite="skip"))
    nan_loss_at(monkeypatch, {2, STEPS_PER_EPOCH + 7})
    metrics = train_item(params, "arcface", read_manifest("data/prepared"), paths_in(project))
    assert metrics["skipped_steps"] == 2
    assert math.isfinite(metrics["train_loss"]) and metrics["epoch"] == 2
    state = model_state(project / "model.pt")
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_the_seed_decides_the_model(project):
    manifest = read_manifest("data/prepared")
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        paths = paths_in(project / name)
        train_item(
            parse_params(tiny_raw(train__epochs=1, train__seed=seed)), "arcface", manifest, paths
        )
        runs[name] = (model_state(paths.model), paths.metrics.read_text())
    assert_same_state(runs["a"][0], runs["b"][0])
    assert runs["a"][1] == runs["b"][1]
    assert not torch.equal(
        runs["a"][0]["heads.arcface.weight"], runs["c"][0]["heads.arcface.weight"]
    )
    assert runs["a"][1] != runs["c"][1]


def test_a_joint_item_trains_its_heads_on_one_backbone(project):
    params = parse_params(tiny_raw(train__epochs=1, train__items=["joint"]))
    paths = paths_in(project)
    metrics = train_item(params, "joint", read_manifest("data/prepared"), paths)
    loaded = load_model(paths.model)
    assert loaded.members == ["joint_arcface", "joint_cosface", "joint_sphereface"]
    assert loaded.item == "joint"
    header = paths.accuracy_plot.read_text().splitlines()[0].split("\t")
    assert "val_accuracy_joint_cosface" in header and "train_accuracy_joint_arcface" in header
    assert metrics["val_accuracy"] == pytest.approx(
        sum(metrics[f"val_accuracy_joint_{h}"] for h in ("arcface", "cosface", "sphereface")) / 3
    )


def test_sgd_step_schedule_bf16_augmentation_and_the_originals_smoothing(project):
    params = parse_params(
        tiny_raw(
            train__epochs=2,
            train__optimizer="sgd",
            train__lr=0.05,
            train__schedule="step",
            train__step_size=1,
            train__gamma=0.5,
            train__precision="bf16",
            train__label_smoothing_mode="others",
            train__augment=[{"name": "RandomAffine", "degrees": 10}],
        )
    )
    paths = paths_in(project)
    metrics = train_item(params, "cosface", read_manifest("data/prepared"), paths)
    assert math.isfinite(metrics["train_loss"]) and metrics["val_accuracy"] > 0.125
    # The step schedule halves the learning rate after each epoch: epoch 2 ran at 0.025.
    assert load_model(paths.model).training["final"]["lr"] == pytest.approx(0.025)
    assert len(paths.accuracy_plot.read_text().splitlines()) == 3  # header and two epochs


def test_a_bad_transform_fails_before_training(project):
    params = parse_params(tiny_raw(train__augment=[{"name": "NoSuchTransform"}]))
    with pytest.raises(ConfigError, match=r"train\.augment\[0\]\.name"):
        train_item(params, "arcface", read_manifest("data/prepared"), paths_in(project))
    assert not (project / "checkpoints").exists() or not list((project / "checkpoints").iterdir())


def test_an_item_not_listed_is_a_config_error(project):
    params = parse_params(tiny_raw())
    with pytest.raises(ConfigError, match=r"^train\.items: 'combined' is not listed"):
        train_item(params, "combined", read_manifest("data/prepared"), paths_in(project))


def centres_collapse_at_epoch(monkeypatch, epoch: int) -> None:
    """The centres' mean cosine as the monitor sees it: 0 until ``epoch``, 0.97 from then on (the
    measure itself and a real collapse are tested in tests/train/test_collapse.py)."""
    calls = {"n": 0}

    def scripted(weight):
        calls["n"] += 1
        return 0.97 if calls["n"] >= epoch else 0.0

    monkeypatch.setattr(training_epoch, "centre_cosine", scripted)


def test_a_collapse_stops_training_keeping_the_last_good_checkpoint(project, monkeypatch):
    params = parse_params(tiny_raw(train__epochs=3, train__keep_checkpoints=3))
    paths = paths_in(project / "stopped")
    centres_collapse_at_epoch(monkeypatch, 2)
    with pytest.raises(CollapseError) as raised:
        train_item(params, "arcface", read_manifest("data/prepared"), paths)
    message = str(raised.value)
    assert "collapse at epoch 2: the class centres of the head collapsed" in message
    assert "0.970 > train.collapse.max_centre_cosine 0.9" in message
    assert "epoch-0001.pt is kept" in message and "train.on_collapse: warn" in message
    assert [p.name for p in paths.checkpoints.iterdir()] == ["epoch-0001.pt"]
    assert not paths.model.exists()


def test_a_collapse_with_warn_trains_on_and_is_recorded(project, monkeypatch, capsys):
    params = parse_params(tiny_raw(train__epochs=3, train__on_collapse="warn"))
    manifest = read_manifest("data/prepared")
    plain = paths_in(project / "plain")
    train_item(params, "arcface", manifest, plain)
    assert json.loads(plain.metrics.read_text())["collapse_epoch"] == 0
    warned = paths_in(project / "warned")
    centres_collapse_at_epoch(monkeypatch, 2)
    capsys.readouterr()
    train_item(params, "arcface", manifest, warned)
    metrics = json.loads(warned.metrics.read_text())
    assert metrics["collapse_epoch"] == 2 and metrics["epoch"] == 3
    err = capsys.readouterr().err
    assert err.count("collapse at epoch") == 1 and "Training goes on" in err
    # A warning changes nothing in training: the same weights as the run that was not flagged.
    assert_same_state(model_state(plain.model), model_state(warned.model))


def test_a_margin_with_little_room_is_warned_about_at_the_start(project, capsys):
    raw = tiny_raw(train__epochs=1)
    raw["heads"]["arcface"].update(s=8.0, m=0.2)  # room 2 s (1 - cos 0.1) ~ 0.16 nats
    train_item(
        parse_params(raw), "arcface", read_manifest("data/prepared"), paths_in(project / "r")
    )
    err = capsys.readouterr().err
    assert "arcface's collapsed state" in err and "may collapse" in err
    raw["heads"]["arcface"].update(s=64.0, m=0.5)
    capsys.readouterr()
    train_item(
        parse_params(raw), "arcface", read_manifest("data/prepared"), paths_in(project / "q")
    )
    assert "may collapse" not in capsys.readouterr().err


def test_the_centre_norm_reaches_the_heads(project, monkeypatch):
    seen = []
    monkeypatch.setattr(training, "init_centres", lambda head, norm: seen.append((head, norm)))
    params = parse_params(tiny_raw(train__epochs=1, train__centre_norm=4.0))
    train_item(params, "arcface", read_manifest("data/prepared"), paths_in(project / "unit"))
    assert [(type(head).__name__, norm) for head, norm in seen] == [("MarginHead", 4.0)]
