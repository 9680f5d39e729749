"""The Python reference (``angular.ops.reference``) against docs/design.md, Math.

The yardstick here is an independent per-row formula written with the ``math`` module (no torch), so a
bug in the reference cannot hide behind the same bug in the expected values. Every test draws fresh
random inputs from a seed that is printed when it fails.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from angular.ops import reference

# (name, m1, m2, m3, lam): the presets (docs/design.md, Math), SphereFace at three points of its schedule.
PRESETS = [
    ("arcface", 1.0, 0.5, 0.0, 0.0),
    ("cosface", 1.0, 0.0, 0.35, 0.0),
    ("sphereface_lam0", 4.0, 0.0, 0.0, 0.0),
    ("sphereface_lam5", 4.0, 0.0, 0.0, 5.0),
    ("sphereface_lam1000", 4.0, 0.0, 0.0, 1000.0),
    ("combined", 1.0, 0.3, 0.2, 0.0),
]
PRESET_IDS = [preset[0] for preset in PRESETS]
REDUCTIONS = ("mean", "sum", "none")
LOW_PRECISION = (torch.float16, torch.bfloat16)


@pytest.fixture
def seed() -> int:
    """A fresh seed for torch's and Python's generators each run; failures print it."""
    value = torch.seed()
    random.seed(value)
    return value


def random_margin() -> tuple[float, float, float, float]:
    """Random ``(m1, m2, m3, lam)`` with m1 in (0, 5], m2 in [0, 2], m3 in [-0.5, 1], lam in [0, 1e3]."""
    m1 = 5.0 - random.uniform(0.0, 5.0 - 1e-3)
    return m1, random.uniform(0.0, 2.0), random.uniform(-0.5, 1.0), random.uniform(0.0, 1e3)


def margins_with_random(count: int = 4) -> list[tuple[str, float, float, float, float]]:
    return PRESETS + [("random", *random_margin()) for _ in range(count)]


def random_inputs(batch: int, classes: int, dtype=torch.float64):
    """Cosines in [-1, 1] with exact +-1 and near -1 targets (so ``t > pi``) and some negative labels."""
    cos = torch.empty(batch, classes, dtype=torch.float64).uniform_(-1.0, 1.0)
    labels = torch.randint(0, classes, (batch,))
    specials = [1.0, -1.0, -0.999, 0.9999999]
    for row in range(min(batch, len(specials))):
        cos[row, labels[row]] = specials[row]
    if batch > 2:
        # Negative labels go to rows after the planted ones when there are enough, so that the edge
        # targets stay targets: drawn among all rows, they hid both t > pi rows in 1 draw of 12.
        free = torch.arange(len(specials) if batch >= len(specials) + batch // 3 else 0, batch)
        chosen = free[torch.randperm(len(free))[: batch // 3]]
        labels[chosen] = torch.randint(-9, 0, (len(chosen),))
    return cos.to(dtype), labels


def expected_logits(cos, labels, s, m1, m2, m3, lam) -> list[list[float]]:
    """The margin logits of docs/design.md, Math, one row at a time, with the ``math`` module."""
    rows = []
    for cos_row, label in zip(cos.double().tolist(), labels.tolist()):
        z = [s * c for c in cos_row]
        if label >= 0:
            c = cos_row[label]
            theta = math.acos(min(1.0, max(-1.0, c)))
            t = m1 * theta + m2
            k = math.floor(t / math.pi)
            psi = (-1) ** k * math.cos(t) - 2 * k - m3
            z[label] = s * (lam * c + psi) / (1.0 + lam)
        rows.append(z)
    return rows


def expected_losses(logit_rows, labels, label_smoothing) -> list[float]:
    """Per-row cross-entropy with the smoothing mass spread over all C classes; 0 without a target."""
    losses = []
    for z, label in zip(logit_rows, labels.tolist()):
        if label < 0:
            losses.append(0.0)
            continue
        top = max(z)
        lse = top + math.log(sum(math.exp(v - top) for v in z))
        smooth = sum(lse - v for v in z) / len(z)
        losses.append((1.0 - label_smoothing) * (lse - z[label]) + label_smoothing * smooth)
    return losses


def reduce_expected(losses, labels, reduction):
    if reduction == "none":
        return torch.tensor(losses, dtype=torch.float64)
    total = math.fsum(losses)
    if reduction == "sum":
        return torch.tensor(total, dtype=torch.float64)
    return torch.tensor(total / max(1, int((labels >= 0).sum())), dtype=torch.float64)


def target_angle_with_k(m1, m2, cos_y) -> tuple[float, int]:
    t = m1 * math.acos(max(-1.0, min(1.0, cos_y))) + m2
    return t, math.floor(t / math.pi)


# --------------------------------------------------------------------------------------------------
# Values against the independent formula.


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (9, 1), (16, 10)])
def test_logits_and_losses_match_independent_formula(seed, shape):
    batch, classes = shape
    s = random.uniform(1.0, 100.0)
    cos, labels = random_inputs(batch, classes)
    for name, m1, m2, m3, lam in margins_with_random():
        margin = dict(s=s, m1=m1, m2=m2, m3=m3, lam=lam)
        context = f"seed={seed} margin={name} {margin}"
        want = expected_logits(cos, labels, **margin)
        got = reference.margin_logits(cos, labels, **margin)
        torch.testing.assert_close(
            got,
            torch.tensor(want, dtype=torch.float64),
            rtol=1e-10,
            atol=1e-10 * s,
            msg=lambda text, context=context: f"{text}\n{context}",
        )
        for smoothing in (0.0, random.uniform(0.01, 1.0)):
            losses = expected_losses(want, labels, smoothing)
            for reduction in REDUCTIONS:
                got_loss = reference.margin_cross_entropy(
                    cos, labels, **margin, label_smoothing=smoothing, reduction=reduction
                )
                torch.testing.assert_close(
                    got_loss,
                    reduce_expected(losses, labels, reduction),
                    rtol=1e-10,
                    atol=1e-10 * s,
                    msg=lambda text, c=context, e=smoothing, r=reduction: (
                        f"{text}\n{c} label_smoothing={e} reduction={r}"
                    ),
                )


def test_inputs_cover_the_extended_branch(seed):
    """The inputs above reach ``t > pi`` (k >= 1) for ArcFace: the case the extension exists for."""
    cos, labels = random_inputs(16, 10)
    ks = [
        target_angle_with_k(1.0, 0.5, cos[row, label].item())[1]
        for row, label in enumerate(labels.tolist())
        if label >= 0
    ]
    assert max(ks) >= 1, f"seed={seed}"


def test_rows_without_target_get_no_margin(seed):
    cos, labels = random_inputs(12, 6)
    labels[::2] = -1
    labels[1::4] = -1000
    s, (m1, m2, m3, lam) = 30.0, random_margin()
    logits = reference.margin_logits(cos, labels, s=s, m1=m1, m2=m2, m3=m3, lam=lam)
    no_target = labels < 0
    torch.testing.assert_close(logits[no_target], s * cos[no_target], rtol=0, atol=0)
    losses = reference.margin_cross_entropy(cos, labels, s=s, m1=m1, reduction="none")
    assert torch.all(losses[no_target] == 0), f"seed={seed}"
    assert torch.all(losses[~no_target] > 0), f"seed={seed}"


@pytest.mark.parametrize("name,m1,m2,m3,lam", PRESETS, ids=PRESET_IDS)
def test_loss_is_cross_entropy_of_reference_logits(seed, name, m1, m2, m3, lam):
    cos, labels = random_inputs(24, 11)
    margin = dict(s=64.0, m1=m1, m2=m2, m3=m3, lam=lam)
    logits = reference.margin_logits(cos, labels, **margin)
    has_target = labels >= 0
    for smoothing in (0.0, 0.1, random.uniform(0.0, 1.0)):
        for reduction in REDUCTIONS:
            got = reference.margin_cross_entropy(
                cos, labels, **margin, label_smoothing=smoothing, reduction=reduction
            )
            want = F.cross_entropy(
                logits[has_target],
                labels[has_target],
                label_smoothing=smoothing,
                reduction=reduction,
            )
            if reduction == "none":
                assert torch.all(got[~has_target] == 0)
                got = got[has_target]
            torch.testing.assert_close(
                got, want, msg=lambda t, e=smoothing, r=reduction: f"{t}\nseed={seed} {e} {r}"
            )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_mean_over_rows_without_any_target_is_zero(seed, dtype):
    cos, _ = random_inputs(5, 4, dtype)
    labels = -torch.randint(1, 100, (5,))
    cos.requires_grad_(True)
    loss = reference.margin_cross_entropy(cos, labels, s=64.0, m2=0.5, label_smoothing=0.1)
    assert loss.item() == 0.0, f"seed={seed}"
    loss.backward()
    assert torch.all(cos.grad == 0), f"seed={seed}"


# --------------------------------------------------------------------------------------------------
# Gradients.


def smooth_inputs(batch, classes, m1, m2):
    """fp64 cosines with |cos| <= 0.999 whose targets keep ``t / pi`` away from an integer."""
    cos = torch.empty(batch, classes, dtype=torch.float64).uniform_(-0.999, 0.999)
    labels = torch.randint(0, classes, (batch,))
    labels[0] = -1
    for row, label in enumerate(labels.tolist()):
        if label < 0:
            continue
        while True:
            t, k = target_angle_with_k(m1, m2, cos[row, label].item())
            if 0.02 < t / math.pi - k < 0.98:
                break
            cos[row, label] = random.uniform(-0.999, 0.999)
    return cos.requires_grad_(True), labels


@pytest.mark.parametrize("index", range(len(PRESETS) + 2))
def test_gradcheck_fp64(seed, index):
    name, m1, m2, m3, lam = (PRESETS + [("random", *random_margin())] * 2)[index]
    cos, labels = smooth_inputs(5, 4, m1, m2)
    margin = dict(s=random.uniform(1.0, 64.0), m1=m1, m2=m2, m3=m3, lam=lam)
    context = f"seed={seed} {name} {margin}"
    assert torch.autograd.gradcheck(
        lambda c: reference.margin_logits(c, labels, **margin), (cos,)
    ), context
    for reduction in REDUCTIONS:
        for smoothing in (0.0, 0.2):
            assert torch.autograd.gradcheck(
                lambda c, r=reduction, e=smoothing: reference.margin_cross_entropy(
                    c, labels, **margin, label_smoothing=e, reduction=r
                ),
                (cos,),
            ), f"{context} reduction={reduction} label_smoothing={smoothing}"


def test_exact_gradient_matches_analytic_derivative(seed):
    """``d f_y / d cos = (lam + (-1)^k m1 sin(t) / sin(theta)) / (1 + lam)`` where |cos| <= 1 - 1e-4."""
    limit = 1.0 - 1e-4
    cos = torch.cat(
        [
            torch.linspace(-limit, limit, 2001, dtype=torch.float64),
            torch.empty(500, dtype=torch.float64).uniform_(-limit, limit),
            torch.tensor([-limit, limit], dtype=torch.float64),
        ]
    )
    for name, m1, m2, m3, lam in margins_with_random(6):
        c = cos.clone().requires_grad_(True)
        reference.target_logit(c, m1=m1, m2=m2, m3=m3, lam=lam).sum().backward()
        want = []
        for value in cos.tolist():
            theta = math.acos(value)
            t = m1 * theta + m2
            k = math.floor(t / math.pi)
            dpsi = (-1) ** k * m1 * math.sin(t) / math.sin(theta)
            want.append((lam + dpsi) / (1.0 + lam))
        torch.testing.assert_close(
            c.grad,
            torch.tensor(want, dtype=torch.float64),
            rtol=1e-8,
            atol=1e-10,
            msg=lambda text, n=name, p=(m1, m2, m3, lam): f"{text}\nseed={seed} {n} {p}",
        )


def guard_bound(m1, lam) -> float:
    """Largest |d f_y / d cos| the guard allows: the exact derivative at theta = THETA_MIN at most."""
    return (lam + m1 / math.sin(reference.THETA_MIN)) / (1.0 + lam) * (1.0 + 1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name,m1,m2,m3,lam", PRESETS, ids=PRESET_IDS)
def test_gradient_finite_at_unit_cosine(seed, dtype, name, m1, m2, m3, lam):
    edges = [1.0, -1.0]
    if dtype == torch.float32:
        # Values a normalised matmul produces by rounding: just outside [-1, 1].
        edges += [1.0 + 1e-7, -1.0 - 1e-7, math.nextafter(1.0, 2.0), math.nextafter(-1.0, -2.0)]
    cos = torch.empty(len(edges), 5).uniform_(-1.0, 1.0)
    labels = torch.randint(0, 5, (len(edges),))
    cos[torch.arange(len(edges)), labels] = torch.tensor(edges)
    cos = cos.to(dtype)
    assert torch.all(cos.float().abs().amax(dim=1) >= 1.0)
    margin = dict(s=64.0, m1=m1, m2=m2, m3=m3, lam=lam)

    # d f_y / d cos_y alone, bounded by the guard.
    cos_y = cos.gather(1, labels[:, None]).float().requires_grad_(True)
    reference.target_logit(cos_y, m1=m1, m2=m2, m3=m3, lam=lam).sum().backward()
    assert torch.all(torch.isfinite(cos_y.grad)), f"seed={seed} {cos_y.grad}"
    assert cos_y.grad.abs().max().item() <= guard_bound(m1, lam), f"seed={seed} {cos_y.grad}"

    weights = torch.randn(cos.shape)
    for loss_of in (
        lambda c: (reference.margin_logits(c, labels, **margin).float() * weights).sum(),
        lambda c: reference.margin_cross_entropy(c, labels, **margin, label_smoothing=0.1),
    ):
        c = cos.clone().requires_grad_(True)
        loss = loss_of(c)
        loss.backward()
        assert torch.isfinite(loss), f"seed={seed}"
        assert c.grad.dtype == dtype
        assert torch.all(torch.isfinite(c.grad)), f"seed={seed} {c.grad}"


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_straight_through_gradient_is_softmax_minus_target(seed, reduction):
    batch, classes = 10, 7
    cos, labels = random_inputs(batch, classes)
    labels[1] = -3
    s, smoothing = random.uniform(1.0, 64.0), random.choice([0.0, random.uniform(0.0, 1.0)])
    m1, m2, m3, lam = random_margin()
    margin = dict(s=s, m1=m1, m2=m2, m3=m3, lam=lam, straight_through=True)
    c = cos.clone().requires_grad_(True)
    loss = reference.margin_cross_entropy(
        c, labels, **margin, label_smoothing=smoothing, reduction=reduction
    )
    upstream = torch.rand(batch, dtype=torch.float64) + 0.5 if reduction == "none" else None
    loss.backward(upstream)

    has_target = labels >= 0
    logits = reference.margin_logits(cos, labels, **margin)
    onehot = F.one_hot(labels.clamp(min=0), classes).double()
    target = (1.0 - smoothing) * onehot + smoothing / classes
    want = s * (logits.softmax(dim=1) - target) * has_target[:, None]
    if reduction == "mean":
        want = want / has_target.sum()
    elif reduction == "none":
        want = want * upstream[:, None]
    torch.testing.assert_close(
        c.grad, want, msg=lambda text: f"{text}\nseed={seed} eps={smoothing} {margin}"
    )


# --------------------------------------------------------------------------------------------------
# Shape of the margin function and precision.


def test_psi_is_continuous_and_decreasing_in_theta(seed):
    steps = 200_000
    theta = torch.linspace(0.0, math.pi, steps + 1, dtype=torch.float64)
    step = math.pi / steps
    for _ in range(8):
        m1, m2, m3, lam = random_margin()
        context = f"seed={seed} m1={m1} m2={m2} m3={m3} lam={lam}"
        psi = reference.psi_of_theta(theta, m1, m2, m3)
        rises = torch.diff(psi)
        # Decreasing everywhere; a jump would exceed the Lipschitz bound |d psi / d theta| <= m1.
        assert rises.max().item() <= 1e-12, context
        assert rises.abs().max().item() <= m1 * step * (1.0 + 1e-6), context
        assert psi[0].item() == pytest.approx(math.cos(m2) - m3, abs=1e-12), context

        # The same through the op's target logit as a function of cos (increasing in cos).
        f_y = reference.target_logit(torch.cos(theta), m1=m1, m2=m2, m3=m3, lam=lam)
        assert torch.diff(f_y).max().item() <= 1e-12, context


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_output_dtypes(dtype):
    cos, labels = random_inputs(6, 5, dtype)
    loss_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert reference.margin_logits(cos, labels, s=64.0, m2=0.5).dtype == dtype
    for reduction in REDUCTIONS:
        loss = reference.margin_cross_entropy(cos, labels, s=64.0, m2=0.5, reduction=reduction)
        assert loss.dtype == loss_dtype


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_reduced_precision_matches_fp64(seed, dtype):
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    cos, labels = random_inputs(32, 50, dtype)
    exact = cos.double()
    for name, m1, m2, m3, lam in margins_with_random(2):
        margin = dict(s=64.0, m1=m1, m2=m2, m3=m3, lam=lam)
        context = f"seed={seed} {name} {margin}"
        # |f_y| <= 2k + 1 + |m3|: the scale of a logit, for an absolute floor near zero.
        scale = 64.0 * (3.0 + 2.0 * m1 + m2 + abs(m3))
        torch.testing.assert_close(
            reference.margin_logits(cos, labels, **margin).double(),
            reference.margin_logits(exact, labels, **margin),
            rtol=tolerance,
            atol=tolerance * scale * 1e-1,
            msg=lambda text, c=context: f"{text}\n{c}",
        )
        for reduction in REDUCTIONS:
            torch.testing.assert_close(
                reference.margin_cross_entropy(
                    cos, labels, **margin, label_smoothing=0.1, reduction=reduction
                ).double(),
                reference.margin_cross_entropy(
                    exact, labels, **margin, label_smoothing=0.1, reduction=reduction
                ),
                rtol=tolerance,
                atol=tolerance * 1e-2,
                msg=lambda text, c=context, r=reduction: f"{text}\n{c} {r}",
            )
