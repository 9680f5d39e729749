"""What one training run holds: the files it writes (:class:`TrainPaths`) and its state between the
phases of :func:`angular.train.loop.train_item` (:class:`Session`: set up, resume, epochs, finish),
shared by the modules of those phases; and :func:`say`, the one way training speaks to the user.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from angular.config import TrainConfig, TrainItem
from angular.nn.recognition import RecognitionModel, model_document
from angular.train.sampler import PrioritizedSampler

__all__ = ["TrainPaths", "EpochProgress", "Session", "model_file", "say"]


@dataclasses.dataclass(frozen=True)
class TrainPaths:
    model: Path  # the final model file
    checkpoints: Path  # folder of per-epoch checkpoints
    metrics: Path  # JSON: final epoch's metrics
    loss_plot: Path  # TSV: train and val loss per epoch (DVC plots)
    accuracy_plot: Path  # TSV: train and val accuracy per epoch (DVC plots)
    collapse_plot: Path | None = None  # TSV: centre cosine and embedding spread per epoch
    lr_plot: Path | None = None  # TSV: the learning rate of each optimizer step
    best_model: Path | None = None  # the model file of the best verification (train.verification)


@dataclasses.dataclass
class EpochProgress:
    """How far the epoch under way has come (a checkpoint within an epoch saves it): the steps
    taken, the images of the epoch's order the ranks consumed together (``position``,
    :class:`angular.train.sampler.EpochBatchSampler`), and the running sums of its history row."""

    epoch: int
    step: int = 0
    position: int = 0
    total_loss: float = 0.0
    seen: int = 0
    correct: dict[str, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Session:
    """What one training run holds between its phases. On several processes ``model`` is this
    rank's model (its shard of each head) and ``full_model`` the whole one that rank 0 saves when
    its heads fit ``train.distributed.gather_head_mib`` (None on the other ranks, and on every
    rank for a larger head: :mod:`angular.train.model_files`); on one process they are the same
    model."""

    label: str
    item_name: str
    item: TrainItem
    config: TrainConfig
    device: torch.device
    model: RecognitionModel
    full_model: RecognitionModel | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scheduler_by_step: bool  # stepped after each optimizer step (warm-up, poly), else each epoch
    generator: torch.Generator
    train_loader: DataLoader
    val_loader: DataLoader
    descriptions: tuple[dict, dict, dict]  # backbone, heads, image (for the model file)
    fingerprint: str  # of this run: checkpoints of another are not resumed
    base_fingerprint: str  # of these params on one process: finds another world size's files
    paths: TrainPaths
    checkpoints: Path  # this process's checkpoint folder (paths.checkpoints on one process)
    keep_checkpoints: int
    classes: tuple[str, ...]
    history: list[dict] = dataclasses.field(default_factory=list)
    skipped_steps: int = 0
    start_epoch: int = 0
    collapse_epoch: int = 0  # the first epoch the monitor flagged (on_collapse: warn); 0: none
    drift_epoch: int = 0  # the first epoch the drift (partial collapse) monitor flagged; 0: none
    collapse_room: float | None = None  # the smallest room of the item's heads (None: no bound)
    scaler: torch.amp.GradScaler | None = None  # the fp16 loss scaler (train.precision: fp16)
    scaler_skipped_steps: int = 0  # steps the scaler skipped (inf/nan gradients: normal in fp16)
    scaler_skips_in_a_row: int = 0
    scale_reported: bool = False  # a falling loss scale is reported once
    step_lrs: list[tuple[int, float]] = dataclasses.field(default_factory=list)  # (step, lr)
    progress: EpochProgress | None = None  # the epoch under way (or resumed within)
    resume_rng: dict | None = None  # restored once the resumed epoch's pass has started
    best: dict | None = None  # the best verification so far (angular.train.verification)
    last_verification: dict | None = None  # the latest (not saved: the end verifies again)

    def prioritized(self) -> PrioritizedSampler | None:
        """The prioritized sampler of the training data (``train.sampler: prioritized``), or None."""
        sampler = self.train_loader.batch_sampler
        return sampler if isinstance(sampler, PrioritizedSampler) else None


def model_file(
    session: Session,
    final: dict,
    state_dict: dict | None = None,
    head_shards: dict | None = None,
) -> dict:
    """The model file of the run's full model as it is now (rank 0's ``full_model``), with
    ``final`` (the metrics it was chosen or finished with) in its training record; or, for a head
    too large to gather, of ``state_dict`` and ``head_shards`` (:mod:`angular.train.model_files`)."""
    backbone, heads, image = session.descriptions
    config = session.config
    return model_document(
        session.full_model if state_dict is None else state_dict,
        item=session.item_name,
        backbone=backbone,
        heads=heads,
        classes=session.classes,
        image=image,
        training={
            "epochs": config.epochs,
            "seed": config.seed,
            "fingerprint": session.fingerprint,
            "final": final,
        },
        head_shards=head_shards,
    )


def say(message: str) -> None:
    """A line for the user on stderr (progress, resumes, warnings)."""
    print(message, file=sys.stderr, flush=True)
