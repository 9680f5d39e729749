"""calibrate and evaluate on tiny trained models (a single head and a joint group of three)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from pipeline_testing import create_empty_store, tiny_raw, write_params

from angular.config import ConfigError, parse_params
from angular.data import prepare_dataset, read_manifest
from angular.eval import metrics as M
from angular.eval.calibration import calibration_report, fit_probability_temperature, temper
from angular.eval.ensemble import RULES, combine
from angular.eval.evaluate import TEMPERED_RULES
from angular.eval.open_set import unknown_halves
from angular.eval.pairs import pair_names
from angular.train.loop import train_item
from pipeline import calibrate, evaluate, run_stage
from pipeline import train as train_stage

ITEMS = ["arcface", "joint"]
MEMBERS = ["arcface", "joint_arcface", "joint_cosface", "joint_sphereface"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits_prepared):
    """A project with arcface and the joint group trained for two epochs."""
    folder = tmp_path_factory.mktemp("trained")
    shutil.copytree(digits_prepared, folder / "data" / "prepared")
    raw = tiny_raw(train__items=ITEMS)
    write_params(folder, raw)
    params = parse_params(raw)
    manifest = read_manifest(folder / "data" / "prepared")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        for item in ITEMS:
            train_item(params, item, manifest, train_stage.paths_for(item))
    return folder


@pytest.fixture(scope="module")
def evaluated(trained):
    """The trained project after calibrate@<item> and evaluate with the default params."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(trained)
        for item in ITEMS:
            assert run_stage(calibrate.main, [item]) == 0
        assert run_stage(evaluate.main, []) == 0
    return trained


def assert_png(path):
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 100


def test_calibrate_fits_a_temperature_per_head(evaluated):
    in_trained = evaluated
    temperatures = {}
    for item in ITEMS:
        document = json.loads((in_trained / "outputs" / "calibration" / f"{item}.json").read_text())
        assert document["method"] == "fit"
        temperatures.update(document["temperatures"])
        metrics = json.loads((in_trained / "metrics" / "calibrate" / f"{item}.json").read_text())
        for member, values in metrics.items():
            assert values["temperature"] == document["temperatures"][member] > 0
            assert values["fitted"] is True  # two tiny epochs: some validation image is wrong
            assert (
                set(values["before"]) == set(values["after"]) == {"nll", "ece", "brier", "accuracy"}
            )
            # T = 1 is one of the candidates, so the fitted T never has a higher validation NLL.
            assert values["after"]["nll"] <= values["before"]["nll"] + 1e-9
            assert values["after"]["accuracy"] == values["before"]["accuracy"]
            for when in ("before", "after"):
                assert_png(
                    in_trained / "outputs" / "plots" / "calibrate" / item / f"{member}_{when}.png"
                )
    assert sorted(temperatures) == sorted(MEMBERS)
    assert len(set(temperatures.values())) == len(MEMBERS)  # each head gets its own


def test_calibrate_reports_before_and_after_from_the_saved_val_logits(evaluated):
    """The stage's numbers equal calibration_report on the val logits evaluate saves."""
    in_trained = evaluated
    saved = np.load(in_trained / "outputs" / "evaluate" / "arcface.npz")
    metrics = json.loads((in_trained / "metrics" / "calibrate" / "arcface.json").read_text())
    values = metrics["arcface"]
    logits, labels = saved["val_logits_arcface"], saved["val_labels"]
    for when, temperature in (("before", 1.0), ("after", values["temperature"])):
        expected = calibration_report(logits, labels, temperature, 15)
        assert values[when] == pytest.approx(expected, rel=1e-6)


def test_a_fixed_temperature_is_used_as_given(evaluated, tmp_path, monkeypatch):
    copy = tmp_path / "copy"
    shutil.copytree(evaluated, copy)  # leave the shared project's calibration alone
    monkeypatch.chdir(copy)
    write_params(
        copy, tiny_raw(train__items=ITEMS, calibrate__method="fixed", calibrate__temperature=7.5)
    )
    assert run_stage(calibrate.main, ["joint"]) == 0
    document = json.loads((copy / "outputs" / "calibration" / "joint.json").read_text())
    assert document == {
        "method": "fixed",
        "temperatures": {m: 7.5 for m in MEMBERS[1:]},
    }


