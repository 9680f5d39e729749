"""Verification on insightface's ``.bin`` sets with a model being trained or evaluated: the
images decoded once per file and format (cached), embedded in batches, scored by
:func:`angular.eval.bins.bin_metrics` (insightface's protocol; that module's doc says how).

It lives in ``train`` because it joins two layers that may not import each other: reading a set
(:func:`angular.data.load_bin`) and preprocessing (:mod:`angular.data.images`) with the metrics of
:mod:`angular.eval.bins`. The training loop (``train.verification``) and the evaluate stage
(``evaluate.verification.bins``) both call it.

``data`` is the ``data`` section of the params (:class:`angular.config.DataConfig`), or anything
with its ``image_size``, ``channels``, ``mean`` and ``std``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from angular.data import DataError, load_bin, load_image, normalize
from angular.eval.bins import bin_metrics

__all__ = [
    "bin_inputs",
    "bin_pixels",
    "bin_stems",
    "clear_bin_cache",
    "embed_bin",
    "embed_bins",
    "load_bin_set",
    "verify_bins",
]

# (resolved path, size, mtime, image_size, channels) -> (uint8 pixels (2P, C, H, W), same (P,))
_CACHE: dict[tuple, tuple[torch.Tensor, np.ndarray]] = {}


def bin_pixels(images: np.ndarray, data) -> torch.Tensor:
    """The (N, H, W, 3) uint8 RGB images of a set as (N, C, H, W) uint8 in the model's format
    (``data.image_size``, ``data.channels``), converted exactly as :func:`load_image` converts a
    photograph (grey by PIL's luma, bilinear resize)."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(
            f"images must be (N, height, width, 3) uint8 RGB, got {images.dtype} "
            f"{tuple(images.shape)}"
        )
    height, width = data.image_size
    if data.channels == 3 and images.shape[1:3] == (height, width):
        return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # nothing to convert
    converted = torch.empty((len(images), data.channels, height, width), dtype=torch.uint8)
    for index, image in enumerate(images):
        encoded = io.BytesIO()  # lossless: load_image then converts as it does any file
        Image.fromarray(image).save(encoded, format="PNG", compress_level=0)
        encoded.seek(0)
        converted[index] = load_image(encoded, image_size=(height, width), channels=data.channels)
    return converted


def bin_inputs(images: np.ndarray, data) -> torch.Tensor:
    """The (N, H, W, 3) uint8 RGB images of a set as the float (N, C, H, W) batch the model
    expects: :func:`bin_pixels`, then ``(x / 255 - data.mean) / data.std``."""
    return normalize(bin_pixels(images, data), data.mean, data.std)


def load_bin_set(path: str | Path, data) -> tuple[torch.Tensor, np.ndarray]:
    """``(pixels, same)`` of a ``.bin``: :func:`bin_pixels` of its images (uint8, normalised
    batch by batch when embedded) and its pairs' same-ness. Decoded once per file (as long as its
    size and modification time stay the same) and format; :func:`clear_bin_cache` frees them."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror or error})") from None
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns, tuple(data.image_size))
    key += (data.channels,)
    if key not in _CACHE:
        for old in [k for k in _CACHE if k[0] == key[0] and k[3:] == key[3:]]:
            del _CACHE[old]  # the file changed: drop its stale decoding
        images, same = load_bin(path)
        if same.all() or not same.any():  # also no pairs at all
            raise DataError(
                f"{path}: {int(same.sum())} same and {int((~same).sum())} different pairs; a "
                "verification set needs both"
            )
        _CACHE[key] = (bin_pixels(images, data), same)
    return _CACHE[key]


def clear_bin_cache() -> None:
    """Forget every decoded set."""
    _CACHE.clear()


def _device_of(embed) -> torch.device:
    if isinstance(embed, torch.nn.Module):
        for tensor in embed.parameters():
            return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def embed_bin(
    embed: Callable[[torch.Tensor], torch.Tensor],
    pixels: torch.Tensor,
    data,
    *,
    batch_size: int = 256,
    flip: bool = True,
    device: str | torch.device | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """``(embeddings, flipped)`` (float32 numpy, ``flipped`` None without ``flip``) of a set's
    :func:`bin_pixels`, ``batch_size`` images at a time on ``device`` (default: where ``embed``'s
    parameters are, else the CPU). A module is put in eval mode and given back in its mode."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    device = _device_of(embed) if device is None else torch.device(device)
    training = isinstance(embed, torch.nn.Module) and embed.training
    if training:
        embed.eval()
    outputs: list[list[torch.Tensor]] = [[], []]
    try:
        for start in range(0, len(pixels), batch_size):
            batch = normalize(pixels[start : start + batch_size], data.mean, data.std).to(device)
            for kind, images in enumerate((batch, batch.flip(-1)) if flip else (batch,)):
                found = embed(images)
                if found.ndim != 2 or len(found) != len(images):
                    raise ValueError(
                        f"embed gave shape {tuple(found.shape)} for {len(images)} images; "
                        "expected (images, embedding dimension)"
                    )
                outputs[kind].append(found.float().cpu())
    finally:
        if training:
            embed.train()
    embeddings = torch.cat(outputs[0]).numpy()
    return embeddings, torch.cat(outputs[1]).numpy() if flip else None


def bin_stems(bins: Sequence[str | Path]) -> list[str]:
    """The sets' names (file stems: ``lfw``, ``cfp_fp``); repeated names are a ``ValueError``."""
    stems = [Path(path).stem for path in bins]
    repeated = sorted({stem for stem in stems if stems.count(stem) > 1})
    if repeated:
        raise ValueError(f"verification sets must have distinct file names; repeated: {repeated}")
    return stems


def embed_bins(
    embed: Callable[[torch.Tensor], torch.Tensor],
    bins: Sequence[str | Path],
    data,
    *,
    folds: int | None = None,
    **options,
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """``{stem: (same, embeddings, flipped)}`` of each set (:func:`load_bin_set`, then
    :func:`embed_bin` with ``options``), in the order given; every file is read and checked (at
    least ``folds`` pairs, when given) before any is embedded."""
    stems = bin_stems(bins)
    sets = [load_bin_set(path, data) for path in bins]
    for path, (_, same) in zip(bins, sets):
        if folds is not None and len(same) < folds:
            raise DataError(
                f"{path}: folds ({folds}) must not exceed the number of pairs ({len(same)})"
            )
    return {
        stem: (same, *embed_bin(embed, pixels, data, **options))
        for stem, (pixels, same) in zip(stems, sets)
    }


def verify_bins(
    embed: Callable[[torch.Tensor], torch.Tensor],
    bins: Sequence[str | Path],
    data,
    fars: Sequence[float],
    *,
    batch_size: int = 256,
    flip: bool = True,
    folds: int = 10,
    device: str | torch.device | None = None,
) -> dict[str, dict[str, float]]:
    """The :func:`~angular.eval.bins.bin_metrics` of each set, keyed by its file stem (``lfw``,
    ``cfp_fp``), in the order given: :func:`embed_bins` (each set decoded once, then cached),
    then the metrics. A bad set raises one :class:`~angular.data.DataError` line naming it."""
    embedded = embed_bins(
        embed, bins, data, folds=folds, batch_size=batch_size, flip=flip, device=device
    )
    results = {}
    for path, (stem, (same, embeddings, flipped)) in zip(bins, embedded.items()):
        try:
            results[stem] = bin_metrics(embeddings, flipped, same, fars, folds)
        except ValueError as error:
            raise DataError(f"{path}: {error}") from None
    return results
