"""Adaptive-margin heads (``angular.nn.adaptive``): each head's loss equals an independent eager
transcription of its paper's reference forward (fp64, random inputs), gradients reach the norm where
the paper lets them (MagFace) and not where it detaches it (AdaFace), state buffers follow their EMA,
checkpoints round-trip, ElasticFace repeats under its seed, sub-center ArcFace takes the max (or the
dominant sub-centre), and bad settings are refused with the argument's name."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from angular.nn.adaptive import (
    ADAPTIVE_HEADS,
    AdaFace,
    CurricularFace,
    ElasticArcFace,
    ElasticCosFace,
    MagFace,
    SubCenterArcFace,
    build_adaptive_head,
    magface_min_lambda_g,
)

DIM, CLASSES, BATCH = 12, 7, 10


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(torch.seed() % 2**31)


def _inputs(generator, head, norms=(5.0, 30.0)):
    """fp64 embeddings with norms spread over ``norms``, labels covering every class."""
    head.double()
    direction = F.normalize(torch.randn(BATCH, DIM, generator=generator, dtype=torch.float64))
    low, high = norms
    scale = low + (high - low) * torch.rand(BATCH, 1, generator=generator, dtype=torch.float64)
    x = (direction * scale).requires_grad_(True)
    labels = torch.randint(0, CLASSES, (BATCH,), generator=generator)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator, dtype=torch.float64))
    return x, labels


def _cos(x, weight):
    return F.linear(F.normalize(x, dim=1), F.normalize(weight, dim=1))


def _one_hot(labels, classes=CLASSES):
    return F.one_hot(labels, classes).to(torch.float64)


def _close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-10)


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


# --------------------------------------------------------------------------------------------------
# Each head against its paper's forward, written the way its reference code writes it.


def test_adaface_matches_its_reference_forward_and_detaches_the_norm(generator):
    head = AdaFace(DIM, CLASSES, s=64.0, m=0.4, h=0.333, t_alpha=0.01).train()
    x, labels = _inputs(generator, head)
    # EMAs as after some training, so that ms spans [-1, 1] and its clip acts (norms in 5..30).
    head.batch_mean.fill_(17.0)
    head.batch_std.fill_(4.0)
    mean0, std0 = 17.0, 4.0

    # AdaFace's head.py: EMA first, then the margin scaler, then the angular and additive parts.
    eps = 1e-3
    weight = head.weight.detach().clone().requires_grad_(True)
    cosine = _cos(x, weight).clamp(-1 + eps, 1 - eps)
    safe_norms = x.norm(dim=1, keepdim=True).clamp(0.001, 100).detach()
    batch_mean = safe_norms.mean() * 0.01 + (1 - 0.01) * mean0
    batch_std = safe_norms.std() * 0.01 + (1 - 0.01) * std0
    ms = ((safe_norms - batch_mean) / (batch_std + eps) * 0.333).clip(-1, 1)
    m_arc = _one_hot(labels) * (0.4 * ms * -1)
    theta_m = torch.clip(cosine.acos() + m_arc, min=eps, max=math.pi - eps)
    logits = (theta_m.cos() - _one_hot(labels) * (0.4 + 0.4 * ms)) * 64.0
    expected = F.cross_entropy(logits, labels)
    assert (ms > 0).any() and (ms < 0).any()  # negative and positive angular margins

    loss = head.loss(x, labels)
    _close(loss, expected)
    _close(head.batch_mean, batch_mean.to(head.batch_mean.dtype))
    _close(head.batch_std, batch_std.to(head.batch_std.dtype))
    got_x, got_w = _grads(loss, x, head.weight)
    want_x, want_w = _grads(expected, x, weight)
    _close(got_x, want_x)
    _close(got_w, want_w)
    # The norm is detached: the loss sees x only through its direction, so d loss / d x is
    # orthogonal to x.
    radial = (got_x * F.normalize(x.detach(), dim=1)).sum(dim=1)
    assert radial.abs().max() < 1e-10 * got_x.abs().max()


def test_adaface_evaluation_leaves_the_ema_alone(generator):
    head = AdaFace(DIM, CLASSES)
    x, labels = _inputs(generator, head)
    head.eval()
    head.loss(x, labels)
    head(x, labels)
    assert float(head.batch_mean) == 20.0 and float(head.batch_std) == 100.0
    head.train()
    for _ in range(3):
        head.loss(x, labels)
    assert float(head.batch_mean) != 20.0 and float(head.batch_std) != 100.0


@pytest.mark.parametrize("cls", [ElasticArcFace, ElasticCosFace])
@pytest.mark.parametrize("plus", [False, True])
def test_elasticface_matches_its_reference_forward(generator, cls, plus):
    seed = int(torch.randint(0, 2**31, (), generator=generator))
    head = cls(DIM, CLASSES, s=64.0, plus=plus, seed=seed).train()
    x, labels = _inputs(generator, head)
    m, std = (0.5, 0.05) if cls is ElasticArcFace else (0.35, 0.05)

    # ElasticFace's losses.py (all labels valid), on a generator seeded alike.
    weight = head.weight.detach().clone().requires_grad_(True)
    cos_theta = _cos(x, weight).clamp(-1, 1)
    draws = torch.Generator().manual_seed(seed)
    margin = torch.normal(m, std, (BATCH,), generator=draws).to(torch.float64)[:, None]
    if plus:
        distmat = cos_theta[torch.arange(BATCH), labels].detach()
        _, order = torch.sort(distmat, dim=0, descending=True)
        margin, _ = torch.sort(margin, dim=0)
        margin = margin[order]
    m_hot = torch.zeros(BATCH, CLASSES, dtype=torch.float64).scatter(1, labels[:, None], margin)
    if cls is ElasticArcFace:
        logits = (cos_theta.acos() + m_hot).cos() * 64.0
    else:
        logits = (cos_theta - m_hot) * 64.0
    expected = F.cross_entropy(logits, labels)

    loss = head.loss(x, labels)
    _close(loss, expected)
    got = _grads(loss, x, head.weight)
    want = _grads(expected, x, weight)
    for a, b in zip(got, want, strict=True):
        _close(a, b)


def test_elasticface_is_repeatable_under_its_seed_and_resumes_from_a_checkpoint(generator):
    x, labels = _inputs(generator, ElasticArcFace(DIM, CLASSES, seed=3))
    first, second = ElasticArcFace(DIM, CLASSES, seed=3), ElasticArcFace(DIM, CLASSES, seed=3)
    for head in (first, second):
        head.double().train()
        head.load_state_dict(first.state_dict())
    assert all(torch.equal(first.loss(x, labels), second.loss(x, labels)) for _ in range(3))
    other = ElasticArcFace(DIM, CLASSES, seed=4).double().train()
    other.weight.data.copy_(first.weight.data)
    assert not torch.equal(other.loss(x, labels), first.loss(x, labels))

    # The generator's state is in the state dict: a head restored from it draws what the
    # original draws next.
    saved = {k: v.clone() for k, v in first.state_dict().items()}
    resumed = ElasticArcFace(DIM, CLASSES, seed=99).double().train()
    resumed.load_state_dict(saved)
    assert torch.equal(resumed.loss(x, labels), first.loss(x, labels))


def test_elasticface_evaluates_at_its_mean_margin(generator):
    head = ElasticCosFace(DIM, CLASSES, seed=0)
    x, labels = _inputs(generator, head)
    state = head.generator.get_state()
    head.eval()
    expected = F.cross_entropy(64.0 * (_cos(x, head.weight) - 0.35 * _one_hot(labels)), labels)
    _close(head.loss(x, labels), expected)
    assert torch.equal(head.generator.get_state(), state)  # no draw outside training


def test_magface_matches_its_reference_forward_and_the_norm_gets_gradient(generator):
    head = MagFace(DIM, CLASSES, s=64.0).train()
    x, labels = _inputs(generator, head, norms=(4.0, 130.0))  # some below l_a, some above u_a

    # MagFace's MagLinear + MagLoss (easy_margin off), loss_id + lambda_g * loss_g.
    l_a, u_a, l_m, u_m, s = 10.0, 110.0, 0.45, 0.8, 64.0
    weight = head.weight.detach().clone().requires_grad_(True)
    x_norm = torch.norm(x, dim=1, keepdim=True).clamp(l_a, u_a)
    ada_margin = (u_m - l_m) / (u_a - l_a) * (x_norm - l_a) + l_m
    cos_m, sin_m = torch.cos(ada_margin), torch.sin(ada_margin)
    cos_theta = _cos(x, weight).clamp(-1, 1)
    sin_theta = torch.sqrt(1.0 - torch.pow(cos_theta, 2))
    cos_theta_m = cos_theta * cos_m - sin_theta * sin_m
    mm = torch.sin(math.pi - ada_margin) * ada_margin
    threshold = torch.cos(math.pi - ada_margin)
    cos_theta_m = torch.where(cos_theta > threshold, cos_theta_m, cos_theta - mm)
    one_hot = _one_hot(labels)
    output = s * (one_hot * cos_theta_m + (1.0 - one_hot) * cos_theta)
    loss_g = torch.mean(1 / (u_a**2) * x_norm + 1 / x_norm)
    expected = F.cross_entropy(output, labels) + 35.0 * loss_g

    loss = head.loss(x, labels)
    _close(loss, expected)
    got_x, got_w = _grads(loss, x, head.weight)
    want_x, want_w = _grads(expected, x, weight)
    _close(got_x, want_x)
    _close(got_w, want_w)
    # The gradient reaches the norm (through the margin and g) where the norm is not clamped...
    radial = (got_x * F.normalize(x.detach(), dim=1)).sum(dim=1)
    norms = x.detach().norm(dim=1)
    inside = (norms > l_a) & (norms < u_a)
    assert inside.any() and (radial[inside].abs() > 1e-8).all()
    # ... and not where it is (clamp), as in the reference.
    assert (radial[~inside].abs() < 1e-9 * got_x.abs().max()).all()

    # reduction="none": per-row CE plus lambda_g g(a) of the row.
    rows = head.loss(x, labels, reduction="none")
    ce_rows = F.cross_entropy(output, labels, reduction="none")
    _close(rows, ce_rows + 35.0 * (1 / u_a**2 * x_norm + 1 / x_norm).squeeze(1))


def test_magface_refuses_lambda_g_below_its_bound():
    bound = magface_min_lambda_g(64.0, 10.0, 110.0, 0.45, 0.8)
    assert bound == pytest.approx(64 * 0.0035 * 110**2 * 10**2 / (110**2 - 10**2))
    assert 22.5 < bound < 22.7  # below the trainer's default 35
    MagFace(DIM, CLASSES, lambda_g=bound)
    with pytest.raises(ValueError, match=r"lambda_g must be >= 22\.59.*got 20\.0"):
        MagFace(DIM, CLASSES, lambda_g=20.0)
    # The bound scales with s.
    MagFace(DIM, CLASSES, s=32.0, lambda_g=20.0)


def test_curricularface_matches_its_reference_forward_and_updates_t(generator):
    head = CurricularFace(DIM, CLASSES, s=64.0, m=0.5).train()
    # Below theta = pi - m the reference clamps (cos - m sin m) where the op keeps its monotonic
    # extension (docs/design.md, Heads): they differ there by design, so draw inputs that stay
    # above it (a random draw fell below once in CI: loss 50.28 against the reference's 51.30).
    while True:
        x, labels = _inputs(generator, head)
        target = _cos(x, head.weight)[torch.arange(BATCH), labels]
        if target.min() > math.cos(math.pi - 0.5) + 1e-3:
            break
    t = torch.zeros(1, dtype=torch.float64)
    weight = head.weight.detach().clone().requires_grad_(True)
    for _ in range(2):  # the second step starts from the first step's t
        # CurricularFace's head/metrics.py.
        m, s = 0.5, 64.0
        cos_theta = _cos(x, weight).clamp(-1, 1)
        target_logit = cos_theta[torch.arange(BATCH), labels].view(-1, 1)
        sin_theta = torch.sqrt(1.0 - torch.pow(target_logit, 2))
        cos_theta_m = target_logit * math.cos(m) - sin_theta * math.sin(m)
        mask = cos_theta > cos_theta_m
        final_target_logit = torch.where(
            target_logit > math.cos(math.pi - m),
            cos_theta_m,
            target_logit - math.sin(math.pi - m) * m,
        )
        with torch.no_grad():
            t = target_logit.mean() * 0.01 + (1 - 0.01) * t
        hard = torch.where(mask, cos_theta * (t + cos_theta), cos_theta)
        output = hard.scatter(1, labels.view(-1, 1), final_target_logit) * s
        expected = F.cross_entropy(output, labels)
        assert mask.sum() > BATCH  # the test sees hard negatives

        loss = head.loss(x, labels)
        _close(loss, expected)
        _close(head.t, t.squeeze())
        got = _grads(loss, x, head.weight)
        want = _grads(expected, x, weight)
        for a, b in zip(got, want, strict=True):
            _close(a, b)


def test_subcenter_arcface_takes_the_max_over_class_major_subcentres(generator):
    head = SubCenterArcFace(DIM, CLASSES, s=64.0, m=0.5, k=3).train()
    assert head.weight.shape == (CLASSES * 3, DIM)
    x, labels = _inputs(generator, head)
    weight = head.weight.detach().clone().requires_grad_(True)
    # insightface: cosines with C*K centres, reshaped (B, C, K) class-major, max over K; ArcFace.
    cosine = _cos(x, weight).view(BATCH, CLASSES, 3).max(dim=2).values
    target = cosine.gather(1, labels[:, None]).acos() + 0.5
    logits = cosine.scatter(1, labels[:, None], target.cos()) * 64.0
    expected = F.cross_entropy(logits, labels)
    loss = head.loss(x, labels)
    _close(loss, expected)
    got = _grads(loss, x, head.weight)
    want = _grads(expected, x, weight)
    for a, b in zip(got, want, strict=True):
        _close(a, b)
    _close(head.logits(x), 64.0 * _cos(x, weight).view(BATCH, CLASSES, 3).amax(2))


def test_subcenter_arcface_keeps_the_dominant_subcentre(generator):
    head = SubCenterArcFace(DIM, 2, k=3).double()
    centres = F.normalize(torch.randn(6, DIM, generator=generator, dtype=torch.float64), dim=1)
    head.weight.data.copy_(centres)
    # Class 0: three samples at sub-centre 2, one at 0; class 1: two at sub-centre 1 (rows 3, 4).
    embeddings = centres[[2, 2, 2, 0, 4, 4]] * 7.0
    labels = torch.tensor([0, 0, 0, 0, 1, 1])
    assert not head.uses_dominant
    assert head.keep_dominant(embeddings, labels).tolist() == [2, 1]
    assert head.uses_dominant
    expected = head.subcenter_cosine(embeddings)[:, [0, 1], [2, 1]]
    _close(head.cosine(embeddings), expected)
    # The choice is a buffer: it travels in the state dict (the model file).
    clone = SubCenterArcFace(DIM, 2, k=3).double()
    clone.load_state_dict(head.state_dict())
    assert clone.uses_dominant and clone.dominant.tolist() == [2, 1]
    with pytest.raises(ValueError, match="labels must be in"):
        head.keep_dominant(embeddings, torch.tensor([0, 0, 0, 0, 1, 2]))


HEAD_TYPES = sorted(ADAPTIVE_HEADS)

# --------------------------------------------------------------------------------------------------
# Every head: checkpoint round trip, float32 training step, refusals.


@pytest.mark.parametrize("type_name", HEAD_TYPES)
def test_every_head_round_trips_through_its_state_dict(generator, type_name):
    head = build_adaptive_head(type_name, DIM, CLASSES, s=32.0, options={}).train()
    x, labels = _inputs(generator, head, norms=(5.0, 60.0))
    for _ in range(2):
        head.loss(x, labels).backward()
    rebuilt = build_adaptive_head(type_name, DIM, CLASSES, s=32.0, options=head.options).double()
    rebuilt.load_state_dict(head.state_dict())
    for name, tensor in head.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[name], tensor), name
    head.train(), rebuilt.train()
    assert torch.equal(head.loss(x, labels), rebuilt.loss(x, labels))
    assert torch.equal(head.logits(x), rebuilt.logits(x))


@pytest.mark.parametrize("type_name", HEAD_TYPES)
def test_every_head_trains_in_float32_with_finite_gradients(generator, type_name):
    head = build_adaptive_head(type_name, DIM, CLASSES, s=32.0, options={}).train()
    x, labels = _inputs(generator, head, norms=(5.0, 60.0))
    head.float()
    x = x.detach().float().requires_grad_(True)
    loss = head.loss(x, labels)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(head.weight.grad).all()
    rows = head.loss(x, labels, reduction="none")
    assert rows.shape == (BATCH,)
    assert float(head.step) == 2


def test_heads_refuse_bad_settings():
    with pytest.raises(ValueError, match="fused_linear must be false or null for AdaFace"):
        AdaFace(DIM, CLASSES, fused_linear=True)
    with pytest.raises(ValueError, match="t_alpha must be in"):
        AdaFace(DIM, CLASSES, t_alpha=1.5)
    with pytest.raises(ValueError, match="std must be >= 0"):
        ElasticArcFace(DIM, CLASSES, std=-0.1)
    with pytest.raises(TypeError, match="plus must be true or false"):
        ElasticCosFace(DIM, CLASSES, plus="yes")
    with pytest.raises(ValueError, match="u_a must be > l_a"):
        MagFace(DIM, CLASSES, l_a=10.0, u_a=5.0)
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        SubCenterArcFace(DIM, CLASSES, k=0)
    with pytest.raises(ValueError, match="type must be one of"):
        build_adaptive_head("arcface", DIM, CLASSES, s=64.0, options={})
    with pytest.raises(ValueError, match="reduction must be one of"):
        head = CurricularFace(DIM, CLASSES)
        head.loss(torch.randn(2, DIM), torch.tensor([0, 1]), reduction="max")
