"""MLflow tracking: one run per stage, ended FINISHED or FAILED; an unusable store never stops a stage."""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess

import pytest
from pipeline_testing import create_empty_store, tiny_raw, write_params

from angular.config import TrackingConfig
from angular.train.tracking import StageRun, TrackingError
from pipeline import run_stage
from pipeline import train as train_stage


def config(uri: str | None, *, required: bool = False, enabled: bool = True) -> TrackingConfig:
    return TrackingConfig(enabled=enabled, uri=uri, experiment="tests", required=required)


def client_for(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def only_run(uri: str):
    client = client_for(uri)
    experiment = client.get_experiment_by_name("tests")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory):
    """An MLflow SQLite store with its tables created (a fresh one costs seconds of migrations)."""
    return create_empty_store(tmp_path_factory.mktemp("store"))


@pytest.fixture
def store(tmp_path, monkeypatch, empty_store):
    """A git work tree (the current directory) with its own copy of an empty store."""
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    monkeypatch.chdir(tmp_path)
    subprocess.run(["git", "init", "-q"], check=True)
    subprocess.run(
        [
            "git",
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "commit",
            "-q",
            "--allow-empty",
            "-m",
            "x",
        ],
        check=True,
    )
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_a_stage_run_logs_params_metrics_artifacts_and_tags(store, tmp_path):
    (tmp_path / "result.json").write_text("{}")
    with StageRun(
        config(store), stage="train@arcface", heads=["arcface"], params={"train": {"epochs": 3}}
    ) as run:
        run.log_metrics({"loss": 2.0, "tar@far=1e-2": 0.5}, step=1)
        run.log_metrics({"loss": 1.0, "nan_metric": float("nan")}, step=2)
        run.log_artifact(tmp_path / "result.json")
    client, logged = only_run(store)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert logged.info.status == "FINISHED" and logged.info.run_name == "train@arcface"
    tags = logged.data.tags
    assert tags["stage"] == "train" and tags["dvc_stage"] == "train@arcface"
    assert tags["head"] == "arcface" and tags["git_commit"] == commit.strip()
    assert logged.data.params == {"train.epochs": "3"}
    history = client.get_metric_history(logged.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.0), (2, 1.0)]
    assert logged.data.metrics["tar_far_1e-2"] == 0.5
    assert "nan_metric" not in logged.data.metrics
    assert [a.path for a in client.list_artifacts(logged.info.run_id)] == ["result.json"]


@pytest.mark.parametrize(
    ("error", "status"), [(ValueError, "FAILED"), (KeyboardInterrupt, "KILLED")]
)
def test_a_stage_that_raises_ends_its_run(store, error, status):
    with pytest.raises(error):
        with StageRun(config(store), stage="evaluate"):
            raise error("boom")
    _, logged = only_run(store)
    assert logged.info.status == status
    assert logged.data.tags["error"] == f"{error.__name__}: boom"


def test_an_unreachable_store_is_reported_once_and_the_stage_goes_on(tmp_path, capsys):
    uri = f"http://127.0.0.1:{closed_port()}"
    with StageRun(config(uri), stage="train@arcface") as run:
        for step in range(3):
            run.log_metrics({"loss": 1.0}, step=step)
        run.log_artifact(tmp_path)
    assert not run.active
    err = capsys.readouterr().err
    assert err.count("MLflow tracking is off") == 1
    assert uri in err and "Connection refused" in err


def test_a_read_only_store_is_reported_and_the_stage_goes_on(store, tmp_path, capsys):
    with StageRun(config(store), stage="prepare"):
        pass  # creates the database
    read_only = f"sqlite:///file:{tmp_path / 'mlflow.db'}?mode=ro&uri=true"
    with StageRun(config(read_only), stage="prepare") as run:
        run.log_metrics({"images": 3.0})
    assert not run.active
    err = capsys.readouterr().err
    assert err.count("MLflow tracking is off") == 1 and "readonly database" in err
    _, logged = only_run(store)  # nothing half-written was added
    assert logged.info.status == "FINISHED"


def test_a_required_store_that_fails_stops_the_stage_first(tmp_path):
    uri = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(TrackingError, match="tracking.required is true but the MLflow store"):
        with StageRun(config(uri, required=True), stage="prepare"):
            pytest.fail("the stage body must not run")


