"""Closed-set classification: probabilities from logits, and top-1 accuracy.

``probs`` is (N, K) with rows on the probability simplex; ``labels`` is (N,) integers in [0, K).
"confidence" is the largest class probability of a row; a sample is "correct" when the arg-max
class equals its label.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import special

from angular.eval.checks import as_float_array, as_int_array, check_same_length

__all__ = ["PROB_FLOOR", "log_softmax", "softmax", "top1_accuracy"]

PROB_FLOOR = (
    1e-12  # probabilities are clipped here before a log, so one confident mistake is finite
)


def log_softmax(logits, temperature: float = 1.0) -> np.ndarray:
    """``log softmax(logits / temperature)`` over the last axis, in float64, numerically stable."""
    logits = as_float_array(logits, "logits", ndim=2)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.number)):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    return special.log_softmax(logits / float(temperature), axis=1)


def softmax(logits, temperature: float = 1.0) -> np.ndarray:
    """``softmax(logits / temperature)``: (N, K) float64 rows summing to 1."""
    # exp of the log-softmax rather than scipy.special.softmax (exp / sum): the two differ in the
    # last bits, and these probabilities have always been exp(log-softmax); the pipeline's metric
    # files stay byte-identical.
    return np.exp(log_softmax(logits, temperature))


def top1_accuracy(probs, labels) -> float:
    """Fraction of rows whose arg-max class equals the label (works on logits as well)."""
    probs = as_float_array(probs, "probs", ndim=2)
    labels = as_int_array(labels, "labels")
    check_same_length(probs=probs, labels=labels)
    return float(np.mean(probs.argmax(axis=1) == labels))
