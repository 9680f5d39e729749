"""Margin heads (``angular.nn.heads``): they learn, their inference logits carry no margin, SphereFace's
``lam`` follows its schedule and steps only with training, and bad configuration names its field."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch
import torch.nn.functional as F

from angular import ops
from angular.nn.heads import (
    PRESETS,
    ArcFace,
    CombinedMargin,
    CosFace,
    LambdaSchedule,
    MarginHead,
    MarginSpec,
    SphereFace,
)

EMBEDDING_DIM = 16
NUM_CLASSES = 6


@pytest.fixture
def seed() -> int:
    value = torch.seed()
    random.seed(value)
    return value


def separable_data(batch: int = 96, noise: float = 0.1):
    """Embeddings around random class centres: random, but separable by direction."""
    centres = F.normalize(torch.randn(NUM_CLASSES, EMBEDDING_DIM), dim=1)
    labels = torch.arange(batch) % NUM_CLASSES
    scale = torch.rand(batch, 1) * 2.0 + 0.5  # the norm must not matter to a cosine head
    x = scale * (centres[labels] + noise * torch.randn(batch, EMBEDDING_DIM))
    return x, labels


def eval_loss(head: MarginHead, x, labels) -> float:
    head.eval()
    with torch.no_grad():
        value = head.loss(x, labels).item()
    head.train()
    return value


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_a_few_adam_steps_lower_the_loss(seed, preset):
    x, labels = separable_data()
    head = PRESETS[preset](EMBEDDING_DIM, NUM_CLASSES)
    initial = copy.deepcopy(head)
    optimizer = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(15):
        optimizer.zero_grad()
        loss = head.loss(x, labels)
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss), f"seed={seed}"
    assert int(head.step) == 15
    # Compare at the same point of the lam schedule: the untrained weights at the trained step.
    initial.step.fill_(int(head.step))
    before, after = eval_loss(initial, x, labels), eval_loss(head, x, labels)
    assert after < 0.5 * before, f"seed={seed} {preset}: loss {before} -> {after}"
    # And the head now classifies the data by its margin-free logits.
    accuracy = (head.logits(x).argmax(dim=1) == labels).float().mean().item()
    assert accuracy > 0.9, f"seed={seed} {preset}: accuracy {accuracy}"


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_forward_loss_and_logits_use_the_ops(seed, preset):
    head = PRESETS[preset](EMBEDDING_DIM, NUM_CLASSES)
    x, labels = separable_data(20)
    labels[3] = -1
    cos = F.normalize(x, dim=1) @ F.normalize(head.weight, dim=1).T
    m = head.margin
    margin = dict(s=m.s, m1=m.m1, m2=m.m2, m3=m.m3, lam=head.lam)
    context = f"seed={seed} {preset}"
    torch.testing.assert_close(head.cosine(x), cos, msg=lambda t: f"{t}\n{context}")
    torch.testing.assert_close(
        head.logits(x), m.s * cos, msg=lambda t: f"{t}\n{context}"
    )  # no margin at inference
    torch.testing.assert_close(
        head(x, labels), ops.margin_logits(cos, labels, **margin), msg=lambda t: f"{t}\n{context}"
    )
    head.eval()
    for reduction in ("mean", "sum", "none"):
        torch.testing.assert_close(
            head.loss(x, labels, reduction=reduction),
            ops.margin_cross_entropy(cos, labels, **margin, reduction=reduction),
            msg=lambda t: f"{t}\n{context}",
        )


def test_label_smoothing_reaches_the_loss(seed):
    x, labels = separable_data(30)
    plain = ArcFace(EMBEDDING_DIM, NUM_CLASSES).eval()
    smoothed = ArcFace(EMBEDDING_DIM, NUM_CLASSES, label_smoothing=0.2).eval()
    smoothed.load_state_dict(plain.state_dict())
    cos = plain.cosine(x)
    want = ops.margin_cross_entropy(cos, labels, s=64.0, m2=0.5, label_smoothing=0.2)
    torch.testing.assert_close(smoothed.loss(x, labels), want, msg=lambda t: f"{t}\nseed={seed}")
    assert not torch.allclose(plain.loss(x, labels), want)


def test_presets_carry_their_margins():
    expected = {
        ArcFace: (64.0, 1.0, 0.5, 0.0),
        CosFace: (64.0, 1.0, 0.0, 0.35),
        SphereFace: (64.0, 4.0, 0.0, 0.0),
        CombinedMargin: (64.0, 1.0, 0.3, 0.2),
    }
    for cls, values in expected.items():
        m = cls(4, 3).margin
        assert (m.s, m.m1, m.m2, m.m3) == values, cls.__name__
    # The original repository's settings are expressible.
    assert ArcFace(4, 3, s=128.0, m=0.5).margin.m2 == 0.5
    assert CosFace(4, 3, s=128.0, m=0.4).margin.m3 == 0.4
    assert SphereFace(4, 3, s=128.0, m=1.4).margin.m1 == 1.4
    assert SphereFace(4, 3).margin.lam_schedule == LambdaSchedule()
    assert ArcFace(4, 3).lam == 0.0


def schedule_formula(schedule: LambdaSchedule, step: int) -> float:
    return max(
        schedule.lam_min, schedule.lam_base * (1.0 + schedule.gamma * step) ** -schedule.power
    )


def test_default_sphereface_schedule_matches_design():
    head = SphereFace(EMBEDDING_DIM, NUM_CLASSES)
    assert head.lam == 1000.0
    schedule = head.margin.lam_schedule
    assert (schedule.lam_base, schedule.gamma, schedule.power, schedule.lam_min) == (
        1000.0,
        0.12,
        1.0,
        5.0,
    )
    assert schedule(10) == pytest.approx(1000.0 / 2.2)
    assert schedule(10**6) == 5.0


def test_sphereface_lam_schedule_steps_with_training_only(seed):
    schedule = LambdaSchedule(
        lam_base=random.uniform(100.0, 2000.0),
        gamma=random.uniform(0.05, 1.0),
        power=random.uniform(0.5, 2.0),
        lam_min=random.uniform(0.0, 20.0),
    )
    head = SphereFace(EMBEDDING_DIM, NUM_CLASSES, schedule=schedule)
    x, labels = separable_data(12)
    context = f"seed={seed} {schedule}"
    for step in range(40):
        assert int(head.step) == step, context
        assert head.lam == pytest.approx(schedule_formula(schedule, step), rel=1e-12), context
        # The loss uses the lam of the current step.
        want = ops.margin_cross_entropy(
            head.cosine(x), labels, s=64.0, m1=4.0, lam=schedule_formula(schedule, step)
        )
        torch.testing.assert_close(head.loss(x, labels), want, msg=lambda t: f"{t}\n{context}")
    assert head.lam == pytest.approx(schedule_formula(schedule, 40)), context
    # Reaches its floor.
    assert schedule(10**9) == pytest.approx(schedule.lam_min)

    head.eval()
    head.loss(x, labels)
    head(x, labels)
    head.logits(x)
    assert int(head.step) == 40, "eval-mode calls must not advance the schedule"
    head.train()
    head(x, labels)
    head.logits(x)
    assert int(head.step) == 40, "forward and logits must not advance the schedule"


def test_step_is_saved_in_state_dict(seed):
    head = SphereFace(EMBEDDING_DIM, NUM_CLASSES)
    x, labels = separable_data(12)
    steps = random.randint(1, 9)
    for _ in range(steps):
        head.loss(x, labels)
    state = head.state_dict()
    assert "step" in state and int(state["step"]) == steps
    restored = SphereFace(EMBEDDING_DIM, NUM_CLASSES)
    restored.load_state_dict(state)
    assert int(restored.step) == steps
    assert restored.lam == head.lam
    torch.testing.assert_close(restored.weight, head.weight)


@pytest.mark.parametrize(
    "field,value",
    [
        ("s", 0.0),
        ("s", -3.0),
        ("s", math.nan),
        ("s", math.inf),
        ("s", "64"),
        ("m1", 0.0),
        ("m1", -1.0),
        ("m1", math.nan),
        ("m2", -0.5),
        ("m2", math.inf),
        ("m3", math.nan),
        ("m3", -math.inf),
        ("lam_schedule", 5.0),
    ],
)
def test_margin_spec_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises((ValueError, TypeError), match=rf"\b{field}\b"):
        MarginSpec(**{field: value})


@pytest.mark.parametrize(
    "field,value",
    [
        ("lam_base", -1.0),
        ("lam_base", math.nan),
        ("gamma", -0.1),
        ("gamma", math.inf),
        ("power", -1.0),
        ("lam_min", -5.0),
        ("lam_min", math.nan),
        ("lam_min", "5"),
    ],
)
def test_lambda_schedule_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises((ValueError, TypeError), match=rf"\b{field}\b"):
        LambdaSchedule(**{field: value})


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(embedding_dim=0), "embedding_dim"),
        (dict(embedding_dim=2.5), "embedding_dim"),
        (dict(num_classes=0), "num_classes"),
        (dict(num_classes=-3), "num_classes"),
        (dict(label_smoothing=1.5), "label_smoothing"),
        (dict(label_smoothing=-0.1), "label_smoothing"),
        (dict(label_smoothing=math.nan), "label_smoothing"),
        (dict(margin="arcface"), "margin"),
    ],
)
def test_margin_head_rejects_bad_arguments_naming_them(kwargs, field):
    arguments = dict(embedding_dim=8, num_classes=4, margin=MarginSpec.arcface())
    arguments.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=rf"\b{field}\b"):
        MarginHead(**arguments)


def test_wrong_embedding_shape_names_x():
    head = ArcFace(8, 4)
    for bad in (torch.randn(3, 7), torch.randn(8), torch.randn(2, 3, 8)):
        with pytest.raises(ValueError, match=r"\bx\b"):
            head.logits(bad)


def test_half_precision_embeddings(seed):
    """A bf16 embedding (autocast) goes through the head; logits come back in bf16."""
    head = ArcFace(EMBEDDING_DIM, NUM_CLASSES)
    x, labels = separable_data(10)
    logits = head(x.bfloat16(), labels)
    assert logits.dtype == torch.bfloat16
    loss = head.loss(x.bfloat16(), labels)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert head.weight.grad is not None and torch.all(torch.isfinite(head.weight.grad))
