"""Evaluation metrics (docs/design.md, Pipeline): closed-set, calibration, open-set and verification.

Every function takes numpy arrays or torch tensors (anything :func:`numpy.asarray` understands),
checks shapes, and returns Python floats, numpy arrays or dicts of floats. Bad input raises
``ValueError`` naming the argument.

scikit-learn computes the ROC curve, its area and the Brier score, and scipy the log-softmax; what
is ours is what they do not compute the same way: the input validation, the NLL with its 1e-12
floor, ECE and reliability bins, the open-set metrics (OSCR, the threshold at a known rate) and
the LFW verification protocol (pairs, 10 folds, EER, TAR at FAR).

Conventions:

- ``probs`` is (N, K) with rows on the probability simplex; ``labels`` is (N,) integers in [0, K).
- "Confidence" is the largest class probability of a row; a sample is "correct" when the arg-max
  class equals its label.
- Scores are "higher = more positive" everywhere (confidence, cosine similarity).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import special

__all__ = [
    "softmax",
    "log_softmax",
    "top1_accuracy",
    "nll",
    "brier_score",
    "expected_calibration_error",
    "confidence_calibration_error",
    "reliability_bins",
    "roc_curve",
    "roc_auc",
    "open_set_accuracy",
    "threshold_at_known_rate",
    "open_set_rates",
    "threshold_at_far",
    "open_set_auroc",
    "oscr",
    "verification_pairs",
    "read_pairs_file",
    "parse_pairs_file",
    "PairsFile",
    "balanced_accuracy",
    "cosine_similarity_pairs",
    "best_threshold",
    "verification_metrics",
    "far_key",
    "DEFAULT_FARS",
]

PROB_FLOOR = (
    1e-12  # probabilities are clipped here before a log, so one confident mistake is finite
)
DEFAULT_FARS = (1e-1, 1e-2, 1e-3)
MAX_IMPOSTOR_PAIRS = 10_000_000  # beyond this, listing or scoring the pairs would exhaust memory


# --------------------------------------------------------------------------------------------------
# Input conversion and validation (shared by calibration.py and ensemble.py).


def as_array(value, name: str, *, ndim: int | None = None, dtype=None) -> np.ndarray:
    """``value`` as a numpy array (torch tensors are detached and moved to CPU), checked for rank."""
    # A torch tensor (recognised without importing torch): detached, on the CPU, in a numpy dtype.
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            value = value.float()
        value = value.numpy()
    try:
        array = np.asarray(value, dtype=dtype)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be array-like: {error}") from None
    if ndim is not None and array.ndim != ndim:
        raise ValueError(
            f"{name} must have {ndim} dimension{'s' if ndim != 1 else ''}, "
            f"got shape {tuple(array.shape)}"
        )
    return array


def as_float_array(value, name: str, *, ndim: int | None = None) -> np.ndarray:
    """A finite float64 array (NaN or inf raises, naming ``name``)."""
    array = as_array(value, name, ndim=ndim)
    if array.dtype == bool or not (
        np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
    ):
        raise ValueError(f"{name} must hold real numbers, got dtype {array.dtype}")
    array = array.astype(np.float64, copy=False)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite; it holds NaN or inf")
    return array


def as_int_array(value, name: str) -> np.ndarray:
    """A 1-D int64 array (floats are accepted only when they hold whole numbers)."""
    array = as_array(value, name, ndim=1)
    if array.dtype == bool:
        raise ValueError(f"{name} must hold integers, got booleans")
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
            raise ValueError(f"{name} must hold integers, got non-integral values")
    elif not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


def as_bool_array(value, name: str) -> np.ndarray:
    """A 1-D boolean array (0/1 integers are accepted)."""
    array = as_array(value, name, ndim=1)
    if array.dtype == bool:
        return array
    if np.issubdtype(array.dtype, np.number) and np.all(np.isin(array, (0, 1))):
        return array.astype(bool)
    raise ValueError(f"{name} must be boolean (or 0/1), got dtype {array.dtype}")


def check_same_length(**arrays: np.ndarray) -> int:
    """The common length of 1-D/2-D arrays; raises naming the first one that differs."""
    names = list(arrays)
    length = len(arrays[names[0]])
    for name in names[1:]:
        if len(arrays[name]) != length:
            raise ValueError(
                f"{name} has {len(arrays[name])} rows but {names[0]} has {length}; they must match"
            )
    if length == 0:
        raise ValueError(f"{names[0]} is empty; at least one sample is needed")
    return length


def check_scores_labels(scores, labels, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``(scores (N, K) float64, labels (N,) int64)`` with labels in [0, K); ``name``
    (``"probs"``, ``"logits"``) names the scores in messages."""
    scores = as_float_array(scores, name, ndim=2)
    labels = as_int_array(labels, "labels")
    check_same_length(**{name: scores, "labels": labels})
    num_classes = scores.shape[1]
    if num_classes == 0:
        raise ValueError(f"{name} must have at least one class column, got shape (N, 0)")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes}) ({name} has {num_classes} columns), "
            f"got values from {labels.min()} to {labels.max()}"
        )
    return scores, labels


