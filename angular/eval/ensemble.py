"""Ensembles of margin heads (docs/design.md, Pipeline): combine the calibrated class probabilities
of several heads into one prediction, one confidence and one distribution per sample.

Rules (:data:`RULES`):

- ``mean_prob``: the mean of the heads' probabilities.
- ``vote``: the original repository's rule. Each head votes for its arg-max class; the class with
  the most votes wins (a tie goes to the tied class with the highest mean probability, then the
  lowest index); the confidence is the mean confidence of the heads that voted for the winner.
- ``sum_log_prob``: the product of the heads' probabilities (sum of log-probabilities, each
  clipped at 1e-12), renormalised.
- ``max_conf``: the distribution of the most confident head (the first one on a tie).

For every rule but ``vote`` the prediction is the arg-max of the returned distribution and the
confidence its maximum. For ``vote`` the returned distribution is built to agree with the vote:
the winner gets the vote's confidence, and the remaining ``1 - confidence`` is spread over the other
classes in proportion to their mean probability, each capped just below the winner's share
(possible because a voter's confidence is at least ``1/K``). So its rows sum to 1, its maximum is
the vote confidence and its arg-max is the winner, and the metrics of
:mod:`angular.eval.calibration` that take ``probs`` (ECE, NLL, Brier) measure the vote itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import special

from angular.eval.checks import as_float_array
from angular.eval.classification import PROB_FLOOR

__all__ = ["MEMBER_RULES", "RULES", "combine", "select_members"]

RULES = ("mean_prob", "vote", "sum_log_prob", "max_conf")


def _check_heads(probs_per_head) -> np.ndarray:
    """The heads' probabilities stacked as (H, N, K) float64, validated."""
    if isinstance(probs_per_head, np.ndarray) and probs_per_head.ndim == 3:
        probs_per_head = list(probs_per_head)
    if not isinstance(probs_per_head, Sequence) or len(probs_per_head) == 0:
        raise ValueError("probs_per_head must be a non-empty list of (N, K) probability arrays")
    heads = [
        as_float_array(probs, f"probs_per_head[{i}]", ndim=2)
        for i, probs in enumerate(probs_per_head)
    ]
    shape = heads[0].shape
    for i, probs in enumerate(heads):
        name = f"probs_per_head[{i}]"
        if probs.shape != shape:
            raise ValueError(
                f"{name} has shape {probs.shape} but probs_per_head[0] has {shape}; all heads "
                "must score the same samples over the same classes"
            )
        if probs.size == 0:
            raise ValueError(f"{name} is empty (shape {probs.shape})")
        if probs.min() < 0.0 or not np.allclose(probs.sum(axis=1), 1.0, atol=1e-4):
            raise ValueError(
                f"{name} must hold probabilities: non-negative rows summing to 1 "
                "(apply angular.eval.metrics.softmax to logits first)"
            )
    return np.stack(heads)


def _fill_around_winner(
    mean_probs: np.ndarray, winner: np.ndarray, confidence: np.ndarray
) -> np.ndarray:
    """Rows with ``confidence`` at ``winner`` and the rest of the unit mass spread over the other
    classes in proportion to ``mean_probs``, each capped just below the winner's share
    (water-filling), so that the winner stays the unique arg-max."""
    n, k = mean_probs.shape
    rows = np.arange(n)
    others = np.ones((n, k), dtype=bool)
    others[rows, winner] = False
    weights = np.where(others, mean_probs, 0.0)
    # Rows whose other classes have no mass share the remainder evenly.
    empty = weights.sum(axis=1) <= 0
    weights[empty] = others[empty].astype(np.float64)
    remainder = 1.0 - confidence
    cap = np.nextafter(confidence, 0.0)[:, None]  # the largest float below the winner's share
    result = np.zeros_like(mean_probs)
    capped = np.zeros((n, k), dtype=bool)
    for _ in range(k):  # each pass caps at least one more class, or stops
        free = others & ~capped
        free_weight = np.where(free, weights, 0.0)
        left = remainder - np.where(capped, cap, 0.0).sum(axis=1)
        total = free_weight.sum(axis=1, keepdims=True)
        share = np.divide(
            free_weight * left[:, None], total, where=total > 0, out=np.zeros_like(free_weight)
        )
        over = free & (share > cap)
        result = np.where(capped, cap, share)
        if not over.any():
            break
        capped |= over
    result[rows, winner] = confidence
    return result


def combine(probs_per_head, rule: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Combine heads by ``rule``: ``(predicted (N,) int64, confidence (N,), probs (N, K))``.

    ``probs_per_head`` is a list of (N, K) arrays of (calibrated) class probabilities, one per head.
    See the module docstring for the rules and what ``probs`` is for ``vote``.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    heads = _check_heads(probs_per_head)
    n_heads, n, k = heads.shape
    rows = np.arange(n)
    mean_probs = heads.mean(axis=0)

    if rule == "mean_prob":
        probs = mean_probs
    elif rule == "sum_log_prob":
        probs = special.softmax(np.log(np.clip(heads, PROB_FLOOR, None)).sum(axis=0), axis=1)
    elif rule == "max_conf":
        most_confident = heads.max(axis=2).argmax(axis=0)  # (N,): first head on a tie
        probs = heads[most_confident, rows]
    else:  # vote
        head_votes = heads.argmax(axis=2)  # (H, N)
        head_confidence = heads.max(axis=2)  # (H, N)
        votes = np.zeros((n, k))
        np.add.at(votes, (np.broadcast_to(rows, head_votes.shape), head_votes), 1.0)
        # Among the classes with the most votes, the highest mean probability wins.
        tied = votes == votes.max(axis=1, keepdims=True)
        winner = np.where(tied, mean_probs, -np.inf).argmax(axis=1)
        voted_for_winner = head_votes == winner[None, :]
        confidence = (head_confidence * voted_for_winner).sum(axis=0) / voted_for_winner.sum(axis=0)
        return (
            winner.astype(np.int64),
            confidence,
            _fill_around_winner(mean_probs, winner, confidence),
        )

    return probs.argmax(axis=1).astype(np.int64), probs.max(axis=1), probs


MEMBER_RULES = ("none", "relative_val_accuracy")


def select_members(val_accuracy: dict[str, float], rule: str, threshold: float) -> dict[str, bool]:
    """Which heads join the ensemble, from their validation accuracy (never the test split's).

    ``relative_val_accuracy``: a head is left out when its accuracy is below ``threshold`` times
    the best head's, which keeps a collapsed head (near chance) from dragging the ensemble down;
    the best head always stays. ``none``: every head joins."""
    if rule not in MEMBER_RULES:
        raise ValueError(f"rule must be one of {MEMBER_RULES}, got {rule!r}")
    if not val_accuracy:
        raise ValueError("val_accuracy must name at least one head")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    if rule == "none":
        return {name: True for name in val_accuracy}
    best = max(val_accuracy.values())
    return {name: value >= threshold * best for name, value in val_accuracy.items()}
