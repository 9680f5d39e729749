"""The partial-collapse (drift) monitor: it flags the drifting ArcFace run of issue 27, drifts made
from real centre and embedding tensors, and stays silent on every run the repository commits."""

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from angular.train.collapse import DriftMonitor, centre_cosine, embedding_spread

ROOT = Path(__file__).resolve().parents[2]
MONITOR = DriftMonitor()


def first_flag(history: list[dict], monitor: DriftMonitor = MONITOR) -> int | None:
    """The first epoch at which the monitor, run after each epoch, speaks."""
    for end in range(1, len(history) + 1):
        if monitor.verdict(history[:end]) is not None:
            return history[end - 1]["epoch"]
    return None


def interpolate(points: dict[int, float], epochs: int) -> np.ndarray:
    known = sorted(points)
    return np.interp(np.arange(1, epochs + 1), known, [points[e] for e in known])


def reported_run(loss_falls: bool = True) -> list[dict]:
    """The trajectory issue 27 reports: mean centre cosine 0.01 at epoch 4, 0.47 at 14, 0.81 at
    24, 0.65 at 50; spread 0.41 falling to 0.21, then back to 0.44; the loss kept improving."""
    cosine = interpolate({1: 0.005, 4: 0.01, 14: 0.47, 24: 0.81, 50: 0.65}, 50)
    spread = interpolate({1: 0.6, 2: 0.35, 4: 0.41, 24: 0.21, 50: 0.44}, 50)
    loss = np.linspace(20.0, 5.0, 50) if loss_falls else np.linspace(5.0, 20.0, 50)
    return [
        {
            "epoch": e + 1,
            "train_loss": float(loss[e]),
            "centre_cosine": float(cosine[e]),
            "embedding_spread": float(spread[e]),
        }
        for e in range(50)
    ]


def test_it_flags_the_reported_drift_before_the_cosine_reaches_half():
    history = reported_run()
    epoch = first_flag(history)
    assert epoch is not None and epoch <= 14
    assert "drift together" in MONITOR.verdict(history[:epoch])
    assert "0.3" in MONITOR.verdict(history[:epoch])


def test_the_spread_rule_alone_flags_the_reported_fall():
    history = [{**row, "centre_cosine": 0.01} for row in reported_run()]
    epoch = first_flag(history)
    assert epoch is not None and epoch < 24
    assert "spread" in MONITOR.verdict(history[:epoch])


def test_it_is_silent_while_the_loss_rises():
    """A rising loss is a failing run, which the loss itself shows; drift means the loss improves."""
    assert first_flag(reported_run(loss_falls=False)) is None


def committed_runs() -> list[Path]:
    found = sorted(ROOT.glob("plots/collapse/*.tsv")) + sorted(
        ROOT.glob("experiments/*/plots/collapse/*.tsv")
    )
    assert len(found) >= 9, "the digits, ORL and lfw-dev runs' collapse plots are committed"
    return found


def read_tsv(path: Path) -> list[dict]:
    with path.open() as handle:
        return [
            {k: (int(v) if k == "epoch" else float(v)) for k, v in row.items()}
            for row in csv.DictReader(handle, delimiter="\t")
        ]


@pytest.mark.parametrize("collapse_plot", committed_runs(), ids=lambda p: str(p.relative_to(ROOT)))
def test_it_is_silent_on_every_committed_run(collapse_plot):
    loss_plot = collapse_plot.parent.parent / "loss" / collapse_plot.name
    losses = {row["epoch"]: row["train_loss"] for row in read_tsv(loss_plot)}
    history = [{**row, "train_loss": losses[row["epoch"]]} for row in read_tsv(collapse_plot)]
    assert len(history) >= 10
    assert first_flag(history) is None
    measures = MONITOR.measures(history)
    assert measures["centre_cosine_rise"] < MONITOR.max_centre_cosine_rise
    assert measures["spread_drop"] < MONITOR.max_spread_drop


def tensor_run(drift: bool, seed: int, classes: int = 40, dim: int = 32) -> list[dict]:
    """Centres and embeddings measured by the training code's own functions, epoch by epoch: with
    ``drift`` every centre and embedding is pulled towards one direction; without, they only get
    fresh noise of the same size."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=generator, dtype=torch.float64)
    common = torch.randn(dim, generator=generator, dtype=torch.float64)
    labels = torch.randint(classes, (400,), generator=generator)
    history = []
    for epoch in range(1, 31):
        pull = 0.12 * epoch if drift else 0.0
        noise = 0.3 * torch.randn(centres.shape, generator=generator, dtype=torch.float64)
        current = centres + noise + pull * common.norm() * common / common.norm()
        embeddings = current[labels] + 0.5 * torch.randn(
            400, dim, generator=generator, dtype=torch.float64
        )
        history.append(
            {
                "epoch": epoch,
                "train_loss": 10.0 / epoch,
                "centre_cosine": centre_cosine(current),
                "embedding_spread": embedding_spread(embeddings),
            }
        )
    return history


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_drifting_tensors_are_flagged_and_noisy_ones_are_not(seed):
    drifting = tensor_run(drift=True, seed=seed)
    assert drifting[-1]["centre_cosine"] > 0.5
    assert first_flag(drifting) is not None
    assert first_flag(tensor_run(drift=False, seed=seed)) is None


def test_a_joint_item_names_the_head_that_drifts():
    history = [
        {
            "epoch": row["epoch"],
            "train_loss": row["train_loss"],
            "centre_cosine_cosface": 0.0,
            "centre_cosine_arcface": row["centre_cosine"],
            "embedding_spread": 0.5,
        }
        for row in reported_run()
    ]
    epoch = first_flag(history)
    assert epoch is not None
    assert "centres of arcface" in MONITOR.verdict(history[:epoch])


def test_measures_are_nan_until_there_is_history_enough():
    row = {"epoch": 1, "train_loss": 1.0, "centre_cosine": 0.1, "embedding_spread": 0.5}
    measures = MONITOR.measures([row])
    assert measures["centre_cosine_rise"] == 0.0
    assert math.isnan(measures["spread_drop"])
    assert MONITOR.verdict([row]) is None
