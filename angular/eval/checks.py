"""Input conversion and validation shared by the metrics of :mod:`angular.eval`.

Every metric takes numpy arrays or torch tensors (anything :func:`numpy.asarray` understands),
checks shapes, and raises ``ValueError`` naming the argument on bad input.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "as_array",
    "as_float_array",
    "as_int_array",
    "as_bool_array",
    "check_same_length",
    "check_scores_labels",
    "check_probs_labels",
    "check_n_bins",
    "sklearn_metrics",
]


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


def sklearn_metrics():
    """``sklearn.metrics``, imported on first use: its import is slow (3.6 s on a busy 2-core
    machine), and ``angular predict`` needs only the softmax and the ensemble rules."""
    from sklearn import metrics

    return metrics


def check_n_bins(n_bins) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    return int(n_bins)
