"""An MLflow store that cannot be used never stops training, and never leaves a half-written run
that breaks ``mlflow ui`` (docs/reliability.md, Tracking).

- Unreachable (``MLFLOW_TRACKING_URI`` at a closed localhost port) or unwritable (a SQLite file
  that cannot be created, a read-only folder): the stage completes and says once that tracking
  is off.
- ``tracking.required: true``: the stage stops before training with a message naming the store.
- An exception inside a stage ends its run FAILED (with the error as a tag), and a SIGKILL leaves
  a RUNNING run with the epochs logged so far; either way the store still lists every run, through
  ``mlflow.search_runs`` and through the HTTP API that ``mlflow ui`` serves.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from reliability_testing import (
    closed_port,
    create_empty_store,
    run_python,
    run_stage_process,
    stage_environment,
    tiny_raw,
    write_params,
)

from angular.train import epoch as training_epoch
from pipeline import EXIT_FAILURE, run_stage
from pipeline import prepare as prepare_stage
from pipeline import train as train_stage

EXPERIMENT = "reliability"
OFF = "MLflow tracking is off"


def tracked_params(uri: str | None, **overrides) -> dict:
    raw = tiny_raw(**overrides)
    raw["tracking"].update(enabled=True, uri=uri, experiment=EXPERIMENT)
    return raw


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """A SQLite store with MLflow's tables created once (a fresh one costs seconds of migrations)."""
    return create_empty_store(tmp_path_factory.mktemp("store"))


@pytest.fixture
def store(project, empty_store) -> str:
    """A copy of the empty store in the project folder; its URI."""
    shutil.copy(empty_store, project / "mlflow.db")
    return f"sqlite:///{project / 'mlflow.db'}"


