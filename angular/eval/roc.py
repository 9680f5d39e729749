"""ROC curves (scikit-learn's, after validation) and thresholds at a false accept rate.

Scores are "higher = more positive" everywhere (confidence, cosine similarity).
"""

from __future__ import annotations

import math

import numpy as np

from angular.eval.checks import as_bool_array, as_float_array, check_same_length, sklearn_metrics

__all__ = ["roc_curve", "roc_auc", "threshold_at_far"]


def _scores_and_positive(scores, positive, score_name="scores", positive_name="positive"):
    scores = as_float_array(scores, score_name, ndim=1)
    positive = as_bool_array(positive, positive_name)
    check_same_length(**{score_name: scores, positive_name: positive})
    n_positive = int(positive.sum())
    if n_positive == 0 or n_positive == len(positive):
        kind = "negative" if n_positive else "positive"
        raise ValueError(
            f"{positive_name} holds no {kind} sample; a ROC curve needs both positives and negatives"
        )
    return scores, positive


def roc_curve(scores, positive, *, drop_intermediate: bool = False):
    """ROC curve: ``(fpr, tpr, thresholds)`` with thresholds decreasing, starting at ``inf``
    (:func:`sklearn.metrics.roc_curve`, scores and labels validated first).

    Point ``i`` classifies ``score >= thresholds[i]`` as positive; tied scores form one point, and
    the first point is ``(0, 0)`` at threshold ``inf``. Every point is kept by default (the
    verification metrics read TAR and EER off all of them); ``drop_intermediate=True`` drops those
    on straight segments, scikit-learn's default.
    """
    scores, positive = _scores_and_positive(scores, positive)
    return sklearn_metrics().roc_curve(positive, scores, drop_intermediate=drop_intermediate)


def roc_auc(scores, positive) -> float:
    """Area under the ROC curve (trapezoids; ties count one half, as in scikit-learn)."""
    # The trapezoids over every point, not sklearn's roc_auc_score: that one first drops the points
    # on straight segments, the same area summed in another order, which changes the last bits.
    fpr, tpr, _ = roc_curve(scores, positive)
    return float(sklearn_metrics().auc(fpr, tpr))


def threshold_at_far(negative_scores, far: float) -> float:
    """The lowest threshold on ``score >= t`` that accepts at most a fraction ``far`` of the
    negative samples (impostor pairs, unknown people's images): just above the first negative
    that must be rejected (ties with it are rejected too). When ``far`` admits every negative:
    the lowest score (everything is accepted)."""
    negatives = np.sort(as_float_array(negative_scores, "negative_scores", ndim=1))[::-1]
    if len(negatives) == 0:
        raise ValueError("negative_scores is empty: no threshold at a FAR can be chosen")
    if not 0.0 < far <= 1.0:
        raise ValueError(f"far must lie in (0, 1], got {far}")
    allowed = int(math.floor(far * len(negatives) + 1e-9))  # negatives that may pass
    if allowed >= len(negatives):
        return float(negatives[-1])
    return float(np.nextafter(negatives[allowed], np.inf))
