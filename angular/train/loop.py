"""Training one ``train@<item>`` (docs/design.md, Pipeline): a backbone and its head(s), on one
process or on the ranks of a process group, with checkpoints and resume.

The package, by phase of :func:`train_item` (one trainer for any world):

- :mod:`angular.train.loop` (this module): set up (seeds, model, optimizer, schedule, data), the
  epochs, finish (the model file, metrics, plots); what the trainer refuses on several processes.
- :mod:`angular.train.model_files`: the model file on any world (a head too large to gather saved
  as its shards).
- :mod:`angular.train.epoch`: one epoch: the pass over the batches with the step guard, and the
  validation that makes the epoch's history row.
- :mod:`angular.train.checkpoint`: the fingerprint of a run, checkpoints (one file per rank, at
  epoch ends and every ``train.checkpoint_every_steps``), resume (also on another world size, the
  checkpoint regrouped by :mod:`angular.train.reshard`).
- :mod:`angular.train.sampler`: each epoch's order of the images, resumable within an epoch.
- :mod:`angular.train.verification`: the verification sets scored by step, the best kept.
- :mod:`angular.train.world`: what only several processes need, behind :class:`World` (one
  process: :data:`ONE_PROCESS`), and the launch of torchrun workers.
- :mod:`angular.train.session`: the run's files and state, shared by those modules.

Determinism: one seed drives the weights, the shuffling (a seeded ``torch.Generator``) and the
augmentations; with ``train.deterministic`` ``torch.use_deterministic_algorithms`` is on. On CPU two
runs with the same params give bitwise identical models.

Several processes (``train.distributed.world_size`` W > 1; README, Scaling out): every rank builds
the one-process model exactly as one process does (the same seeded draws, so the same initial
backbone and centres), then keeps its shard of each head and wraps the backbone in DDP
(:meth:`World.shard`). ``train.batch_size`` is the global batch: each rank takes ``batch_size / W``
images a step (W must divide it). The optimizer sees each shard as one dense parameter: with
``sample_rate < 1`` the centres a step did not sample get a zero gradient, and weight decay and
momentum still apply to them (docs/design.md, "Sharded softmax"). Validation gathers no head
(issue 28, part 7): the ranks validate together on their shards
(:func:`angular.train.epoch.evaluate_sharded`; every rank gets the row). The model file is today's,
the heads gathered into the one-process model that rank 0 keeps, only when each head's centres fit
``train.distributed.gather_head_mib``; with a larger head no rank ever holds more than its shards
(set-up draws the one-process centres block by block and keeps the rank's rows:
:func:`angular.nn.heads.keeping_shard`), and the head is saved as its shards in the one model file
(:mod:`angular.train.model_files`), which every reader joins. Rank 0 alone writes the plots, the metrics and the model file and logs to MLflow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from functools import partial

import torch
from torch.utils.data import DataLoader

from angular import devices, ops
from angular.config import ConfigError, Params, TrainConfig, TrainItem
from angular.data import ImageDataset, Manifest, build_augmentation
from angular.files import atomic_write_text
from angular.nn.heads import keeping_shard
from angular.nn.recognition import RecognitionModel, build_model
from angular.train.checkpoint import (
    checkpoint_by_step,
    checkpoints_to_keep,
    describe_model,
    drop_other_worlds,
    fingerprint,
    kept_checkpoint,
    prune_checkpoints,
    rank_folder,
    resume,
    save_checkpoint,
)
from angular.train.collapse import (
    REMEDY,
    CollapseError,
    CollapseMonitor,
    DriftMonitor,
    collapse_room,
    init_centres,
)
from angular.train.epoch import train_epoch, validate
from angular.train.model_files import gathers, heads_fit, save_model
from angular.train.sampler import EpochBatchSampler, IndexedDataset, PrioritizedSampler
from angular.train.schedule import make_scheduler
from angular.train.session import Session, TrainPaths, say
from angular.train.verification import Verifier, make_verifier
from angular.train.world import ONE_PROCESS, World, resolve_backend

__all__ = [
    "TrainPaths",
    "effective_label_smoothing",
    "select_device",
    "limit_threads",
    "check_supported",
    "check_precision",
    "describe_model",
    "train_item",
]

COLLAPSE_COLUMNS = ("centre_cosine", "embedding_spread")


# --------------------------------------------------------------------------------------------------
# Small pieces.


def effective_label_smoothing(epsilon: float, num_classes: int, mode: str) -> float:
    """The ``label_smoothing`` to hand to PyTorch's cross-entropy (which spreads it over all C
    classes) so that the target distribution is the one ``mode`` names.

    ``all``: ``epsilon`` as is. ``others`` (the original repository): the true class keeps
    ``1 - epsilon`` and each of the C-1 others gets ``epsilon / (C-1)``, which is PyTorch's
    smoothing with ``epsilon * C / (C-1)``.
    """
    if mode == "all" or epsilon == 0.0:
        return epsilon
    if mode != "others":
        raise ValueError(f"mode must be 'all' or 'others', got {mode!r}")
    if num_classes < 2:
        raise ValueError("label smoothing over the other classes needs at least 2 classes")
    value = epsilon * num_classes / (num_classes - 1)
    if value > 1.0:
        raise ConfigError(
            "train.label_smoothing",
            f"{epsilon} spread over the {num_classes - 1} other classes leaves the true class less "
            "than any other; use at most (C-1)/C",
        )
    return value


def limit_threads(count: int) -> None:
    """Use ``count`` CPU threads in torch and in the BLAS/OpenMP pools of numpy and scikit-learn
    (0: leave the defaults, one per core). Small models run much faster on one thread than on
    several cores that other processes also want."""
    if count <= 0:
        return
    torch.set_num_threads(count)
    from threadpoolctl import threadpool_limits

    threadpool_limits(count)


def select_device(name: str) -> torch.device:
    try:
        return devices.select_device(name)
    except ValueError:  # train.device is auto, cpu or cuda: only a missing GPU gets here
        raise ConfigError(
            "train.device", "cuda was asked for but no CUDA device is available"
        ) from None


def check_supported(params: Params, item: TrainItem) -> None:
    """Refuse what several processes cannot train (before any worker starts)."""
    config = params.train
    world_size = config.distributed.world_size
    resolve_backend(config.distributed.backend, select_device(config.device))
    if config.batch_size % world_size:
        raise ConfigError(
            "train.batch_size",
            f"{config.batch_size} is the global batch and must be a multiple of "
            f"train.distributed.world_size ({world_size}): every rank takes the same share",
        )


def make_optimizer(config: TrainConfig, parameters) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            parameters, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    factory = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return factory(parameters, lr=config.lr, weight_decay=config.weight_decay)


def check_precision(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """The loss scaler of fp16 (None for fp32 and bf16), after checking that fp16 can train here:
    autocast has fp16 on the device, and the margin ops' backend computes an fp16 loss. (Every
    backend of angular does today: the compiled CPU and CUDA kernels take fp16 cosines and compute
    in fp32, the Python reference too; the check catches a build or backend without them.)"""
    if precision != "fp16":
        return None
    if not torch.amp.is_autocast_available(device.type):
        raise ConfigError(
            "train.precision", f"fp16 needs autocast on {device.type}; use bf16 or fp32"
        )
    cos = torch.zeros(2, 3, dtype=torch.float16, device=device, requires_grad=True)
    labels = torch.zeros(2, dtype=torch.long, device=device)
    try:
        ops.margin_cross_entropy(cos, labels, s=1.0).backward()
    except (RuntimeError, TypeError, NotImplementedError) as error:
        reason = " ".join(str(error).split())[:200]
        raise ConfigError(
            "train.precision",
            f"fp16 has no kernel in the margin ops' {ops.backend()} backend on {device.type} "
            f"({type(error).__name__}: {reason}); use bf16 or fp32",
        ) from None
    return torch.amp.GradScaler(device.type)


# --------------------------------------------------------------------------------------------------
# Set up.


def set_up(
    params: Params,
    item_name: str,
    manifest: Manifest,
    paths: TrainPaths,
    world: World = ONE_PROCESS,
) -> Session:
    """Seed everything, build the model, optimizer, schedule and data loaders (of one process).
    The order of the seeded steps is part of the result: changing it changes every trained model.

    On several processes whose heads do not fit ``train.distributed.gather_head_mib``, the heads
    keep only this rank's shard of their initial centres (the same draws, the same random stream
    after them: :func:`angular.nn.heads.draw_centres`), so that no rank ever holds a whole head."""
    item = params.item(item_name)
    config = params.train
    device = select_device(config.device)
    if config.deterministic:
        if device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # On CUDA a few backward kernels (e.g. adaptive pooling) have no deterministic version.
        torch.use_deterministic_algorithms(True, warn_only=device.type != "cpu")
    limit_threads(config.num_threads)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)

    num_classes = len(manifest.classes)
    smoothing = effective_label_smoothing(
        config.label_smoothing, num_classes, config.label_smoothing_mode
    )
    descriptions = describe_model(params, item)
    backbone_desc, heads_desc, _ = descriptions
    keep_shard = world.size > 1 and not heads_fit(
        heads_desc, num_classes, params.model.embedding_dim, config.distributed.gather_head_mib
    )
    with keeping_shard(world.size, world.rank) if keep_shard else contextlib.nullcontext():
        model = build_model(backbone_desc, heads_desc, num_classes, label_smoothing=smoothing)
    model = model.to(device)
    if params.model.init_from is not None:  # published weights for the backbone; heads start fresh
        params.model.init_from.load_into(model.backbone)
    if config.channels_last:  # conv weights in NHWC; PyTorch then runs the convs in NHWC
        model = model.to(memory_format=torch.channels_last)
    for head in model.heads.values():
        init_centres(head, config.centre_norm)
    optimizer = make_optimizer(config, model.parameters())
    train_loader, val_loader = make_loaders(params, manifest, generator)
    scheduler, by_step = make_scheduler(config, optimizer, len(train_loader))
    scaler = check_precision(config.precision, device)
    room = check_room(model, config, f"train@{item_name}")
    run_fingerprint = fingerprint(params, item, manifest, model)
    return Session(
        label=f"train@{item_name}",
        item_name=item_name,
        item=item,
        config=config,
        device=device,
        model=model,
        full_model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        scheduler_by_step=by_step,
        generator=generator,
        train_loader=train_loader,
        val_loader=val_loader,
        descriptions=descriptions,
        fingerprint=run_fingerprint,
        base_fingerprint=run_fingerprint,
        paths=paths,
        checkpoints=paths.checkpoints,
        keep_checkpoints=config.keep_checkpoints,
        classes=tuple(manifest.classes),
        collapse_room=room,
        scaler=scaler,
    )


def spread_over(
    session: Session, params: Params, item: TrainItem, manifest: Manifest, world: World
) -> Session:
    """The one-process session turned into this rank's: its shard of each head and a DDP backbone,
    its share of the data, its own checkpoint folder."""
    config = params.train
    # The one-process fingerprint of these params: a checkpoint of another world size resumes.
    one_process = params.model_copy(
        update={
            "train": config.model_copy(
                update={"distributed": config.distributed.model_copy(update={"world_size": 1})}
            )
        }
    )
    base_fingerprint = fingerprint(one_process, item, manifest, session.model)
    # Rank 0 keeps the one-process model to gather the heads into for the model file, unless a
    # head is too large to gather: then no rank holds more than its shards.
    fits = gathers(session.model, config.distributed.gather_head_mib)
    full_model = session.model if world.rank == 0 and fits else None
    model = world.shard(session.model, config.distributed.sample_rate, config.seed)
    optimizer = make_optimizer(config, model.parameters())
    train_loader = world.train_loader(
        session.train_loader.dataset, config.batch_size, config.num_workers, config.seed
    )
    scheduler, by_step = make_scheduler(config, optimizer, len(train_loader))
    return dataclasses.replace(
        session,
        label=f"{session.label} rank {world.rank}/{world.size}",
        model=model,
        full_model=full_model,
        optimizer=optimizer,
        scheduler=scheduler,
        scheduler_by_step=by_step,
        train_loader=train_loader,
        base_fingerprint=base_fingerprint,
        checkpoints=rank_folder(session.paths.checkpoints, world.rank, world.size),
        keep_checkpoints=checkpoints_to_keep(config.keep_checkpoints, world.size),
    )


def check_room(model: RecognitionModel, config: TrainConfig, label: str) -> float | None:
    """Warn about heads whose collapsed state sits less than ``train.collapse.min_room`` nats above
    chance: such a head can settle there (docs/design.md, Collapse). Returns the smallest room."""
    rooms = {}
    for name, head in model.heads.items():
        room = collapse_room(head.margin, head.num_classes, head.label_smoothing)
        if room is None:
            continue
        rooms[name] = room
        if room < config.collapse.min_room:
            say(
                f"{label}: warning: {name}'s collapsed state (all centres on one direction) has a "
                f"loss only {room:.2f} nats above chance (log C = {math.log(head.num_classes):.2f}; "
                f"train.collapse.min_room is {config.collapse.min_room}); the head may collapse. "
                + REMEDY
            )
    return min(rooms.values()) if rooms else None


def make_loaders(
    params: Params, manifest: Manifest, generator: torch.Generator
) -> tuple[DataLoader, DataLoader]:
    config, data = params.train, params.data
    augment = build_augmentation(config.augment)  # a bad transform fails here, before training
    common = dict(image_size=data.image_size, channels=data.channels, mean=data.mean, std=data.std)
    train_set = ImageDataset(
        manifest.paths("train"),
        manifest.labels("train"),
        augment=augment,
        preload=config.preload_images,
        **common,
    )
    val_set = ImageDataset(
        manifest.paths("val"), manifest.labels("val"), preload=config.preload_images, **common
    )
    # A last batch of one image would break batch norm: drop it (it is reshuffled next epoch).
    drop_last = len(train_set) % config.batch_size == 1
    if config.sampler == "prioritized":
        sampler = PrioritizedSampler(
            len(train_set),
            config.batch_size,
            **config.prioritized.model_dump(),
            generator=generator,
            drop_last=drop_last,
        )
        train_loader = DataLoader(
            IndexedDataset(train_set),
            batch_sampler=sampler,
            generator=generator,
            num_workers=config.num_workers,
        )
    else:
        # DataLoader(shuffle=True)'s order, resumable within an epoch (EpochBatchSampler).
        train_loader = DataLoader(
            train_set,
            batch_sampler=EpochBatchSampler(len(train_set), config.batch_size, generator=generator),
            generator=generator,
            num_workers=config.num_workers,
        )
    val_loader = DataLoader(val_set, batch_size=max(config.batch_size, 256), shuffle=False)
    return train_loader, val_loader


# --------------------------------------------------------------------------------------------------
# The epochs, and the end.


def watch_collapse(session: Session, epoch: int) -> None:
    """Apply ``train.collapse`` to the history: stop before this epoch's checkpoint (the last good
    one stays), or warn once and go on (``train.on_collapse``)."""
    config = session.config
    monitor = CollapseMonitor(
        max_centre_cosine=config.collapse.max_centre_cosine,
        max_accuracy_drop=config.collapse.max_accuracy_drop,
    )
    verdict = monitor.verdict(session.history, len(session.classes))
    if verdict is None:
        watch_drift(session, epoch)
        return
    message = f"{session.label}: collapse at epoch {epoch}: {verdict}."
    if config.on_collapse == "stop":
        raise CollapseError(
            f"{message} Training stopped ({kept_checkpoint(session.checkpoints)}). "
            f"{REMEDY}; or set train.on_collapse: warn to train on."
        )
    if session.collapse_epoch == 0:
        session.collapse_epoch = epoch
        say(f"{message} Training goes on (train.on_collapse: warn). {REMEDY}.")


def drift_monitor(session: Session) -> DriftMonitor:
    collapse = session.config.collapse
    return DriftMonitor(
        max_centre_cosine_rise=collapse.max_centre_cosine_rise,
        max_spread_drop=collapse.max_spread_drop,
    )


def watch_drift(session: Session, epoch: int) -> None:
    """Warn once of a partial collapse (the centres drifting together, or a falling spread): it
    costs verification on unseen people while the loss and the accuracy look healthy."""
    verdict = drift_monitor(session).verdict(session.history)
    if verdict is not None and session.drift_epoch == 0:
        session.drift_epoch = epoch
        say(
            f"{session.label}: partial collapse at epoch {epoch}: {verdict}. Training goes on. "
            f"{REMEDY}."
        )


def tsv(history: list[dict], columns: list[str]) -> str:
    lines = ["\t".join(columns)]
    for row in history:
        lines.append("\t".join(format_value(row[c]) for c in columns))
    return "\n".join(lines) + "\n"


def format_value(value) -> str:
    return str(value) if isinstance(value, int) else f"{value:.6g}"


def write_plots(paths: TrainPaths, history: list[dict], step_lrs: list[tuple[int, float]]) -> None:
    columns = list(history[0])
    loss = ["epoch"] + [c for c in columns if c.endswith("_loss")]
    accuracy = ["epoch"] + [c for c in columns if "_accuracy" in c]
    atomic_write_text(paths.loss_plot, tsv(history, loss))
    atomic_write_text(paths.accuracy_plot, tsv(history, accuracy))
    if paths.collapse_plot is not None:
        collapse = ["epoch"] + [c for c in columns if c.startswith(COLLAPSE_COLUMNS)]
        atomic_write_text(paths.collapse_plot, tsv(history, collapse))
    if paths.lr_plot is not None:
        rows = [{"step": step, "lr": lr} for step, lr in step_lrs]
        atomic_write_text(paths.lr_plot, tsv(rows, ["step", "lr"]))


def final_metrics(session: Session) -> dict:
    """The run's final metrics: the last epoch's row, the step counts, the monitors' verdicts and
    measures, the verification's last and best."""
    final = dict(session.history[-1])
    final["skipped_steps"] = session.skipped_steps
    if session.scaler is not None:
        final["scaler_skipped_steps"] = session.scaler_skipped_steps
    final["collapse_epoch"] = session.collapse_epoch
    final["drift_epoch"] = session.drift_epoch
    final.update(finite(drift_monitor(session).measures(session.history)))
    if session.collapse_room is not None:
        final["collapse_room"] = session.collapse_room
    if session.last_verification is not None:
        final["verification"] = {"last": session.last_verification, "best": session.best}
    return final


