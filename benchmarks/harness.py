"""What the benchmarks share: timing, memory, the machine, tables and files, command-line pieces.

Each ``bench_*.py`` script holds its own configurations and tables and takes the rest from here, so
that every figure is timed, measured and recorded the same way (docs/design.md, Benchmarks). The
scripts run as ``python benchmarks/bench_x.py``: this folder is then on ``sys.path``, and the tests
import them by name (pytest's ``pythonpath`` holds ``benchmarks``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from angular import heap, ops
from angular.ops import linear

REPOSITORY = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
# What the margin-op figures depend on (uncommitted changes to these are named in the output).
MEASURED_SOURCES = ("csrc", "setup.py", "angular/ops", "benchmarks")


# --------------------------------------------------------------------------------------------------
# Timing.


def quantiles(times: list[float]) -> tuple[float, float]:
    """Median and interquartile range (0 for a single time)."""
    if len(times) < 2:
        return times[0], 0.0
    q1, _, q3 = statistics.quantiles(times, n=4)
    return statistics.median(times), q3 - q1


def timed_runs(action, warmup: int, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``action()``, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        action()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        seconds.append(time.perf_counter() - start)
    return seconds


def time_cpu(
    step, inputs: list, threads: int, min_run_time: float
) -> tuple[float, float, int, int]:
    """``(median ms, IQR ms, runs, timed blocks)`` of ``step(inputs[0])`` by
    ``torch.utils.benchmark.Timer.blocked_autorange`` on ``threads`` threads."""
    from torch.utils import benchmark

    timer = benchmark.Timer(
        stmt="step(inp)", globals={"step": step, "inp": inputs[0]}, num_threads=threads
    )
    measured = timer.blocked_autorange(min_run_time=min_run_time)
    runs = len(measured.times) * measured.number_per_run
    return measured.median * 1e3, measured.iqr * 1e3, runs, len(measured.times)


def time_cuda(step, inputs: list, min_run_time: float) -> tuple[float, float, int, int]:
    """``(median ms, IQR ms, runs, events)``: CUDA events around each call after warm-up, rotating
    over the input sets."""
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
    median, iqr = quantiles([begin.elapsed_time(end) for begin, end in events])
    return median, iqr, repeats, repeats


def l2_rotation_sets(set_bytes: int) -> int:
    """Enough input sets of ``set_bytes`` that two calls in a row never find the data in L2 (at
    least 2, at most 64)."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    l2_bytes = getattr(props, "L2_cache_size", 50 * 2**20)
    return int(min(64, max(2, math.ceil(4 * l2_bytes / set_bytes))))


# --------------------------------------------------------------------------------------------------
# Memory.


def peak_extra_cuda(step, inp) -> int:
    """Peak bytes allocated during ``step(inp)`` beyond what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step(inp)
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - before)


def peak_extra_cpu(step, inp) -> int:
    """Peak of the running sum of the profiler's CPU allocation/free events during ``step(inp)``."""
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


