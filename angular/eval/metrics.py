"""Every evaluation metric under one name, for ``from angular.eval import metrics``.

The metrics live in the modules of their kind: input validation in :mod:`angular.eval.checks`,
probabilities in :mod:`angular.eval.classification`, calibration (NLL, Brier, ECE) in
:mod:`angular.eval.calibration`, ROC curves in :mod:`angular.eval.roc`, open-set metrics in
:mod:`angular.eval.open_set`, pairs in :mod:`angular.eval.pairs`, verification in
:mod:`angular.eval.verification`, insightface's ``.bin`` protocol in :mod:`angular.eval.bins` and
IJB-style templates in :mod:`angular.eval.templates`. This module only re-exports them (it imports
each of those modules; import the one you need where start-up time matters).
"""

from __future__ import annotations

from angular.eval.bins import bin_metrics
from angular.eval.calibration import (
    brier_score,
    confidence_calibration_error,
    expected_calibration_error,
    nll,
    reliability_bins,
)
from angular.eval.checks import (
    as_array,
    as_bool_array,
    as_float_array,
    as_int_array,
    check_probs_labels,
    check_same_length,
    check_scores_labels,
)
from angular.eval.classification import PROB_FLOOR, log_softmax, softmax, top1_accuracy
from angular.eval.open_set import (
    open_set_accuracy,
    open_set_auroc,
    open_set_rates,
    oscr,
    oscr_curve,
    threshold_at_known_rate,
)
from angular.eval.pairs import (
    MAX_IMPOSTOR_PAIRS,
    PairsFile,
    parse_pairs_file,
    read_pairs_file,
    verification_pairs,
)
from angular.eval.roc import roc_auc, roc_curve, threshold_at_far
from angular.eval.templates import pool_templates, template_verification
from angular.eval.verification import (
    DEFAULT_FARS,
    balanced_accuracy,
    best_threshold,
    cosine_similarity_pairs,
    far_key,
    thresholds_at_far,
    verification_metrics,
)

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
    "oscr_curve",
    "verification_pairs",
    "read_pairs_file",
    "parse_pairs_file",
    "PairsFile",
    "balanced_accuracy",
    "cosine_similarity_pairs",
    "best_threshold",
    "verification_metrics",
    "thresholds_at_far",
    "far_key",
    "bin_metrics",
    "pool_templates",
    "template_verification",
    "DEFAULT_FARS",
    "MAX_IMPOSTOR_PAIRS",
    "PROB_FLOOR",
    "as_array",
    "as_float_array",
    "as_int_array",
    "as_bool_array",
    "check_same_length",
    "check_scores_labels",
    "check_probs_labels",
]
