"""Stage ``evaluate``: every trained head and every ensemble rule on the test and unknown images.

``python -m pipeline.evaluate``. For each head (with its calibrated temperature) and each rule of
``evaluate.rules`` (:mod:`angular.eval.ensemble`):

- ``closed_set_accuracy``: top-1 on the test images (known identities);
- ``open_set_accuracy``: the original's rule on test + unknown images at ``threshold`` (fixed, or
  chosen on val so that ``evaluate.known_rate`` of the known validation images are accepted), with
  ``known_acceptance``, ``unknown_rejection`` and ``open_set_balanced_accuracy``
  (:func:`angular.eval.metrics.open_set_rates`); the same four ``@unknown_far``, at the threshold
  accepting ``evaluate.unknown_far`` of the unknown images (:func:`unknown_halves`);
- ``mean_prob`` and ``sum_log_prob``: with their own ``temperature`` fitted on val
  (``ece_uncalibrated``: before it);
- ``open_set_auroc`` (known vs unknown by confidence) and ``oscr``;
- ``ece`` (and ``nll``) of the calibrated probabilities on test; heads also ``ece_uncalibrated``.

Verification (LFW protocol, :func:`angular.eval.metrics.verification_metrics`: 10-fold accuracy with the
threshold chosen on the other folds, ROC AUC, EER, TAR at FAR 1e-1, 1e-2, 1e-3, flagged when the
impostor pairs are too few to resolve a FAR) on pairs of unknown images and pairs of test images
(every genuine pair and a seeded sample of impostor pairs, ``evaluate.verification``), and on the
pairs of an LFW-style ``pairs_file`` when one is given (its own folds; with ``pairs_root``, its images
found under that folder and its pairs of trained people dropped: :func:`external_pairs`), by each
item's embedding and by the
``ensemble`` of their concatenated normalised embeddings; with ``flip_test`` each embedding adds
that of the mirrored image.

Writes one metrics file (``metrics/evaluate.json``), plots (``outputs/plots/evaluate/``: ROC, open-
set confusion and reliability per head and rule, verification ROC, t-SNE of the embeddings), and
``outputs/evaluate/``: ``<item>.npz`` (embeddings, logits, labels and identities of the val, test and
unknown images) and ``report.md`` (the main metrics as a table).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from angular.config import ConfigError, EvaluateConfig, load_params
from angular.data import read_manifest
from angular.eval import metrics as M
from angular.eval import plots
from angular.eval.calibration import fit_probability_temperature, temper
from angular.eval.ensemble import combine, select_members
from angular.files import atomic_write_text
from angular.nn.recognition import load_model
from angular.serve.inference import SplitOutputs, run_model
from angular.serve.mlflow_model import log_mlflow_model, register_model
from angular.train.loop import limit_threads
from angular.train.tracking import StageRun
from pipeline import (
    EVALUATE_DIR,
    EVALUATE_METRICS,
    EVALUATE_PLOTS_DIR,
    PREPARED_DIR,
    calibration_path,
    model_path,
    run_stage,
    stage_parser,
)

PARAM_KEYS = ("evaluate", "train.items", "data.crop")
EVAL_SPLITS = ("val", "test", "unknown")
MAIN_COLUMNS = (
    "closed_set_accuracy",
    "open_set_accuracy",
    "threshold",
    "open_set_auroc",
    "oscr",
    "ece",
    "ece_uncalibrated",
)


def _clean(value):
    """JSON-ready: numpy scalars to Python, NaN to null."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def _load_temperatures(item: str) -> dict[str, float]:
    path = calibration_path(item)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; run calibrate@{item} first (dvc repro)")
    return json.loads(path.read_text(encoding="utf-8"))["temperatures"]


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


def _at_unknown_far(confidence, predicted, labels, halves, far: float) -> dict[str, float]:
    """Open-set metrics at the threshold that accepts ``far`` of the unknown images: for each half
    of the unknown people, the threshold chosen on the other half, applied to the known test
    images and this half; the mean over the two halves."""
    known = labels >= 0
    in_first = np.zeros(len(labels), bool)
    in_first[~known] = halves
    found = []
    for half in (in_first, ~known & ~in_first):
        threshold = M.threshold_at_far(confidence[~known & ~half], far)
        keep = known | half
        args = (confidence[keep], predicted[keep], labels[keep], known[keep])
        found.append(
            {
                "threshold": threshold,
                "open_set_accuracy": M.open_set_accuracy(*args, threshold),
                **M.open_set_rates(*args, threshold),
            }
        )
    return {f"{key}@unknown_far": float(np.mean([f[key] for f in found])) for key in found[0]}


