"""Benchmark of the sharded margin head (angular.nn.sharded) on W gloo processes on this machine.

For each world size W (one spawn of W processes each, 1 thread per process), class count C and
sample rate, every rank runs training steps of the head alone (ArcFace, D = 512, B = 64 rows per
rank, fp32, SGD with momentum and weight decay) on random embeddings, and reports per rank:

- memory of the head, from tensors actually allocated: the centres and the optimizer state
  (``nbytes`` of the tensors after a step), plus the peak of the profiler's allocation events
  during one step (``profile_memory=True``: the centres' gradient, the sampled centres, the
  cosines ("logits") and their gradient, the gathered batch). "logits" is the size of the (W B,
  C_sample) cosine matrix the step built, counted once for itself and once for its gradient (0 from
  C = 8192 on, ``fused_linear``: the fused linear op, one-process or in shard mode, forms none);
- the *extra* memory of the loss's forward and backward: the profiler's peak during them (the
  gradients set to None first) minus the centres' gradient, i.e. everything beyond the shard's
  weights and gradient (issue 28's target: at most 64 MiB per rank at C = 1M, D = 512, W = 2, 4);
- the step time (forward, backward and optimizer step): the median over the timed steps, each
  timed between barriers;
- the bytes communicated per step: the sum of the result buffers of the collectives the head ran
  (``angular.ops.sharded.count_communication``), 0 for W = 1 (no process group: the single-process
  head).

Targets: per-rank head memory <= 1.1 / W of the W = 1 figure (issue 12; issue 28 allows 1.2 / W);
sample_rate 0.1 cuts the per-rank logits memory >= 8x below C = 8192 (from there on the fused op forms
no logits); communication does not grow with C; the extra memory of the loss <= 64 MiB per rank at
C = 1M (issue 28).

Writes ``OUT/bench_distributed.json`` and ``OUT/bench_distributed.md``. Configurations whose
estimated memory does not fit in the machine's available memory are skipped, and say so.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import harness
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from angular.nn.heads import FUSED_LINEAR_MIN_CLASSES, MarginSpec
from angular.nn.sharded import ShardedMarginHead
from angular.ops.sharded import count_communication

EMBEDDING_DIM = 512
ROWS_PER_RANK = 64
FLOAT_BYTES = 4
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=20)


def estimated_bytes(world_size: int, classes: int, rate: float) -> int:
    """All ranks together: centres, gradient, momentum (3 x C x D; 4 while the centres are drawn) and
    the logits."""
    sampled = classes * rate
    logits = 2 * world_size * ROWS_PER_RANK * sampled * FLOAT_BYTES
    if classes >= FUSED_LINEAR_MIN_CLASSES:
        logits = 0  # the fused linear op forms no cosines
    return int(4 * classes * EMBEDDING_DIM * FLOAT_BYTES + world_size * logits)


def measure(rank: int, world_size: int, classes: int, rate: float, steps: int) -> dict:
    head = ShardedMarginHead(EMBEDDING_DIM, classes, MarginSpec.arcface(), sample_rate=rate)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(rank)
    x = torch.randn(ROWS_PER_RANK, EMBEDDING_DIM, generator=generator).requires_grad_()
    labels = torch.randint(0, classes, (ROWS_PER_RANK,), generator=generator)
    logits_bytes = []
    build_cosine = head.cosine

    def recording_cosine(*args):
        cos = build_cosine(*args)
        logits_bytes.append(cos.nbytes)
        return cos

    head.cosine = recording_cosine

    def step(_=None):
        optimizer.zero_grad()
        head.loss(x, labels).backward()
        optimizer.step()

    def loss_pass(_=None):
        head.loss(x, labels).backward()

    def barrier():
        if world_size > 1:
            dist.barrier()

    # W = 1 at rate 1 is MarginHead's computation, which does not go through head.cosine: its
    # (B, C) cosines from the matmul below FUSED_LINEAR_MIN_CLASSES, none with the fused linear op.
    single_process_logits = (
        0 if classes >= FUSED_LINEAR_MIN_CLASSES else 2 * ROWS_PER_RANK * classes * FLOAT_BYTES
    )
    step()  # allocates the optimizer state
    with count_communication() as communication:
        step()
    times = []
    for _ in range(steps):
        barrier()
        start = time.perf_counter()
        step()
        barrier()
        times.append(time.perf_counter() - start)
    peak_step = harness.peak_extra_cpu(step, None)
    optimizer.zero_grad(set_to_none=True)
    x.grad = None
    barrier()
    loss_extra = harness.peak_extra_cpu(loss_pass, None) - head.weight.nbytes
    state = sum(
        tensor.nbytes
        for values in optimizer.state.values()
        for tensor in values.values()
        if isinstance(tensor, torch.Tensor)
    )
    centres = head.weight.nbytes
    return dict(
        rank=rank,
        world_size=world_size,
        classes=classes,
        sample_rate=rate,
        class_count=head.class_count,
        centres_bytes=centres,
        optimizer_state_bytes=state,
        step_peak_bytes=peak_step,
        loss_extra_bytes=loss_extra,
        head_bytes=centres + state + peak_step,
        logits_bytes=2 * logits_bytes[-1] if logits_bytes else single_process_logits,
        step_ms=[1000 * t for t in times],
        median_step_ms=1000 * statistics.median(times),
        communication_bytes=communication["bytes"],
        collectives=communication["calls"],
    )


def _worker(rank: int, world_size: int, folder: str, configs: list, steps_for: dict) -> None:
    torch.set_num_threads(1)
    if world_size > 1:
        store = dist.FileStore(os.path.join(folder, "store"), world_size)
        dist.init_process_group(
            "gloo", store=store, rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT
        )
    results = []
    for classes, rate in configs:
        results.append(measure(rank, world_size, classes, rate, steps_for[classes]))
        print(f"W={world_size} rank {rank} C={classes} rate={rate}: done", flush=True)
    torch.save(results, os.path.join(folder, f"rank-{rank}.pt"))
    if world_size > 1:
        dist.destroy_process_group()


def run_world(world_size: int, configs: list, steps_for: dict) -> list[dict]:
    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(
            _worker,
            args=(world_size, folder, configs, steps_for),
            nprocs=world_size,
            start_method="spawn",
        )
        per_rank = [torch.load(Path(folder) / f"rank-{r}.pt") for r in range(world_size)]
    return [entry for rank in per_rank for entry in rank]


def summarise(rows: list[dict]) -> list[dict]:
    """One line per (W, C, rate): the largest rank's memory, the slowest rank's median."""
    lines = {}
    for row in rows:
        key = (row["world_size"], row["classes"], row["sample_rate"])
        line = lines.setdefault(key, dict(world_size=key[0], classes=key[1], sample_rate=key[2]))
        for field in (
            "head_bytes",
            "logits_bytes",
            "loss_extra_bytes",
            "median_step_ms",
            "communication_bytes",
        ):
            line[field] = max(line.get(field, 0), row[field])
    base = {(c, r): line for (w, c, r), line in lines.items() if w == 1}
    for (_, classes, rate), line in lines.items():
        one = base.get((classes, rate))
        full = lines.get((line["world_size"], classes, 1.0))
        line["head_vs_w1"] = line["head_bytes"] / one["head_bytes"] if one else None
        line["logits_cut_by_sampling"] = (
            full["logits_bytes"] / line["logits_bytes"]
            if full and full["logits_bytes"] and line["logits_bytes"]
            else None
        )
    return sorted(lines.values(), key=lambda s: (s["classes"], s["sample_rate"], s["world_size"]))


def render(result: dict) -> str:
    mib = 2**20
    out = [
        f"Machine: {result['machine']}, load average {result['load_average']} at the start.",
        f"Steps timed per configuration: {result['steps']}. D = {EMBEDDING_DIM}, B = "
        f"{ROWS_PER_RANK} per rank, fp32, ArcFace, SGD (momentum 0.9, weight decay).",
        "",
        *harness.table_header(
            [
                "W",
                "C",
                "rate",
                "head MiB / rank (max)",
                "vs W=1",
                "target 1.1/W",
                "logits MiB / rank",
                "cut by rate 0.1",
                "loss extra MiB / rank (target 64 at C = 1M)",
                "step ms (median)",
                "bytes sent / step",
            ]
        ),
    ]
    for line in result["summary"]:
        ratio = line["head_vs_w1"]
        cut = line["logits_cut_by_sampling"]
        out.append(
            f"| {line['world_size']} | {line['classes']:,} | {line['sample_rate']} | "
            f"{line['head_bytes'] / mib:,.0f} | {'' if ratio is None else f'{ratio:.3f}'} | "
            f"{1.1 / line['world_size']:.3f} | {line['logits_bytes'] / mib:,.1f} | "
            f"{'' if cut is None or line['sample_rate'] == 1.0 else f'{cut:.1f}x'} | "
            f"{line['loss_extra_bytes'] / mib:,.1f} | "
            f"{line['median_step_ms']:,.0f} | {line['communication_bytes']:,} |"
        )
    for skipped in result["skipped"]:
        out.append(f"\nSkipped: {skipped}")
    return "\n".join(out) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", default="1,2,4", help="world sizes, e.g. 1,2,4")
    parser.add_argument("--classes", default="100000,1000000", help="class counts")
    parser.add_argument("--rates", default="1.0,0.1", help="sample rates")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (C <= 100,000)")
    parser.add_argument("--large-steps", type=int, default=2, help="timed steps for larger C")
    parser.add_argument("--quick", action="store_true", help="W 1,2; C 1000,4000; 2 steps")
    harness.add_out_argument(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.worlds, args.classes, args.steps = "1,2", "1000,4000", 2
    worlds = [int(w) for w in args.worlds.split(",")]
    class_counts = [int(c) for c in args.classes.split(",")]
    rates = [float(r) for r in args.rates.split(",")]
    steps_for = {c: args.steps if c <= 100_000 else args.large_steps for c in class_counts}
    result = dict(
        machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__}",
        load_average=" ".join(f"{v:.2f}" for v in os.getloadavg()),
        steps=steps_for,
        rows=[],
        skipped=[],
    )
    # Class counts outermost: the small ones are measured (and written) first.
    for classes in class_counts:
        for world_size in worlds:
            configs = []
            for rate in rates:
                need, free = (
                    estimated_bytes(world_size, classes, rate),
                    harness.available_memory_bytes(),
                )
                if need > 0.8 * free:
                    result["skipped"].append(
                        f"W={world_size} C={classes:,} rate={rate}: about {need / 2**30:.1f} GiB "
                        f"needed, {free / 2**30:.1f} GiB available"
                    )
                    continue
                configs.append((classes, rate))
            if configs:
                result["rows"] += run_world(world_size, configs, steps_for)
            write(result, args.out)  # after every run: a long benchmark keeps what it measured
    print(write(result, args.out))
    return result


def write(result: dict, out: Path) -> str:
    result["summary"] = summarise(result["rows"])
    result["load_average_end"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_distributed.json").write_text(harness.json_text(result))
    markdown = render(result) + f"\nLoad average at the end: {result['load_average_end']}.\n"
    (out / "bench_distributed.md").write_text(markdown)
    return markdown


if __name__ == "__main__":
    main()
