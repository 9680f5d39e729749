"""Temperature scaling (docs/design.md, Pipeline: calibrate; Guo et al. 2017).

One scalar ``T > 0`` divides a head's logits before the softmax. It is fitted on the validation
split by minimising the negative log-likelihood of ``softmax(logits / T)`` over ``log T``; the
original repository's hand-set ``SCALING_FACTOR`` is the same ``T`` chosen by hand.
"""

from __future__ import annotations

import math

import numpy as np

from angular.eval.metrics import (
    PROB_FLOOR,
    as_float_array,
    brier_score,
    check_scores_labels,
    expected_calibration_error,
    log_softmax,
    softmax,
    top1_accuracy,
)
from angular.eval.metrics import nll as mean_nll

__all__ = [
    "fit_temperature",
    "fit_probability_temperature",
    "temper",
    "temperature_nll",
    "calibration_report",
    "LOG_T_BOUNDS",
]

# log T is searched in [log 1e-3, log 1e4]: wide enough for margin logits (s up to a few hundred)
# and bounded, so a perfectly separated validation set (where the NLL keeps falling as T -> 0)
# still gives a finite answer.
LOG_T_BOUNDS = (math.log(1e-3), math.log(1e4))
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def temperature_nll(logits, labels, temperature: float) -> float:
    """Mean NLL of ``softmax(logits / temperature)``, computed from log-probabilities (no clipping)."""
    logits, labels = check_scores_labels(logits, labels, "logits")
    return _nll(logits, labels, temperature)


def _nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    log_probs = log_softmax(logits, temperature)
    return float(-np.mean(log_probs[np.arange(len(labels)), labels]))


def fit_temperature(logits, labels, *, max_iter: int = 200, tol: float = 1e-7) -> float:
    """The temperature ``T > 0`` minimising the NLL of ``softmax(logits / T)``.

    The NLL is convex in ``1/T`` (a log-sum-exp of linear functions minus a linear one), so it is
    unimodal in ``log T``; a golden-section search over ``log T`` in :data:`LOG_T_BOUNDS` (in
    float64, at most ``max_iter`` steps, until the bracket is narrower than ``tol``) finds its
    minimum deterministically. The result never has a higher NLL than ``T = 1``: if the search
    ends worse than ``T = 1`` (only possible through rounding), 1.0 is returned.
    """
    logits, labels = check_scores_labels(logits, labels, "logits")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
    if logits.shape[1] == 1:
        return 1.0  # one class: every temperature gives probability 1 and NLL 0

    def objective(log_t: float) -> float:
        return _nll(logits, labels, math.exp(log_t))

    low, high = LOG_T_BOUNDS
    left = high - _GOLDEN * (high - low)
    right = low + _GOLDEN * (high - low)
    f_left, f_right = objective(left), objective(right)
    for _ in range(max_iter):
        if high - low < tol:
            break
        if f_left <= f_right:  # the minimum lies in [low, right]
            high, right, f_right = right, left, f_left
            left = high - _GOLDEN * (high - low)
            f_left = objective(left)
        else:  # the minimum lies in [left, high]
            low, left, f_left = left, right, f_right
            right = low + _GOLDEN * (high - low)
            f_right = objective(right)
    log_t, best = (left, f_left) if f_left <= f_right else (right, f_right)
    if best > objective(0.0):
        return 1.0
    return math.exp(log_t)


def _log_probs(probs) -> np.ndarray:
    return np.log(np.clip(as_float_array(probs, "probs", ndim=2), PROB_FLOOR, None))


def fit_probability_temperature(probs, labels, **options) -> float:
    """:func:`fit_temperature` for a model that gives probabilities rather than logits (an
    ensemble of calibrated heads): the temperature of its log-probabilities (see :func:`temper`).
    When every sample is classified correctly the NLL has no minimum (it falls as T -> 0): 1.0."""
    log_probs = _log_probs(probs)
    if np.all(log_probs.argmax(axis=1) == np.asarray(labels)):
        return 1.0
    return fit_temperature(log_probs, labels, **options)


def temper(probs, temperature: float) -> np.ndarray:
    """``softmax(log(probs) / temperature)``: the same arg-max, sharper (T < 1) or softer."""
    return softmax(_log_probs(probs), temperature)


def calibration_report(logits, labels, temperature: float, n_bins: int = 15) -> dict[str, float]:
    """NLL, ECE (``n_bins`` equal-width bins), Brier score and top-1 accuracy of
    ``softmax(logits / temperature)``."""
    logits, labels = check_scores_labels(logits, labels, "logits")
    probs = softmax(logits, temperature)
    return {
        "nll": mean_nll(probs, labels),
        "ece": expected_calibration_error(probs, labels, n_bins),
        "brier": brier_score(probs, labels),
        "accuracy": top1_accuracy(probs, labels),
    }
