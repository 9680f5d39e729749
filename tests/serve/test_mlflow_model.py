"""A trained model logged as an MLflow pyfunc model: a signature with embeddings and class
probabilities, loadable by mlflow.pyfunc and `mlflow models predict`, equal to the model's outputs;
registering it in the model registry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pipeline_testing import create_empty_store
from serve_testing import REPO, digits_raw, run_pipeline

from angular.config import TrackingConfig
from angular.eval.metrics import softmax
from angular.nn.recognition import load_model
from angular.serve.mlflow_model import log_mlflow_model, register_model
from angular.train.tracking import StageRun


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlflow_model")
    project = folder / "project"
    project.mkdir()
    run_pipeline(project, digits_raw(), evaluate_too=False)
    store = create_empty_store(folder)
    uri = f"sqlite:///{store}"
    config = TrackingConfig(enabled=True, uri=uri, experiment="models", required=True)
    model = project / "outputs" / "models" / "arcface.pt"
    with StageRun(config, stage="train@arcface") as run:
        run.call(
            lambda client, run_id: log_mlflow_model(
                client, run_id, model, temperatures={"arcface": 2.0}
            ),
            "logging the MLflow model",
        )
    return uri, run.run_id, model


def test_the_pyfunc_model_gives_embeddings_and_calibrated_probabilities(logged):
    import mlflow

    uri, run_id, model = logged
    mlflow.set_tracking_uri(uri)
    pyfunc = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    signature = pyfunc.metadata.signature
    assert signature.inputs.input_names() == ["images"]
    assert signature.outputs.input_names() == ["embeddings", "probabilities"]
    loaded = load_model(model)
    images = np.random.default_rng(0).standard_normal((5, 1, 8, 8)).astype(np.float32)
    result = pyfunc.predict({"images": images})
    with torch.no_grad():
        embeddings = loaded.model(torch.from_numpy(images))
        logits = loaded.model.logits(embeddings)["arcface"].numpy()
    np.testing.assert_allclose(result["embeddings"], embeddings.numpy(), atol=1e-6)
    np.testing.assert_allclose(result["probabilities"], softmax(logits, 2.0), atol=1e-6)


def test_mlflow_models_predict_runs_it_and_the_registry_takes_it(logged, tmp_path):
    uri, run_id, _ = logged
    images = np.random.default_rng(1).standard_normal((3, 1, 8, 8)).astype(np.float32)
    (tmp_path / "input.json").write_text(json.dumps({"inputs": {"images": images.tolist()}}))
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    result = subprocess.run(
        [
            sys.executable, "-m", "mlflow", "models", "predict",
            "-m", f"runs:/{run_id}/model", "-i", str(tmp_path / "input.json"),
            "-t", "json", "-o", str(tmp_path / "out.json"), "--env-manager", "local",
        ],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    predictions = json.loads(Path(tmp_path / "out.json").read_text())["predictions"]
    assert np.asarray(predictions["probabilities"]).shape == (3, 8)
    np.testing.assert_allclose(np.sum(predictions["probabilities"], axis=1), 1.0, atol=1e-5)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    assert register_model(client, run_id, "model", "angular-digits") == "1"
    assert register_model(client, run_id, "model", "angular-digits") == "2"
