"""A trained model: the file format, loading it without ``params.yaml``, and running it on images.

A model file (``torch.save`` of a dict of plain Python values and tensors, loadable with
``weights_only=True``) holds everything needed to rebuild and use the model::

    format: "angular-model", version: 1
    item:       the train item it came from ("arcface", "joint", ...)
    backbone:   {"name", "in_channels", "embedding_dim", "options"}     (angular.nn.backbones.build_backbone)
    heads:      {member name: {"type", "s", "m1", "m2", "m3", "lam_schedule", "straight_through", "fused_linear"}}
                (an adaptive head, angular.nn.adaptive, adds "options": its constructor's other arguments)
    classes:    the known identities, in label order
    image:      {"size": [h, w], "channels", "mean", "std", "crop"}      (angular.data preprocessing;
                crop: data.crop as a dict, or None, applied by serving to the user's images)
    state_dict: the RecognitionModel's state dict (backbone.* and heads.<member>.*)
    training:   a summary (epochs, seed, final metrics), for the record

A head too large to gather onto one rank (``train.distributed.gather_head_mib``) is saved by its
shards: such a file is version 2, its ``state_dict`` lacks ``heads.<member>.weight`` and it adds::

    head_shards: {member: {"centres_per_class": K, "class_ranges": [[start, stop], ...],
                           "shards": [the (stop - start) K x D centres of each range, ...]}}

(the ranges cover ``[0, C)`` in order, one per rank that trained it). :func:`load_model` joins
them into the full weight, so every reader sees one model whatever the file's form.

Inference uses ``head.logits`` (``s * cos``, no margin) per head, and the backbone's embedding.
With ``flip_test`` the embedding of an image is the sum of the normalised embeddings of the image
and of its horizontal mirror (a common test-time trick for faces); the logits always come from the
image itself, so that calibration and classification see what training saw.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from angular.nn.adaptive import ADAPTIVE_HEADS, build_adaptive_head
from angular.nn.backbones import build_backbone
from angular.nn.heads import LambdaSchedule, MarginHead, MarginSpec

__all__ = [
    "MODEL_FORMAT",
    "RecognitionModel",
    "build_model",
    "model_document",
    "join_shards",
    "load_model",
    "LoadedModel",
]

MODEL_FORMAT = "angular-model"
MODEL_VERSION = 1
SHARDED_VERSION = 2  # a head saved by its shards (the module doc)


class RecognitionModel(nn.Module):
    """A backbone and one or more margin heads on its embedding (several: the joint mode)."""

    def __init__(self, backbone: nn.Module, heads: Mapping[str, MarginHead]):
        super().__init__()
        if not heads:
            raise ValueError("heads must hold at least one head")
        self.backbone = backbone
        self.heads = nn.ModuleDict(dict(heads))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The embeddings (B, D) of a batch of images."""
        return self.backbone(images)

    def logits(self, embeddings: torch.Tensor) -> dict[str, torch.Tensor]:
        """Inference logits ``s * cos`` (no margin) of each head."""
        return {name: head.logits(embeddings) for name, head in self.heads.items()}


def _margin_from_dict(spec: Mapping) -> MarginSpec:
    schedule = spec.get("lam_schedule")
    return MarginSpec(
        s=spec["s"],
        m1=spec["m1"],
        m2=spec["m2"],
        m3=spec["m3"],
        lam_schedule=None if schedule is None else LambdaSchedule(**schedule),
    )


def build_model(
    backbone: Mapping,
    heads: Mapping[str, Mapping],
    num_classes: int,
    *,
    label_smoothing: float = 0.0,
) -> RecognitionModel:
    """Build an untrained model from the ``backbone`` and ``heads`` descriptions of a model file."""
    net = build_backbone(
        backbone["name"],
        in_channels=backbone["in_channels"],
        embedding_dim=backbone["embedding_dim"],
        **backbone.get("options", {}),
    )
    margin_heads = {
        name: _build_head(spec, backbone["embedding_dim"], num_classes, label_smoothing)
        for name, spec in heads.items()
    }
    return RecognitionModel(net, margin_heads)


def _build_head(spec: Mapping, embedding_dim: int, num_classes: int, label_smoothing: float):
    common = dict(
        label_smoothing=label_smoothing,
        straight_through=bool(spec.get("straight_through", False)),
        fused_linear=spec.get("fused_linear"),
    )
    if spec["type"] in ADAPTIVE_HEADS:  # rebuilt from its options; the margin follows from them
        return build_adaptive_head(
            spec["type"], embedding_dim, num_classes, s=spec["s"], options=spec["options"], **common
        )
    return MarginHead(embedding_dim, num_classes, _margin_from_dict(spec), **common)


def model_document(
    model: RecognitionModel | Mapping[str, torch.Tensor],
    *,
    item: str,
    backbone: Mapping,
    heads: Mapping[str, Mapping],
    classes: Sequence[str],
    image: Mapping,
    training: Mapping,
    head_shards: Mapping[str, Mapping] | None = None,
) -> dict:
    """The dict a model file holds (see the module doc): of ``model``, or of a state dict and
    ``head_shards`` (the sharded form, version 2)."""
    state = model.state_dict() if isinstance(model, nn.Module) else model
    document = {
        "format": MODEL_FORMAT,
        "version": MODEL_VERSION if not head_shards else SHARDED_VERSION,
        "item": item,
        "backbone": dict(backbone),
        "heads": {name: dict(spec) for name, spec in heads.items()},
        "classes": list(classes),
        "image": dict(image),
        "state_dict": {k: v.detach().cpu() for k, v in state.items()},
        "training": dict(training),
    }
    if head_shards:
        document["head_shards"] = {name: dict(entry) for name, entry in head_shards.items()}
    return document


