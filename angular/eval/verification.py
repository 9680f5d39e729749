"""Face verification (the LFW protocol): pairs of images, same identity or not, scored by the
cosine similarity of their embeddings; 10-fold accuracy, ROC AUC, EER and TAR at a FAR.

Similarities are "higher = more likely the same identity"; pairs come from
:mod:`angular.eval.pairs`.
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
from angular.eval.roc import roc_curve, threshold_at_far

__all__ = [
    "DEFAULT_FARS",
    "unit_rows",
    "cosine_similarity_pairs",
    "balanced_accuracy",
    "best_threshold",
    "far_key",
    "verification_metrics",
    "thresholds_at_far",
]

DEFAULT_FARS = (1e-1, 1e-2, 1e-3)


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Each row divided by its Euclidean norm, floored at 1e-12 (as ``F.normalize``); the dtype
    stays that of ``x``."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def cosine_similarity_pairs(embeddings, index_a, index_b) -> np.ndarray:
    """Cosine similarity of ``embeddings[index_a[p]]`` and ``embeddings[index_b[p]]`` for each pair
    (rows are normalised with their norm floored at 1e-12, like ``F.normalize``)."""
    embeddings = as_float_array(embeddings, "embeddings", ndim=2)
    index_a = as_int_array(index_a, "index_a")
    index_b = as_int_array(index_b, "index_b")
    check_same_length(index_a=index_a, index_b=index_b)
    n = len(embeddings)
    for name, index in (("index_a", index_a), ("index_b", index_b)):
        if index.min() < 0 or index.max() >= n:
            raise ValueError(f"{name} must lie in [0, {n}) (rows of embeddings)")
    unit = unit_rows(embeddings)
    return np.einsum("pd,pd->p", unit[index_a], unit[index_b])


def _balanced(genuine_right, n_genuine: int, impostor_right, n_impostor: int):
    """The mean of the genuine and the impostor accuracy (of the kinds present)."""
    rates = [
        right / n for right, n in ((genuine_right, n_genuine), (impostor_right, n_impostor)) if n
    ]
    return sum(rates) / len(rates)


def balanced_accuracy(accepted, same) -> float:
    """The mean of the genuine pairs' accuracy (accepted) and the impostor pairs' (rejected), as
    LFW's accuracy is on its balanced folds: a rule that says "different" to every pair scores
    0.5, however many impostor pairs there are."""
    accepted, same = as_bool_array(accepted, "accepted"), as_bool_array(same, "same")
    if check_same_length(accepted=accepted, same=same) == 0:
        raise ValueError("accepted and same are empty")
    right = accepted == same
    return float(_balanced(right[same].sum(), same.sum(), right[~same].sum(), (~same).sum()))


def best_threshold(similarity, same) -> tuple[float, float]:
    """``(threshold, accuracy)``: the threshold maximising the :func:`balanced_accuracy` of
    ``similarity >= t`` meaning "same", and that accuracy. Thresholds are midpoints between
    consecutive distinct similarities (or +-inf); the lowest best threshold wins a tie."""
    similarity = as_float_array(similarity, "similarity", ndim=1)
    same = as_bool_array(same, "same")
    check_same_length(similarity=similarity, same=same)
    values, inverse = np.unique(similarity, return_inverse=True)
    genuine_at = np.bincount(inverse.ravel(), weights=same, minlength=len(values))
    impostor_at = np.bincount(inverse.ravel(), weights=~same, minlength=len(values))
    # Candidate c (0..len(values)) accepts values[c:]: correct are genuines at or above it and
    # impostors below it.
    genuine_accepted = np.r_[np.cumsum(genuine_at[::-1])[::-1], 0.0]
    impostor_rejected = np.r_[0.0, np.cumsum(impostor_at)]
    accuracy = _balanced(genuine_accepted, int(same.sum()), impostor_rejected, int((~same).sum()))
    best = int(np.argmax(accuracy))
    if best == 0:
        threshold = -math.inf
    elif best == len(values):
        threshold = math.inf
    else:
        threshold = float((values[best - 1] + values[best]) / 2)
    return threshold, float(accuracy[best])


def far_key(far: float) -> str:
    """The metric name fragment of a false accept rate: ``1e-3`` -> ``"far=1e-3"``."""
    mantissa, exponent = f"{far:.0e}".split("e")
    return f"far={mantissa}e{int(exponent)}"


def _equal_error_rate(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Where FPR = FNR on the ROC curve, linearly interpolated between the points around it."""
    gap = fpr - (1.0 - tpr)  # non-decreasing along the curve, from -1 to +1
    i = int(np.argmax(gap >= 0))
    if gap[i] == 0 or i == 0:
        return float(fpr[i])
    weight = -gap[i - 1] / (gap[i] - gap[i - 1])
    return float(fpr[i - 1] + weight * (fpr[i] - fpr[i - 1]))


