"""Benchmark of the margin ops: the fused kernel side by side with its baselines (docs/design.md, Benchmarks).

For ``margin_cross_entropy`` ("loss") and ``margin_logits`` ("logits"), forward ("fwd") and
forward+backward ("fwd+bwd"), over a grid of B, C, dtypes and margin presets, one run on one machine
times these providers:

- ``fused``: ``angular.ops`` served by the compiled extension (``angular._C``), what users call. When
  the extension has no kernel for the device it is recorded as unavailable, with the reason.
- ``reference``: ``angular.ops.reference`` (the best eager formulation: the margin on the B target
  entries only, then ``F.cross_entropy``).
- ``insightface``: the eager formulation of insightface's arcface_torch and of the original repository
  (``acos``/``cos`` over the whole B x C matrix and a one-hot mask), see ``formulations.py``.
- ``compiled``: ``torch.compile`` of the reference, compiled once per configuration outside the timing
  (the compile time is reported on its own).

Timing: CPU, ``torch.utils.benchmark.Timer.blocked_autorange`` medians at the stated thread count;
CUDA, CUDA events around each call, after warm-up, rotating over several pre-made input sets (enough
that L2 cannot hold them), median over the repeats. "fwd" is the training forward (``cos`` requires
grad, so autograd saves what backward needs); "fwd+bwd" adds ``torch.autograd.grad`` of the loss (of
the logits against a fixed random upstream gradient).

Memory: peak bytes allocated during one call beyond the inputs (the returned gradient included).
CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was allocated
before the call. CPU: the torch profiler's memory events (``profile_memory=True``): the peak of the
running sum of allocation and free events during the call.

Bandwidth (CUDA only): the bytes an ideal kernel must move, divided by the time: loss fwd 1 pass over
B x C (read cos), loss fwd+bwd 3 (read cos twice, write the gradient), logits fwd 2 (read, write),
logits fwd+bwd 5 (fwd, then read the upstream gradient and cos, write the gradient); compared with a
device-to-device copy (``dst.copy_(src)``, 2 passes) of the same B x C tensor measured in the same run.

Writes ``OUT/bench_margin.json`` (machine, settings, every measurement), ``OUT/bench_margin.md``
(headline targets, then times and speed-ups per configuration) and ``OUT/speedup.png``.

SphereFace is run with ``lam = 0`` (no annealing weight) in every provider: ``lam`` adds one
multiply-add on B entries and does not change the cost.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# Run from a checkout without installing: the repository root (for ``angular``) and this folder (for
# ``formulations``) go on the path.
_HERE = Path(__file__).resolve().parent
for _path in (str(_HERE.parent), str(_HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import formulations  # noqa: E402
import torch  # noqa: E402

from angular import ops  # noqa: E402
from angular.nn.heads import MarginSpec  # noqa: E402
from angular.ops import _extension, reference  # noqa: E402

PROVIDERS = ("fused", "reference", "insightface", "compiled")
BASELINES = ("reference", "insightface", "compiled")
COLORS = dict(zip(PROVIDERS, ("C0", "C1", "C2", "C3")))  # one colour per provider in both panels
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
# Passes over B x C that an ideal implementation moves, for the bandwidth figures (module doc).
IDEAL_PASSES = {
    ("loss", "fwd"): 1,
    ("loss", "fwd+bwd"): 3,
    ("logits", "fwd"): 2,
    ("logits", "fwd+bwd"): 5,
}

DEFAULT_GRID = {
    "cpu": dict(B=(128, 256, 512), C=(8192, 32768, 100000), dtypes=("fp32", "bf16")),
    "cuda": dict(
        B=(128, 256, 512), C=(8192, 32768, 100000, 1000000), dtypes=("fp32", "bf16", "fp16")
    ),
}
# Class counts of real face data sets that are no multiple of a 16-byte pack (MS1MV2: 85,742,
# Glint360K: 360,232), added to the default CUDA grid (ArcFace) so that rows off the 16-byte
# alignment sit beside the powers of two.
ODD_GRID = {"cuda": dict(B=(128, 512), C=(85742, 360232), dtypes=("fp32", "bf16"))}
# The shape where every preset runs in the default grid (elsewhere only ArcFace), and where the
# issue's targets are set.
FOCUS_SHAPE = {"cpu": (256, 32768), "cuda": (512, 100000)}
QUICK_GRID = dict(B=(256,), C=(8192, 32768), dtypes=("fp32",), presets=("arcface",), ops=("loss",))
# The default CUDA grid has to fit the few minutes of the GPU check script: it stops starting new
# configurations after the time budget, and stops compiling (``compiled`` then recorded as skipped)
# after the compile budget, so the eager providers still cover the grid.
DEFAULT_CUDA_TIME_BUDGET_S = 200.0
DEFAULT_CUDA_COMPILE_BUDGET_S = 90.0

CPU_TARGETS = {"reference": 3.0, "insightface": 8.0, "compiled": 1.5}
CPU_MEMORY_TARGET_BXC = 1.0
GPU_TARGETS = {"reference": 5.0, "compiled": 1.5}
GPU_COPY_FRACTION_TARGET = 0.8
# Per-row vectors (B entries) ride on top of the one B x C gradient; allow them 1%.
MEMORY_SLACK = 1.01


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


# --------------------------------------------------------------------------------------------------
# Command line.


def _int_list(name: str):
    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(item) for item in text.split(",") if item.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{name} must be a comma-separated list of integers, got {text!r}"
            ) from None
        if not values or min(values) < 1:
            raise argparse.ArgumentTypeError(f"{name} values must be >= 1, got {text!r}")
        return values

    return parse


def _choice_list(name: str, choices):
    def parse(text: str) -> tuple[str, ...]:
        values = tuple(item.strip() for item in text.split(",") if item.strip())
        unknown = [value for value in values if value not in choices]
        if not values or unknown:
            raise argparse.ArgumentTypeError(
                f"{name}: unknown {unknown or text!r}; choose from {', '.join(choices)}"
            )
        return values

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench_margin.py",
        description="Time the fused margin ops against the eager reference, the insightface "
        "formulation and torch.compile, forward and forward+backward, over a grid of B, C, dtypes "
        "and presets. Writes OUT/bench_margin.json, OUT/bench_margin.md and OUT/speedup.png.",
        epilog="Default grid: ArcFace over every B x C x dtype x op; the other presets only at "
        "B=256, C=32768 (CPU) or B=512, C=100000 (CUDA). Giving --presets (or --full) runs the whole "
        "cross product of the lists.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small grid for a smoke run (B=256, C=8192,32768, fp32, arcface, loss, all providers)",
    )
    parser.add_argument("--full", action="store_true", help="every preset at every B and C")
    parser.add_argument(
        "--adaptive",
        action="store_true",
        help="instead of the grid: per-row margins and negative modulation against the scalar "
        "fused op and the heads' published eager forwards (CPU, loss fwd+bwd, fp32, B=256, "
        "C=32768 unless --B/--C say otherwise); writes OUT/bench_adaptive.{json,md}",
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="default: cuda if available, else cpu",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (default: torch.get_num_threads()); stated in the output",
    )
    parser.add_argument(
        "--B", type=_int_list("--B"), default=None, help="batch sizes, e.g. 128,256"
    )
    parser.add_argument("--C", type=_int_list("--C"), default=None, help="class counts, e.g. 8192")
    parser.add_argument(
        "--dtypes", type=_choice_list("--dtypes", tuple(DTYPES)), default=None, help="fp32,bf16,..."
    )
    parser.add_argument(
        "--presets",
        type=_choice_list("--presets", tuple(PRESETS)),
        default=None,
        help=", ".join(PRESETS),
    )
    parser.add_argument(
        "--ops",
        type=_choice_list("--ops", OPS),
        default=None,
        help="loss (margin_cross_entropy), logits (margin_logits)",
    )
    parser.add_argument(
        "--passes", type=_choice_list("--passes", PASSES), default=PASSES, help="fwd, fwd+bwd"
    )
    parser.add_argument(
        "--providers",
        type=_choice_list("--providers", PROVIDERS),
        default=PROVIDERS,
        help=", ".join(PROVIDERS),
    )
    parser.add_argument(
        "--min-run-time",
        type=float,
        default=None,
        help="seconds of timed runs per measurement (default 1.0, 0.2 with --quick)",
    )
    parser.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="stop starting new configurations after this many seconds (recorded as not run); "
        f"default: {DEFAULT_CUDA_TIME_BUDGET_S:.0f} s for the default CUDA grid, none otherwise",
    )
    parser.add_argument(
        "--compile-budget",
        type=float,
        default=None,
        help="stop compiling after this many seconds of torch.compile (the compiled provider is then "
        f"recorded as skipped); default: {DEFAULT_CUDA_COMPILE_BUDGET_S:.0f} s for the default CUDA "
        "grid, none otherwise",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument(
        "--out",
        type=Path,
        default=_HERE / "results",
        help="output folder (default: benchmarks/results/)",
    )
    return parser


def resolve_settings(args: argparse.Namespace) -> dict:
    """Fill in the defaults that depend on the device; check what argparse cannot."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "--device cuda: no CUDA device is available (torch.cuda.is_available() is False)"
        )
    threads = args.threads if args.threads is not None else torch.get_num_threads()
    if threads < 1:
        raise SystemExit(f"--threads must be >= 1, got {threads}")
    if args.min_run_time is not None and args.min_run_time <= 0:
        raise SystemExit(f"--min-run-time must be > 0, got {args.min_run_time}")
    base = dict(QUICK_GRID) if args.quick else dict(DEFAULT_GRID[device], presets=None, ops=OPS)
    explicit = {
        name: getattr(args, name)
        for name in ("B", "C", "dtypes", "presets", "ops")
        if getattr(args, name) is not None
    }
    grid = {**base, **explicit}
    is_default_grid = not args.quick and not explicit and not args.full
    if is_default_grid and device in ODD_GRID:
        grid["extra"] = ODD_GRID[device]
    if grid["presets"] is None and args.full:
        grid["presets"] = tuple(PRESETS)
    time_budget = args.time_budget
    if time_budget is None and device == "cuda" and is_default_grid:
        time_budget = DEFAULT_CUDA_TIME_BUDGET_S
    compile_budget = args.compile_budget
    if compile_budget is None and device == "cuda" and is_default_grid:
        compile_budget = DEFAULT_CUDA_COMPILE_BUDGET_S
    min_run_time = args.min_run_time
    if min_run_time is None:
        # CUDA calls are short and timed one by one: 0.1 s already gives hundreds of samples.
        min_run_time = 0.1 if device == "cuda" else (0.2 if args.quick else 1.0)
    return dict(
        device=device,
        threads=threads,
        grid=grid,
        passes=args.passes,
        providers=args.providers,
        min_run_time=min_run_time,
        time_budget_s=time_budget,
        compile_budget_s=compile_budget,
        seed=args.seed,
        out=args.out,
        quick=args.quick,
    )