def test_evaluate_scores_every_head_and_rule(evaluated, monkeypatch):
    in_trained = evaluated
    monkeypatch.chdir(in_trained)
    results = json.loads((in_trained / "metrics" / "evaluate.json").read_text())
    assert list(results["heads"]) == MEMBERS
    assert list(results["ensembles"]) == list(RULES)
    keys = {
        "closed_set_accuracy",
        "open_set_accuracy",
        "threshold",
        "open_set_auroc",
        "oscr",
        "ece",
        "nll",
    }
    sides = {"known_acceptance", "unknown_rejection", "open_set_balanced_accuracy"}
    at_far = {f"{k}@unknown_far" for k in sides | {"threshold", "open_set_accuracy"}}
    keys |= sides | at_far
    for name, values in results["heads"].items():
        assert set(values) == keys | {"ece_uncalibrated"}, name
    for name, values in results["ensembles"].items():
        tempered = {"temperature", "ece_uncalibrated"} if name in TEMPERED_RULES else set()
        assert set(values) == keys | tempered, name
    for group in ("heads", "ensembles"):
        for values in results[group].values():
            assert all(0.0 <= values[k] <= 1.0 for k in keys - {"nll"})

    # Recompute a head and an ensemble rule from the saved logits with the library.
    manifest = read_manifest("data/prepared")
    temperatures = {}
    for item in ITEMS:
        temperatures |= json.loads(
            (in_trained / "outputs" / "calibration" / f"{item}.json").read_text()
        )["temperatures"]
    probs = {}
    for item in ITEMS:
        saved = np.load(in_trained / "outputs" / "evaluate" / f"{item}.npz")
        assert saved["test_labels"].tolist() == manifest.labels("test").tolist()
        assert (saved["unknown_labels"] == -1).all()
        for member in (m for m in MEMBERS if m == item or m.startswith(f"{item}_")):
            probs[member] = {
                split: M.softmax(saved[f"{split}_logits_{member}"], temperatures[member])
                for split in ("val", "test", "unknown")
            }
    labels = manifest.labels("test")
    arcface = results["heads"]["arcface"]
    assert arcface["closed_set_accuracy"] == pytest.approx(
        M.top1_accuracy(probs["arcface"]["test"], labels)
    )
    assert arcface["threshold"] == pytest.approx(
        M.threshold_at_known_rate(probs["arcface"]["val"].max(1), 0.95)
    )
    # The two open-set operating points of a head.
    all_labels = np.concatenate([labels, manifest.labels("unknown")])
    known = all_labels >= 0
    confidence = np.concatenate([probs["arcface"][s].max(1) for s in ("test", "unknown")])
    predicted = np.concatenate([probs["arcface"][s].argmax(1) for s in ("test", "unknown")])
    at_threshold = M.open_set_rates(confidence, predicted, all_labels, known, arcface["threshold"])
    assert {k: arcface[k] for k in at_threshold} == pytest.approx(at_threshold)
    assert at_threshold["known_acceptance"] == pytest.approx(
        np.mean(probs["arcface"]["test"].max(1) >= arcface["threshold"])
    )
    unknown_people = np.asarray(manifest.identities("unknown"))
    halves = unknown_halves(unknown_people, seed=0)
    assert len(set(unknown_people[halves]) & set(unknown_people[~halves])) == 0
    found = []
    for half in (halves, ~halves):
        threshold = M.threshold_at_far(probs["arcface"]["unknown"].max(1)[~half], 0.05)
        keep = np.r_[np.ones(len(labels), bool), half]
        args = (confidence[keep], predicted[keep], all_labels[keep], known[keep], threshold)
        found.append(M.open_set_rates(*args) | {"threshold": threshold})
        assert np.mean(probs["arcface"]["unknown"].max(1)[~half] >= threshold) <= 0.05
    for key in found[0]:
        expected = (found[0][key] + found[1][key]) / 2
        assert arcface[f"{key}@unknown_far"] == pytest.approx(expected), key

    # The mean_prob ensemble, with its own temperature fitted on validation.
    combined = {
        split: combine([probs[m][split] for m in MEMBERS], "mean_prob")
        for split in ("val", "test", "unknown")
    }
    mean_prob = results["ensembles"]["mean_prob"]
    temperature = fit_probability_temperature(combined["val"][2], manifest.labels("val"))
    assert mean_prob["temperature"] == pytest.approx(temperature)
    assert mean_prob["ece_uncalibrated"] == pytest.approx(
        M.expected_calibration_error(combined["test"][2], labels, 15)
    )
    combined = {
        split: (predicted, temper(probs, temperature).max(1), temper(probs, temperature))
        for split, (predicted, _, probs) in combined.items()
    }
    assert mean_prob["ece"] == pytest.approx(
        M.expected_calibration_error(combined["test"][2], labels, 15)
    )
    threshold = M.threshold_at_known_rate(combined["val"][1], 0.95)
    confidence = np.concatenate([combined["test"][1], combined["unknown"][1]])
    predicted = np.concatenate([combined["test"][0], combined["unknown"][0]])
    assert mean_prob["open_set_accuracy"] == pytest.approx(
        M.open_set_accuracy(confidence, predicted, all_labels, all_labels >= 0, threshold)
    )
    assert mean_prob["oscr"] == pytest.approx(
        M.oscr(confidence, predicted, all_labels, all_labels >= 0)
    )

    # Verification by each item's embedding and the concatenation, on unknown and test images.
    for split in ("unknown", "test"):
        found = results["verification"][split]
        assert list(found) == ITEMS + ["ensemble"]
        for values in found.values():
            assert (
                0.5 <= values["auc"] <= 1.0 and values["n_genuine"] > 0 and values["n_impostor"] > 0
            )
    plots = in_trained / "outputs" / "plots" / "evaluate"
    for name in MEMBERS + [f"ensemble_{rule}" for rule in RULES]:
        assert_png(plots / f"reliability_{name}.png")
        assert_png(plots / f"confusion_{name}.png")
    for name in ("roc_open_set", "verification_roc_unknown", "verification_roc_test"):
        assert_png(plots / f"{name}.png")
    report = (in_trained / "outputs" / "evaluate" / "report.md").read_text()
    assert all(f"| {name} |" in report for name in MEMBERS)
    assert all(f"| ensemble {rule} |" in report for rule in RULES)


