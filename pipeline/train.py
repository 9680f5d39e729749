"""Stage ``train@<item>``: one backbone and its head(s) for an entry of ``train.items``.

``python -m pipeline.train arcface``. Writes ``outputs/models/<item>.pt``, per-epoch checkpoints
(a rerun resumes from the newest), ``metrics/train/<item>.json``, the plots
``plots/{loss,accuracy,collapse,lr}/<item>.tsv`` and an MLflow run (:mod:`angular.train.loop`).
With ``train.distributed.world_size`` W > 1 it launches W torchrun workers that run this module
again, rank 0 logging and writing the files (:mod:`angular.train.world`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from angular import ops
from angular.config import load_params
from angular.data import read_manifest
from angular.serve.mlflow_model import log_mlflow_model
from angular.train.loop import TrainPaths, check_supported, select_device, train_item
from angular.train.tracking import StageRun
from angular.train.world import ONE_PROCESS, World, is_worker, launch, worker_group
from pipeline import (
    ACCURACY_PLOTS_DIR,
    CHECKPOINTS_DIR,
    COLLAPSE_PLOTS_DIR,
    LOSS_PLOTS_DIR,
    LR_PLOTS_DIR,
    PREPARED_DIR,
    TRAIN_METRICS_DIR,
    model_path,
    run_stage,
    stage_parser,
)

# train.verification's best model of each item (outputs/best/<item>.pt): not a DVC output, since
# only runs with train.verification write it.
BEST_MODELS_DIR = Path("outputs/best")

# The keys of params.yaml this stage reads (its `params` in dvc.yaml; heads.<item> besides).
PARAM_KEYS = (
    "data.image_size",
    "data.channels",
    "data.mean",
    "data.std",
    "model",
    "train.epochs",
    "train.batch_size",
    "train.optimizer",
    "train.lr",
    "train.weight_decay",
    "train.momentum",
    "train.schedule",
    "train.poly_power",
    "train.warmup_steps",
    "train.warmup_epochs",
    "train.accumulate",
    "train.step_size",
    "train.gamma",
    "train.label_smoothing",
    "train.label_smoothing_mode",
    "train.grad_clip_norm",
    "train.augment",
    "train.precision",
    "train.channels_last",
    "train.device",
    "train.seed",
    "train.deterministic",
    "train.num_threads",
    "train.num_workers",
    "train.preload_images",
    "train.on_nonfinite",
    "train.centre_norm",
    "train.on_collapse",
    "train.collapse",
    "train.keep_checkpoints",
    "train.checkpoint_every_steps",
    "train.verification",
    "train.distributed",
    "train.sampler",
    "train.prioritized",
)


def paths_for(item: str) -> TrainPaths:
    return TrainPaths(
        model=model_path(item),
        checkpoints=CHECKPOINTS_DIR / item,
        metrics=TRAIN_METRICS_DIR / f"{item}.json",
        loss_plot=LOSS_PLOTS_DIR / f"{item}.tsv",
        accuracy_plot=ACCURACY_PLOTS_DIR / f"{item}.tsv",
        collapse_plot=COLLAPSE_PLOTS_DIR / f"{item}.tsv",
        lr_plot=LR_PLOTS_DIR / f"{item}.tsv",
        best_model=BEST_MODELS_DIR / f"{item}.pt",
    )


def logged_params(raw: dict, item: str) -> dict:
    """The params this stage reads, nested as in params.yaml (for MLflow)."""
    logged: dict = {"heads": {item: raw["heads"][item]}}
    for key in PARAM_KEYS:
        section, _, name = key.partition(".")
        if name:
            # A key added later may be absent from an older params file (its default applies).
            logged.setdefault(section, {})[name] = raw[section].get(name)
        else:
            logged[section] = raw[section]
    return logged


def main(argv: Sequence[str] | None = None) -> None:
    args = stage_parser(__doc__, item=True).parse_args(argv)
    params = load_params(args.params)
    item = params.item(args.item)
    manifest = read_manifest(PREPARED_DIR)
    paths = paths_for(args.item)
    stage = f"train@{args.item}"
    distributed = params.train.distributed
    if distributed.world_size == 1:
        _train_and_log(params, args.item, item, manifest, paths, stage, ONE_PROCESS)
    elif not is_worker():
        check_supported(params, item)
        launch("pipeline.train", [args.item, "--params", str(args.params)], distributed, stage)
    else:
        with worker_group(distributed, select_device(params.train.device)) as world:
            _train_and_log(params, args.item, item, manifest, paths, stage, world)


def _train_and_log(params, item_name: str, item, manifest, paths, stage: str, world: World) -> None:
    """Train (one process, or every rank of several); rank 0 logs the run, model and files."""
    if world.rank != 0:
        train_item(params, item_name, manifest, paths, world=world)
        return
    with StageRun(
        params.tracking,
        stage=stage,
        heads=list(item.heads),
        params=logged_params(params.raw, item_name),
        tags={"ops_backend": ops.backend()},
    ) as run:
        metrics = train_item(params, item_name, manifest, paths, run=run, world=world)
        for path in (paths.model, paths.metrics):
            run.log_artifact(path)
        if paths.best_model.is_file():  # train.verification's best (not a DVC output)
            run.log_artifact(paths.best_model, "best")
        # The plots share the item's file name: each keeps its folder (plots/loss/arcface.tsv).
        for path in (paths.loss_plot, paths.accuracy_plot, paths.collapse_plot, paths.lr_plot):
            run.log_artifact(path, path.parent.as_posix())
        # Also as an MLflow model, served by `mlflow models predict` (T = 1 until calibrate).
        run.call(
            lambda client, run_id: log_mlflow_model(client, run_id, paths.model),
            "logging the MLflow model",
        )
    accuracy, epochs = metrics["val_accuracy"], metrics["epoch"]
    message = f"{stage}: val accuracy {accuracy:.4f} after {epochs} epochs; model {paths.model}"
    print(message, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(run_stage(main))