def scores(
    probs: dict[str, np.ndarray],
    predicted: dict[str, np.ndarray],
    confidence: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    config: EvaluateConfig,
    halves: np.ndarray | None = None,
) -> dict[str, float]:
    """The metrics of one head or rule from its per-split probabilities / predictions; ``halves``:
    :func:`unknown_halves` of the unknown images (None: no threshold at ``unknown_far``)."""
    result = {
        "closed_set_accuracy": float(np.mean(predicted["test"] == labels["test"])),
        "ece": M.expected_calibration_error(probs["test"], labels["test"], config.n_bins),
        "nll": M.nll(probs["test"], labels["test"]),
    }
    if config.threshold is None:
        threshold = M.threshold_at_known_rate(confidence["val"], config.known_rate)
    else:
        threshold = config.threshold
    result["threshold"] = threshold
    if len(labels["unknown"]):
        conf = np.concatenate([confidence["test"], confidence["unknown"]])
        pred = np.concatenate([predicted["test"], predicted["unknown"]])
        lab = np.concatenate([labels["test"], labels["unknown"]])
        known = lab >= 0
        result["open_set_accuracy"] = M.open_set_accuracy(conf, pred, lab, known, threshold)
        result.update(M.open_set_rates(conf, pred, lab, known, threshold))
        result["open_set_auroc"] = M.open_set_auroc(conf, known)
        result["oscr"] = M.oscr(conf, pred, lab, known)
        if halves is not None:
            result.update(_at_unknown_far(conf, pred, lab, halves, config.unknown_far))
    return result


# Rules whose distribution gets a temperature of its own, fitted on validation: the mean of
# calibrated heads is under-confident where they disagree, their product over-confident. (vote's
# distribution is built around the vote's confidence, max_conf's is one calibrated head's.)
TEMPERED_RULES = ("mean_prob", "sum_log_prob")


def _tempered(stacked: dict, labels: dict) -> tuple[dict, tuple[float, np.ndarray]]:
    """The ensemble's ``(probs, predicted, confidence)`` per split with its own temperature
    (fitted on the validation split), and ``(temperature, untempered test probabilities)``."""
    temperature = fit_probability_temperature(stacked["val"][0], labels["val"])
    tempered = {}
    for split, (probs, predicted, _) in stacked.items():
        probs = temper(probs, temperature) if len(probs) else probs
        tempered[split] = (probs, predicted, probs.max(axis=1) if len(probs) else probs[:, 0])
    return tempered, (temperature, stacked["test"][0])


def _plots_for(name, probs, predicted, confidence, labels, threshold, classes, n_bins) -> None:
    plots.reliability_diagram(
        confidence["test"],
        predicted["test"] == labels["test"],
        EVALUATE_PLOTS_DIR / f"reliability_{name}.png",
        f"{name}: test images, calibrated",
        n_bins=n_bins,
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
        EVALUATE_PLOTS_DIR / f"confusion_{name}.png",
        f"{name}: test + unknown, threshold {threshold:.3g}",
    )


def _drawn_pairs(identities, config: EvaluateConfig):
    """All genuine pairs and a seeded sample of impostor pairs of one split (None: too few)."""
    v = config.verification
    if len(set(identities)) < 2 or len(identities) < 2 * v.folds:
        return None
    a, b, same = M.verification_pairs(
        np.asarray(identities),
        seed=v.seed,
        max_impostors=v.max_impostors,
        impostors_per_genuine=v.impostors_per_genuine,
    )
    if same.all() or not same.any() or len(same) < v.folds:
        return None
    return a, b, same, None


def pair_names(paths, identities) -> list[str]:
    """The names a pairs file uses for these images: the file stem (LFW: ``Aaron_Peirsol_0001``),
    or ``<identity>_<n:04d>`` when the stem is a bare number (ORL: ``s1/3.pgm`` -> ``s1_0003``)."""
    names = []
    for path, identity in zip(paths, identities):
        stem = Path(path).stem
        names.append(f"{identity}_{int(stem):04d}" if stem.isdigit() else stem)
    return names


PAIRS_FILE_KEY = "evaluate.verification.pairs_file"
PAIRS_ROOT_KEY = "evaluate.verification.pairs_root"


