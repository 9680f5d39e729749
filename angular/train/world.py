"""What the one-process training path knows of runs on several processes
(:mod:`angular.train.distributed`), kept apart so that the stages that only read a model file do not
depend on the distributed code: the failure of a worker, the per-rank checkpoint folders, and the
refusal of checkpoints written with another world size (they are not resharded).
"""

from __future__ import annotations

from pathlib import Path

import torch

from angular.config import ConfigError

__all__ = ["WorkerError", "rank_folder", "refuse_other_world_size"]

RANK_FOLDER = "rank-{rank}-of-{world_size}"


class WorkerError(RuntimeError):
    """A worker of a distributed train stage failed, died or hung; the message names the ranks."""


def rank_folder(checkpoints: Path, rank: int, world_size: int) -> Path:
    """Where rank ``rank`` of ``world_size`` keeps its checkpoints (one process: ``checkpoints``)."""
    if world_size == 1:
        return checkpoints
    return checkpoints / RANK_FOLDER.format(rank=rank, world_size=world_size)


def _world_size_of(folder: Path) -> int | None:
    parts = folder.name.split("-")  # rank-0-of-4
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
        other = _world_size_of(folder)
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