def test_a_store_failing_mid_run_ends_the_run_failed(store, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    with StageRun(config(store), stage="train@arcface") as run:
        run.log_metrics({"loss": 1.0}, step=1)

        def broken(*args, **kwargs):
            raise OSError("disk full")

        monkeypatch.setattr(MlflowClient, "log_batch", broken)
        run.log_metrics({"loss": 0.5}, step=2)
        run.log_metrics({"loss": 0.2}, step=3)
    monkeypatch.undo()
    assert capsys.readouterr().err.count("disk full") == 1
    _, logged = only_run(store)
    assert logged.info.status == "FAILED"


def test_the_environment_chooses_the_store_when_params_do_not(store, tmp_path, monkeypatch):
    (tmp_path / "mlflow.db").rename(tmp_path / "other.db")
    other = f"sqlite:///{tmp_path / 'other.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    with StageRun(config(None), stage="prepare"):
        pass
    assert (tmp_path / "other.db").exists() and not (tmp_path / "mlflow.db").exists()
    assert only_run(other)[1].info.status == "FINISHED"


def test_disabled_tracking_touches_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with StageRun(config(None, enabled=False), stage="prepare") as run:
        run.log_metrics({"x": 1.0})
    assert not run.active and not list(tmp_path.iterdir())
    assert capsys.readouterr().err == ""


def test_telemetry_is_off_unless_the_user_says_otherwise():
    from mlflow.environment_variables import MLFLOW_DISABLE_TELEMETRY
    from mlflow.telemetry.utils import is_telemetry_disabled

    import angular.train.tracking  # noqa: F401  (sets the variables when the user has not)

    assert MLFLOW_DISABLE_TELEMETRY.get() is True
    assert is_telemetry_disabled()


def test_training_logs_every_epoch_and_the_model(project, empty_store):
    shutil.copy(empty_store, project / "mlflow.db")
    uri = f"sqlite:///{project / 'mlflow.db'}"
    raw = tiny_raw(train__epochs=2)
    raw["tracking"].update(enabled=True, uri=uri, experiment="tests")
    write_params(project, raw)
    assert run_stage(train_stage.main, ["arcface"]) == 0
    client, logged = only_run(uri)
    assert logged.info.status == "FINISHED"
    assert (
        logged.data.params["train.epochs"] == "2" and logged.data.params["heads.arcface.m"] == "0.5"
    )
    assert "data.seed" not in logged.data.params  # only what the stage reads
    history = client.get_metric_history(logged.info.run_id, "val_accuracy")
    assert [m.step for m in history] == [1, 2]
    final = json.loads((project / "metrics" / "train" / "arcface.json").read_text())
    assert history[-1].value == pytest.approx(final["val_accuracy"])
    artifacts = {a.path for a in client.list_artifacts(logged.info.run_id)}
    assert artifacts == {"arcface.pt", "arcface.json", "plots", "model"}
    plots = {
        a.path
        for folder in client.list_artifacts(logged.info.run_id, "plots")
        for a in client.list_artifacts(logged.info.run_id, folder.path)
    }  # each plot keeps its folder: the four share the file name arcface.tsv
    kinds = ("loss", "accuracy", "collapse", "lr")
    assert plots == {f"plots/{kind}/arcface.tsv" for kind in kinds}
    # The learning rate of every optimizer step where it changes (and each epoch's first and last).
    by_step = client.get_metric_history(logged.info.run_id, "lr_by_step")
    assert by_step and all(math.isfinite(m.value) and m.value > 0 for m in by_step)
    # The MLflow model (angular.serve.mlflow_model), with its signature.
    assert "model/MLmodel" in {a.path for a in client.list_artifacts(logged.info.run_id, "model")}


def test_training_completes_when_the_store_is_unreachable(project, capsys):
    raw = tiny_raw(train__epochs=1)
    raw["tracking"].update(enabled=True, uri=f"http://127.0.0.1:{closed_port()}")
    write_params(project, raw)
    assert run_stage(train_stage.main, ["arcface"]) == 0
    assert (project / "outputs" / "models" / "arcface.pt").is_file()
    assert capsys.readouterr().err.count("MLflow tracking is off") == 1
