"""Evaluation of trained models (docs/design.md, Pipeline: evaluate): every head and every ensemble
rule on the test and unknown images, and verification on pairs of images.

:func:`evaluate_models` takes what the models computed (``SplitOutputs`` of
:mod:`angular.serve.inference`: the val, test and unknown images per item) and each head's
calibrated temperature. For each head
and each rule of ``evaluate.rules`` (:mod:`angular.eval.ensemble`):

- ``closed_set_accuracy``: top-1 on the test images (known identities);
- ``open_set_accuracy``: the original's rule on test + unknown images at ``threshold`` (fixed, or
  chosen on val so that ``evaluate.known_rate`` of the known validation images are accepted), with
  ``known_acceptance``, ``unknown_rejection`` and ``open_set_balanced_accuracy``
  (:func:`angular.eval.open_set.open_set_rates`); the same four ``@unknown_far``, at the threshold
  accepting ``evaluate.unknown_far`` of the unknown images
  (:func:`angular.eval.open_set.open_set_at_unknown_far`);
- ``mean_prob`` and ``sum_log_prob``: with their own ``temperature`` fitted on val
  (``ece_uncalibrated``: before it);
- ``open_set_auroc`` (known vs unknown by confidence) and ``oscr``;
- ``ece`` (and ``nll``) of the calibrated probabilities on test; heads also ``ece_uncalibrated``.

Verification (LFW protocol, :func:`angular.eval.verification.verification_metrics`: 10-fold
accuracy with the threshold chosen on the other folds, ROC AUC, EER, TAR at each FAR of
``evaluate.verification.fars`` (default 1e-1, 1e-2, 1e-3), flagged when the impostor pairs are too
few to resolve a FAR) on pairs of unknown images and
pairs of test images (every genuine pair and a seeded sample of impostor pairs,
``evaluate.verification``), and on the pairs of an LFW-style ``pairs_file`` when one is given (:func:`angular.eval.pairs.
pairs_of_file`), by each item's embedding and by the ``ensemble`` of their concatenated normalised
embeddings.

insightface's verification sets (``evaluate.verification.bins``; ``bins`` of
:func:`evaluate_models`): :func:`angular.eval.bins.bin_metrics` (insightface's 10-fold protocol with
the flip test, AUC, EER, TAR at ``evaluate.verification.fars``) of each item's embedding and of the
``ensemble`` (the items' flip-test unit embeddings concatenated), under ``bins/<file stem>``; the key
is absent without sets.

Plots (ROC, open-set confusion and reliability per head and rule, verification ROC, t-SNE of the
embeddings) go to ``plots_dir``; the metrics come back as one JSON-ready dictionary.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from angular.eval import plots
from angular.eval.bins import bin_metrics, flip_embeddings
from angular.eval.calibration import (
    expected_calibration_error,
    fit_probability_temperature,
    nll,
    temper,
)
from angular.eval.classification import softmax
from angular.eval.ensemble import combine, select_members
from angular.eval.open_set import (
    open_set_accuracy,
    open_set_at_unknown_far,
    open_set_auroc,
    open_set_rates,
    oscr,
    threshold_at_known_rate,
    unknown_halves,
)
from angular.eval.pairs import ExternalPairs, verification_pairs
from angular.eval.roc import roc_curve
from angular.eval.verification import (
    cosine_similarity_pairs,
    thresholds_at_far,
    unit_rows,
    verification_metrics,
)

__all__ = ["SPLITS", "TEMPERED_RULES", "BinEmbeddings", "evaluate_models", "json_ready", "scores"]

SPLITS = ("val", "test", "unknown")
# Rules whose distribution gets a temperature of its own, fitted on validation: the mean of
# calibrated heads is under-confident where they disagree, their product over-confident. (vote's
# distribution is built around the vote's confidence, max_conf's is one calibrated head's.)
TEMPERED_RULES = ("mean_prob", "sum_log_prob")
# One verification set as an item's model embedded it (angular.train.bins.embed_bins): its pairs'
# same-ness (P,), the (2P, D) embeddings of its images and those of their mirrors.
BinEmbeddings = tuple[np.ndarray, np.ndarray, np.ndarray]


def evaluate_models(
    outputs: Mapping[str, Mapping[str, object]],
    temperatures: Mapping[str, Mapping[str, float]],
    classes: list[str],
    config,
    plots_dir: Path,
    *,
    file_pairs: tuple | None = None,
    external: ExternalPairs | None = None,
    external_embeddings: Mapping[str, np.ndarray] | None = None,
    bins: Mapping[str, Mapping[str, BinEmbeddings]] | None = None,
) -> dict:
    """The metrics of every head, every ensemble rule and every embedding (see the module doc).

    ``outputs``: item -> split (:data:`SPLITS`) -> the item's ``SplitOutputs``, items in the
    order of ``train.items``; ``temperatures``: item -> its heads' temperatures, in the order of
    the model's heads; ``config``: ``evaluate`` of the params. ``file_pairs`` (pairs among the
    test + unknown images) or ``external`` with ``external_embeddings`` (item -> embeddings of
    ``external.paths``): :func:`angular.eval.pairs.pairs_of_file`. ``bins``: item -> set (file
    stem) -> :data:`BinEmbeddings`, every item with the same sets (None, or no sets: no ``bins``
    key). Writes the plots to
    ``plots_dir``; returns the metrics, JSON-ready (:func:`json_ready`)."""
    first = outputs[next(iter(outputs))]  # every item ran on the same images
    labels = {split: first[split].labels for split in SPLITS}
    member_probs, raw_probs_test, owner = _member_probabilities(outputs, temperatures)

    # Members far below the best on validation (a collapsed head) stay out of the ensembles; the
    # test split plays no part in this choice.
    val_accuracy = {
        name: float(np.mean(probs["val"].argmax(axis=1) == labels["val"]))
        for name, probs in member_probs.items()
    }
    included = select_members(val_accuracy, config.members.rule, config.members.threshold)
    ensemble_members = [name for name in member_probs if included[name]]
    halves = unknown_halves(first["unknown"].identities, config.verification.seed)
    heads, ensembles = _classification_results(
        member_probs, raw_probs_test, ensemble_members, labels, halves, classes, config, plots_dir
    )
    results = {
        "heads": heads,
        "ensembles": ensembles,
        "members": {
            name: {"val_accuracy": val_accuracy[name], "in_ensemble": included[name]}
            for name in member_probs
        },
    }
    # The ensemble's embedding concatenates the items that kept a member in the ensemble.
    kept_items = [item for item in outputs if any(owner[m] == item for m in ensemble_members)]
    results["verification"] = _verification_results(
        outputs, kept_items, config, plots_dir, file_pairs, external, external_embeddings
    )
    stems = list(bins[next(iter(bins))]) if bins else []
    if stems:
        results["bins"] = {
            stem: _bin_results({item: bins[item][stem] for item in bins}, kept_items, config)
            for stem in stems
        }
    if config.embedding_plot and len(labels["unknown"]) > 0:
        for item in outputs:
            test, unknown = outputs[item]["test"], outputs[item]["unknown"]
            plots.embedding_plot(
                np.concatenate([test.embeddings, unknown.embeddings]),
                np.asarray(test.identities + unknown.identities),
                np.r_[np.ones(len(test.labels), bool), np.zeros(len(unknown.labels), bool)],
                plots_dir / f"embeddings_{item}.png",
                f"{item}: t-SNE of test (dots) and unknown (crosses) embeddings",
                seed=config.verification.seed,
            )
    return json_ready(results)


def _member_probabilities(outputs, temperatures):
    """``(probs, raw_test_probs, owner)`` of each head: its calibrated probabilities per split, its
    test probabilities at T = 1, and the item it belongs to."""
    member_probs: dict[str, dict[str, np.ndarray]] = {}
    raw_probs_test: dict[str, np.ndarray] = {}
    owner: dict[str, str] = {}
    for item, item_temperatures in temperatures.items():
        for member, temperature in item_temperatures.items():
            logits = {split: outputs[item][split].logits[member] for split in SPLITS}
            member_probs[member] = {s: softmax(logits[s], temperature) for s in SPLITS}
            raw_probs_test[member] = softmax(logits["test"])
            owner[member] = item
    return member_probs, raw_probs_test, owner


def _classification_results(
    member_probs, raw_probs_test, ensemble_members, labels, halves, classes, config, plots_dir
) -> tuple[dict, dict]:
    """``(heads, ensembles)``: the :func:`scores` of each head and each rule of ``config.rules``
    (with ``ece_uncalibrated``, and a tempered rule's ``temperature``); writes the reliability and
    confusion plots of each and the open-set ROC of all."""
    heads, ensembles = {}, {}
    combined, ensemble_temperature = _ensembles(
        member_probs, ensemble_members, labels, config, len(classes)
    )
    roc_curves = {}
    for name, (probs, predicted, confidence) in _candidates(member_probs, combined).items():
        result = scores(probs, predicted, confidence, labels, config, halves)
        if name in member_probs:
            result["ece_uncalibrated"] = expected_calibration_error(
                raw_probs_test[name], labels["test"], config.n_bins
            )
            heads[name] = result
        else:
            rule = name.removeprefix("ensemble_")
            if rule in ensemble_temperature:
                temperature, untempered = ensemble_temperature[rule]
                result["temperature"] = temperature
                result["ece_uncalibrated"] = expected_calibration_error(
                    untempered, labels["test"], config.n_bins
                )
            ensembles[rule] = result
        _plots_for(
            name, predicted, confidence, labels, result["threshold"], classes, config, plots_dir
        )
        if len(labels["unknown"]) > 0:
            conf = np.concatenate([confidence["test"], confidence["unknown"]])
            known = np.concatenate([labels["test"], labels["unknown"]]) >= 0
            fpr, tpr, _ = roc_curve(conf, known)
            roc_curves[name] = (fpr, tpr)
    if roc_curves:
        plots.roc_plot(
            roc_curves,
            plots_dir / "roc_open_set.png",
            "Known vs unknown by confidence (test + unknown images)",
            xlabel="unknown images accepted (FPR)",
            ylabel="known images accepted (TPR)",
        )
    return heads, ensembles


def _ensembles(member_probs, ensemble_members, labels, config, n_classes):
    """``{"ensemble_<rule>": {split: (probs, predicted, confidence)}}`` of each rule of
    ``config.rules`` over ``ensemble_members``, and ``{rule: (temperature, untempered test
    probabilities)}`` of the :data:`TEMPERED_RULES`."""
    ensembles, ensemble_temperature = {}, {}
    for rule in config.rules:
        stacked = {}
        for split in SPLITS:
            if len(labels[split]) == 0:  # no unknown identities: nothing to combine
                empty = np.zeros(0)
                stacked[split] = (np.zeros((0, n_classes)), empty.astype(np.int64), empty)
                continue
            predicted, confidence, probs = combine(
                [member_probs[m][split] for m in ensemble_members], rule
            )
            stacked[split] = (probs, predicted, confidence)
        if rule in TEMPERED_RULES:
            stacked, ensemble_temperature[rule] = _tempered(stacked, labels)
        ensembles[f"ensemble_{rule}"] = stacked
    return ensembles, ensemble_temperature


def _candidates(member_probs, ensembles) -> dict:
    """Each head's and each ensemble's ``(probs, predicted, confidence)``, each a dict by split."""
    candidates = {}
    for name, probs in member_probs.items():
        predicted = {s: p.argmax(axis=1) for s, p in probs.items()}
        confidence = {s: p.max(axis=1) for s, p in probs.items()}
        candidates[name] = (probs, predicted, confidence)
    for name, entry in ensembles.items():
        probs = {s: v[0] for s, v in entry.items()}
        predicted = {s: v[1] for s, v in entry.items()}
        confidence = {s: v[2] for s, v in entry.items()}
        candidates[name] = (probs, predicted, confidence)
    return candidates


def scores(
    probs: dict[str, np.ndarray],
    predicted: dict[str, np.ndarray],
    confidence: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    config,
    halves: np.ndarray | None = None,
) -> dict[str, float]:
    """The metrics of one head or rule from its per-split probabilities / predictions; ``halves``:
    :func:`angular.eval.open_set.unknown_halves` of the unknown images (None: no threshold at
    ``unknown_far``)."""
    result = {
        "closed_set_accuracy": float(np.mean(predicted["test"] == labels["test"])),
        "ece": expected_calibration_error(probs["test"], labels["test"], config.n_bins),
        "nll": nll(probs["test"], labels["test"]),
    }
    if config.threshold is None:
        threshold = threshold_at_known_rate(confidence["val"], config.known_rate)
    else:
        threshold = config.threshold
    result["threshold"] = threshold
    if len(labels["unknown"]):
        conf = np.concatenate([confidence["test"], confidence["unknown"]])
        pred = np.concatenate([predicted["test"], predicted["unknown"]])
        lab = np.concatenate([labels["test"], labels["unknown"]])
        known = lab >= 0
        result["open_set_accuracy"] = open_set_accuracy(conf, pred, lab, known, threshold)
        result.update(open_set_rates(conf, pred, lab, known, threshold))
        result["open_set_auroc"] = open_set_auroc(conf, known)
        result["oscr"] = oscr(conf, pred, lab, known)
        if halves is not None:
            result.update(open_set_at_unknown_far(conf, pred, lab, halves, config.unknown_far))
    return result


def _tempered(stacked: dict, labels: dict) -> tuple[dict, tuple[float, np.ndarray]]:
    """The ensemble's ``(probs, predicted, confidence)`` per split with its own temperature
    (fitted on the validation split), and ``(temperature, untempered test probabilities)``."""
    temperature = fit_probability_temperature(stacked["val"][0], labels["val"])
    tempered = {}
    for split, (probs, predicted, _) in stacked.items():
        probs = temper(probs, temperature) if len(probs) else probs
        tempered[split] = (probs, predicted, probs.max(axis=1) if len(probs) else probs[:, 0])
    return tempered, (temperature, stacked["test"][0])


def _plots_for(name, predicted, confidence, labels, threshold, classes, config, plots_dir):
    plots.reliability_diagram(
        confidence["test"],
        predicted["test"] == labels["test"],
        plots_dir / f"reliability_{name}.png",
        f"{name}: test images, calibrated",
        n_bins=config.n_bins,
    )
    # Open-set confusion: unknown identities as a class, rejected predictions as "unknown".
    lab = np.concatenate([labels["test"], labels["unknown"]])
    conf = np.concatenate([confidence["test"], confidence["unknown"]])
    pred = np.concatenate([predicted["test"], predicted["unknown"]])
    pred = np.where(conf >= threshold, pred, -1)
    plots.confusion_plot(
        lab,
        pred,
        classes,
        plots_dir / f"confusion_{name}.png",
        f"{name}: test + unknown, threshold {threshold:.3g}",
    )


def _drawn_pairs(identities, config):
    """All genuine pairs and a seeded sample of impostor pairs of one split (None: too few)."""
    v = config.verification
    if len(set(identities)) < 2 or len(identities) < 2 * v.folds:
        return None
    a, b, same = verification_pairs(
        np.asarray(identities),
        seed=v.seed,
        max_impostors=v.max_impostors,
        impostors_per_genuine=v.impostors_per_genuine,
    )
    if same.all() or not same.any() or len(same) < v.folds:
        return None
    return a, b, same, None


def _verification_results(
    outputs, kept_items, config, plots_dir, file_pairs, external, external_embeddings
) -> dict:
    """Verification of one embedding per item, plus the ``ensemble`` (the normalised embeddings
    of ``kept_items``, concatenated), on each set of pairs; writes each set's ROC plot."""
    first = next(iter(outputs))  # every item ran on the same images
    pair_sets = {}
    embeddings_of = {}
    for split in ("unknown", "test"):
        embeddings = {item: outputs[item][split].embeddings for item in outputs}
        embeddings_of[split] = embeddings
        pairs = _drawn_pairs(outputs[first][split].identities, config)
        if pairs is not None:
            pair_sets[split] = (embeddings, pairs, f"pairs of {split} images")
    if file_pairs is not None:
        embeddings = {
            item: np.concatenate([embeddings_of["test"][item], embeddings_of["unknown"][item]])
            for item in outputs
        }
        pair_sets["pairs_file"] = (embeddings, file_pairs, config.verification.pairs_file)
    if external is not None:
        pair_sets["pairs_file"] = (
            external_embeddings,
            external.pairs,
            f"{config.verification.pairs_file} "
            f"({external.dropped} pairs of trained people dropped)",
        )
    results = {}
    for split, (embeddings, pairs, description) in pair_sets.items():
        if len(embeddings) > 1:
            kept = [unit_rows(embeddings[item]) for item in kept_items]
            embeddings = embeddings | {"ensemble": np.concatenate(kept, axis=1)}
        found, curves = _verification(embeddings, pairs, config)
        if split == "pairs_file" and external is not None:
            for values in found.values():
                values["n_dropped_trained_identity"] = float(external.dropped)
        results[split] = found
        plots.roc_plot(
            curves,
            plots_dir / f"verification_roc_{split}.png",
            f"Verification on {description}",
            log_x=True,
            xlabel="false accept rate",
            ylabel="true accept rate",
        )
    return results


def _verification(embeddings: dict[str, np.ndarray], pairs, config):
    """Verification metrics and ROC curves of each embedding on pairs ``(index_a, index_b, same,
    fold_of)``."""
    a, b, same, fold_of = pairs
    results, curves = {}, {}
    for name, embedding in embeddings.items():
        similarity = cosine_similarity_pairs(embedding, a, b)
        results[name] = verification_metrics(
            similarity,
            same,
            folds=config.verification.folds,
            seed=config.verification.seed,
            fars=config.verification.fars,
            fold_of=fold_of,
        )
        fars = sorted({*config.verification.fars, config.verification.gallery_far}, reverse=True)
        results[name].update(thresholds_at_far(similarity, same, fars))
        fpr, tpr, _ = roc_curve(similarity, same)
        curves[name] = (fpr, tpr)
    return results, curves


def _bin_results(embedded: Mapping[str, BinEmbeddings], kept_items, config) -> dict:
    """:func:`angular.eval.bins.bin_metrics` of one set (item -> :data:`BinEmbeddings`) for each
    item's embedding and, with more than one item, the ``ensemble`` of ``kept_items``."""
    fars, folds = config.verification.fars, config.verification.folds
    results = {
        item: bin_metrics(embeddings, flipped, same, fars, folds)
        for item, (same, embeddings, flipped) in embedded.items()
    }
    if len(embedded) > 1:
        same = embedded[kept_items[0]][0]
        kept = [flip_embeddings(*embedded[item][1:]) for item in kept_items]
        results["ensemble"] = bin_metrics(np.concatenate(kept, axis=1), None, same, fars, folds)
    return results


def json_ready(value):
    """``value`` for JSON: numpy scalars to Python, NaN to null (dicts converted throughout)."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value