def _pairs_from_file(config: EvaluateConfig, names):
    """``(index_a, index_b, same, fold_of)`` of the pairs file's pairs among ``names`` (the test
    and unknown images)."""
    path = config.verification.pairs_file
    try:
        parsed = M.parse_pairs_file(path)
        index_a, index_b, same = M.read_pairs_file(path, names)
    except ValueError as error:
        raise ConfigError(
            PAIRS_FILE_KEY,
            f"{error} (without {PAIRS_ROOT_KEY}, its pairs must name test or unknown images)",
        ) from None
    return index_a, index_b, same, parsed.fold_of


@dataclasses.dataclass(frozen=True)
class ExternalPairs:
    """A pairs file's pairs of images found under ``pairs_root`` (a benchmark such as LFW)."""

    paths: list[Path]  # each image once; the pairs index into it
    pairs: tuple  # (index_a, index_b, same, fold_of or None)
    dropped: int  # pairs that touched a known (training) identity


def external_pairs(config: EvaluateConfig, known_identities) -> ExternalPairs:
    """Read the pairs file, drop its pairs that touch a known identity, and find each image that
    is left under ``pairs_root``: every problem is an error here, before any image is embedded."""
    v = config.verification
    try:
        parsed = M.parse_pairs_file(v.pairs_file)
    except ValueError as error:
        raise ConfigError(PAIRS_FILE_KEY, str(error)) from None
    known = set(known_identities)
    keep = np.array([a not in known and b not in known for a, b in parsed.people], bool)
    dropped = int((~keep).sum())
    same = parsed.same[keep]
    if same.all() or not same.any():
        left = f"{int(same.sum())} genuine and {int((~same).sum())} impostor"
        raise ConfigError(
            PAIRS_FILE_KEY,
            f"{dropped} of its {len(keep)} pairs touch an identity the models were trained on and "
            f"are dropped, which leaves {left} pairs: verification needs both",
        )
    root = Path(v.pairs_root)
    if not root.is_dir():
        raise ConfigError(PAIRS_ROOT_KEY, f"{root} is not a folder")
    found: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            found.setdefault(path.stem, path)
    kept = np.flatnonzero(keep)
    names = sorted({name for i in kept for name in (parsed.first[i], parsed.second[i])})
    missing = [name for name in names if name not in found]
    if missing:
        listed = ", ".join(missing[:10]) + (
            f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        )
        raise ConfigError(
            PAIRS_ROOT_KEY,
            f"{len(missing)} image(s) of {v.pairs_file} are not under {root} (looked for "
            f"<name>_<NNNN>.<any extension> in every sub-folder): {listed}",
        )
    index_of = {name: index for index, name in enumerate(names)}
    index_a = np.array([index_of[parsed.first[i]] for i in kept], np.int64)
    index_b = np.array([index_of[parsed.second[i]] for i in kept], np.int64)
    fold_of = None if parsed.fold_of is None else parsed.fold_of[keep]
    return ExternalPairs(
        [found[name] for name in names], (index_a, index_b, same, fold_of), dropped
    )


def _verification(embeddings: dict[str, np.ndarray], pairs, config: EvaluateConfig):
    """Verification metrics and ROC curves of each embedding on pairs ``(index_a, index_b, same)``."""
    a, b, same, fold_of = pairs
    results, curves = {}, {}
    for name, embedding in embeddings.items():
        similarity = M.cosine_similarity_pairs(embedding, a, b)
        results[name] = M.verification_metrics(
            similarity,
            same,
            folds=config.verification.folds,
            seed=config.verification.seed,
            fold_of=fold_of,
        )
        fars = sorted({*M.DEFAULT_FARS, config.verification.gallery_far}, reverse=True)
        results[name].update(M.thresholds_at_far(similarity, same, fars))
        fpr, tpr, _ = M.roc_curve(similarity, same)
        curves[name] = (fpr, tpr)
    return results, curves


