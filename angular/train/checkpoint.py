"""Checkpoints and resume, for one process or many (docs/design.md, Pipeline).

- A checkpoint per epoch (``epoch-0007.pt``), written atomically (a temp file in the same folder,
  fsync, ``os.replace``), holds the model, optimizer, scheduler, RNG states, history and epoch (and
  each step's learning rate, and in fp16 the loss scaler's state and counts); the
  newest ``train.keep_checkpoints`` are kept while training (at least two on several processes,
  since a kill can leave one rank an epoch ahead), and all are removed once the model file is
  written. On several processes each rank writes its own file (its shard of each head, the shared
  backbone, its optimizer and RNG states) in ``<checkpoints>/rank-<r>-of-<W>/`` (:func:`rank_folder`).
- A rerun resumes from the newest intact checkpoint (its zip archive's CRC-32 checks pass and it
  unpickles with ``weights_only``; a damaged one is skipped with a message naming it) written by the
  same configuration (:func:`fingerprint`: the params, the data and the model's tensor shapes); on
  several processes, from the newest epoch every rank still has (:func:`agreed_checkpoint`).
- ``train.checkpoint_every_steps`` N > 0 also writes a checkpoint every N training steps within an
  epoch (``epoch-0007-step-000120.pt``: 7 epochs done and 120 steps of the 8th); it holds besides
  the epoch's order and position (:class:`angular.train.sampler.EpochBatchSampler`) and the running
  sums of its history row, and a resume from it continues from that step as the uninterrupted run
  does, bitwise (with ``train.num_workers: 0``; loader workers draw their augmentations from seeds
  of their own).
- Checkpoints of these same params written with another world size W are resumed on this one, W'
  (:func:`moved_checkpoint`, :mod:`angular.train.reshard`), when they are newer than any of W':
  every rank of W' reads the W files of the newest step they all have, takes its rows of each
  head's centres and of their optimizer state (momentum, Adam's moments) from the W shards, and the
  replicated parts (backbone, its optimizer state, schedule, scaler, RNG, history) from rank 0's.
  The regrouped checkpoint is written at once in W''s folders and W's are removed, so a move is
  made once.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from collections.abc import Mapping
from functools import partial
from pathlib import Path

import torch

from angular.config import ConfigError, Params, TrainItem
from angular.data import Manifest
from angular.files import atomic_save
from angular.train.reshard import regrouped_state
from angular.train.sampler import EpochBatchSampler
from angular.train.session import EpochProgress, Session, say
from angular.train.world import World

__all__ = [
    "CHECKPOINT_PATTERN",
    "CHECKPOINT_FORMAT",
    "describe_model",
    "fingerprint",
    "rank_folder",
    "checkpoints_to_keep",
    "checkpoint_path",
    "place_of",
    "checkpoints_in",
    "moved_checkpoint",
    "drop_other_worlds",
    "load_newest",
    "agreed_checkpoint",
    "resume",
    "save_checkpoint",
    "checkpoint_by_step",
    "non_finite_tensors",
    "prune_checkpoints",
    "kept_checkpoint",
]

CHECKPOINT_PATTERN = "epoch-*.pt"
CHECKPOINT_FORMAT = "angular-checkpoint"
RANK_FOLDER = "rank-{rank}-of-{world_size}"
# A checkpoint's place in the run, one comparable integer: epochs done * STEP_SPAN + steps into the
# next (an int64 that every rank's minimum is taken of).
STEP_SPAN = 1_000_000_000
TRAINING_CONTROL_DEFAULTS = {
    "accumulate": 1,
    "warmup_steps": 0,
    "warmup_epochs": 0.0,
    "poly_power": 2.0,
}


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


def fingerprint(params: Params, item: TrainItem, manifest: Manifest, model: torch.nn.Module) -> str:
    """A hash of everything that shapes the training run (a checkpoint from another is not resumed):
    the params and data, and the names and shapes of the model's tensors (the model code may have
    changed since the checkpoint was written)."""
    backbone, heads, image = describe_model(params, item)
    architecture = [(name, list(tensor.shape)) for name, tensor in model.state_dict().items()]
    # A head that kept one shard of its centres (angular.nn.heads.keeping_shard) counts as whole.
    for head_name, head in getattr(model, "heads", {}).items():
        if getattr(head, "kept_classes", None) is not None:
            per_class = getattr(head, "centres_per_class", 1)
            whole = [head.num_classes * per_class, head.embedding_dim]
            key = f"heads.{head_name}.weight"
            architecture = [(n, whole if n == key else shape) for n, shape in architecture]
    train = params.train.model_dump()
    # What only decides what is saved or scored, not the weights, plays no part.
    for key in (
        "items",
        "keep_checkpoints",
        "preload_images",
        "checkpoint_every_steps",
        "verification",
    ):
        train.pop(key)
    # The keys of issue 28 at their defaults play no part, and fp32 and bf16 read as the bf16 flag
    # they replaced: the checkpoints of runs before them still resume.
    for key, default in TRAINING_CONTROL_DEFAULTS.items():
        if train[key] == default:
            train.pop(key)
    if train["precision"] in ("fp32", "bf16"):
        train["bf16"] = train.pop("precision") == "bf16"
    # One process: the section plays no part (and the fingerprints of earlier runs stay). Several:
    # the world size plays no part (another one resumes, regrouped), the timeout changes nothing.
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
    # Added only when used, so that earlier runs' fingerprints stay: a RecordIO set's rows are
    # image indices, so its own fingerprint (index and file sizes) stands for the images; and the
    # published weights a run started from.
    recordio = manifest.info.get("recordio")
    if recordio is not None:
        document["recordio"] = recordio["fingerprint"]
    if params.model.init_from is not None:
        document["init_from"] = params.model.init_from.model_dump()
    return hashlib.sha256(json.dumps(document, sort_keys=True, default=str).encode()).hexdigest()


# --------------------------------------------------------------------------------------------------
# Folders and world sizes.


def rank_folder(checkpoints: Path, rank: int, world_size: int) -> Path:
    """Where rank ``rank`` of ``world_size`` keeps its checkpoints (one process: ``checkpoints``)."""
    if world_size == 1:
        return checkpoints
    return checkpoints / RANK_FOLDER.format(rank=rank, world_size=world_size)


def checkpoints_to_keep(keep: int, world_size: int) -> int:
    """``train.keep_checkpoints``; at least two on several processes (a kill can leave one rank an
    epoch ahead of another, and the rerun takes the epoch they share)."""
    return keep if world_size == 1 else max(2, keep)


def world_size_of(folder: Path) -> int | None:
    """The world size a rank folder's name gives (``rank-0-of-4``: 4), or None."""
    parts = folder.name.split("-")
    if len(parts) == 4 and parts[0] == "rank" and parts[2] == "of" and parts[3].isdigit():
        return int(parts[3])
    return None


