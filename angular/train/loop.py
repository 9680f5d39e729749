"""Training one ``train@<item>`` (docs/design.md, Pipeline): a backbone and its head(s), checkpoints and resume.

- The loss is ``head.loss`` (the fused margin cross-entropy of :mod:`angular.ops`); a joint item sums
  the losses of its heads on one shared backbone (the original's combined mode).
- Determinism: one seed drives the weights, the shuffling (a seeded ``torch.Generator``) and the
  augmentations; with ``train.deterministic`` ``torch.use_deterministic_algorithms`` is on. On CPU
  two runs with the same params give bitwise identical models.
- A checkpoint per epoch (``epoch-0007.pt``), written atomically (a temp file in the same folder,
  fsync, ``os.replace``), holds the model, optimizer, scheduler, RNG states, history and epoch; the
  newest ``train.keep_checkpoints`` are kept while training, and all are removed once the model
  file is written. A rerun after an interruption resumes from the newest intact checkpoint (its
  zip archive's CRC-32 checks pass and it unpickles with ``weights_only``; a damaged one is
  skipped with a message naming it) written by the same configuration (a fingerprint of the
  params, the data and the model's tensor shapes), and ends with exactly the model of an
  uninterrupted run.
- A non-finite loss, or a non-finite gradient norm, stops training with
  :class:`NonFiniteLossError` naming the epoch and step (the last good checkpoint stays), or with
  ``train.on_nonfinite: skip`` the step is skipped and counted. Weights that turned non-finite
  anyway (a finite step to inf) stop training at the end of the epoch, before its checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
import zipfile
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from angular import devices
from angular.config import ConfigError, Params, TrainConfig, TrainItem
from angular.data import ImageDataset, Manifest, build_augmentation
from angular.files import atomic_save, atomic_write_text
from angular.nn.recognition import RecognitionModel, build_model, model_document
from angular.train.collapse import (
    REMEDY,
    CollapseError,
    CollapseMonitor,
    centre_cosine,
    collapse_room,
    embedding_spread,
    init_centres,
)
from angular.train.sampler import IndexedDataset, PrioritizedSampler
from angular.train.world import refuse_other_world_size

__all__ = [
    "TrainPaths",
    "NonFiniteLossError",
    "effective_label_smoothing",
    "select_device",
    "limit_threads",
    "train_item",
    "CHECKPOINT_PATTERN",
]

CHECKPOINT_PATTERN = "epoch-*.pt"
CHECKPOINT_FORMAT = "angular-checkpoint"
COLLAPSE_COLUMNS = ("centre_cosine", "embedding_spread")


class NonFiniteLossError(RuntimeError):
    """The loss turned NaN or infinite (``train.on_nonfinite: stop``)."""


@dataclasses.dataclass(frozen=True)
class TrainPaths:
    model: Path  # the final model file
    checkpoints: Path  # folder of per-epoch checkpoints
    metrics: Path  # JSON: final epoch's metrics
    loss_plot: Path  # TSV: train and val loss per epoch (DVC plots)
    accuracy_plot: Path  # TSV: train and val accuracy per epoch (DVC plots)
    collapse_plot: Path | None = None  # TSV: centre cosine and embedding spread per epoch


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


def _make_optimizer(config: TrainConfig, parameters) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            parameters, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    factory = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return factory(parameters, lr=config.lr, weight_decay=config.weight_decay)


def _constant(epoch: int) -> float:
    return 1.0


def _make_scheduler(config: TrainConfig, optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per epoch."""
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    if config.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=config.step_size, gamma=config.gamma
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _constant)


def describe_model(params: Params, item: TrainItem) -> tuple[dict, dict, dict]:
    """The ``backbone``, ``heads`` and ``image`` descriptions stored in the model file."""
    data = params.data
    backbone = {
        "name": params.model.backbone,
        "in_channels": data.channels,
        "embedding_dim": params.model.embedding_dim,
        "options": params.model.backbone_kwargs(data.image_size),
    }
    heads = {member: head.to_dict() for member, head in item.heads.items()}
    image = {
        "size": list(data.image_size),
        "channels": data.channels,
        "mean": list(data.mean),
        "std": list(data.std),
        # data.crop, so that serving cuts user images as prepare cut the training images
        "crop": None if data.crop is None else data.crop.model_dump(exclude_none=True),
    }
    return backbone, heads, image