def test_evaluate_with_a_fixed_threshold_and_embedding_plots(evaluated, tmp_path, monkeypatch):
    in_trained = tmp_path / "copy"
    shutil.copytree(evaluated, in_trained)  # leave the shared project's results alone
    monkeypatch.chdir(in_trained)
    write_params(
        in_trained,
        tiny_raw(train__items=ITEMS, evaluate__threshold=0.9, evaluate__embedding_plot=True),
    )
    assert run_stage(evaluate.main, []) == 0
    results = json.loads((in_trained / "metrics" / "evaluate.json").read_text())
    assert {v["threshold"] for g in ("heads", "ensembles") for v in results[g].values()} == {0.9}
    for item in ITEMS:
        assert_png(in_trained / "outputs" / "plots" / "evaluate" / f"embeddings_{item}.png")


def test_evaluate_before_calibrate_names_the_missing_file(evaluated, tmp_path, monkeypatch, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(evaluated, copy)
    monkeypatch.chdir(copy)
    (copy / "outputs" / "calibration" / "joint.json").unlink()
    assert run_stage(evaluate.main, []) == 1
    err = capsys.readouterr().err
    assert "outputs/calibration/joint.json: missing; run calibrate@joint first" in err


def test_without_unknown_identities_open_set_metrics_are_left_out(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = tiny_raw(
        data__unknown_identities=0,
        train__epochs=1,
        train__items=["arcface", "cosface"],
        evaluate__rules=["vote"],
    )
    write_params(tmp_path, raw)
    params = parse_params(raw)
    manifest = prepare_dataset(params.data, "data/prepared")
    assert not manifest.split("unknown")
    for item in params.train.items:
        train_item(params, item, manifest, train_stage.paths_for(item))
    for item in params.train.items:
        assert run_stage(calibrate.main, [item]) == 0
    assert run_stage(evaluate.main, []) == 0
    results = json.loads((tmp_path / "metrics" / "evaluate.json").read_text())
    for values in results["heads"].values():
        assert "open_set_accuracy" not in values and "open_set_auroc" not in values
        assert 0.1 < values["closed_set_accuracy"] <= 1.0
    assert "open_set_accuracy" not in results["ensembles"]["vote"]
    assert list(results["verification"]) == ["test"]


def test_a_perfectly_separated_validation_split_keeps_t_at_one(
    evaluated, tmp_path, monkeypatch, capsys
):
    """With no misclassified validation image the NLL falls as T -> 0: the stage keeps T = 1."""
    from angular.serve.inference import SplitOutputs

    copy = tmp_path / "copy"
    shutil.copytree(evaluated, copy)
    monkeypatch.chdir(copy)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 8, size=60)
    logits = rng.normal(0.0, 3.0, size=(60, 8))
    logits[np.arange(60), labels] = logits.max(axis=1) + rng.uniform(0.1, 5.0, size=60)
    separated = SplitOutputs(np.zeros((60, 16)), {"arcface": logits}, labels, ["x"] * 60)
    monkeypatch.setattr(calibrate, "run_model", lambda *args, **kwargs: separated)
    assert run_stage(calibrate.main, ["arcface"]) == 0
    metrics = json.loads((copy / "metrics" / "calibrate" / "arcface.json").read_text())
    assert metrics["arcface"]["temperature"] == 1.0 and metrics["arcface"]["fitted"] is False
    assert metrics["arcface"]["before"]["accuracy"] == 1.0
    assert "classifies every validation image correctly" in capsys.readouterr().err

    logits[0] = np.roll(logits[0], 1)  # one mistake: the NLL has a minimum, T is fitted
    assert run_stage(calibrate.main, ["arcface"]) == 0
    metrics = json.loads((copy / "metrics" / "calibrate" / "arcface.json").read_text())
    assert metrics["arcface"]["fitted"] is True and metrics["arcface"]["temperature"] != 1.0


def _lfw_pairs(names, identities, rng, count):
    """Lines of an LFW pairs.txt over ``names`` (``<identity>_<nnnn>``): genuine and impostor."""
    by_identity: dict[str, list[str]] = {}
    for name, identity in zip(names, identities):
        by_identity.setdefault(identity, []).append(name)
    number = {name: int(name.rsplit("_", 1)[1]) for name in names}
    people = sorted(by_identity)
    lines, same = [], []
    for index in range(count):
        if index % 2 == 0:
            person = people[rng.integers(len(people))]
            first, second = rng.choice(by_identity[person], size=2, replace=False)
            lines.append(f"{person} {number[first]} {number[second]}")
            same.append(True)
        else:
            one, other = rng.choice(people, size=2, replace=False)
            first, second = rng.choice(by_identity[one]), rng.choice(by_identity[other])
            lines.append(f"{one} {number[first]} {other} {number[second]}")
            same.append(False)
    return lines, np.array(same)


def test_evaluate_with_flip_test_and_a_pairs_file(evaluated, tmp_path, monkeypatch):
    """flip_test adds the mirrored image's normalised embedding to the image's; a pairs file in
    LFW's format is scored on the test and unknown images it names; impostors_per_genuine null
    draws every impostor pair."""
    import torch
    from torch.nn import functional as F

    from angular.data import ImageDataset
    from angular.nn.recognition import load_model

    copy = tmp_path / "copy"
    shutil.copytree(evaluated, copy)
    monkeypatch.chdir(copy)
    manifest = read_manifest("data/prepared")
    paths = manifest.paths("test") + manifest.paths("unknown")
    identities = manifest.identities("test") + manifest.identities("unknown")
    names = pair_names(paths, identities)
    assert names[0] == f"{identities[0]}_{int(paths[0].stem):04d}"  # digits: <digit>/<nnnn>.png
    rng = np.random.default_rng()
    lines, same = _lfw_pairs(names, identities, rng, 40)
    (copy / "pairs.txt").write_text("1 40\n" + "\n".join(lines) + "\n")
    raw = tiny_raw(train__items=ITEMS)
    raw["evaluate"]["verification"].update(
        flip_test=True, pairs_file="pairs.txt", impostors_per_genuine=None
    )
    write_params(copy, raw)
    assert run_stage(evaluate.main, []) == 0
    results = json.loads((copy / "metrics" / "evaluate.json").read_text())

    # The saved embeddings are the flip-test ones: recompute a few with the model.
    saved = np.load(copy / "outputs" / "evaluate" / "arcface.npz")
    loaded = load_model("outputs/models/arcface.pt")
    image = loaded.image
    dataset = ImageDataset(
        manifest.paths("unknown")[:5],
        manifest.labels("unknown")[:5],
        image_size=image["size"],
        channels=image["channels"],
        mean=image["mean"],
        std=image["std"],
    )
    batch = torch.stack([dataset[i][0] for i in range(len(dataset))])
    with torch.no_grad():
        expected = F.normalize(loaded.model(batch), dim=1) + F.normalize(
            loaded.model(batch.flip(-1)), dim=1
        )
    np.testing.assert_allclose(saved["unknown_embeddings"][:5], expected.numpy(), atol=1e-5)
    # The logits stay those of the images themselves (what calibration saw).
    before = np.load(evaluated / "outputs" / "evaluate" / "arcface.npz")
    np.testing.assert_array_equal(saved["test_logits_arcface"], before["test_logits_arcface"])

    # The pairs file's pairs, scored by each item's embedding and by the ensemble.
    found = results["verification"]["pairs_file"]
    assert list(found) == ITEMS + ["ensemble"]
    embeddings = np.concatenate([saved["test_embeddings"], saved["unknown_embeddings"]])
    index_a, index_b, same_read = M.read_pairs_file(copy / "pairs.txt", names)
    np.testing.assert_array_equal(same_read, same)
    expected = M.verification_metrics(
        M.cosine_similarity_pairs(embeddings, index_a, index_b), same, folds=10, seed=0
    )
    # Besides verification_metrics', evaluate adds the thresholds at each FAR (threshold@far=...).
    assert {k: found["arcface"][k] for k in expected} == pytest.approx(
        {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in expected.items()}
    )
    assert set(found["arcface"]) - set(expected) == {
        k for k in found["arcface"] if k.startswith("threshold@")
    }
    assert found["arcface"]["n_genuine"] == same.sum() and found["arcface"]["n_impostor"] == 20
    assert (copy / "outputs" / "plots" / "evaluate" / "verification_roc_pairs_file.png").is_file()

    # Every impostor pair of the unknown images (impostors_per_genuine: null).
    unknown = np.asarray(manifest.identities("unknown"))
    counts = np.unique(unknown, return_counts=True)[1]
    n = len(unknown)
    impostors = n * (n - 1) // 2 - int((counts * (counts - 1) // 2).sum())
    assert results["verification"]["unknown"]["arcface"]["n_impostor"] == impostors
    report = (copy / "outputs" / "evaluate" / "report.md").read_text()
    assert "tar@far=1e-1 | tar@far=1e-2 | tar@far=1e-3" in report
    assert "Verification on the pairs of the pairs file" in report


def test_evaluate_names_a_pairs_file_that_names_missing_images(
    evaluated, tmp_path, monkeypatch, capsys
):
    copy = tmp_path / "copy"
    shutil.copytree(evaluated, copy)
    monkeypatch.chdir(copy)
    (copy / "pairs.txt").write_text("nobody 1 2\nnobody 1 anybody 2\n")
    raw = tiny_raw(train__items=ITEMS)
    raw["evaluate"]["verification"]["pairs_file"] = "pairs.txt"
    write_params(copy, raw)
    assert run_stage(evaluate.main, []) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error in params.yaml: evaluate.verification.pairs_file: ")
    assert "'nobody_0001' is not among names" in err and "\n" not in err

    raw["evaluate"]["verification"]["pairs_file"] = "missing.txt"
    write_params(copy, raw)
    assert run_stage(evaluate.main, []) == 2
    assert "missing.txt does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("flip_test", "yes", "must be true or false"),
        ("pairs_file", "", "must be a non-empty string (or null)"),
        ("pairs_file", 3, "must be a non-empty string (or null)"),
        ("impostors_per_genuine", 0, "must be a number > 0 (or null)"),
    ],
)
def test_verification_options_are_validated(key, value, message):
    from angular.config import ConfigError

    raw = tiny_raw()
    raw["evaluate"]["verification"][key] = value
    with pytest.raises(ConfigError) as caught:
        parse_params(raw)
    assert str(caught.value).startswith(f"evaluate.verification.{key}: {message}, got {value!r}")


