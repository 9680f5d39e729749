"""Per-row margins and negative modulation (docs/design.md, Per-row margins and negative modulation).

The reference (:mod:`angular.ops.reference`) is held against independent formulations: row-by-row
scalar calls, the closed-form margin derivatives, and CurricularFace's published forward. The public
ops (:mod:`angular.ops`, fused where the extension serves the device) are held against the fp64
reference with the tolerances of tests/ops/test_fused.py: values, the gradient of ``cos`` and the
gradient of every per-row margin tensor.
"""

from __future__ import annotations

import json
import math
import random
import textwrap

import formulations  # the heads as their authors wrote them (benchmarks/, on pytest's pythonpath)
import pytest
import torch
from test_fused import (
    DTYPES,
    TOLERANCE,
    RecordOps,
    assert_close,
    assert_gradients,
    make_inputs,
    non_contiguous_views,
    require_fused,
    run_at_capability,
    with_grad_in_layout,
)

from angular import ops
from angular.ops import reference

MARGIN_NAMES = ("m1", "m2", "m3", "lam")


@pytest.fixture
def seed() -> int:
    return random.SystemRandom().randrange(2**31)


def row_margins(batch, seed, *, dtype=torch.float64, m1=(1.0, 1.0), m2=(0.2, 0.6), lam=(0.0, 0.0)):
    """Per-row (m1, m2, m3, lam) drawn uniformly from the given ranges (m3 from [-0.2, 0.4])."""
    generator = torch.Generator().manual_seed(seed)

    def draw(low, high):
        return (
            low + (high - low) * torch.rand(batch, generator=generator, dtype=torch.float64)
        ).to(dtype)

    return dict(m1=draw(*m1), m2=draw(*m2), m3=draw(-0.2, 0.4), lam=draw(*lam))


def leaves(margins, device="cpu", dtype=None):
    """Fresh leaf copies of the tensor margins (requiring grad), floats as they are."""
    return {
        name: value.detach().to(device=device, dtype=dtype or value.dtype).requires_grad_()
        if isinstance(value, torch.Tensor)
        else value
        for name, value in margins.items()
    }


# --------------------------------------------------------------------------------------------------
# The reference against independent formulations.


def test_reference_rows_equal_scalar_calls_row_by_row(seed):
    cos, labels = make_inputs(10, 40, torch.float64, seed)
    margins = row_margins(10, seed, m1=(1.0, 4.0), lam=(0.0, 5.0))
    got = reference.margin_cross_entropy(
        cos, labels, s=8.0, label_smoothing=0.1, reduction="none", negative_t=0.2, **margins
    )
    for row in range(10):
        scalars = {name: float(value[row]) for name, value in margins.items()}
        want = reference.margin_cross_entropy(
            cos[row : row + 1],
            labels[row : row + 1],
            s=8.0,
            label_smoothing=0.1,
            reduction="none",
            negative_t=0.2,
            **scalars,
        )
        assert_close(got[row : row + 1], want, 1e-12, f"seed={seed} row {row}")


def test_reference_margin_gradients_are_the_closed_form(seed):
    """d f_y / d m1, m2, m3, lam per row against the derivative written out by hand."""
    generator = torch.Generator().manual_seed(seed)
    cos_y = torch.rand(64, generator=generator, dtype=torch.float64) * 2 - 1
    cos_y[:4] = torch.tensor([1.0, -1.0, 0.9999999, -0.9999999], dtype=torch.float64)
    margins = leaves(row_margins(64, seed, m1=(1.0, 4.0), m2=(0.0, 2.0), lam=(0.0, 5.0)))
    reference.target_logit(cos_y, **margins).sum().backward()
    m1, m2, m3, lam = (margins[name].detach() for name in MARGIN_NAMES)
    theta = torch.acos(cos_y)
    t = m1 * theta + m2
    sign = torch.where(torch.floor(t / math.pi) % 2 == 0, 1.0, -1.0)
    psi = sign * torch.cos(t) - 2 * torch.floor(t / math.pi) - m3
    want = {
        "m1": -sign * torch.sin(t) * theta / (1 + lam),
        "m2": -sign * torch.sin(t) / (1 + lam),
        "m3": -1 / (1 + lam),
        "lam": (cos_y - psi) / (1 + lam) ** 2,
    }
    for name in MARGIN_NAMES:
        assert_close(
            margins[name].grad, want[name].expand(64), 1e-12, f"seed={seed} d f / d {name}"
        )