def moved_checkpoint(
    checkpoints: Path, base_fingerprint: str, world_size: int, newer_than: int
) -> tuple[int, int, list[Path]] | None:
    """The newest checkpoint of these same params (the one-process fingerprint
    ``base_fingerprint``) that another world size W wrote, when it stands later in the run than
    ``newer_than`` (a place, :func:`place_of`): ``(W, place, the W files in rank order)``, or
    None. Only a place every rank of W has, intact, counts."""
    if not checkpoints.is_dir():
        return None
    worlds = {} if world_size == 1 else {1: [checkpoints]}
    for folder in checkpoints.glob(RANK_FOLDER.format(rank=0, world_size="*")):
        other = world_size_of(folder)
        if other is not None and other != world_size:
            worlds[other] = [rank_folder(checkpoints, rank, other) for rank in range(other)]
    best = None
    for other, folders in sorted(worlds.items()):
        shared = set.intersection(*({place_of(p) for p in checkpoints_in(f)} for f in folders))
        for place in sorted(shared, reverse=True):
            if place <= max(newer_than, best[1] if best else 0):
                break
            paths = [place_path(folder, place) for folder in folders]
            if all(of_these_params(path, base_fingerprint) for path in paths):
                best = (other, place, paths)
                break
    return best


def drop_other_worlds(checkpoints: Path, base_fingerprint: str, world_size: int) -> None:
    """Once a run of these params has finished: remove the checkpoints of these params that other
    world sizes left (older than what finished, else they would have been moved), which a rerun
    would otherwise resume."""
    if not checkpoints.is_dir():
        return
    if world_size != 1:
        for path in checkpoints_in(checkpoints):
            if of_these_params(path, base_fingerprint):
                path.unlink(missing_ok=True)
    for folder in checkpoints.glob(RANK_FOLDER.format(rank="*", world_size="*")):
        other = world_size_of(folder)
        if other is None or other == world_size or not folder.is_dir():
            continue
        if any(of_these_params(path, base_fingerprint) for path in checkpoints_in(folder)):
            shutil.rmtree(folder, ignore_errors=True)