def _fingerprint(
    params: Params, item: TrainItem, manifest: Manifest, model: torch.nn.Module
) -> str:
    """A hash of everything that shapes the training run (a checkpoint from another is not resumed):
    the params and data, and the names and shapes of the model's tensors (the model code may have
    changed since the checkpoint was written)."""
    backbone, heads, image = describe_model(params, item)
    architecture = [(name, list(tensor.shape)) for name, tensor in model.state_dict().items()]
    train = params.train.model_dump()
    for key in ("items", "keep_checkpoints", "preload_images"):
        train.pop(key)
    # One process: the section plays no part (and the fingerprints of earlier runs stay). Several:
    # the world size is checked on its own (angular.train.distributed), the timeout changes nothing.
    distributed = train.pop("distributed")
    if distributed["world_size"] > 1:
        train["distributed"] = {
            "backend": distributed["backend"],
            "sample_rate": distributed["sample_rate"],
        }
    data = [
        (r.path, r.md5, r.label, r.split) for r in manifest.records if r.split in ("train", "val")
    ]
    document = {
        "backbone": backbone,
        "heads": heads,
        "image": image,
        "train": train,
        "classes": list(manifest.classes),
        "data": data,
        "architecture": architecture,
    }
    return hashlib.sha256(json.dumps(document, sort_keys=True, default=str).encode()).hexdigest()


# --------------------------------------------------------------------------------------------------
# Checkpoints.


def _checkpoint_path(folder: Path, epoch: int) -> Path:
    return folder / f"epoch-{epoch:04d}.pt"


def _rng_state(generator: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "loader": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: Mapping, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["loader"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _damaged_member(path: Path) -> str | None:
    """The first member of the checkpoint's zip archive whose CRC-32 does not match its bytes, or
    None. ``torch.load`` does not check them: a flipped byte inside a tensor would load silently.
    Raises when the file is not a zip archive at all (truncated, empty, another format)."""
    with zipfile.ZipFile(path) as archive:
        return archive.testzip()


def _load_checkpoint(folder: Path, fingerprint: str, label: str) -> dict | None:
    """The newest readable checkpoint written by this configuration, or None. Leftover temp files
    (a save interrupted by a kill) and checkpoints of another configuration are removed."""
    for leftover in folder.glob(".*.tmp"):
        leftover.unlink(missing_ok=True)
    for path in sorted(folder.glob(CHECKPOINT_PATTERN), reverse=True):
        try:
            damaged = _damaged_member(path)
            state = None if damaged else torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            _say(f"{label}: checkpoint {path} is unreadable ({error}); trying an older one")
            continue
        if damaged:
            _say(
                f"{label}: checkpoint {path} is corrupt ({damaged} fails its CRC-32 check); "
                "trying an older one"
            )
            continue
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            _say(f"{label}: checkpoint {path} is not a checkpoint of angular; ignoring it")
            continue
        if state.get("fingerprint") != fingerprint:
            _say(
                f"{label}: checkpoints in {folder} come from other params; starting afresh "
                "(other params, data or model code make another run)"
            )
            for stale in folder.glob(CHECKPOINT_PATTERN):
                stale.unlink(missing_ok=True)
            return None
        return state
    return None


def _prune_checkpoints(folder: Path, keep: int) -> None:
    for path in sorted(folder.glob(CHECKPOINT_PATTERN), reverse=True)[keep:]:
        path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------
# The loop.


def _gradient_norm(model: torch.nn.Module, clip: float | None) -> torch.Tensor:
    """The total gradient norm, clipping the gradients to ``clip`` when it is set."""
    parameters = [p for p in model.parameters() if p.grad is not None]
    if clip is not None:
        return torch.nn.utils.clip_grad_norm_(parameters, clip)
    if not parameters:
        return torch.zeros(())
    return torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(p.grad.detach().float()) for p in parameters])
    )


def _non_finite_tensors(model: torch.nn.Module) -> list[str]:
    """Names of the model's floating tensors (weights and buffers) holding NaN or inf."""
    return [
        name
        for name, tensor in model.state_dict().items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]


def _kept_checkpoint(folder: Path) -> str:
    newest = sorted(folder.glob(CHECKPOINT_PATTERN))
    return (
        f"the last good checkpoint {newest[-1]} is kept"
        if newest
        else "no checkpoint was written yet"
    )