def finish(session: Session, final: dict) -> dict:
    """Write the final metrics and the plots (after the model file); drop the checkpoints."""
    paths = session.paths
    write_plots(paths, session.history, session.step_lrs)
    metrics = {key: value for key, value in final.items() if key not in ("lr",)}
    atomic_write_text(paths.metrics, json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    # The model file now holds the result. Checkpoints only serve to resume an interrupted run;
    # kept, they would let a rerun after a code change "resume" a finished run instead of training.
    prune_checkpoints(paths.checkpoints, 0)
    return metrics


def finite(values: dict[str, float]) -> dict[str, float]:
    return {key: value for key, value in values.items() if math.isfinite(value)}


def log_epoch(run, session: Session, row: dict, first_step: int) -> None:
    """The epoch's row to MLflow (at step = epoch), and its steps' learning rates (``lr_by_step``
    at step = the optimizer step: the first of the epoch, each change and the last)."""
    counts = {"skipped_steps": session.skipped_steps}
    if session.scaler is not None:
        counts["scaler_skipped_steps"] = session.scaler_skipped_steps
    drift = finite(drift_monitor(session).measures(session.history))
    run.log_metrics({**row, **counts, **drift}, step=row["epoch"])
    steps = session.step_lrs[first_step:]
    for index, (step, lr) in enumerate(steps):
        if index in (0, len(steps) - 1) or lr != steps[index - 1][1]:
            run.log_metrics({"lr_by_step": lr}, step=step)


def after_step(
    session: Session, world: World, verifier: Verifier | None, run, epoch: int, step: int
) -> None:
    """What runs after each training step: the verification by step (``train.verification``),
    then a checkpoint within the epoch (``train.checkpoint_every_steps``)."""
    run_step = (epoch - 1) * len(session.train_loader) + step
    if verifier is not None and verifier.due(run_step):
        verifier.verify(session, world, run, run_step, epoch)
    checkpoint_by_step(session, world, epoch, step)


def train_item(
    params: Params,
    item_name: str,
    manifest: Manifest,
    paths: TrainPaths,
    *,
    run=None,
    progress: bool | None = None,
    world: World = ONE_PROCESS,
) -> dict:
    """Train the item ``item_name`` of ``train.items`` on the manifest's train split (validating on
    val each epoch), resuming from a checkpoint when one fits; write the model, metrics and plots.

    ``run`` is an optional :class:`angular.train.tracking.StageRun` (per-epoch metrics; rank 0's).
    ``progress``: show a tqdm bar (default: when stderr is a terminal). ``world``: the processes
    that train together (:class:`angular.train.world.ProcessGroup`: every rank calls this). Returns
    the final epoch's metrics (on every rank).
    """
    item = params.item(item_name)
    if world.size > 1:
        check_supported(params, item)
    session = set_up(params, item_name, manifest, paths, world)
    if world.size > 1:
        session = spread_over(session, params, item, manifest, world)
    verifier = make_verifier(params, world)  # a bad set fails here, before training
    resume(session, world, run)
    if session.best is None and paths.best_model is not None and world.rank == 0:
        paths.best_model.unlink(missing_ok=True)  # an earlier run's
    if progress is None:
        progress = sys.stderr.isatty()
    config = session.config
    started = time.perf_counter()
    for epoch in range(session.start_epoch + 1, config.epochs + 1):
        world.begin_epoch(session.train_loader, epoch)
        epoch_steps = len(session.step_lrs)
        train_loss, train_accuracy = train_epoch(
            session,
            world,
            epoch,
            progress and world.rank == 0,
            partial(after_step, session, world, verifier, run),
        )
        if session.scheduler_by_step:  # the last step's (the schedule has moved on)
            lr = session.step_lrs[-1][1]
        else:
            lr = session.optimizer.param_groups[0]["lr"]
            session.scheduler.step()
        row = validate(session, world, epoch, lr, train_loss, train_accuracy)
        session.history.append(row)
        watch_collapse(session, epoch)
        if world.rank == 0:
            write_plots(paths, session.history, session.step_lrs)
        save_checkpoint(session, epoch, world)
        if run is not None:
            log_epoch(run, session, row, epoch_steps)
        if world.rank == 0:
            say(
                f"{session.label} epoch {epoch}/{config.epochs}: loss {train_loss:.4f} "
                f"acc {row['train_accuracy']:.4f} | val loss {row['val_loss']:.4f} "
                f"acc {row['val_accuracy']:.4f} ({time.perf_counter() - started:.1f} s)"
            )
    last_step = config.epochs * len(session.train_loader)
    if verifier is not None and (session.last_verification or {}).get("step") != last_step:
        verifier.verify(session, world, run, last_step, config.epochs)
    # The model file is written before any rank drops its checkpoints.
    final = world.from_rank_zero(partial(final_metrics, session))
    save_model(session, world, final, paths.model)
    metrics = world.from_rank_zero(partial(finish, session, final))
    if world.rank == 0:
        drop_other_worlds(paths.checkpoints, session.base_fingerprint, world.size)
    if world.size > 1:
        shutil.rmtree(session.checkpoints, ignore_errors=True)
    return metrics
