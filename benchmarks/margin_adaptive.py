"""``bench_margin.py --adaptive``: per-row margins and negative modulation (docs/design.md, Per-row
margins and negative modulation), the fused ops with per-row or modulated margins against the scalar
fused op and the heads' published eager forwards (``formulations.py``). CPU, loss forward+backward,
fp32; writes ``OUT/bench_adaptive.{json,md}``."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import formulations
import harness
import torch
from margin_providers import Case, make_inputs

from angular import ops

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
    reason = harness.fused_unavailable_reason("cpu")
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
            row["median_ms"], row["iqr_ms"] = harness.quantiles(times)
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
        machine=harness.machine_description("cpu", settings["threads"]),
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


def run_and_write(settings: dict, out: Path) -> dict:
    """Runs the benchmark; writes ``OUT/bench_adaptive.json`` and ``OUT/bench_adaptive.md``."""
    result = run_adaptive(settings)
    markdown = render_adaptive_markdown(result)
    (out / "bench_adaptive.json").write_text(harness.json_text(result))
    (out / "bench_adaptive.md").write_text(markdown)
    print()
    print(markdown)
    return result