def _batch_loss(
    model: RecognitionModel, images, labels, autocast: bool, device: torch.device, reduction="mean"
):
    """Summed margin loss of the heads (per sample with ``reduction="none"``), and each head's
    count of correct arg-max predictions."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        embeddings = model(images)
    return _loss_of_embeddings(model, embeddings, labels, autocast, device, reduction)


def _loss_of_embeddings(
    model: RecognitionModel, embeddings, labels, autocast: bool, device, reduction="mean"
):
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        losses = [head.loss(embeddings, labels, reduction) for head in model.heads.values()]
    with torch.no_grad():
        detached = embeddings.detach().float()
        correct = {
            name: int((head.cosine(detached).argmax(1) == labels).sum())
            for name, head in model.heads.items()
        }
    return torch.stack([loss.float() for loss in losses]).sum(0), correct


@torch.no_grad()
def _evaluate(model: RecognitionModel, loader, autocast: bool, device) -> tuple[float, dict, float]:
    """Validation loss, each head's accuracy, and the spread of the validation embeddings."""
    model.eval()
    total_loss, count = 0.0, 0
    correct = {name: 0 for name in model.heads}
    embeddings = []
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            batch_embeddings = model(images)
        loss, batch_correct = _loss_of_embeddings(model, batch_embeddings, labels, autocast, device)
        embeddings.append(batch_embeddings.float())
        total_loss += float(loss) * len(labels)
        count += len(labels)
        for name, value in batch_correct.items():
            correct[name] += value
    spread = embedding_spread(torch.cat(embeddings)) if embeddings else math.nan
    accuracy = {name: value / max(count, 1) for name, value in correct.items()}
    return total_loss / max(count, 1), accuracy, spread


def _history_row(
    epoch, lr, train_loss, train_acc, val_loss, val_acc, model: RecognitionModel, spread, joint
) -> dict:
    centres = {name: centre_cosine(head.weight) for name, head in model.heads.items()}
    row = {
        "epoch": epoch,
        "train_loss": train_loss,
        "train_accuracy": sum(train_acc.values()) / len(train_acc),
        "val_loss": val_loss,
        "val_accuracy": sum(val_acc.values()) / len(val_acc),
        "lr": lr,
        "centre_cosine": max(centres.values()),  # the worst head's
        "embedding_spread": spread,
    }
    if joint:  # one accuracy and centre column per head as well
        for name in train_acc:
            row[f"train_accuracy_{name}"] = train_acc[name]
            row[f"val_accuracy_{name}"] = val_acc[name]
            row[f"centre_cosine_{name}"] = centres[name]
    return row


def _tsv(history: list[dict], columns: list[str]) -> str:
    lines = ["\t".join(columns)]
    for row in history:
        lines.append("\t".join(_format(row[c]) for c in columns))
    return "\n".join(lines) + "\n"


def _write_plots(paths: TrainPaths, history: list[dict]) -> None:
    columns = list(history[0])
    loss = ["epoch"] + [c for c in columns if c.endswith("_loss")]
    accuracy = ["epoch"] + [c for c in columns if "_accuracy" in c]
    atomic_write_text(paths.loss_plot, _tsv(history, loss))
    atomic_write_text(paths.accuracy_plot, _tsv(history, accuracy))
    if paths.collapse_plot is not None:
        collapse = ["epoch"] + [c for c in columns if c.startswith(COLLAPSE_COLUMNS)]
        atomic_write_text(paths.collapse_plot, _tsv(history, collapse))


def _format(value) -> str:
    return str(value) if isinstance(value, int) else f"{value:.6g}"


@dataclasses.dataclass
class _Session:
    """What one training run holds between its phases (set up, resume, epochs, finish)."""

    label: str
    item_name: str
    item: TrainItem
    config: TrainConfig
    device: torch.device
    model: RecognitionModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator
    train_loader: DataLoader
    val_loader: DataLoader
    descriptions: tuple[dict, dict, dict]  # backbone, heads, image (for the model file)
    fingerprint: str
    paths: TrainPaths
    classes: tuple[str, ...]
    history: list[dict] = dataclasses.field(default_factory=list)
    skipped_steps: int = 0
    start_epoch: int = 0
    collapse_epoch: int = 0  # the first epoch the monitor flagged (on_collapse: warn); 0: none
    collapse_room: float | None = None  # the smallest room of the item's heads (None: no bound)


