"""On CPU, two runs of the pipeline with the same params give identical metrics and plots files;
another seed gives other ones (docs/reliability.md, Determinism).

Each stage runs as its own process, as DVC runs it (``python -m pipeline.<stage>``), and the two
runs use different ``PYTHONHASHSEED`` values, so nothing may depend on the order of a set or on
state left in an interpreter. The config is the shipped one made small (one head, two epochs) to
keep CI fast; tests/pipeline/test_end_to_end.py runs the same comparison in-process on two heads.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
from reliability_testing import run_stage_process, tiny_raw, write_params

pytestmark = pytest.mark.slow

STAGES = [("prepare",), ("train", "arcface"), ("calibrate", "arcface"), ("evaluate",)]
OUTPUTS = ("metrics", "plots")


def run_pipeline(folder: Path, raw: dict, hash_seed: str, stages=STAGES) -> dict[str, bytes]:
    """The stages, each in a fresh process; every metrics and plots file, by relative path."""
    folder.mkdir(exist_ok=True)
    write_params(folder, raw)
    for stage, *args in stages:
        result = run_stage_process(folder, stage, *args, PYTHONHASHSEED=hash_seed)
        assert result.returncode == 0, f"{stage}: {result.stderr}"
    files = sorted(p for name in OUTPUTS for p in (folder / name).rglob("*") if p.is_file())
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in files}


def test_the_same_params_give_identical_files_and_another_seed_other_ones(tmp_path):
    raw = tiny_raw(train__items=["arcface"], evaluate__rules=["mean_prob", "vote"])
    first = run_pipeline(tmp_path / "first", raw, hash_seed="1")
    assert sorted(first) == [
        "metrics/calibrate/arcface.json",
        "metrics/evaluate.json",
        "metrics/prepare.json",
        "metrics/train/arcface.json",
        "plots/accuracy/arcface.tsv",
        "plots/collapse/arcface.tsv",
        "plots/loss/arcface.tsv",
        "plots/lr/arcface.tsv",
    ]
    second = run_pipeline(tmp_path / "second", raw, hash_seed="2")
    assert sorted(second) == sorted(first)
    for name in first:
        assert second[name] == first[name], f"{name} differs between two runs of the same params"
    for model in ("outputs/models/arcface.pt", "outputs/calibration/arcface.json"):
        assert (tmp_path / "first" / model).read_bytes() == (
            tmp_path / "second" / model
        ).read_bytes()

    # Another training seed, on the same prepared data: the training run differs (the stages
    # after it read its model; tests/pipeline/test_end_to_end.py compares all their files).
    other = tmp_path / "other"
    shutil.copytree(tmp_path / "first" / "data", other / "data")
    reseeded_raw = copy.deepcopy(raw)
    reseeded_raw["train"]["seed"] = 1
    reseeded = run_pipeline(other, reseeded_raw, "1", [("train", "arcface")])
    assert sorted(reseeded) == [
        "metrics/train/arcface.json",
        "plots/accuracy/arcface.tsv",
        "plots/collapse/arcface.tsv",
        "plots/loss/arcface.tsv",
        "plots/lr/arcface.tsv",
    ]
    for name in reseeded:
        if name == "plots/lr/arcface.tsv":  # the schedule depends on the params, not the seed
            assert reseeded[name] == first[name], name
        else:
            assert reseeded[name] != first[name], f"{name} does not depend on train.seed"
