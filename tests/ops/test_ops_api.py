"""The public API ``angular.ops``, whatever backend serves it: same results as the reference, the
backend switch and its one warning, and a clear exception naming the argument for each bad input.

``INVALID_CASES`` is also run in a subprocess, on every backend, by
``tests/ops/test_ops_invalid_input.py``.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from angular import ops
from angular.ops import reference

PRESETS = {
    "arcface": dict(m1=1.0, m2=0.5, m3=0.0, lam=0.0),
    "cosface": dict(m1=1.0, m2=0.0, m3=0.35, lam=0.0),
    "sphereface": dict(m1=4.0, m2=0.0, m3=0.0, lam=5.0),
    "combined": dict(m1=1.0, m2=0.3, m3=0.2, lam=0.0),
}
REDUCTIONS = ("mean", "sum", "none")
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
# docs/design.md, Testing: fp32 values 1e-5 and gradients 1e-4 relative; fp16 / bf16 1e-2.
TOLERANCE = {torch.float64: (1e-10, 1e-9), torch.float32: (1e-5, 1e-4)}
LOW_PRECISION_TOLERANCE = (1e-2, 1e-2)


@pytest.fixture
def seed() -> int:
    value = torch.seed()
    random.seed(value)
    return value


def random_inputs(batch: int, classes: int, dtype=torch.float32):
    """Cosines in [-1, 1] including exact +-1 targets, and a few rows without a target."""
    cos = torch.empty(batch, classes, dtype=torch.float64).uniform_(-1.0, 1.0)
    labels = torch.randint(0, classes, (batch,))
    cos[0, labels[0]] = 1.0
    if batch > 1:
        cos[1, labels[1]] = -1.0
    if batch > 2:
        labels[2] = -1
    return cos.to(dtype), labels


def assert_close_scaled(got, want, rtol, context):
    """Relative tolerance, with an absolute floor at ``rtol`` times the largest magnitude."""
    floor = rtol * max(want.abs().max().item(), 1e-30)
    torch.testing.assert_close(
        got.double(), want.double(), rtol=rtol, atol=floor, msg=lambda t: f"{t}\n{context}"
    )


def test_backend_is_one_of_the_three():
    assert ops.backend() in ("cuda", "cpp", "python")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("preset", PRESETS)
def test_results_equal_reference(seed, dtype, preset, device):
    value_tol, grad_tol = TOLERANCE.get(dtype, LOW_PRECISION_TOLERANCE)
    cos, labels = (tensor.to(device) for tensor in random_inputs(17, 23, dtype))
    margin = dict(s=64.0, **PRESETS[preset])
    context = f"seed={seed} backend={ops.backend()} {preset} {dtype} {device}"

    got = ops.margin_logits(cos, labels, **margin)
    assert got.dtype == dtype
    assert_close_scaled(got, reference.margin_logits(cos, labels, **margin), value_tol, context)

    for reduction in REDUCTIONS:
        for smoothing in (0.0, 0.1):
            extra = dict(label_smoothing=smoothing, reduction=reduction)
            mine = cos.clone().requires_grad_(True)
            ref = cos.clone().requires_grad_(True)
            loss = ops.margin_cross_entropy(mine, labels, **margin, **extra)
            want = reference.margin_cross_entropy(ref, labels, **margin, **extra)
            assert loss.dtype == want.dtype
            where = f"{context} {extra}"
            assert_close_scaled(loss, want, value_tol, where)
            upstream = torch.rand(loss.shape, dtype=loss.dtype, device=device) + 0.5
            loss.backward(upstream)
            want.backward(upstream)
            assert mine.grad.dtype == dtype
            assert_close_scaled(mine.grad, ref.grad, grad_tol, where)


def test_logits_gradient_equals_reference(seed):
    cos, labels = random_inputs(9, 31)
    weights = torch.randn(cos.shape)
    for preset, margin in PRESETS.items():
        mine = cos.clone().requires_grad_(True)
        ref = cos.clone().requires_grad_(True)
        (ops.margin_logits(mine, labels, s=30.0, **margin) * weights).sum().backward()
        (reference.margin_logits(ref, labels, s=30.0, **margin) * weights).sum().backward()
        assert_close_scaled(mine.grad, ref.grad, 1e-4, f"seed={seed} {preset}")


@pytest.mark.parametrize("view", ["transposed", "sliced", "strided_labels"])
def test_non_contiguous_inputs(seed, view):
    base, labels = random_inputs(12, 40)
    cos = base
    if view == "transposed":
        cos = base.t().contiguous().t()
    elif view == "sliced":
        wide = torch.empty(12, 80).uniform_(-1.0, 1.0)
        wide[:, ::2] = base
        cos = wide[:, ::2]
    else:
        spread = torch.randint(0, 40, (24,))
        spread[::2] = labels
        labels = spread[::2]
    assert not (cos.is_contiguous() and labels.is_contiguous())
    margin = dict(s=64.0, m1=1.0, m2=0.5)
    dense_labels = labels.contiguous()
    torch.testing.assert_close(
        ops.margin_logits(cos, labels, **margin), ops.margin_logits(base, dense_labels, **margin)
    )
    strided = cos.detach().requires_grad_(True)  # detach keeps the view's strides
    dense = base.clone().requires_grad_(True)
    loss = ops.margin_cross_entropy(strided, labels, **margin, label_smoothing=0.1)
    want = ops.margin_cross_entropy(dense, dense_labels, **margin, label_smoothing=0.1)
    torch.testing.assert_close(loss, want, msg=lambda t: f"{t}\nseed={seed}")
    loss.backward()
    want.backward()
    torch.testing.assert_close(strided.grad, dense.grad, msg=lambda t: f"{t}\nseed={seed}")


# --------------------------------------------------------------------------------------------------
# The backend switch, in fresh interpreters (the choice is made once per process).


def run_python(code: str, **env_overrides) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_overrides}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_python_backend_by_environment_warns_exactly_once():
    result = run_python(
        """
        import json, warnings
        import torch
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import angular.ops as ops
            cos = torch.rand(4, 3, requires_grad=True)
            labels = torch.tensor([0, 2, -1, 1])
            for _ in range(3):
                ops.margin_logits(cos, labels, s=8.0).sum().backward()
                ops.margin_cross_entropy(cos, labels, s=8.0, m2=0.5).backward()
            backend = ops.backend()
        print(json.dumps({
            "backend": backend,
            "runtime_warnings": [str(w.message) for w in caught
                                 if issubclass(w.category, RuntimeWarning)],
        }))
        """,
        ANGULAR_BACKEND="python",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["backend"] == "python"
    assert len(report["runtime_warnings"]) == 1, report
    assert "ANGULAR_BACKEND=python" in report["runtime_warnings"][0]


def test_invalid_backend_choice_is_a_clear_error():
    result = run_python(
        """
        import torch
        import angular.ops as ops
        for call in (ops.backend,
                     lambda: ops.margin_logits(torch.rand(2, 3), torch.tensor([0, 1]), s=8.0)):
            try:
                call()
            except ValueError as error:
                print("ValueError:", error)
            else:
                print("no error")
        """,
        ANGULAR_BACKEND="fastest",
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2, result.stdout
    for line in lines:
        assert line.startswith("ValueError:") and "ANGULAR_BACKEND" in line, line
        assert "fastest" in line and "python" in line, line


# --------------------------------------------------------------------------------------------------
# Bad input. Each case: (id, the argument its message must name, a call that must raise). The table
# is plain data plus lambdas so that the subprocess test can run it too.


def _cos(batch=4, classes=5, **kw):
    return torch.empty(batch, classes, **kw).uniform_(-1.0, 1.0)


def _labels(batch=4, classes=5):
    return torch.randint(0, classes, (batch,))


def _both_ops(name, argument, make_args, **options):
    """The same bad input given to both ops."""
    return [
        (f"margin_logits-{name}", argument, lambda: ops.margin_logits(*make_args(), **options)),
        (
            f"margin_cross_entropy-{name}",
            argument,
            lambda: ops.margin_cross_entropy(*make_args(), **options),
        ),
    ]


def invalid_cases() -> list[tuple[str, str, object]]:
    good = lambda: (_cos(), _labels())  # noqa: E731
    s64 = dict(s=64.0)
    cases = []
    tensor_cases = [
        ("cos-rank-1", "cos", lambda: (torch.rand(5), _labels(5))),
        ("cos-rank-3", "cos", lambda: (torch.rand(4, 5, 2), _labels())),
        ("cos-int", "cos", lambda: (torch.randint(-1, 2, (4, 5)), _labels())),
        ("cos-bool", "cos", lambda: (torch.rand(4, 5) > 0.5, _labels())),
        ("cos-not-tensor", "cos", lambda: (_cos().tolist(), _labels())),
        ("labels-rank-2", "labels", lambda: (_cos(), _labels().view(2, 2))),
        ("labels-rank-0", "labels", lambda: (_cos(1, 5), torch.tensor(3))),
        ("labels-float", "labels", lambda: (_cos(), _labels().float())),
        ("labels-int32", "labels", lambda: (_cos(), _labels().int())),
        ("labels-not-tensor", "labels", lambda: (_cos(), _labels().tolist())),
        ("label-equal-C", "labels", lambda: (_cos(), torch.tensor([0, 5, 1, 2]))),
        ("label-above-C", "labels", lambda: (_cos(), torch.tensor([0, 1, 2, 99]))),
        ("batch-mismatch", "labels", lambda: (_cos(4, 5), _labels(3))),
        ("batch-zero", "cos", lambda: (_cos(0, 5), _labels(0))),
        ("classes-zero", "cos", lambda: (_cos(4, 0), torch.full((4,), -1))),
        ("device-meta-cos", "labels", lambda: (_cos(device="meta"), _labels())),
        ("device-meta-labels", "labels", lambda: (_cos(), _labels().to("meta"))),
    ]
    if torch.cuda.is_available():
        tensor_cases.append(
            ("device-cuda-cos-cpu-labels", "labels", lambda: (_cos(device="cuda"), _labels()))
        )
    for name, argument, make_args in tensor_cases:
        cases += _both_ops(name, argument, make_args, **s64)

    bad_numbers = [
        ("s", 0.0),
        ("s", -1.0),
        ("s", math.nan),
        ("s", math.inf),
        ("s", "64"),
        ("m1", 0.0),
        ("m1", -0.5),
        ("m1", math.nan),
        ("m1", math.inf),
        ("m2", -0.1),
        ("m2", math.nan),
        ("m2", math.inf),
        ("m3", math.nan),
        ("m3", -math.inf),
        ("lam", -1.0),
        ("lam", math.nan),
        ("lam", math.inf),
    ]
    for argument, value in bad_numbers:
        options = {**s64, argument: value}
        cases += _both_ops(f"{argument}={value!r}", argument, good, **options)

    for value in (-0.1, 1.5, math.nan, math.inf):
        cases.append(
            (
                f"margin_cross_entropy-label_smoothing={value!r}",
                "label_smoothing",
                lambda v=value: ops.margin_cross_entropy(*good(), s=64.0, label_smoothing=v),
            )
        )
    for value in ("avg", "MEAN", None):
        cases.append(
            (
                f"margin_cross_entropy-reduction={value!r}",
                "reduction",
                lambda v=value: ops.margin_cross_entropy(*good(), s=64.0, reduction=v),
            )
        )
    return cases


def names_argument(message: str, argument: str) -> bool:
    """Whether ``message`` names ``argument`` as a word (so ``s`` is not found inside ``labels``)."""
    return re.search(rf"(?<![\w.]){re.escape(argument)}(?!\w)", message) is not None


def run_invalid_cases() -> dict[str, dict]:
    """Run every invalid case; report, per case, the exception raised (or none)."""
    results = {}
    for case_id, argument, call in invalid_cases():
        try:
            call()
        except Exception as error:  # the test judges the type; here we only record it
            results[case_id] = dict(
                argument=argument,
                error=type(error).__name__,
                message=str(error),
                names_argument=names_argument(str(error), argument),
            )
        else:
            results[case_id] = dict(argument=argument, error=None, message="", names_argument=False)
    return results


CASES = invalid_cases()


@pytest.mark.parametrize("case_id,argument,call", CASES, ids=[case[0] for case in CASES])
def test_bad_input_raises_naming_the_argument(case_id, argument, call):
    with pytest.raises((ValueError, TypeError)) as caught:
        call()
    assert names_argument(str(caught.value), argument), (argument, str(caught.value))


def test_the_argument_check_is_not_vacuous():
    assert names_argument("s must be > 0, got 0.0", "s")
    assert not names_argument("labels must be int64", "s")
    assert not names_argument("cos.s is wrong", "s")


def test_invalid_case_table_covers_the_issue():
    """Every kind of bad input the issues list is in the table, for both ops where it applies."""
    ids = {case[0] for case in CASES}
    required = [
        "cos-rank-1",
        "labels-rank-2",
        "cos-int",
        "labels-float",
        "label-equal-C",
        "batch-mismatch",
        "s=0.0",
        "s=nan",
        "m1=nan",
        "m2=inf",
        "m3=nan",
        "lam=inf",
        "s=inf",
        "m1=0.0",
        "m2=-0.1",
        "lam=-1.0",
        "batch-zero",
        "device-meta-cos",
    ]
    for name in required:
        for op in ("margin_logits", "margin_cross_entropy"):
            assert f"{op}-{name}" in ids, f"{op}-{name}"
    for name in ("label_smoothing=1.5", "label_smoothing=-0.1", "reduction='avg'"):
        assert f"margin_cross_entropy-{name}" in ids, name
