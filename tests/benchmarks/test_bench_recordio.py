"""bench_recordio.py runs end to end on a few synthetic faces and writes a valid table and JSON
(no timing asserted), so the script cannot rot unseen."""

from __future__ import annotations

import json
from pathlib import Path

import bench_recordio


def test_bench_recordio_smoke(tmp_path: Path):
    source = bench_recordio.synthetic_set(tmp_path / "rec", 24, classes=3)
    bench_recordio.main(
        ["--source", str(source), "--repeats", "1", "--batch-size", "8", "--out", str(tmp_path)]
    )
    document = json.loads((tmp_path / "bench_recordio.json").read_text())
    assert document["faces"] == 24
    assert {(row["source"], row["workers"]) for row in document["rows"]} == {
        (source, workers)
        for source in (bench_recordio.REC, bench_recordio.FOLDER)
        for workers in bench_recordio.WORKERS
    }
    assert all(row["images_per_s"] > 0 for row in document["rows"])
    table = (tmp_path / "bench_recordio.md").read_text()
    assert "| workers | .rec images/s |" in table and table.count("\n| ") >= 4