def build_cases(grid: dict, device: str) -> list[Case]:
    """Configurations in run order: the focus shape first (so a time budget keeps what matters)."""
    presets = grid["presets"]
    focus = FOCUS_SHAPE[device]
    cases = []
    for op, batch, classes, dtype in itertools.product(
        grid["ops"], grid["B"], grid["C"], grid["dtypes"]
    ):
        if presets is not None:
            chosen = presets
        elif (batch, classes) == focus:
            chosen = tuple(PRESETS)
        else:
            chosen = ("arcface",)
        cases.extend(Case(op, batch, classes, dtype, preset) for preset in chosen)
    extra = grid.get("extra")
    if extra:
        cases.extend(
            Case(op, batch, classes, dtype, "arcface")
            for op, batch, classes, dtype in itertools.product(
                grid["ops"], extra["B"], extra["C"], extra["dtypes"]
            )
            if Case(op, batch, classes, dtype, "arcface") not in cases
        )
    dtype_order = list(DTYPES)
    return sorted(
        cases,
        key=lambda case: (
            (case.B, case.C) != focus,
            OPS.index(case.op),
            dtype_order.index(case.dtype),
            case.C,
            case.B,
        ),
    )


# --------------------------------------------------------------------------------------------------
# Providers: each returns fn(cos, labels) -> loss (mean) or logits.


