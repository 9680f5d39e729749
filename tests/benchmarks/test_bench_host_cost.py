"""benchmarks/bench_host_cost.py (issue 26, CPU host cost and throughput): a tiny run writes a result
whose ratio is the quotient of the two medians it reports, and bad options are refused."""

from __future__ import annotations

import json

import bench_host_cost
import pytest
import torch

from angular import ops


@pytest.fixture(autouse=True)
def _fused_cpu_kernels():
    if not ops.has_fused_kernel("cpu"):
        pytest.skip("the fused CPU kernels are not built")


def test_tiny_run_writes_consistent_results(tmp_path):
    threads = torch.get_num_threads()
    result = bench_host_cost.main(
        [
            "--warmup=3",
            "--repeats=20",
            "--rounds=2",
            "--throughput",
            "--throughput-shape=8,300",
            "--throughput-repeats=2",
            "--heap=warm",
            f"--out={tmp_path}",
        ]
    )
    assert torch.get_num_threads() == threads, "the thread count is restored"
    written = json.loads((tmp_path / "bench_host_cost.json").read_text())
    assert written["host_cost"] == json.loads(json.dumps(result["host_cost"]))
    cost = written["host_cost"]
    assert cost["shape"] == [4, 8] and cost["threads"] == 1
    fused, eager = cost["times_us"]["fused"], cost["times_us"]["F.cross_entropy(s * cos)"]
    assert fused["calls"] == eager["calls"] == 20
    assert fused["median"] > 0 and eager["median"] > 0
    assert cost["ratio"] == pytest.approx(fused["median"] / eager["median"])
    assert cost["met"] == (cost["ratio"] <= bench_host_cost.TARGET_HOST_RATIO)
    throughput = written["throughput"]
    assert throughput["shape"] == [8, 300] and throughput["heap"] == "warm"
    assert throughput["ratio"] == pytest.approx(throughput["fused_ms"] / throughput["roofline_ms"])
    assert written["machine"]["device"] == "cpu" and written["machine"]["threads"] == 1


@pytest.mark.parametrize(
    "argv", [["--repeats=0"], ["--throughput-shape=256"], ["--heap=hot"], ["--batch=x"]]
)
def test_bad_options_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_host_cost.main(argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err
