"""Benchmark of the fused linear + margin + cross-entropy op against the unfused head path.

Providers, both forward + backward of an ArcFace loss (mean reduction) from embeddings ``x`` (B, D)
and centres ``weight`` (C, D), gradients of both by ``torch.autograd.grad``:

- ``fused_linear``: ``angular.ops.linear_margin_cross_entropy`` (no (B, C) buffer).
- ``unfused``: what a head does without it: ``F.linear(F.normalize(x), F.normalize(weight))`` then
  the fused ``angular.ops.margin_cross_entropy`` (the matmul + fused margin CE).
- ``triton_linear`` (``--device cuda`` only): the tiled Triton kernels of
  ``angular.ops.triton_linear`` (issue 26, part 4, stage two: the cosine tile stays on chip), with
  its default gradient filter (on for bf16/fp16: tiles whose every gradient is below 2^-12 are
  skipped in the backward). Its stage-two target, bf16 at C = 1M: at most 0.8x the unfused time and
  300 MiB of extra memory. On CPU, or without triton, it is left out and says so.

Memory, "peak extra": everything the call holds at its peak beyond x, weight and grad_weight.
- CPU: each (provider, C) runs in a fresh subprocess; after the inputs exist (and are touched), the
  peak resident set size is reset (``/proc/self/clear_refs``), the call runs once, and the extra is
  ``VmHWM - VmRSS before - bytes of grad_weight``. This counts every thread and every allocator, and
  also one-time costs of a first call (thread pools, BLAS buffers), so it errs on the high side.
  The time of that single (first) call is reported with it ("one call, s").
- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was
  allocated before the call, minus grad_weight.

Time: median of ``--repeats`` calls after ``--warmup`` calls; CPU wall clock, with the two providers
alternating in one process so that both see the same machine load; CUDA events on GPU. Out of
memory is recorded as such (not as a failure of the run).

    python benchmarks/bench_linear.py                   # CPU: C=100,000 timing + C=1,000,000 memory
    python benchmarks/bench_linear.py --device cuda     # GPU: B=512, D=512, bf16, C=1M and 10M

Writes ``OUT/bench_linear.json`` and ``OUT/bench_linear.md`` (``--out``, default benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import harness
import torch
import torch.nn.functional as F

from angular import ops

PROVIDERS = ("fused_linear", "unfused")  # what the CPU run measures
CUDA_PROVIDERS = (*PROVIDERS, "triton_linear")
TRITON_TIME_TARGET = 0.8  # of the unfused time, bf16, C = 1M (issue 26, part 4, stage two)
TRITON_MEMORY_TARGET_MIB = 300
MARGIN = dict(s=64.0, m1=1.0, m2=0.5, m3=0.0, label_smoothing=0.1)  # ArcFace, smoothing 0.1
MIB = 2**20
CPU_MEMORY_TARGET_MIB = 64
CPU_SPEED_TARGET = 0.8
BEYOND_INPUTS = "beyond x, weight, grad_weight"  # what "peak extra" memory leaves out


def loss_of(provider: str, x, weight, labels):
    if provider == "fused_linear":
        return ops.linear_margin_cross_entropy(x, weight, labels, **MARGIN)
    if provider == "triton_linear":
        from angular.ops import triton_linear

        return triton_linear.linear_margin_cross_entropy_triton(x, weight, labels, **MARGIN)
    cos = F.linear(F.normalize(x, dim=1), F.normalize(weight.to(x.dtype), dim=1))
    return ops.margin_cross_entropy(cos, labels, **MARGIN)


def make_inputs(batch, dim, classes, dtype, device, seed=0):
    generator = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(batch, dim, generator=generator, device=device, dtype=dtype)
    weight = torch.randn(classes, dim, generator=generator, device=device, dtype=dtype)
    labels = torch.randint(0, classes, (batch,), generator=generator, device=device)
    return x.requires_grad_(), weight.requires_grad_(), labels


def step(provider, x, weight, labels):
    return torch.autograd.grad(loss_of(provider, x, weight, labels), (x, weight))


# --------------------------------------------------------------------------------------------------
# CPU memory: one subprocess per measurement.


def child_memory(provider: str, batch: int, dim: int, classes: int) -> dict:
    """Runs in the subprocess: peak RSS growth of one call, beyond grad_weight."""
    x, weight, labels = make_inputs(batch, dim, classes, torch.float32, "cpu")
    before = harness.process_status_kib("VmRSS") * 1024
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    start = time.perf_counter()
    grads = step(provider, x, weight, labels)
    seconds = time.perf_counter() - start
    peak = harness.process_status_kib("VmHWM") * 1024
    grad_weight = grads[1].numel() * grads[1].element_size()
    return dict(
        peak_extra_bytes=peak - before - grad_weight,
        grad_weight_bytes=grad_weight,
        first_call_s=seconds,
    )


def cpu_memory(provider, batch, dim, classes, threads) -> dict:
    command = [
        sys.executable, __file__, "--child-memory", provider,
        "--B", str(batch), "--D", str(dim), "--C", str(classes), "--threads", str(threads),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        return dict(status="error", reason=done.stderr.strip().splitlines()[-1:])
    return dict(status="ok", **json.loads(done.stdout.strip().splitlines()[-1]))


# --------------------------------------------------------------------------------------------------
# Timing.


def cpu_times(batch, dim, classes, warmup, repeats, providers) -> dict:
    x, weight, labels = make_inputs(batch, dim, classes, torch.float32, "cpu")
    times = {provider: [] for provider in providers}
    for _ in range(warmup):
        for provider in providers:
            step(provider, x, weight, labels)
    for _ in range(repeats):
        for provider in providers:  # alternating: both see the same load
            start = time.perf_counter()
            step(provider, x, weight, labels)
            times[provider].append(time.perf_counter() - start)
    return {provider: statistics.median(values) * 1e3 for provider, values in times.items()}


def triton_unavailable() -> str | None:
    """Why the triton_linear provider cannot run here, or None when it can."""
    try:
        from angular.ops import triton_linear
    except ImportError as error:
        return f"angular.ops.triton_linear does not import: {error}"
    if triton_linear.triton is None:
        return "triton is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device"
    if triton_linear.INTERPRETED:
        return "TRITON_INTERPRET=1 (the interpreter is not what is measured)"
    return None


def cuda_case(provider, batch, dim, classes, dtype, warmup, repeats) -> dict:
    torch.cuda.empty_cache()
    try:
        x, weight, labels = make_inputs(batch, dim, classes, dtype, "cuda")
    except torch.OutOfMemoryError:
        return dict(status="out of memory (inputs)")
    grad_weight = weight.numel() * weight.element_size()
    try:
        call = lambda inputs: step(provider, *inputs)  # noqa: E731
        peak = harness.peak_extra_cuda(call, (x, weight, labels)) - grad_weight
        for _ in range(warmup):
            step(provider, x, weight, labels)
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(provider, x, weight, labels)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    except torch.OutOfMemoryError as error:
        return dict(status="out of memory", reason=str(error).splitlines()[0])
    finally:
        del x, weight
        torch.cuda.empty_cache()
    return dict(status="ok", median_ms=statistics.median(times), peak_extra_bytes=peak)


# --------------------------------------------------------------------------------------------------


def machine() -> dict:
    info = dict(
        date=harness.utc_now(),
        platform=platform.platform(),
        processor=platform.processor() or platform.machine(),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        load_average=harness.load_average_1min(),
        backend=ops.backend(),
        fused_linear_kernel_cpu=harness.has_fused_linear_kernel("cpu"),
    )
    try:
        info["git"] = harness.git("rev-parse", "--short", "HEAD")
    except (OSError, subprocess.SubprocessError):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["fused_linear_kernel_cuda"] = harness.has_fused_linear_kernel("cuda")
    return info


def run_cpu(args) -> dict:
    if "triton_linear" in args.providers:
        print(
            "bench_linear: triton_linear is measured with --device cuda only; left out", flush=True
        )
    results = dict(machine=machine(), device="cpu", B=args.B, D=args.D, speed=[], memory=[])
    for classes in args.speed_C:
        times = cpu_times(args.B, args.D, classes, args.warmup, args.repeats, PROVIDERS)
        ratio = times["unfused"] / times["fused_linear"]
        results["speed"].append(dict(C=classes, median_ms=times, speedup=ratio))
        print(f"C={classes}: {times} fused speed-up {ratio:.2f}x", flush=True)
    for classes in args.memory_C:
        for provider in PROVIDERS:
            if provider == "unfused" and args.skip_unfused_memory:
                continue
            measured = cpu_memory(provider, args.B, args.D, classes, torch.get_num_threads())
            results["memory"].append(dict(C=classes, provider=provider, **measured))
            print(f"memory C={classes} {provider}: {measured}", flush=True)
    return results


def run_cuda(args) -> dict:
    dtype = dict(bf16=torch.bfloat16, fp16=torch.float16, fp32=torch.float32)[args.dtype]
    results = dict(machine=machine(), device="cuda", B=args.B, D=args.D, dtype=args.dtype, cases=[])
    triton_reason = triton_unavailable() if "triton_linear" in args.providers else None
    for classes in args.cuda_C:
        for provider in args.providers:
            if provider == "triton_linear" and triton_reason:
                measured = dict(status=f"skipped: {triton_reason}")
            else:
                measured = cuda_case(
                    provider, args.B, args.D, classes, dtype, args.warmup, args.repeats
                )
            results["cases"].append(dict(C=classes, provider=provider, **measured))
            print(f"C={classes} {provider}: {measured}", flush=True)
    return results


def triton_target(dtype: str, provider: str, classes: int, ratio, extra_mib: float) -> str:
    """The stage-two verdict for triton_linear's bf16 C = 1M row; empty elsewhere."""
    if provider != "triton_linear" or dtype != "bf16" or classes != 1_000_000:
        return ""
    time_met = ratio is not None and ratio <= TRITON_TIME_TARGET
    memory_met = extra_mib <= TRITON_MEMORY_TARGET_MIB
    return (
        f"<= {TRITON_TIME_TARGET}x: {'met' if time_met else 'MISSED'}, "
        f"<= {TRITON_MEMORY_TARGET_MIB} MiB: {'met' if memory_met else 'MISSED'}"
    )


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        f"## bench_linear ({results['device']}, B={results['B']}, D={results['D']})",
        "",
        f"{m['date']}, git {m.get('git')}, torch {m['torch']}, {m['threads']} threads, "
        f"load average {m['load_average']}, {m.get('gpu', m['processor'])}",
        "",
    ]
    if results["device"] == "cpu":
        lines += [
            *harness.table_header(
                ["C", "fused_linear ms", "unfused ms", "fused speed vs unfused", "target"]
            ),
        ]
        for row in results["speed"]:
            t = row["median_ms"]
            lines.append(
                f"| {row['C']:,} | {t['fused_linear']:.0f} | {t['unfused']:.0f} | "
                f"{row['speedup']:.2f}x | >= {CPU_SPEED_TARGET}x: "
                f"{'met' if row['speedup'] >= CPU_SPEED_TARGET else 'MISSED'} |"
            )
        lines += [
            "",
            *harness.table_header(
                ["C", "provider", f"peak extra MiB ({BEYOND_INPUTS})", "one call, s", "target"]
            ),
        ]
        for row in results["memory"]:
            if row["status"] != "ok":
                lines.append(f"| {row['C']:,} | {row['provider']} | {row['status']} | | |")
                continue
            extra = row["peak_extra_bytes"] / MIB
            target = ""
            if row["provider"] == "fused_linear":
                met = extra <= CPU_MEMORY_TARGET_MIB
                target = f"<= {CPU_MEMORY_TARGET_MIB} MiB: {'met' if met else 'MISSED'}"
            lines.append(
                f"| {row['C']:,} | {row['provider']} | {extra:.1f} | {row['first_call_s']:.1f} | "
                f"{target} |"
            )
    else:
        lines += [
            f"dtype {results['dtype']}",
            "",
            *harness.table_header(
                [
                    "C",
                    "provider",
                    "median ms",
                    f"peak extra MiB ({BEYOND_INPUTS})",
                    "time vs unfused",
                    "target",
                ]
            ),
        ]
        unfused = {
            row["C"]: row["median_ms"]
            for row in results["cases"]
            if row["provider"] == "unfused" and row["status"] == "ok"
        }
        for row in results["cases"]:
            if row["status"] != "ok":
                lines.append(f"| {row['C']:,} | {row['provider']} | {row['status']} | | | |")
                continue
            extra = row["peak_extra_bytes"] / MIB
            ratio = row["median_ms"] / unfused[row["C"]] if row["C"] in unfused else None
            lines.append(
                f"| {row['C']:,} | {row['provider']} | {row['median_ms']:.1f} | {extra:.1f} | "
                f"{'' if ratio is None else f'{ratio:.2f}x'} | "
                f"{triton_target(results['dtype'], row['provider'], row['C'], ratio, extra)} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench_linear.py", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--B", type=int, default=None, help="batch (CPU 256, CUDA 512)")
    parser.add_argument("--D", type=int, default=512)
    parser.add_argument("--C", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--speed-C", type=int, nargs="*", default=[100_000])
    parser.add_argument("--memory-C", type=int, nargs="*", default=[1_000_000])
    parser.add_argument("--cuda-C", type=int, nargs="*", default=[1_000_000, 10_000_000])
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    parser.add_argument(
        "--providers",
        nargs="+",
        choices=CUDA_PROVIDERS,
        default=None,
        help="what --device cuda measures (default: all three); the CPU run always measures "
        "fused_linear and unfused (triton_linear needs CUDA)",
    )
    parser.add_argument("--skip-unfused-memory", action="store_true")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    harness.add_out_argument(parser)
    parser.add_argument("--child-memory", choices=PROVIDERS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.B is None:
        args.B = 512 if args.device == "cuda" else 256
    if args.providers is None:
        args.providers = CUDA_PROVIDERS if args.device == "cuda" else PROVIDERS
    if args.child_memory:
        print(json.dumps(child_memory(args.child_memory, args.B, args.D, args.C)))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_linear: --device cuda but no GPU is available", file=sys.stderr)
        return 2
    results = run_cuda(args) if args.device == "cuda" else run_cpu(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_linear.json").write_text(harness.json_text(results, indent=2))
    text = markdown(results)
    (args.out / "bench_linear.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