def published_inputs(seed, batch=16, classes=200):
    """Cosines inside (-1, 1) with target angles below pi - 0.5 (where the published heads take
    no ``target - mm`` branch, and AdaFace's clip to [eps, pi - eps] does not bind)."""
    generator = torch.Generator().manual_seed(seed)
    cos = torch.rand(batch, classes, generator=generator, dtype=torch.float64) * 1.99 - 0.995
    labels = torch.randint(0, classes, (batch,), generator=generator)
    targets = torch.rand(batch, generator=generator, dtype=torch.float64) * 1.4 - 0.5
    cos[torch.arange(batch), labels] = targets
    return cos, labels


def test_reference_modulation_is_curricularfaces_forward(seed):
    cos, labels = published_inputs(seed)
    got = reference.margin_logits(cos, labels, s=64.0, m2=0.5, negative_t=0.3)
    want = formulations.curricularface_logits(cos, labels, s=64.0, m=0.5, t=0.3)
    assert_close(got, want, 1e-12, f"seed={seed}")


def test_reference_per_row_margins_are_magface_and_adaface(seed):
    cos, labels = published_inputs(seed)
    generator = torch.Generator().manual_seed(seed)
    margins = 0.45 + 0.35 * torch.rand(16, generator=generator, dtype=torch.float64)
    got = reference.margin_logits(cos, labels, s=64.0, m2=margins)
    assert_close(got, formulations.magface_logits(cos, labels, margins), 1e-12, f"seed={seed}")
    # AdaFace: angular part -m ms, negative for norms above the batch mean (a per-row m2 may be).
    norms = 10.0 + 20.0 * torch.rand(16, generator=generator, dtype=torch.float64)
    scaler = torch.clip((norms - 20.0) / (4.0 + 1e-3) * 0.333, -1, 1)
    got = reference.margin_logits(
        cos.clamp(-1 + 1e-3, 1 - 1e-3), labels, s=64.0, m2=-0.4 * scaler, m3=0.4 + 0.4 * scaler
    )
    want = formulations.adaface_logits(cos, labels, norms, batch_mean=20.0, batch_std=4.0)
    assert_close(got, want, 1e-12, f"seed={seed}")


def test_reference_modulation_leaves_ties_and_rows_without_target(seed):
    cos, labels = make_inputs(10, 30, torch.float64, seed, hard=False)
    labels[3] = -1
    f_y = reference.target_logit(cos[0, labels[0]].view(1), m1=1.0, m2=0.5, m3=0.0, lam=0.0)
    other = (labels[0] + 1) % 30
    cos[0, other] = f_y[0]  # exactly at the threshold: not modulated (strict comparison)
    got = reference.margin_logits(cos, labels, s=2.0, m2=0.5, negative_t=0.7)
    plain = reference.margin_logits(cos, labels, s=2.0, m2=0.5)
    assert got[0, other] == plain[0, other]
    assert torch.equal(got[3], plain[3])


# --------------------------------------------------------------------------------------------------
# The public ops against the fp64 reference.


def check_rows_against_reference(
    cos, labels, margins, *, s, eps, straight_through, negative_t, context
):
    """margin_logits and margin_cross_entropy ("none" and "mean"): values, cos gradient and the
    gradient of every tensor margin, through angular.ops, against the fp64 reference."""
    value_tol, grad_tol = TOLERANCE[cos.dtype]
    options = dict(s=s, straight_through=straight_through, negative_t=negative_t)
    context = f"{context} s={s} eps={eps} st={straight_through} t={negative_t}"
    generator = torch.Generator().manual_seed(len(context))
    for kind in ("logits", "none", "mean"):
        where = f"{context}: {kind}"
        got_cos, ref_cos = with_grad_in_layout(cos), cos.detach().double().requires_grad_()
        got_m, ref_m = leaves(margins, cos.device), leaves(margins, cos.device, torch.float64)
        if kind == "logits":
            got = ops.margin_logits(got_cos, labels, **got_m, **options)
            want = reference.margin_logits(ref_cos, labels, **ref_m, **options)
            assert got.dtype == cos.dtype, where
            weights = torch.randn(cos.shape, generator=generator, dtype=torch.float64)
        else:
            ce = dict(label_smoothing=eps, reduction=kind, **options)
            got = ops.margin_cross_entropy(got_cos, labels, **got_m, **ce)
            want = reference.margin_cross_entropy(ref_cos, labels, **ref_m, **ce)
            assert got.dtype == reference.compute_dtype(cos.dtype), where
            weights = torch.rand(want.shape, generator=generator, dtype=torch.float64)
        assert_close(got, want, value_tol, where)
        (got * weights.to(got)).sum().backward()
        (want * weights.to(want)).sum().backward()
        assert_gradients(got_cos.grad, ref_cos.grad, cos, labels, grad_tol, f"{where} grad cos")
        for name, value in got_m.items():
            if isinstance(value, torch.Tensor):
                assert value.grad.dtype == value.dtype, f"{where} grad {name} dtype"
                # A float32 margin gets its gradient in float32: never judged finer than that.
                tol = max(grad_tol, TOLERANCE[value.dtype][1])
                assert_close(value.grad, ref_m[name].grad, tol, f"{where} grad {name}")


