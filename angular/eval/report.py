"""The evaluation's main metrics as a markdown table (``outputs/evaluate/report.md``, and what the
evaluate stage prints), from the metrics of :func:`angular.eval.evaluate.evaluate_models` (or, for
a table of verification metrics alone, :func:`verification_table`)."""

from __future__ import annotations

__all__ = ["MAIN_COLUMNS", "flat_metrics", "report_table", "verification_table"]

MAIN_COLUMNS = (
    "closed_set_accuracy",
    "open_set_accuracy",
    "threshold",
    "open_set_auroc",
    "oscr",
    "ece",
    "ece_uncalibrated",
)


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
        table, unresolved = verification_table(entries)
        lines += ["", f"Verification on {what}:", "", *table]
        unresolvable |= unresolved
    for stem, entries in results.get("bins", {}).items():
        table, unresolved = verification_table(entries, spread=True)
        lines += ["", f"Verification set {stem} (insightface's protocol, flip test):", "", *table]
        unresolvable |= unresolved
    if unresolvable:
        lines += ["", "n/r: not resolvable, the false accept rate is below 1 / impostor pairs."]
    return "\n".join(lines) + "\n"


def verification_table(entries: dict[str, dict], *, spread: bool = False) -> tuple[list[str], bool]:
    """``(lines, unresolvable)``: the verification metrics of each embedding (name -> the metrics
    of :func:`angular.eval.verification.verification_metrics` or
    :func:`angular.eval.bins.bin_metrics`) as markdown table lines, TARs in the order computed
    (``n/r`` where not resolvable), and whether any TAR was not resolvable. ``spread``: with the
    folds' ``accuracy_std`` (as insightface quotes its sets: accuracy +- std)."""
    first = next(iter(entries.values()))
    tar_keys = [key for key in first if key.startswith("tar@")]
    spread_keys = ["accuracy_std"] if spread else []
    keys = ["accuracy", *spread_keys, "auc", "eer", *tar_keys, "n_genuine", "n_impostor"]
    if any("n_dropped_trained_identity" in values for values in entries.values()):
        keys.append("n_dropped_trained_identity")
    lines = ["| | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    unresolvable = False
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
    return lines, unresolvable


def flat_metrics(results: dict) -> dict[str, float]:
    """The metrics of heads, ensembles, verification and the verification sets under one name
    each, as MLflow logs them (``heads/<name>/<key>``, ``verification/<split>/<name>/<key>``,
    ``bins/<set>/<name>/<key>``); nulls left out."""
    flat = {}
    for group in ("heads", "ensembles"):
        for name, values in results[group].items():
            flat.update({f"{group}/{name}/{k}": v for k, v in values.items()})
    for group in ("verification", "bins"):
        for split, entries in results.get(group, {}).items():
            for name, values in entries.items():
                flat.update({f"{group}/{split}/{name}/{k}": v for k, v in values.items()})
    return {k: v for k, v in flat.items() if v is not None}
