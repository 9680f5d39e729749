"""Trained models as MLflow models: ``mlflow models predict`` / ``mlflow.pyfunc.load_model`` work
on them.

The train stage logs each head of its model as an MLflow pyfunc model (artifact path ``model``,
or ``model_<head>`` for the heads of a joint model) with a signature:

- input ``images``: float32 (B, channels, H, W), preprocessed as in training
  (``(pixels / 255 - mean) / std``; the values are in the model's ``image`` metadata);
- outputs ``embeddings`` float32 (B, D) and ``probabilities`` float32 (B, classes):
  ``softmax(s * cos / T)``. The train stage logs ``T = 1`` (calibration comes later); the
  evaluate stage can log and register its best head with the fitted temperature.

The model's files are the ``.pt`` model file and a small JSON (head, temperature); the code is this
package (``angular`` must be importable where the model is served: ``--env-manager local`` in the
project's environment).
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

import numpy as np

__all__ = ["AngularPyfunc", "log_mlflow_model", "register_head", "register_model", "signature_for"]

try:  # mlflow is a dependency of the project, but keep `angular.serve` importable without it
    from mlflow.pyfunc import PythonModel
except ImportError:  # pragma: no cover
    PythonModel = object


# MLflow warns, when the class is defined, that `predict` has no type hints; the signature below
# describes the tensors instead (type hints cannot say their shapes). Not a warning for the user,
# and one MLflow shows whatever the filters say, so it is dropped where it would be shown.
_show = warnings.showwarning


def _without_type_hint_note(message, *args, **kwargs):
    if "type hints to the `predict` method" not in str(message):
        _show(message, *args, **kwargs)


warnings.showwarning = _without_type_hint_note


class AngularPyfunc(PythonModel):
    """One head of an angular model: images -> embeddings and calibrated probabilities."""

    def load_context(self, context) -> None:
        from angular.nn.recognition import load_model

        settings = json.loads(Path(context.artifacts["settings"]).read_text(encoding="utf-8"))
        self.loaded = load_model(context.artifacts["model"])
        self.head = settings["head"]
        self.temperature = float(settings["temperature"])

    def predict(self, context, model_input, params=None):
        import torch

        if isinstance(model_input, dict):
            model_input = model_input["images"]
        if hasattr(model_input, "to_numpy"):  # a DataFrame of one column of arrays
            model_input = np.stack(model_input.iloc[:, 0].to_numpy())
        images = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.no_grad():
            embeddings = self.loaded.model(images)
            logits = self.loaded.model.heads[self.head].logits(embeddings)
            probabilities = torch.softmax(logits.float() / self.temperature, dim=1)
        return {"embeddings": embeddings.numpy(), "probabilities": probabilities.numpy()}


warnings.showwarning = _show


def signature_for(loaded):
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    size = loaded.image["size"]
    dim = int(loaded.model.heads[loaded.members[0]].embedding_dim)
    return ModelSignature(
        inputs=Schema(
            [TensorSpec(np.dtype(np.float32), (-1, loaded.image["channels"], *size), "images")]
        ),
        outputs=Schema(
            [
                TensorSpec(np.dtype(np.float32), (-1, dim), "embeddings"),
                TensorSpec(np.dtype(np.float32), (-1, len(loaded.classes)), "probabilities"),
            ]
        ),
    )


def _requirements() -> list[str]:
    """Pinned to what runs here (MLflow would otherwise infer them by importing the model in a
    subprocess, which takes long)."""
    from importlib.metadata import version

    names = ("torch", "torchvision", "numpy", "pillow", "pyyaml", "mlflow")
    return [f"{name}=={version(name)}" for name in names]


def log_mlflow_model(
    client,
    run_id: str,
    model_path: str | Path,
    *,
    temperatures: dict[str, float] | None = None,
    artifact_prefix: str = "model",
) -> list[str]:
    """Log each head of the model file as a pyfunc model of run ``run_id``; returns the artifact
    paths (``model``, or ``model_<head>`` for several heads)."""
    import mlflow.pyfunc

    from angular.nn.recognition import load_model

    loaded = load_model(model_path)
    signature = signature_for(loaded)
    logged = []
    for head in loaded.members:
        name = artifact_prefix if len(loaded.members) == 1 else f"{artifact_prefix}_{head}"
        temperature = float((temperatures or {}).get(head, 1.0))
        with tempfile.TemporaryDirectory() as folder:
            settings = Path(folder) / "settings.json"
            settings.write_text(json.dumps({"head": head, "temperature": temperature}))
            example = np.zeros((1, loaded.image["channels"], *loaded.image["size"]), np.float32)
            mlflow.pyfunc.save_model(
                path=Path(folder) / name,
                python_model=AngularPyfunc(),
                artifacts={"model": str(model_path), "settings": str(settings)},
                signature=signature,
                input_example={"images": example},
                pip_requirements=_requirements(),
            )
            client.log_artifacts(run_id, str(Path(folder) / name), name)
        logged.append(name)
    return logged


def register_model(client, run_id: str, artifact_path: str, name: str) -> str:
    """Register ``runs:/<run_id>/<artifact_path>`` as a new version of ``name``; the version."""
    try:
        client.create_registered_model(name)
    except Exception:  # it exists already
        pass
    version = client.create_model_version(
        name, source=f"runs:/{run_id}/{artifact_path}", run_id=run_id
    )
    return str(version.version)


def register_head(
    client, run_id: str, model_path: str | Path, head: str, temperature: float, name: str
) -> str:
    """Log the model file's heads as MLflow models of run ``run_id`` (artifact ``best``, or
    ``best_<head>`` for several heads), ``head`` with ``temperature``, and register ``head`` as a
    new version of ``name``; the version."""
    logged = log_mlflow_model(
        client, run_id, model_path, temperatures={head: temperature}, artifact_prefix="best"
    )
    artifact = logged[0] if len(logged) == 1 else f"best_{head}"
    return register_model(client, run_id, artifact, name)
