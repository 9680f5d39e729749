"""Published weights: insightface arcface_torch's ``backbone.pth`` onto our :class:`IResNet`.

arcface_torch saves ``backbone.state_dict()`` of its IResNet: ``conv1``, ``bn1``, ``prelu``, the
blocks ``layer<stage>.<i>.{bn1, conv1, bn2, prelu, conv2, bn3, downsample.0, downsample.1}``, then
``bn2``, ``fc`` and ``features`` (the embedding BN). Our IResNet holds the same tensors with the same
shapes, in the same order, under its own module names (``features.<n>``, ``embedding.<n>``), which
earlier model files use; :func:`insightface_names` maps one onto the other from the names kept
beside the layers (``IResNet.INSIGHTFACE_STEM``, ``IBasicBlock.INSIGHTFACE_NAMES``,
``IResNet.INSIGHTFACE_EMBEDDING``).

A published file fits a model built as it was trained: ``in_channels`` 3 (RGB), ``input_size``
112x112 (the FC reads the 7x7 map) and ``embedding_dim`` 512, with the file's depth. Anything else
is refused with one line naming the file and the first key that does not fit; so is a file that is
not a plain state dict: it is read with ``torch.load(weights_only=True)``, which refuses any pickle
global (a downloaded file could otherwise run code when read).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from angular.nn.backbones import IBasicBlock, IResNet

__all__ = [
    "PUBLISHED_FORMATS",
    "PublishedWeightsError",
    "insightface_names",
    "insightface_state_dict",
    "load_insightface_backbone",
    "load_published_backbone",
]

PUBLISHED_FORMATS = ("insightface",)

# arcface_torch's block keys: layer<stage>.<index>.<rest>
_BLOCK_KEY = re.compile(r"layer([1-4])\.(\d+)\.")


class PublishedWeightsError(ValueError):
    """A weights file that cannot start the model: the message names the file and what is wrong."""


def insightface_names(backbone: IResNet) -> dict[str, str]:
    """Each key of ``backbone.state_dict()`` -> arcface_torch's name of that tensor, in our order
    (which is arcface_torch's)."""
    modules = dict(IResNet.INSIGHTFACE_STEM)
    position = len(IResNet.INSIGHTFACE_STEM)  # the blocks follow the stem in ``features``
    for stage, blocks in enumerate(backbone.blocks_per_stage, start=1):
        for index in range(blocks):
            for ours, theirs in IBasicBlock.INSIGHTFACE_NAMES.items():
                modules[f"features.{position}.{ours}"] = f"layer{stage}.{index}.{theirs}"
            position += 1
    modules.update(IResNet.INSIGHTFACE_EMBEDDING)
    names = {}
    for key in backbone.state_dict():
        module, _, tensor = key.rpartition(".")
        names[key] = f"{modules[module]}.{tensor}"
    return names


def insightface_state_dict(backbone: IResNet) -> dict[str, torch.Tensor]:
    """``backbone``'s tensors under arcface_torch's names, in its order: what its tools load as a
    ``backbone.pth``."""
    ours = backbone.state_dict()
    return {theirs: ours[key] for key, theirs in insightface_names(backbone).items()}


def load_published_backbone(backbone: nn.Module, format: str, path: str | Path) -> None:
    """Load the published weights file ``path`` of ``format`` (one of :data:`PUBLISHED_FORMATS`)
    into ``backbone``; :class:`PublishedWeightsError` when it does not fit."""
    if format != "insightface":
        raise PublishedWeightsError(
            f"unknown weights format {format!r}; expected one of {', '.join(PUBLISHED_FORMATS)}"
        )
    load_insightface_backbone(backbone, path)


def load_insightface_backbone(backbone: nn.Module, path: str | Path) -> None:
    """Copy the tensors of arcface_torch's ``backbone.pth`` at ``path`` into ``backbone`` (an
    :class:`IResNet`), all or none: every tensor must be there, with its shape, and nothing else."""
    path = Path(path)
    if not isinstance(backbone, IResNet):
        raise PublishedWeightsError(
            f"{path}: insightface weights are an IResNet's; the model's backbone is a "
            f"{type(backbone).__name__}"
        )
    state = _read_state_dict(path)
    _check_depth(state, backbone, path)
    names = insightface_names(backbone)
    ours = backbone.state_dict()
    loaded = {}
    for key, theirs in names.items():
        if theirs not in state:
            first = next(iter(state), None)
            raise PublishedWeightsError(
                f"{path}: missing key {theirs} (the file's first key is {first})"
            )
        loaded[key] = _checked(state[theirs], ours[key], theirs, path)
    expected = set(names.values())
    unexpected = [key for key in state if key not in expected]
    if unexpected:
        raise PublishedWeightsError(
            f"{path}: unexpected key {unexpected[0]} ({len(unexpected)} key(s) the "
            f"iresnet{backbone.depth} does not have)"
        )
    backbone.load_state_dict(loaded)


def _read_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    if not path.is_file():
        raise PublishedWeightsError(f"{path}: no such weights file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # not a torch file, truncated, or a pickle that needs globals
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        refused = [line for line in lines if "GLOBAL" in line]
        if refused:
            raise PublishedWeightsError(
                f"{path}: refused: loading it would import a pickle global, which could run code "
                f"({refused[0]}); a backbone.pth is a plain state dict of tensors"
            ) from None
        # torch's weights-only message is several lines, the reason in one of them
        reason = next((line for line in lines if "Unsupported" in line), None)
        reason = reason or (lines[0] if lines else type(error).__name__)
        raise PublishedWeightsError(f"{path}: not a readable torch file ({reason[:200]})") from None
    if not isinstance(state, Mapping) or not all(isinstance(key, str) for key in state):
        raise PublishedWeightsError(
            f"{path}: not a state dict (a mapping of tensor names to tensors), got "
            f"{type(state).__name__}"
        )
    return state


def _check_depth(state: Mapping, backbone: IResNet, path: Path) -> None:
    """A file of another depth is named as such, not by its first extra or missing block."""
    last = [-1, -1, -1, -1]
    for key in state:
        match = _BLOCK_KEY.match(key)
        if match:
            stage, index = int(match[1]) - 1, int(match[2])
            last[stage] = max(last[stage], index)
    found = tuple(index + 1 for index in last)
    if min(found) == 0 or found == tuple(backbone.blocks_per_stage):
        return  # no blocks in some stage: not an IResNet's file; the key checks say what is missing
    depth = {blocks: depth for depth, blocks in IResNet.LAYERS.items()}.get(found)
    holds = f"iresnet{depth}" if depth else "an iresnet"
    raise PublishedWeightsError(
        f"{path}: holds {holds} (blocks per stage {list(found)}), the model is "
        f"iresnet{backbone.depth} ({list(backbone.blocks_per_stage)})"
    )


def _checked(tensor, like: torch.Tensor, name: str, path: Path) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise PublishedWeightsError(f"{path}: {name} is a {type(tensor).__name__}, not a tensor")
    if tensor.shape != like.shape:
        raise PublishedWeightsError(
            f"{path}: {name} has shape {list(tensor.shape)}, the model's has {list(like.shape)} "
            "(published IResNets take 3-channel 112x112 images to 512-d embeddings)"
        )
    if tensor.is_floating_point() != like.is_floating_point():
        raise PublishedWeightsError(
            f"{path}: {name} has dtype {tensor.dtype}, expected {like.dtype}"
        )
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise PublishedWeightsError(f"{path}: {name} holds NaN or infinite values")
    return tensor