def margin_params(preset: str) -> dict:
    spec = PRESETS[preset]
    return dict(s=spec.s, m1=spec.m1, m2=spec.m2, m3=spec.m3)


def fused_unavailable_reason(device: str) -> str | None:
    loaded, reason = _extension.load()
    if not loaded:
        return reason
    if not _extension.has_kernel(device):
        return f"the extension angular._C has no kernel for {device} tensors"
    return None


def make_provider(provider: str, op: str, preset: str, device: str):
    """The callable a provider times for one op and preset (``compiled`` is compiled lazily, on its
    first call). Raises :class:`Unavailable` when the provider cannot run here."""
    params = margin_params(preset)
    if provider == "fused":
        reason = fused_unavailable_reason(device)
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


@dataclass
class Inputs:
    cos: torch.Tensor
    labels: torch.Tensor
    grad_out: torch.Tensor | None


def make_inputs(case: Case, device: str, count: int, generator: torch.Generator) -> list[Inputs]:
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


def make_step(fn, op: str, pass_: str):
    if pass_ == "fwd":
        return lambda inp: fn(inp.cos, inp.labels)
    if op == "loss":
        return lambda inp: torch.autograd.grad(fn(inp.cos, inp.labels), inp.cos)
    return lambda inp: torch.autograd.grad(fn(inp.cos, inp.labels), inp.cos, inp.grad_out)


# --------------------------------------------------------------------------------------------------
# Timing and memory.


def time_cpu(
    step, inputs: list[Inputs], threads: int, min_run_time: float
) -> tuple[float, float, int, int]:
    from torch.utils import benchmark

    timer = benchmark.Timer(
        stmt="step(inp)", globals={"step": step, "inp": inputs[0]}, num_threads=threads
    )
    measured = timer.blocked_autorange(min_run_time=min_run_time)
    runs = len(measured.times) * measured.number_per_run
    return measured.median * 1e3, measured.iqr * 1e3, runs, len(measured.times)


def _quantiles(times: list[float]) -> tuple[float, float]:
    if len(times) < 2:
        return times[0], 0.0
    q1, _, q3 = statistics.quantiles(times, n=4)
    return statistics.median(times), q3 - q1


def time_cuda(step, inputs: list[Inputs], min_run_time: float) -> tuple[float, float, int, int]:
    # Warm-up: every input set once, then enough calls to estimate the repeat count.
    for inp in inputs:
        step(inp)
    torch.cuda.synchronize()
    start = time.perf_counter()
    warm_calls = 0
    while warm_calls < 3 or time.perf_counter() - start < 0.05:
        step(inputs[warm_calls % len(inputs)])
        warm_calls += 1
        torch.cuda.synchronize()
    per_call = (time.perf_counter() - start) / warm_calls
    repeats = int(min(1000, max(10, min_run_time / max(per_call, 1e-6))))
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(repeats)
    ]
    for index, (begin, end) in enumerate(events):
        inp = inputs[index % len(inputs)]
        begin.record()
        step(inp)
        end.record()
    torch.cuda.synchronize()
    median, iqr = _quantiles([begin.elapsed_time(end) for begin, end in events])
    return median, iqr, repeats, repeats


def peak_extra_cuda(step, inp: Inputs) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step(inp)
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - before)


def peak_extra_cpu(step, inp: Inputs) -> int:
    """Peak of the running sum of the profiler's CPU allocation/free events during one call."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(inp)
    with tempfile.TemporaryDirectory() as folder:
        trace_path = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(trace_path)
        with open(trace_path) as handle:
            events = json.load(handle)["traceEvents"]
    memory = [
        event
        for event in events
        if event.get("name") == "[memory]" and event.get("args", {}).get("Device Type") == 0
    ]
    running = peak = 0
    for event in sorted(memory, key=lambda event: event["ts"]):
        running += event["args"]["Bytes"]
        peak = max(peak, running)
    return int(peak)


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2: the profiler's C++ side logs each start and stop there."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def copy_time_cuda(inputs: list[Inputs], min_run_time: float) -> tuple[float, float, int, int]:
    destination = torch.empty_like(inputs[0].cos)

    def step(inp):
        destination.copy_(inp.cos.detach())

    return time_cuda(step, inputs, min_run_time)


def cuda_input_sets(case: Case) -> int:
    """Enough input sets that two calls in a row never find the data in L2 (at least 2)."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    l2_bytes = getattr(props, "L2_cache_size", 50 * 2**20)
    set_bytes = case.B * case.C * torch.tensor([], dtype=DTYPES[case.dtype]).element_size()
    return int(min(64, max(2, math.ceil(4 * l2_bytes / set_bytes))))


# --------------------------------------------------------------------------------------------------
# The run.


# What the margin-op figures depend on (uncommitted changes to these are named in the output).
MARGIN_SOURCES = (
    "csrc",
    "setup.py",
    "angular/ops",
    "benchmarks",
)