def _tar_at_far(fpr: np.ndarray, tpr: np.ndarray, far: float) -> float:
    """The highest TPR among thresholds whose FPR does not exceed ``far``."""
    return float(tpr[fpr <= far + 1e-12].max())


def verification_metrics(
    similarity,
    same,
    *,
    folds: int = 10,
    seed: int = 0,
    fars: Sequence[float] = DEFAULT_FARS,
    fold_of=None,
) -> dict[str, float]:
    """Verification metrics of pair similarities (higher = more likely the same identity).

    - ``accuracy``, ``accuracy_std``: the LFW protocol: pairs split into ``folds`` folds (stratified
      by genuine/impostor, shuffled with ``seed``; or ``fold_of``, e.g. a pairs file's own folds);
      for each fold the threshold that maximises accuracy on the other folds
      (:func:`best_threshold`) is applied to it; mean and population standard deviation of the
      fold accuracies. Accuracies are balanced (:func:`balanced_accuracy`): with 1 genuine pair
      per 37 impostor pairs, "always different" scores 0.5, not 0.974.
    - ``threshold``: the best-accuracy threshold over all pairs (to use at deployment).
    - ``auc``: ROC AUC; ``eer``: equal error rate (FPR = FNR, interpolated).
    - ``tar@far=F``: the highest true accept rate at a false accept rate <= F, and
      ``resolvable@far=F``: 1.0 when there are at least 1/F impostor pairs, else 0.0 and the TAR is
      NaN (a FAR below one impostor cannot be measured).
    - ``n_genuine``, ``n_impostor``: pair counts.
    """
    similarity = as_float_array(similarity, "similarity", ndim=1)
    same = as_bool_array(same, "same")
    n = check_same_length(similarity=similarity, same=same)
    if fold_of is not None:
        pass  # the caller's folds
    elif isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or not 2 <= folds <= n:
        raise ValueError(
            f"folds must be an integer in [2, {n}] (the number of pairs), got {folds!r}"
        )
    for far in fars:
        if not 0.0 < far < 1.0:
            raise ValueError(f"fars must lie in (0, 1), got {far}")
    fpr, tpr, _ = roc_curve(similarity, same)  # also checks both kinds of pair are present
    n_genuine, n_impostor = int(same.sum()), int((~same).sum())

    if fold_of is None:
        rng = np.random.default_rng(seed)
        fold_of = np.empty(n, dtype=np.int64)
        for members in (np.flatnonzero(same), np.flatnonzero(~same)):
            shuffled = rng.permutation(members)
            # Deal each kind round-robin so every fold gets its share of genuines and impostors.
            fold_of[shuffled] = np.arange(len(shuffled)) % folds
    else:
        fold_of = as_int_array(fold_of, "fold_of")
        check_same_length(similarity=similarity, fold_of=fold_of)
        if len(np.unique(fold_of)) < 2:
            raise ValueError("fold_of must name at least 2 folds")
    fold_accuracy = []
    for fold in np.unique(fold_of):
        test = fold_of == fold
        if not test.any():
            continue
        threshold, _ = best_threshold(similarity[~test], same[~test])
        fold_accuracy.append(balanced_accuracy(similarity[test] >= threshold, same[test]))

    result = {
        "accuracy": float(np.mean(fold_accuracy)),
        "accuracy_std": float(np.std(fold_accuracy)),
        "threshold": best_threshold(similarity, same)[0],
        "auc": float(sklearn_metrics().auc(fpr, tpr)),
        "eer": _equal_error_rate(fpr, tpr),
    }
    for far in fars:
        resolvable = n_impostor * far >= 1.0 - 1e-9
        result[f"tar@{far_key(far)}"] = _tar_at_far(fpr, tpr, far) if resolvable else math.nan
        result[f"resolvable@{far_key(far)}"] = 1.0 if resolvable else 0.0
    result["n_genuine"] = float(n_genuine)
    result["n_impostor"] = float(n_impostor)
    return result


def thresholds_at_far(similarity, same, fars: Sequence[float]) -> dict[str, float]:
    """``threshold@far=F``: the lowest similarity threshold that accepts at most a fraction F of
    the impostor pairs (the default threshold of ``angular identify``, angular.serve.gallery)."""
    similarity = as_float_array(similarity, "similarity", ndim=1)
    same = as_bool_array(same, "same")
    check_same_length(similarity=similarity, same=same)
    if same.all():
        raise ValueError("same has no impostor pair (False): no threshold at a FAR can be chosen")
    return {f"threshold@{far_key(far)}": threshold_at_far(similarity[~same], far) for far in fars}