def test_verification_options_default_to_off():
    raw = tiny_raw()
    for key in ("flip_test", "pairs_file"):
        raw["evaluate"]["verification"].pop(key, None)
    verification = parse_params(raw).evaluate.verification
    assert verification.flip_test is False and verification.pairs_file is None
    raw["evaluate"]["verification"].update(
        flip_test=True, pairs_file="pairs.txt", impostors_per_genuine=None
    )
    verification = parse_params(raw).evaluate.verification
    assert verification.flip_test is True and verification.pairs_file == "pairs.txt"
    assert verification.impostors_per_genuine is None


def test_evaluate_leaves_out_members_far_below_the_best_on_validation(
    evaluated, tmp_path, monkeypatch
):
    shipped = json.loads((evaluated / "metrics" / "evaluate.json").read_text())["members"]
    assert all(v["in_ensemble"] for v in shipped.values())  # threshold 0.8: all trained alike
    accuracy = {name: v["val_accuracy"] for name, v in shipped.items()}
    best, worst = max(accuracy.values()), min(accuracy.values())
    assert worst < best, accuracy
    threshold = (worst / best + 1.0) / 2.0  # leaves out the worst member at least
    copy = tmp_path / "copy"
    shutil.copytree(evaluated, copy)
    monkeypatch.chdir(copy)
    members = {"rule": "relative_val_accuracy", "threshold": threshold}
    write_params(copy, tiny_raw(train__items=ITEMS, evaluate__members=members))
    assert run_stage(evaluate.main, []) == 0
    results = json.loads((copy / "metrics" / "evaluate.json").read_text())
    kept = [m for m in MEMBERS if accuracy[m] >= threshold * best]
    assert [m for m in MEMBERS if results["members"][m]["in_ensemble"]] == kept
    assert len(kept) < len(MEMBERS)
    # The mean-probability ensemble is that of the kept members' calibrated test probabilities.
    manifest = read_manifest("data/prepared")
    probs = []
    for member in kept:
        item = "arcface" if member == "arcface" else "joint"
        logits = np.load(copy / "outputs" / "evaluate" / f"{item}.npz")[f"test_logits_{member}"]
        temperature = json.loads((copy / "outputs" / "calibration" / f"{item}.json").read_text())
        probs.append(M.softmax(logits, temperature["temperatures"][member]))
    predicted, _, _ = combine(probs, "mean_prob")
    expected = float(np.mean(predicted == np.asarray(manifest.labels("test"))))
    assert results["ensembles"]["mean_prob"]["closed_set_accuracy"] == pytest.approx(expected)
    report = (copy / "outputs" / "evaluate" / "report.md").read_text()
    assert "(left out)" in report and "Ensemble members by validation accuracy" in report


