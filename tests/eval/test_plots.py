"""angular.eval.plots: each function writes a real PNG and returns its path; bad input is named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from angular.eval import metrics, plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_png(path, returned) -> None:
    assert Path(returned) == Path(path)
    data = Path(path).read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 5_000
    with Image.open(path) as image:
        width, height = image.size
        assert width > 200 and height > 200
        # Not a blank canvas: the figure drew something besides the background.
        assert len(np.unique(np.asarray(image.convert("L")))) > 10


def test_reliability_diagram(tmp_path):
    rng = np.random.default_rng()
    confidence = rng.uniform(0.3, 1.0, size=300)
    correct = rng.random(300) < confidence
    path = tmp_path / "nested" / "reliability.png"  # missing folders are created
    _assert_png(path, plots.reliability_diagram(confidence, correct, path, "head: arcface"))


def test_roc_plot_linear_and_log(tmp_path):
    rng = np.random.default_rng()
    positive = rng.random(400) < 0.5
    curves = {}
    for name, separation in (("arcface", 2.0), ("cosface", 1.0)):
        fpr, tpr, _ = metrics.roc_curve(rng.normal(size=400) + separation * positive, positive)
        curves[name] = (fpr, tpr)
    _assert_png(tmp_path / "roc.png", plots.roc_plot(curves, tmp_path / "roc.png", "open set"))
    log_path = tmp_path / "roc_log.png"
    _assert_png(log_path, plots.roc_plot(curves, log_path, "verification", log_x=True))


def test_confusion_plot_with_unknowns(tmp_path):
    rng = np.random.default_rng()
    labels = rng.integers(-1, 5, size=200)  # -1: unknown identities
    predicted = np.where(rng.random(200) < 0.8, labels, rng.integers(-1, 5, size=200))
    path = tmp_path / "confusion.png"
    names = [f"person {i}" for i in range(5)]
    _assert_png(path, plots.confusion_plot(labels, predicted, names, path, "ensemble: vote"))
    with pytest.raises(ValueError, match="predicted"):
        plots.confusion_plot(labels, np.full(200, 5), names, path, "bad")


def test_embedding_plot_marks_unknowns(tmp_path):
    rng = np.random.default_rng()
    centres = rng.normal(size=(8, 16)) * 3
    identities = np.repeat(np.arange(8), 6)
    embeddings = centres[identities] + rng.normal(size=(48, 16))
    known = identities < 6
    path = tmp_path / "tsne.png"
    _assert_png(
        path,
        plots.embedding_plot(embeddings, identities, known, path, "t-SNE", seed=1, max_iter=250),
    )
    # More samples than max_points: a seeded subset is embedded.
    subset_path = tmp_path / "tsne_subset.png"
    _assert_png(
        subset_path,
        plots.embedding_plot(
            embeddings, identities, known, subset_path, "t-SNE", max_iter=250, max_points=20
        ),
    )
    with pytest.raises(ValueError, match="known"):
        plots.embedding_plot(embeddings, identities, known[:-1], path, "t-SNE")


def test_training_curves(tmp_path):
    history = {"loss": [2.0, 1.2, 0.8, 0.5], "accuracy": [0.3, 0.6, 0.8, 0.9]}
    path = tmp_path / "curves.png"
    _assert_png(path, plots.training_curves(history, path, "train: arcface"))


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="path"):
        plots.reliability_diagram([0.5, 0.9], [1, 0], tmp_path / "diagram.jpg", "t")
    with pytest.raises(ValueError, match="curves"):
        plots.roc_plot({}, tmp_path / "roc.png", "t")
    with pytest.raises(ValueError, match="tpr"):
        plots.roc_plot({"a": ([0, 1], [0, 0.5, 1])}, tmp_path / "roc.png", "t")
    with pytest.raises(ValueError, match="history"):
        plots.training_curves({"loss": []}, tmp_path / "curves.png", "t")
