"""End-to-end training throughput (images/s): the fused backend against ``ANGULAR_BACKEND=python``.

The step is the default pipeline's training step: the ``small_cnn`` backbone on digits-sized 1x8x8
images (embedding 128) and an ArcFace head from :mod:`angular.nn.heads` (s=64, m=0.5, whose ``loss`` is
``angular.ops.margin_cross_entropy``), Adam, batch 256. Two cases: ``digits`` (10 classes, where the
head is a small part of the step) and ``large`` (10,000 classes by default, random data, where the
head matters). Inputs are random: throughput does not depend on their values.

The backend is chosen once per process, so every (case, backend) runs in a fresh subprocess of this
script (``--worker``). The fused run uses whatever ``angular.ops`` picks on its own; when that is not
a compiled kernel for the device it is recorded as unavailable, with the reason, not timed.

Writes ``OUT/bench_training.json`` and ``OUT/bench_training.md`` (next to ``bench_margin``'s).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import harness
import torch

from angular import ops
from angular.nn.backbones import build_backbone
from angular.nn.heads import ArcFace

BACKENDS = ("fused", "python")
CASES = ("digits", "large")
DIGITS_CLASSES = 10
IMAGE_SHAPE = (1, 8, 8)
EMBEDDING_DIM = 128
RESULT_PREFIX = "BENCH_TRAINING_RESULT "


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench_training.py",
        description="Training throughput (images/s) of backbone + ArcFace head with the fused "
        "margin kernel vs ANGULAR_BACKEND=python, each in its own process. Writes "
        "OUT/bench_training.json and OUT/bench_training.md.",
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available"
    )
    parser.add_argument(
        "--threads",
        type=harness.positive_int("--threads"),
        default=None,
        help="CPU threads (default: torch.get_num_threads())",
    )
    parser.add_argument(
        "--cases", type=harness.choice_list("--cases", CASES), default=CASES, help="digits, large"
    )
    parser.add_argument(
        "--large-classes",
        type=harness.positive_int("--large-classes"),
        default=10000,
        help="classes of the 'large' case (default 10000)",
    )
    parser.add_argument(
        "--backends",
        type=harness.choice_list("--backends", BACKENDS),
        default=BACKENDS,
        help="fused, python",
    )
    parser.add_argument(
        "--batch", type=harness.positive_int("--batch"), default=256, help="batch size (256)"
    )
    parser.add_argument(
        "--steps", type=harness.positive_int("--steps"), default=20, help="timed steps per repeat"
    )
    parser.add_argument(
        "--warmup", type=harness.positive_int("--warmup"), default=3, help="untimed steps first"
    )
    parser.add_argument(
        "--repeats",
        type=harness.positive_int("--repeats"),
        default=3,
        help="timed repeats (median)",
    )
    parser.add_argument(
        "--heap",
        type=harness.choice_list("--heap", harness.HEAP_MODES),
        default=None,
        help="CPU heap modes, each in its own processes: cold (the C library's defaults), warm "
        "(freed B x C buffers stay mapped, as in the pipeline). Default: cold,warm on CPU",
    )
    harness.add_out_argument(parser)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # JSON spec, internal
    return parser


# --------------------------------------------------------------------------------------------------
# Worker: one (case, backend) in this process.


def run_worker(spec: dict) -> dict:
    device = spec["device"]
    heap_state = harness.set_heap(spec["heap"])  # before the first B x C buffer is allocated
    torch.set_num_threads(spec["threads"])
    result = dict(spec, backend_served=ops.backend(), heap_state=heap_state)
    if spec["backend"] == "fused" and not harness.has_fused_kernel(device):
        loaded, reason = harness.extension_status()
        result.update(
            status="unavailable",
            reason=reason if not loaded else f"the extension has no kernel for {device} tensors",
        )
        return result

    torch.manual_seed(0)
    backbone = build_backbone("small_cnn", in_channels=IMAGE_SHAPE[0], embedding_dim=EMBEDDING_DIM)
    head = ArcFace(EMBEDDING_DIM, spec["classes"])
    backbone.to(device).train()
    head.to(device).train()
    optimizer = torch.optim.Adam([*backbone.parameters(), *head.parameters()], lr=1e-3)
    batch = spec["batch"]
    # A few pre-made batches, reused in turn, so data loading is not part of the figure.
    batches = [
        (
            torch.randn(batch, *IMAGE_SHAPE, device=device),
            torch.randint(0, spec["classes"], (batch,), device=device),
        )
        for _ in range(4)
    ]

    def train_step(index: int) -> torch.Tensor:
        images, labels = batches[index % len(batches)]
        optimizer.zero_grad(set_to_none=True)
        loss = head.loss(backbone(images), labels)
        loss.backward()
        optimizer.step()
        return loss

    def synchronize() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    for index in range(spec["warmup"]):
        train_step(index)
    synchronize()
    rates, step_ms = [], []
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        for index in range(spec["steps"]):
            step_start = time.perf_counter()
            loss = train_step(index)
            if device == "cpu":  # one step at a time: its median and its worst are what users see
                step_ms.append((time.perf_counter() - step_start) * 1e3)
        synchronize()
        rates.append(batch * spec["steps"] / (time.perf_counter() - start))
    final_loss = float(loss)
    if not torch.isfinite(torch.tensor(final_loss)):
        raise RuntimeError(f"training diverged: loss {final_loss}")
    result.update(
        status="ok",
        images_per_s=statistics.median(rates),
        images_per_s_all=rates,
        step_ms_median=statistics.median(step_ms) if step_ms else None,
        step_ms_worst=max(step_ms) if step_ms else None,
        step_ms_all=step_ms,
        final_loss=final_loss,
    )
    return result


def spawn_worker(spec: dict) -> dict:
    """Run one (case, backend) in a fresh process with the backend's environment."""
    env = dict(os.environ)
    if spec["backend"] == "python":
        env["ANGULAR_BACKEND"] = "python"
    else:
        env.pop("ANGULAR_BACKEND", None)  # let angular.ops choose the compiled kernels
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    completed = subprocess.run(command, env=env, capture_output=True, text=True)
    for line in reversed(completed.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    tail = (completed.stderr or completed.stdout).strip().splitlines()[-5:]
    return dict(
        spec, status="error", reason=f"worker exited {completed.returncode}: " + " | ".join(tail)
    )


# --------------------------------------------------------------------------------------------------
# Parent: every case with every backend, then the reports.


def _rate(run: dict | None) -> str:
    if run is None:
        return "-"
    return f"{run['images_per_s']:.0f}" if run["status"] == "ok" else run["status"]


def render_markdown(result: dict) -> str:
    settings = result["settings"]
    rows = result["runs"]
    fused_runs = [run for run in rows if run["backend_requested"] == "fused"]
    fused_ok = any(run["status"] == "ok" for run in fused_runs)
    lines = [
        "## End-to-end training throughput",
        "",
        harness.machine_line(result["machine"]),
        f"- Date: {result['machine']['date']}; command: "
        f"`{' '.join(['python benchmarks/bench_training.py', *settings['argv']])}`",
        f"- Step: small_cnn backbone on {'x'.join(map(str, IMAGE_SHAPE))} inputs (embedding "
        f"{EMBEDDING_DIM}) + ArcFace head (s=64, m=0.5), Adam, batch {settings['batch']}, random data; "
        f"images/s is the median of {settings['repeats']} repeats of {settings['steps']} steps after "
        f"{settings['warmup']} warm-up steps; each backend in its own process.",
    ]
    unavailable = [run for run in fused_runs if run["status"] != "ok"]
    if unavailable:
        lines.append(f"- **fused backend unavailable**: {unavailable[0]['reason']}")
    header = ["case", "classes", "CPU heap"]
    header += ["fused images/s"] if fused_ok else []
    header += ["python images/s"]
    header += ["fused/python"] if fused_ok else []
    per_step = fused_ok and settings["device"] == "cpu"
    header += ["fused step ms, median / worst"] if per_step else []
    lines += ["", *harness.table_header(header)]
    # Runs from before the heap modes were cold: the C library's defaults.
    for case, heap_mode in itertools.product(settings["cases"], settings.get("heap", ["cold"])):
        by_backend = {
            run["backend_requested"]: run
            for run in rows
            if run["case"] == case and run.get("heap", "cold") == heap_mode
        }
        classes = next(iter(by_backend.values()))["classes"]
        cells = [case, str(classes), next(iter(by_backend.values())).get("heap_state", heap_mode)]
        if fused_ok:
            cells.append(_rate(by_backend.get("fused")))
        cells.append(_rate(by_backend.get("python")))
        if fused_ok:
            fused, python = by_backend.get("fused"), by_backend.get("python")
            both = fused and python and fused["status"] == python["status"] == "ok"
            cells.append(f"{fused['images_per_s'] / python['images_per_s']:.2f}x" if both else "-")
            if per_step:
                ok = fused and fused["status"] == "ok" and fused.get("step_ms_median") is not None
                cells.append(
                    f"{fused['step_ms_median']:.1f} / {fused['step_ms_worst']:.1f}" if ok else "-"
                )
        lines.append(harness.table_row(cells))
    errors = [run for run in rows if run["status"] == "error"]
    lines += [
        f"- error: {run['case']} {run['backend_requested']}: {run['reason']}" for run in errors
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.worker is not None:
        print(RESULT_PREFIX + json.dumps(run_worker(json.loads(args.worker))), flush=True)
        return {}
    device = args.device or harness.default_device()
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    threads = args.threads or torch.get_num_threads()
    classes = {"digits": DIGITS_CLASSES, "large": args.large_classes}
    heap_modes = args.heap or (harness.HEAP_MODES if device == "cpu" else ("cold",))
    machine = harness.machine_description(device, threads)
    runs = []
    start = time.perf_counter()
    for case, heap_mode in itertools.product(args.cases, heap_modes):
        for backend in args.backends:
            spec = dict(
                case=case,
                heap=heap_mode,
                classes=classes[case],
                backend=backend,
                device=device,
                threads=threads,
                batch=args.batch,
                steps=args.steps,
                warmup=args.warmup,
                repeats=args.repeats,
            )
            run = spawn_worker(spec)
            run["backend_requested"] = run.pop("backend")
            runs.append(run)
            shown = (
                f"{run['images_per_s']:.0f} images/s" if run["status"] == "ok" else run["status"]
            )
            print(
                f"bench_training: {case} ({classes[case]} classes, {heap_mode} heap) {backend}: "
                f"{shown}",
                flush=True,
            )
    result = dict(
        benchmark="bench_training",
        schema_version=1,
        machine=machine,
        settings=dict(
            device=device,
            threads=threads,
            cases=list(args.cases),
            backends=list(args.backends),
            batch=args.batch,
            steps=args.steps,
            warmup=args.warmup,
            repeats=args.repeats,
            large_classes=args.large_classes,
            heap=list(heap_modes),
            argv=sys.argv[1:] if argv is None else list(argv),
        ),
        runs=runs,
        elapsed_s=time.perf_counter() - start,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_training.json").write_text(harness.json_text(result))
    markdown = render_markdown(result)
    (out / "bench_training.md").write_text(markdown)
    print()
    print(markdown)
    print(f"bench_training: wrote {out / 'bench_training.json'}, {out / 'bench_training.md'}")
    return result


if __name__ == "__main__":
    main()
