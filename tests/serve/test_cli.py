"""`angular predict` and `angular embed`: end to end on models the pipeline trained for
one epoch (on digits always, on a slice of the ORL faces when ../shared/data/orl is there), checked
against what the library computes from evaluate's saved outputs; every user error is one line on
stderr and a non-zero exit status, never a traceback."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from pipeline_testing import ORL, tiny_raw, write_params
from serve_testing import run_cli

from angular import cli
from angular.eval import metrics as M
from angular.eval.ensemble import combine
from angular.serve.predict import PredictError, embed, load_predictor, predict
from pipeline import calibrate, evaluate, prepare, run_stage
from pipeline import train as train_stage

REPO = Path(__file__).resolve().parents[2]

DIGIT_ITEMS = ["arcface", "cosface"]
FACES_PARAMS = REPO / "experiments" / "faces" / "params.yaml"


def run_pipeline(folder: Path, raw: dict) -> Path:
    """prepare -> train -> calibrate -> evaluate in ``folder`` (in this process)."""
    write_params(folder, raw)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        assert run_stage(prepare.main, []) == 0
        for item in raw["train"]["items"]:
            assert run_stage(train_stage.main, [item]) == 0
            assert run_stage(calibrate.main, [item]) == 0
        assert run_stage(evaluate.main, []) == 0
    return folder


@pytest.fixture(scope="module")
def digits_project(tmp_path_factory) -> Path:
    """Two heads trained for one epoch on digits, calibrated and evaluated."""
    folder = tmp_path_factory.mktemp("digits_project")
    raw = tiny_raw(train__items=DIGIT_ITEMS, train__epochs=1, evaluate__rules=["mean_prob", "vote"])
    return run_pipeline(folder, raw)


@pytest.fixture(scope="module")
def orl_project(tmp_path_factory) -> Path:
    """The faces experiment's params on a slice of ORL (8 people: 6 known, 2 unknown), with one
    ArcFace head trained for one epoch."""
    if not (ORL / "s1").is_dir():
        pytest.skip(f"the ORL faces are not at {ORL}")
    folder = tmp_path_factory.mktemp("orl_project")
    faces = folder / "faces"
    faces.mkdir()
    for index in range(1, 9):
        (faces / f"s{index}").symlink_to(ORL.resolve() / f"s{index}", target_is_directory=True)
    raw = yaml.safe_load(FACES_PARAMS.read_text(encoding="utf-8"))
    raw["data"].update(path=str(faces), unknown_identities=2)
    raw["train"].update(items=["arcface"], epochs=1, num_threads=1)
    raw["evaluate"]["embedding_plot"] = False
    raw["tracking"]["enabled"] = False
    return run_pipeline(folder, raw)


def saved_outputs(project: Path, items, split: str):
    """evaluate's saved logits and embeddings of one split, and the calibrated temperatures."""
    logits, embeddings, temperatures = {}, [], {}
    for item in items:
        saved = np.load(project / "outputs" / "evaluate" / f"{item}.npz")
        temperatures |= json.loads(
            (project / "outputs" / "calibration" / f"{item}.json").read_text()
        )["temperatures"]
        logits |= {
            key.removeprefix(f"{split}_logits_"): saved[key]
            for key in saved.files
            if key.startswith(f"{split}_logits_")
        }
        embeddings.append(saved[f"{split}_embeddings"])
    return logits, embeddings, temperatures


def test_predict_on_orl_faces_end_to_end(orl_project):
    """The text output of `angular predict` on the test and unknown faces of the slice: the head's
    calibrated prediction, and `unknown` exactly below evaluate's threshold."""
    from angular.data import read_manifest

    manifest = read_manifest(orl_project / "data" / "prepared")
    images = manifest.paths("test") + manifest.paths("unknown")
    result = run_cli("predict", *map(str, images), cwd=orl_project)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "path\tidentity\tconfidence\tclosest"
    rows = [line.split("\t") for line in lines[1:]]
    assert [row[0] for row in rows] == [str(p) for p in images]

    metrics = json.loads((orl_project / "metrics" / "evaluate.json").read_text())
    threshold = metrics["heads"]["arcface"]["threshold"]
    logits, _, temperatures = saved_outputs(orl_project, ["arcface"], "test")
    unknown_logits, _, _ = saved_outputs(orl_project, ["arcface"], "unknown")
    probs = M.softmax(
        np.concatenate([logits["arcface"], unknown_logits["arcface"]]), temperatures["arcface"]
    )
    classes = list(manifest.classes)
    for row, p in zip(rows, probs):
        closest, confidence = classes[int(p.argmax())], float(p.max())
        assert row[3] == closest
        assert float(row[2]) == pytest.approx(confidence, abs=1e-4)
        assert row[1] == (closest if confidence >= threshold else "unknown")
    assert "head arcface" in result.stderr and "threshold" in result.stderr
    assert "Traceback" not in result.stderr