def of_these_params(path: Path, base_fingerprint: str) -> bool:
    """Whether ``path`` is an intact checkpoint of these params (written on any world size)."""
    try:
        if damaged_member(path):
            return False
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return False
    return (
        isinstance(state, dict)
        and state.get("format") == CHECKPOINT_FORMAT
        and state.get("base_fingerprint", state.get("fingerprint")) == base_fingerprint
    )


# --------------------------------------------------------------------------------------------------
# Names and places.


def checkpoint_path(folder: Path, epoch: int, step: int = 0) -> Path:
    """``epoch-0007.pt`` after epoch 7; ``epoch-0007-step-000120.pt`` after 120 steps of epoch 8."""
    return folder / (
        f"epoch-{epoch:04d}.pt" if step == 0 else f"epoch-{epoch:04d}-step-{step:06d}.pt"
    )


def place_of(path: Path) -> int | None:
    """Where the checkpoint ``path`` stands in the run (epochs done * STEP_SPAN + steps into the
    next, read from its name), or None when the name is not a checkpoint's."""
    parts = path.name.removesuffix(".pt").split("-") if path.name.endswith(".pt") else []
    if len(parts) == 2 and parts[0] == "epoch" and parts[1].isdigit():
        return int(parts[1]) * STEP_SPAN
    if (
        len(parts) == 4
        and (parts[0], parts[2]) == ("epoch", "step")
        and parts[1].isdigit()
        and parts[3].isdigit()
        and 0 < int(parts[3]) < STEP_SPAN
    ):
        return int(parts[1]) * STEP_SPAN + int(parts[3])
    return None


