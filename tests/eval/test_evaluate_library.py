"""angular.eval as a library: the pieces the evaluate and calibrate stages call, on hand-made
inputs (the stages themselves run in tests/pipeline)."""

from __future__ import annotations

import math
import types

import numpy as np
import pytest

from angular.eval import metrics
from angular.eval.calibration import calibrate_logits, fit_temperature
from angular.eval.evaluate import json_ready
from angular.eval.open_set import open_set_at_unknown_far, unknown_halves
from angular.eval.pairs import PAIRS_FILE_KEY, PAIRS_ROOT_KEY, PairsError, pairs_of_file
from angular.eval.report import flat_metrics
from angular.eval.verification import unit_rows


def test_unit_rows_is_the_normalisation_of_cosine_similarity():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 5)).astype(np.float32)
    x[2] = 0.0  # a zero row stays zero (the norm is floored, not divided by)
    unit = unit_rows(x)
    assert unit.dtype == np.float32
    np.testing.assert_array_equal(unit[2], 0.0)
    np.testing.assert_allclose(np.linalg.norm(unit[[0, 1, 3, 4, 5]], axis=1), 1.0, rtol=1e-6)
    a, b = np.array([0, 1, 3]), np.array([4, 5, 0])
    expected = np.einsum("pd,pd->p", unit_rows(x.astype(np.float64))[a], unit_rows(x)[b])
    np.testing.assert_allclose(metrics.cosine_similarity_pairs(x, a, b), expected, rtol=1e-6)


def test_calibrate_logits_fits_keeps_or_fixes_the_temperature():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, size=200)
    logits = rng.normal(0.0, 3.0, size=(200, 4))
    options = dict(temperature=2.5, n_bins=15, max_iter=200)
    found = calibrate_logits(logits, labels, method="fit", **options)
    assert list(found) == ["temperature", "fitted", "before", "after"]
    assert found["fitted"] and found["temperature"] == fit_temperature(logits, labels)
    assert found["after"]["nll"] <= found["before"]["nll"]
    fixed = calibrate_logits(logits, labels, method="fixed", **options)
    assert fixed["temperature"] == 2.5 and fixed["fitted"] is False
    logits[np.arange(200), labels] = logits.max(axis=1) + 1.0  # every sample right: no minimum
    kept = calibrate_logits(logits, labels, method="fit", **options)
    assert kept["temperature"] == 1.0 and kept["fitted"] is False
    assert kept["before"] == kept["after"]


def test_unknown_halves_split_the_people_not_the_images():
    identities = ["a", "b", "a", "c", "d", "c", "b"]
    halves = unknown_halves(identities, seed=3)
    for person in set(identities):
        assert len({bool(h) for h, i in zip(halves, identities) if i == person}) == 1
    assert 0 < halves.sum() < len(identities)
    assert unknown_halves(["a", "a"], seed=3) is None


def test_open_set_at_unknown_far_is_the_mean_of_the_two_halves():
    confidence = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
    predicted = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    labels = np.array([0, 1, 1, -1, -1, -1, -1, -1])
    halves = np.array([True, False, True, False, True])  # of the 5 unknown images
    found = open_set_at_unknown_far(confidence, predicted, labels, halves, far=0.5)
    assert list(found) == [
        "threshold@unknown_far",
        "open_set_accuracy@unknown_far",
        "known_acceptance@unknown_far",
        "unknown_rejection@unknown_far",
        "open_set_balanced_accuracy@unknown_far",
    ]
    known = labels >= 0
    first = np.zeros(8, bool)
    first[~known] = halves
    expected = []
    for half in (first, ~known & ~first):
        threshold = metrics.threshold_at_far(confidence[~known & ~half], 0.5)
        keep = known | half
        expected.append(
            metrics.open_set_accuracy(
                confidence[keep], predicted[keep], labels[keep], known[keep], threshold
            )
        )
    assert found["open_set_accuracy@unknown_far"] == pytest.approx(np.mean(expected))


def test_json_ready_and_flat_metrics():
    results = json_ready(
        {
            "heads": {"a": {"x": np.float32(0.5), "n": np.int64(3), "tar": math.nan}},
            "ensembles": {"vote": {"x": 1.0}},
            "verification": {"test": {"a": {"auc": np.float64(0.25), "tar": float("nan")}}},
        }
    )
    assert results["heads"]["a"] == {"x": 0.5, "n": 3, "tar": None}
    assert type(results["heads"]["a"]["n"]) is int
    assert flat_metrics(results) == {
        "heads/a/x": 0.5,
        "heads/a/n": 3,
        "ensembles/vote/x": 1.0,
        "verification/test/a/auc": 0.25,
    }


def _manifest(names):
    return types.SimpleNamespace(
        classes=["0", "1"],
        paths=lambda split: [f"{n}/{i}.png" for n, i in names[split]],
        identities=lambda split: [n for n, _ in names[split]],
    )


def test_pairs_of_file_finds_the_pairs_among_test_and_unknown_images(tmp_path):
    manifest = _manifest({"test": [("0", 1), ("0", 2)], "unknown": [("x", 1), ("x", 3)]})
    (tmp_path / "pairs.txt").write_text("0 1 2\nx 1 3\n0 1 x 3\n")
    verification = types.SimpleNamespace(pairs_file=tmp_path / "pairs.txt", pairs_root=None)
    pairs, external = pairs_of_file(verification, manifest)
    assert external is None
    index_a, index_b, same, fold_of = pairs
    assert index_a.tolist() == [0, 2, 0] and index_b.tolist() == [1, 3, 3]
    assert same.tolist() == [True, True, False] and fold_of is None
    nothing = types.SimpleNamespace(pairs_file=None, pairs_root=None)
    assert pairs_of_file(nothing, manifest) == (None, None)


def test_pairs_of_file_names_the_parameter_at_fault(tmp_path):
    manifest = _manifest({"test": [("0", 1)], "unknown": [("x", 1)]})
    (tmp_path / "pairs.txt").write_text("y 1 2\ny 1 z 2\n")
    verification = types.SimpleNamespace(pairs_file=tmp_path / "pairs.txt", pairs_root=None)
    with pytest.raises(PairsError) as caught:
        pairs_of_file(verification, manifest)
    assert caught.value.key == PAIRS_FILE_KEY
    assert str(caught.value) == f"{PAIRS_FILE_KEY}: {caught.value.problem}"
    assert "'y_0001' is not among names" in caught.value.problem
    verification.pairs_root = tmp_path / "nowhere"
    with pytest.raises(PairsError) as caught:
        pairs_of_file(verification, manifest)
    assert caught.value.key == PAIRS_ROOT_KEY
    assert caught.value.problem == f"{tmp_path / 'nowhere'} is not a folder"