def source_state() -> dict:
    """The git commit, and the uncommitted changes to the sources the figures depend on."""

    def git(*args: str) -> str:
        completed = subprocess.run(
            ["git", *args], cwd=_HERE.parent, capture_output=True, text=True, timeout=30
        )
        return completed.stdout.rstrip() if completed.returncode == 0 else ""

    try:
        commit = git("rev-parse", "--short", "HEAD") or None
        changed = git("status", "--porcelain", "--", *MARGIN_SOURCES)
    except (OSError, subprocess.SubprocessError):
        return dict(git_commit=None, uncommitted_sources=[])
    return dict(
        git_commit=commit,
        uncommitted_sources=[line[3:] for line in changed.splitlines() if line.strip()],
    )


def machine_description(device: str, threads: int) -> dict:
    cpu_model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    loaded, reason = _extension.load()
    description = dict(
        cpu_model=cpu_model,
        cpu_count=os.cpu_count(),
        threads=threads,
        device=device,
        gpu_name=torch.cuda.get_device_name() if device == "cuda" else None,
        torch_version=torch.__version__,
        cuda_version=torch.version.cuda,
        python_version=platform.python_version(),
        angular_backend=ops.backend(),
        angular_extension_loaded=loaded,
        angular_extension_reason=reason or None,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        # Other processes on the machine make timings noisy; the load says how busy it was.
        load_average_1min=os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        **source_state(),
    )
    return description


