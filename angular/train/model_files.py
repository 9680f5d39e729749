"""Writing a run's model file on any world, without any rank holding a head too large to gather
(issue 28, part 7; docs/design.md, "Sharded softmax").

- One process, or several whose heads all fit ``train.distributed.gather_head_mib`` (the full
  centres, C x K x D x element size, in MiB): rank 0 keeps the one-process model, the heads are
  gathered into it (:meth:`angular.train.world.World.gather_heads`) and it writes today's model
  file, byte for byte.
- Several with a larger head: no rank gathers it. Each rank saves its shard of each large head
  to a temporary file next to the model file (``.<model file>.rank-<r>-of-<W>.shard``); rank 0
  reads them back memory-mapped (``torch.load(mmap=True, weights_only=True)``), so that
  ``torch.save`` writes the centres from the mapped pages and its memory never holds them whole,
  and writes the one model file (version 2, :mod:`angular.nn.recognition`: the shards and their
  class ranges; the heads that fit are gathered as today), atomically; then the shard files go.
  The ranks must share the model file's folder (one node, as torchrun's ``--standalone``, or a
  shared file system).

:func:`angular.nn.recognition.load_model` joins the shards, so every reader (``angular predict``,
export, galleries, MLflow) sees one model whatever the file's form.
"""

from __future__ import annotations

from pathlib import Path

import torch

from angular.files import atomic_save
from angular.nn.recognition import RecognitionModel
from angular.train.session import Session, model_file
from angular.train.world import World

__all__ = ["head_mib", "gathers", "heads_fit", "shard_path", "save_model"]


def head_mib(head: torch.nn.Module) -> float:
    """The MiB of a head's full centres (one-process or sharded head alike)."""
    k = getattr(head, "centres_per_class", 1)
    return head.num_classes * k * head.embedding_dim * head.weight.element_size() / 2**20


def gathers(model: RecognitionModel, limit_mib: float) -> bool:
    """Whether every head of ``model`` fits ``limit_mib``: the model file is then today's, of the
    full model that rank 0 keeps."""
    return all(head_mib(head) <= limit_mib for head in model.heads.values())


def heads_fit(heads: dict, num_classes: int, embedding_dim: int, limit_mib: float) -> bool:
    """:func:`gathers` from the heads' descriptions, before any head is built (fp32 centres; a
    sub-center head's ``k`` per class): set-up then keeps only each rank's shard of the centres
    of heads that do not fit (:func:`angular.nn.heads.keeping_shard`)."""
    return all(
        num_classes * spec.get("options", {}).get("k", 1) * embedding_dim * 4 / 2**20 <= limit_mib
        for spec in heads.values()
    )


def shard_path(path: Path, rank: int, world_size: int) -> Path:
    """Rank ``rank``'s temporary shard file for the model file ``path`` (hidden, next to it)."""
    path = Path(path)
    return path.parent / f".{path.name}.rank-{rank}-of-{world_size}.shard"


def save_model(session: Session, world: World, final: dict, path: Path) -> None:
    """Write the model file of the run as it is now at ``path``, with ``final`` in its training
    record (collective on several processes; see the module doc)."""
    if world.size == 1 or gathers(session.model, session.config.distributed.gather_head_mib):
        world.gather_heads(session.model, session.full_model)
        if world.rank == 0:
            atomic_save(model_file(session, final), path)
        return
    save_sharded(session, world, final, Path(path))


def save_sharded(session: Session, world: World, final: dict, path: Path) -> None:
    limit = session.config.distributed.gather_head_mib
    model = session.model
    large = [name for name, head in model.heads.items() if head_mib(head) > limit]
    state = {f"backbone.{key}": value for key, value in model.backbone.state_dict().items()}
    for name, head in model.heads.items():  # the heads that fit are gathered (collective)
        part = head.state_without_centres() if name in large else head.full_state_dict()
        state.update({f"heads.{name}.{key}": value for key, value in part.items()})
    mine = shard_path(path, world.rank, world.size)
    problem = None
    try:
        atomic_save(
            {
                "class_ranges": {
                    name: [
                        model.heads[name].class_start,
                        model.heads[name].class_start + model.heads[name].class_count,
                    ]
                    for name in large
                },
                "centres": {name: model.heads[name].weight.detach().cpu() for name in large},
            },
            mine,
        )
    except OSError as error:
        problem = f"rank {world.rank} could not write its shard file {mine}: {error}"
    if world.max_int(problem is not None):
        mine.unlink(missing_ok=True)
        raise OSError(problem or f"{path}: another rank could not write its shard file")

    def write() -> str | None:
        shards = [shard_path(path, rank, world.size) for rank in range(world.size)]
        try:
            parts = [
                torch.load(shard, map_location="cpu", weights_only=True, mmap=True)
                for shard in shards
            ]
            head_shards = {
                name: {
                    "centres_per_class": getattr(model.heads[name], "centres_per_class", 1),
                    "class_ranges": [part["class_ranges"][name] for part in parts],
                    "shards": [part["centres"][name] for part in parts],
                }
                for name in large
            }
            atomic_save(model_file(session, final, state, head_shards), path)
        except (OSError, RuntimeError, KeyError, ValueError) as error:
            return f"{path}: the model file could not be written from the shard files: {error}"
        finally:
            for shard in shards:
                shard.unlink(missing_ok=True)
        return None

    problem = world.from_rank_zero(write)
    if problem is not None:
        raise OSError(problem)
