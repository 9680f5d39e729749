"""``train.accumulate`` (issue 28): N micro-batches give the update of one batch of N times the
size. Held in fp64 to rounding against one big batch, with the trainer's own epoch loop, on a
model without BatchNorm (BatchNorm normalises each micro-batch by its own statistics: docs/
pipeline.md, Training controls)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pipeline_testing import paths_in, tiny_raw
from torch.utils.data import DataLoader, TensorDataset

from angular.config import ConfigError, parse_params
from angular.data import read_manifest
from angular.nn.heads import MarginHead, MarginSpec
from angular.nn.recognition import RecognitionModel
from angular.train.epoch import micro_batches, train_epoch
from angular.train.loop import make_optimizer, train_item
from angular.train.session import Session
from angular.train.world import ONE_PROCESS

CLASSES, FEATURES, DIM = 5, 6, 4


@pytest.mark.parametrize(
    ("size", "count", "sizes"),
    [(12, 4, [3, 3, 3, 3]), (6, 4, [2, 2, 1, 1]), (2, 4, [1, 1]), (7, 1, [7])],
)
def test_micro_batches_cut_a_batch_in_order_into_near_equal_parts(size, count, sizes):
    parts = micro_batches(size, count)
    assert [p.stop - p.start for p in parts] == sizes
    assert parts[0].start == 0 and parts[-1].stop == size
    assert all(a.stop == b.start for a, b in zip(parts, parts[1:]))


def fp64_session(accumulate: int, optimizer: str, tmp_path: Path, sampler_data) -> Session:
    """A session of the trainer on a linear backbone and an ArcFace head, all in fp64."""
    raw = tiny_raw(
        train__batch_size=12,
        train__accumulate=accumulate,
        train__optimizer=optimizer,
        train__grad_clip_norm=0.5,
    )
    config = parse_params(raw).train
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(
        torch.nn.Linear(FEATURES, 8), torch.nn.Tanh(), torch.nn.Linear(8, DIM)
    )
    head = MarginHead(DIM, CLASSES, MarginSpec.arcface(s=8.0, m=0.3), label_smoothing=0.1)
    model = RecognitionModel(backbone, {"arcface": head}).double()
    optimizer = make_optimizer(config, model.parameters())
    images, labels = sampler_data
    loader = DataLoader(TensorDataset(images, labels), batch_size=12, shuffle=False)
    return Session(
        label="test",
        item_name="arcface",
        item=None,
        config=config,
        device=torch.device("cpu"),
        model=model,
        full_model=model,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
        scheduler_by_step=False,
        generator=torch.Generator(),
        train_loader=loader,
        val_loader=loader,
        descriptions=({}, {}, {}),
        fingerprint="",
        base_fingerprint="",
        paths=paths_in(tmp_path),
        checkpoints=tmp_path,
        keep_checkpoints=1,
        classes=tuple(str(c) for c in range(CLASSES)),
    )


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("accumulate", [2, 3, 4])
def test_micro_batches_give_the_update_of_one_batch_in_fp64(tmp_path, optimizer, accumulate):
    generator = torch.Generator().manual_seed(accumulate)
    # 30 rows in batches of 12: the last batch (6) is cut unevenly by 4 (2, 2, 1, 1).
    data = (
        torch.randn(30, FEATURES, generator=generator, dtype=torch.float64),
        torch.randint(0, CLASSES, (30,), generator=generator),
    )
    one = fp64_session(1, optimizer, tmp_path / "one", data)
    many = fp64_session(accumulate, optimizer, tmp_path / "many", data)
    start = one.model.backbone[0].weight.detach().clone()
    for epoch in (1, 2):
        loss_one, accuracy_one = train_epoch(one, ONE_PROCESS, epoch, False)
        loss_many, accuracy_many = train_epoch(many, ONE_PROCESS, epoch, False)
        assert loss_many == pytest.approx(loss_one, rel=1e-12, abs=1e-12)
        assert accuracy_many == accuracy_one
    for (name, a), (_, b) in zip(one.model.state_dict().items(), many.model.state_dict().items()):
        assert a.dtype in (torch.float64, torch.int64)
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=name)
    assert not torch.equal(one.model.backbone[0].weight, start)  # the steps moved the model


def test_an_accumulate_that_does_not_divide_the_batch_is_refused_in_one_line():
    with pytest.raises(ConfigError) as caught:
        parse_params(tiny_raw(train__accumulate=5))
    message = str(caught.value)
    assert message.startswith("train.accumulate: 5 does not divide train.batch_size (64)")
    assert "\n" not in message
    for bad in (0, 1.5, True):
        with pytest.raises(ConfigError, match=r"^train\.accumulate: must be an integer >= 1"):
            parse_params(tiny_raw(train__accumulate=bad))


def test_digits_train_with_accumulation_and_batchnorm(project):
    """The small CNN (BatchNorm, per micro-batch statistics) trains with 4 micro-batches."""
    params = parse_params(tiny_raw(train__epochs=1, train__accumulate=4))
    paths = paths_in(project / "run")
    metrics = train_item(params, "arcface", read_manifest("data/prepared"), paths)
    assert metrics["skipped_steps"] == 0 and metrics["train_accuracy"] > 0.2
    assert "scaler_skipped_steps" not in metrics