def join_shards(
    state_dict: dict, head_shards, model: RecognitionModel, where: str
) -> dict[str, torch.Tensor]:
    """``state_dict`` with each sharded head's shards joined into ``heads.<member>.weight``,
    after checking that they are the head's centres: ranges that cover its classes in order, and
    shards of their shapes. A bad entry raises one ``ValueError`` naming ``where`` and the head."""
    if not isinstance(head_shards, dict) or not head_shards:
        raise ValueError(f"{where}: version {SHARDED_VERSION} needs a non-empty head_shards dict")
    state = dict(state_dict)
    for name, entry in head_shards.items():
        if name not in model.heads:
            raise ValueError(
                f"{where}: head_shards names {name!r}, which is not a head of the model"
            )
        key = f"heads.{name}.weight"
        if key in state:
            raise ValueError(f"{where}: head {name!r} is saved both whole ({key}) and as shards")
        state[key] = _joined_weight(entry, model.heads[name], f"{where}: head {name!r}")
    return state


def _joined_weight(entry, head: MarginHead, where: str) -> torch.Tensor:
    if not isinstance(entry, dict) or not {"centres_per_class", "class_ranges", "shards"} <= set(
        entry
    ):
        raise ValueError(f"{where}: a shard entry needs centres_per_class, class_ranges and shards")
    ranges, shards, k = entry["class_ranges"], entry["shards"], entry["centres_per_class"]
    rows, dim = head.weight.shape
    if not isinstance(k, int) or k < 1 or rows != head.num_classes * k:
        raise ValueError(
            f"{where}: centres_per_class {k!r} does not fit the head ({rows} centres for "
            f"{head.num_classes} classes)"
        )
    if not isinstance(ranges, list | tuple) or not isinstance(shards, list | tuple):
        raise ValueError(f"{where}: class_ranges and shards must be lists")
    if len(ranges) != len(shards) or not ranges:
        raise ValueError(
            f"{where}: {len(ranges)} class ranges for {len(shards)} shards (one range a shard)"
        )
    stop = 0
    for index, (bounds, shard) in enumerate(zip(ranges, shards)):
        if (
            not isinstance(bounds, list | tuple)
            or len(bounds) != 2
            or not all(isinstance(b, int) for b in bounds)
            or bounds[0] != stop
            or bounds[1] <= bounds[0]
        ):
            raise ValueError(
                f"{where}: shard {index}'s class range {bounds!r} does not start where the "
                f"previous one stopped ({stop}): the ranges must cover the classes in order"
            )
        expected = ((bounds[1] - bounds[0]) * k, dim)
        if not isinstance(shard, torch.Tensor) or tuple(shard.shape) != expected:
            shape = tuple(shard.shape) if isinstance(shard, torch.Tensor) else type(shard).__name__
            raise ValueError(
                f"{where}: shard {index} (classes [{bounds[0]}, {bounds[1]})) has shape {shape}, "
                f"expected {expected}"
            )
        stop = bounds[1]
    if stop != head.num_classes:
        raise ValueError(
            f"{where}: the shards cover classes [0, {stop}) of the head's {head.num_classes}"
        )
    return torch.cat(list(shards))


@dataclasses.dataclass
class LoadedModel:
    model: RecognitionModel
    item: str
    classes: list[str]
    image: dict  # {"size", "channels", "mean", "std", "crop" (absent in older files)}
    head_specs: dict[str, dict]
    training: dict

    @property
    def members(self) -> list[str]:
        return list(self.model.heads)


def load_model(path: str | Path, *, map_location: str | torch.device = "cpu") -> LoadedModel:
    """Load a model file written by training (no ``params.yaml`` needed); in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model file (run the train stage first)")
    try:
        document = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # a truncated or foreign file: say which
        raise ValueError(f"{path}: not a readable model file ({error})") from error
    if not isinstance(document, dict) or document.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path}: not an angular model file (no format: {MODEL_FORMAT!r})")
    version = document.get("version")
    if version not in (MODEL_VERSION, SHARDED_VERSION):
        raise ValueError(f"{path}: model file version {version} is not supported")
    model = build_model(document["backbone"], document["heads"], len(document["classes"]))
    state = document["state_dict"]
    if version == SHARDED_VERSION:  # a head saved by its shards: joined into the full weight
        state = join_shards(state, document.get("head_shards"), model, str(path))
    elif "head_shards" in document:
        raise ValueError(f"{path}: a version {MODEL_VERSION} model file with head_shards")
    model.load_state_dict(state)
    model.eval()
    return LoadedModel(
        model=model,
        item=document["item"],
        classes=list(document["classes"]),
        image=dict(document["image"]),
        head_specs=dict(document["heads"]),
        training=dict(document.get("training", {})),
    )