def process_status_kib(field: str) -> int:
    """A ``/proc/self/status`` figure in KiB, e.g. ``VmRSS`` or ``VmHWM`` (peak resident size)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def available_memory_bytes() -> int:
    """``MemAvailable`` of ``/proc/meminfo`` (0 when it is missing)."""
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


# --------------------------------------------------------------------------------------------------
# The machine and the code measured. The one place that asks angular's extension loader.


def extension_status() -> tuple[bool, str]:
    """``(loaded, reason)`` of the compiled extension ``angular.ops._C``."""
    return ops.extension_status()


def has_fused_kernel(device: str) -> bool:
    """Whether the extension has the margin kernels for ``device`` tensors."""
    return ops.has_fused_kernel(device)


def has_fused_linear_kernel(device: str) -> bool:
    """Whether the extension has the fused linear + margin kernel for ``device`` tensors."""
    return linear.has_kernel(device)


def fused_unavailable_reason(device: str) -> str | None:
    """Why the fused margin ops cannot run on ``device`` here, or None when they can."""
    loaded, reason = extension_status()
    if not loaded:
        return reason
    if not has_fused_kernel(device):
        return f"the extension angular._C has no kernel for {device} tensors"
    return None


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo``, else what ``platform`` knows."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return model


def load_average_1min() -> float | None:
    # Other processes on the machine make timings noisy; the load says how busy it was.
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def git(*args: str) -> str:
    """``git ARGS`` in the repository: its output, or "" when git fails (OSError when absent)."""
    completed = subprocess.run(
        ["git", *args], cwd=REPOSITORY, capture_output=True, text=True, timeout=30
    )
    return completed.stdout.rstrip() if completed.returncode == 0 else ""


def source_state(sources: tuple[str, ...] = MEASURED_SOURCES) -> dict:
    """The git commit, and the uncommitted changes to the sources the figures depend on."""
    try:
        commit = git("rev-parse", "--short", "HEAD") or None
        changed = git("status", "--porcelain", "--", *sources)
    except (OSError, subprocess.SubprocessError):
        return dict(git_commit=None, uncommitted_sources=[])
    return dict(
        git_commit=commit,
        uncommitted_sources=[line[3:] for line in changed.splitlines() if line.strip()],
    )


def machine_description(device: str, threads: int) -> dict:
    """The machine, the software and the code a run measured (the JSON's ``machine``)."""
    loaded, reason = extension_status()
    return dict(
        cpu_model=cpu_model(),
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
        date=utc_now(),
        load_average_1min=load_average_1min(),
        heap=heap.state(),
        **source_state(),
    )


HEAP_MODES = ("cold", "warm")


def set_heap(mode: str) -> str:
    """Put this process's CPU heap in ``mode`` and return the state it is in. ``warm`` keeps freed
    (B, C) buffers mapped, as the pipeline's entry points do (angular/heap.py); ``cold`` is the C
    library's defaults, what a library user's process has unless it sets them. A ``cold`` run
    started with the user's ``MALLOC_*`` variables set stays warm, and the JSON says so."""
    if mode == "warm":
        heap.keep_freed_buffers_mapped()
    return heap.state()


# --------------------------------------------------------------------------------------------------
# Tables and files.


def threads_label(count: int) -> str:
    return f"{count} thread" + ("" if count == 1 else "s")


def machine_line(machine: dict) -> str:
    """One markdown bullet describing a :func:`machine_description`."""
    load = machine.get("load_average_1min")
    return (
        f"- Machine: {machine['cpu_model']} ({machine['cpu_count']} logical CPUs), "
        f"{threads_label(machine['threads'])}"
        + (f", GPU {machine['gpu_name']}" if machine["gpu_name"] else "")
        + f"; torch {machine['torch_version']}; angular backend `{machine['angular_backend']}`"
        + ("" if load is None else f"; 1-min load average at start {load:.2f}")
        + (
            f"; CPU heap {machine['heap']}"
            if machine.get("heap") and machine["device"] == "cpu"
            else ""
        )
        + (f"; commit {machine['git_commit']}" if machine.get("git_commit") else "")
        + (
            f" with uncommitted changes to {', '.join(machine['uncommitted_sources'])}"
            if machine.get("uncommitted_sources")
            else ""
        )
    )


def table_row(cells) -> str:
    """One markdown table row: ``| a | b |``."""
    return "| " + " | ".join(cells) + " |"


def table_header(columns, align: str | None = None) -> list[str]:
    """The header row and the rule under it; ``align`` gives one rule per column (``---:``)."""
    rules = align.split() if align else ["---"] * len(columns)
    return [table_row(columns), "|" + "".join(f"{rule}|" for rule in rules)]


def json_text(data, indent: int = 1) -> str:
    return json.dumps(data, indent=indent) + "\n"


def replace_file(path: Path, text: str) -> None:
    """Writes ``text`` whole (write, then rename): a run killed mid-write keeps the last copy."""
    partial = path.parent / f".{path.name}.partial"
    partial.write_text(text)
    partial.replace(path)


# --------------------------------------------------------------------------------------------------
# Command line.


def int_list(name: str):
    """argparse type: a comma-separated list of integers >= 1."""

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


def choice_list(name: str, choices):
    """argparse type: a comma-separated list drawn from ``choices``."""

    def parse(text: str) -> tuple[str, ...]:
        values = tuple(item.strip() for item in text.split(",") if item.strip())
        unknown = [value for value in values if value not in choices]
        if not values or unknown:
            raise argparse.ArgumentTypeError(
                f"{name}: unknown {unknown or text!r}; choose from {', '.join(choices)}"
            )
        return values

    return parse


def positive_int(name: str):
    """argparse type: an integer >= 1."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {value}")
        return value

    return parse


def add_out_argument(parser: argparse.ArgumentParser) -> None:
    """``--out``: the output folder, ``benchmarks/results/`` by default."""
    parser.add_argument(
        "--out", type=Path, default=RESULTS_DIR, help="output folder (default: benchmarks/results/)"
    )
