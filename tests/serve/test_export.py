"""`angular export --onnx`: the ONNX file computes what PyTorch computes (embeddings within 1e-4 in
fp32 on real faces, at batch 1 and 17, from one file with a dynamic batch), its probabilities are
the calibrated ones, `angular embed` / `angular predict` accept it, and bad input is one clear line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from serve_testing import REPO, digits_raw, run_pipeline

from angular.data import read_manifest
from angular.eval.metrics import softmax
from angular.nn.recognition import load_model
from angular.serve.export import ExportError, export_onnx, load_onnx
from angular.serve.predict import PredictError, _ImageCache, embed, load_predictor

EMBEDDING_TOLERANCE = 1e-4  # fp32, absolute


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("ANGULAR_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "angular.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def exported(orl_project, tmp_path_factory):
    """The ORL model exported twice: embeddings only, and with probabilities at a temperature
    (not the fitted one: a model that classifies every validation face keeps T = 1)."""
    folder = tmp_path_factory.mktemp("onnx")
    model = orl_project / "outputs" / "models" / "arcface.pt"
    plain = export_onnx(model, folder / "plain.onnx")
    with_probs = export_onnx(model, folder / "probs.onnx", probabilities=True, temperature=2.5)
    return model, plain, with_probs


def real_batch(project: Path, loaded, count: int) -> torch.Tensor:
    """``count`` preprocessed test and unknown faces of the project."""
    manifest = read_manifest(project / "data" / "prepared")
    paths = (manifest.paths("test") + manifest.paths("unknown"))[:count]
    assert len(paths) == count
    return next(_ImageCache(paths).batches(loaded, count))


@pytest.mark.parametrize("batch", [1, 17])
def test_onnx_embeddings_and_probabilities_match_pytorch_on_real_faces(
    orl_project, exported, batch
):
    model_path, plain, with_probs = exported
    loaded = load_model(model_path)
    images = real_batch(orl_project, loaded, batch)
    with torch.no_grad():
        expected = loaded.model(images)
        logits = loaded.model.logits(expected)["arcface"].numpy()
    temperature = 2.5
    embeddings_only = load_onnx(plain)
    embeddings, probabilities = embeddings_only.run(images.numpy())
    assert probabilities is None and embeddings.shape == (batch, expected.shape[1])
    error = np.abs(embeddings - expected.numpy()).max()
    assert error <= EMBEDDING_TOLERANCE, error
    print(f"batch {batch}: max |onnx - torch| of the embeddings {error:.2e}")

    onnx_model = load_onnx(with_probs)
    assert onnx_model.head == "arcface" and onnx_model.temperature == pytest.approx(temperature)
    embeddings, probabilities = onnx_model.run(images.numpy())
    assert np.abs(embeddings - expected.numpy()).max() <= EMBEDDING_TOLERANCE
    np.testing.assert_allclose(probabilities, softmax(logits, temperature), atol=1e-5)
    assert onnx_model.classes == loaded.classes and onnx_model.image == loaded.image


def test_embed_and_predict_accept_the_onnx_file(orl_project, exported):
    model_path, plain, with_probs = exported
    manifest = read_manifest(orl_project / "data" / "prepared")
    images = manifest.paths("test") + manifest.paths("unknown")
    from_torch = embed(images, model_paths=[model_path])
    from_onnx = embed(images, model_paths=[plain])
    assert from_onnx.paths == from_torch.paths
    assert np.abs(from_onnx.vectors - from_torch.vectors).max() <= EMBEDDING_TOLERANCE
    flipped = embed(images, model_paths=[plain], flip_test=True)
    flipped_torch = embed(images, model_paths=[model_path], flip_test=True)
    assert np.abs(flipped.vectors - flipped_torch.vectors).max() <= EMBEDDING_TOLERANCE

    temperature = load_onnx(with_probs).temperature
    confidences = [
        p.confidence
        for p in load_predictor(
            model_paths=[model_path], temperature=temperature, threshold=0.0
        ).predict(images)
    ]
    threshold = float(np.median(confidences))  # half the images known, half unknown
    torch_predictor = load_predictor(
        model_paths=[model_path], temperature=temperature, threshold=threshold
    )
    onnx_predictor = load_predictor(model_paths=[with_probs], threshold=threshold)
    expected = torch_predictor.predict(images)
    found = onnx_predictor.predict(images)
    assert [p.closest for p in found] == [p.closest for p in expected]
    np.testing.assert_allclose(
        [p.confidence for p in found], [p.confidence for p in expected], atol=1e-5
    )
    assert [p.known for p in found] == [p.known for p in expected]
    assert {p.known for p in found} == {True, False}

    result = run_cli(
        "predict", "--model", str(with_probs), "--threshold", "0.5", "--json",
        *map(str, images[:3]), cwd=orl_project,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert [p["closest"] for p in document["predictions"]] == [p.closest for p in expected[:3]]


def test_export_from_the_command_line_uses_the_fitted_temperature(orl_project, tmp_path):
    out = tmp_path / "arcface.onnx"
    result = run_cli(
        "export", "outputs/models/arcface.pt", "--onnx", str(out), "--probabilities",
        cwd=orl_project,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    fitted = json.loads((orl_project / "outputs" / "calibration" / "arcface.json").read_text())
    assert load_onnx(out).temperature == pytest.approx(fitted["temperatures"]["arcface"])


@pytest.fixture(scope="module")
def digits_project(tmp_path_factory) -> Path:
    return run_pipeline(tmp_path_factory.mktemp("digits"), digits_raw(), evaluate_too=False)


def test_bad_models_and_options_are_one_clear_line(digits_project, tmp_path):
    model = digits_project / "outputs" / "models" / "arcface.pt"
    image = str(next((digits_project / "data" / "prepared").rglob("*.png")))
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not an onnx file")
    plain = export_onnx(model, tmp_path / "plain.onnx")
    cases = [
        (("export", str(tmp_path / "missing.pt"), "--onnx", str(tmp_path / "x.onnx")),
         "missing.pt: no such model file"),
        (("export", str(garbage), "--onnx", str(tmp_path / "x.onnx")),
         "garbage.onnx: not a readable model file"),
        (("export", str(model), "--onnx", str(tmp_path / "x.txt")),
         "the file name must end with .onnx"),
        (("export", str(model), "--onnx", str(tmp_path / "nofolder" / "x.onnx")),
         "does not exist"),
        (("export", str(model), "--onnx", str(tmp_path / "x.onnx"), "--probabilities",
          "--head", "cosface"), "--head cosface: no such head; available: arcface"),
        (("export", str(model), "--onnx", str(tmp_path / "x.onnx"), "--probabilities",
          "--calibration", str(tmp_path / "none.json")), "none.json: cannot read it"),
        (("embed", "--model", str(garbage), "--out", str(tmp_path / "e.npy"), image),
         "garbage.onnx: not a readable ONNX model"),
        (("embed", "--model", str(tmp_path / "missing.onnx"), "--out", str(tmp_path / "e.npy"),
          image), "--model " + str(tmp_path / "missing.onnx") + ": no such model file"),
        (("predict", "--model", str(plain), "--threshold", "0.5", image),
         "exported without --probabilities"),
    ]  # fmt: skip
    for args, message in cases:
        result = run_cli(*args, cwd=tmp_path)
        assert result.returncode == 1, (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "x.onnx").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["garbage.onnx", "plain.onnx"]


def test_the_library_errors_name_the_problem(digits_project, tmp_path):
    model = digits_project / "outputs" / "models" / "arcface.pt"
    with pytest.raises(ExportError, match="--probabilities needs a temperature"):
        export_onnx(model, tmp_path / "x.onnx", probabilities=True)
    with pytest.raises(ExportError, match="--temperature must be a number > 0"):
        export_onnx(model, tmp_path / "x.onnx", probabilities=True, temperature=float("nan"))
    with pytest.raises(ExportError, match="only apply with --probabilities"):
        export_onnx(model, tmp_path / "x.onnx", temperature=2.0)
    with_probs = export_onnx(model, tmp_path / "p.onnx", probabilities=True, temperature=2.0)
    with pytest.raises(PredictError, match="already applies its fitted temperature 2"):
        load_predictor(model_paths=[with_probs], threshold=0.5, temperature=1.5)