def check_probs_labels(probs, labels) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``(probs (N, K) float64, labels (N,) int64)`` with labels in [0, K)."""
    probs, labels = check_scores_labels(probs, labels, "probs")
    if probs.min() < 0.0 or probs.max() > 1.0 + 1e-6:
        raise ValueError("probs must hold probabilities in [0, 1]")
    return probs, labels


def _sklearn_metrics():
    """``sklearn.metrics``, imported on first use: its import is slow (3.6 s on a busy 2-core
    machine), and ``angular predict`` needs only the softmax and the ensemble rules."""
    from sklearn import metrics

    return metrics


def _check_n_bins(n_bins) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    return int(n_bins)


# --------------------------------------------------------------------------------------------------
# Closed-set classification and calibration.


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
        score = _sklearn_metrics().brier_score_loss(
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
    n_bins = _check_n_bins(n_bins)
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


# --------------------------------------------------------------------------------------------------
# ROC.


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
    return _sklearn_metrics().roc_curve(positive, scores, drop_intermediate=drop_intermediate)


def roc_auc(scores, positive) -> float:
    """Area under the ROC curve (trapezoids; ties count one half, as in scikit-learn)."""
    # The trapezoids over every point, not sklearn's roc_auc_score: that one first drops the points
    # on straight segments, the same area summed in another order, which changes the last bits.
    fpr, tpr, _ = roc_curve(scores, positive)
    return float(_sklearn_metrics().auc(fpr, tpr))


# --------------------------------------------------------------------------------------------------
# Open set: known identities must be classified, unknown identities rejected.


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
    return float(_sklearn_metrics().auc(fpr, ccr))


# --------------------------------------------------------------------------------------------------
# Verification (LFW protocol): pairs of images, same identity or not, scored by cosine similarity.


def verification_pairs(
    identities,
    *,
    seed: int,
    max_impostors: int | None = None,
    impostors_per_genuine: float | None = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs for verification: every genuine pair and a seeded sample of impostor pairs.

    Genuine pairs are all ``(i, j)``, ``i < j``, with the same identity. The number of impostor
    pairs (``i < j``, different identities, drawn without replacement) is
    ``impostors_per_genuine * n_genuine`` (``None``: no such limit), capped by ``max_impostors``
    and by how many exist. Returns ``(index_a, index_b, same)``: genuine pairs first, then
    impostors, each sorted; the same seed gives the same pairs.
    """
    identities = as_array(identities, "identities", ndim=1)
    if len(identities) < 2:
        raise ValueError(f"identities needs at least 2 samples, got {len(identities)}")
    if max_impostors is not None and (isinstance(max_impostors, bool) or max_impostors < 0):
        raise ValueError(f"max_impostors must be >= 0 or None, got {max_impostors!r}")
    if impostors_per_genuine is not None and not impostors_per_genuine >= 0:
        raise ValueError(f"impostors_per_genuine must be >= 0 or None, got {impostors_per_genuine}")
    _, codes = np.unique(identities, return_inverse=True)
    codes = codes.ravel()
    n = len(codes)

    genuine_a, genuine_b = [], []
    for identity in np.unique(codes):
        members = np.flatnonzero(codes == identity)
        a, b = np.triu_indices(len(members), k=1)
        genuine_a.append(members[a])
        genuine_b.append(members[b])
    genuine_a = np.concatenate(genuine_a)
    genuine_b = np.concatenate(genuine_b)
    order = np.lexsort((genuine_b, genuine_a))
    genuine_a, genuine_b = genuine_a[order], genuine_b[order]

    n_all_pairs = n * (n - 1) // 2
    n_available = n_all_pairs - len(genuine_a)
    wanted = n_available
    if impostors_per_genuine is not None:
        wanted = min(wanted, int(math.floor(impostors_per_genuine * len(genuine_a))))
    if max_impostors is not None:
        wanted = min(wanted, int(max_impostors))

    if wanted > MAX_IMPOSTOR_PAIRS:
        raise ValueError(
            f"{wanted} impostor pairs requested (more than {MAX_IMPOSTOR_PAIRS}); "
            "set max_impostors or impostors_per_genuine to sample fewer"
        )
    rng = np.random.default_rng(seed)
    if wanted == 0:
        impostor_a = impostor_b = np.zeros(0, dtype=np.int64)
    elif n_all_pairs <= 2_000_000 or 2 * wanted >= n_available:
        # Few enough pairs to list: choose among all impostor pairs without replacement.
        a, b = np.triu_indices(n, k=1)
        different = codes[a] != codes[b]
        a, b = a[different], b[different]
        chosen = np.sort(rng.choice(len(a), size=wanted, replace=False))
        impostor_a, impostor_b = a[chosen], b[chosen]
    else:
        # Many pairs and a small sample: draw random pairs, keep new impostor pairs until enough.
        seen: set[tuple[int, int]] = set()
        while len(seen) < wanted:
            draws = rng.integers(0, n, size=(2 * (wanted - len(seen)) + 16, 2))
            for i, j in draws:
                if i != j and codes[i] != codes[j]:
                    seen.add((min(i, j), max(i, j)))
                    if len(seen) == wanted:
                        break
        pairs = np.array(sorted(seen), dtype=np.int64)
        impostor_a, impostor_b = pairs[:, 0], pairs[:, 1]

    index_a = np.concatenate([genuine_a, impostor_a]).astype(np.int64)
    index_b = np.concatenate([genuine_b, impostor_b]).astype(np.int64)
    same = np.r_[np.ones(len(genuine_a), bool), np.zeros(len(impostor_a), bool)]
    return index_a, index_b, same