CONFIGS = {
    # name: (per-row ranges for row_margins, negative_t, straight_through, label_smoothing)
    "arcface-rows": (dict(m2=(0.2, 0.6)), None, False, 0.0),
    "adaface-rows": (dict(m2=(-0.4, 0.4)), None, False, 0.1),  # m2 = -m ms: either sign
    "sphereface-lam-rows": (dict(m1=(1.5, 4.0), m2=(0.0, 0.0), lam=(0.0, 5.0)), None, False, 0.0),
    "curricular": (dict(m2=(0.5, 0.5)), 0.3, False, 0.0),
    "curricular-rows-smoothed": (dict(m1=(1.0, 3.0), m2=(0.2, 0.6)), 0.6, False, 0.1),
    "straight-through-rows": (dict(m2=(0.2, 0.6)), 0.1, True, 0.0),
}


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_match_reference(seed, config, dtype):
    ranges, negative_t, straight_through, eps = CONFIGS[config]
    cos, labels = make_inputs(12, 300, dtype, seed)
    margins = row_margins(12, seed, **ranges)
    if config == "curricular":
        margins = dict(m2=0.5)  # scalar margins with modulation
    elif config == "adaface-rows":
        margins["m1"], margins["lam"] = 1.0, 0.0  # AdaFace: per-row m2 and m3 only, in float32
        margins["m2"], margins["m3"] = margins["m2"].float(), margins["m3"].float()
    check_rows_against_reference(
        cos,
        labels,
        margins,
        s=32.0,
        eps=eps,
        straight_through=straight_through,
        negative_t=negative_t,
        context=f"seed={seed} {config} {dtype}",
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rows_non_contiguous_cos(seed, dtype):
    cos, labels = make_inputs(12, 130, dtype, seed)
    margins = row_margins(12, seed, m1=(1.0, 2.0), lam=(0.0, 1.0))
    for name, view in non_contiguous_views(cos):
        check_rows_against_reference(
            view, labels, margins, s=16.0, eps=0.1, straight_through=False, negative_t=0.5,
            context=f"seed={seed} {name} {dtype}",
        )  # fmt: skip


@pytest.mark.parametrize("batch", [1, 9])
def test_rows_single_row_column_major_and_wide_rows(seed, batch):
    cos, labels = make_inputs(batch, 70000, torch.float32, seed, hard=False)
    labels[-1] = -1 if batch > 1 else labels[-1]
    view = cos.t().contiguous().t()  # column-major
    margins = row_margins(batch, seed, m1=(1.0, 2.0))
    check_rows_against_reference(
        view,
        labels,
        margins,
        s=64.0,
        eps=0.0,
        straight_through=False,
        negative_t=0.2,
        context=f"seed={seed} B={batch} column-major",
    )


def test_gradcheck_fp64_rows():
    """Exact-mode gradcheck in fp64: cos and every per-row margin, with and without modulation."""
    generator = torch.Generator().manual_seed(4321)
    cos = (torch.rand(4, 7, generator=generator, dtype=torch.float64) * 1.9 - 0.95).requires_grad_()
    labels = torch.tensor([1, -1, 6, 0])
    m1, m2, m3, lam = (
        value.requires_grad_()
        for value in row_margins(4, 5, m1=(1.0, 3.0), lam=(0.0, 2.0)).values()
    )
    for negative_t in (None, 0.4):
        for straight_through in (False, True):
            options = dict(s=3.0, negative_t=negative_t, straight_through=straight_through)

            def logits(c, a, b, d, e, options=options):
                return ops.margin_logits(c, labels, m1=a, m2=b, m3=d, lam=e, **options)

            def loss(c, a, b, d, e, options=options):
                return ops.margin_cross_entropy(
                    c,
                    labels,
                    m1=a,
                    m2=b,
                    m3=d,
                    lam=e,
                    label_smoothing=0.1,
                    reduction="none",
                    **options,
                )

            # Straight-through replaces d / d cos by 1 (not a derivative): check the margins only.
            inputs = (cos.detach() if straight_through else cos, m1, m2, m3, lam)
            for fn in (logits, loss):
                assert torch.autograd.gradcheck(fn, inputs, fast_mode=False)


# --------------------------------------------------------------------------------------------------
# Bad per-row arguments: an error naming the argument.


@pytest.mark.parametrize(
    "name, bad, error, match",
    [
        ("m1", torch.ones(5), ValueError, r"m1 must be a float or a \(B,\) tensor with B = 4"),
        ("m2", torch.zeros(4, 1), ValueError, r"m2 must be a float or a \(B,\) tensor"),
        ("m3", torch.zeros(4, dtype=torch.float16), TypeError, "m3 must be float32 or float64"),
        ("lam", torch.zeros(4, dtype=torch.int64), TypeError, "lam must be float32 or float64"),
        ("m2", torch.tensor([0.1, float("nan"), 0.2, 0.3]), ValueError, "m2 must be finite"),
        ("m3", torch.tensor([0.1, float("inf"), 0.2, 0.3]), ValueError, "m3 must be finite"),
        ("m1", torch.tensor([1.0, 0.0, 1.0, 1.0]), ValueError, "m1 must be > 0.0"),
        ("m2", -0.1, ValueError, "m2 must be >= 0.0"),  # a float m2; per-row m2 may be negative
        ("lam", torch.tensor([0.0, -1.0, 0.0, 0.0]), ValueError, "lam must be >= 0.0"),
        ("m2", torch.zeros(4, device="meta"), ValueError, "m2 is on meta but cos is on cpu"),
        ("negative_t", float("nan"), ValueError, "negative_t must be finite"),
        ("negative_t", torch.tensor(0.5), TypeError, "negative_t must be a real number"),
    ],
)
def test_bad_per_row_arguments_name_the_argument(name, bad, error, match):
    cos, labels = make_inputs(4, 9, torch.float32, 0)
    for op in (ops.margin_logits, ops.margin_cross_entropy):
        with pytest.raises(error, match=match):
            op(cos, labels, s=8.0, **{name: bad})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_match_reference_cuda(seed, dtype):
    """The CUDA *_rows kernels (tests/ops/test_fused_cuda.py holds the scalar ones)."""
    require_fused("cuda")
    for classes in (300, 70000):  # a warp per row, and a block per row with split rows
        cos, labels = make_inputs(12, classes, dtype, seed, device="cuda")
        margins = {
            k: v.cuda() for k, v in row_margins(12, seed, m1=(1.0, 3.0), lam=(0.0, 2.0)).items()
        }
        for negative_t in (None, 0.4):
            check_rows_against_reference(
                cos, labels, margins, s=32.0, eps=0.1, straight_through=False,
                negative_t=negative_t, context=f"seed={seed} cuda C={classes} {dtype}",
            )  # fmt: skip


def test_fused_linear_refuses_per_row_margins_and_modulation():
    x, weight, labels = torch.randn(4, 8), torch.randn(10, 8), torch.tensor([1, 2, 3, 4])
    with pytest.raises(TypeError, match="m2 must be a real number"):
        ops.linear_margin_cross_entropy(x, weight, labels, s=8.0, m2=torch.full((4,), 0.5))
    with pytest.raises(TypeError, match="negative_t"):
        ops.linear_margin_cross_entropy(x, weight, labels, s=8.0, negative_t=0.3)


# --------------------------------------------------------------------------------------------------
# The fused kernels serve them (skipped without the extension, failed in CI, as tests/ops/test_fused.py).


def test_per_row_and_modulated_calls_dispatch_to_the_rows_kernels():
    require_fused("cpu")
    cos, labels = make_inputs(6, 50, torch.float32, 0)
    m2 = torch.full((6,), 0.5, requires_grad=True)
    with RecordOps() as recorded:
        ops.margin_cross_entropy(cos.requires_grad_(), labels, s=8.0, m2=m2).backward()
        ops.margin_logits(cos, labels, s=8.0, negative_t=0.2).sum().backward()
        ops.margin_logits(cos, labels, s=8.0, m2=0.5).sum().backward()
    angular = [name for name in recorded.names if name.startswith("angular.")]
    assert angular == [
        "angular.margin_cross_entropy_rows.default",
        "angular.margin_cross_entropy_rows_backward.default",
        "angular.margin_logits_rows.default",
        "angular.margin_logits_rows_backward.default",
        "angular.margin_logits.default",  # floats without modulation: the scalar kernels
        "angular.margin_logits_backward.default",
    ]


@pytest.mark.slow
def test_opcheck_rows_ops():
    """Schema, fake kernels, autograd registration of the *_rows ops."""
    require_fused("cpu")
    ops.margin_logits(*make_inputs(2, 3, torch.float32, 0), s=1.0)  # registers the fake kernels
    for index, (dtype, negative_t) in enumerate([(torch.float32, None), (torch.float64, 0.3)]):
        cos, labels = make_inputs(6, 37, dtype, 200 + index)
        labels[1] = -1
        cos.requires_grad_()
        margins = torch.stack(list(row_margins(6, index, lam=(0.0, 1.0)).values())).to(
            reference.compute_dtype(dtype)
        )
        margins.requires_grad_()
        loss, lse = torch.ops.angular.margin_cross_entropy_rows(
            cos, labels, margins, 8.0, 0.1, False, negative_t
        )
        rows_args = (margins.detach(), 8.0)
        for op, args in [
            (torch.ops.angular.margin_logits_rows, (cos, labels, margins, 8.0, False, negative_t)),
            (
                torch.ops.angular.margin_cross_entropy_rows,
                (cos, labels, margins, 8.0, 0.1, False, negative_t),
            ),
            (
                torch.ops.angular.margin_logits_rows_backward,
                (torch.randn_like(cos), cos.detach(), labels, *rows_args, False, negative_t),
            ),
            (
                torch.ops.angular.margin_cross_entropy_rows_backward,
                (torch.rand_like(loss), cos.detach(), labels, lse.detach(), *rows_args, 0.1,
                 False, negative_t),
            ),
        ]:  # fmt: skip
            torch.library.opcheck(op, args)


def test_rows_kernels_check_their_margins_argument():
    """Called directly (bypassing angular.ops), a bad margins tensor is an error, not a bad read."""
    require_fused("cpu")
    cos, labels = make_inputs(4, 9, torch.float32, 0)
    for margins, match in [
        (torch.zeros(4, 3), r"margins must have shape \(4, B\) = \(4, 4\)"),
        (torch.zeros(4, 4, dtype=torch.float64), "margins must be Float for Float cos"),
    ]:
        with pytest.raises(RuntimeError, match=match):
            torch.ops.angular.margin_logits_rows(cos, labels, margins, 8.0, False, None)


CAPABILITY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    import test_adaptive_ops as t
    seed = int(sys.argv[1])
    for dtype in t.DTYPES:
        cos, labels = t.make_inputs(9, 1030, dtype, seed)
        t.check_rows_against_reference(
            cos.t().contiguous().t(), labels, t.row_margins(9, seed, lam=(0.0, 2.0)), s=32.0,
            eps=0.1, straight_through=False, negative_t=0.4, context=f"seed={seed} {dtype}")
    print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability()}))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("capability", ["DEFAULT", "AVX2"])
