"""``train.precision`` (issue 28): fp32 | bf16 | fp16, the deprecated ``train.bf16``, the fp16 loss
scaler (skipped steps are counted, not failures; a falling scale is reported once; its state
resumes bitwise) and the refusal of fp16 where the margin ops cannot compute it."""

from __future__ import annotations

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

import angular.ops
from angular.config import ConfigError, parse_params
from angular.config.train import say_bf16_is_deprecated
from angular.data import read_manifest
from angular.nn.recognition import build_model
from angular.train import epoch as training_epoch
from angular.train.checkpoint import describe_model, fingerprint
from angular.train.epoch import NonFiniteLossError, autocast_dtype
from angular.train.loop import check_precision, train_item


class Interrupt(BaseException):
    """Stands in for a kill: nothing in training catches it."""


class InfiniteGradient(torch.autograd.Function):
    """The identity whose backward makes the gradient infinite (an fp16 overflow)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.inf


UNPATCHED_BATCH_LOSS = training_epoch.batch_loss


def patch_training_batches(monkeypatch, *, inf_grad=(), nan=(), interrupt=None, every=False):
    """Count training batches (1-based, over epochs): make the gradient infinite at ``inf_grad``
    (all of them with ``every``), the loss NaN at ``nan``, raise :class:`Interrupt` at
    ``interrupt``. Each call replaces the previous patch."""
    original = UNPATCHED_BATCH_LOSS
    count = {"n": 0}

    def batch_loss(model, *args, **kwargs):
        if model.training:
            count["n"] += 1
            if count["n"] == interrupt:
                raise Interrupt
        loss, correct = original(model, *args, **kwargs)
        if model.training and (every or count["n"] in inf_grad):
            loss = InfiniteGradient.apply(loss)
        if model.training and count["n"] in nan:
            loss = loss * float("nan")
        return loss, correct

    monkeypatch.setattr(training_epoch, "batch_loss", batch_loss)


# --------------------------------------------------------------------------------------------------
# The key, and the deprecated one.


def old_style(bf16, **overrides) -> dict:
    """Params that give the deprecated train.bf16 (whichever key the shipped file has)."""
    raw = tiny_raw(**overrides)
    raw["train"].pop("precision", None)
    raw["train"]["bf16"] = bf16
    return raw


def test_bf16_still_reads_as_precision_with_one_deprecation_line(capsys):
    say_bf16_is_deprecated.cache_clear()
    assert parse_params(old_style(True)).train.precision == "bf16"
    assert parse_params(old_style(False)).train.precision == "fp32"
    lines = [line for line in capsys.readouterr().err.splitlines() if "deprecated" in line]
    assert lines == [
        "params: train.bf16 is deprecated: use train.precision (fp32 | bf16 | fp16); "
        "bf16: true is precision: bf16, bf16: false is precision: fp32"
    ]


def new_style(**overrides) -> dict:
    raw = tiny_raw(**overrides)
    raw["train"].pop("bf16", None)
    return raw


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_precision_is_read(precision):
    raw = new_style()
    raw["train"]["precision"] = precision
    assert parse_params(raw).train.precision == precision
    assert (
        autocast_dtype(precision)
        == {
            "fp32": None,
            "bf16": torch.bfloat16,
            "fp16": torch.float16,
        }[precision]
    )


def test_precision_and_bf16_together_or_a_bad_precision_are_refused_in_one_line():
    raw = old_style(False)
    raw["train"]["precision"] = "fp32"
    with pytest.raises(ConfigError) as caught:
        parse_params(raw)
    assert str(caught.value) == (
        "train.bf16: give train.precision or the deprecated train.bf16, not both; remove bf16"
    )
    raw = new_style()
    raw["train"]["precision"] = "fp8"
    with pytest.raises(ConfigError, match=r"^train\.precision: must be one of fp32, bf16, fp16"):
        parse_params(raw)
    with pytest.raises(ConfigError, match=r"^train\.bf16: must be true or false, got 'yes'"):
        parse_params(old_style("yes"))


def test_fp32_and_bf16_keep_the_fingerprints_of_the_bf16_flag(digits_prepared):
    """Checkpoints written before train.precision still resume; fp16 is another run."""
    manifest = read_manifest(digits_prepared)

    def of(raw) -> str:
        params = parse_params(raw)
        item = params.item("arcface")
        backbone, heads, _ = describe_model(params, item)
        model = build_model(backbone, heads, len(manifest.classes))
        return fingerprint(params, item, manifest, model)

    prints = {}
    for precision, flag in (("fp32", False), ("bf16", True)):
        raw = new_style()
        raw["train"]["precision"] = precision
        prints[precision] = of(raw)
        assert prints[precision] == of(old_style(flag))
    raw = new_style()
    raw["train"]["precision"] = "fp16"
    assert of(raw) not in prints.values() and prints["fp32"] != prints["bf16"]


# --------------------------------------------------------------------------------------------------
# fp16 training.


def fp16_params(**overrides):
    raw = new_style(**overrides)
    raw["train"]["precision"] = "fp16"
    return parse_params(raw)


def test_fp16_trains_counting_the_scalers_skipped_steps_apart_from_failures(
    project, monkeypatch, capsys
):
    patch_training_batches(monkeypatch, inf_grad={3, STEPS_PER_EPOCH + 2})
    paths = paths_in(project / "run")
    metrics = train_item(fp16_params(), "arcface", read_manifest("data/prepared"), paths)
    # train.on_nonfinite is stop: an overflow the scaler skips is no failure.
    assert metrics["skipped_steps"] == 0
    assert metrics["scaler_skipped_steps"] >= 2
    assert math.isfinite(metrics["train_loss"]) and metrics["train_accuracy"] > 0.2
    assert "loss scale fell" not in capsys.readouterr().err


def test_an_fp16_nan_loss_is_still_a_non_finite_failure(project, monkeypatch):
    patch_training_batches(monkeypatch, nan={4})
    with pytest.raises(NonFiniteLossError, match="the loss is nan at epoch 1, step 4"):
        train_item(fp16_params(), "arcface", read_manifest("data/prepared"), paths_in(project))


def test_a_scale_that_keeps_falling_is_reported_once_with_its_cause(project, monkeypatch, capsys):
    patch_training_batches(monkeypatch, every=True)
    paths = paths_in(project / "run")
    metrics = train_item(fp16_params(), "arcface", read_manifest("data/prepared"), paths)
    assert metrics["scaler_skipped_steps"] == 2 * STEPS_PER_EPOCH and metrics["skipped_steps"] == 0
    reports = [line for line in capsys.readouterr().err.splitlines() if "loss scale fell" in line]
    assert len(reports) == 1, reports
    assert "fell to 0.5 after 17 skipped steps in a row" in reports[0]  # 2^16 / 2^17 < 1
    assert "stay non-finite however far the loss is scaled down" in reports[0]
    assert "backbone." in reports[0]  # the parameters whose gradients are not finite


def test_an_fp16_resume_equals_an_uninterrupted_run(project, monkeypatch, capsys):
    params = fp16_params(train__epochs=3)
    manifest = read_manifest("data/prepared")
    reference = paths_in(project / "reference")
    patch_training_batches(monkeypatch, inf_grad={2, STEPS_PER_EPOCH + 3, 2 * STEPS_PER_EPOCH + 7})
    train_item(params, "arcface", manifest, reference)

    resumed = paths_in(project / "resumed")
    patch_training_batches(
        monkeypatch,
        inf_grad={2, STEPS_PER_EPOCH + 3, 2 * STEPS_PER_EPOCH + 7},
        interrupt=2 * STEPS_PER_EPOCH + 5,
    )
    with pytest.raises(Interrupt):
        train_item(params, "arcface", manifest, resumed)
    state = torch.load(resumed.checkpoints / "epoch-0002.pt", weights_only=True)
    skipped = state["scaler"]["skipped_steps"]  # ours, and any overflow of the run's own
    assert skipped >= 2 and state["scaler"]["state"]["scale"] == 2.0 ** (16 - skipped)
    # The rest of the run, from the checkpoint: its batch count restarts at epoch 3's first.
    patch_training_batches(monkeypatch, inf_grad={7})
    monkeypatch.chdir(project)
    train_item(params, "arcface", manifest, resumed)
    assert "resuming after epoch 2 of 3" in capsys.readouterr().err
    assert_same_state(model_state(reference.model), model_state(resumed.model))
    assert resumed.metrics.read_text() == reference.metrics.read_text()


# --------------------------------------------------------------------------------------------------
# Refused at start.


def test_fp16_is_refused_in_one_line_where_the_ops_backend_has_no_fp16_kernel(monkeypatch):
    """Every backend of angular computes fp16 today (kernels and reference); a backend without
    fp16 (simulated) is refused before training."""
    assert isinstance(check_precision("fp16", torch.device("cpu")), torch.amp.GradScaler)
    assert check_precision("bf16", torch.device("cpu")) is None
    original = angular.ops.margin_cross_entropy

    def no_half(cos, labels, **kwargs):
        if cos.dtype == torch.float16:
            raise RuntimeError("\"margin_cross_entropy\" not implemented for 'Half'")
        return original(cos, labels, **kwargs)

    monkeypatch.setattr(angular.ops, "margin_cross_entropy", no_half)
    with pytest.raises(ConfigError) as caught:
        check_precision("fp16", torch.device("cpu"))
    message = str(caught.value)
    assert message.startswith("train.precision: fp16 has no kernel in the margin ops' ")
    assert "not implemented for 'Half'" in message and message.endswith("use bf16 or fp32")
    assert "\n" not in message
