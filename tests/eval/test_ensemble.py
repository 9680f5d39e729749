"""angular.eval.ensemble: every rule on small hand-made tables, and the invariants of its outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from angular.eval import ensemble, metrics


def _heads(*rows_per_head):
    """Heads as (N, K) arrays from nested lists."""
    return [np.array(rows, dtype=np.float64) for rows in rows_per_head]


def test_vote_unanimous_split_and_ties():
    heads = _heads(
        # sample 0: unanimous for class 0; sample 1: split 2-1 for class 1;
        # sample 2: 1-1-1 tie (classes 0, 1, 2), class 2 has the highest mean probability;
        # sample 3: another 1-1-1 tie, won by class 1 (the highest mean probability).
        [[0.6, 0.3, 0.1], [0.2, 0.6, 0.2], [0.40, 0.30, 0.30], [0.50, 0.10, 0.40]],
        [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.30, 0.35, 0.35], [0.05, 0.90, 0.05]],
        [[0.8, 0.1, 0.1], [0.05, 0.05, 0.9], [0.05, 0.05, 0.90], [0.30, 0.30, 0.40]],
    )
    predicted, confidence, probs = ensemble.combine(heads, "vote")
    assert predicted.tolist() == [0, 1, 2, 1]
    # Mean confidence of the heads that voted for the winner:
    #   0: (0.6 + 0.7 + 0.8) / 3; 1: (0.6 + 0.8) / 2; 2: the third head alone; 3: the second alone.
    np.testing.assert_allclose(confidence, [0.7, 0.7, 0.9, 0.9])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    np.testing.assert_allclose(probs.max(axis=1), confidence)
    assert probs.argmax(axis=1).tolist() == predicted.tolist()


def test_vote_tie_on_mean_probability_goes_to_lowest_class():
    heads = _heads([[0.6, 0.4]], [[0.4, 0.6]])
    predicted, confidence, _ = ensemble.combine(heads, "vote")
    assert predicted.tolist() == [0] and confidence.tolist() == [0.6]
    # A 1-1 tie decided by the mean probability (0.4 against 0.6).
    heads = _heads([[0.6, 0.4]], [[0.2, 0.8]])
    predicted, confidence, _ = ensemble.combine(heads, "vote")
    assert predicted.tolist() == [1] and confidence.tolist() == [0.8]


def test_vote_distribution_caps_other_classes_at_the_winner_share():
    # Two heads vote 0 with 0.40; the third is sure of class 1. Winner 0, confidence 0.40.
    # Mean probabilities of the others: class 1 0.56, class 2 0.17. Spreading the remaining 0.60
    # in proportion would give class 1 0.46 > 0.40, so it is capped just below 0.40 (the winner stays
    # the arg-max) and class 2 gets the rest, 0.20.
    heads = _heads(
        [[0.40, 0.35, 0.25]],
        [[0.40, 0.35, 0.25]],
        [[0.01, 0.98, 0.01]],
    )
    predicted, confidence, probs = ensemble.combine(heads, "vote")
    assert predicted.tolist() == [0]
    np.testing.assert_allclose(confidence, [0.40])
    np.testing.assert_allclose(probs, [[0.40, 0.40, 0.20]])
    assert probs[0, 1] < probs[0, 0] and probs.sum() == pytest.approx(1.0, abs=1e-15)
    # No cap needed: the other classes keep the proportions of their mean probabilities.
    heads = _heads([[0.7, 0.2, 0.1]], [[0.5, 0.1, 0.4]])
    _, confidence, probs = ensemble.combine(heads, "vote")
    np.testing.assert_allclose(confidence, [0.6])
    np.testing.assert_allclose(probs, [[0.6, 0.4 * 0.15 / 0.4, 0.4 * 0.25 / 0.4]])


def test_mean_prob_sum_log_prob_and_max_conf_hand_table():
    heads = _heads(
        [[0.6, 0.4], [0.9, 0.1]],
        [[0.2, 0.8], [0.5, 0.5]],
    )
    predicted, confidence, probs = ensemble.combine(heads, "mean_prob")
    np.testing.assert_allclose(probs, [[0.4, 0.6], [0.7, 0.3]])
    assert predicted.tolist() == [1, 0]
    np.testing.assert_allclose(confidence, [0.6, 0.7])

    # Products 0.12 : 0.32 and 0.45 : 0.05, renormalised.
    predicted, confidence, probs = ensemble.combine(heads, "sum_log_prob")
    np.testing.assert_allclose(probs, [[0.12 / 0.44, 0.32 / 0.44], [0.9, 0.1]])
    assert predicted.tolist() == [1, 0]

    # The most confident head per sample: head 1 (0.8) for sample 0, head 0 (0.9) for sample 1.
    predicted, confidence, probs = ensemble.combine(heads, "max_conf")
    np.testing.assert_allclose(probs, [[0.2, 0.8], [0.9, 0.1]])
    assert predicted.tolist() == [1, 0]
    np.testing.assert_allclose(confidence, [0.8, 0.9])


@pytest.mark.parametrize("rule", ensemble.RULES)
@pytest.mark.parametrize("scale", [3.0, 0.3])  # 0.3: unsure heads, where vote needs the cap
def test_invariants_on_random_heads(rule, scale):
    rng = np.random.default_rng()
    n, k = 1000, 7
    heads = [metrics.softmax(rng.normal(size=(n, k)) * scale) for _ in range(3)]
    predicted, confidence, probs = ensemble.combine(heads, rule)
    assert predicted.shape == (n,) and confidence.shape == (n,) and probs.shape == (n, k)
    assert predicted.dtype == np.int64
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-12)
    assert probs.min() >= 0
    np.testing.assert_allclose(probs.max(axis=1), confidence, atol=1e-12)
    np.testing.assert_array_equal(probs.argmax(axis=1), predicted)
    if rule == "vote":
        votes = np.stack([h.argmax(axis=1) for h in heads])
        counts = (votes == predicted).sum(axis=0)
        # The winner has at least as many votes as any other class.
        for c in range(k):
            assert np.all(counts >= (votes == c).sum(axis=0))
    if rule == "sum_log_prob":
        product = heads[0] * heads[1] * heads[2]
        np.testing.assert_allclose(probs, product / product.sum(axis=1, keepdims=True))


@pytest.mark.parametrize("rule", ensemble.RULES)
def test_one_head_is_itself(rule):
    rng = np.random.default_rng()
    head = metrics.softmax(rng.normal(size=(20, 5)) * 2)
    predicted, confidence, probs = ensemble.combine([torch.tensor(head)], rule)
    np.testing.assert_array_equal(predicted, head.argmax(axis=1))
    np.testing.assert_allclose(confidence, head.max(axis=1))
    np.testing.assert_allclose(probs, head, atol=1e-12)


@pytest.mark.parametrize(
    ("heads", "rule", "message"),
    [
        ([], "vote", "probs_per_head"),
        ([np.full((2, 2), 0.5), np.full((3, 2), 0.5)], "vote", r"probs_per_head\[1\]"),
        ([np.full((2, 2), 0.5), np.full((2, 2), 0.6)], "mean_prob", r"probs_per_head\[1\]"),
        ([np.full(2, 0.5)], "mean_prob", r"probs_per_head\[0\]"),
        ([np.full((2, 2), 0.5)], "majority", "rule"),
    ],
)
def test_bad_input_names_the_argument(heads, rule, message):
    with pytest.raises(ValueError, match=message):
        ensemble.combine(heads, rule)


def test_members_far_below_the_best_on_validation_are_left_out():
    accuracy = {"arcface": 0.09, "cosface": 0.53, "sphereface": 0.50}
    chosen = ensemble.select_members(accuracy, "relative_val_accuracy", 0.8)
    assert chosen == {"arcface": False, "cosface": True, "sphereface": True}
    assert all(ensemble.select_members(accuracy, "none", 0.8).values())
    # The best member always stays, even at threshold 1; ties at the threshold stay in.
    assert ensemble.select_members(accuracy, "relative_val_accuracy", 1.0) == {
        "arcface": False,
        "cosface": True,
        "sphereface": False,
    }
    assert ensemble.select_members({"a": 0.4, "b": 0.5}, "relative_val_accuracy", 0.8)["a"]
    for bad, match in (
        (dict(rule="best"), "rule must be one of"),
        (dict(threshold=1.5), "threshold must be in"),
        (dict(val_accuracy={}), "at least one head"),
    ):
        args = dict(val_accuracy=accuracy, rule="relative_val_accuracy", threshold=0.8) | bad
        with pytest.raises(ValueError, match=match):
            ensemble.select_members(**args)
