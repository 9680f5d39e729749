"""dvc.yaml declares exactly what each stage imports, reads and writes."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml
from pipeline_testing import REPO, shipped_raw

import pipeline
from angular.config import DataConfig, TrainConfig
from pipeline import calibrate, evaluate, prepare, train

DVC = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))
STAGE_MODULES = {"prepare": prepare, "train": train, "calibrate": calibrate, "evaluate": evaluate}
PACKAGES = ("angular", "pipeline")


def module_file(name: str) -> Path | None:
    """The .py file of a module of this project (None for anything else, or a compiled module)."""
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        return None
    base = REPO.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_files(path: Path) -> set[Path]:
    """Every project module ``path`` imports, at any level (top or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from angular import ops`: ops may be a module or a name in angular/__init__.py.
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            parts = name.split(".")
            for depth in range(1, len(parts) + 1):  # importing a.b imports a first
                file = module_file(".".join(parts[:depth]))
                if file is not None:
                    found.add(file)
    return found


def closure(path: Path) -> set[str]:
    todo, seen = [path], set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        todo.extend(imported_files(current) - seen)
    return {p.relative_to(REPO).as_posix() for p in seen}


def stage(name: str) -> dict:
    entry = DVC["stages"][name]
    return entry.get("do", entry)


def paths(entries) -> list[str]:
    return [next(iter(e)) if isinstance(e, dict) else e for e in entries]


DATA_DEPS = {
    "prepare": set(),
    "train": {"csrc", "data/prepared"},
    "calibrate": {"data/prepared", "outputs/models/${item}.pt"},
    "evaluate": {"data/prepared", "outputs/models", "outputs/calibration"},
}


@pytest.mark.parametrize("name", list(STAGE_MODULES))
def test_deps_are_the_code_the_stage_imports(name):
    code = closure(Path(STAGE_MODULES[name].__file__))
    assert "pipeline/__init__.py" in code and "angular/config/__init__.py" in code
    assert set(paths(stage(name)["deps"])) == code | DATA_DEPS[name]


def test_params_are_the_keys_the_stages_read():
    assert stage("prepare")["params"] == list(prepare.PARAM_KEYS)
    assert stage("train")["params"] == list(train.PARAM_KEYS[:5]) + ["heads.${item}"] + list(
        train.PARAM_KEYS[5:]
    )
    assert stage("calibrate")["params"] == list(calibrate.PARAM_KEYS)
    assert stage("evaluate")["params"] == list(evaluate.PARAM_KEYS)
    # Every key of the data and train sections is read by exactly one of prepare and train.
    data_keys = {f"data.{name}" for name in DataConfig.model_fields}
    read = [k for k in prepare.PARAM_KEYS + train.PARAM_KEYS if k.startswith("data.")]
    assert sorted(read) == sorted(data_keys)
    train_keys = {f"train.{name}" for name in TrainConfig.model_fields} - {"train.items"}
    assert {k for k in train.PARAM_KEYS if k.startswith("train.")} == train_keys


def test_every_listed_param_exists_in_params_yaml():
    raw = shipped_raw()
    items = raw["train"]["items"]
    for name in STAGE_MODULES:
        for key in stage(name)["params"]:
            for item in items if "${item}" in key else [None]:
                node = raw
                for part in key.replace("${item}", str(item)).split("."):
                    assert isinstance(node, dict) and part in node, (name, key)
                    node = node[part]
    assert "tracking" not in {k.split(".")[0] for s in STAGE_MODULES for k in stage(s)["params"]}


def test_outputs_are_where_the_stages_write():
    item = "arcface"

    def resolved(entries):
        return {p.replace("${item}", item) for p in paths(entries)}

    paths_for = train.paths_for(item)
    assert resolved(stage("prepare")["outs"]) == {pipeline.PREPARED_DIR.as_posix()}
    assert resolved(stage("prepare")["metrics"]) == {pipeline.PREPARE_METRICS.as_posix()}
    assert resolved(stage("train")["outs"]) == {
        p.as_posix()
        for p in (
            paths_for.model,
            paths_for.loss_plot,
            paths_for.accuracy_plot,
            paths_for.collapse_plot,
            paths_for.lr_plot,
        )
    }
    assert resolved(stage("train")["metrics"]) == {paths_for.metrics.as_posix()}
    assert resolved(stage("calibrate")["outs"]) == {
        pipeline.calibration_path(item).as_posix(),
        (pipeline.CALIBRATE_PLOTS_DIR / item).as_posix(),
    }
    assert resolved(stage("calibrate")["metrics"]) == {
        (pipeline.CALIBRATE_METRICS_DIR / f"{item}.json").as_posix()
    }
    assert resolved(stage("evaluate")["outs"]) == {
        pipeline.EVALUATE_DIR.as_posix(),
        pipeline.EVALUATE_PLOTS_DIR.as_posix(),
    }
    assert resolved(stage("evaluate")["metrics"]) == {pipeline.EVALUATE_METRICS.as_posix()}
    # Checkpoints are no output: DVC never removes them before a rerun (resume), and the folder
    # that a finished run leaves empty draws no "is empty" warning.
    assert not any("checkpoints" in path for path in paths(stage("train")["outs"]))
    plots = {next(iter(p)) for p in DVC["plots"] if isinstance(p, dict)} | {
        p for p in DVC["plots"] if isinstance(p, str)
    }
    assert plots == {
        pipeline.LOSS_PLOTS_DIR.as_posix(),
        pipeline.ACCURACY_PLOTS_DIR.as_posix(),
        pipeline.COLLAPSE_PLOTS_DIR.as_posix(),
        pipeline.LR_PLOTS_DIR.as_posix(),
        pipeline.CALIBRATE_PLOTS_DIR.as_posix(),
        pipeline.EVALUATE_PLOTS_DIR.as_posix(),
    }


def test_stages_iterate_over_the_train_items():
    for name in ("train", "calibrate"):
        assert DVC["stages"][name]["foreach"] == "${train.items}"
        assert DVC["stages"][name]["do"]["cmd"] == f"python -m pipeline.{name} ${{item}}"
