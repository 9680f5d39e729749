"""angular.eval.calibration: temperature scaling recovers a known temperature and never hurts NLL."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from angular.eval import calibration, metrics


def _sample_labels(logits: np.ndarray, temperature: float, rng) -> np.ndarray:
    """Labels drawn from softmax(logits / temperature): a model whose true temperature is known."""
    probs = metrics.softmax(logits, temperature)
    return (probs.cumsum(axis=1) > rng.random((len(probs), 1))).argmax(axis=1)


@pytest.mark.parametrize("true_temperature", [0.4, 2.5, 30.0])
def test_fit_temperature_recovers_a_known_temperature(true_temperature):
    rng = np.random.default_rng()
    # Margin-head-like logits (s * cos with s = 64) for the large temperature.
    scale = 64.0 if true_temperature > 10 else 3.0
    logits = rng.uniform(-1, 1, size=(20_000, 10)) * scale
    labels = _sample_labels(logits, true_temperature, rng)
    fitted = calibration.fit_temperature(logits, labels)
    assert fitted == pytest.approx(true_temperature, rel=0.1)


def test_fitted_temperature_minimises_nll_and_never_increases_it():
    rng = np.random.default_rng()
    for _ in range(5):
        n, k = int(rng.integers(20, 400)), int(rng.integers(2, 12))
        logits = rng.normal(size=(n, k)) * rng.uniform(0.5, 20)
        labels = rng.integers(0, k, size=n)  # labels unrelated to logits: badly calibrated
        fitted = calibration.fit_temperature(logits, labels)
        at_fit = calibration.temperature_nll(logits, labels, fitted)
        assert at_fit <= calibration.temperature_nll(logits, labels, 1.0) + 1e-12
        # A dense grid over log T (an independent search) finds nothing better.
        grid = np.exp(np.linspace(*calibration.LOG_T_BOUNDS, 400))
        assert at_fit <= min(calibration.temperature_nll(logits, labels, t) for t in grid) + 1e-9


def test_temperature_nll_matches_direct_formula():
    rng = np.random.default_rng()
    logits, labels = rng.normal(size=(30, 4)) * 5, rng.integers(0, 4, size=30)
    direct = -np.mean(
        [
            row[y] / 2.0 - math.log(sum(math.exp(v / 2.0) for v in row))
            for row, y in zip(logits, labels)
        ]
    )
    assert calibration.temperature_nll(logits, labels, 2.0) == pytest.approx(direct, rel=1e-12)


def test_fit_is_deterministic_and_accepts_torch_tensors():
    rng = np.random.default_rng()
    logits = rng.normal(size=(500, 5)) * 4
    labels = _sample_labels(logits, 1.7, rng)
    first = calibration.fit_temperature(logits, labels)
    assert first == calibration.fit_temperature(logits, labels)
    from_torch = calibration.fit_temperature(torch.tensor(logits), torch.tensor(labels))
    assert from_torch == first


def test_separable_logits_give_a_small_finite_temperature():
    # Every arg-max is right: the NLL keeps falling as T -> 0, so the search stops at its bound.
    rng = np.random.default_rng()
    labels = rng.integers(0, 3, size=50)
    logits = rng.normal(size=(50, 3))
    logits[np.arange(50), labels] += 10
    fitted = calibration.fit_temperature(logits, labels)
    assert math.isfinite(fitted) and 0 < fitted < 1.0
    assert math.isclose(fitted, math.exp(calibration.LOG_T_BOUNDS[0]), rel_tol=1e-3)


def test_calibration_report():
    rng = np.random.default_rng()
    logits = rng.normal(size=(400, 6)) * 8
    labels = _sample_labels(logits, 3.0, rng)
    before = calibration.calibration_report(logits, labels, 1.0)
    after = calibration.calibration_report(
        logits, labels, calibration.fit_temperature(logits, labels)
    )
    assert set(before) == {"nll", "ece", "brier", "accuracy"}
    # Temperature changes confidence, never the arg-max.
    assert before["accuracy"] == after["accuracy"] == np.mean(logits.argmax(axis=1) == labels)
    assert after["nll"] < before["nll"]
    assert after["ece"] < before["ece"]  # T = 1 is far too confident here
    probs = metrics.softmax(logits, 3.0)
    report = calibration.calibration_report(logits, labels, 3.0, n_bins=10)
    assert report["nll"] == pytest.approx(-np.mean(np.log(probs[np.arange(400), labels])))
    assert report["brier"] == pytest.approx(
        np.mean(np.sum((probs - np.eye(6)[labels]) ** 2, axis=1))
    )


@pytest.mark.parametrize(
    ("logits", "labels", "argument"),
    [
        (np.ones((3, 2)), [0, 1], "labels"),
        (np.ones((2, 2)), [0, 2], "labels"),
        (np.ones(4), [0, 1, 0, 1], "logits"),
        (np.array([[0.0, np.nan], [1.0, 0.0]]), [0, 1], "logits"),
    ],
)
def test_bad_input_names_the_argument(logits, labels, argument):
    with pytest.raises(ValueError, match=argument):
        calibration.fit_temperature(logits, labels)
    with pytest.raises(ValueError, match=argument):
        calibration.calibration_report(logits, labels, 1.0)


def test_bad_temperature_and_max_iter():
    with pytest.raises(ValueError, match="temperature"):
        calibration.calibration_report(np.ones((2, 2)), [0, 1], 0.0)
    with pytest.raises(ValueError, match="max_iter"):
        calibration.fit_temperature(np.ones((2, 2)), [0, 1], max_iter=0)
