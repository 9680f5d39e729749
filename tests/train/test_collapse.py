"""Collapse of margin heads: the measures against brute force, the bound against the loss it bounds,
the monitor's rule, and a collapse reproduced in seconds on synthetic data, which the monitor
catches and larger centres (``train.centre_norm``) avoid."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from angular.nn.heads import LambdaSchedule, MarginHead, MarginSpec
from angular.ops import reference
from angular.train.collapse import (
    CollapseMonitor,
    centre_cosine,
    collapse_room,
    collapsed_loss,
    embedding_spread,
    init_centres,
)


def test_centre_cosine_is_the_mean_over_pairs():
    weight = torch.randn(37, 16, dtype=torch.float64)
    unit = F.normalize(weight, dim=1)
    pairwise = unit @ unit.T
    brute = (pairwise.sum() - pairwise.diagonal().sum()) / (37 * 36)
    assert centre_cosine(weight) == pytest.approx(float(brute), abs=1e-12)
    same = torch.randn(1, 16).repeat(5, 1) * torch.rand(5, 1).add(0.1)  # one direction, any norm
    assert centre_cosine(same) == pytest.approx(1.0, abs=1e-9)
    assert math.isnan(centre_cosine(torch.randn(1, 16)))


def test_embedding_spread_is_zero_on_a_line_and_large_on_the_sphere():
    direction = F.normalize(torch.randn(32, dtype=torch.float64), dim=0)
    signs = torch.tensor([1.0, -1.0]).repeat(50).double()
    scale = torch.rand(100, dtype=torch.float64) + 0.5
    on_a_line = (signs * scale)[:, None] * direction[None, :]
    assert embedding_spread(on_a_line) == pytest.approx(0.0, abs=1e-9)
    spread_out = torch.randn(4000, 32, dtype=torch.float64)
    assert embedding_spread(spread_out) > 0.9  # 1 - 1/32 for a perfectly even spread
    unit = F.normalize(spread_out, dim=1)
    top = torch.linalg.eigvalsh(unit.T @ unit / len(unit))[-1]
    assert embedding_spread(spread_out) == pytest.approx(1.0 - float(top), abs=1e-12)


@pytest.mark.parametrize(
    "margin",
    [MarginSpec.arcface(32.0, 0.3), MarginSpec.cosface(32.0, 0.25), MarginSpec.combined(16.0)],
    ids=["arcface", "cosface", "combined"],
)
@pytest.mark.parametrize("classes, smoothing", [(80, 0.1), (2, 0.0), (1000, 0.3)])
def test_collapsed_loss_is_the_cross_entropy_of_the_collapsed_state(margin, classes, smoothing):
    """Every centre on one direction: all logits s*c, the target's s*f(c); the bound is that loss at
    the least penalised angle, computed here by PyTorch's own cross-entropy."""
    theta = torch.linspace(0, math.pi, 20001, dtype=torch.float64)
    cos = torch.cos(theta)
    f = reference.target_logit(cos, m1=margin.m1, m2=margin.m2, m3=margin.m3, lam=0.0)
    best = int((cos - f).argmin())
    logits = torch.full((1, classes), margin.s * float(cos[best]), dtype=torch.float64)
    logits[0, 0] = margin.s * float(f[best])
    expected = F.cross_entropy(logits, torch.tensor([0]), label_smoothing=smoothing)
    assert collapsed_loss(margin, classes, smoothing) == pytest.approx(float(expected), rel=1e-9)


def test_collapse_room_of_the_presets():
    # The recipe that collapsed (s = 32, m = 0.3, C = 80, eps = 0.1): the least ArcFace penalty is
    # 2 s (1 - cos(m / 2)) at theta = pi - m / 2, half of s (1 - cos m) at theta = 0.
    room = collapse_room(MarginSpec.arcface(32.0, 0.3), 80, 0.1)
    least = 2 * 32 * (1 - math.cos(0.15))
    assert room == pytest.approx(math.log((79 + math.exp(-least)) / 80) + (0.9 + 0.1 / 80) * least)
    assert 0.6 < room < 0.7
    assert collapse_room(MarginSpec.arcface(64.0, 0.5), 80, 0.1) == pytest.approx(3.5, abs=0.1)
    # CosFace's penalty is s m at every angle.
    cosface = math.log((79 + math.exp(-8.0)) / 80) + 8.0
    assert collapse_room(MarginSpec.cosface(32.0, 0.25), 80, 0.0) == pytest.approx(cosface)
    # SphereFace's penalty vanishes at theta = 0: no bound.
    assert collapse_room(MarginSpec.sphereface(64.0, 4.0, LambdaSchedule()), 80, 0.1) is None


def _row(epoch, loss, accuracy, centres=0.0):
    return {
        "epoch": epoch,
        "train_loss": loss,
        "train_accuracy": accuracy,
        "centre_cosine": centres,
    }