def _set_up(params: Params, item_name: str, manifest: Manifest, paths: TrainPaths) -> _Session:
    """Seed everything, build the model, optimizer, schedule and data loaders. The order of the
    seeded steps is part of the result: changing it changes every trained model."""
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
    model = build_model(backbone_desc, heads_desc, num_classes, label_smoothing=smoothing).to(
        device
    )
    if config.channels_last:  # conv weights in NHWC; PyTorch then runs the convs in NHWC
        model = model.to(memory_format=torch.channels_last)
    for head in model.heads.values():
        init_centres(head, config.centre_norm)
    optimizer = _make_optimizer(config, model.parameters())
    scheduler = _make_scheduler(config, optimizer)
    train_loader, val_loader = _make_loaders(params, manifest, generator)
    room = _check_room(model, config, f"train@{item_name}")
    return _Session(
        label=f"train@{item_name}",
        item_name=item_name,
        item=item,
        config=config,
        device=device,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        generator=generator,
        train_loader=train_loader,
        val_loader=val_loader,
        descriptions=descriptions,
        fingerprint=_fingerprint(params, item, manifest, model),
        paths=paths,
        classes=tuple(manifest.classes),
        collapse_room=room,
    )


def _check_room(model: RecognitionModel, config: TrainConfig, label: str) -> float | None:
    """Warn about heads whose collapsed state sits less than ``train.collapse.min_room`` nats above
    chance: such a head can settle there (docs/design.md, Collapse). Returns the smallest room."""
    rooms = {}
    for name, head in model.heads.items():
        room = collapse_room(head.margin, head.num_classes, head.label_smoothing)
        if room is None:
            continue
        rooms[name] = room
        if room < config.collapse.min_room:
            _say(
                f"{label}: warning: {name}'s collapsed state (all centres on one direction) has a "
                f"loss only {room:.2f} nats above chance (log C = {math.log(head.num_classes):.2f}; "
                f"train.collapse.min_room is {config.collapse.min_room}); the head may collapse. "
                + REMEDY
            )
    return min(rooms.values()) if rooms else None