def test_predict_json_on_digits_matches_the_evaluated_ensemble(digits_project):
    """`--json`: one document; the default is the first evaluated ensemble rule (mean_prob) with
    the calibrated temperatures and evaluate's threshold for it."""
    from angular.data import read_manifest

    manifest = read_manifest(digits_project / "data" / "prepared")
    result = run_cli("predict", "--json", "data/prepared/images", cwd=digits_project)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    metrics = json.loads((digits_project / "metrics" / "evaluate.json").read_text())
    assert document["heads"] == DIGIT_ITEMS and document["rule"] == "mean_prob"
    assert document["threshold"] == metrics["ensembles"]["mean_prob"]["threshold"]
    predictions = {(digits_project / p["path"]).resolve(): p for p in document["predictions"]}
    assert len(predictions) == len(manifest.records)  # every digit image, found recursively

    for split in ("test", "unknown"):
        logits, _, temperatures = saved_outputs(digits_project, DIGIT_ITEMS, split)
        assert document["temperatures"] == temperatures
        probs = [M.softmax(logits[m], temperatures[m]) for m in DIGIT_ITEMS]
        predicted, confidence, _ = combine(probs, "mean_prob")
        for path, label, conf in zip(manifest.paths(split), predicted, confidence):
            entry = predictions[path.resolve()]
            assert entry["closest"] == manifest.classes[label]
            assert entry["confidence"] == pytest.approx(conf, abs=1e-5)
            assert entry["known"] == (conf >= document["threshold"])
            assert entry["identity"] == (entry["closest"] if entry["known"] else "unknown")


def test_predict_options_choose_the_head_rule_temperature_and_threshold(digits_project):
    from angular.data import read_manifest

    manifest = read_manifest(digits_project / "data" / "prepared")
    images = manifest.paths("test")[:40]
    logits, _, temperatures = saved_outputs(digits_project, DIGIT_ITEMS, "test")
    metrics = json.loads((digits_project / "metrics" / "evaluate.json").read_text())

    head = predict(images, project=digits_project, head="cosface")
    probs = M.softmax(logits["cosface"][:40], temperatures["cosface"])
    assert [p.closest for p in head] == [manifest.classes[i] for i in probs.argmax(1)]
    assert {p.threshold for p in head} == {metrics["heads"]["cosface"]["threshold"]}

    vote = predict(images, project=digits_project, ensemble="vote", temperature=2.0, threshold=0.5)
    predicted, confidence, _ = combine(
        [M.softmax(logits[m][:40], 2.0) for m in DIGIT_ITEMS], "vote"
    )
    assert [p.confidence for p in vote] == pytest.approx(confidence.tolist())
    assert [p.known for p in vote] == (confidence >= 0.5).tolist()
    assert all(p.identity is None or p.identity == p.closest for p in vote)

    # Explicit model files: the temperature defaults to 1 and a threshold is required.
    model = digits_project / "outputs" / "models" / "arcface.pt"
    explicit = predict(images, model_paths=[model], threshold=0.0)
    probs = M.softmax(logits["arcface"][:40])
    assert [p.confidence for p in explicit] == pytest.approx(probs.max(1).tolist(), abs=1e-5)
    assert all(p.known for p in explicit)
    with pytest.raises(PredictError, match="--threshold is needed with --model"):
        load_predictor(model_paths=[model])


def test_embed_writes_unit_embeddings_with_their_paths(digits_project, tmp_path):
    """npz (subprocess), npy and csv: the concatenation of the normalised embeddings of both
    models, normalised, in the order of the paths; --item picks one model."""
    from angular.data import read_manifest

    manifest = read_manifest(digits_project / "data" / "prepared")
    images = manifest.paths("unknown")
    out = tmp_path / "unknown.npz"
    result = run_cli("embed", *map(str, images), "--out", str(out), cwd=digits_project)
    assert result.returncode == 0, result.stderr
    # Progress on stderr: reading the images, then each model (one line each in a log).
    assert "angular embed: reading images: 100%" in result.stderr
    for item in DIGIT_ITEMS:
        assert (
            f"angular embed: {item}: 100%" in result.stderr
            and f"{len(images)}/{len(images)}" in result.stderr
        )
    saved = np.load(out)
    _, parts, _ = saved_outputs(digits_project, DIGIT_ITEMS, "unknown")
    unit = [p / np.linalg.norm(p, axis=1, keepdims=True) for p in parts]
    expected = np.concatenate(unit, axis=1) / np.sqrt(len(unit))
    assert saved["embeddings"].shape == (len(images), 2 * 16)
    np.testing.assert_allclose(saved["embeddings"], expected, atol=1e-5)
    assert saved["paths"].tolist() == [str(p) for p in images]
    assert saved["models"].tolist() == DIGIT_ITEMS

    assert cli.main(["embed", *map(str, images), "--out", str(tmp_path / "a.npy"),
                     "--project", str(digits_project), "--item", "cosface"]) == 0  # fmt: skip
    array = np.load(tmp_path / "a.npy")
    np.testing.assert_allclose(array, unit[1], atol=1e-5)
    assert cli.main(["embed", *map(str, images[:3]), "--out", str(tmp_path / "a.csv"),
                     "--project", str(digits_project)]) == 0  # fmt: skip
    rows = (tmp_path / "a.csv").read_text().splitlines()
    assert rows[0].split(",")[:2] == ["path", "e0"] and len(rows[0].split(",")) == 1 + 32
    assert [r.split(",")[0] for r in rows[1:]] == [str(p) for p in images[:3]]
    np.testing.assert_allclose(
        [[float(v) for v in r.split(",")[1:]] for r in rows[1:]], expected[:3], atol=1e-6
    )


