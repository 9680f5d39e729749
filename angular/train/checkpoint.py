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
- Checkpoints of these same params written with another world size are refused with a message
  naming both (:func:`refuse_other_world_size`); they are not resharded.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from angular.config import ConfigError, Params, TrainItem
from angular.data import Manifest
from angular.files import atomic_save
from angular.train.session import Session, say
from angular.train.world import World

__all__ = [
    "CHECKPOINT_PATTERN",
    "CHECKPOINT_FORMAT",
    "describe_model",
    "fingerprint",
    "rank_folder",
    "checkpoints_to_keep",
    "refuse_other_world_size",
    "load_newest",
    "agreed_checkpoint",
    "resume",
    "save_checkpoint",
    "prune_checkpoints",
    "kept_checkpoint",
]

CHECKPOINT_PATTERN = "epoch-*.pt"
CHECKPOINT_FORMAT = "angular-checkpoint"
RANK_FOLDER = "rank-{rank}-of-{world_size}"
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
    train = params.train.model_dump()
    for key in ("items", "keep_checkpoints", "preload_images"):
        train.pop(key)
    # The keys of issue 28 at their defaults play no part, and fp32 and bf16 read as the bf16 flag
    # they replaced: the checkpoints of runs before them still resume.
    for key, default in TRAINING_CONTROL_DEFAULTS.items():
        if train[key] == default:
            train.pop(key)
    if train["precision"] in ("fp32", "bf16"):
        train["bf16"] = train.pop("precision") == "bf16"
    # One process: the section plays no part (and the fingerprints of earlier runs stay). Several:
    # the world size is checked on its own (refuse_other_world_size), the timeout changes nothing.
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


def refuse_other_world_size(
    checkpoints: Path, base_fingerprint: str, world_size: int, label: str, pattern: str
) -> None:
    """Raise :class:`ConfigError` when ``checkpoints`` holds checkpoints (files ``pattern``) of these
    same params (the one-process fingerprint ``base_fingerprint``) written with another world
    size. Checkpoints of other params are left to the usual rule (dropped on start)."""
    if not checkpoints.is_dir():
        return
    others = {} if world_size == 1 else {1: checkpoints}
    for folder in checkpoints.glob(RANK_FOLDER.format(rank=0, world_size="*")):
        other = world_size_of(folder)
        if other is not None and other != world_size:
            others[other] = folder
    for other, folder in sorted(others.items()):
        newest = sorted(folder.glob(pattern))
        if not newest:
            continue
        try:
            state = torch.load(newest[-1], map_location="cpu", weights_only=True)
        except Exception:  # unreadable: not a run to resume
            continue
        if not isinstance(state, dict):
            continue
        if state.get("base_fingerprint", state.get("fingerprint")) == base_fingerprint:
            raise ConfigError(
                "train.distributed.world_size",
                f"{label}: {checkpoints} holds the checkpoints of an interrupted run of these "
                f"params with world_size {other}, and this run has {world_size}; sharded "
                f"checkpoints are not resharded. Set train.distributed.world_size: {other} to "
                f"resume that run, or delete {checkpoints} to start afresh",
            )


# --------------------------------------------------------------------------------------------------
# Reading.


def checkpoint_path(folder: Path, epoch: int) -> Path:
    return folder / f"epoch-{epoch:04d}.pt"


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
    for path in sorted(folder.glob(CHECKPOINT_PATTERN), reverse=True):
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


def read_epoch(folder: Path, epoch: int, fingerprint: str) -> dict | None:
    """The checkpoint of ``epoch`` when it is intact and of this configuration, or None."""
    path = checkpoint_path(folder, epoch)
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
    """This rank's checkpoint of the newest epoch every rank has, or None on every rank (one
    process: the newest checkpoint)."""
    state = load_newest(folder, fingerprint, label)
    newest = 0 if state is None else int(state["epoch"])
    epoch = world.min_int(newest)
    if epoch == 0:
        return None
    if newest != epoch:  # killed a step ahead of another rank: take the epoch they share
        state = read_epoch(folder, epoch, fingerprint)
    if world.min_int(int(state is not None)) == 0:
        return None
    return state


def resume(session: Session, world: World, run) -> None:
    """Continue from the newest checkpoint this configuration wrote, if there is one; log the
    resumed history to ``run`` (a :class:`angular.train.tracking.StageRun`, or None)."""
    refuse_other_world_size(
        session.paths.checkpoints,
        session.base_fingerprint,
        world.size,
        session.label,
        CHECKPOINT_PATTERN,
    )
    session.checkpoints.mkdir(parents=True, exist_ok=True)
    state = agreed_checkpoint(session.checkpoints, session.fingerprint, session.label, world)
    if state is None:
        return
    session.model.load_state_dict(state["model"])
    session.optimizer.load_state_dict(state["optimizer"])
    session.scheduler.load_state_dict(state["scheduler"])
    restore_rng(state["rng"], session.generator)
    sampler = session.prioritized()
    if sampler is not None:
        sampler.load_state_dict(state["sampler"])
    session.history = list(state["history"])
    session.skipped_steps = int(state["skipped_steps"])
    session.start_epoch = int(state["epoch"])
    session.collapse_epoch = int(state.get("collapse_epoch", 0))
    session.step_lrs = [(int(step), float(lr)) for step, lr in state.get("step_lrs", [])]
    if session.scaler is not None:  # fp16 is in the fingerprint: the state is there
        session.scaler.load_state_dict(state["scaler"]["state"])
        session.scaler_skipped_steps = int(state["scaler"]["skipped_steps"])
        session.scaler_skips_in_a_row = int(state["scaler"]["skips_in_a_row"])
        session.scale_reported = bool(state["scaler"]["reported"])
    say(f"{session.label}: resuming after epoch {session.start_epoch} of {session.config.epochs}")
    if run is not None:
        for row in session.history:
            run.log_metrics(row, step=row["epoch"])


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


def save_checkpoint(session: Session, epoch: int, world: World) -> None:
    """Write this process's checkpoint of ``epoch`` and drop the oldest beyond those kept."""
    sampler = session.prioritized()
    # Several processes: which rank of which world wrote it, and the one-process fingerprint of
    # these params (refuse_other_world_size reads it).
    origin = (
        {}
        if world.size == 1
        else {
            "world_size": world.size,
            "rank": world.rank,
            "base_fingerprint": session.base_fingerprint,
        }
    )
    atomic_save(
        {
            **origin,
            "format": CHECKPOINT_FORMAT,
            "fingerprint": session.fingerprint,
            "epoch": epoch,
            "model": session.model.state_dict(),
            "optimizer": session.optimizer.state_dict(),
            "scheduler": session.scheduler.state_dict(),
            "rng": rng_state(session.generator),
            "history": session.history,
            "skipped_steps": session.skipped_steps,
            "collapse_epoch": session.collapse_epoch,
            **({} if sampler is None else {"sampler": sampler.state_dict()}),
            "step_lrs": session.step_lrs,
            **({} if session.scaler is None else {"scaler": scaler_state(session)}),
        },
        checkpoint_path(session.checkpoints, epoch),
    )
    prune_checkpoints(session.checkpoints, session.keep_checkpoints)


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
    for path in sorted(folder.glob(CHECKPOINT_PATTERN), reverse=True)[keep:]:
        path.unlink(missing_ok=True)


def kept_checkpoint(folder: Path) -> str:
    """What a stopped run leaves to resume from, for its error message."""
    newest = sorted(folder.glob(CHECKPOINT_PATTERN))
    return (
        f"the last good checkpoint {newest[-1]} is kept"
        if newest
        else "no checkpoint was written yet"
    )
