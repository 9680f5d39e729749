"""Training loses nothing to faults (docs/reliability.md, Training).

- A kill in the middle of a checkpoint save (a real process that dies with ``os._exit`` after
  writing half the file) leaves the previous checkpoint; the next run of the stage resumes from it
  and ends with exactly (bitwise) the model of an uninterrupted run. The same for a step checkpoint
  (``train.checkpoint_every_steps``) inside an epoch, under a real SIGKILL: the rerun continues
  from the previous step checkpoint, with the model, metrics and plots of an uninterrupted run.
- A corrupt checkpoint planted by hand (truncated, one flipped byte inside a tensor, empty, garbage,
  another kind of file, a pickle that would run code) is never loaded: it is skipped with a message
  naming it and training resumes from the newest good one (or starts afresh when none is left).
- A checkpoint written by a model of another shape (the code changed) is not resumed.
- A non-finite loss stops training naming the epoch and step; the checkpoint it keeps resumes the
  run. With ``on_nonfinite: skip`` the skipped steps are counted, across a resume too.

(The SIGKILL of ``dvc repro`` mid-epoch and its resume is tests/pipeline/test_end_to_end.py.)
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import signal
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from reliability_testing import (
    STEPS_PER_EPOCH,
    assert_same_state,
    model_state,
    paths_in,
    run_python,
    run_stage_process,
    tiny_raw,
    write_params,
)

from angular.config import parse_params
from angular.data import read_manifest
from angular.train import checkpoint
from angular.train import epoch as training_epoch
from angular.train import loop as training
from angular.train.epoch import NonFiniteLossError
from angular.train.loop import train_item

EPOCHS = 3


class Interrupt(BaseException):
    """Stands in for a kill: not an Exception, so nothing in training catches it."""


class InfiniteGradient(torch.autograd.Function):
    """The identity forward; an infinite gradient backward (the loss itself stays finite)."""

    @staticmethod
    def forward(ctx, value):
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.inf


def fault_at_training_batches(
    monkeypatch, *, interrupt: int | None = None, nan: set[int] = (), inf_grad: set[int] = ()
):
    """Count training batches (1-based, over epochs) of the next run: make the loss NaN at the
    ``nan`` ones, its gradient infinite at the ``inf_grad`` ones, and raise :class:`Interrupt`
    at ``interrupt``."""
    original_batch_loss = training_epoch.batch_loss
    count = {"n": 0}

    def batch_loss(model, *args, **kwargs):
        if model.training:
            count["n"] += 1
            if count["n"] == interrupt:
                raise Interrupt
        loss, correct = original_batch_loss(model, *args, **kwargs)
        if model.training and count["n"] in nan:
            loss = loss * float("nan")
        if model.training and count["n"] in inf_grad:
            loss = InfiniteGradient.apply(loss)
        return loss, correct

    monkeypatch.setattr(training_epoch, "batch_loss", batch_loss)


@pytest.fixture(scope="module")
def runs(digits_prepared, tmp_path_factory):
    """An uninterrupted run of EPOCHS epochs, and the checkpoints (epochs 1 and 2) of a run
    interrupted in epoch 3."""
    folder = tmp_path_factory.mktemp("runs")
    params = parse_params(tiny_raw(train__epochs=EPOCHS))
    manifest = read_manifest(digits_prepared)
    reference = paths_in(folder / "reference")
    train_item(params, "arcface", manifest, reference)
    interrupted = paths_in(folder / "interrupted")
    with pytest.MonkeyPatch.context() as monkeypatch:
        fault_at_training_batches(monkeypatch, interrupt=2 * STEPS_PER_EPOCH + 5)
        with pytest.raises(Interrupt):
            train_item(params, "arcface", manifest, interrupted)
    names = sorted(p.name for p in interrupted.checkpoints.iterdir())
    assert names == ["epoch-0001.pt", "epoch-0002.pt"]
    return dict(params=params, manifest=manifest, reference=reference, interrupted=interrupted)


def resume_copy(runs, folder: Path):
    """The interrupted run's files copied to ``folder`` (each test damages its own copy)."""
    paths = paths_in(folder)
    shutil.copytree(runs["interrupted"].checkpoints, paths.checkpoints)
    return paths


