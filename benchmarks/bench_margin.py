"""Benchmark of the margin ops: the fused kernel side by side with its baselines (docs/design.md,
Benchmarks; benchmarks/README.md).

For ``margin_cross_entropy`` ("loss") and ``margin_logits`` ("logits"), forward ("fwd") and
forward+backward ("fwd+bwd"), over a grid of B, C, dtypes and margin presets, one run on one
machine times the providers of ``margin_providers.py`` (fused, reference, insightface, compiled;
``compiled`` is compiled once per configuration outside the timing, its compile time reported on
its own).

Timing (``harness``): CPU, ``torch.utils.benchmark.Timer.blocked_autorange`` medians at the stated
thread count; CUDA, CUDA events around each call, after warm-up, rotating over several pre-made
input sets (enough that L2 cannot hold them), median over the repeats. "fwd" is the training forward
(``cos`` requires grad, so autograd saves what backward needs); "fwd+bwd" adds
``torch.autograd.grad`` of the loss (of the logits against a fixed random upstream gradient).

Memory: peak bytes allocated during one call beyond the inputs (the returned gradient included):
CUDA, ``torch.cuda.max_memory_allocated``; CPU, the torch profiler's memory events.

Bandwidth (CUDA only): the bytes an ideal kernel must move, divided by the time: loss fwd 1 pass
over B x C (read cos), loss fwd+bwd 3 (read cos twice, write the gradient), logits fwd 2 (read,
write), logits fwd+bwd 5 (fwd, then read the upstream gradient and cos, write the gradient);
compared with a device-to-device copy (``dst.copy_(src)``, 2 passes) of the same B x C tensor
measured in the same run.

Writes ``OUT/bench_margin.json`` (machine, settings, every measurement), ``OUT/bench_margin.md``
(headline targets, then times and speed-ups per configuration: ``margin_report.py``) and
``OUT/speedup.png``. ``--adaptive`` runs ``margin_adaptive.py`` instead.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from dataclasses import asdict
from pathlib import Path

import harness
import margin_adaptive
import margin_report
import torch
from margin_providers import (
    DTYPES,
    FOCUS_SHAPE,
    OPS,
    PASSES,
    PRESETS,
    PROVIDERS,
    Case,
    Measurement,
    copy_time_cuda,
    cuda_input_sets,
    make_inputs,
    measure_provider,
)

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
QUICK_GRID = dict(B=(256,), C=(8192, 32768), dtypes=("fp32",), presets=("arcface",), ops=("loss",))
# The default CUDA grid has to fit the few minutes of the GPU check script: it stops starting new
# configurations after the time budget, and stops compiling (``compiled`` then recorded as skipped)
# after the compile budget, so the eager providers still cover the grid.
DEFAULT_CUDA_TIME_BUDGET_S = 200.0
DEFAULT_CUDA_COMPILE_BUDGET_S = 90.0


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
        "--B", type=harness.int_list("--B"), default=None, help="batch sizes, e.g. 128,256"
    )
    parser.add_argument(
        "--C", type=harness.int_list("--C"), default=None, help="class counts, e.g. 8192"
    )
    parser.add_argument(
        "--dtypes",
        type=harness.choice_list("--dtypes", tuple(DTYPES)),
        default=None,
        help="fp32,bf16,...",
    )
    parser.add_argument(
        "--presets",
        type=harness.choice_list("--presets", tuple(PRESETS)),
        default=None,
        help=", ".join(PRESETS),
    )
    parser.add_argument(
        "--ops",
        type=harness.choice_list("--ops", OPS),
        default=None,
        help="loss (margin_cross_entropy), logits (margin_logits)",
    )
    parser.add_argument(
        "--passes",
        type=harness.choice_list("--passes", PASSES),
        default=PASSES,
        help="fwd, fwd+bwd",
    )
    parser.add_argument(
        "--providers",
        type=harness.choice_list("--providers", PROVIDERS),
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
        "--heap",
        choices=harness.HEAP_MODES,
        default="cold",
        help="CPU heap: cold (the C library's defaults: a freed B x C buffer is unmapped, a library "
        "user's process) or warm (freed buffers stay mapped, as in the pipeline; angular/heap.py)",
    )
    harness.add_out_argument(parser)
    return parser


def resolve_settings(args: argparse.Namespace) -> dict:
    """Fill in the defaults that depend on the device; check what argparse cannot."""
    device = args.device or harness.default_device()
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


def run_benchmark(settings: dict, argv: list[str], on_progress=None) -> dict:
    """Runs the grid; ``on_progress(result)`` gets the result so far after each configuration
    (``complete`` False, the configurations still to run in ``not_run``)."""
    device = settings["device"]
    torch.set_num_threads(settings["threads"])
    cases = build_cases(settings["grid"], device)
    generator = torch.Generator(device=device).manual_seed(settings["seed"])
    machine = harness.machine_description(device, settings["threads"])
    fused_reason = (
        harness.fused_unavailable_reason(device) if "fused" in settings["providers"] else None
    )
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


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.adaptive and args.device is None:
        args.device = "cpu"
    harness.set_heap(args.heap)  # before the first B x C buffer is allocated
    settings = resolve_settings(args)
    out = Path(settings["out"])
    out.mkdir(parents=True, exist_ok=True)
    if args.adaptive:
        if settings["device"] != "cpu":
            raise SystemExit("--adaptive runs on the CPU (--device cpu)")
        settings["explicit_shape"] = args.B is not None and args.C is not None
        settings["adaptive_rounds"] = 5 if args.quick else 21
        return margin_adaptive.run_and_write(settings, out)

    def write(result: dict) -> str:
        markdown = margin_report.render_markdown(result)
        harness.replace_file(out / "bench_margin.json", harness.json_text(result))
        harness.replace_file(out / "bench_margin.md", markdown)
        return markdown

    result = run_benchmark(settings, sys.argv[1:] if argv is None else list(argv), write)
    markdown = write(result)
    margin_report.render_chart(result, out / "speedup.png")
    print()
    print(markdown)
    print(
        f"bench_margin: wrote {out / 'bench_margin.json'}, {out / 'bench_margin.md'}, "
        f"{out / 'speedup.png'} in {result['elapsed_s']:.0f} s"
    )
    return result


if __name__ == "__main__":
    main()
