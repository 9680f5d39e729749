"""Schedules by step (issue 28): a linear warm-up (``train.warmup_steps`` or
``train.warmup_epochs``), the ``poly`` decay of insightface's arcface_torch, the learning rate of
every step in the lr plot and in MLflow (``lr_by_step``); today's schedules are untouched."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from pipeline_testing import (
    STEPS_PER_EPOCH,
    assert_same_state,
    model_state,
    paths_in,
    tiny_raw,
)

from angular.config import ConfigError, parse_params
from angular.data import read_manifest
from angular.nn.recognition import load_model
from angular.train import epoch as training_epoch
from angular.train.loop import train_item
from angular.train.schedule import lr_factor, make_scheduler, warmup_steps

UNPATCHED_BATCH_LOSS = training_epoch.batch_loss


def config_of(**overrides):
    return parse_params(tiny_raw(**overrides)).train


def lrs(config, steps_per_epoch: int) -> list[float]:
    """The learning rate of each optimizer step of the run, by the scheduler itself."""
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=config.lr)
    scheduler, by_step = make_scheduler(config, optimizer, steps_per_epoch)
    assert by_step
    seen = []
    for _ in range(config.epochs * steps_per_epoch):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


def test_poly_with_a_warm_up_is_insightfaces_closed_form():
    config = config_of(train__schedule="poly", train__warmup_steps=5, train__epochs=3)
    steps, warmup, total, power = 7, 5, 21, 2.0
    expected = [
        config.lr * (k + 1) / warmup
        if k < warmup
        else config.lr * (1 - (k - warmup) / (total - warmup)) ** power
        for k in range(total)
    ]
    assert lrs(config, steps) == pytest.approx(expected, rel=1e-12)
    # It rises to lr over the warm-up, then falls to above 0 at the last step.
    assert expected[warmup - 1] == config.lr and 0 < expected[-1] < expected[warmup]


@pytest.mark.parametrize("schedule", ["cosine", "step", "constant"])
def test_a_warm_up_multiplies_the_epoch_schedules(schedule):
    config = config_of(
        train__schedule=schedule, train__warmup_epochs=0.5, train__epochs=6, train__step_size=2
    )
    steps = 4
    assert warmup_steps(config, steps) == 2
    seen = lrs(config, steps)
    for k, lr in enumerate(seen):
        epoch = k // steps
        decay = {
            "cosine": 0.5 * (1 + math.cos(math.pi * epoch / 6)),
            "step": config.gamma ** (epoch // 2),
            "constant": 1.0,
        }[schedule]
        assert lr == pytest.approx(config.lr * min(1.0, (k + 1) / 2) * decay, rel=1e-12)


def test_without_a_warm_up_todays_schedules_step_by_epoch():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    for schedule, kind in (
        ("cosine", torch.optim.lr_scheduler.CosineAnnealingLR),
        ("step", torch.optim.lr_scheduler.StepLR),
        ("constant", torch.optim.lr_scheduler.LambdaLR),
    ):
        scheduler, by_step = make_scheduler(config_of(train__schedule=schedule), optimizer, 10)
        assert type(scheduler) is kind and not by_step


def test_lr_factor_at_the_ends():
    common = dict(steps_per_epoch=10, epochs=2, step_size=1, gamma=0.1, power=1.0)
    assert lr_factor(0, schedule="poly", warmup=0, total=20, **common) == 1.0
    assert lr_factor(19, schedule="poly", warmup=0, total=20, **common) == pytest.approx(0.05)
    assert lr_factor(0, schedule="poly", warmup=4, total=20, **common) == 0.25


def test_bad_warm_ups_are_refused_in_one_line():
    with pytest.raises(ConfigError) as caught:
        config_of(train__warmup_steps=10, train__warmup_epochs=1)
    assert str(caught.value).startswith("train.warmup_epochs: give train.warmup_steps (10) or")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    for key, value in (("warmup_steps", 30), ("warmup_epochs", 2.0)):
        config = config_of(train__schedule="poly", train__epochs=2, **{f"train__{key}": value})
        with pytest.raises(ConfigError) as caught:
            make_scheduler(config, optimizer, 15)
        assert str(caught.value).startswith(
            f"train.{key}: a warm-up of 30 optimizer steps leaves none of the run's 30"
        )
    for bad in ("poly2", "linear"):
        with pytest.raises(ConfigError, match=r"^train\.schedule: must be one of .*poly"):
            config_of(train__schedule=bad)
    with pytest.raises(ConfigError, match=r"^train\.poly_power: must be a number > 0"):
        config_of(train__poly_power=0)


class FakeRun:
    """Collects what training logs to MLflow."""

    def __init__(self):
        self.logged = []

    def log_metrics(self, metrics, step=None):
        self.logged.append((dict(metrics), step))


def test_poly_training_writes_the_lr_of_every_step_and_logs_it(project):
    params = parse_params(
        tiny_raw(train__schedule="poly", train__warmup_steps=4, train__poly_power=1.0)
    )
    paths = dataclasses.replace(paths_in(project / "run"), lr_plot=project / "run" / "lr.tsv")
    run = FakeRun()
    train_item(params, "arcface", read_manifest("data/prepared"), paths, run=run)
    total = 2 * STEPS_PER_EPOCH
    rows = paths.lr_plot.read_text().splitlines()
    assert rows[0] == "step\tlr" and len(rows) == total + 1
    steps = [int(row.split("\t")[0]) for row in rows[1:]]
    lr = [float(row.split("\t")[1]) for row in rows[1:]]
    assert steps == list(range(1, total + 1))
    expected = [0.003 * min(1.0, (k + 1) / 4) for k in range(4)] + [
        0.003 * (1 - (k - 4) / (total - 4)) for k in range(4, total)
    ]
    assert lr == pytest.approx(expected, rel=1e-5)  # the plot's 6 significant digits
    final = load_model(paths.model).training["final"]
    assert final["lr"] == pytest.approx(expected[-1])  # the epoch's last step's
    logged = {step: entry["lr_by_step"] for entry, step in run.logged if "lr_by_step" in entry}
    # Each step whose lr moved (all but step 5: the warm-up's end is the decay's start), and
    # each epoch's first and last.
    assert sorted(logged) == [s for s in steps if s != 5]
    assert [logged[s] for s in sorted(logged)] == pytest.approx(
        [lr for s, lr in zip(steps, expected) if s != 5], rel=1e-12
    )
    epochs = [step for entry, step in run.logged if "val_accuracy" in entry]
    assert epochs == [1, 2]


def test_epoch_schedules_log_only_the_steps_where_the_lr_moves(project):
    paths = dataclasses.replace(paths_in(project / "run"), lr_plot=project / "run" / "lr.tsv")
    run = FakeRun()
    train_item(parse_params(tiny_raw()), "arcface", read_manifest("data/prepared"), paths, run=run)
    logged = sorted(step for entry, step in run.logged if "lr_by_step" in entry)
    last = 2 * STEPS_PER_EPOCH
    assert logged == [1, STEPS_PER_EPOCH, STEPS_PER_EPOCH + 1, last]
    assert len(paths.lr_plot.read_text().splitlines()) == last + 1


def test_a_resume_inside_a_warm_up_and_poly_run_equals_an_uninterrupted_one(project, monkeypatch):
    params = parse_params(
        tiny_raw(train__epochs=3, train__schedule="poly", train__warmup_epochs=1.5)
    )
    manifest = read_manifest("data/prepared")
    reference = dataclasses.replace(paths_in(project / "ref"), lr_plot=project / "ref" / "lr.tsv")
    train_item(params, "arcface", manifest, reference)

    class Interrupt(BaseException):
        pass

    count = {"n": 0}

    def interrupting(model, *args, **kwargs):
        if model.training:
            count["n"] += 1
            if count["n"] == STEPS_PER_EPOCH + 3:  # epoch 2, inside the warm-up
                raise Interrupt
        return UNPATCHED_BATCH_LOSS(model, *args, **kwargs)

    resumed = dataclasses.replace(paths_in(project / "res"), lr_plot=project / "res" / "lr.tsv")
    monkeypatch.setattr(training_epoch, "batch_loss", interrupting)
    with pytest.raises(Interrupt):
        train_item(params, "arcface", manifest, resumed)
    monkeypatch.setattr(training_epoch, "batch_loss", UNPATCHED_BATCH_LOSS)
    train_item(params, "arcface", manifest, resumed)
    assert_same_state(model_state(reference.model), model_state(resumed.model))
    for name in ("metrics", "loss_plot", "lr_plot"):
        assert getattr(resumed, name).read_text() == getattr(reference, name).read_text()