@dataclasses.dataclass(frozen=True)
class PairsFile:
    """The pairs of an LFW ``pairs.txt``, by image name (``<person>_<n:04d>``, LFW's file stems)."""

    path: Path
    first: tuple[str, ...]  # image name of each pair's first image
    second: tuple[str, ...]
    people: tuple[tuple[str, str], ...]  # the two people of each pair
    same: np.ndarray  # (P,) bool: genuine pair
    fold_of: np.ndarray | None  # (P,) int: the file's own folds (header "folds pairs_per_fold")
    lines: tuple[int, ...]  # line number of each pair, for messages


def parse_pairs_file(path: str | os.PathLike) -> PairsFile:
    """Read an LFW ``pairs.txt`` without looking at any image.

    Lines are ``name n1 n2`` (genuine: images ``n1`` and ``n2`` of ``name``) or
    ``name1 n1 name2 n2`` (impostor). A first line ``folds pairs_per_fold`` (View 2: ``10 300``)
    means the pairs come fold by fold, each with ``pairs_per_fold`` genuine and as many impostor
    pairs: they are the folds of :func:`verification_metrics`. A first line of one integer (View 1)
    is a pair count. A file of only genuine or only impostor pairs is refused (no threshold, no
    accuracy, no ROC can come of it)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"pairs file {path} does not exist or is not a file")
    first, second, people, same, lines = [], [], [], [], []
    header = None
    for line_number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if line_number == 1 and len(fields) <= 2 and all(f.isdigit() for f in fields):
            header = [int(f) for f in fields]
            continue
        if len(fields) not in (3, 4):
            raise ValueError(
                f"{path}:{line_number}: expected 'name n1 n2' or 'name1 n1 name2 n2', got {line!r}"
            )
        a = (fields[0], fields[1])
        b = (fields[0], fields[2]) if len(fields) == 3 else (fields[2], fields[3])
        for _, number in (a, b):
            if not re.fullmatch(r"\d+", number):
                raise ValueError(f"{path}:{line_number}: image number {number!r} is not an integer")
        first.append(f"{a[0]}_{int(a[1]):04d}")
        second.append(f"{b[0]}_{int(b[1]):04d}")
        people.append((a[0], b[0]))
        same.append(a[0] == b[0])
        lines.append(line_number)
    same = np.array(same, bool)
    if not len(same):
        raise ValueError(f"pairs file {path} holds no pairs")
    if same.all() or not same.any():
        kind = "genuine" if same.all() else "impostor"
        raise ValueError(
            f"pairs file {path} holds only {kind} pairs ({len(same)}); verification needs both "
            "genuine ('name n1 n2') and impostor ('name1 n1 name2 n2') pairs"
        )
    fold_of = None
    if header is not None and len(header) == 2 and header[0] >= 2:
        folds, per_fold = header
        if folds * 2 * per_fold != len(same):
            raise ValueError(
                f"{path}:1: the header says {folds} folds of {per_fold} genuine and {per_fold} "
                f"impostor pairs ({folds * 2 * per_fold} pairs), but the file "
                f"holds {len(same)} pairs"
            )
        fold_of = np.arange(len(same)) // (2 * per_fold)
    return PairsFile(path, tuple(first), tuple(second), tuple(people), same, fold_of, tuple(lines))


def read_pairs_file(
    path: str | os.PathLike, names: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs from an LFW ``pairs.txt`` (:func:`parse_pairs_file`): ``(index_a, index_b, same)``
    indexing into ``names``, which holds, for each sample, its image path or file name; image ``n``
    of ``name`` is the sample whose file stem is ``{name}_{n:04d}`` (LFW's naming, e.g.
    ``Aaron_Peirsol_0001.jpg``).
    """
    pairs = parse_pairs_file(path)
    index_of: dict[str, int] = {}
    for index, name in enumerate(names):
        stem = Path(str(name)).stem
        if stem in index_of:
            raise ValueError(
                f"names holds the image {stem!r} twice (at {index_of[stem]} and {index})"
            )
        index_of[stem] = index
    index_a, index_b = [], []
    for a, b, line_number in zip(pairs.first, pairs.second, pairs.lines):
        for stem in (a, b):
            if stem not in index_of:
                raise ValueError(f"{pairs.path}:{line_number}: image {stem!r} is not among names")
        index_a.append(index_of[a])
        index_b.append(index_of[b])
    return np.array(index_a, np.int64), np.array(index_b, np.int64), pairs.same


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
    norms = np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    unit = embeddings / norms
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
        "auc": float(_sklearn_metrics().auc(fpr, tpr)),
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