def test_the_monitor_rule():
    monitor = CollapseMonitor(max_centre_cosine=0.9, max_accuracy_drop=0.5)
    healthy = [_row(e, 8.0 - 0.3 * e, 0.1 + 0.05 * e) for e in range(1, 11)]
    assert monitor.verdict(healthy, 80) is None
    # Centres on one direction.
    centres = healthy + [_row(11, 4.0, 0.6, centres=0.95)]
    assert (
        monitor.verdict(healthy + [_row(11, 4.0, 0.6, centres=0.5)], 80) is None
    )  # lfw-dev: healthy
    assert "centres of the head collapsed" in monitor.verdict(centres, 80)
    joint = healthy + [{**_row(11, 4.0, 0.6, 0.95), "centre_cosine_arcface": 0.95}]
    assert "centres of arcface" in monitor.verdict(joint, 80)
    # The trajectory: accuracy 0.37 -> 0.16 while the loss falls.
    falling = [_row(1, 8.5, 0.1), _row(2, 7.0, 0.37), _row(3, 6.0, 0.25), _row(4, 5.56, 0.16)]
    assert "fell to 0.160 from 0.370" in monitor.verdict(falling, 80)
    assert monitor.verdict(falling[:3], 80) is None  # 0.25 is not yet below half of 0.37
    # Accuracy falling with a rising loss is overfitting or a bad step, not a collapse.
    rising = [_row(1, 8.5, 0.1), _row(2, 7.0, 0.37), _row(3, 7.5, 0.1)]
    assert monitor.verdict(rising, 80) is None
    # Noise around chance is not a fall: the best must be at least twice chance.
    chance = [_row(1, 5.0, 0.024), _row(2, 4.9, 0.01)]
    assert monitor.verdict(chance, 80) is None


def test_rescaled_centres_keep_their_directions_and_draw_nothing():
    torch.manual_seed(3)
    head = MarginHead(16, 10, MarginSpec.arcface())
    before = head.weight.detach().clone()
    state = torch.get_rng_state()
    init_centres(head, None)
    assert torch.equal(head.weight, before)
    init_centres(head, 4.0)
    assert torch.equal(torch.get_rng_state(), state)
    torch.testing.assert_close(head.weight.norm(dim=1), torch.full((10,), 4.0))
    torch.testing.assert_close(F.normalize(before, dim=1), F.normalize(head.weight.detach(), dim=1))
    for bad in (0.0, -1.0, math.nan, math.inf, "4"):
        with pytest.raises(ValueError, match="norm must be a finite number > 0 or None"):
            init_centres(head, bad)


def _synthetic_run(seed: int, s: float, m: float, centre_norm: float | None, epochs: int = 6):
    """ArcFace on 80 Gaussian classes too noisy to separate well (chance 1/80), Adam at 3e-3 with
    label smoothing 0.1, as the faces recipe: the setting where ArcFace heads collapse. Returns the
    monitor's history."""
    generator = torch.Generator().manual_seed(1234)
    classes, per_class, features = 80, 100, 32
    centres = torch.randn(classes, features, generator=generator)
    labels = torch.arange(classes).repeat_interleave(per_class)
    x = centres[labels] + 4.0 * torch.randn(len(labels), features, generator=generator)
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Linear(features, 128),
        nn.BatchNorm1d(128),
        nn.ReLU(),
        nn.Linear(128, 32),
        nn.BatchNorm1d(32),
    )
    head = MarginHead(32, classes, MarginSpec.arcface(s, m), label_smoothing=0.1)
    init_centres(head, centre_norm)
    optimizer = torch.optim.Adam(
        [*net.parameters(), *head.parameters()], lr=3e-3, weight_decay=5e-4
    )
    history = []
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(labels))
        total, correct = 0.0, 0
        for start in range(0, len(order), 64):
            batch = order[start : start + 64]
            embeddings = net(x[batch])
            loss = head.loss(embeddings, labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch)
            correct += int((head.cosine(embeddings.detach()).argmax(1) == labels[batch]).sum())
        history.append(
            {
                "epoch": epoch,
                "train_loss": total / len(labels),
                "train_accuracy": correct / len(labels),
                "centre_cosine": centre_cosine(head.weight),
            }
        )
    return history


@pytest.mark.slow
def test_a_collapse_in_seconds_is_caught_and_larger_centres_avoid_it():
    torch.set_num_threads(1)
    monitor = CollapseMonitor(max_centre_cosine=0.9, max_accuracy_drop=0.5)
    collapsed = _synthetic_run(0, s=16.0, m=0.3, centre_norm=None)
    verdicts = [monitor.verdict(collapsed[: i + 1], 80) for i in range(len(collapsed))]
    assert any(verdicts), collapsed
    best = max(row["train_accuracy"] for row in collapsed)
    assert collapsed[-1]["centre_cosine"] > 0.9 and collapsed[-1]["train_accuracy"] < best
    for seed in (0, 1):  # centres of norm sqrt(D) (as N(0, 1) would give), twice as many epochs
        healthy = _synthetic_run(seed, s=16.0, m=0.3, centre_norm=32**0.5, epochs=12)
        assert not any(monitor.verdict(healthy[: i + 1], 80) for i in range(len(healthy))), healthy
        assert healthy[-1]["centre_cosine"] < 0.1
        assert healthy[-1]["train_accuracy"] > healthy[0]["train_accuracy"]