# --------------------------------------------------------------------------------------------------
# Corrupt checkpoints planted by hand.


def largest_tensor_offset(data: bytes) -> int:
    """The offset, in a torch.save file, of the middle of its largest tensor's bytes."""
    archive = zipfile.ZipFile(io.BytesIO(data))
    member = max(archive.infolist(), key=lambda info: info.file_size)
    payload = archive.read(member)
    start = data.find(payload)
    assert start > 0 and len(payload) > 1000
    return start + len(payload) // 2


def flip_a_byte_in_a_tensor(path: Path) -> str:
    data = bytearray(path.read_bytes())
    data[largest_tensor_offset(bytes(data))] ^= 0x10
    path.write_bytes(bytes(data))
    return "is corrupt"


def truncate(path: Path) -> str:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return "is unreadable"


def empty(path: Path) -> str:
    path.write_bytes(b"")
    return "is unreadable"


def garbage(path: Path) -> str:
    path.write_bytes(os.urandom(4096))
    return "is unreadable"


def another_file(path: Path) -> str:
    torch.save({"weights": torch.randn(4, 4)}, path)
    return "is not a checkpoint"


def a_tensor(path: Path) -> str:
    torch.save(torch.randn(8), path)
    return "is not a checkpoint"


class RunsCode:
    """Unpickling this would create a file: a checkpoint must never execute code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def code_pickle(path: Path) -> str:
    torch.save(
        {"format": checkpoint.CHECKPOINT_FORMAT, "payload": RunsCode(path.parent / "pwned")}, path
    )
    return "is unreadable"


CORRUPTIONS = {
    "one flipped byte in a tensor": flip_a_byte_in_a_tensor,
    "truncated": truncate,
    "empty": empty,
    "random bytes": garbage,
    "another torch file": another_file,
    "a bare tensor": a_tensor,
    "a pickle that runs code": code_pickle,
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_corrupt_newest_checkpoint_is_skipped_naming_it(runs, tmp_path, capsys, corruption):
    paths = resume_copy(runs, tmp_path)
    newest = paths.checkpoints / "epoch-0002.pt"
    says = CORRUPTIONS[corruption](newest)
    train_item(runs["params"], "arcface", runs["manifest"], paths)
    err = capsys.readouterr().err
    assert f"{newest} {says}" in err, err
    assert "resuming after epoch 1 of 3" in err, err
    assert not (paths.checkpoints / "pwned").exists(), "loading a checkpoint ran code"
    assert_same_state(model_state(runs["reference"].model), model_state(paths.model))
    assert paths.metrics.read_text() == runs["reference"].metrics.read_text()


def test_a_planted_file_newer_than_every_checkpoint_is_skipped(runs, tmp_path, capsys):
    paths = resume_copy(runs, tmp_path)
    planted = paths.checkpoints / "epoch-0009.pt"
    shutil.copy(paths.checkpoints / "epoch-0002.pt", planted)
    flip_a_byte_in_a_tensor(planted)
    train_item(runs["params"], "arcface", runs["manifest"], paths)
    err = capsys.readouterr().err
    assert f"{planted} is corrupt" in err and "resuming after epoch 2 of 3" in err, err
    assert_same_state(model_state(runs["reference"].model), model_state(paths.model))


def test_when_every_checkpoint_is_corrupt_training_starts_afresh(runs, tmp_path, capsys):
    paths = resume_copy(runs, tmp_path)
    for path in paths.checkpoints.iterdir():
        flip_a_byte_in_a_tensor(path)
    train_item(runs["params"], "arcface", runs["manifest"], paths)
    err = capsys.readouterr().err
    assert err.count(" is corrupt") == 2 and "resuming" not in err, err
    assert_same_state(model_state(runs["reference"].model), model_state(paths.model))


def test_a_checkpoint_of_a_model_of_another_shape_is_not_resumed(
    runs, tmp_path, monkeypatch, capsys
):
    """The model code changed between the interruption and the rerun (here: a wider network for
    the same params). The checkpoint does not fit: training starts afresh instead of crashing."""
    original_build = training.build_model

    def wider(backbone, heads, num_classes, **kwargs):
        backbone = {**backbone, "options": {**backbone["options"], "width": 12}}
        return original_build(backbone, heads, num_classes, **kwargs)

    monkeypatch.setattr(training, "build_model", wider)
    paths = resume_copy(runs, tmp_path / "resumed")
    train_item(runs["params"], "arcface", runs["manifest"], paths)
    err = capsys.readouterr().err
    assert "starting afresh" in err and "resuming" not in err, err
    fresh = paths_in(tmp_path / "fresh")
    train_item(runs["params"], "arcface", runs["manifest"], fresh)
    assert_same_state(model_state(fresh.model), model_state(paths.model))
    assert model_state(paths.model)["backbone.features.0.weight"].shape[0] == 12


# --------------------------------------------------------------------------------------------------
# A process killed while it writes a checkpoint.

DIE_DURING_THE_SECOND_SAVE = """
import io, os, sys
import torch
from pipeline import run_stage
from pipeline import train

