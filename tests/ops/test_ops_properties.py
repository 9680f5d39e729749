"""Property test of ``angular.ops``: over random shapes, dtypes, margins, label patterns, strides and
values (exact +-1 and rounding just outside [-1, 1]), every backend agrees with the fp64 reference and
its outputs and gradients are finite. Also the documented behaviour for NaN / inf inside ``cos``.

Hypothesis draws the parameters and one integer seed from which the tensors are generated; a failure
prints both (the falsifying example) plus a reproduction blob.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from angular import ops
from angular.ops import reference

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# docs/design.md, Testing: tolerances (relative): (values, gradients).
TOLERANCE = {
    torch.float64: (1e-9, 1e-8),
    torch.float32: (1e-5, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (1e-2, 1e-2),
}
MAX_ELEMENTS = 1 << 17
# CUDA cases are marked (docs/design.md, Testing) and skip without a GPU.
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
        ],
    ),
]
# Cosines a normalised matmul produces: exact +-1 and one float32 ulp beyond (1 + 1e-7 rounds there).
EDGE_VALUES = (1.0, -1.0, 1.0 + 1e-7, -1.0 - 1e-7, math.nextafter(1.0, 0.0), -0.999)
LABEL_PATTERNS = ("random", "some_negative", "all_negative", "duplicates", "all_same")
LAYOUTS = ("contiguous", "transposed", "column_slice", "row_slice")


def make_labels(pattern: str, batch: int, classes: int, generator) -> torch.Tensor:
    labels = torch.randint(0, classes, (batch,), generator=generator)
    if pattern == "some_negative":
        labels[torch.rand(batch, generator=generator) < 0.3] = -1
        labels[0] = -int(torch.randint(1, 1000, (1,), generator=generator))
    elif pattern == "all_negative":
        labels = -torch.randint(1, 5, (batch,), generator=generator)
    elif pattern == "duplicates":
        few = torch.randint(0, classes, (2,), generator=generator)
        labels = few[torch.randint(0, 2, (batch,), generator=generator)]
    elif pattern == "all_same":
        labels = labels[:1].expand(batch).clone()
    return labels


def make_cos(batch, classes, dtype, layout, labels, generator) -> torch.Tensor:
    """Uniform cosines with edge values at some targets and elsewhere, in the requested layout."""
    values = torch.rand(batch, classes, generator=generator, dtype=torch.float64) * 2.0 - 1.0
    edges = torch.tensor(EDGE_VALUES, dtype=torch.float64)
    pick = torch.randint(0, len(EDGE_VALUES), (batch, classes), generator=generator)
    sprinkle = torch.rand(batch, classes, generator=generator) < 0.05
    values = torch.where(sprinkle, edges[pick], values)
    rows = torch.arange(batch)[torch.rand(batch, generator=generator) < 0.5]
    targets = labels.clamp(min=0)[rows]
    values[rows, targets] = edges[
        torch.randint(0, len(EDGE_VALUES), (len(rows),), generator=generator)
    ]
    values = values.to(dtype)
    if layout == "transposed":
        return values.t().contiguous().t()
    if layout == "column_slice":
        wide = torch.zeros(batch, 2 * classes, dtype=dtype)
        wide[:, 1::2] = values
        return wide[:, 1::2]
    if layout == "row_slice":
        tall = torch.zeros(2 * batch, classes, dtype=dtype)
        tall[::2] = values
        return tall[::2]
    return values


@st.composite
def op_cases(draw):
    batch = draw(st.integers(1, 2048))
    classes = draw(st.integers(1, max(1, min(4096, MAX_ELEMENTS // batch))))
    margin = dict(
        s=draw(st.floats(1.0, 128.0)),
        m1=draw(st.floats(1e-3, 5.0)),
        m2=draw(st.floats(0.0, 2.0)),
        m3=draw(st.floats(-0.5, 1.0)),
        lam=draw(st.one_of(st.sampled_from([0.0, 5.0, 1000.0]), st.floats(0.0, 1e3))),
        straight_through=draw(st.booleans()),
    )
    return dict(
        batch=batch,
        classes=classes,
        dtype=draw(st.sampled_from(DTYPES)),
        layout=draw(st.sampled_from(LAYOUTS)),
        labels=draw(st.sampled_from(LABEL_PATTERNS)),
        strided_labels=draw(st.booleans()),
        margin=margin,
        label_smoothing=draw(st.one_of(st.just(0.0), st.just(0.1), st.floats(0.0, 1.0))),
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        seed=draw(st.integers(0, 2**63 - 1)),
    )


def assert_close_scaled(got, want, rtol, what, scale=0.0):
    """Relative tolerance with an absolute floor at ``rtol`` times the largest reference magnitude
    (or ``scale``, the size of the operands, when that is larger: a loss of 0 is a difference of
    logits of size ``s``, and rounds like them)."""
    floor = rtol * max(want.abs().max().item(), scale, 1e-12)
    torch.testing.assert_close(
        got.double().cpu(), want.double().cpu(), rtol=rtol, atol=floor, msg=lambda t: f"{what}: {t}"
    )


def target_slope(cos, labels, margin) -> float:
    """The largest |d f_y / d cos_y| over the targets (1 for the other columns), in fp64."""
    has_target = labels >= 0
    cos_y = cos.detach()[has_target].gather(1, labels[has_target, None]).double()
    cos_y.requires_grad_(True)
    options = {k: margin[k] for k in ("m1", "m2", "m3", "lam", "straight_through")}
    reference.target_logit(cos_y, **options).sum().backward()
    return max(1.0, cos_y.grad.abs().max().item()) if cos_y.numel() else 1.0


def build_inputs(case):
    generator = torch.Generator().manual_seed(case["seed"])
    batch, classes = case["batch"], case["classes"]
    labels = make_labels(case["labels"], batch, classes, generator)
    cos = make_cos(batch, classes, case["dtype"], case["layout"], labels, generator)
    if case["strided_labels"]:
        spread = torch.empty(2 * batch, dtype=torch.int64).fill_(-7)
        spread[::2] = labels
        labels = spread[::2]
    return cos.to(case["device"]), labels.to(case["device"])


@settings(
    max_examples=60,
    deadline=None,
    derandomize=False,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(case=op_cases())
@pytest.mark.parametrize("device", DEVICES)
def test_every_backend_matches_fp64_reference(device, case):
    cos, labels = build_inputs({**case, "device": device})
    margin = case["margin"]
    loss_options = dict(label_smoothing=case["label_smoothing"], reduction=case["reduction"])
    value_tol, grad_tol = TOLERANCE[case["dtype"]]
    exact = cos.detach().double().requires_grad_(True)
    want_logits = reference.margin_logits(exact, labels, **margin)
    want_loss = reference.margin_cross_entropy(exact, labels, **margin, **loss_options)
    upstream = torch.rand(want_loss.shape, dtype=torch.float64, device=cos.device) + 0.5
    want_loss.backward(upstream)
    # A target logit is s times a difference of terms of size 1 and m3 (cos(t) - m3 can cancel).
    value_scale = margin["s"] * (1.0 + abs(margin["m3"]))
    # A sum adds up one rounding of that size per row.
    loss_scale = value_scale * (int((labels >= 0).sum()) if case["reduction"] == "sum" else 1)
    # The size a gradient entry can have, upstream * s * (softmax - target) * d f_y / d cos_y: the
    # rounding of softmax (about eps * |logit|) scales with it, and makes an exact 0 (C = 1) a
    # multiple of it.
    rows = max(1, int((labels >= 0).sum())) if case["reduction"] == "mean" else 1
    grad_scale = margin["s"] * upstream.max().item() / rows * target_slope(exact, labels, margin)

    implementations = {f"ops[{ops.backend()}]": ops, "reference": reference}
    for name, impl in implementations.items():
        leaf = cos.detach().requires_grad_(True)  # keeps the layout's strides
        logits = impl.margin_logits(leaf, labels, **margin)
        loss = impl.margin_cross_entropy(leaf, labels, **margin, **loss_options)
        assert logits.dtype == cos.dtype, name
        assert loss.dtype == reference.compute_dtype(cos.dtype), name
        assert torch.all(torch.isfinite(logits)), f"{name}: non-finite logits"
        assert torch.all(torch.isfinite(loss)), f"{name}: non-finite loss"
        assert_close_scaled(logits, want_logits, value_tol, f"{name} logits", value_scale)
        assert_close_scaled(loss, want_loss, value_tol, f"{name} loss", loss_scale)
        loss.backward(upstream.to(loss.dtype))
        assert leaf.grad.dtype == cos.dtype, name
        assert torch.all(torch.isfinite(leaf.grad)), f"{name}: non-finite gradient"
        assert_close_scaled(leaf.grad, exact.grad, grad_tol, f"{name} gradient", grad_scale)
        if (labels < 0).all():
            assert torch.all(leaf.grad == 0), f"{name}: gradient without any target"


@pytest.mark.parametrize("device", DEVICES)
def test_more_than_65536_classes(device):
    """Grid and index limits: C above 65536 (docs/design.md, Testing)."""
    seed = torch.seed()
    case = dict(
        seed=seed,
        batch=3,
        classes=70_001,
        labels="some_negative",
        dtype=torch.float32,
        layout="contiguous",
        strided_labels=False,
        device=device,
    )
    cos, labels = build_inputs(case)
    labels[1] = 70_000
    margin = dict(s=64.0, m1=1.0, m2=0.5)
    exact = cos.double().requires_grad_(True)
    leaf = cos.clone().requires_grad_(True)
    want = reference.margin_cross_entropy(exact, labels, **margin, label_smoothing=0.1)
    got = ops.margin_cross_entropy(leaf, labels, **margin, label_smoothing=0.1)
    want.backward()
    got.backward()
    assert_close_scaled(got, want, 1e-5, f"loss seed={seed}")
    assert_close_scaled(leaf.grad, exact.grad, 1e-4, f"gradient seed={seed}")
    assert_close_scaled(
        ops.margin_logits(cos, labels, **margin),
        reference.margin_logits(exact.detach(), labels, **margin),
        1e-5,
        f"logits seed={seed}",
    )


# --------------------------------------------------------------------------------------------------
# NaN / inf inside cos (documented in angular/ops/reference.py; angular/ops/margin.py says it is not checked
# for). It goes through the arithmetic as F.cross_entropy would take it, row by row:
#   - NaN anywhere in a row with a target, +inf anywhere, or any non-finite target value: the row's
#     loss is not finite; a "mean" or "sum" over it is not finite.
#   - -inf at a non-target column gives that class probability 0: the loss stays finite without label
#     smoothing (smoothing puts mass on that class, so its loss is +inf).
#   - A row without a target (negative label) is ignored whatever it holds: loss 0, gradient 0.
#   - Every other row is computed as if the bad rows were absent, gradient included.

IMPLEMENTATIONS = {f"ops[{ops.backend()}]": ops, "reference": reference}


def poisoned_batch(dtype, device, generator):
    batch, classes = 8, 6
    cos = (torch.rand(batch, classes, generator=generator, dtype=torch.float64) * 2 - 1).to(dtype)
    labels = torch.randint(1, classes, (batch,), generator=generator)
    other = (labels + 1) % classes
    cos[0, labels[0]] = math.nan  # NaN at the target
    cos[1, other[1]] = math.nan  # NaN elsewhere in the row
    cos[2, labels[2]] = math.inf  # +inf at the target
    cos[3, other[3]] = math.inf  # +inf elsewhere
    cos[4, labels[4]] = -math.inf  # -inf at the target
    cos[5, other[5]] = -math.inf  # -inf elsewhere: that class gets probability 0
    cos[6, 0] = math.nan  # a row without a target, NaN where its clamped label points
    cos[6, 1] = math.inf
    labels[6] = -1  # row 7 stays clean
    return cos.to(device), labels.to(device)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lam", [0.0, 5.0])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_non_finite_cos_propagates_to_its_row_only(implementation, dtype, device, lam, smoothing):
    impl = IMPLEMENTATIONS[implementation]
    seed = torch.seed()
    generator = torch.Generator().manual_seed(seed)
    cos, labels = poisoned_batch(dtype, device, generator)
    margin = dict(s=32.0, m1=1.0, m2=0.5, m3=0.1, lam=lam)
    context = f"seed={seed} {implementation} {dtype} {device} lam={lam} eps={smoothing}"

    leaf = cos.clone().requires_grad_(True)
    logits = impl.margin_logits(leaf, labels, **margin)
    bad = ~torch.isfinite(cos)
    assert torch.all(~torch.isfinite(logits[bad])), f"non-finite cos, finite logits: {context}"
    assert torch.all(torch.isfinite(logits[~bad])), f"finite cos, non-finite logits: {context}"
    logits.float().sum().backward()
    assert torch.all(leaf.grad[6] == margin["s"]), f"d logits / d cos without a target: {context}"

    leaf = cos.clone().requires_grad_(True)
    options = dict(**margin, label_smoothing=smoothing, reduction="none")
    rows = impl.margin_cross_entropy(leaf, labels, **options)
    losses = rows.detach().cpu()
    for row in range(5):
        assert not math.isfinite(losses[row].item()), f"row {row} loss finite: {context}"
    if smoothing == 0.0:
        assert math.isfinite(losses[5].item()), f"-inf at a non-target column: {context}"
    else:
        assert losses[5].item() == math.inf, f"-inf at a non-target column, smoothed: {context}"
    assert losses[6].item() == 0.0, f"a row without a target is not ignored: {context}"
    rows.backward(torch.ones_like(rows))
    assert torch.all(leaf.grad[6] == 0), f"gradient of a row without a target: {context}"

    # The clean row equals its value in a batch without the bad rows, gradient included.
    clean = cos[7:].clone().requires_grad_(True)
    alone = impl.margin_cross_entropy(clean, labels[7:], **options)
    alone.backward(torch.ones_like(alone))
    torch.testing.assert_close(losses[7:], alone.detach().cpu(), msg=lambda t: f"{t}\n{context}")
    assert torch.all(torch.isfinite(leaf.grad[7:])), context
    torch.testing.assert_close(leaf.grad[7:], clean.grad, msg=lambda t: f"{t}\n{context}")

    for reduction in ("mean", "sum"):
        total = impl.margin_cross_entropy(
            cos, labels, **margin, label_smoothing=smoothing, reduction=reduction
        )
        assert not torch.isfinite(total), f"{reduction} over non-finite rows: {context}"
