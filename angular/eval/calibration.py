"""Calibration: how far confidence is from accuracy, and temperature scaling (docs/design.md,
Pipeline: calibrate; Guo et al. 2017).

The metrics (NLL with its 1e-12 floor, Brier score, ECE and its reliability bins) take ``probs``
(N, K) and ``labels`` (N,) as :mod:`angular.eval.classification` describes them. Temperature
scaling: one scalar ``T > 0`` divides a head's logits before the softmax. It is fitted on the
validation split by minimising the negative log-likelihood of ``softmax(logits / T)`` over
``log T``; the original repository's hand-set ``SCALING_FACTOR`` is the same ``T`` chosen by hand.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from angular.eval.checks import (
    as_bool_array,
    as_float_array,
    check_n_bins,
    check_probs_labels,
    check_same_length,
    check_scores_labels,
    sklearn_metrics,
)
from angular.eval.classification import PROB_FLOOR, log_softmax, softmax, top1_accuracy

__all__ = [
    "nll",
    "brier_score",
    "reliability_bins",
    "confidence_calibration_error",
    "expected_calibration_error",
    "fit_temperature",
    "fit_probability_temperature",
    "temper",
    "temperature_nll",
    "calibration_report",
    "calibrate_logits",
    "LOG_T_BOUNDS",
]

# log T is searched in [log 1e-3, log 1e4]: wide enough for margin logits (s up to a few hundred)
# and bounded, so a perfectly separated validation set (where the NLL keeps falling as T -> 0)
# still gives a finite answer.
LOG_T_BOUNDS = (math.log(1e-3), math.log(1e4))
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def nll(probs, labels) -> float:
    """Mean negative log-likelihood of the labels, probabilities clipped at 1e-12."""
    # Not sklearn's log_loss: it clips to [eps, 1 - eps] with the dtype's eps (so p = 1 costs
    # 2e-16 and p = 0 costs 36, not 28) and renormalises rows that do not sum to 1.
    probs, labels = check_probs_labels(probs, labels)
    picked = probs[np.arange(len(labels)), labels]
    return float(-np.mean(np.log(np.clip(picked, PROB_FLOOR, None))))


def brier_score(probs, labels) -> float:
    """Mean over samples of ``sum_k (p_k - onehot_k)^2`` (0 is perfect, 2 is the worst).

    Values that rounding left just above 1 (``probs`` may exceed 1 by 1e-6) count as 1."""
    probs, labels = check_probs_labels(probs, labels)
    # sklearn's multi-class Brier score, without the halving its "auto" applies to 2 classes. It
    # reads a single column as a binary positive-class probability (so it gets the empty second
    # class), and refuses values above 1.
    if probs.shape[1] == 1:
        probs = np.c_[probs, np.zeros(len(probs))]
    probs = np.minimum(probs, 1.0)
    with warnings.catch_warnings():
        # Rows need not sum to 1: the score is defined for any values in [0, 1].
        warnings.filterwarnings("ignore", "The y_prob values do not sum to one", UserWarning)
        score = sklearn_metrics().brier_score_loss(
            labels, probs, labels=np.arange(probs.shape[1]), scale_by_half=False
        )
    return float(score)


def reliability_bins(confidence, correct, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Equal-width confidence bins over [0, 1]: bin ``b`` holds ``lower_b < confidence <= upper_b``
    (the first bin also holds 0).

    Returns arrays of length ``n_bins``: ``bin_lower``, ``bin_upper``, ``confidence`` (mean
    confidence in the bin), ``accuracy`` (fraction correct in the bin), ``count`` (samples in the
    bin). Empty bins have NaN confidence and accuracy and count 0.
    """
    n_bins = check_n_bins(n_bins)
    confidence = as_float_array(confidence, "confidence", ndim=1)
    correct = as_bool_array(correct, "correct")
    check_same_length(confidence=confidence, correct=correct)
    if confidence.min() < 0.0 or confidence.max() > 1.0 + 1e-6:  # float32 rounding allowed
        raise ValueError("confidence must lie in [0, 1]")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Number of inner edges strictly below the confidence: (lower, upper] bins, 0 in the first.
    index = np.searchsorted(edges[1:-1], confidence, side="left")
    count = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(index, weights=confidence, minlength=n_bins) / count
        accuracy = np.bincount(index, weights=correct.astype(np.float64), minlength=n_bins) / count
    return {
        "bin_lower": edges[:-1],
        "bin_upper": edges[1:],
        "confidence": mean_confidence,
        "accuracy": accuracy,
        "count": count,
    }


def confidence_calibration_error(confidence, correct, n_bins: int = 15) -> float:
    """ECE from per-sample confidence and correctness: ``sum_b (n_b / N) |acc_b - conf_b|``."""
    bins = reliability_bins(confidence, correct, n_bins)
    filled = bins["count"] > 0
    weights = bins["count"][filled] / bins["count"].sum()
    gaps = np.abs(bins["accuracy"][filled] - bins["confidence"][filled])
    return float(np.sum(weights * gaps))


def expected_calibration_error(probs, labels, n_bins: int = 15) -> float:
    """Expected calibration error (Guo et al. 2017) of the arg-max prediction, equal-width bins."""
    probs, labels = check_probs_labels(probs, labels)
    return confidence_calibration_error(probs.max(axis=1), probs.argmax(axis=1) == labels, n_bins)


def temperature_nll(logits, labels, temperature: float) -> float:
    """Mean NLL of ``softmax(logits / temperature)``, computed from log-probabilities (no clipping)."""
    logits, labels = check_scores_labels(logits, labels, "logits")
    return _logits_nll(logits, labels, temperature)


def _logits_nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
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
        return _logits_nll(logits, labels, math.exp(log_t))

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
        "nll": nll(probs, labels),
        "ece": expected_calibration_error(probs, labels, n_bins),
        "brier": brier_score(probs, labels),
        "accuracy": top1_accuracy(probs, labels),
    }


def calibrate_logits(
    logits, labels, *, method: str, temperature: float, n_bins: int, max_iter: int
) -> dict:
    """One head's temperature on its validation logits, with :func:`calibration_report` before
    (T = 1) and after: ``{"temperature", "fitted", "before", "after"}``. ``method``: ``"fit"``
    (:func:`fit_temperature`) or ``"fixed"`` (``temperature``, the original's hand-set one).

    When every sample is classified correctly, "fit" keeps T = 1 (and ``fitted`` is False): the NLL
    keeps falling as T -> 0, and the "fit" would only saturate every probability to 0 or 1 (and
    erase the confidence ranking that open-set recognition needs)."""
    before = calibration_report(logits, labels, 1.0, n_bins)
    fitted = method == "fit" and before["accuracy"] < 1.0
    if fitted:
        chosen = fit_temperature(logits, labels, max_iter=max_iter)
    elif method == "fit":
        chosen = 1.0
    else:
        chosen = temperature
    after = calibration_report(logits, labels, chosen, n_bins)
    return {"temperature": chosen, "fitted": fitted, "before": before, "after": after}
