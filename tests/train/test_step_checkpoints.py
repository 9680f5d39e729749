"""train.checkpoint_every_steps: checkpoints within an epoch, and a resume from one that continues
from that step bitwise as an uninterrupted run does (the epoch's order and position, the RNG, the
running sums of the epoch's history row)."""

from __future__ import annotations

import pytest
import torch
from pipeline_testing import (
    STEPS_PER_EPOCH,
    assert_same_state,
    model_state,
    paths_in,
    tiny_raw,
)

from angular.config import parse_params
from angular.data import read_manifest
from angular.train import checkpoint
from angular.train import epoch as training_epoch
from angular.train.loop import train_item
from angular.train.sampler import EpochBatchSampler


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


@pytest.mark.parametrize(
    "overrides",
    [
        {"train__augment": [{"name": "RandomAffine", "degrees": 10}]},  # the RNG of the images
        {"train__sampler": "prioritized", "train__warmup_steps": 7},  # draws, and lr by step
    ],
    ids=["uniform-augmented", "prioritized-warmup"],
)
def test_a_resume_within_an_epoch_equals_the_uninterrupted_run_bitwise(
    project, monkeypatch, capsys, overrides
):
    params = parse_params(tiny_raw(train__epochs=2, train__checkpoint_every_steps=4, **overrides))
    manifest = read_manifest("data/prepared")
    reference = paths_in(project / "reference")
    train_item(params, "arcface", manifest, reference)

    resumed = paths_in(project / "resumed")
    # Run steps 4, 8, 12 (epoch 1), 16 and 20 (epoch 2, steps 1 and 5) write checkpoints.
    interrupt_training_at(monkeypatch, STEPS_PER_EPOCH + 7)
    with pytest.raises(Interrupt):
        train_item(params, "arcface", manifest, resumed)
    names = [path.name for path in checkpoint.checkpoints_in(resumed.checkpoints)]
    assert names == ["epoch-0001-step-000001.pt", "epoch-0001-step-000005.pt"]  # keep 2
    monkeypatch.undo()
    monkeypatch.chdir(project)
    train_item(params, "arcface", manifest, resumed)
    assert "resuming at step 5 of epoch 2 of 2" in capsys.readouterr().err

    assert_same_state(model_state(reference.model), model_state(resumed.model))
    for name in ("metrics", "loss_plot", "accuracy_plot", "collapse_plot"):
        assert getattr(resumed, name).read_text() == getattr(reference, name).read_text(), name


def test_checkpoint_names_order_by_their_place_in_the_run(tmp_path):
    names = [
        "epoch-0002.pt",
        "epoch-0001-step-000010.pt",
        "epoch-0001.pt",
        "epoch-0001-step-000002.pt",
        "epoch-0010.pt",
        "epoch-0002-step-000001.pt",
    ]
    for name in names + ["epoch-x.pt", "epoch-0001-step-000000.pt", "notes.txt"]:
        (tmp_path / name).write_bytes(b"")
    assert [path.name for path in checkpoint.checkpoints_in(tmp_path)] == [
        "epoch-0001.pt",
        "epoch-0001-step-000002.pt",
        "epoch-0001-step-000010.pt",
        "epoch-0002.pt",
        "epoch-0002-step-000001.pt",
        "epoch-0010.pt",
    ]
    for name in names:
        path = tmp_path / name
        place = checkpoint.place_of(path)
        assert (
            checkpoint.checkpoint_path(
                tmp_path, place // checkpoint.STEP_SPAN, place % checkpoint.STEP_SPAN
            )
            == path
        )


@pytest.mark.parametrize("size", [935, 64, 65, 1, 7])
@pytest.mark.parametrize("batch", [1, 2, 16, 64])
def test_the_epoch_sampler_resumes_any_position_with_the_uninterrupted_batches(size, batch):
    """One process: the batches after a resume at any whole step are those of the uninterrupted
    pass, and the generator ends where it would (the next epoch's order is the same)."""
    seed = torch.Generator().manual_seed(5)
    whole = EpochBatchSampler(size, batch, generator=seed)
    batches = list(whole)
    order, after = whole.order, seed.get_state()
    assert sorted(i for b in batches for i in b) == sorted(
        torch.randperm(size, generator=torch.Generator().set_state(order["generator"])).tolist()[
            : sum(map(len, batches))
        ]
    )
    for taken in range(len(batches) + 1):
        generator = torch.Generator().manual_seed(99)  # any state: the order restores it
        sampler = EpochBatchSampler(size, batch, generator=generator)
        sampler.resume(order, sum(map(len, batches[:taken])))
        assert list(sampler) == batches[taken:]
        assert torch.equal(generator.get_state(), after)


def test_the_epoch_sampler_refuses_what_cannot_be_an_epoch():
    generator = torch.Generator()
    for arguments, words in (
        ((0, 4), "size must be an integer >= 1, got 0"),
        ((10, 0), "batch_size must be an integer >= 1, got 0"),
        ((10, True), "batch_size must be an integer >= 1, got True"),
    ):
        with pytest.raises(ValueError, match=words):
            EpochBatchSampler(*arguments, generator=generator)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\), got 2"):
        EpochBatchSampler(10, 2, world_size=2, rank=2)
    with pytest.raises(ValueError, match="from a generator"):
        EpochBatchSampler(10, 2)
    with pytest.raises(ValueError, match=r"position must be in \[0, 10\], got 11"):
        EpochBatchSampler(10, 2, generator=generator).resume({"seed": 1}, 11)
