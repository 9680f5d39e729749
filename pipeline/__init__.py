"""The DVC pipeline's stages (``python -m pipeline.<stage>``), run from the project root.

Each stage is thin: it reads ``params.yaml`` through :func:`angular.config.load_params`, calls
:mod:`angular`, and writes the files ``dvc.yaml`` declares. The layout of those files lives here
(and in ``dvc.yaml``, which ``tests/pipeline/test_dvc_yaml.py`` keeps in step with it):

    data/prepared/                       prepare: manifest.csv, classes.json (+ images/ for digits)
    metrics/prepare.json                 prepare: split counts
    outputs/models/<item>.pt             train@<item>: the model (angular.nn.recognition.load_model)
    outputs/checkpoints/<item>/          train@<item>: per-epoch checkpoints (kept for resuming)
    metrics/train/<item>.json            train@<item>: the last epoch's loss and accuracy
    plots/loss/<item>.tsv                train@<item>: train and val loss per epoch
    plots/accuracy/<item>.tsv            train@<item>: train and val accuracy per epoch
    plots/collapse/<item>.tsv            train@<item>: centre cosine and embedding spread per epoch
    outputs/calibration/<item>.json      calibrate@<item>: the temperature of each head
    metrics/calibrate/<item>.json        calibrate@<item>: NLL, ECE, Brier before and after
    outputs/plots/calibrate/<item>/      calibrate@<item>: reliability diagrams
    outputs/evaluate/                    evaluate: logits and embeddings per item, report.md
    metrics/evaluate.json                evaluate: every metric of every head and ensemble rule
    outputs/plots/evaluate/              evaluate: ROC, reliability, confusion, embeddings

A bad ``params.yaml``, bad data, a non-finite loss, a collapsed head or a required but unusable tracking store ends
the stage with a one-line message naming the cause and a non-zero exit status (no traceback).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from angular import heap
from angular.config import ConfigError
from angular.data import DataError, read_manifest
from angular.train.collapse import CollapseError
from angular.train.epoch import NonFiniteLossError
from angular.train.tracking import TrackingError
from angular.train.world import WorkerError

PARAMS = Path("params.yaml")
PREPARED_DIR = Path("data/prepared")
PREPARE_METRICS = Path("metrics/prepare.json")
MODELS_DIR = Path("outputs/models")
CHECKPOINTS_DIR = Path("outputs/checkpoints")
TRAIN_METRICS_DIR = Path("metrics/train")
LOSS_PLOTS_DIR = Path("plots/loss")
ACCURACY_PLOTS_DIR = Path("plots/accuracy")
COLLAPSE_PLOTS_DIR = Path("plots/collapse")
LR_PLOTS_DIR = Path("plots/lr")
CALIBRATION_DIR = Path("outputs/calibration")
CALIBRATE_METRICS_DIR = Path("metrics/calibrate")
CALIBRATE_PLOTS_DIR = Path("outputs/plots/calibrate")
EVALUATE_DIR = Path("outputs/evaluate")
EVALUATE_METRICS = Path("metrics/evaluate.json")
EVALUATE_PLOTS_DIR = Path("outputs/plots/evaluate")

EXIT_CONFIG = 2
EXIT_FAILURE = 1


def model_path(item: str) -> Path:
    return MODELS_DIR / f"{item}.pt"


def calibration_path(item: str) -> Path:
    return CALIBRATION_DIR / f"{item}.json"


def read_split_manifest(stage: str):
    """The prepared manifest, for a stage that needs the validation split (temperatures,
    thresholds and ensemble members are chosen on it)."""
    manifest = read_manifest(PREPARED_DIR)
    if not len(manifest.split("val")):
        raise ConfigError(
            "data.val_fraction",
            f"is 0: the {stage} stage chooses temperatures, thresholds and ensemble members on the "
            "validation split, which is empty; give data.val_fraction > 0 (the trainer alone "
            "validates on train.verification's sets without one)",
        )
    return manifest


def stage_parser(description: str, *, item: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    if item:
        parser.add_argument("item", help="an entry of train.items in params.yaml")
    parser.add_argument("--params", type=Path, default=PARAMS, help="default: params.yaml")
    return parser


def run_stage(
    main: Callable[[Sequence[str] | None], None], argv: Sequence[str] | None = None
) -> int:
    """Run a stage's ``main``; expected failures become one line on stderr and an exit status."""
    heap.keep_freed_buffers_mapped()  # every stage and torchrun worker: (B, C) buffers stay mapped
    try:
        main(argv)
    except ConfigError as error:
        print(f"error in params.yaml: {error}" if error.key else f"error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    except (
        DataError,
        NonFiniteLossError,
        CollapseError,
        TrackingError,
        WorkerError,
        FileNotFoundError,
    ) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILURE
    return 0
