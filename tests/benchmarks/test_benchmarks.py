"""Benchmarks: the baselines compute the reference's function, and the commands write valid results.

No timing is asserted (speed goals are checked by the benchmarks themselves: docs/design.md, Benchmarks).
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"
import bench_margin  # noqa: E402
import bench_training  # noqa: E402
import formulations  # noqa: E402
import harness  # noqa: E402
import margin_providers  # noqa: E402
import margin_report  # noqa: E402

from angular.ops import reference  # noqa: E402

# The presets of docs/design.md, Math, written out here so that the benchmark's wiring of (s, m1, m2, m3) is checked
# against the spec rather than against itself.
SPEC_PRESETS = {
    "arcface": dict(s=64.0, m1=1.0, m2=0.5, m3=0.0),
    "cosface": dict(s=64.0, m1=1.0, m2=0.0, m3=0.35),
    "sphereface": dict(s=64.0, m1=4.0, m2=0.0, m3=0.0),
    "combined": dict(s=64.0, m1=1.0, m2=0.3, m3=0.2),
}
FUSED_REASON = harness.fused_unavailable_reason("cpu")
EAGER_PROVIDERS = ["reference", "insightface"] + ([] if FUSED_REASON else ["fused"])


def random_inputs(batch, classes, params, dtype, generator, *, past_pi=False):
    """Fresh random cosines with every target angle where ``t = m1 theta + m2`` stays below pi (or,
    with ``past_pi``, above it), a few rows without a target, and an upstream gradient."""
    cos = torch.empty(batch, classes, dtype=torch.float64).uniform_(
        -0.999, 0.999, generator=generator
    )
    labels = torch.randint(0, classes, (batch,), generator=generator)
    labels[::5] = -1  # rows with no target
    limit = (math.pi - params["m2"]) / params["m1"]
    low, high = (limit + 0.05, math.pi - 0.05) if past_pi else (0.05, limit - 0.05)
    theta = torch.empty(batch, dtype=torch.float64).uniform_(low, high, generator=generator)
    has_target = labels >= 0
    cos[torch.arange(batch)[has_target], labels[has_target]] = torch.cos(theta[has_target])
    grad_out = torch.randn(batch, classes, dtype=torch.float64, generator=generator)
    return cos.to(dtype), labels, grad_out.to(dtype)


def value_and_grad(fn, cos, labels, grad_out, op):
    leaf = cos.detach().clone().requires_grad_(True)
    out = fn(leaf, labels)
    (grad,) = torch.autograd.grad(out, leaf, None if op == "loss" else grad_out)
    return out.detach(), grad


@pytest.mark.parametrize("op", margin_providers.OPS)
@pytest.mark.parametrize("preset", sorted(SPEC_PRESETS))
@pytest.mark.parametrize("provider", EAGER_PROVIDERS)
def test_provider_matches_fp64_reference(provider, preset, op):
    """What each provider times equals the fp64 reference, value and gradient, where t <= pi: exactly
    in fp64, and within the fp32 tolerances of docs/design.md, Testing, in fp32."""
    seed = random.SystemRandom().randrange(2**31)  # fresh inputs each run; the seed is in failures
    generator = torch.Generator().manual_seed(seed)
    params = SPEC_PRESETS[preset]
    cos, labels, grad_out = random_inputs(37, 301, params, torch.float64, generator)
    oracle = getattr(reference, margin_providers.OP_NAMES[op])
    expected, expected_grad = value_and_grad(
        lambda c, y: oracle(c, y, **params), cos, labels, grad_out, op
    )
    fn = margin_providers.make_provider(provider, op, preset, "cpu")

    def close(actual, wanted, rtol, atol, what):
        torch.testing.assert_close(
            actual, wanted, rtol=rtol, atol=atol, msg=lambda m: f"{what}, seed {seed}: {m}"
        )

    got, got_grad = value_and_grad(fn, cos, labels, grad_out, op)
    close(got, expected, 1e-10, 1e-10, "fp64 value")
    close(got_grad, expected_grad, 1e-9, 1e-12, "fp64 gradient")

    got32, grad32 = value_and_grad(fn, cos.float(), labels, grad_out.float(), op)
    close(got32.double(), expected, 1e-5, 1e-5 * expected.abs().max(), "fp32 value")
    close(grad32.double(), expected_grad, 1e-4, 1e-4 * expected_grad.abs().max(), "fp32 gradient")


def test_insightface_has_no_extension_past_pi():
    """Past t = pi the insightface formulation is plain cos(t) (module doc), unlike the reference."""
    generator = torch.Generator().manual_seed(7)
    params = SPEC_PRESETS["sphereface"]
    cos, labels, _ = random_inputs(16, 64, params, torch.float64, generator, past_pi=True)
    ours = formulations.insightface_margin_logits(cos, labels, **params)
    theirs = reference.margin_logits(cos, labels, **params)
    has_target = labels >= 0
    rows = torch.arange(16)[has_target]
    targets = labels[has_target]
    assert not torch.allclose(ours[rows, targets], theirs[rows, targets])
    theta = torch.acos(cos[rows, targets])
    torch.testing.assert_close(ours[rows, targets], params["s"] * torch.cos(params["m1"] * theta))
    off_target = torch.ones_like(ours, dtype=torch.bool)
    off_target[rows, targets] = False
    torch.testing.assert_close(ours[off_target], theirs[off_target])


def test_insightface_keeps_input_dtype_and_fp32_loss():
    generator = torch.Generator().manual_seed(3)
    cos, labels, _ = random_inputs(8, 50, SPEC_PRESETS["arcface"], torch.bfloat16, generator)
    logits = formulations.insightface_margin_logits(cos, labels, **SPEC_PRESETS["arcface"])
    loss = formulations.insightface_margin_cross_entropy(cos, labels, **SPEC_PRESETS["arcface"])
    assert logits.dtype == torch.bfloat16 and logits.shape == cos.shape
    assert loss.dtype == torch.float32 and loss.dim() == 0 and torch.isfinite(loss)


def test_quick_grid_and_default_grids():
    parse = bench_margin.build_parser().parse_args
    quick = bench_margin.resolve_settings(parse(["--quick", "--device", "cpu"]))
    cases = bench_margin.build_cases(quick["grid"], "cpu")
    assert {(c.op, c.B, c.C, c.dtype, c.preset) for c in cases} == {
        ("loss", 256, 8192, "fp32", "arcface"),
        ("loss", 256, 32768, "fp32", "arcface"),
    }
    assert quick["providers"] == bench_margin.PROVIDERS and quick["passes"] == ("fwd", "fwd+bwd")

    cpu = bench_margin.resolve_settings(parse(["--device", "cpu"]))
    cases = bench_margin.build_cases(cpu["grid"], "cpu")
    # ArcFace everywhere (3 B x 3 C x 2 dtypes x 2 ops), the other presets at the focus shape.
    assert len(cases) == 36 + 3 * 2 * 2
    assert {(c.B, c.C) for c in cases if c.preset != "arcface"} == {(256, 32768)}
    assert (cases[0].B, cases[0].C) == (256, 32768)  # the focus shape runs first
    assert cpu["time_budget_s"] is None


def test_command_line_rejects_bad_values(capsys):
    parser = bench_margin.build_parser()
    for argv, named in [
        (["--providers", "reference,nope"], "--providers"),
        (["--B", "0"], "--B"),
        (["--C", "12x"], "--C"),
        (["--dtypes", "fp8"], "--dtypes"),
        (["--presets", "normface"], "--presets"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(argv)
        assert exit_info.value.code == 2
        message = capsys.readouterr().err
        assert named in message and argv[1].split(",")[-1] in message


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    completed = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed


def test_help(capsys):
    for module, option in [(bench_margin, "--providers"), (bench_training, "--backends")]:
        with pytest.raises(SystemExit) as exit_info:
            module.build_parser().parse_args(["--help"])
        assert exit_info.value.code == 0 and option in capsys.readouterr().out


def test_quick_tiny_grid_writes_valid_results(tmp_path):
    providers = ["fused", "reference", "insightface"]
    _run(
        "bench_margin.py",
        "--quick",
        "--device=cpu",
        "--threads=1",
        "--B=8",
        "--C=64,512",
        "--ops=loss,logits",
        f"--providers={','.join(providers)}",
        "--min-run-time=0.01",
        f"--out={tmp_path}",
    )
    result = json.loads((tmp_path / "bench_margin.json").read_text())
    machine = result["machine"]
    assert machine["device"] == "cpu" and machine["threads"] == 1
    assert machine["torch_version"] == torch.__version__ and machine["cpu_model"]
    assert result["providers"]["fused"]["available"] is (FUSED_REASON is None)
    assert result["providers"]["fused"]["reason"] == FUSED_REASON

    measurements = result["measurements"]
    assert len(measurements) == 2 * 2 * 2 * len(providers)  # C x ops x passes x providers
    for entry in measurements:
        if entry["provider"] == "fused" and FUSED_REASON:
            assert entry["status"] == "unavailable" and entry["reason"] == FUSED_REASON
            assert entry["median_ms"] is None
            continue
        assert entry["status"] == "ok", entry
        assert entry["median_ms"] > 0 and entry["iqr_ms"] >= 0 and entry["runs"] >= 1
        # Every measured call returns at least one B x C tensor (logits or gradient) except the
        # loss forward, which may keep nothing of that size (the fused kernel).
        if (entry["op"], entry["pass"]) != ("loss", "fwd"):
            assert entry["peak_extra_bxc"] >= 0.99, entry

    markdown = (tmp_path / "bench_margin.md").read_text()
    assert "### Headline" in markdown and "### All configurations" in markdown
    table_rows = [
        line
        for line in markdown.splitlines()
        if line.startswith("| loss") or line.startswith("| logits")
    ]
    assert len(table_rows) == 2 * 2 * 2
    if FUSED_REASON:
        assert "fused provider unavailable" in markdown and "fused ms" not in markdown
    else:
        assert "reference/fused" in markdown
    assert (tmp_path / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_headline_marks_targets_met_and_missed():
    """The headline check on a hand-made result: 3.5x and 2x meet their targets, 7x misses 8x."""

    def entry(provider, median_ms, bxc=3.0):
        return dict(
            op="loss", **{"pass": "fwd+bwd"}, B=256, C=32768, dtype="fp32", preset="arcface",
            provider=provider, status="ok", median_ms=median_ms, iqr_ms=0.1, runs=10, samples=10,
            peak_extra_bytes=int(bxc * 256 * 32768 * 4), peak_extra_bxc=bxc, compile_s=None,
        )  # fmt: skip

    result = dict(
        machine=dict(device="cpu", threads=2, gpu_name=None),
        measurements=[
            entry("fused", 10.0, bxc=1.0),
            entry("reference", 35.0),
            entry("insightface", 70.0),
            entry("compiled", 20.0),
        ],
    )
    (row,) = margin_report.headline(result)["rows"]
    met = {check["target"]: check["met"] for check in row["checks"]}
    assert met == {
        "fused >= 3x reference": True,
        "fused >= 8x insightface": False,
        "fused >= 1.5x compiled": True,
        "fused extra memory <= 1 B x C buffer": True,
    }


def test_training_benchmark_tiny_run(tmp_path):
    # The parent in this process; each backend still runs in its own worker process.
    bench_training.main(
        [
            "--device=cpu",
            "--threads=1",
            "--cases=digits",
            "--batch=16",
            "--steps=2",
            "--warmup=1",
            "--repeats=1",
            f"--out={tmp_path}",
        ]
    )
    result = json.loads((tmp_path / "bench_training.json").read_text())
    runs = {run["backend_requested"]: run for run in result["runs"]}
    assert set(runs) == {"fused", "python"}
    python = runs["python"]
    assert python["status"] == "ok" and python["backend_served"] == "python"
    assert python["images_per_s"] > 0 and math.isfinite(python["final_loss"])
    # The fused worker ignores ANGULAR_BACKEND from this environment: it gets the kernels whenever
    # the extension is built, and is never timed on the reference.
    fused = runs["fused"]
    assert fused["status"] in ("ok", "unavailable"), fused
    if fused["status"] == "ok":
        assert fused["backend_served"] != "python" and fused["images_per_s"] > 0
    else:
        assert fused["reason"] and "images_per_s" not in fused
    assert "| digits | 10 |" in (tmp_path / "bench_training.md").read_text()
    # On the CPU each case runs with the C library's heap and with freed buffers kept mapped, each
    # in its own processes, and the per-step median and worst are recorded.
    states = {(run["heap"], run["heap_state"]) for run in result["runs"]}
    if not any(name.startswith("MALLOC_") for name in os.environ):
        assert states == {("cold", "cold"), ("warm", "warm")}, states
    markdown = (tmp_path / "bench_training.md").read_text()
    assert "| digits | 10 | cold |" in markdown and "| digits | 10 | warm |" in markdown
    for run in result["runs"]:
        if run["status"] == "ok":
            assert len(run["step_ms_all"]) == 2 and run["step_ms_worst"] >= run["step_ms_median"]


def test_training_worker_reports_unavailable_fused_backend(monkeypatch):
    """Without a kernel the fused run is recorded as unavailable, never timed on the reference."""
    monkeypatch.setattr(bench_training.harness, "has_fused_kernel", lambda device: False)
    spec = dict(case="digits", classes=10, backend="fused", device="cpu", heap="cold", threads=1, batch=4,
                steps=1, warmup=1, repeats=1)  # fmt: skip
    threads = torch.get_num_threads()
    try:
        result = bench_training.run_worker(spec)
    finally:
        torch.set_num_threads(threads)  # the worker sets the thread count for its process
    assert result["status"] == "unavailable" and result["reason"]
    assert "images_per_s" not in result