def test_rows_other_cpu_capabilities(seed, capability):
    """The modulated vector kernels of each CPU capability, in subprocesses (see test_fused.py)."""
    require_fused("cpu")
    run_at_capability(CAPABILITY_SCRIPT, seed, capability)


@pytest.mark.slow
def test_adaptive_benchmark_smoke(tmp_path):
    """``bench_margin.py --adaptive`` runs end to end on a tiny shape and writes its ratios."""
    require_fused("cpu")
    import bench_margin
    import margin_adaptive

    result = bench_margin.main(
        ["--adaptive", "--quick", "--B", "4", "--C", "64", "--threads", "1", "--out", str(tmp_path)]
    )
    cases = result["cases"]
    assert set(cases) == set(margin_adaptive.ADAPTIVE_CASES)
    assert all(row["status"] == "ok" and row["median_ms"] > 0 for row in cases.values())
    assert cases["fused modulated (CurricularFace)"]["vs_fused_scalar"] > 0
    assert cases["eager CurricularFace"]["speedup_of_fused"] > 0
    assert len(result["load_average"]["before"]) == 3
    assert "eager / fused" in (tmp_path / "bench_adaptive.md").read_text()
    assert json.loads((tmp_path / "bench_adaptive.json").read_text())["settings"]["C"] == 64
