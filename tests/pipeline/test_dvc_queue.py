"""MLflow under DVC's experiment queue: queued experiments run their stages in temporary copies of
the repository (deleted afterwards) and in parallel workers; every stage run must still reach the
project's own store, tagged with its experiment and grouped under one parent run per experiment.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pipeline_testing import REPO, make_image_folder, tiny_raw, write_params

pytestmark = pytest.mark.slow

EXPERIMENT = "queue-test"
EPOCHS = (1, 2, 3)  # one queued experiment each
STAGES = {"train@arcface", "calibrate@arcface", "evaluate"}  # prepare is the baseline's


def environment() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # The temporary copies hold what git tracks: no compiled kernels there.
    env["ANGULAR_BACKEND"] = "python"
    for variable in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME", "DVC_STAGE"):
        env.pop(variable, None)
    for role in ("AUTHOR", "COMMITTER"):
        env[f"GIT_{role}_NAME"] = "test"
        env[f"GIT_{role}_EMAIL"] = "test@example.com"
    return env


def run(folder: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(
        list(args), cwd=folder, env=environment(), capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{args}: {result.stdout}\n{result.stderr}"
    return result


def dvc(folder: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return run(folder, sys.executable, "-m", "dvc", *args, timeout=timeout)


def make_project(folder: Path) -> None:
    """A git + DVC repository with the project's code and tiny params; prepare run and committed."""
    folder.mkdir()
    for name in ("angular", "pipeline", "csrc"):
        shutil.copytree(
            REPO / name, folder / name, ignore=shutil.ignore_patterns("__pycache__", "*.o", "*.so")
        )
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(REPO / name, folder)
    # A small image folder instead of the digits: every stage of every experiment is quick.
    make_image_folder(folder.parent / "faces", {f"p{i}": 12 for i in range(8)}, size=(8, 8))
    raw = tiny_raw(train__items=["arcface"], evaluate__rules=["vote"])
    raw["data"].update(
        source="imagefolder", path=str(folder.parent / "faces"), unknown_identities=2
    )
    raw["evaluate"]["verification"]["folds"] = 2
    raw["tracking"].update(enabled=True, uri=None, experiment=EXPERIMENT)
    write_params(folder, raw)
    run(folder, "git", "init", "-q")
    dvc(folder, "init", "-q")
    dvc(folder, "config", "core.analytics", "false")
    dvc(folder, "config", "core.check_update", "false")
    dvc(folder, "repro", "prepare")
    run(folder, "git", "add", "-A")
    run(folder, "git", "commit", "-q", "-m", "baseline")


def task_states(status: str) -> list[str]:
    """The status column of `dvc queue status` (Queued, Running, Success, Failed, ...)."""
    lines = status.split("\n\n")[0].splitlines()[1:]
    return [line.split()[-1] for line in lines if line.strip()]


def wait_for_queue(folder: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        status = dvc(folder, "queue", "status").stdout
        if not {"Queued", "Running"} & set(task_states(status)):
            return status
        if time.monotonic() > deadline:
            pytest.fail(f"the queue did not finish in {timeout} s:\n{status}")
        time.sleep(2)


def test_queued_parallel_experiments_log_every_stage_run_to_the_project_store(tmp_path):
    folder = tmp_path / "project"
    make_project(folder)
    for epochs in EPOCHS:
        dvc(folder, "exp", "run", "--queue", "-S", f"train.epochs={epochs}")
    # Not captured: the daemonised workers would hold the pipes open until they finish.
    subprocess.run(
        [sys.executable, "-m", "dvc", "queue", "start", "-j", "2"],
        cwd=folder,
        env=environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=True,
        timeout=120,
    )
    status = wait_for_queue(folder, timeout=420)
    assert task_states(status) == ["Success"] * len(EPOCHS), status

    shown = json.loads(dvc(folder, "exp", "show", "--json").stdout)
    names = {
        exp["name"]: exp["data"]["params"]["params.yaml"]["data"]["train"]["epochs"]
        for baseline in shown
        for exp in (baseline.get("experiments") or [])
        for exp in exp["revs"]
        if exp.get("name")
    }
    assert sorted(names.values()) == list(EPOCHS), shown

    from mlflow.tracking import MlflowClient

    # The default store, in the project itself (not in DVC's deleted temporary copies).
    client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = {r.info.run_id: r for r in runs if r.data.tags.get("stage") == "pipeline"}
    children = [r for r in runs if r.info.run_id not in parents]

    # The baseline's prepare (a plain `dvc repro`), and every stage of every experiment.
    by_experiment: dict[str, set[str]] = {}
    for child in children:
        assert child.info.status == "FINISHED", child.data.tags
        parent = parents[child.data.tags["mlflow.parentRunId"]]
        name = child.data.tags.get("dvc_exp_name", "")
        assert parent.data.tags.get("dvc_exp_name", "") == name
        stages = by_experiment.setdefault(name, set())
        assert child.info.run_name not in stages, f"{name}: {child.info.run_name} logged twice"
        stages.add(child.info.run_name)
    assert by_experiment.pop("") == {"prepare"}
    assert by_experiment == {name: STAGES for name in names}
    assert len(children) == 1 + len(EPOCHS) * len(STAGES)

    # One parent per experiment, finished, tagged with the baseline, holding the summary.
    baseline = run(folder, "git", "rev-parse", "HEAD").stdout.strip()
    assert len(parents) == 1 + len(EPOCHS)
    for parent in parents.values():
        assert parent.info.status == "FINISHED"
        name = parent.data.tags.get("dvc_exp_name")
        if name is None:
            continue
        assert parent.info.run_name == name
        assert parent.data.tags["dvc_exp_baseline_rev"] == baseline
        assert parent.data.params["train.epochs"] == str(names[name])
        assert "evaluate/heads/arcface/closed_set_accuracy" in parent.data.metrics
    # The artifacts live next to the store too.
    train_runs = [c for c in children if c.info.run_name == "train@arcface"]
    for child in train_runs:
        assert child.info.artifact_uri.startswith((folder / "mlruns").as_uri())
        assert {a.path for a in client.list_artifacts(child.info.run_id)} >= {"arcface.pt"}
    assert not list((folder / ".dvc" / "tmp").rglob("mlflow.db"))