def _normalised(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def evaluate(params, manifest, *, run=None) -> dict:
    config = params.evaluate
    file_pairs = external = None
    # A bad pairs file stops here, before any inference.
    if config.verification.pairs_file is not None and config.verification.pairs_root is not None:
        external = external_pairs(config, manifest.classes)
    elif config.verification.pairs_file is not None:
        # The file's pairs may mix test and unknown images: look them up among both.
        names = pair_names(
            manifest.paths("test") + manifest.paths("unknown"),
            manifest.identities("test") + manifest.identities("unknown"),
        )
        file_pairs = _pairs_from_file(config, names)
    for folder in (EVALUATE_DIR, EVALUATE_PLOTS_DIR):
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
    classes = list(manifest.classes)
    labels = {split: manifest.labels(split) for split in EVAL_SPLITS}

    outputs: dict[str, dict[str, SplitOutputs]] = {}
    external_embeddings: dict[str, np.ndarray] = {}
    member_probs: dict[str, dict[str, np.ndarray]] = {}
    raw_probs_test: dict[str, np.ndarray] = {}
    for item in params.train.items:
        loaded = load_model(model_path(item))
        if loaded.classes != classes:
            raise FileNotFoundError(
                f"{model_path(item)} was trained on other classes than {PREPARED_DIR}; "
                f"rerun train@{item} (dvc repro)"
            )
        temperatures = _load_temperatures(item)
        outputs[item] = {
            split: run_model(
                loaded,
                manifest.paths(split),
                labels[split],
                manifest.identities(split),
                batch_size=config.batch_size,
                flip_test=config.verification.flip_test,
                progress=f"evaluate: {item}, {split} images",
            )
            for split in EVAL_SPLITS
        }
        if external is not None:  # prepare did not crop these: crop them as it did the others
            external_embeddings[item] = run_model(
                loaded,
                external.paths,
                np.full(len(external.paths), -1),
                [path.parent.name for path in external.paths],
                batch_size=config.batch_size,
                flip_test=config.verification.flip_test,
                crop=params.data.crop,
                progress=f"evaluate: {item}, images of the pairs file",
            ).embeddings
        np.savez_compressed(
            EVALUATE_DIR / f"{item}.npz",
            **{
                f"{split}_{key}": value
                for split, out in outputs[item].items()
                for key, value in (
                    ("embeddings", out.embeddings),
                    ("labels", out.labels),
                    ("identities", np.asarray(out.identities, dtype=str)),
                    *((f"logits_{m}", v) for m, v in out.logits.items()),
                )
            },
            classes=np.asarray(classes, dtype=str),
        )
        for member in loaded.members:
            if member not in temperatures:
                raise FileNotFoundError(
                    f"{calibration_path(item)} has no temperature for {member}; rerun calibrate@{item}"
                )
            member_probs[member] = {
                split: M.softmax(outputs[item][split].logits[member], temperatures[member])
                for split in EVAL_SPLITS
            }
            raw_probs_test[member] = M.softmax(outputs[item]["test"].logits[member])

    # Members far below the best on validation (a collapsed head) stay out of the ensembles; the
    # test split plays no part in this choice.
    val_accuracy = {
        name: float(np.mean(probs["val"].argmax(axis=1) == labels["val"]))
        for name, probs in member_probs.items()
    }
    included = select_members(val_accuracy, config.members.rule, config.members.threshold)
    ensemble_members = [name for name in member_probs if included[name]]
    results: dict = {
        "heads": {},
        "ensembles": {},
        "members": {
            name: {"val_accuracy": val_accuracy[name], "in_ensemble": included[name]}
            for name in member_probs
        },
    }
    roc_curves = {}
    has_unknown = len(labels["unknown"]) > 0
    halves = unknown_halves(manifest.identities("unknown"), config.verification.seed)
    candidates = {name: probs for name, probs in member_probs.items()}
    ensemble_temperature: dict[str, tuple[float, np.ndarray]] = {}
    for rule in config.rules:
        stacked = {}
        for split in EVAL_SPLITS:
            if len(labels[split]) == 0:  # no unknown identities: nothing to combine
                empty = np.zeros(0)
                stacked[split] = (np.zeros((0, len(classes))), empty.astype(np.int64), empty)
                continue
            predicted, confidence, probs = combine(
                [member_probs[m][split] for m in ensemble_members], rule
            )
            stacked[split] = (probs, predicted, confidence)
        if rule in TEMPERED_RULES:
            stacked, ensemble_temperature[rule] = _tempered(stacked, labels)
        candidates[f"ensemble_{rule}"] = stacked
    for name, entry in candidates.items():
        if name in member_probs:
            probs = entry
            predicted = {s: p.argmax(axis=1) for s, p in probs.items()}
            confidence = {s: p.max(axis=1) for s, p in probs.items()}
        else:
            probs = {s: v[0] for s, v in entry.items()}
            predicted = {s: v[1] for s, v in entry.items()}
            confidence = {s: v[2] for s, v in entry.items()}
        result = scores(probs, predicted, confidence, labels, config, halves)
        if name in member_probs:
            result["ece_uncalibrated"] = M.expected_calibration_error(
                raw_probs_test[name], labels["test"], config.n_bins
            )
            results["heads"][name] = result
        else:
            rule = name.removeprefix("ensemble_")
            if rule in ensemble_temperature:
                temperature, untempered = ensemble_temperature[rule]
                result["temperature"] = temperature
                result["ece_uncalibrated"] = M.expected_calibration_error(
                    untempered, labels["test"], config.n_bins
                )
            results["ensembles"][rule] = result
        _plots_for(
            name, probs, predicted, confidence, labels, result["threshold"], classes, config.n_bins
        )
        if has_unknown:
            conf = np.concatenate([confidence["test"], confidence["unknown"]])
            known = np.concatenate([labels["test"], labels["unknown"]]) >= 0
            fpr, tpr, _ = M.roc_curve(conf, known)
            roc_curves[name] = (fpr, tpr)
    if roc_curves:
        plots.roc_plot(
            roc_curves,
            EVALUATE_PLOTS_DIR / "roc_open_set.png",
            "Known vs unknown by confidence (test + unknown images)",
            xlabel="unknown images accepted (FPR)",
            ylabel="known images accepted (TPR)",
        )

    # Verification and embeddings: one embedding per item, plus the concatenation of all.
    results["verification"] = {}
    pair_sets = {}
    embeddings_of = {}
    for split in ("unknown", "test"):
        embeddings = {item: outputs[item][split].embeddings for item in params.train.items}
        embeddings_of[split] = embeddings
        pairs = _drawn_pairs(outputs[params.train.items[0]][split].identities, config)
        if pairs is not None:
            pair_sets[split] = (embeddings, pairs, f"pairs of {split} images")
    if file_pairs is not None:
        embeddings = {
            item: np.concatenate([embeddings_of["test"][item], embeddings_of["unknown"][item]])
            for item in params.train.items
        }
        pair_sets["pairs_file"] = (embeddings, file_pairs, config.verification.pairs_file)
    if external is not None:
        pair_sets["pairs_file"] = (
            external_embeddings,
            external.pairs,
            f"{config.verification.pairs_file} ({external.dropped} pairs of trained people dropped)",
        )
    # The ensemble's embedding concatenates the items that kept a member in the ensemble.
    owner = {member: item for member, (item, _) in params.members().items()}
    kept_items = [
        item for item in params.train.items if any(owner[m] == item for m in ensemble_members)
    ]
    for split, (embeddings, pairs, description) in pair_sets.items():
        if len(embeddings) > 1:
            kept = [_normalised(embeddings[item]) for item in kept_items]
            embeddings = embeddings | {"ensemble": np.concatenate(kept, axis=1)}
        found, curves = _verification(embeddings, pairs, config)
        if split == "pairs_file" and external is not None:
            for values in found.values():
                values["n_dropped_trained_identity"] = float(external.dropped)
        results["verification"][split] = found
        plots.roc_plot(
            curves,
            EVALUATE_PLOTS_DIR / f"verification_roc_{split}.png",
            f"Verification on {description}",
            log_x=True,
            xlabel="false accept rate",
            ylabel="true accept rate",
        )
    if config.embedding_plot and has_unknown:
        for item in params.train.items:
            test, unknown = outputs[item]["test"], outputs[item]["unknown"]
            plots.embedding_plot(
                np.concatenate([test.embeddings, unknown.embeddings]),
                np.asarray(test.identities + unknown.identities),
                np.r_[np.ones(len(test.labels), bool), np.zeros(len(unknown.labels), bool)],
                EVALUATE_PLOTS_DIR / f"embeddings_{item}.png",
                f"{item}: t-SNE of test (dots) and unknown (crosses) embeddings",
                seed=config.verification.seed,
            )

    results = _clean(results)
    atomic_write_text(EVALUATE_METRICS, json.dumps(results, indent=2) + "\n")
    report = report_table(results)
    atomic_write_text(EVALUATE_DIR / "report.md", report)
    if run is not None:
        flat = {}
        for group in ("heads", "ensembles"):
            for name, values in results[group].items():
                flat.update({f"{group}/{name}/{k}": v for k, v in values.items()})
        for split, entries in results["verification"].items():
            for name, values in entries.items():
                flat.update({f"verification/{split}/{name}/{k}": v for k, v in values.items()})
        run.log_metrics({k: v for k, v in flat.items() if v is not None})
        for path in (EVALUATE_METRICS, EVALUATE_DIR / "report.md", EVALUATE_PLOTS_DIR):
            run.log_artifact(path)
    return results


def report_table(results: dict) -> str:
    """The main metrics of each head and ensemble rule as a markdown table."""
    columns = [c for c in MAIN_COLUMNS]
    lines = [
        "| | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for group, prefix in (("heads", ""), ("ensembles", "ensemble ")):
        for name, values in results[group].items():
            cells = [values.get(c) for c in columns]
            text = ["" if c is None else f"{c:.4f}" for c in cells]
            lines.append(f"| {prefix}{name} | " + " | ".join(text) + " |")
    operating = [
        (prefix + name, values)
        for group, prefix in (("heads", ""), ("ensembles", "ensemble "))
        for name, values in results[group].items()
        if "known_acceptance" in values
    ]
    if operating:
        sides = ("known_acceptance", "unknown_rejection", "open_set_balanced_accuracy")
        at_far = any("threshold@unknown_far" in values for _, values in operating)
        points = [("threshold", "")] + ([("threshold", "@unknown_far")] if at_far else [])
        header = [
            f"{key}{suffix}"
            for _, suffix in points
            for key in ("threshold", "open_set_accuracy", *sides)
        ]
        lines += [
            "",
            "Open-set operating points: the threshold accepting evaluate.known_rate of the known "
            "validation images, and the one accepting evaluate.unknown_far of the unknown images "
            "(chosen on one half of the unknown people, measured on the other):",
            "",
            "| | " + " | ".join(header) + " |",
            "|---|" + "---:|" * len(header),
        ]
        for name, values in operating:
            cells = [values.get(key) for key in header]
            text = ["" if c is None else f"{c:.4f}" for c in cells]
            lines.append(f"| {name} | " + " | ".join(text) + " |")
    members = results.get("members", {})
    if members:
        cells = [
            f"{name} {values['val_accuracy']:.4f}"
            + ("" if values["in_ensemble"] else " (left out)")
            for name, values in members.items()
        ]
        lines += ["", "Ensemble members by validation accuracy: " + ", ".join(cells) + "."]
    unresolvable = False
    for split, entries in results.get("verification", {}).items():
        what = (
            "the pairs of the pairs file" if split == "pairs_file" else f"pairs of {split} images"
        )
        lines += ["", f"Verification on {what}:", ""]
        tar_keys = [f"tar@{M.far_key(far)}" for far in M.DEFAULT_FARS]
        keys = ["accuracy", "auc", "eer", *tar_keys, "n_genuine", "n_impostor"]
        if any("n_dropped_trained_identity" in values for values in entries.values()):
            keys.append("n_dropped_trained_identity")
        lines += ["| | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
        for name, values in entries.items():
            cells = []
            for key in keys:
                value = values.get(key)
                if value is None and key in tar_keys:
                    cells.append("n/r")
                    unresolvable = True
                elif value is None:
                    cells.append("")
                else:
                    cells.append(f"{value:.0f}" if key.startswith("n_") else f"{value:.4f}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if unresolvable:
        lines += ["", "n/r: not resolvable, the false accept rate is below 1 / impostor pairs."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    args = stage_parser(__doc__).parse_args(argv)
    params = load_params(args.params)
    limit_threads(params.evaluate.num_threads)
    manifest = read_manifest(PREPARED_DIR)
    members = list(params.members())
    with StageRun(
        params.tracking,
        stage="evaluate",
        heads=members,
        params={
            "evaluate": params.raw["evaluate"],
            "train": {"items": params.raw["train"]["items"]},
        },
    ) as run:
        results = evaluate(params, manifest, run=run)
        if params.tracking.register_model is not None:
            register_best(params, results["members"], run)
    print(report_table(results), file=sys.stderr)


def register_best(params, members: dict, run) -> None:
    """Log the best head (highest validation accuracy; the first on a tie) as an MLflow model of
    this run, with its fitted temperature, and register it under ``tracking.register_model``."""
    best = max(members, key=lambda name: members[name]["val_accuracy"])
    item = params.members()[best][0]
    temperature = _load_temperatures(item)[best]
    name = params.tracking.register_model

    def register(client, run_id):
        logged = log_mlflow_model(
            client,
            run_id,
            model_path(item),
            temperatures={best: temperature},
            artifact_prefix="best",
        )
        artifact = logged[0] if len(logged) == 1 else f"best_{best}"
        version = register_model(client, run_id, artifact, name)
        print(
            f"evaluate: registered {best} (T = {temperature:.3f}) as {name} version {version}",
            file=sys.stderr,
        )

    run.call(register, "registering the best model")


if __name__ == "__main__":
    sys.exit(run_stage(main))
