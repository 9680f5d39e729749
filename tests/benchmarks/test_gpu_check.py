"""benchmarks/gpu_check.sh cannot rot unseen: its own steps, walked on a CPU with ``--dry-run`` (no
build; the CUDA tests collected, not run; the benchmark on a tiny CPU grid with the GPU run's
options), and what it promises the one GPU run: a clear stop without a GPU, at most 8 files, the
summary table last, and a benchmark grid with odd class counts whose results are written as they
come.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
BENCHMARKS = ROOT / "benchmarks"

import bench_margin  # noqa: E402
import margin_providers  # noqa: E402
import margin_report  # noqa: E402


def run_script(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_DEADLINE_S="400")
    env.pop("OUT", None)
    return subprocess.run(
        ["bash", str(SCRIPT), *args, str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_dry_run_walks_every_step(tmp_path):
    result = run_script(tmp_path, "--dry-run")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    files = sorted(path.name for path in tmp_path.rglob("*") if path.is_file())
    assert len(files) <= 8, files
    assert {"gpu_check.log", "logs.tar.gz", "bench_margin.json", "bench_margin.md"} <= set(files)

    # The summary table is the last thing on stdout, every step ok.
    tail = result.stdout.rstrip().splitlines()
    assert tail[-1].startswith("total ")
    table = tail[tail.index(next(line for line in tail if line.startswith("step "))) + 1 : -1]
    steps = {line.split()[0]: line.split()[1] for line in table}
    assert {"build", "cuda-tests", "benchmark"} <= set(steps), table
    assert set(steps.values()) == {"ok"}, table
    assert "DRY RUN" in result.stdout

    with tarfile.open(tmp_path / "logs.tar.gz") as bundle:
        names = {Path(name).name for name in bundle.getnames()}
        assert {"environment.txt", "build.log", "pytest_cuda.log", "bench_margin.log"} <= names
        collected = bundle.extractfile("./pytest_cuda.log").read().decode()
    # The CUDA tests were collected (so they import), the new layout cases among them.
    assert "test_fused_cuda.py::test_odd_classes_and_storage_offsets" in collected
    assert "test_fused_cuda.py::test_training_step_captures_in_a_cuda_graph" in collected
    last = collected.strip().splitlines()[-1]
    assert "tests collected" in last and "error" not in last, last

    measured = json.loads((tmp_path / "bench_margin.json").read_text())
    assert measured["complete"] and measured["machine"]["device"] == "cpu"
    assert {m["status"] for m in measured["measurements"]} == {"ok"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_stops_at_once(tmp_path):
    result = run_script(tmp_path)
    assert result.returncode == 2, result.stdout[-3000:]
    assert "torch.cuda.is_available() is False" in result.stdout
    assert "--dry-run" in result.stdout
    assert "build" not in result.stdout.split("step ")[-1]  # nothing after the stop
    assert sorted(path.name for path in tmp_path.iterdir()) == ["gpu_check.log", "logs.tar.gz"]


def test_default_cuda_grid_has_odd_class_counts_beside_powers_of_two():
    grid = dict(
        bench_margin.DEFAULT_GRID["cuda"],
        presets=None,
        ops=margin_providers.OPS,
        extra=bench_margin.ODD_GRID["cuda"],
    )
    cases = bench_margin.build_cases(grid, "cuda")
    assert (cases[0].B, cases[0].C) == margin_providers.FOCUS_SHAPE["cuda"]
    shapes = {(c.op, c.B, c.C, c.dtype) for c in cases}
    for op in margin_providers.OPS:
        for batch in (128, 512):
            for dtype in ("fp32", "bf16"):
                assert {(op, batch, 85742, dtype), (op, batch, 360232, dtype)} <= shapes
                assert {(op, batch, 100000, dtype), (op, batch, 1000000, dtype)} <= shapes
    assert len(cases) == len(set(cases))


def test_benchmark_writes_results_after_each_configuration(tmp_path):
    args = bench_margin.build_parser().parse_args(
        [
            "--device=cpu",
            "--threads=1",
            "--B=4",
            "--C=16,40",
            "--dtypes=fp32",
            "--ops=loss",
            "--passes=fwd",
            "--providers=reference",
            "--min-run-time=0.01",
            f"--out={tmp_path}",
        ]
    )
    settings = bench_margin.resolve_settings(args)
    seen = []
    result = bench_margin.run_benchmark(settings, [], lambda partial: seen.append(partial))
    assert [len(p["measurements"]) for p in seen] == [1, 2]
    assert [len(p["not_run"]) for p in seen] == [1, 0]
    assert not any(p["complete"] for p in seen) and result["complete"]
    assert "Partial results" in margin_report.render_markdown(seen[0])
    assert "Partial results" not in margin_report.render_markdown(result)
