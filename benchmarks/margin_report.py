"""The report of ``bench_margin.py``: the issue's targets checked against a run (the headline), the
markdown table of every configuration, and the chart (benchmarks/README.md, ``bench_margin.py``)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import harness
from margin_providers import BASELINES, FOCUS_SHAPE, OPS, PASSES, PROVIDERS

COLORS = dict(zip(PROVIDERS, ("C0", "C1", "C2", "C3")))  # one colour per provider in both panels
CPU_TARGETS = {"reference": 3.0, "insightface": 8.0, "compiled": 1.5}
CPU_MEMORY_TARGET_BXC = 1.0
GPU_TARGETS = {"reference": 5.0, "compiled": 1.5}
GPU_COPY_FRACTION_TARGET = 0.8
# Per-row vectors (B entries) ride on top of the one B x C gradient; allow them 1%.
MEMORY_SLACK = 1.01


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
        f"CPU, {harness.threads_label(threads)}, B={batch}, C={classes}, fp32, "
        "loss forward+backward (ArcFace)"
        if device == "cpu"
        else f"GPU ({machine['gpu_name']}), B={batch}, C={classes}, loss forward+backward (ArcFace)"
    )
    note = None
    if device == "cpu" and threads != 2:
        note = f"the CPU targets are set for 2 threads; this run used {threads}"
    return dict(title=title, rows=rows, note=note)


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
        harness.machine_line(machine),
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
        *harness.table_header(header),
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
        lines.append(harness.table_row(cells))
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
            "fused provider unavailable:\n" + "\n".join(textwrap.wrap(reason, 50)),
            ha="center",
            va="center",
            transform=right.transAxes,
        )
        right.set_axis_off()
    machine = result["machine"]
    figure.suptitle(
        f"{machine['gpu_name'] or machine['cpu_model']}, "
        f"{harness.threads_label(machine['threads'])}, "
        f"torch {machine['torch_version']}, {machine['date'][:10]}",
        fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