def _make_loaders(
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
        train_loader = DataLoader(
            train_set,
            batch_size=config.batch_size,
            shuffle=True,
            generator=generator,
            num_workers=config.num_workers,
            drop_last=drop_last,
        )
    val_loader = DataLoader(val_set, batch_size=max(config.batch_size, 256), shuffle=False)
    return train_loader, val_loader


def _resume(session: _Session, run) -> None:
    """Continue from the newest checkpoint this configuration wrote, if there is one."""
    session.paths.checkpoints.mkdir(parents=True, exist_ok=True)
    refuse_other_world_size(
        session.paths.checkpoints, session.fingerprint, 1, session.label, CHECKPOINT_PATTERN
    )
    state = _load_checkpoint(session.paths.checkpoints, session.fingerprint, session.label)
    if state is not None:
        _apply_checkpoint(session, state, run)


def _apply_checkpoint(session: _Session, state: dict, run) -> None:
    session.model.load_state_dict(state["model"])
    session.optimizer.load_state_dict(state["optimizer"])
    session.scheduler.load_state_dict(state["scheduler"])
    _restore_rng(state["rng"], session.generator)
    sampler = _prioritized(session)
    if sampler is not None:
        sampler.load_state_dict(state["sampler"])
    session.history = list(state["history"])
    session.skipped_steps = int(state["skipped_steps"])
    session.start_epoch = int(state["epoch"])
    session.collapse_epoch = int(state.get("collapse_epoch", 0))
    _say(f"{session.label}: resuming after epoch {session.start_epoch} of {session.config.epochs}")
    if run is not None:
        for row in session.history:
            run.log_metrics(row, step=row["epoch"])


def _prioritized(session: _Session) -> PrioritizedSampler | None:
    """The prioritized sampler of the training data (``train.sampler: prioritized``), or None."""
    sampler = session.train_loader.batch_sampler
    return sampler if isinstance(sampler, PrioritizedSampler) else None


def _take_step(
    session: _Session,
    loss: torch.Tensor,
    gradient_norm: Callable[[], torch.Tensor],
    epoch: int,
    step: int,
) -> bool:
    """Backpropagate ``loss`` and step the optimizer, unless the loss or the gradient norm
    (``gradient_norm()``, which also clips) is non-finite: then training stops or the step is
    skipped (``train.on_nonfinite``). Whether the optimizer stepped. The distributed trainer shares
    it: its loss is the global batch's and its norm the whole model's, so every rank decides alike."""
    optimizer = session.optimizer
    optimizer.zero_grad(set_to_none=True)
    problem = None if torch.isfinite(loss) else f"the loss is {float(loss.detach())}"
    if problem is None:
        loss.backward()
        norm = gradient_norm()
        if not torch.isfinite(norm):
            problem = f"the gradient norm is {float(norm)} (the loss is finite)"
    if problem is not None:
        if session.config.on_nonfinite == "stop":
            raise NonFiniteLossError(
                f"{session.label}: {problem} at epoch {epoch}, step {step}; training stopped "
                f"({_kept_checkpoint(session.paths.checkpoints)}). Lower train.lr, set "
                "train.grad_clip_norm, or set train.on_nonfinite: skip to skip such steps."
            )
        session.skipped_steps += 1
        optimizer.zero_grad(set_to_none=True)
        return False
    optimizer.step()
    return True


def _weights_broke(session: _Session, epoch: int, broken: list[str]) -> NonFiniteLossError:
    """The error for weights that turned non-finite during ``epoch`` (``broken``: their names on
    this process; empty when another rank found them)."""
    return NonFiniteLossError(
        f"{session.label}: the weights turned non-finite during epoch {epoch} "
        f"({', '.join(broken) or 'on another rank'}); training stopped "
        f"({_kept_checkpoint(session.paths.checkpoints)}). Lower train.lr or set "
        "train.grad_clip_norm."
    )


def _train_epoch(session: _Session, epoch: int, progress: bool) -> tuple[float, dict]:
    """One pass over the training data; returns the mean loss and each head's accuracy over the
    steps taken. A non-finite loss or gradient stops training or is skipped
    (``train.on_nonfinite``)."""
    from tqdm.auto import tqdm

    config, model = session.config, session.model
    model.train()
    total_loss, seen = 0.0, 0
    correct = {name: 0 for name in model.heads}
    bar = tqdm(
        session.train_loader,
        desc=f"{session.label} epoch {epoch}/{config.epochs}",
        disable=not progress,
        leave=False,
        unit="batch",
    )
    sampler = _prioritized(session)
    for step, (images, labels, *indices) in enumerate(bar, start=1):
        images, labels = images.to(session.device), labels.to(session.device)
        if sampler is None:
            loss, batch_correct = _batch_loss(model, images, labels, config.bf16, session.device)
        else:  # the per-sample losses, weighted by importance; they become the new priorities
            (indices,) = indices
            rows, batch_correct = _batch_loss(
                model, images, labels, config.bf16, session.device, reduction="none"
            )
            loss = (sampler.weights(indices).to(rows.device) * rows).mean()
        if not _take_step(
            session, loss, partial(_gradient_norm, model, config.grad_clip_norm), epoch, step
        ):
            continue
        if sampler is not None:
            sampler.update(indices, rows)
        total_loss += float(loss.detach()) * len(labels)
        seen += len(labels)
        for name, value in batch_correct.items():
            correct[name] += value
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    bar.close()
    # Finite losses and gradients can still step the weights to inf (a huge learning rate):
    # such a model is never checkpointed, so the last checkpoint stays a good one.
    broken = _non_finite_tensors(model)
    if broken:
        raise _weights_broke(session, epoch, broken)
    train_loss = total_loss / seen if seen else math.nan
    return train_loss, {name: value / max(seen, 1) for name, value in correct.items()}


def _watch_collapse(session: _Session, epoch: int) -> None:
    """Apply ``train.collapse`` to the history: stop before this epoch's checkpoint (the last good
    one stays), or warn once and go on (``train.on_collapse``)."""
    config = session.config
    monitor = CollapseMonitor(
        max_centre_cosine=config.collapse.max_centre_cosine,
        max_accuracy_drop=config.collapse.max_accuracy_drop,
    )
    verdict = monitor.verdict(session.history, len(session.classes))
    if verdict is None:
        return
    message = f"{session.label}: collapse at epoch {epoch}: {verdict}."
    if config.on_collapse == "stop":
        raise CollapseError(
            f"{message} Training stopped ({_kept_checkpoint(session.paths.checkpoints)}). "
            f"{REMEDY}; or set train.on_collapse: warn to train on."
        )
    if session.collapse_epoch == 0:
        session.collapse_epoch = epoch
        _say(f"{message} Training goes on (train.on_collapse: warn). {REMEDY}.")


def _save_checkpoint(session: _Session, epoch: int, extra: Mapping | None = None) -> None:
    sampler = _prioritized(session)
    atomic_save(
        {
            **(extra or {}),
            "format": CHECKPOINT_FORMAT,
            "fingerprint": session.fingerprint,
            "epoch": epoch,
            "model": session.model.state_dict(),
            "optimizer": session.optimizer.state_dict(),
            "scheduler": session.scheduler.state_dict(),
            "rng": _rng_state(session.generator),
            "history": session.history,
            "skipped_steps": session.skipped_steps,
            "collapse_epoch": session.collapse_epoch,
            **({} if sampler is None else {"sampler": sampler.state_dict()}),
        },
        _checkpoint_path(session.paths.checkpoints, epoch),
    )
    _prune_checkpoints(session.paths.checkpoints, session.config.keep_checkpoints)


def _finish(session: _Session) -> dict:
    """Write the model file, the final metrics and the plots; drop the checkpoints."""
    config, paths = session.config, session.paths
    final = dict(session.history[-1])
    final["skipped_steps"] = session.skipped_steps
    final["collapse_epoch"] = session.collapse_epoch
    if session.collapse_room is not None:
        final["collapse_room"] = session.collapse_room
    _write_plots(paths, session.history)
    backbone_desc, heads_desc, image = session.descriptions
    model_file = model_document(
        session.model,
        item=session.item_name,
        backbone=backbone_desc,
        heads=heads_desc,
        classes=session.classes,
        image=image,
        training={
            "epochs": config.epochs,
            "seed": config.seed,
            "fingerprint": session.fingerprint,
            "final": final,
        },
    )
    atomic_save(model_file, paths.model)
    metrics = {key: value for key, value in final.items() if key not in ("lr",)}
    atomic_write_text(paths.metrics, json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    # The model file now holds the result. Checkpoints only serve to resume an interrupted run;
    # kept, they would let a rerun after a code change "resume" a finished run instead of training.
    _prune_checkpoints(paths.checkpoints, 0)
    return metrics


def train_item(
    params: Params,
    item_name: str,
    manifest: Manifest,
    paths: TrainPaths,
    *,
    run=None,
    progress: bool | None = None,
) -> dict:
    """Train the item ``item_name`` of ``train.items`` on the manifest's train split (validating on
    val each epoch), resuming from a checkpoint when one fits; write the model, metrics and plots.

    ``run`` is an optional :class:`angular.train.tracking.StageRun` (per-epoch metrics).
    ``progress``: show a tqdm bar (default: when stderr is a terminal). Returns the final epoch's
    metrics.
    """
    session = _set_up(params, item_name, manifest, paths)
    _resume(session, run)
    if progress is None:
        progress = sys.stderr.isatty()
    config = session.config
    started = time.perf_counter()
    for epoch in range(session.start_epoch + 1, config.epochs + 1):
        train_loss, train_accuracy = _train_epoch(session, epoch, progress)
        lr = session.optimizer.param_groups[0]["lr"]
        session.scheduler.step()
        val_loss, val_accuracy, spread = _evaluate(
            session.model, session.val_loader, config.bf16, session.device
        )
        row = _history_row(
            epoch,
            lr,
            train_loss,
            train_accuracy,
            val_loss,
            val_accuracy,
            session.model,
            spread,
            session.item.joint,
        )
        session.history.append(row)
        _watch_collapse(session, epoch)
        _write_plots(paths, session.history)
        _save_checkpoint(session, epoch)
        if run is not None:
            run.log_metrics({**row, "skipped_steps": session.skipped_steps}, step=epoch)
        _say(
            f"{session.label} epoch {epoch}/{config.epochs}: loss {train_loss:.4f} "
            f"acc {row['train_accuracy']:.4f} | val loss {val_loss:.4f} "
            f"acc {row['val_accuracy']:.4f} ({time.perf_counter() - started:.1f} s)"
        )
    return _finish(session)