def test_evaluate_registers_its_best_head_when_asked(evaluated, tmp_path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    copy = tmp_path / "copy"
    shutil.copytree(evaluated, copy)
    monkeypatch.chdir(copy)
    store = create_empty_store(copy)
    raw = tiny_raw(train__items=ITEMS)
    raw["tracking"].update(
        enabled=True, uri=f"sqlite:///{store}", experiment="tests", register_model="digits-best"
    )
    write_params(copy, raw)
    assert run_stage(evaluate.main, []) == 0
    members = json.loads((copy / "metrics" / "evaluate.json").read_text())["members"]
    best = max(members, key=lambda name: members[name]["val_accuracy"])
    client = MlflowClient(f"sqlite:///{store}")
    (version,) = client.search_model_versions("name='digits-best'")
    assert str(version.version) == "1" and version.source.endswith(
        "/best" if best == "arcface" else f"/best_{best}"
    )
    logged = client.get_run(version.run_id)
    assert logged.data.tags["stage"] == "evaluate"
    assert f"registered {best} (T = " in capsys.readouterr().err


def _benchmark_folder(root, people: dict[str, int], seed: int = 0):
    """LFW's layout: ``<root>/<name>/<name>_<NNNN>.jpg`` (here PNG, 12x10, random grey)."""
    rng = np.random.default_rng(seed)
    for name, count in people.items():
        folder = root / "lfw" / name
        folder.mkdir(parents=True)
        for number in range(1, count + 1):
            pixels = rng.integers(0, 256, size=(12, 10), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{name}_{number:04d}.png")
    return root


def test_evaluate_scores_a_benchmark_pairs_file_with_its_own_folds(
    evaluated, tmp_path, monkeypatch, capsys
):
    """pairs_root: the pairs file's images anywhere under a folder of the user's, embedded by each
    model (cropped as data.crop says), scored on the file's own folds; pairs of a known (trained)
    identity dropped and counted."""
    from angular.data import ImageDataset
    from angular.nn.recognition import load_model

    copy = tmp_path / "copy"
    shutil.copytree(evaluated, copy)
    monkeypatch.chdir(copy)
    manifest = read_manifest("data/prepared")
    trained_person = manifest.classes[0]  # a digit the models were trained on
    root = _benchmark_folder(tmp_path / "bench", {"Ann": 3, "Bob": 3, "Cy": 2, trained_person: 2})
    # Two folds of 2 genuine + 2 impostor pairs; one pair of each fold touches a trained person.
    lines = ["2 2", "Ann 1 2", "Bob 1 3", "Ann 3 Bob 2", "Cy 1 Ann 2"]
    lines += ["Cy 1 2", f"{trained_person} 1 2", "Bob 1 Cy 2", f"Ann 1 {trained_person} 1"]
    (copy / "pairs.txt").write_text("\n".join(lines) + "\n")
    raw = tiny_raw(train__items=ITEMS)
    raw["data"]["crop"] = {"central": 0.8}
    raw["evaluate"]["verification"].update(pairs_file="pairs.txt", pairs_root=str(root))
    write_params(copy, raw)
    assert run_stage(evaluate.main, []) == 0
    assert "evaluate: arcface, images of the pairs file" in capsys.readouterr().err  # progress
    found = json.loads((copy / "metrics" / "evaluate.json").read_text())["verification"]
    found = found["pairs_file"]
    assert list(found) == ITEMS + ["ensemble"]
    assert found["arcface"]["n_dropped_trained_identity"] == 2
    assert (found["arcface"]["n_genuine"], found["arcface"]["n_impostor"]) == (3, 3)

    # The same numbers from the models themselves.
    names = ["Ann_0001", "Ann_0002", "Ann_0003", "Bob_0001", "Bob_0002", "Bob_0003", "Cy_0001"]
    names += ["Cy_0002"]
    paths = [root / "lfw" / name.split("_")[0] / f"{name}.png" for name in names]
    loaded = load_model("outputs/models/arcface.pt")
    image = loaded.image
    crop = parse_params(raw).data.crop
    dataset = ImageDataset(
        paths,
        [-1] * len(paths),
        image_size=image["size"],
        channels=image["channels"],
        mean=image["mean"],
        std=image["std"],
        crop=crop,
    )
    with torch.no_grad():
        embeddings = loaded.model(torch.stack([dataset[i][0] for i in range(len(paths))]))
    index = {name: i for i, name in enumerate(names)}
    pairs = [("Ann_0001", "Ann_0002"), ("Bob_0001", "Bob_0003"), ("Ann_0003", "Bob_0002")]
    pairs += [("Cy_0001", "Ann_0002"), ("Cy_0001", "Cy_0002"), ("Bob_0001", "Cy_0002")]
    a = np.array([index[x] for x, _ in pairs])
    b = np.array([index[y] for _, y in pairs])
    same = np.array([True, True, False, False, True, False])
    similarity = M.cosine_similarity_pairs(embeddings.numpy(), a, b)
    expected = M.verification_metrics(similarity, same, fold_of=[0, 0, 0, 0, 1, 1])
    assert found["arcface"]["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-6)
    assert found["arcface"]["auc"] == pytest.approx(expected["auc"], abs=1e-6)
    report = (copy / "outputs" / "evaluate" / "report.md").read_text()
    assert "n_dropped_trained_identity" in report


@pytest.mark.parametrize(
    ("lines", "words"),
    [
        (["Ann 1 2", "Bob 1 3"], "holds only genuine pairs (2)"),
        (["Ann 1 Bob 2", "Bob 1 Cy 2"], "holds only impostor pairs (2)"),
        (["Ann 1 2", "Ann 1 {trained} 1"], "leaves 1 genuine and 0 impostor pairs"),
    ],
)
def test_a_one_sided_pairs_file_is_refused_in_one_line_before_any_inference(
    evaluated, tmp_path, monkeypatch, capsys, lines, words
):
    copy = tmp_path / "copy"
    shutil.copytree(evaluated, copy)
    monkeypatch.chdir(copy)
    shutil.rmtree(copy / "outputs" / "models")  # any inference would fail on the missing models
    trained = read_manifest("data/prepared").classes[0]
    root = _benchmark_folder(tmp_path / "bench", {"Ann": 2, "Bob": 3, "Cy": 2})
    (copy / "pairs.txt").write_text("\n".join(lines).format(trained=trained) + "\n")
    raw = tiny_raw(train__items=ITEMS)
    raw["evaluate"]["verification"].update(pairs_file="pairs.txt", pairs_root=str(root))
    write_params(copy, raw)
    assert run_stage(evaluate.main, []) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error in params.yaml: evaluate.verification.pairs_file: "), err
    assert words in err and "\n" not in err


def test_a_pairs_root_that_lacks_images_names_them(evaluated, tmp_path, monkeypatch, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(evaluated, copy)
    monkeypatch.chdir(copy)
    root = _benchmark_folder(tmp_path / "bench", {"Ann": 2, "Bob": 1})
    (copy / "pairs.txt").write_text("Ann 1 2\nAnn 1 Bob 4\n")
    raw = tiny_raw(train__items=ITEMS)
    raw["evaluate"]["verification"].update(pairs_file="pairs.txt", pairs_root=str(root))
    write_params(copy, raw)
    assert run_stage(evaluate.main, []) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error in params.yaml: evaluate.verification.pairs_root: 1 image(s)")
    assert "Bob_0004" in err
    raw["evaluate"]["verification"]["pairs_file"] = None
    with pytest.raises(ConfigError, match="pairs_root: only used with"):
        parse_params(raw)
