"""Open-set recognition: known identities must be classified, unknown identities rejected.

The metrics take per-sample ``confidence`` (the largest class probability), ``predicted`` and
``labels`` (-1 for unknown samples) and ``known``; the evaluation protocol's second operating point
(:func:`open_set_at_unknown_far`) chooses its threshold on one half of the unknown people and
measures it on the other (:func:`unknown_halves`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from angular.eval.checks import (
    as_bool_array,
    as_float_array,
    as_int_array,
    check_same_length,
    sklearn_metrics,
)
from angular.eval.roc import roc_auc, roc_curve, threshold_at_far

__all__ = [
    "open_set_accuracy",
    "open_set_rates",
    "threshold_at_known_rate",
    "open_set_auroc",
    "oscr_curve",
    "oscr",
    "unknown_halves",
    "open_set_at_unknown_far",
]


def open_set_accuracy(confidence, predicted, labels, known, threshold: float) -> float:
    """The original repository's open-set accuracy.

    A sample is right when it is known and predicted correctly with ``confidence >= threshold``,
    or unknown and ``confidence < threshold``. Labels of unknown samples are ignored (use -1).
    """
    confidence = as_float_array(confidence, "confidence", ndim=1)
    predicted = as_int_array(predicted, "predicted")
    labels = as_int_array(labels, "labels")
    known = as_bool_array(known, "known")
    check_same_length(confidence=confidence, predicted=predicted, labels=labels, known=known)
    if not math.isfinite(float(threshold)):
        raise ValueError(f"threshold must be finite, got {threshold}")
    accepted = confidence >= threshold
    right = np.where(known, accepted & (predicted == labels), ~accepted)
    return float(np.mean(right))


def open_set_rates(confidence, predicted, labels, known, threshold: float) -> dict[str, float]:
    """The two sides of :func:`open_set_accuracy` at ``threshold``, which one accuracy hides when
    unknown images outnumber known ones (or the reverse):

    - ``known_acceptance``: the share of known samples accepted (``confidence >= threshold``);
    - ``unknown_rejection``: the share of unknown samples rejected;
    - ``open_set_balanced_accuracy``: the mean of the known samples' accuracy (accepted and
      classified correctly) and ``unknown_rejection``.
    """
    confidence = as_float_array(confidence, "confidence", ndim=1)
    predicted = as_int_array(predicted, "predicted")
    labels = as_int_array(labels, "labels")
    known = as_bool_array(known, "known")
    check_same_length(confidence=confidence, predicted=predicted, labels=labels, known=known)
    if not known.any() or known.all():
        raise ValueError("known must hold both known (True) and unknown (False) samples")
    accepted = confidence >= threshold
    known_right = float(np.mean(accepted[known] & (predicted[known] == labels[known])))
    unknown_rejection = float(np.mean(~accepted[~known]))
    return {
        "known_acceptance": float(np.mean(accepted[known])),
        "unknown_rejection": unknown_rejection,
        "open_set_balanced_accuracy": (known_right + unknown_rejection) / 2,
    }


def threshold_at_known_rate(confidence_known, rate: float = 0.95) -> float:
    """The largest threshold ``t`` with at least ``rate`` of the known samples at ``confidence >= t``.

    Chosen on the validation split (known identities only) to fix the open-set threshold.
    """
    confidence = np.sort(as_float_array(confidence_known, "confidence_known", ndim=1))
    if len(confidence) == 0:
        raise ValueError("confidence_known is empty; at least one sample is needed")
    if not (0.0 < rate <= 1.0):
        raise ValueError(f"rate must lie in (0, 1], got {rate}")
    # The guard absorbs rounding such as 0.95 * 100 = 95.00000000000001.
    needed = math.ceil(rate * len(confidence) - 1e-9)
    return float(confidence[len(confidence) - needed])


def open_set_auroc(confidence, known) -> float:
    """AUROC of known (positive) against unknown samples, scored by confidence."""
    confidence = as_float_array(confidence, "confidence", ndim=1)
    known = as_bool_array(known, "known")
    check_same_length(confidence=confidence, known=known)
    if known.all() or not known.any():
        raise ValueError("known must hold both known and unknown samples to measure open-set AUROC")
    return roc_auc(confidence, known)


def oscr_curve(confidence, predicted, labels, known):
    """The OSCR curve ``(fpr, ccr)``: for each threshold, the fraction of unknowns accepted
    (``confidence >= t``) and the fraction of knowns that are accepted and classified correctly."""
    confidence = as_float_array(confidence, "confidence", ndim=1)
    predicted = as_int_array(predicted, "predicted")
    labels = as_int_array(labels, "labels")
    known = as_bool_array(known, "known")
    check_same_length(confidence=confidence, predicted=predicted, labels=labels, known=known)
    if known.all() or not known.any():
        raise ValueError("known must hold both known and unknown samples to compute OSCR")
    correct = known & (predicted == labels)
    n_known, n_correct = int(known.sum()), int(correct.sum())
    if n_correct == 0:
        # No known sample is ever correctly classified: CCR is 0 at every threshold.
        return np.array([0.0, 1.0]), np.zeros(2)
    # Known but misclassified samples change neither CCR nor FPR at any threshold, only the
    # denominator of CCR: OSCR is the ROC of correct knowns vs unknowns, with TPR scaled.
    relevant = correct | ~known
    fpr, tpr, _ = roc_curve(confidence[relevant], correct[relevant])
    return fpr, tpr * (n_correct / n_known)


def oscr(confidence, predicted, labels, known) -> float:
    """Open-Set Classification Rate (Dhamija et al. 2018): area under CCR against FPR over all
    thresholds. At most the closed-set accuracy; equal to it when every correct known sample is
    more confident than every unknown."""
    fpr, ccr = oscr_curve(confidence, predicted, labels, known)
    return float(sklearn_metrics().auc(fpr, ccr))


def unknown_halves(identities: Sequence[str], seed: int) -> np.ndarray | None:
    """A seeded split of the unknown people into two halves (bool per image: in the first half),
    or None with fewer than 2 unknown people. The threshold at ``evaluate.unknown_far`` is chosen on
    one half and measured on the other, so that no image decides its own threshold."""
    people = sorted(set(identities))
    if len(people) < 2:
        return None
    order = np.random.default_rng(seed).permutation(len(people))
    first = {people[i] for i in order[: len(people) // 2]}
    return np.array([name in first for name in identities], bool)


def open_set_at_unknown_far(confidence, predicted, labels, halves, far: float) -> dict[str, float]:
    """Open-set metrics at the threshold that accepts ``far`` of the unknown images: for each half
    of the unknown people (``halves``: :func:`unknown_halves`), the threshold chosen on the other
    half, applied to the known test images and this half; the mean over the two halves."""
    known = labels >= 0
    in_first = np.zeros(len(labels), bool)
    in_first[~known] = halves
    found = []
    for half in (in_first, ~known & ~in_first):
        threshold = threshold_at_far(confidence[~known & ~half], far)
        keep = known | half
        args = (confidence[keep], predicted[keep], labels[keep], known[keep])
        found.append(
            {
                "threshold": threshold,
                "open_set_accuracy": open_set_accuracy(*args, threshold),
                **open_set_rates(*args, threshold),
            }
        )
    return {f"{key}@unknown_far": float(np.mean([f[key] for f in found])) for key in found[0]}
