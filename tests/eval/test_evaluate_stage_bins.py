"""The evaluate stage with ``evaluate.verification.bins``: a .bin packed here from digits' test
images (RGB PNGs, as published sets hold faces) is scored per item and ensemble, each number what
bin_metrics gives on embeddings computed here by hand from the model file (PIL grey + resize,
normalise, the model and its mirror); a bad set stops the stage with one line naming it."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from pipeline_testing import tiny_raw, write_params

from angular.config import parse_params
from angular.data import read_manifest, write_bin
from angular.eval.bins import bin_metrics, flip_embeddings
from angular.eval.evaluate import json_ready
from angular.nn.recognition import load_model
from angular.train.loop import train_item
from pipeline import calibrate, evaluate, run_stage
from pipeline import train as train_stage

ITEMS = ["arcface", "cosface"]
FARS = [1e-2, 1e-1]


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, digits_prepared):
    """Two items trained for two epochs on digits and calibrated."""
    folder = tmp_path_factory.mktemp("bins_stage")
    shutil.copytree(digits_prepared, folder / "data" / "prepared")
    raw = tiny_raw(train__items=ITEMS)
    write_params(folder, raw)
    params = parse_params(raw)
    manifest = read_manifest(folder / "data" / "prepared")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        for item in ITEMS:
            train_item(params, item, manifest, train_stage.paths_for(item))
            assert run_stage(calibrate.main, [item]) == 0
    return folder


def digits_bin(folder, path, n_pairs=60, seed=0):
    """Pairs of digits' test images as a .bin: RGB PNGs at 16 x 16 (the model reads 8 x 8 grey)."""
    manifest = read_manifest(folder / "data" / "prepared")
    paths, identities = manifest.paths("test"), np.asarray(manifest.identities("test"))
    rng = np.random.default_rng(seed)
    images, same = [], []
    for k in range(n_pairs):
        a = rng.integers(len(paths))
        pool = np.flatnonzero((identities == identities[a]) == (k % 2 == 0))
        b = rng.choice(pool[pool != a])
        for index in (a, b):
            with Image.open(folder / paths[index]) as image:
                rgb = image.convert("RGB").resize((16, 16), Image.Resampling.BILINEAR)
            out = io.BytesIO()
            rgb.save(out, format="PNG")
            images.append(out.getvalue())
        same.append(bool(k % 2 == 0))
    write_bin(path, images, same)
    return images, np.array(same)


def by_hand(model_path, images):
    """The model's embeddings of the encoded images and of their mirrors, preprocessed here."""
    loaded = load_model(model_path)
    height, width = loaded.image["size"]
    mean, std = loaded.image["mean"][0], loaded.image["std"][0]
    batch = []
    for data in images:
        with Image.open(io.BytesIO(data)) as image:
            grey = image.convert("RGB").convert("L").resize((width, height), Image.BILINEAR)
        batch.append((np.asarray(grey, np.float64) / 255.0 - mean) / std)
    inputs = torch.from_numpy(np.stack(batch)[:, None]).float()
    with torch.no_grad():
        return loaded.model(inputs).numpy(), loaded.model(inputs.flip(-1)).numpy()


def test_the_stage_scores_each_set_per_item_and_ensemble(calibrated, tmp_path, monkeypatch):
    copy = tmp_path / "copy"
    shutil.copytree(calibrated, copy)
    monkeypatch.chdir(copy)
    (copy / "sets").mkdir()
    images, same = digits_bin(copy, copy / "sets" / "digit_pairs.bin")
    raw = tiny_raw(train__items=ITEMS)
    raw["evaluate"]["members"]["rule"] = "none"
    raw["evaluate"]["verification"].update(bins=["sets/digit_pairs.bin"], fars=FARS)
    write_params(copy, raw)
    assert run_stage(evaluate.main, []) == 0
    results = json.loads((copy / "metrics" / "evaluate.json").read_text())
    found = results["bins"]["digit_pairs"]
    assert list(found) == ITEMS + ["ensemble"]
    units = []
    for item in ITEMS:
        embeddings, flipped = by_hand(copy / "outputs" / "models" / f"{item}.pt", images)
        expected = json_ready(bin_metrics(embeddings, flipped, same, FARS, 10))
        assert found[item] == pytest.approx(expected, abs=1e-6), item
        units.append(flip_embeddings(embeddings, flipped))
    expected = json_ready(bin_metrics(np.concatenate(units, axis=1), None, same, FARS, 10))
    assert found["ensemble"] == pytest.approx(expected, abs=1e-6)
    assert found["arcface"]["n_genuine"] == 30 and found["arcface"]["n_impostor"] == 30
    report = (copy / "outputs" / "evaluate" / "report.md").read_text()
    assert "Verification set digit_pairs (insightface's protocol, flip test):" in report
    # The drawn pairs report the configured FARs too.
    assert "tar@far=1e-1" in results["verification"]["test"]["arcface"]
    assert "tar@far=1e-3" not in results["verification"]["test"]["arcface"]


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"not a pickle", "not a verification .bin"),
        (b"\x80\x02cos\nsystem\nq\x00.", "refused: a downloaded pickle can run code"),
        (None, "cannot read"),
    ],
)
def test_a_bad_set_stops_the_stage_in_one_line(
    calibrated, tmp_path, monkeypatch, capsys, content, words
):
    copy = tmp_path / "copy"
    shutil.copytree(calibrated, copy)
    monkeypatch.chdir(copy)
    if content is not None:
        (copy / "bad.bin").write_bytes(content)
    raw = tiny_raw(train__items=ITEMS)
    raw["evaluate"]["verification"].update(bins=["bad.bin"])
    write_params(copy, raw)
    assert run_stage(evaluate.main, []) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: bad.bin: ") and words in err and "\n" not in err, err
    assert not (copy / "outputs" / "evaluate" / "arcface.npz").exists()  # stopped before inference
