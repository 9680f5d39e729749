"""Stage ``evaluate``: every trained head and every ensemble rule on the test and unknown images.

``python -m pipeline.evaluate``. Runs each item's model on the val, test and unknown images, a pairs
file's images under ``pairs_root`` and the ``.bin`` sets of ``evaluate.verification.bins``, then
:func:`angular.eval.evaluate.evaluate_models` (its module doc says what is measured) with the
temperatures of calibrate. Writes ``metrics/evaluate.json``, the plots
(``outputs/plots/evaluate/``) and ``outputs/evaluate/``: ``<item>.npz`` (embeddings, logits, labels
and identities of the val, test and unknown images) and ``report.md`` (the main metrics, a table).
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Sequence

import numpy as np

from angular.config import ConfigError, load_params
from angular.eval.evaluate import SPLITS, evaluate_models
from angular.eval.pairs import PairsError, pairs_of_file
from angular.eval.report import flat_metrics, report_table
from angular.files import atomic_write_text
from angular.nn.recognition import load_model
from angular.serve.inference import run_model, run_splits, save_outputs
from angular.serve.mlflow_model import register_head
from angular.train.bins import embed_bins
from angular.train.loop import limit_threads
from angular.train.tracking import StageRun
from pipeline import (
    EVALUATE_DIR,
    EVALUATE_METRICS,
    EVALUATE_PLOTS_DIR,
    PREPARED_DIR,
    calibration_path,
    model_path,
    read_split_manifest,
    run_stage,
    stage_parser,
)

PARAM_KEYS = ("evaluate", "train.items", "data.crop")


def load_temperatures(item: str, members) -> dict[str, float]:
    path = calibration_path(item)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; run calibrate@{item} first (dvc repro)")
    found = json.loads(path.read_text(encoding="utf-8"))["temperatures"]
    for member in (member for member in members if member not in found):
        raise FileNotFoundError(f"{path} has no temperature for {member}; rerun calibrate@{item}")
    return {member: found[member] for member in members}


def run_item(params, item: str, manifest, external):
    """Its outputs per split (saved), temperatures, embeddings of the pairs file and the sets."""
    loaded = load_model(model_path(item))
    if loaded.classes != list(manifest.classes):
        raise FileNotFoundError(
            f"{model_path(item)} was trained on other classes than {PREPARED_DIR}; "
            f"rerun train@{item} (dvc repro)"
        )
    temperatures = load_temperatures(item, loaded.members)
    config = params.evaluate  # the .bin sets first: a bad file stops the stage before the rest
    bins, folds = config.verification.bins, config.verification.folds
    sets = embed_bins(loaded.model, bins, params.data, batch_size=config.batch_size, folds=folds)
    options = dict(batch_size=config.batch_size, flip_test=config.verification.flip_test)
    outputs = run_splits(loaded, manifest, SPLITS, progress=f"evaluate: {item}", **options)
    embeddings = None
    if external is not None:  # prepare did not crop these: crop them as it did the others
        embeddings = run_model(
            loaded,
            external.paths,
            np.full(len(external.paths), -1),
            [path.parent.name for path in external.paths],
            **options,
            crop=params.data.crop,
            progress=f"evaluate: {item}, images of the pairs file",
        ).embeddings
    save_outputs(EVALUATE_DIR / f"{item}.npz", outputs, list(manifest.classes))
    return outputs, temperatures, embeddings, sets


def evaluate(params, manifest, *, run=None) -> dict:
    try:  # a bad pairs file stops here, before any inference
        pairs, external = pairs_of_file(params.evaluate.verification, manifest)
    except PairsError as error:
        raise ConfigError(error.key, error.problem) from None
    for folder in (EVALUATE_DIR, EVALUATE_PLOTS_DIR):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    outputs, temperatures, external_embeddings, sets = {}, {}, {}, {}
    for item in params.train.items:
        found = run_item(params, item, manifest, external)
        outputs[item], temperatures[item], external_embeddings[item], sets[item] = found
    results = evaluate_models(
        outputs,
        temperatures,
        list(manifest.classes),
        params.evaluate,
        EVALUATE_PLOTS_DIR,
        file_pairs=pairs,
        external=external,
        external_embeddings=external_embeddings,
        bins=sets,
    )
    atomic_write_text(EVALUATE_METRICS, json.dumps(results, indent=2) + "\n")
    atomic_write_text(EVALUATE_DIR / "report.md", report_table(results))
    if run is not None:
        run.log_metrics(flat_metrics(results))
        for path in (EVALUATE_METRICS, EVALUATE_DIR / "report.md", EVALUATE_PLOTS_DIR):
            run.log_artifact(path)
    return results


def main(argv: Sequence[str] | None = None) -> None:
    params = load_params(stage_parser(__doc__).parse_args(argv).params)
    limit_threads(params.evaluate.num_threads)
    manifest = read_split_manifest("evaluate")
    raw = {"evaluate": params.raw["evaluate"], "train": {"items": params.raw["train"]["items"]}}
    with StageRun(
        params.tracking, stage="evaluate", heads=list(params.members()), params=raw
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
    temperature = load_temperatures(item, [best])[best]
    name = params.tracking.register_model

    def register(client, run_id):
        version = register_head(client, run_id, model_path(item), best, temperature, name)
        print(
            f"evaluate: registered {best} (T = {temperature:.3f}) as {name} version {version}",
            file=sys.stderr,
        )

    run.call(register, "registering the best model")


if __name__ == "__main__":
    sys.exit(run_stage(main))