def place_path(folder: Path, place: int) -> Path:
    return checkpoint_path(folder, place // STEP_SPAN, place % STEP_SPAN)


def state_place(state: Mapping) -> int:
    return int(state["epoch"]) * STEP_SPAN + int(state.get("step", 0))


def checkpoints_in(folder: Path) -> list[Path]:
    """The checkpoints in ``folder``, oldest first."""
    found = ((place_of(path), path) for path in folder.glob(CHECKPOINT_PATTERN))
    return [path for place, path in sorted(item for item in found if item[0] is not None)]


# --------------------------------------------------------------------------------------------------
# Reading.


def damaged_member(path: Path) -> str | None:
    """The first member of the checkpoint's zip archive whose CRC-32 does not match its bytes, or
    None. ``torch.load`` does not check them: a flipped byte inside a tensor would load silently.
    Raises when the file is not a zip archive at all (truncated, empty, another format)."""
    with zipfile.ZipFile(path) as archive:
        return archive.testzip()


def load_newest(folder: Path, fingerprint: str, label: str) -> dict | None:
    """The newest readable checkpoint written by this configuration, or None. Leftover temp files
    (a save interrupted by a kill) and checkpoints of another configuration are removed."""
    for leftover in folder.glob(".*.tmp"):
        leftover.unlink(missing_ok=True)
    for path in reversed(checkpoints_in(folder)):
        try:
            damaged = damaged_member(path)
            state = None if damaged else torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            say(f"{label}: checkpoint {path} is unreadable ({error}); trying an older one")
            continue
        if damaged:
            say(
                f"{label}: checkpoint {path} is corrupt ({damaged} fails its CRC-32 check); "
                "trying an older one"
            )
            continue
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            say(f"{label}: checkpoint {path} is not a checkpoint of angular; ignoring it")
            continue
        if state.get("fingerprint") != fingerprint:
            say(
                f"{label}: checkpoints in {folder} come from other params; starting afresh "
                "(other params, data or model code make another run)"
            )
            for stale in folder.glob(CHECKPOINT_PATTERN):
                stale.unlink(missing_ok=True)
            return None
        return state
    return None


def read_place(folder: Path, place: int, fingerprint: str) -> dict | None:
    """The checkpoint at ``place`` when it is intact and of this configuration, or None."""
    path = place_path(folder, place)
    try:
        if damaged_member(path):
            return None
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    if isinstance(state, dict) and state.get("fingerprint") == fingerprint:
        return state
    return None


def agreed_checkpoint(folder: Path, fingerprint: str, label: str, world: World) -> dict | None:
    """This rank's checkpoint of the newest place every rank has, or None on every rank (one
    process: the newest checkpoint)."""
    state = load_newest(folder, fingerprint, label)
    newest = 0 if state is None else state_place(state)
    place = world.min_int(newest)
    if place == 0:
        return None
    if newest != place:  # killed a step ahead of another rank: take the place they share
        state = read_place(folder, place, fingerprint)
    if world.min_int(int(state is not None)) == 0:
        return None
    return state


def resume(session: Session, world: World, run) -> None:
    """Continue from the newest checkpoint of these params, written by this world size or another
    (then regrouped, :func:`moved_checkpoint`), if there is one; log the resumed history to
    ``run`` (a :class:`angular.train.tracking.StageRun`, or None)."""
    session.checkpoints.mkdir(parents=True, exist_ok=True)
    state = agreed_checkpoint(session.checkpoints, session.fingerprint, session.label, world)
    own = 0 if state is None else state_place(state)
    moved = world.from_rank_zero(
        partial(
            moved_checkpoint, session.paths.checkpoints, session.base_fingerprint, world.size, own
        )
    )
    if moved is not None:
        move(session, world, *moved)
    elif state is not None:
        load_state(session, state)
    else:
        return
    where = f"after epoch {session.start_epoch}"
    if session.progress is not None:
        where = f"at step {session.progress.step} of epoch {session.progress.epoch}"
    say(f"{session.label}: resuming {where} of {session.config.epochs}")
    if run is not None:
        for row in session.history:
            run.log_metrics(row, step=row["epoch"])


def move(session: Session, world: World, old_size: int, place: int, paths: list[Path]) -> None:
    """Load this rank's state regrouped from the checkpoint of ``old_size`` ranks at ``place``
    (files ``paths``); it is written at once in this world's folders, then the old world's are
    removed."""
    states = [torch.load(p, map_location="cpu", weights_only=True, mmap=True) for p in paths]
    try:
        state = regrouped_state(states, session.model, session.optimizer)
    except ValueError as error:
        raise ConfigError(
            "train.distributed.world_size",
            f"{session.label}: the checkpoint of {old_size} ranks at {paths[0].parent} does not "
            f"regroup onto {world.size}: {error}. Delete {session.paths.checkpoints} to start "
            "afresh",
        ) from None
    del states
    state["fingerprint"] = session.fingerprint
    load_state(session, state)
    save_checkpoint(session, place // STEP_SPAN, world, step=place % STEP_SPAN)
    if world.min_int(1) and world.rank == 0:  # every rank has written its file
        for path in paths:
            if path.parent == session.paths.checkpoints:  # one process's folder holds the run's
                for old in checkpoints_in(path.parent):
                    old.unlink(missing_ok=True)
            else:
                shutil.rmtree(path.parent, ignore_errors=True)
    say(
        f"{session.label}: moved the checkpoint of {old_size} rank{'s' * (old_size > 1)} "
        f"({paths[0].name}) onto {world.size}: the centres and their optimizer state regrouped"
    )


def load_state(session: Session, state: Mapping) -> None:
    """Put a checkpoint's state into the session; within an epoch, the loader continues where it
    stopped (its RNG is restored once the epoch's pass has started, :func:`train_epoch`)."""
    session.model.load_state_dict(state["model"])
    session.optimizer.load_state_dict(state["optimizer"])
    session.scheduler.load_state_dict(state["scheduler"])
    session.history = list(state["history"])
    session.skipped_steps = int(state["skipped_steps"])
    session.start_epoch = int(state["epoch"])
    session.collapse_epoch = int(state.get("collapse_epoch", 0))
    session.drift_epoch = int(state.get("drift_epoch", 0))
    session.step_lrs = [(int(step), float(lr)) for step, lr in state.get("step_lrs", [])]
    session.best = state.get("best")
    if session.scaler is not None:  # fp16 is in the fingerprint: the state is there
        session.scaler.load_state_dict(state["scaler"]["state"])
        session.scaler_skipped_steps = int(state["scaler"]["skipped_steps"])
        session.scaler_skips_in_a_row = int(state["scaler"]["skips_in_a_row"])
        session.scale_reported = bool(state["scaler"]["reported"])
    sampler = session.prioritized()
    if sampler is not None:
        sampler.load_state_dict(state["sampler"])
    step = int(state.get("step", 0))
    if step == 0:
        session.progress = None
        restore_rng(state["rng"], session.generator)
        return
    partial_sums = state["partial"]
    session.progress = EpochProgress(
        session.start_epoch + 1,
        step=step,
        position=int(state["position"]),
        total_loss=float(partial_sums["total_loss"]),
        seen=int(partial_sums["seen"]),
        correct={name: int(value) for name, value in partial_sums["correct"].items()},
    )
    session.resume_rng = state["rng"]
    if sampler is not None:
        sampler.resume_after(step)
    else:
        session.train_loader.batch_sampler.resume(state["order"], session.progress.position)


def restore_rng(state: Mapping, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["loader"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------------
# Writing.


def rng_state(generator: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "loader": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_checkpoint(session: Session, epoch: int, world: World, step: int = 0) -> None:
    """Write this process's checkpoint after ``epoch`` epochs and ``step`` steps of the next, and
    drop the oldest beyond those kept."""
    sampler = session.prioritized()
    # Several processes: which rank of which world wrote it. Any: the one-process fingerprint of
    # these params (another world size resumes it) and the names of the optimizer's parameters.
    origin = {} if world.size == 1 else {"world_size": world.size, "rank": world.rank}
    within = {}
    if step:
        done = session.progress
        batches = session.train_loader.batch_sampler
        within = {
            "position": done.position,
            "partial": {"total_loss": done.total_loss, "seen": done.seen, "correct": done.correct},
            **({"order": batches.order} if isinstance(batches, EpochBatchSampler) else {}),
        }
    atomic_save(
        {
            **origin,
            "base_fingerprint": session.base_fingerprint,
            "format": CHECKPOINT_FORMAT,
            "fingerprint": session.fingerprint,
            "epoch": epoch,
            "step": step,
            **within,
            "model": session.model.state_dict(),
            "parameter_names": [name for name, _ in session.model.named_parameters()],
            "optimizer": session.optimizer.state_dict(),
            "scheduler": session.scheduler.state_dict(),
            # Resumed within an epoch and not yet restored (a moved checkpoint): the pending RNG.
            "rng": session.resume_rng or rng_state(session.generator),
            "history": session.history,
            "skipped_steps": session.skipped_steps,
            "collapse_epoch": session.collapse_epoch,
            "drift_epoch": session.drift_epoch,
            **({} if sampler is None else {"sampler": sampler.state_dict()}),
            "step_lrs": session.step_lrs,
            **({} if session.scaler is None else {"scaler": scaler_state(session)}),
            **({} if session.best is None else {"best": session.best}),
        },
        checkpoint_path(session.checkpoints, epoch, step),
    )
    prune_checkpoints(session.checkpoints, session.keep_checkpoints)


def non_finite_tensors(model: torch.nn.Module) -> list[str]:
    """Names of the model's floating tensors (weights and buffers) holding NaN or inf."""
    return [
        name
        for name, tensor in model.state_dict().items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]


def checkpoint_by_step(session: Session, world: World, epoch: int, step: int) -> None:
    """After step ``step`` of ``epoch``: a checkpoint within the epoch when the run's step count is
    a multiple of ``train.checkpoint_every_steps`` (the epoch's end writes its own), unless the
    weights turned non-finite (the epoch's end stops training then; the last good one stays)."""
    every, steps = session.config.checkpoint_every_steps, len(session.train_loader)
    if every == 0 or step >= steps or ((epoch - 1) * steps + step) % every:
        return
    if world.max_int(len(non_finite_tensors(session.model))):
        return
    save_checkpoint(session, epoch - 1, world, step=step)


def scaler_state(session: Session) -> dict:
    """The fp16 loss scaler's state (scale, growth count) and its counts, for a bitwise resume."""
    return {
        "state": session.scaler.state_dict(),
        "skipped_steps": session.scaler_skipped_steps,
        "skips_in_a_row": session.scaler_skips_in_a_row,
        "reported": session.scale_reported,
    }


def prune_checkpoints(folder: Path, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints in ``folder``."""
    found = checkpoints_in(folder)
    for path in found[: max(0, len(found) - keep)]:
        path.unlink(missing_ok=True)


def kept_checkpoint(folder: Path) -> str:
    """What a stopped run leaves to resume from, for its error message."""
    newest = checkpoints_in(folder) if folder.is_dir() else []
    return (
        f"the last good checkpoint {newest[-1]} is kept"
        if newest
        else "no checkpoint was written yet"
    )