def search_runs(uri: str):
    """Every run of the experiment, as ``mlflow.search_runs`` (what a user would call) lists it."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        return mlflow.search_runs(experiment_names=[EXPERIMENT], order_by=["start_time ASC"])
    finally:
        mlflow.set_tracking_uri(previous)


# --------------------------------------------------------------------------------------------------
# A store that cannot be used.


def test_an_unreachable_server_from_the_environment_leaves_training_to_complete(project):
    uri = f"http://127.0.0.1:{closed_port()}"
    write_params(project, tracked_params(None, train__epochs=1))
    started = time.monotonic()
    result = run_stage_process(project, "train", "arcface", MLFLOW_TRACKING_URI=uri)
    assert result.returncode == 0, result.stderr
    assert (project / "outputs" / "models" / "arcface.pt").is_file()
    assert result.stderr.count(OFF) == 1, result.stderr
    assert f"the store {uri} is not usable" in result.stderr and "Traceback" not in result.stderr
    assert time.monotonic() - started < 120  # no minutes of retries


def test_a_store_that_cannot_be_created_leaves_training_to_complete(project, capsys):
    (project / "not_a_folder").write_text("a file where the store's folder should be")
    uri = f"sqlite:///{project / 'not_a_folder' / 'mlflow.db'}"
    write_params(project, tracked_params(uri, train__epochs=1))
    assert run_stage(train_stage.main, ["arcface"]) == 0
    err = capsys.readouterr().err
    assert err.count(OFF) == 1 and uri in err, err
    assert (project / "outputs" / "models" / "arcface.pt").is_file()


@pytest.mark.skipif(
    os.geteuid() == 0, reason="root writes into read-only folders: the case needs a normal user"
)
def test_a_store_in_a_read_only_folder_leaves_training_to_complete(project, capsys):
    folder = project / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        uri = f"sqlite:///{folder / 'mlflow.db'}"
        write_params(project, tracked_params(uri, train__epochs=1))
        assert run_stage(train_stage.main, ["arcface"]) == 0
        err = capsys.readouterr().err
        assert err.count(OFF) == 1 and uri in err, err
    finally:
        folder.chmod(0o755)


def test_a_required_store_that_fails_stops_the_stage_before_training(project):
    uri = f"http://127.0.0.1:{closed_port()}"
    raw = tracked_params(uri)
    raw["tracking"]["required"] = True
    write_params(project, raw)
    result = run_stage_process(project, "train", "arcface")
    assert result.returncode == EXIT_FAILURE, result.stderr
    assert result.stderr.startswith(
        f"error: tracking.required is true but the MLflow store {uri} failed while starting the run"
    ), result.stderr
    assert "set tracking.required: false" in result.stderr and "Traceback" not in result.stderr
    assert "epoch 1/" not in result.stderr  # not a single epoch ran
    assert not (project / "outputs").exists() or not any(
        p.is_file() for p in (project / "outputs").rglob("*")
    )


# --------------------------------------------------------------------------------------------------
# Runs always end, and the store stays listable.


def test_a_stage_that_fails_ends_its_run_failed_and_the_store_lists_it(project, store, capsys):
    write_params(project, tracked_params(store, train__epochs=2))
    original = training_epoch.batch_loss
    calls = {"n": 0}

    def nan_in_epoch_two(model, *args, **kwargs):
        loss, correct = original(model, *args, **kwargs)
        calls["n"] += model.training
        return (loss * float("nan") if calls["n"] == 20 else loss), correct

    # Its own patcher: undoing the fixtures' one would also undo the chdir into the project.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training_epoch, "batch_loss", nan_in_epoch_two)
        assert run_stage(train_stage.main, ["arcface"]) == EXIT_FAILURE
    assert "the loss is nan at epoch 2, step 5" in capsys.readouterr().err

    # prepare fails too: its data path does not exist.
    write_params(
        project,
        tracked_params(store, data__source="imagefolder", data__path=str(project / "nowhere")),
    )
    assert run_stage(prepare_stage.main, []) == EXIT_FAILURE

    runs = search_runs(store)
    assert list(runs["tags.mlflow.runName"]) == ["train@arcface", "prepare"]
    assert list(runs["status"]) == ["FAILED", "FAILED"]
    assert runs["end_time"].notna().all()
    assert runs["tags.error"][0].startswith("NonFiniteLossError: train@arcface: the loss is nan")
    assert runs["tags.error"][1].startswith("DataError: data.path:")
    assert runs["metrics.val_accuracy"][0] > 0  # epoch 1 was logged before the failure


def test_a_sigkilled_stage_leaves_a_run_the_store_and_the_ui_still_list(project, store):
    write_params(project, tracked_params(store, train__epochs=30))
    checkpoints = project / "outputs" / "checkpoints" / "arcface"
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline.train", "arcface"],
        cwd=project,
        env=stage_environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        if (checkpoints / "epoch-0003.pt").exists():  # epochs 1 and 2 are logged
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    err = process.communicate(timeout=60)[1]
    assert process.returncode == -signal.SIGKILL, err

    write_params(project, tracked_params(store, train__epochs=3))  # a shorter rerun
    rerun = run_stage_process(project, "train", "arcface")
    assert rerun.returncode == 0 and OFF not in rerun.stderr, rerun.stderr

    runs = search_runs(store)
    assert list(runs["status"]) == ["RUNNING", "FINISHED"]  # the killed run, then the rerun
    killed_id = runs["run_id"][0]

    # The HTTP API `mlflow ui` serves answers for the store as it is, killed run included.
    ui = run_python(
        project,
        f"""
        import json
        from mlflow.server import app
        client = app.test_client()
        found = client.get("/ajax-api/2.0/mlflow/experiments/get-by-name",
                           query_string={{"experiment_name": "{EXPERIMENT}"}})
        experiment = found.json["experiment"]["experiment_id"]
        runs = client.post("/ajax-api/2.0/mlflow/runs/search",
                           json={{"experiment_ids": [experiment]}})
        history = client.get("/ajax-api/2.0/mlflow/metrics/get-history",
                             query_string={{"run_id": "{killed_id}", "metric_key": "val_loss"}})
        print(json.dumps({{
            "codes": [found.status_code, runs.status_code, history.status_code],
            "statuses": sorted(r["info"]["status"] for r in runs.json["runs"]),
            "steps": [m["step"] for m in history.json["metrics"]],
        }}))
        """,
        _MLFLOW_SERVER_FILE_STORE=store,
        _MLFLOW_SERVER_ARTIFACT_ROOT=str(project / "mlruns"),
    )
    assert ui.returncode == 0, ui.stderr
    answer = json.loads(ui.stdout.strip().splitlines()[-1])
    assert answer["codes"] == [200, 200, 200]
    assert answer["statuses"] == ["FINISHED", "RUNNING"]
    assert answer["steps"][:2] == [1, 2]  # the epochs logged before the kill
