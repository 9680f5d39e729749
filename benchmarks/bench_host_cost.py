"""Host cost of the fused margin loss (issue 26, "CPU, host cost"): a forward and backward at a tiny
shape (B = 4, C = 8 by default) on one thread, where the time is all dispatch, Python and autograd,
against ``F.cross_entropy(s * cos)`` measured in the same run. Target: the fused op within 1.3x.

Timing: each provider's step (forward, then ``torch.autograd.grad`` of the loss) is run ``--warmup``
times, then timed one call at a time (``harness.timed_runs``) in ``--rounds`` rounds that alternate
between the providers (so that a change in machine load hits both alike); the reported figure is
the median over every timed call, with the interquartile range.

Optionally (``--throughput``), the CPU throughput case of the same issue: B = 256, C = 32,768 fp32
forward and backward on all threads, against a memory roofline measured in the same run: the time
of streaming the bytes an ideal kernel moves (read cos twice, write the gradient: ``copy_`` of the
(B, C) matrix, which reads once and writes once, plus one more read, ``sum``), target within 2.5x.

Prints a table and writes ``OUT/bench_host_cost.json`` when ``--out`` is given.

    .venv/bin/python benchmarks/bench_host_cost.py [--repeats 2000] [--throughput [--heap warm]]
        [--out DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import harness
import torch
import torch.nn.functional as F

from angular import ops

TARGET_HOST_RATIO = 1.3
TARGET_ROOFLINE_RATIO = 2.5


def loss_step(loss_fn, cos: torch.Tensor, labels: torch.Tensor, s: float):
    """One training step of a loss: forward, then the gradient of the loss with respect to cos."""
    leaf = cos.detach().requires_grad_()

    def step():
        return torch.autograd.grad(loss_fn(leaf, labels, s), leaf)

    return step


def fused_loss(cos, labels, s):
    return ops.margin_cross_entropy(cos, labels, s=s, m2=0.5)


def eager_baseline(cos, labels, s):
    return F.cross_entropy(s * cos, labels)


def interleaved_medians(steps: dict, warmup: int, repeats: int, rounds: int) -> dict:
    """``{name: (median µs, IQR µs, calls)}`` over ``rounds`` alternating rounds of each step."""
    times = {name: [] for name in steps}
    for step in steps.values():
        harness.timed_runs(step, warmup, 0)
    per_round = max(1, repeats // rounds)
    for _ in range(rounds):
        for name, step in steps.items():
            times[name] += harness.timed_runs(step, 0, per_round)
    result = {}
    for name, seconds in times.items():
        median, iqr = harness.quantiles([t * 1e6 for t in seconds])
        result[name] = (median, iqr, len(seconds))
    return result


def host_cost(batch: int, classes: int, warmup: int, repeats: int, rounds: int) -> dict:
    torch.manual_seed(0)
    cos = torch.rand(batch, classes) * 2 - 1
    labels = torch.randint(0, classes, (batch,))
    steps = {
        "fused": loss_step(fused_loss, cos, labels, 64.0),
        "F.cross_entropy(s * cos)": loss_step(eager_baseline, cos, labels, 64.0),
    }
    timed = interleaved_medians(steps, warmup, repeats, rounds)
    ratio = timed["fused"][0] / timed["F.cross_entropy(s * cos)"][0]
    return {
        "shape": [batch, classes],
        "threads": torch.get_num_threads(),
        "times_us": {
            name: {"median": m, "iqr": q, "calls": n} for name, (m, q, n) in timed.items()
        },
        "ratio": ratio,
        "target": TARGET_HOST_RATIO,
        "met": ratio <= TARGET_HOST_RATIO,
    }


def throughput(batch: int, classes: int, repeats: int) -> dict:
    """Fused forward + backward against the memory roofline of its traffic, both on all threads."""
    torch.manual_seed(0)
    cos = torch.rand(batch, classes) * 2 - 1
    labels = torch.randint(0, classes, (batch,))
    out = torch.empty_like(cos)
    step = loss_step(fused_loss, cos, labels, 64.0)

    def roofline():  # read cos twice, write one (B, C) matrix: what an ideal fwd+bwd moves
        out.copy_(cos)
        cos.sum()

    times = {}
    for action in (step, roofline):
        harness.timed_runs(action, 3, 0)
    for name, action in (("fused", step), ("roofline", roofline), ("fused", step)):
        times.setdefault(name, []).extend(harness.timed_runs(action, 0, repeats))
    fused_ms = statistics.median(times["fused"]) * 1e3
    roof_ms = statistics.median(times["roofline"]) * 1e3
    return {
        "shape": [batch, classes],
        "threads": torch.get_num_threads(),
        "fused_ms": fused_ms,
        "roofline_ms": roof_ms,
        "ratio": fused_ms / roof_ms,
        "target": TARGET_ROOFLINE_RATIO,
        "met": fused_ms / roof_ms <= TARGET_ROOFLINE_RATIO,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=harness.positive_int("--batch"), default=4)
    parser.add_argument("--classes", type=harness.positive_int("--classes"), default=8)
    parser.add_argument("--warmup", type=harness.positive_int("--warmup"), default=200)
    parser.add_argument("--repeats", type=harness.positive_int("--repeats"), default=2000)
    parser.add_argument("--rounds", type=harness.positive_int("--rounds"), default=10)
    parser.add_argument(
        "--throughput",
        action="store_true",
        help="also time B = 256, C = 32,768 on all threads against the memory roofline",
    )
    parser.add_argument(
        "--throughput-shape",
        type=harness.int_list("--throughput-shape"),
        default=(256, 32768),
        help="B,C of the throughput case (default 256,32768)",
    )
    parser.add_argument(
        "--throughput-repeats", type=harness.positive_int("--throughput-repeats"), default=10
    )
    parser.add_argument(
        "--throughput-threads",
        type=harness.positive_int("--throughput-threads"),
        default=None,
        help="threads of the throughput case (default: torch's default, all cores)",
    )
    parser.add_argument(
        "--heap",
        choices=harness.HEAP_MODES,
        default="cold",
        help="CPU heap of the throughput case (harness.set_heap; warm: as the pipeline runs)",
    )
    parser.add_argument("--out", type=Path, default=None, help="folder for bench_host_cost.json")
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if len(args.throughput_shape) != 2:
        parser.error("--throughput-shape: expected B,C")
    if not harness.has_fused_kernel("cpu"):
        sys.exit(
            f"bench_host_cost: no fused CPU kernel ({harness.fused_unavailable_reason('cpu')})"
        )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    result = {
        "machine": harness.machine_description("cpu", 1),
        "host_cost": host_cost(args.batch, args.classes, args.warmup, args.repeats, args.rounds),
    }
    torch.set_num_threads(threads)
    cost = result["host_cost"]
    print(f"host cost, B={args.batch} C={args.classes}, 1 thread, fwd+bwd (median, IQR, calls):")
    for name, t in cost["times_us"].items():
        print(f"  {name:26s} {t['median']:8.1f} us  (IQR {t['iqr']:.1f}, {t['calls']} calls)")
    print(
        f"  ratio {cost['ratio']:.2f}x (target <= {TARGET_HOST_RATIO}x: {'met' if cost['met'] else 'missed'})"
    )
    if args.throughput:
        batch, classes = args.throughput_shape
        heap_state = harness.set_heap(args.heap)
        torch.set_num_threads(args.throughput_threads or threads)
        result["throughput"] = tp = throughput(batch, classes, args.throughput_repeats)
        torch.set_num_threads(threads)
        tp["heap"] = heap_state
        print(
            f"throughput, B={batch} C={classes} fp32, {tp['threads']} threads, heap {heap_state}: "
            f"fused {tp['fused_ms']:.2f} ms, "
            f"roofline {tp['roofline_ms']:.2f} ms, ratio {tp['ratio']:.2f}x "
            f"(target <= {TARGET_ROOFLINE_RATIO}x: {'met' if tp['met'] else 'missed'})"
        )
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        harness.replace_file(args.out / "bench_host_cost.json", harness.json_text(result))
    return result


if __name__ == "__main__":
    main()