def measure_provider(
    provider: str,
    case: Case,
    inputs: list[Inputs],
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
                median, iqr, runs, samples = time_cuda(step, inputs, settings["min_run_time"])
                peak = peak_extra_cuda(step, inputs[0])
            else:
                median, iqr, runs, samples = time_cpu(
                    step, inputs, settings["threads"], settings["min_run_time"]
                )
                peak = peak_extra_cpu(step, inputs[0])
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


def run_benchmark(settings: dict, argv: list[str], on_progress=None) -> dict:
    """Runs the grid; ``on_progress(result)`` gets the result so far after each configuration
    (``complete`` False, the configurations still to run in ``not_run``)."""
    device = settings["device"]
    torch.set_num_threads(settings["threads"])
    cases = build_cases(settings["grid"], device)
    generator = torch.Generator(device=device).manual_seed(settings["seed"])
    machine = machine_description(device, settings["threads"])
    fused_reason = fused_unavailable_reason(device) if "fused" in settings["providers"] else None
    print(
        f"bench_margin: {len(cases)} configurations x {len(settings['passes'])} passes x "
        f"{len(settings['providers'])} providers on {device} "
        f"({machine['gpu_name'] or machine['cpu_model']}, {settings['threads']} threads); "
        f"angular backend: {machine['angular_backend']}"
    )
    if fused_reason:
        print(f"bench_margin: fused provider unavailable: {fused_reason}")

    measurements: list[Measurement] = []
    copies = []
    not_run: list[Case] = []
    spent = dict(compile_s=0.0)
    start = time.perf_counter()
    settings_json = {
        key: (str(value) if isinstance(value, Path) else value) for key, value in settings.items()
    }
    providers = {}
    for provider in settings["providers"]:
        available = not (provider == "fused" and fused_reason)
        providers[provider] = dict(available=available, reason=None if available else fused_reason)

    def result_so_far(not_run: list[Case], complete: bool) -> dict:
        return dict(
            benchmark="bench_margin",
            schema_version=1,
            complete=complete,
            machine=machine,
            settings=dict(
                settings_json,
                timing=(
                    "CUDA events per call after warm-up, rotating input sets, median over repeats"
                    if device == "cuda"
                    else "torch.utils.benchmark.Timer.blocked_autorange median"
                ),
                memory=(
                    "torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus the inputs"
                    if device == "cuda"
                    else "torch profiler memory events (profile_memory=True): peak of the running sum"
                ),
                fwd="training forward: cos requires grad",
                lam="0 for every preset (SphereFace without its annealing weight)",
                argv=argv,
            ),
            providers=providers,
            copy=copies,
            measurements=[measurement.as_json() for measurement in measurements],
            not_run=[asdict(case) for case in not_run],
            compile_total_s=spent["compile_s"],
            elapsed_s=time.perf_counter() - start,
        )

    for index, case in enumerate(cases):
        elapsed = time.perf_counter() - start
        if settings["time_budget_s"] is not None and elapsed > settings["time_budget_s"]:
            not_run = cases[index:]
            print(
                f"bench_margin: time budget of {settings['time_budget_s']:.0f} s spent; "
                f"{len(not_run)} configurations not run"
            )
            break
        count = cuda_input_sets(case) if device == "cuda" else 1
        try:
            inputs = make_inputs(case, device, count, generator)
        except torch.OutOfMemoryError as error:
            torch.cuda.empty_cache()
            reason = f"OutOfMemoryError creating inputs: {str(error).splitlines()[0]}"
            for provider, pass_ in itertools.product(settings["providers"], settings["passes"]):
                measurements.append(
                    Measurement(
                        case.op,
                        pass_,
                        case.B,
                        case.C,
                        case.dtype,
                        case.preset,
                        provider,
                        "error",
                        reason,
                    )
                )
            continue
        copy_ms = None
        if device == "cuda":
            copy_ms, copy_iqr, copy_runs, _ = copy_time_cuda(inputs, settings["min_run_time"])
            bxc_bytes = case.B * case.C * inputs[0].cos.element_size()
            copies.append(
                dict(
                    B=case.B,
                    C=case.C,
                    dtype=case.dtype,
                    median_ms=copy_ms,
                    iqr_ms=copy_iqr,
                    runs=copy_runs,
                    bandwidth_gbs=2 * bxc_bytes / (copy_ms * 1e-3) / 1e9,
                )
            )
        row = []
        for provider in settings["providers"]:
            results = measure_provider(provider, case, inputs, settings, copy_ms, spent)
            measurements.extend(results)
            for result in results:
                if result.status == "ok":
                    row.append(f"{provider} {result.pass_} {result.median_ms:.3g} ms")
        del inputs
        print(
            f"[{index + 1}/{len(cases)} {time.perf_counter() - start:.0f} s] {case.op} "
            f"B={case.B} C={case.C} {case.dtype} {case.preset}: " + ", ".join(row),
            flush=True,
        )
        if on_progress is not None:  # a run cut short (a timeout) keeps what it measured
            on_progress(result_so_far(cases[index + 1 :], complete=False))
    return result_so_far(not_run, complete=True)


# --------------------------------------------------------------------------------------------------
# Reports.


def index_measurements(result: dict) -> dict:
    """``{(op, pass, B, C, dtype, preset): {provider: measurement}}``."""
    table: dict = {}
    for entry in result["measurements"]:
        key = (entry["op"], entry["pass"], entry["B"], entry["C"], entry["dtype"], entry["preset"])
        table.setdefault(key, {})[entry["provider"]] = entry
    return table


def speedup(row: dict, baseline: str) -> float | None:
    fused, other = row.get("fused"), row.get(baseline)
    if not fused or not other or fused["status"] != "ok" or other["status"] != "ok":
        return None
    return other["median_ms"] / fused["median_ms"]


def headline(result: dict) -> dict:
    """The issue's targets, checked against the run (``status`` says when they cannot be)."""
    machine, device = result["machine"], result["machine"]["device"]
    table = index_measurements(result)
    batch, classes = FOCUS_SHAPE[device]
    dtypes = ("fp32",) if device == "cpu" else ("fp32", "bf16", "fp16")
    rows = []
    for dtype in dtypes:
        row = table.get(("loss", "fwd+bwd", batch, classes, dtype, "arcface"))
        if row is None:
            continue
        checks = []
        targets = CPU_TARGETS if device == "cpu" else GPU_TARGETS
        for baseline, target in targets.items():
            value = speedup(row, baseline)
            checks.append(
                dict(
                    target=f"fused >= {target:g}x {baseline}",
                    value=value,
                    shown=None if value is None else f"{value:.2f}x",
                    met=None if value is None else value >= target,
                )
            )
        fused = row.get("fused")
        fused_ok = fused is not None and fused["status"] == "ok"
        if device == "cpu":
            value = fused["peak_extra_bxc"] if fused_ok else None
            checks.append(
                dict(
                    target=f"fused extra memory <= {CPU_MEMORY_TARGET_BXC:g} B x C buffer",
                    value=value,
                    shown=None
                    if value is None
                    else f"{value:.2f} B x C ({fused['peak_extra_bytes'] / 2**20:.1f} MiB)",
                    met=None if value is None else value <= CPU_MEMORY_TARGET_BXC * MEMORY_SLACK,
                )
            )
        else:
            value = fused.get("copy_fraction") if fused_ok else None
            checks.append(
                dict(
                    target=f"fused >= {GPU_COPY_FRACTION_TARGET:.0%} of copy bandwidth",
                    value=value,
                    shown=None
                    if value is None
                    else f"{value:.0%} ({fused['bandwidth_gbs']:.0f} GB/s)",
                    met=None if value is None else value >= GPU_COPY_FRACTION_TARGET,
                )
            )
        rows.append(dict(dtype=dtype, checks=checks))
    threads = machine["threads"]
    title = (
        f"CPU, {_threads(threads)}, B={batch}, C={classes}, fp32, loss forward+backward (ArcFace)"
        if device == "cpu"
        else f"GPU ({machine['gpu_name']}), B={batch}, C={classes}, loss forward+backward (ArcFace)"
    )
    note = None
    if device == "cpu" and threads != 2:
        note = f"the CPU targets are set for 2 threads; this run used {threads}"
    return dict(title=title, rows=rows, note=note)


def _threads(count: int) -> str:
    return f"{count} thread" + ("" if count == 1 else "s")


def _ms(entry: dict | None) -> str:
    if entry is None:
        return "-"
    if entry["status"] != "ok":
        return entry["status"]
    if entry["samples"] < 4:  # too few samples for an interquartile range
        return f"{entry['median_ms']:.3g} (n={entry['samples']})"
    return f"{entry['median_ms']:.3g} ±{entry['iqr_ms']:.2g}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _bxc(entry: dict | None) -> str:
    if entry is None or entry["status"] != "ok":
        return "-"
    return f"{entry['peak_extra_bxc']:.2f}"


def machine_line(machine: dict) -> str:
    """One markdown bullet describing the machine (shared with bench_training)."""
    load = machine.get("load_average_1min")
    return (
        f"- Machine: {machine['cpu_model']} ({machine['cpu_count']} logical CPUs), "
        f"{_threads(machine['threads'])}"
        + (f", GPU {machine['gpu_name']}" if machine["gpu_name"] else "")
        + f"; torch {machine['torch_version']}; angular backend `{machine['angular_backend']}`"
        + ("" if load is None else f"; 1-min load average at start {load:.2f}")
        + (f"; commit {machine['git_commit']}" if machine.get("git_commit") else "")
        + (
            f" with uncommitted changes to {', '.join(machine['uncommitted_sources'])}"
            if machine.get("uncommitted_sources")
            else ""
        )
    )


def render_markdown(result: dict) -> str:
    machine, settings = result["machine"], result["settings"]
    providers = [name for name in PROVIDERS if name in result["providers"]]
    fused_available = result["providers"].get("fused", {}).get("available", False)
    shown = [name for name in providers if name != "fused" or fused_available]
    baselines = [name for name in BASELINES if name in providers]
    device = machine["device"]
    lines = [
        "## Margin ops: fused vs baselines",
        "",
        machine_line(machine),
        f"- Date: {machine['date']}; command: "
        f"`{' '.join(['python benchmarks/bench_margin.py', *settings['argv']])}`",
        f"- Timing: {settings['timing']}; times are median ms ±IQR. Memory: {settings['memory']}, "
        "in B x C buffers of the input dtype (the returned gradient or logits included).",
        "- fwd = training forward (cos requires grad); fwd+bwd adds the gradient. SphereFace runs "
        "with lam = 0. compile s = first forward+backward call of the compiled provider (inductor's "
        "on-disk caches, when warm, shorten it).",
    ]
    if not fused_available and "fused" in result["providers"]:
        lines.append(
            f"- **fused provider unavailable**: {result['providers']['fused']['reason']}. "
            "Its columns are left out; rerun once the extension is built."
        )
    if not result.get("complete", True):
        lines.append(
            f"- **Partial results** (written after each configuration): "
            f"{len(result['not_run'])} configurations still to run."
        )
    elif result["not_run"]:
        lines.append(
            f"- {len(result['not_run'])} configurations not run (time budget of "
            f"{settings['time_budget_s']:.0f} s spent)."
        )
    skipped = [m for m in result["measurements"] if m["status"] == "skipped"]
    if skipped:
        configurations = {tuple(m[k] for k in ("op", "B", "C", "dtype", "preset")) for m in skipped}
        lines.append(
            f"- compiled provider skipped in {len(configurations)} configuration(s) "
            f"({skipped[0]['reason']})."
        )
    head = headline(result)
    lines += ["", f"### Headline: {head['title']}", ""]
    if head["note"]:
        lines += [f"Note: {head['note']}.", ""]
    if not head["rows"]:
        lines.append("This configuration is not in this run.")
    elif not fused_available:
        lines.append("Targets not checked: the fused provider was unavailable in this run.")
    else:
        lines += ["| dtype | target | measured | status |", "|---|---|---|---|"]
        for row in head["rows"]:
            for check in row["checks"]:
                status = (
                    "n/a" if check["met"] is None else ("met" if check["met"] else "**missed**")
                )
                lines.append(
                    f"| {row['dtype']} | {check['target']} | {check['shown'] or '-'} | {status} |"
                )
    table = index_measurements(result)

    header = ["op", "pass", "B", "C", "dtype", "preset"]
    header += [f"{name} ms" for name in shown]
    if "compiled" in providers:
        header.append("compile s")
    if fused_available:
        header += [f"{name}/fused" for name in baselines]
    header += [f"{name} mem" for name in shown]
    if device == "cuda":
        header += [f"{name} % copy" for name in shown]
    lines += [
        "",
        "### All configurations",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for key in sorted(
        table, key=lambda k: (OPS.index(k[0]), PASSES.index(k[1]), k[5], k[4], k[2], k[3])
    ):
        row = table[key]
        cells = [key[0], key[1], str(key[2]), str(key[3]), key[4], key[5]]
        cells += [_ms(row.get(name)) for name in shown]
        if "compiled" in providers:
            compiled = row.get("compiled")
            cells.append(
                f"{compiled['compile_s']:.1f}" if compiled and compiled.get("compile_s") else "-"
            )
        if fused_available:
            cells += [_ratio(speedup(row, name)) for name in baselines]
        cells += [_bxc(row.get(name)) for name in shown]
        if device == "cuda":
            cells += [
                f"{row[name]['copy_fraction']:.0%}"
                if row.get(name) and row[name].get("copy_fraction")
                else "-"
                for name in shown
            ]
        lines.append("| " + " | ".join(cells) + " |")
    if result["copy"]:
        lines += [
            "",
            "Device-to-device copy of the same B x C tensor (2 passes):",
            "",
            "| B | C | dtype | ms | GB/s |",
            "|---|---|---|---|---|",
        ]
        for copy in result["copy"]:
            lines.append(
                f"| {copy['B']} | {copy['C']} | {copy['dtype']} | {copy['median_ms']:.3g} | "
                f"{copy['bandwidth_gbs']:.0f} |"
            )
    errors = [m for m in result["measurements"] if m["status"] == "error"]
    if errors:
        lines += ["", "Errors:", ""]
        lines += [
            f"- {m['provider']} {m['op']} {m['pass']} B={m['B']} C={m['C']} {m['dtype']} "
            f"{m['preset']}: {m['reason']}"
            for m in errors
        ]
    return "\n".join(lines) + "\n"


def render_chart(result: dict, path: Path) -> None:
    """Left: time by C per provider; right: speed-up of fused over each baseline by C."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    device = result["machine"]["device"]
    table = index_measurements(result)
    keys = [k for k in table if k[0] == "loss" and k[1] == "fwd+bwd" and k[5] == "arcface"]
    if not keys:
        keys = list(table)
    if not keys:
        return
    op, pass_, preset = keys[0][0], keys[0][1], keys[0][5]
    dtype = "fp32" if any(k[4] == "fp32" for k in keys) else keys[0][4]
    focus_batch = FOCUS_SHAPE[device][0]
    batches = sorted({k[2] for k in keys if k[4] == dtype})
    batch = focus_batch if focus_batch in batches else batches[-1]
    classes = sorted({k[3] for k in keys if k[2] == batch and k[4] == dtype})

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for provider in PROVIDERS:
        points = [(c, table[(op, pass_, batch, c, dtype, preset)].get(provider)) for c in classes]
        points = [(c, m["median_ms"]) for c, m in points if m and m["status"] == "ok"]
        if points:
            left.plot(*zip(*points), marker="o", label=provider, color=COLORS[provider])
    left.set(
        xscale="log",
        yscale="log",
        xlabel="C (classes)",
        ylabel="median ms",
        title=f"{op} {pass_}, B={batch}, {dtype}, {preset}",
    )
    left.legend()
    if result["providers"].get("fused", {}).get("available"):
        for baseline in BASELINES:
            points = [
                (c, speedup(table[(op, pass_, batch, c, dtype, preset)], baseline)) for c in classes
            ]
            points = [(c, v) for c, v in points if v is not None]
            if points:
                right.plot(
                    *zip(*points), marker="o", label=f"vs {baseline}", color=COLORS[baseline]
                )
        right.axhline(1.0, color="grey", linewidth=0.8)
        right.set(
            xscale="log",
            xlabel="C (classes)",
            ylabel="speed-up (baseline time / fused time)",
            title="fused speed-up",
        )
        right.set_ylim(bottom=0)
        right.legend()
    else:
        reason = result["providers"].get("fused", {}).get("reason") or "not selected"
        right.text(
            0.5,
            0.5,
            "fused provider unavailable:\n" + _wrap(reason, 50),
            ha="center",
            va="center",
            transform=right.transAxes,
        )
        right.set_axis_off()
    machine = result["machine"]
    figure.suptitle(
        f"{machine['gpu_name'] or machine['cpu_model']}, {_threads(machine['threads'])}, "
        f"torch {machine['torch_version']}, {machine['date'][:10]}",
        fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


# --------------------------------------------------------------------------------------------------
# Per-row margins and negative modulation (docs/design.md, Per-row margins and negative modulation):
# the fused *_rows ops against the scalar fused op and the heads' published eager forwards.

ADAPTIVE_SHAPE = (256, 32768)
ADAPTIVE_SCALE = 64.0
# Ratio targets (BENCHMARKS.md, Per-row margins and negative modulation).
ADAPTIVE_OVERHEAD_TARGET = 1.15  # fused per-row or modulated / fused scalar, at most
ADAPTIVE_EAGER_TARGET = 3.0  # published eager / fused, at least
# name: (what it times, the fused case it is compared with: None for the fused ones).
ADAPTIVE_CASES = {
    "fused scalar (ArcFace)": ("ops.margin_cross_entropy, m2 = 0.5", None),
    "fused per-row (AdaFace)": ("per-row m2 and m3 (B,) tensors, detached", None),
    "fused per-row + grad (MagFace)": ("per-row m2 (B,) requiring grad: d loss / d m2 too", None),
    "fused modulated (CurricularFace)": ("m2 = 0.5, negative_t = t", None),
    "eager AdaFace": ("AdaFace's published forward + F.cross_entropy", "fused per-row (AdaFace)"),
    "eager MagFace": (
        "MagFace's published forward + F.cross_entropy",
        "fused per-row + grad (MagFace)",
    ),
    "eager CurricularFace": (
        "CurricularFace's published forward + F.cross_entropy",
        "fused modulated (CurricularFace)",
    ),
}


def adaptive_step(name: str, batch: int, generator: torch.Generator):
    """``step(inp)``: the forward and backward of one case (gradients of cos and of any margin
    tensor that requires grad), on fp32 inputs."""
    F = torch.nn.functional
    s = ADAPTIVE_SCALE
    norms = 10.0 + 20.0 * torch.rand(batch, generator=generator)
    scaler = torch.clip((norms - 20.0) / (5.0 + 1e-3) * 0.333, -1, 1)
    # AdaFace's per-row parts; the angular one at its magnitude (the op takes m2 >= 0: same work).
    ada_m2, ada_m3 = (0.4 * scaler).abs(), 0.4 + 0.4 * scaler
    mag_margins = (0.45 + 0.35 * torch.rand(batch, generator=generator)).requires_grad_()

    def grads(loss, inp, *extra):
        return torch.autograd.grad(loss, [inp.cos, *extra])

    steps = {
        "fused scalar (ArcFace)": lambda inp: grads(
            ops.margin_cross_entropy(inp.cos, inp.labels, s=s, m2=0.5), inp
        ),
        "fused per-row (AdaFace)": lambda inp: grads(
            ops.margin_cross_entropy(inp.cos, inp.labels, s=s, m2=ada_m2, m3=ada_m3), inp
        ),
        "fused per-row + grad (MagFace)": lambda inp: grads(
            ops.margin_cross_entropy(inp.cos, inp.labels, s=s, m2=mag_margins), inp, mag_margins
        ),
        "fused modulated (CurricularFace)": lambda inp: grads(
            ops.margin_cross_entropy(inp.cos, inp.labels, s=s, m2=0.5, negative_t=0.3), inp
        ),
        "eager AdaFace": lambda inp: grads(
            F.cross_entropy(
                formulations.adaface_logits(
                    inp.cos, inp.labels, norms, batch_mean=20.0, batch_std=5.0, s=s
                ),
                inp.labels,
            ),
            inp,
        ),
        "eager MagFace": lambda inp: grads(
            F.cross_entropy(
                formulations.magface_logits(inp.cos, inp.labels, mag_margins, s=s), inp.labels
            ),
            inp,
            mag_margins,
        ),
        "eager CurricularFace": lambda inp: grads(
            F.cross_entropy(
                formulations.curricularface_logits(inp.cos, inp.labels, t=0.3, s=s), inp.labels
            ),
            inp,
        ),
    }
    return steps[name]


def run_adaptive(settings: dict) -> dict:
    torch.set_num_threads(settings["threads"])
    batch = settings["grid"]["B"][0] if settings.get("explicit_shape") else ADAPTIVE_SHAPE[0]
    classes = settings["grid"]["C"][0] if settings.get("explicit_shape") else ADAPTIVE_SHAPE[1]
    generator = torch.Generator().manual_seed(settings["seed"])
    case = Case("loss", batch, classes, "fp32", "arcface")
    inputs = make_inputs(case, "cpu", 1, generator)
    reason = fused_unavailable_reason("cpu")
    load_before = os.getloadavg()
    rows, steps = {}, {}
    for name, (what, _) in ADAPTIVE_CASES.items():
        if reason is not None and name.startswith("fused"):
            rows[name] = dict(what=what, status="unavailable", reason=reason)
            continue
        steps[name] = adaptive_step(name, batch, generator)
        steps[name](inputs[0])  # warm-up
        rows[name] = dict(what=what, status="ok", times_ms=[])
    # Interleaved rounds in a shuffled order, one call per case each, so that the load of a busy
    # machine falls on every case alike (back-to-back blocks per case would each catch a different
    # load); the eager cases, 50x slower, get fewer rounds.
    order = random.Random(settings["seed"])
    fused_rounds = settings["adaptive_rounds"]
    for round_index in range(fused_rounds):
        names = [
            n for n in steps if n.startswith("fused") or round_index < max(3, fused_rounds // 5)
        ]
        order.shuffle(names)
        for name in names:
            started = time.perf_counter()
            steps[name](inputs[0])
            rows[name]["times_ms"].append((time.perf_counter() - started) * 1e3)
    for name, row in rows.items():
        if row["status"] == "ok":
            times = row["times_ms"]
            row["median_ms"], row["iqr_ms"] = _quantiles(times)
            row["runs"] = len(times)
            print(
                f"bench_margin --adaptive: {name}: {row['median_ms']:.2f} ms ({row['runs']} runs)"
            )
    scalar = rows["fused scalar (ArcFace)"].get("median_ms")
    for name, row in rows.items():
        compared = ADAPTIVE_CASES[name][1]
        if row["status"] != "ok":
            continue
        if compared is None and name != "fused scalar (ArcFace)" and scalar:
            row["vs_fused_scalar"] = row["median_ms"] / scalar
        elif compared is not None and rows[compared].get("median_ms"):
            row["speedup_of_fused"] = row["median_ms"] / rows[compared]["median_ms"]
    return dict(
        benchmark="bench_margin --adaptive",
        machine=machine_description("cpu", settings["threads"]),
        settings=dict(B=batch, C=classes, dtype="fp32", passes="fwd+bwd", s=ADAPTIVE_SCALE,
                      threads=settings["threads"], rounds=fused_rounds, seed=settings["seed"],
                      timing="one call per case per round, rounds interleaved in shuffled order; "
                      "median over rounds"),
        load_average=dict(before=list(load_before), after=list(os.getloadavg())),
        targets=dict(overhead_at_most=ADAPTIVE_OVERHEAD_TARGET, eager_at_least=ADAPTIVE_EAGER_TARGET),
        cases=rows,
    )  # fmt: skip


def render_adaptive_markdown(result: dict) -> str:
    settings, load = result["settings"], result["load_average"]
    lines = [
        f"# Per-row margins and negative modulation: CPU, B = {settings['B']}, C = {settings['C']}, "
        f"fp32, forward + backward, {settings['threads']} threads",
        "",
        f"Load average (1, 5, 15 min) before: {', '.join(f'{v:.2f}' for v in load['before'])}; "
        f"after: {', '.join(f'{v:.2f}' for v in load['after'])}.",
        "",
        "| case | what | median ms | IQR ms | / fused scalar | eager / fused |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in result["cases"].items():
        if row["status"] != "ok":
            lines.append(f"| {name} | {row['what']} | {row['status']}: {row['reason']} | | | |")
            continue
        overhead = row.get("vs_fused_scalar")
        speedup = row.get("speedup_of_fused")
        lines.append(
            f"| {name} | {row['what']} | {row['median_ms']:.2f} | {row['iqr_ms']:.2f} | "
            f"{f'{overhead:.3f}x' if overhead else ''} | {f'{speedup:.1f}x' if speedup else ''} |"
        )
    targets = result["targets"]
    lines += [
        "",
        f"Targets: per-row and modulated at most {targets['overhead_at_most']}x the fused scalar "
        f"time; the published eager heads at least {targets['eager_at_least']}x slower than the "
        "fused op of the same head.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.adaptive and args.device is None:
        args.device = "cpu"
    settings = resolve_settings(args)
    out = Path(settings["out"])
    out.mkdir(parents=True, exist_ok=True)
    if args.adaptive:
        if settings["device"] != "cpu":
            raise SystemExit("--adaptive runs on the CPU (--device cpu)")
        settings["explicit_shape"] = args.B is not None and args.C is not None
        settings["adaptive_rounds"] = 5 if args.quick else 21
        result = run_adaptive(settings)
        markdown = render_adaptive_markdown(result)
        (out / "bench_adaptive.json").write_text(json.dumps(result, indent=1) + "\n")
        (out / "bench_adaptive.md").write_text(markdown)
        print()
        print(markdown)
        return result

    def write(result: dict) -> str:
        # Replaced whole (write, then rename): a run killed mid-write leaves the previous copy.
        markdown = render_markdown(result)
        for name, text in (
            ("bench_margin.json", json.dumps(result, indent=1) + "\n"),
            ("bench_margin.md", markdown),
        ):
            partial = out / f".{name}.partial"
            partial.write_text(text)
            partial.replace(out / name)
        return markdown

    result = run_benchmark(settings, sys.argv[1:] if argv is None else list(argv), write)
    markdown = write(result)
    render_chart(result, out / "speedup.png")
    print()
    print(markdown)
    print(
        f"bench_margin: wrote {out / 'bench_margin.json'}, {out / 'bench_margin.md'}, "
        f"{out / 'speedup.png'} in {result['elapsed_s']:.0f} s"
    )
    return result


if __name__ == "__main__":
    main()