real_save = torch.save

def dying_save(obj, handle, *args, **kwargs):
    if isinstance(obj, dict) and obj.get("epoch") == 2:
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        handle.write(data[: len(data) // 2])
        handle.flush()
        os.fsync(handle.fileno())
        os._exit(137)  # no cleanup, no exception handler: as a SIGKILL mid-write
    return real_save(obj, handle, *args, **kwargs)

torch.save = dying_save
sys.exit(run_stage(train.main, ["arcface"]))
"""


def test_a_process_killed_while_saving_a_checkpoint_resumes_from_the_previous_one(project, runs):
    write_params(project, tiny_raw(train__epochs=EPOCHS))
    killed = run_python(project, DIE_DURING_THE_SECOND_SAVE)
    assert killed.returncode == 137, killed.stderr
    checkpoints = project / "outputs" / "checkpoints" / "arcface"
    # The previous checkpoint, and the half-written temp file of the save that was killed.
    leftover, kept = sorted(p.name for p in checkpoints.iterdir())
    assert kept == "epoch-0001.pt"
    assert leftover.startswith(".epoch-0002.pt.") and leftover.endswith(".tmp"), leftover
    assert (checkpoints / leftover).stat().st_size > 0

    resumed = run_stage_process(project, "train", "arcface")
    assert resumed.returncode == 0, resumed.stderr
    assert "train@arcface: resuming after epoch 1 of 3" in resumed.stderr
    assert list(checkpoints.iterdir()) == []  # the leftover is gone, the run is complete
    model = project / "outputs" / "models" / "arcface.pt"
    assert_same_state(model_state(runs["reference"].model), model_state(model))
    metrics = project / "metrics" / "train" / "arcface.json"
    assert metrics.read_text() == runs["reference"].metrics.read_text()


def sigkill_during_the_save_of(epoch: int, step: int) -> str:
    """The train stage in a process that SIGKILLs itself half-way through writing the checkpoint
    after ``epoch`` epochs and ``step`` steps of the next (the bytes written are on disk)."""
    return f"""
import io, os, signal, sys
import torch
from pipeline import run_stage
from pipeline import train

real_save = torch.save

def dying_save(obj, handle, *args, **kwargs):
    if isinstance(obj, dict) and (obj.get("epoch"), obj.get("step")) == ({epoch}, {step}):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        handle.write(data[: len(data) // 2])
        handle.flush()
        os.fsync(handle.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, handle, *args, **kwargs)

torch.save = dying_save
sys.exit(run_stage(train.main, ["arcface"]))
"""


def test_a_process_killed_while_saving_a_step_checkpoint_resumes_at_the_previous_step(
    project, tmp_path
):
    """Step checkpoints every 4 steps of 15-step epochs: epoch 1 writes them after its steps 4, 8
    and 12. SIGKILL in the middle of the one after step 8 (a real signal, no handler runs); the
    rerun continues from step 4 of epoch 1, order, position, RNG (augmentation draws) and the
    epoch's running sums included, and ends as the uninterrupted run does."""
    raw = tiny_raw(
        train__epochs=2,
        train__checkpoint_every_steps=4,
        train__augment=[{"name": "RandomAffine", "degrees": 10}],  # draws from the resumed RNG
    )
    write_params(project, raw)
    folder = tmp_path / "reference"  # the uninterrupted run, in this process
    reference = replace(paths_in(folder), lr_plot=folder / "lr.tsv")
    manifest = read_manifest(project / "data" / "prepared")
    train_item(parse_params(raw), "arcface", manifest, reference)

    killed = run_python(project, sigkill_during_the_save_of(epoch=0, step=8))
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr)
    checkpoints = project / "outputs" / "checkpoints" / "arcface"
    # The previous step checkpoint, intact, and the half-written temp file of the killed save.
    leftover, kept = sorted(p.name for p in checkpoints.iterdir())
    assert kept == "epoch-0000-step-000004.pt"
    assert leftover.startswith(".epoch-0000-step-000008.pt."), leftover
    assert leftover.endswith(".tmp"), leftover
    assert (checkpoints / leftover).stat().st_size > 0
    assert checkpoint.damaged_member(checkpoints / kept) is None
    state = torch.load(checkpoints / kept, map_location="cpu", weights_only=True)
    assert (state["epoch"], state["step"]) == (0, 4)

    resumed = run_stage_process(project, "train", "arcface")
    assert resumed.returncode == 0, resumed.stderr
    assert "train@arcface: resuming at step 4 of epoch 1 of 2" in resumed.stderr, resumed.stderr
    assert list(checkpoints.iterdir()) == []  # the leftover is gone, the run is complete
    model = project / "outputs" / "models" / "arcface.pt"
    assert_same_state(model_state(reference.model), model_state(model))
    written = {
        "metrics": project / "metrics" / "train" / "arcface.json",
        "loss_plot": project / "plots" / "loss" / "arcface.tsv",
        "accuracy_plot": project / "plots" / "accuracy" / "arcface.tsv",
        "collapse_plot": project / "plots" / "collapse" / "arcface.tsv",
        "lr_plot": project / "plots" / "lr" / "arcface.tsv",
    }
    for name, path in written.items():
        assert path.read_text() == getattr(reference, name).read_text(), name


# --------------------------------------------------------------------------------------------------
# Non-finite losses.


def test_a_stop_on_a_non_finite_loss_keeps_a_checkpoint_the_rerun_resumes(
    runs, tmp_path, monkeypatch, capsys
):
    paths = paths_in(tmp_path)
    fault_at_training_batches(monkeypatch, nan={STEPS_PER_EPOCH + 3})  # epoch 2, step 3
    with pytest.raises(NonFiniteLossError, match=r"the loss is nan at epoch 2, step 3") as caught:
        train_item(runs["params"], "arcface", runs["manifest"], paths)
    kept = paths.checkpoints / "epoch-0001.pt"
    assert f"the last good checkpoint {kept} is kept" in str(caught.value)
    assert sorted(p.name for p in paths.checkpoints.iterdir()) == ["epoch-0001.pt"]
    monkeypatch.undo()  # the cause is fixed; rerun
    train_item(runs["params"], "arcface", runs["manifest"], paths)
    assert "resuming after epoch 1 of 3" in capsys.readouterr().err
    assert_same_state(model_state(runs["reference"].model), model_state(paths.model))


def test_a_non_finite_loss_before_any_checkpoint_says_so(runs, tmp_path, monkeypatch):
    fault_at_training_batches(monkeypatch, nan={1})
    with pytest.raises(NonFiniteLossError) as caught:
        train_item(runs["params"], "arcface", runs["manifest"], paths_in(tmp_path))
    assert "at epoch 1, step 1" in str(caught.value)
    assert "no checkpoint was written yet" in str(caught.value)
    assert "train.on_nonfinite: skip" in str(caught.value)  # says how to go on


def test_skipped_steps_are_counted_across_a_resume(runs, tmp_path, monkeypatch):
    params = parse_params(tiny_raw(train__epochs=EPOCHS, train__on_nonfinite="skip"))
    nan_steps = {2, 2 * STEPS_PER_EPOCH + 4}  # epoch 1 step 2, epoch 3 step 4
    uninterrupted = paths_in(tmp_path / "uninterrupted")
    fault_at_training_batches(monkeypatch, nan=nan_steps)
    metrics = train_item(params, "arcface", runs["manifest"], uninterrupted)
    assert metrics["skipped_steps"] == 2

    interrupted = paths_in(tmp_path / "interrupted")
    monkeypatch.undo()
    fault_at_training_batches(monkeypatch, nan={2}, interrupt=STEPS_PER_EPOCH + 5)
    with pytest.raises(Interrupt):
        train_item(params, "arcface", runs["manifest"], interrupted)
    # The rerun starts at epoch 2: epoch 3 step 4 is its batch STEPS_PER_EPOCH + 4.
    monkeypatch.undo()
    fault_at_training_batches(monkeypatch, nan={STEPS_PER_EPOCH + 4})
    resumed = train_item(params, "arcface", runs["manifest"], interrupted)
    assert resumed == metrics
    assert json.loads(interrupted.metrics.read_text())["skipped_steps"] == 2
    assert_same_state(model_state(uninterrupted.model), model_state(interrupted.model))
    state = model_state(interrupted.model)
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_an_infinite_gradient_with_a_finite_loss_stops_and_the_rerun_resumes(
    runs, tmp_path, monkeypatch, capsys
):
    paths = paths_in(tmp_path)
    fault_at_training_batches(monkeypatch, inf_grad={STEPS_PER_EPOCH + 3})  # epoch 2, step 3
    with pytest.raises(NonFiniteLossError) as caught:
        train_item(runs["params"], "arcface", runs["manifest"], paths)
    message = str(caught.value)
    assert "the gradient norm is" in message and "(the loss is finite)" in message, message
    assert "at epoch 2, step 3" in message, message
    assert sorted(p.name for p in paths.checkpoints.iterdir()) == ["epoch-0001.pt"]
    monkeypatch.undo()
    train_item(runs["params"], "arcface", runs["manifest"], paths)
    assert "resuming after epoch 1 of 3" in capsys.readouterr().err
    assert_same_state(model_state(runs["reference"].model), model_state(paths.model))


def test_infinite_gradients_are_skipped_and_counted_without_clipping(runs, tmp_path, monkeypatch):
    params = parse_params(
        tiny_raw(train__epochs=2, train__on_nonfinite="skip", train__grad_clip_norm=None)
    )
    fault_at_training_batches(monkeypatch, inf_grad={4, STEPS_PER_EPOCH + 9})
    metrics = train_item(params, "arcface", runs["manifest"], paths_in(tmp_path))
    assert metrics["skipped_steps"] == 2 and math.isfinite(metrics["train_loss"])
    state = model_state(tmp_path / "model.pt")
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_weights_that_turn_non_finite_are_never_checkpointed(runs, tmp_path, monkeypatch, capsys):
    """Finite losses and gradients, but a step leaves an infinite weight (as a huge learning rate
    can) at the last step of epoch 2: epoch 2 is not checkpointed, epoch 1 stays the last one."""
    original = training.make_optimizer

    def poisoning_optimizer(config, parameters):
        optimizer = original(config, parameters)
        calls = {"n": 0}

        def after_step(optimizer, args, kwargs):
            calls["n"] += 1
            if calls["n"] == 2 * STEPS_PER_EPOCH:
                with torch.no_grad():
                    optimizer.param_groups[0]["params"][0].view(-1)[0] = math.inf

        optimizer.register_step_post_hook(after_step)
        return optimizer

    monkeypatch.setattr(training, "make_optimizer", poisoning_optimizer)
    paths = paths_in(tmp_path)
    with pytest.raises(NonFiniteLossError) as caught:
        train_item(runs["params"], "arcface", runs["manifest"], paths)
    message = str(caught.value)
    assert "the weights turned non-finite during epoch 2 (backbone." in message, message
    assert f"the last good checkpoint {paths.checkpoints / 'epoch-0001.pt'} is kept" in message
    assert sorted(p.name for p in paths.checkpoints.iterdir()) == ["epoch-0001.pt"]
    monkeypatch.undo()
    train_item(runs["params"], "arcface", runs["manifest"], paths)
    assert "resuming after epoch 1 of 3" in capsys.readouterr().err
    assert_same_state(model_state(runs["reference"].model), model_state(paths.model))
