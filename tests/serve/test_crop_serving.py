"""A model trained on ``data.crop`` images cuts the images it serves the same way: the model file
records the crop, and ``angular embed`` / ``predict`` apply it to the user's (uncropped) images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from angular.nn.recognition import build_model, model_document
from angular.serve.predict import embed

BACKBONE = {"name": "small_cnn", "in_channels": 1, "embedding_dim": 16, "options": {}}
HEADS = {"arcface": {"type": "arcface", "s": 16.0, "m1": 1.0, "m2": 0.3, "m3": 0.0}}
BOX = [5, 3, 37, 35]  # left, top, right, bottom: a 32 x 32 region of a 44 x 40 image


def _save_model(path, crop):
    torch.manual_seed(0)
    model = build_model(BACKBONE, HEADS, num_classes=3)
    image = {"size": [16, 16], "channels": 1, "mean": [0.5], "std": [0.25], "crop": crop}
    document = model_document(
        model,
        item="arcface",
        backbone=BACKBONE,
        heads=HEADS,
        classes=["a", "b", "c"],
        image=image,
        training={},
    )
    torch.save(document, path)
    return path


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(7)
    whole = rng.integers(0, 256, size=(40, 44), dtype=np.uint8)  # rows = height
    left, top, right, bottom = BOX
    (tmp_path / "whole").mkdir()
    (tmp_path / "cut").mkdir()
    Image.fromarray(whole).save(tmp_path / "whole" / "face.png")
    Image.fromarray(whole[top:bottom, left:right]).save(tmp_path / "cut" / "face.png")
    return tmp_path


def test_served_images_are_cut_as_the_model_file_says(images):
    with_crop = _save_model(images / "with_crop.pt", {"box": BOX})
    without = _save_model(images / "without.pt", None)  # same weights (same seed)
    served = embed([images / "whole" / "face.png"], model_paths=[with_crop]).vectors
    cut_by_hand = embed([images / "cut" / "face.png"], model_paths=[without]).vectors
    np.testing.assert_allclose(served, cut_by_hand, rtol=0, atol=1e-6)
    # The test can fail: the uncropped image gives another embedding without the crop.
    uncut = embed([images / "whole" / "face.png"], model_paths=[without]).vectors
    assert np.abs(uncut - cut_by_hand).max() > 1e-3


def test_a_central_crop_is_served_too(images):
    model = _save_model(images / "central.pt", {"central": 0.5})
    whole = embed([images / "whole" / "face.png"], model_paths=[model]).vectors
    no_crop = embed(
        [images / "whole" / "face.png"], model_paths=[_save_model(images / "n.pt", None)]
    ).vectors
    assert np.isfinite(whole).all()
    assert np.abs(whole - no_crop).max() > 1e-3
