"""insightface's verification protocol for its ``.bin`` sets (``lfw.bin``, ``cfp_fp.bin``,
``agedb_30.bin``, ``calfw.bin``, ``cplfw.bin``), computed as arcface_torch's
``eval/verification.py`` does, so that the numbers compare with published ones.

Images ``2k`` and ``2k + 1`` of a set form pair ``k``. With a flip test the embedding of an image
is the sum of its raw embedding and its mirror's, then L2-normalised (insightface adds the raw
embeddings; ``angular.serve.inference`` adds normalised ones). The 10-fold accuracy is
insightface's: contiguous folds in the file's pair order (scikit-learn's ``KFold`` without
shuffling: the first ``P % folds`` folds one pair longer), for each fold the squared-distance
threshold of the grid ``0, 0.01, ..., 3.99`` (the first one on a tie) that maximises the plain
accuracy ``(TP + TN) / n`` on the other folds, applied to it ("same" when the distance is below
it). AUC, EER and TAR at each FAR are over all pairs
(:func:`angular.eval.verification.verification_metrics`).

This module is numbers only; decoding a set and running a model on it is
:mod:`angular.train.bins` (``eval`` imports no other layer).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from angular.eval.checks import as_bool_array, as_float_array
from angular.eval.verification import unit_rows, verification_metrics

__all__ = [
    "DISTANCE_THRESHOLDS",
    "bin_metrics",
    "flip_embeddings",
    "insightface_accuracy",
    "insightface_folds",
]

# insightface's grid of squared-distance thresholds between unit embeddings (calculate_roc).
DISTANCE_THRESHOLDS = np.arange(0, 4, 0.01)


def flip_embeddings(embeddings, flipped=None) -> np.ndarray:
    """The unit embeddings insightface scores: ``embeddings + flipped`` (raw, float64), or
    ``embeddings`` alone without a flip test, L2-normalised row by row."""
    embeddings = as_float_array(embeddings, "embeddings", ndim=2)
    if flipped is not None:
        flipped = as_float_array(flipped, "flipped", ndim=2)
        if flipped.shape != embeddings.shape:
            raise ValueError(
                f"flipped has shape {flipped.shape}, embeddings {embeddings.shape}: they must match"
            )
        embeddings = embeddings + flipped
    return unit_rows(embeddings)


def insightface_folds(n_pairs: int, folds: int) -> np.ndarray:
    """The fold of each pair: contiguous runs in pair order, the first ``n_pairs % folds`` folds
    one pair longer (scikit-learn's ``KFold(folds, shuffle=False)``)."""
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2:
        raise ValueError(f"folds must be an integer >= 2, got {folds!r}")
    if folds > n_pairs:
        raise ValueError(f"folds ({folds}) must not exceed the number of pairs ({n_pairs})")
    sizes = np.full(folds, n_pairs // folds)
    sizes[: n_pairs % folds] += 1
    return np.repeat(np.arange(folds), sizes)


def _accuracy_by_threshold(distance: np.ndarray, same: np.ndarray) -> np.ndarray:
    """Plain accuracy of "same when distance < t" for each t of :data:`DISTANCE_THRESHOLDS`."""
    genuine = np.sort(distance[same])
    impostor = np.sort(distance[~same])
    accepted_genuine = np.searchsorted(genuine, DISTANCE_THRESHOLDS, side="left")
    rejected_impostor = len(impostor) - np.searchsorted(impostor, DISTANCE_THRESHOLDS, side="left")
    return (accepted_genuine + rejected_impostor) / len(distance)


def insightface_accuracy(unit: np.ndarray, same, fold_of: np.ndarray) -> tuple[float, float]:
    """``(mean, population std)`` of the fold accuracies of insightface's protocol (module doc)
    for the unit embeddings ``unit`` (pair ``k``: rows ``2k`` and ``2k + 1``)."""
    same = as_bool_array(same, "same")
    difference = unit[0::2] - unit[1::2]
    distance = np.sum(np.square(difference), axis=1)
    accuracy = []
    for fold in np.unique(fold_of):
        test = fold_of == fold
        best = int(np.argmax(_accuracy_by_threshold(distance[~test], same[~test])))
        accepted = distance[test] < DISTANCE_THRESHOLDS[best]
        accuracy.append(float(np.mean(accepted == same[test])))
    return float(np.mean(accuracy)), float(np.std(accuracy))


def bin_metrics(
    embeddings: np.ndarray,
    flipped: np.ndarray | None,
    same: np.ndarray,
    fars: Sequence[float],
    folds: int = 10,
) -> dict[str, float]:
    """The metrics of one verification set from its images' embeddings (module doc).

    ``embeddings``: (2P, D), rows ``2k`` and ``2k + 1`` the images of pair ``k``; ``flipped``:
    the mirrored images' embeddings (same shape) or None; ``same``: (P,) bools. Returns
    ``accuracy`` and ``accuracy_std`` (insightface's 10-fold protocol), ``auc``, ``eer``,
    ``tar@far=F`` with ``resolvable@far=F`` for each of ``fars`` (NaN and 0.0 below one impostor
    pair), ``n_genuine`` and ``n_impostor``. Bad input raises one ``ValueError`` line."""
    same = as_bool_array(same, "same")
    unit = flip_embeddings(embeddings, flipped)
    if len(unit) != 2 * len(same):
        raise ValueError(
            f"embeddings has {len(unit)} rows for {len(same)} pairs; a set has two images per pair"
        )
    if same.all() or not same.any():
        missing = "impostor (False)" if same.all() else "genuine (True)"
        raise ValueError(f"same has no {missing} pair: verification needs both kinds")
    fold_of = insightface_folds(len(same), folds)
    similarity = np.einsum("pd,pd->p", unit[0::2], unit[1::2])
    result = verification_metrics(similarity, same, fars=fars, fold_of=fold_of)
    # insightface's accuracy replaces the balanced one (its threshold is not insightface's).
    del result["threshold"]
    result["accuracy"], result["accuracy_std"] = insightface_accuracy(unit, same, fold_of)
    return result
