"""What ``bench_margin.py`` times and how: the ops, passes, dtypes and margin presets, the
providers, the random inputs they run on, and the measurement of one provider on one configuration
(benchmarks/README.md, ``bench_margin.py``).

- ``fused``: ``angular.ops`` served by the compiled extension (``angular.ops._C``), what users call;
  unavailable, with the reason, when the extension has no kernel for the device.
- ``reference``: ``angular.ops.reference`` (the margin on the B target entries only, then
  ``F.cross_entropy``).
- ``insightface``: the eager formulation of insightface's arcface_torch (``formulations.py``).
- ``compiled``: ``torch.compile`` of the reference, compiled once per configuration.

SphereFace runs with ``lam = 0`` in every provider: ``lam`` adds one multiply-add on B entries and
does not change the cost.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import formulations
import harness
import torch

from angular import ops
from angular.nn.heads import MarginSpec
from angular.ops import reference

PROVIDERS = ("fused", "reference", "insightface", "compiled")
BASELINES = ("reference", "insightface", "compiled")
OPS = ("loss", "logits")
OP_NAMES = {"loss": "margin_cross_entropy", "logits": "margin_logits"}
PASSES = ("fwd", "fwd+bwd")
DTYPES = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp64": torch.float64,
}
PRESETS = {
    "arcface": MarginSpec.arcface(),
    "cosface": MarginSpec.cosface(),
    "sphereface": MarginSpec.sphereface(),
    "combined": MarginSpec.combined(),
}
# The shape where every preset runs in the default grid (elsewhere only ArcFace), and where the
# issue's targets are set.
FOCUS_SHAPE = {"cpu": (256, 32768), "cuda": (512, 100000)}
# Passes over B x C that an ideal implementation moves, for the bandwidth figures (bench_margin.py).
IDEAL_PASSES = {
    ("loss", "fwd"): 1,
    ("loss", "fwd+bwd"): 3,
    ("logits", "fwd"): 2,
    ("logits", "fwd+bwd"): 5,
}


class Unavailable(Exception):
    """A provider that cannot run on this machine; the message says why."""


@dataclass(frozen=True)
class Case:
    op: str
    B: int
    C: int
    dtype: str
    preset: str


@dataclass
class Inputs:
    cos: torch.Tensor
    labels: torch.Tensor
    grad_out: torch.Tensor | None


def make_inputs(case: Case, device: str, count: int, generator: torch.Generator) -> list[Inputs]:
    """``count`` input sets: cosines uniform in [-1, 1) requiring grad, labels, and for ``logits``
    an upstream gradient."""
    dtype = DTYPES[case.dtype]
    sets = []
    for _ in range(count):
        cos = torch.rand(case.B, case.C, generator=generator, device=device) * 2 - 1
        labels = torch.randint(0, case.C, (case.B,), generator=generator, device=device)
        grad_out = None
        if case.op == "logits":
            grad_out = torch.randn(case.B, case.C, generator=generator, device=device).to(dtype)
        sets.append(Inputs(cos.to(dtype).requires_grad_(True), labels, grad_out))
    return sets


def margin_params(preset: str) -> dict:
    spec = PRESETS[preset]
    return dict(s=spec.s, m1=spec.m1, m2=spec.m2, m3=spec.m3)


def make_provider(provider: str, op: str, preset: str, device: str):
    """``fn(cos, labels)`` -> loss (mean) or logits, as a provider computes it for one op and preset
    (``compiled`` is compiled lazily, on its first call). Raises :class:`Unavailable` when the
    provider cannot run here."""
    params = margin_params(preset)
    if provider == "fused":
        reason = harness.fused_unavailable_reason(device)
        if reason is not None:
            raise Unavailable(reason)
        target = ops.margin_cross_entropy if op == "loss" else ops.margin_logits
    elif provider in ("reference", "compiled"):
        target = reference.margin_cross_entropy if op == "loss" else reference.margin_logits
    elif provider == "insightface":
        target = (
            formulations.insightface_margin_cross_entropy
            if op == "loss"
            else formulations.insightface_margin_logits
        )
    else:
        raise ValueError(f"provider must be one of {', '.join(PROVIDERS)}, got {provider!r}")

    def run(cos, labels):
        return target(cos, labels, **params)

    if provider == "compiled":
        # A fresh compile per configuration, with static shapes: the best code inductor makes.
        torch._dynamo.reset()
        return torch.compile(run, dynamic=False)
    return run


def make_step(fn, op: str, pass_: str):
    """``step(inputs)``: the training forward (``fwd``) or it and ``torch.autograd.grad``."""
    if pass_ == "fwd":
        return lambda inp: fn(inp.cos, inp.labels)
    if op == "loss":
        return lambda inp: torch.autograd.grad(fn(inp.cos, inp.labels), inp.cos)
    return lambda inp: torch.autograd.grad(fn(inp.cos, inp.labels), inp.cos, inp.grad_out)


@dataclass
class Measurement:
    op: str
    pass_: str
    B: int
    C: int
    dtype: str
    preset: str
    provider: str
    status: str  # "ok", "unavailable", "skipped" (a budget was spent) or "error"
    reason: str | None = None
    median_ms: float | None = None
    iqr_ms: float | None = None
    runs: int | None = None
    samples: int | None = None  # timed blocks (CPU) or events (CUDA) the median and IQR are over
    peak_extra_bytes: int | None = None
    peak_extra_bxc: float | None = None
    compile_s: float | None = None
    bytes_moved: int | None = None
    bandwidth_gbs: float | None = None
    copy_fraction: float | None = None

    def key(self) -> tuple:
        return (self.op, self.pass_, self.B, self.C, self.dtype, self.preset)

    def as_json(self) -> dict:
        data = asdict(self)
        data["pass"] = data.pop("pass_")
        return data


def copy_time_cuda(inputs: list, min_run_time: float) -> tuple[float, float, int, int]:
    """The time of a device-to-device copy of the cosines (2 passes over B x C)."""
    destination = torch.empty_like(inputs[0].cos)

    def step(inp):
        destination.copy_(inp.cos.detach())

    return harness.time_cuda(step, inputs, min_run_time)


def cuda_input_sets(case: Case) -> int:
    """Enough input sets that two calls in a row never find the data in L2 (at least 2)."""
    element_bytes = torch.tensor([], dtype=DTYPES[case.dtype]).element_size()
    return harness.l2_rotation_sets(case.B * case.C * element_bytes)


def measure_provider(
    provider: str,
    case: Case,
    inputs: list,
    settings: dict,
    copy_ms: float | None,
    spent: dict,
) -> list[Measurement]:
    """Both passes of one provider on one configuration; ``spent["compile_s"]`` adds up compiles."""
    device = settings["device"]
    base = dict(
        op=case.op, B=case.B, C=case.C, dtype=case.dtype, preset=case.preset, provider=provider
    )
    budget = settings["compile_budget_s"]
    if provider == "compiled" and budget is not None and spent["compile_s"] > budget:
        reason = f"compile budget of {budget:.0f} s spent"
        return [
            Measurement(pass_=pass_, status="skipped", reason=reason, **base)
            for pass_ in settings["passes"]
        ]
    try:
        fn = make_provider(provider, case.op, case.preset, device)
    except Unavailable as why:
        return [
            Measurement(pass_=pass_, status="unavailable", reason=str(why), **base)
            for pass_ in settings["passes"]
        ]
    compile_s = None
    if provider == "compiled":
        # Compile forward and backward graphs outside the timing.
        start = time.perf_counter()
        try:
            make_step(fn, case.op, "fwd+bwd")(inputs[0])
            if device == "cuda":
                torch.cuda.synchronize()
        except Exception as error:  # a compiler missing or failing is a result, not a crash
            reason = f"torch.compile failed: {type(error).__name__}: {str(error).splitlines()[0]}"
            return [
                Measurement(pass_=pass_, status="error", reason=reason, **base)
                for pass_ in settings["passes"]
            ]
        compile_s = time.perf_counter() - start
        spent["compile_s"] += compile_s

    element_bytes = inputs[0].cos.element_size()
    bxc_bytes = case.B * case.C * element_bytes
    results = []
    for pass_ in settings["passes"]:
        step = make_step(fn, case.op, pass_)
        try:
            if device == "cuda":
                median, iqr, runs, samples = harness.time_cuda(
                    step, inputs, settings["min_run_time"]
                )
                peak = harness.peak_extra_cuda(step, inputs[0])
            else:
                median, iqr, runs, samples = harness.time_cpu(
                    step, inputs, settings["threads"], settings["min_run_time"]
                )
                peak = harness.peak_extra_cpu(step, inputs[0])
        except Exception as error:  # e.g. out of memory at the largest C: record it and go on
            if device == "cuda":
                torch.cuda.empty_cache()
            reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            results.append(Measurement(pass_=pass_, status="error", reason=reason, **base))
            continue
        measurement = Measurement(
            pass_=pass_,
            status="ok",
            median_ms=median,
            iqr_ms=iqr,
            runs=runs,
            samples=samples,
            peak_extra_bytes=peak,
            peak_extra_bxc=peak / bxc_bytes,
            compile_s=compile_s,
            **base,
        )
        if device == "cuda":
            moved = IDEAL_PASSES[(case.op, pass_)] * bxc_bytes
            measurement.bytes_moved = moved
            measurement.bandwidth_gbs = moved / (median * 1e-3) / 1e9
            if copy_ms:
                copy_gbs = 2 * bxc_bytes / (copy_ms * 1e-3) / 1e9
                measurement.copy_fraction = measurement.bandwidth_gbs / copy_gbs
        results.append(measurement)
    return results