def test_flip_test_embeddings_add_the_mirrored_image(digits_project):
    from angular.data import read_manifest

    images = read_manifest(digits_project / "data" / "prepared").paths("test")[:8]
    plain = embed(images, project=digits_project, item="arcface")
    flipped = embed(images, project=digits_project, item="arcface", flip_test=True)
    mirrored_files = []
    for path in images:  # the mirror images, written as files: their plain embeddings
        from PIL import Image

        mirrored_files.append(path.parent.parent.parent / f"mirror_{path.parent.name}_{path.name}")
        Image.open(path).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(mirrored_files[-1])
    mirrored = embed(mirrored_files, project=digits_project, item="arcface")
    expected = plain.vectors + mirrored.vectors
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(flipped.vectors, expected, atol=1e-5)
    assert not np.allclose(plain.vectors, flipped.vectors)  # digits are not symmetric
    assert flipped.paths == [str(p) for p in images]


def _bad_image(folder: Path) -> Path:
    path = folder / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))  # a PNG signature, then noise
    return path


@pytest.mark.parametrize(
    "case",
    [
        "missing_path",
        "empty_folder",
        "unreadable_image",
        "missing_model",
        "no_project",
        "bad_head",
        "bad_out_format",
        "bad_threshold",
        "no_cuda",
        "malformed_command_line",
    ],
)
def test_every_error_is_one_line_and_a_non_zero_exit(case, digits_project, tmp_path):
    image = str(next((digits_project / "data" / "prepared" / "images" / "0").iterdir()))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no image here")
    cases = {
        "missing_path": (["predict", str(tmp_path / "nope.png")], "nope.png: no such file"),
        "empty_folder": (["predict", str(tmp_path / "empty")], "empty: no image files"),
        "unreadable_image": (
            ["predict", image, str(_bad_image(tmp_path))],
            "broken.png: cannot read the image",
        ),
        "missing_model": (
            ["embed", image, "--out", "x.npz", "--model", str(tmp_path / "none.pt")],
            "--model " + str(tmp_path / "none.pt") + ": no such model file",
        ),
        "no_project": (
            ["predict", image, "--project", str(tmp_path)],
            "outputs/models: no trained model; run `make repro`",
        ),
        "bad_head": (["predict", image, "--head", "nosuch"], "--head nosuch: no such head"),
        "bad_out_format": (["embed", image, "--out", "x.txt"], "--out x.txt: unknown format"),
        "bad_threshold": (["predict", image, "--threshold", "1.5"], "--threshold must be"),
        "no_cuda": (["predict", image, "--device", "cuda"], "no CUDA device is available"),
        "malformed_command_line": (["predict", image, "--ensemble", "nosuch"], "invalid choice"),
    }
    if case == "no_cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    args, message = cases[case]
    result = run_cli(*args, cwd=digits_project)
    assert result.returncode == (2 if case == "malformed_command_line" else 1), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert message in result.stderr
    if case != "malformed_command_line":  # argparse prints its usage first
        assert result.stderr.count("\n") == 1
        assert result.stderr.startswith(f"angular {args[0]}: error: ")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_predict_and_embed_on_cuda_agree_with_cpu(digits_project):
    images = [str(digits_project / "data" / "prepared" / "images" / "3")]
    on_cpu = predict(images, project=digits_project, device="cpu")
    on_gpu = predict(images, project=digits_project, device="cuda")
    assert [p.closest for p in on_gpu] == [p.closest for p in on_cpu]
    assert [p.confidence for p in on_gpu] == pytest.approx([p.confidence for p in on_cpu], 1e-4)
    np.testing.assert_allclose(
        embed(images, project=digits_project, device="cuda").vectors,
        embed(images, project=digits_project, device="cpu").vectors,
        atol=1e-4,
    )


def test_predict_reads_where_the_pipeline_writes():
    import pipeline
    from angular.serve import predict as api

    assert api.MODELS_DIR == pipeline.MODELS_DIR
    assert api.CALIBRATION_DIR == pipeline.CALIBRATION_DIR
    assert api.EVALUATE_METRICS == pipeline.EVALUATE_METRICS
