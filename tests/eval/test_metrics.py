"""angular.eval.metrics: hand-computable cases, direct formulas and scikit-learn as yardsticks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from angular.eval import metrics

# --------------------------------------------------------------------------------------------------
# Closed set and calibration


def test_softmax_matches_direct_formula_and_is_stable():
    rng = np.random.default_rng()
    logits = rng.normal(size=(7, 5)) * 3
    for temperature in (1.0, 0.5, 4.0):
        expected = np.exp(logits / temperature)
        expected /= expected.sum(axis=1, keepdims=True)
        np.testing.assert_allclose(metrics.softmax(logits, temperature), expected, rtol=1e-12)
    # A shift of 1e4 would overflow exp() without the max subtraction; softmax is shift-invariant.
    np.testing.assert_allclose(
        metrics.softmax(logits + 1e4), metrics.softmax(logits), rtol=1e-9, atol=1e-15
    )
    # torch tensors are accepted, whatever their dtype (bfloat16 included).
    np.testing.assert_allclose(
        metrics.softmax(torch.tensor(logits, dtype=torch.float32)),
        metrics.softmax(logits),
        rtol=1e-5,
    )
    rounded = torch.tensor(logits, dtype=torch.bfloat16)
    np.testing.assert_allclose(
        metrics.softmax(rounded), metrics.softmax(rounded.double().numpy()), rtol=1e-12
    )


@pytest.mark.parametrize("temperature", [0.0, -1.0, math.inf, math.nan])
def test_softmax_rejects_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature"):
        metrics.softmax(np.ones((2, 3)), temperature)


def test_top1_nll_brier_against_direct_formulas():
    rng = np.random.default_rng()
    probs = metrics.softmax(rng.normal(size=(50, 6)) * 2)
    labels = rng.integers(0, 6, size=50)
    assert metrics.top1_accuracy(probs, labels) == np.mean(
        [np.argmax(row) == y for row, y in zip(probs, labels)]
    )
    assert metrics.nll(probs, labels) == pytest.approx(
        -sum(math.log(row[y]) for row, y in zip(probs, labels)) / 50, rel=1e-12
    )
    brier = sum(
        sum((row[k] - (k == y)) ** 2 for k in range(6)) for row, y in zip(probs, labels)
    ) / len(labels)
    assert metrics.brier_score(probs, labels) == pytest.approx(brier, rel=1e-12)


def test_nll_clips_zero_probability_and_brier_extremes():
    probs = np.array([[1.0, 0.0], [0.25, 0.75]])
    labels = np.array([1, 1])
    # -(log 1e-12 + log 0.75) / 2
    assert metrics.nll(probs, labels) == pytest.approx(-(math.log(1e-12) + math.log(0.75)) / 2)
    # A confident mistake costs 2, a perfect answer 0.
    assert metrics.brier_score(np.array([[1.0, 0.0], [0.0, 1.0]]), [1, 1]) == 1.0


def test_expected_calibration_error_hand_computed():
    # Four samples, 5 bins of width 0.2 (a bin holds lower < confidence <= upper):
    #   conf 0.90 correct, conf 0.85 wrong -> bin (0.8, 1]: accuracy 0.5, confidence 0.875, gap 0.375
    #   conf 0.50 correct, conf 0.45 wrong -> bin (0.4, 0.6]: accuracy 0.5, confidence 0.475, gap 0.025
    # ECE = 2/4 * 0.375 + 2/4 * 0.025 = 0.2
    probs = np.array(
        [[0.90, 0.05, 0.05], [0.85, 0.10, 0.05], [0.50, 0.30, 0.20], [0.45, 0.35, 0.20]]
    )
    labels = np.array([0, 1, 0, 2])
    assert metrics.expected_calibration_error(probs, labels, n_bins=5) == pytest.approx(0.2)
    bins = metrics.reliability_bins(probs.max(axis=1), probs.argmax(axis=1) == labels, n_bins=5)
    np.testing.assert_array_equal(bins["count"], [0, 0, 2, 0, 2])
    np.testing.assert_allclose(bins["accuracy"][[2, 4]], [0.5, 0.5])
    np.testing.assert_allclose(bins["confidence"][[2, 4]], [0.475, 0.875])
    assert np.isnan(bins["accuracy"][0]) and np.isnan(bins["confidence"][1])
    np.testing.assert_allclose(bins["bin_lower"], [0, 0.2, 0.4, 0.6, 0.8])
    np.testing.assert_allclose(bins["bin_upper"], [0.2, 0.4, 0.6, 0.8, 1.0])


def test_reliability_bin_edges():
    # 0 and 0.2 fall in the first bin (0 has nowhere else to go; bins are closed on the right),
    # 0.2000001 in the second, 1.0 in the last.
    bins = metrics.reliability_bins([0.0, 0.2, 0.2000001, 1.0], [1, 0, 1, 1], n_bins=5)
    np.testing.assert_array_equal(bins["count"], [2, 1, 0, 0, 1])
    # A float32 softmax can round the top probability just above 1: it counts in the last bin.
    bins = metrics.reliability_bins(np.float32([1.0000001, 0.5]), [1, 1], n_bins=5)
    np.testing.assert_array_equal(bins["count"], [0, 0, 1, 0, 1])


def test_ece_against_a_direct_loop_on_random_data():
    rng = np.random.default_rng()
    probs = metrics.softmax(rng.normal(size=(300, 4)) * 2)
    labels = rng.integers(0, 4, size=300)
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == labels
    expected = 0.0
    for b in range(15):
        lower, upper = b / 15, (b + 1) / 15
        in_bin = (confidence > lower) & (confidence <= upper)
        if in_bin.any():
            gap = abs(correct[in_bin].mean() - confidence[in_bin].mean())
            expected += in_bin.sum() / len(labels) * gap
    assert metrics.expected_calibration_error(probs, labels) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda: metrics.nll(np.full((3, 2), 0.5), [0, 1]), "labels"),
        (lambda: metrics.nll(np.full((2, 2), 0.5), [0, 2]), "labels"),
        (lambda: metrics.nll(np.full((2,), 0.5), [0, 1]), "probs"),
        (lambda: metrics.brier_score([[0.5, np.nan]], [0]), "probs"),
        (lambda: metrics.top1_accuracy(np.ones((2, 2)), [0.5, 1]), "labels"),
        (lambda: metrics.expected_calibration_error(np.full((2, 2), 0.5), [0, 1], 0), "n_bins"),
        (lambda: metrics.reliability_bins([0.5, 1.5], [1, 0]), "confidence"),
        (lambda: metrics.reliability_bins([0.5], [2]), "correct"),
        (lambda: metrics.nll(np.zeros((0, 2)), []), "probs"),
    ],
)
def test_bad_input_names_the_argument(call, argument):
    with pytest.raises(ValueError, match=argument):
        call()


# --------------------------------------------------------------------------------------------------
# ROC


@pytest.mark.parametrize("trial", range(5))
def test_roc_curve_and_auc_match_sklearn_with_ties(trial):
    rng = np.random.default_rng()
    n = int(rng.integers(5, 400))
    scores = rng.integers(0, 12, size=n) / 4.0  # few distinct values: many ties
    positive = rng.random(n) < rng.uniform(0.2, 0.8)
    positive[:2] = [True, False]
    ours = metrics.roc_curve(scores, positive)
    theirs = skm.roc_curve(positive, scores, drop_intermediate=False)
    for mine, reference in zip(ours, theirs):
        np.testing.assert_allclose(mine, reference)
    ours = metrics.roc_curve(scores, positive, drop_intermediate=True)
    theirs = skm.roc_curve(positive, scores)
    for mine, reference in zip(ours, theirs):
        np.testing.assert_allclose(mine, reference)
    assert metrics.roc_auc(scores, positive) == pytest.approx(
        skm.roc_auc_score(positive, scores), abs=1e-12
    )
    continuous = rng.normal(size=n) + positive
    assert metrics.roc_auc(continuous, positive) == pytest.approx(
        skm.roc_auc_score(positive, continuous), abs=1e-12
    )


def test_roc_needs_both_classes():
    with pytest.raises(ValueError, match="positive"):
        metrics.roc_curve([0.1, 0.2], [True, True])
    with pytest.raises(ValueError, match="positive"):
        metrics.roc_auc([0.1, 0.2], [0, 0])
    with pytest.raises(ValueError, match="scores"):
        metrics.roc_auc([0.1, 0.2, 0.3], [0, 1])


# --------------------------------------------------------------------------------------------------
# Open set


def test_open_set_accuracy_tiny_table():
    # threshold 0.5; rows: (confidence, predicted, label, known) -> right?
    table = [
        (0.9, 1, 1, True),  # known, correct, confident         -> right
        (0.9, 2, 1, True),  # known, wrong                      -> wrong
        (0.4, 1, 1, True),  # known, correct but under threshold -> wrong
        (0.5, 0, 0, True),  # known, correct, exactly at threshold -> right
        (0.3, 0, -1, False),  # unknown, rejected               -> right
        (0.7, 0, -1, False),  # unknown, accepted               -> wrong
    ]
    confidence, predicted, labels, known = map(np.array, zip(*table))
    assert metrics.open_set_accuracy(confidence, predicted, labels, known, 0.5) == 3 / 6
    # Threshold 0: nothing is rejected, so the result is the closed-set accuracy over all samples
    # counting unknowns wrong: 3 correct knowns of 6.
    assert metrics.open_set_accuracy(confidence, predicted, labels, known, 0.0) == 3 / 6
    # Threshold 1: everything rejected: only the 2 unknowns are right.
    assert metrics.open_set_accuracy(confidence, predicted, labels, known, 1.0) == 2 / 6


def test_threshold_at_known_rate():
    confidence = np.arange(1, 11) / 10  # 0.1 .. 1.0
    assert metrics.threshold_at_known_rate(confidence, 0.9) == pytest.approx(0.2)
    assert metrics.threshold_at_known_rate(confidence, 1.0) == pytest.approx(0.1)
    assert metrics.threshold_at_known_rate(confidence, 0.05) == pytest.approx(1.0)
    rng = np.random.default_rng()
    confidence = rng.random(size=int(rng.integers(20, 200)))
    for rate in (0.5, 0.9, 0.95, 0.99):
        threshold = metrics.threshold_at_known_rate(confidence, rate)
        assert np.mean(confidence >= threshold) >= rate
        assert np.mean(confidence > threshold) < rate  # any higher threshold would miss the rate
    with pytest.raises(ValueError, match="rate"):
        metrics.threshold_at_known_rate(confidence, 0.0)


def test_open_set_auroc():
    assert metrics.open_set_auroc([0.9, 0.8, 0.3, 0.2], [1, 1, 0, 0]) == 1.0
    assert metrics.open_set_auroc([0.9, 0.8, 0.3, 0.2], [0, 0, 1, 1]) == 0.0
    rng = np.random.default_rng()
    confidence, known = rng.random(100), rng.random(100) < 0.5
    known[:2] = [True, False]
    assert metrics.open_set_auroc(confidence, known) == pytest.approx(
        skm.roc_auc_score(known, confidence)
    )
    with pytest.raises(ValueError, match="known"):
        metrics.open_set_auroc([0.9, 0.8], [1, 1])


def test_oscr_hand_computed():
    # Knowns: (0.9, correct), (0.7, wrong), (0.5, correct); unknowns at 0.8 and 0.3.
    # Lowering the threshold: 0.9 -> CCR 1/3, FPR 0; 0.8 -> FPR 1/2; 0.5 -> CCR 2/3; 0.3 -> FPR 1.
    # (The misclassified known never counts.) Area = 1/2 * 1/3 + 1/2 * 2/3 = 0.5.
    confidence = [0.9, 0.7, 0.5, 0.8, 0.3]
    predicted = [1, 0, 2, 0, 0]
    labels = [1, 1, 2, -1, -1]
    known = [True, True, True, False, False]
    assert metrics.oscr(confidence, predicted, labels, known) == pytest.approx(0.5)
    # Every correct known above every unknown: OSCR is the closed-set accuracy (2/3).
    assert metrics.oscr([0.9, 0.7, 0.85, 0.2, 0.1], predicted, labels, known) == pytest.approx(
        2 / 3
    )
    # No known is right: 0.
    assert metrics.oscr(confidence, [0, 0, 0, 0, 0], labels, known) == 0.0


def test_oscr_against_a_direct_sweep_over_thresholds():
    rng = np.random.default_rng()
    n = 200
    confidence = rng.integers(0, 30, size=n) / 30  # ties included
    known = rng.random(n) < 0.6
    known[:2] = [True, False]
    labels = np.where(known, rng.integers(0, 5, size=n), -1)
    predicted = np.where(rng.random(n) < 0.7, labels, rng.integers(0, 5, size=n)).clip(0)
    correct = known & (predicted == labels)
    points = [(0.0, 0.0)]
    for threshold in np.sort(np.unique(confidence))[::-1]:
        accepted = confidence >= threshold
        points.append(
            ((accepted & ~known).sum() / (~known).sum(), (accepted & correct).sum() / known.sum())
        )
    fpr, ccr = map(np.array, zip(*points))
    expected = float(np.sum(np.diff(fpr) * (ccr[1:] + ccr[:-1]) / 2))
    assert metrics.oscr(confidence, predicted, labels, known) == pytest.approx(expected, abs=1e-12)


# --------------------------------------------------------------------------------------------------
# Verification


def test_verification_pairs_are_complete_valid_and_seeded():
    identities = np.repeat(np.arange(6), [2, 3, 4, 5, 1, 3])
    a, b, same = metrics.verification_pairs(identities, seed=3, impostors_per_genuine=2)
    n_genuine = sum(c * (c - 1) // 2 for c in (2, 3, 4, 5, 1, 3))
    assert same.sum() == n_genuine and (~same).sum() == 2 * n_genuine
    assert np.all(a < b)
    np.testing.assert_array_equal(identities[a] == identities[b], same)
    assert len({(i, j) for i, j in zip(a, b)}) == len(a)  # no pair twice
    again = metrics.verification_pairs(identities, seed=3, impostors_per_genuine=2)
    for first, second in zip((a, b, same), again):
        np.testing.assert_array_equal(first, second)
    other_a, other_b, other_same = metrics.verification_pairs(
        identities, seed=4, impostors_per_genuine=2
    )
    np.testing.assert_array_equal(other_same, same)
    assert set(zip(a[~same], b[~same])) != set(zip(other_a[~same], other_b[~same]))
    # Caps: max_impostors, and every impostor pair when no per-genuine limit is set.
    *_, capped = metrics.verification_pairs(identities, seed=0, max_impostors=5)
    assert (~capped).sum() == 5
    *_, every = metrics.verification_pairs(identities, seed=0, impostors_per_genuine=None)
    n = len(identities)
    assert (~every).sum() == n * (n - 1) // 2 - n_genuine
    # String identities work too.
    names = np.array(["ann", "bob", "ann", "cy"])
    a, b, same = metrics.verification_pairs(names, seed=0, impostors_per_genuine=None)
    assert (a[same].tolist(), b[same].tolist()) == ([0], [2]) and (~same).sum() == 5


def test_verification_pairs_sampled_when_pairs_are_too_many_to_list():
    identities = np.repeat(np.arange(300), 10)  # 3000 samples: 4.5 million pairs
    a, b, same = metrics.verification_pairs(identities, seed=1, max_impostors=20_000)
    assert same.sum() == 300 * 45 and (~same).sum() == 13_500  # 1 per genuine, under the cap
    impostors = (a[~same], b[~same])
    assert np.all(identities[impostors[0]] != identities[impostors[1]])
    assert np.all(impostors[0] < impostors[1])
    assert len(set(zip(*impostors))) == 13_500
    again = metrics.verification_pairs(identities, seed=1, max_impostors=20_000)
    np.testing.assert_array_equal(a, again[0])
    np.testing.assert_array_equal(b, again[1])


def test_cosine_similarity_pairs():
    rng = np.random.default_rng()
    embeddings = rng.normal(size=(10, 8))
    a, b = rng.integers(0, 10, size=20), rng.integers(0, 10, size=20)
    expected = [
        embeddings[i]
        @ embeddings[j]
        / np.linalg.norm(embeddings[i])
        / np.linalg.norm(embeddings[j])
        for i, j in zip(a, b)
    ]
    np.testing.assert_allclose(metrics.cosine_similarity_pairs(embeddings, a, b), expected)
    with pytest.raises(ValueError, match="index_b"):
        metrics.cosine_similarity_pairs(embeddings, a, b + 10)


def test_best_threshold_hand_case():
    # Genuine at 0.9, 0.6, 0.2; impostors at 0.5, 0.3, 0.1. Accepting >= 0.6 misses one genuine
    # (5/6 right); accepting >= 0.2 lets two impostors in (4/6); so the cut is midway 0.5 -- 0.6.
    threshold, accuracy = metrics.best_threshold([0.9, 0.6, 0.2, 0.5, 0.3, 0.1], [1, 1, 1, 0, 0, 0])
    assert threshold == pytest.approx(0.55) and accuracy == pytest.approx(5 / 6)
    # A tie between cuts goes to the lowest: with genuines 0.9, 0.6 and impostors 0.5, 0.1,
    # accepting >= 0.2 ... 0.6 are all right; accepting everything and nothing are both 1/2.
    threshold, accuracy = metrics.best_threshold([0.9, 0.6, 0.5, 0.1], [1, 1, 0, 0])
    assert threshold == pytest.approx(0.55) and accuracy == 1.0
    threshold, accuracy = metrics.best_threshold([0.9, 0.1], [1, 1])
    assert threshold == -math.inf and accuracy == 1.0
    # Balanced: with genuines 0.9, 0.6, 0.2 and impostors 0.5, 0.1, accepting >= 0.2 is 4/5 of the
    # pairs right but only (1 + 1/2) / 2 = 0.75 balanced; accepting >= 0.6 is (2/3 + 1) / 2.
    threshold, accuracy = metrics.best_threshold([0.9, 0.6, 0.2, 0.5, 0.1], [1, 1, 1, 0, 0])
    assert threshold == pytest.approx(0.55) and accuracy == pytest.approx(5 / 6)


def test_verification_metrics_perfectly_separable():
    rng = np.random.default_rng()
    genuine = rng.uniform(0.6, 1.0, size=300)
    impostor = rng.uniform(-1.0, 0.4, size=1200)
    similarity = np.r_[genuine, impostor]
    same = np.r_[np.ones(300, bool), np.zeros(1200, bool)]
    result = metrics.verification_metrics(similarity, same)
    assert result["accuracy"] == 1.0 and result["accuracy_std"] == 0.0
    assert result["auc"] == 1.0 and result["eer"] == 0.0
    assert result["tar@far=1e-1"] == 1.0 and result["tar@far=1e-2"] == 1.0
    assert result["tar@far=1e-3"] == 1.0 and result["resolvable@far=1e-3"] == 1.0
    assert 0.4 < result["threshold"] < 0.6
    assert (result["n_genuine"], result["n_impostor"]) == (300.0, 1200.0)


def test_verification_metrics_on_random_similarities_is_chance():
    rng = np.random.default_rng()
    similarity = rng.uniform(-1, 1, size=4000)
    same = np.arange(4000) % 2 == 0
    result = metrics.verification_metrics(similarity, same)
    assert abs(result["accuracy"] - 0.5) < 0.05
    assert abs(result["auc"] - 0.5) < 0.05
    assert abs(result["eer"] - 0.5) < 0.05


def test_verification_accuracy_is_balanced_always_different_scores_one_half():
    # The counts: 1,971 genuine against 73,107 impostor pairs. A scorer that calls every
    # pair "different" (one similarity for all: no threshold separates anything) was 0.974.
    same = np.r_[np.ones(1971, bool), np.zeros(73107, bool)]
    assert metrics.balanced_accuracy(np.zeros(len(same), bool), same) == 0.5
    assert np.mean(~same) == pytest.approx(0.974, abs=5e-4)  # what the plain accuracy says
    result = metrics.verification_metrics(np.full(len(same), 0.3), same)
    assert result["accuracy"] == 0.5 and result["auc"] == 0.5
    # Random scores on unbalanced pairs: chance is 0.5 whatever the ratio, and the accuracy does
    # not sit above the AUC.
    rng = np.random.default_rng()
    similarity = rng.uniform(-1, 1, size=len(same))
    result = metrics.verification_metrics(similarity, same)
    assert abs(result["accuracy"] - 0.5) < 0.03 and abs(result["auc"] - 0.5) < 0.03
    # Against a direct computation: the mean of the genuine and impostor accuracies.
    accepted = rng.random(len(same)) < 0.3
    expected = (np.mean(accepted[same]) + np.mean(~accepted[~same])) / 2
    assert metrics.balanced_accuracy(accepted, same) == pytest.approx(expected, abs=1e-12)


def test_verification_metrics_with_given_folds():
    rng = np.random.default_rng()
    same = np.arange(400) % 4 == 0
    similarity = rng.normal(size=400) + same
    fold_of = np.arange(400) // 40
    result = metrics.verification_metrics(similarity, same, fold_of=fold_of)
    accuracies = []
    for fold in range(10):
        test = fold_of == fold
        threshold, _ = metrics.best_threshold(similarity[~test], same[~test])
        accuracies.append(metrics.balanced_accuracy(similarity[test] >= threshold, same[test]))
    assert result["accuracy"] == pytest.approx(np.mean(accuracies), abs=1e-12)
    with pytest.raises(ValueError, match="fold_of"):
        metrics.verification_metrics(similarity, same, fold_of=np.zeros(400, int))


def test_equal_error_rate_symmetric_cases():
    # Hand case: genuine 0.9 0.8 0.7 0.3, impostor 0.5 0.1 0.0 -0.1: accepting >= 0.5 lets one
    # impostor in (FPR 1/4) and keeps one genuine out (FNR 1/4): EER = 0.25.
    similarity = [0.9, 0.8, 0.7, 0.3, 0.5, 0.1, 0.0, -0.1]
    same = [1, 1, 1, 1, 0, 0, 0, 0]
    assert metrics.verification_metrics(similarity, same, folds=2)["eer"] == pytest.approx(0.25)
    # Mirror-symmetric scores (impostor = -genuine): at threshold 0 FPR = FNR = P(genuine < 0).
    rng = np.random.default_rng()
    genuine = rng.normal(1.0, 1.0, size=501)
    result = metrics.verification_metrics(np.r_[genuine, -genuine], np.r_[[1] * 501, [0] * 501])
    assert result["eer"] == pytest.approx(np.mean(genuine < 0), abs=1e-12)


def test_tar_at_far_against_direct_computation():
    rng = np.random.default_rng()
    genuine = rng.normal(0.5, 0.2, size=400)
    impostor = np.round(rng.normal(0.0, 0.2, size=3000), 2)  # ties among impostors
    similarity = np.r_[genuine, impostor]
    same = np.r_[np.ones(400, bool), np.zeros(3000, bool)]
    result = metrics.verification_metrics(similarity, same)
    for far in (1e-1, 1e-2, 1e-3):
        best = 0.0
        for threshold in np.r_[np.unique(similarity), np.inf]:
            if np.mean(impostor >= threshold) <= far:
                best = max(best, np.mean(genuine >= threshold))
        assert result[f"tar@{metrics.far_key(far)}"] == pytest.approx(best), far


def test_far_below_resolution_is_flagged():
    rng = np.random.default_rng()
    similarity = rng.normal(size=600)
    same = np.arange(600) < 100  # 500 impostor pairs: FAR 1e-3 needs 1000
    result = metrics.verification_metrics(similarity, same)
    assert math.isnan(result["tar@far=1e-3"]) and result["resolvable@far=1e-3"] == 0.0
    assert not math.isnan(result["tar@far=1e-2"]) and result["resolvable@far=1e-2"] == 1.0


def test_verification_accuracy_deterministic_for_seed():
    rng = np.random.default_rng()
    similarity, same = rng.normal(size=500) + (np.arange(500) < 250), np.arange(500) < 250
    first = metrics.verification_metrics(similarity, same, seed=7)
    assert first == metrics.verification_metrics(similarity, same, seed=7)
    with pytest.raises(ValueError, match="folds"):
        metrics.verification_metrics(similarity, same, folds=1)


def test_read_pairs_file(tmp_path):
    names = [f"faces/{p}/{p}_{i:04d}.jpg" for p in ("Ann_A", "Bob_B") for i in (1, 2, 3)]
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("1\t3\nAnn_A\t1\t3\nBob_B 2 3\nAnn_A 2 Bob_B 1\n")
    a, b, same = metrics.read_pairs_file(pairs, names)
    assert a.tolist() == [0, 4, 1] and b.tolist() == [2, 5, 3]
    assert same.tolist() == [True, True, False]
    pairs.write_text("Ann_A 1 3\nAnn_A 1 Cy_C 1\n")
    with pytest.raises(ValueError, match=r"pairs.txt:2.*Cy_C_0001"):
        metrics.read_pairs_file(pairs, names)
    with pytest.raises(ValueError, match="missing.txt"):
        metrics.read_pairs_file(tmp_path / "missing.txt", names)


def test_parse_pairs_file_keeps_the_files_folds_and_refuses_one_sided_files(tmp_path):
    pairs = tmp_path / "pairs.txt"
    lines = ["2\t2", "Ann_A\t1\t2", "Bob_B 1 3", "Ann_A 1 Bob_B 2", "Ann_A 2 Cy_C 1"]
    lines += ["Cy_C 1 2", "Bob_B 2 3", "Bob_B 1 Cy_C 2", "Cy_C 1 Ann_A 3"]
    pairs.write_text("\n".join(lines) + "\n")
    parsed = metrics.parse_pairs_file(pairs)
    assert parsed.fold_of.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert parsed.same.tolist() == [True, True, False, False] * 2
    assert parsed.first[2:4] == ("Ann_A_0001", "Ann_A_0002")
    assert parsed.second[2:4] == ("Bob_B_0002", "Cy_C_0001")
    assert parsed.people[3] == ("Ann_A", "Cy_C") and parsed.lines[0] == 2
    pairs.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(ValueError, match=r"header says 2 folds of 2 .* holds 7 pairs"):
        metrics.parse_pairs_file(pairs)
    for kept, kind in ((lines[1:3], "genuine"), (lines[3:5], "impostor")):
        pairs.write_text("\n".join(kept) + "\n")
        with pytest.raises(ValueError, match=f"holds only {kind} pairs \\(2\\)"):
            metrics.parse_pairs_file(pairs)


def test_brier_score_is_sklearns_multiclass_score_at_every_class_count():
    rng = np.random.default_rng()
    for k in (2, 3, 9):
        probs = metrics.softmax(rng.normal(size=(40, k)) * 3)
        labels = rng.integers(0, k, size=40)
        direct = np.mean(np.sum((probs - np.eye(k)[labels]) ** 2, axis=1))
        assert metrics.brier_score(probs, labels) == pytest.approx(direct, rel=1e-12)
    # One class: sklearn would read the column as a binary probability; ours is (1 - p)^2.
    assert metrics.brier_score([[1.0], [0.5]], [0, 0]) == pytest.approx(0.125)
    # A float32 probability rounded just above 1 counts as 1; rows need not sum to 1.
    assert metrics.brier_score(np.float32([[1.0000001, 0.0]]), [0]) == 0.0
    assert metrics.brier_score([[0.5, 0.5], [0.2, 0.2]], [0, 1]) == pytest.approx(
        (0.5 + 0.64 + 0.04) / 2
    )


def test_open_set_rates_hand_case():
    # Known: right and accepted, wrong and accepted, right but rejected; unknown: one accepted,
    # three rejected. Threshold 0.5.
    confidence = [0.9, 0.8, 0.3, 0.7, 0.2, 0.1, 0.4]
    predicted = [1, 2, 0, 1, 1, 1, 1]
    labels = [1, 0, 0, -1, -1, -1, -1]
    known = [True, True, True, False, False, False, False]
    rates = metrics.open_set_rates(confidence, predicted, labels, known, 0.5)
    assert rates["known_acceptance"] == pytest.approx(2 / 3)
    assert rates["unknown_rejection"] == pytest.approx(3 / 4)
    assert rates["open_set_balanced_accuracy"] == pytest.approx((1 / 3 + 3 / 4) / 2)
    # The original's accuracy counts images, so the three-to-four mix weighs it: 4 of 7 right.
    assert metrics.open_set_accuracy(confidence, predicted, labels, known, 0.5) == pytest.approx(
        4 / 7
    )
    with pytest.raises(ValueError, match="known"):
        metrics.open_set_rates(confidence, predicted, labels, [True] * 7, 0.5)


def test_threshold_at_far_accepts_at_most_that_share_of_negatives():
    rng = np.random.default_rng()
    negatives = np.round(rng.normal(size=997), 2)  # ties
    for far in (0.001, 0.01, 0.05, 0.3):
        threshold = metrics.threshold_at_far(negatives, far)
        assert np.mean(negatives >= threshold) <= far
        # The next lower candidate (the highest negative still rejected) would accept too many.
        below = negatives[negatives < threshold].max()
        assert np.mean(negatives >= below) > far
    assert metrics.threshold_at_far(negatives, 1.0) == negatives.min()
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="far"):
            metrics.threshold_at_far(negatives, bad)
    with pytest.raises(ValueError, match="empty"):
        metrics.threshold_at_far([], 0.1)
