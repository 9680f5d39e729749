"""Running a trained model on images: embeddings and per-head logits, batch by batch.

Inference uses ``head.logits`` (``s * cos``, no margin) per head, and the backbone's embedding.
With ``flip_test`` the embedding of an image is the sum of the normalised embeddings of the image
and of its horizontal mirror (a common test-time trick for faces); the logits always come from the
image itself, so that calibration and classification see what training saw.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from angular.config import Crop
from angular.data import ImageDataset
from angular.nn.recognition import LoadedModel

__all__ = [
    "SplitOutputs",
    "run_model",
    "run_splits",
    "run_batches",
    "save_outputs",
    "with_progress",
]


@dataclasses.dataclass
class SplitOutputs:
    """What a model computes on the images of one split."""

    embeddings: np.ndarray  # (N, D) float32
    logits: dict[str, np.ndarray]  # member -> (N, C) float32, s * cos without margin
    labels: np.ndarray  # (N,) int64, -1 for unknown identities
    identities: list[str]


def with_progress(batches: Iterable, total: int, label: str, *, size=len):
    """``batches`` unchanged, with a progress bar of images on stderr (a new line at most every
    few seconds when stderr is a log file rather than a terminal); ``size(batch)``: its images."""
    from tqdm import tqdm

    interactive = sys.stderr.isatty()
    with tqdm(
        total=total,
        desc=label,
        unit="img",
        file=sys.stderr,
        mininterval=0.5 if interactive else 5.0,
        dynamic_ncols=interactive,
        ncols=None if interactive else 100,
    ) as bar:
        for batch in batches:
            yield batch
            bar.update(size(batch))


@torch.no_grad()
def run_batches(
    loaded: LoadedModel,
    batches: Iterable[torch.Tensor],
    *,
    device: str | torch.device = "cpu",
    flip_test: bool = False,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``(embeddings (N, D), {member: logits (N, C)})`` as float32 numpy arrays, of batches of
    preprocessed images (normalised floats (B, C, H, W), as :class:`angular.data.ImageDataset`
    gives them). ``flip_test``: see the module doc."""
    model = loaded.model.to(device).eval()
    embeddings, logits = [], {name: [] for name in model.heads}
    for batch in batches:
        batch = batch.to(device)
        embedding = model(batch)
        for name, value in model.logits(embedding).items():
            logits[name].append(value.float().cpu())
        if flip_test:
            mirrored = model(batch.flip(-1))
            embedding = F.normalize(embedding.float(), dim=1) + F.normalize(mirrored.float(), dim=1)
        embeddings.append(embedding.float().cpu())
    dim = model.heads[next(iter(model.heads))].embedding_dim
    classes = len(loaded.classes)
    return (
        torch.cat(embeddings).numpy() if embeddings else np.zeros((0, dim), np.float32),
        {
            name: torch.cat(v).numpy() if v else np.zeros((0, classes), np.float32)
            for name, v in logits.items()
        },
    )


def run_model(
    loaded: LoadedModel,
    paths: Sequence[Path],
    labels: Sequence[int],
    identities: Sequence[str],
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    flip_test: bool = False,
    crop: Crop | None = None,
    progress: str | None = None,
) -> SplitOutputs:
    """Embeddings and per-head logits of the images at ``paths`` (preprocessed as in training;
    ``crop``: ``data.crop`` for images that prepare did not crop). ``progress``: the label of a
    progress bar on stderr (decoding and inference; None: silent)."""
    image = loaded.image
    dataset = ImageDataset(
        paths,
        labels,
        image_size=image["size"],
        channels=image["channels"],
        mean=image["mean"],
        std=image["std"],
        preload=False,  # decoded batch by batch, so that the progress bar counts the decoding
        crop=crop,
    )
    batches = (
        torch.stack([dataset[i][0] for i in range(start, min(start + batch_size, len(dataset)))])
        for start in range(0, len(dataset), batch_size)
    )
    if progress is not None:
        batches = with_progress(batches, len(dataset), progress)
    embeddings, logits = run_batches(loaded, batches, device=device, flip_test=flip_test)
    return SplitOutputs(
        embeddings=embeddings,
        logits=logits,
        labels=np.asarray(labels, dtype=np.int64),
        identities=list(identities),
    )


def run_splits(
    loaded: LoadedModel, manifest, splits: Sequence[str], *, progress: str, **options
) -> dict[str, SplitOutputs]:
    """:func:`run_model` on each split of a prepared data set (:class:`angular.data.Manifest`),
    with a progress bar labelled ``<progress>, <split> images``; ``options``: run_model's."""
    return {
        split: run_model(
            loaded,
            manifest.paths(split),
            manifest.labels(split),
            manifest.identities(split),
            **options,
            progress=f"{progress}, {split} images",
        )
        for split in splits
    }


def save_outputs(path: Path, outputs: dict[str, SplitOutputs], classes: Sequence[str]) -> None:
    """One model's outputs per split as a compressed ``.npz``: ``<split>_embeddings``,
    ``<split>_labels``, ``<split>_identities``, ``<split>_logits_<member>``, and ``classes``."""
    np.savez_compressed(
        path,
        **{
            f"{split}_{key}": value
            for split, out in outputs.items()
            for key, value in (
                ("embeddings", out.embeddings),
                ("labels", out.labels),
                ("identities", np.asarray(out.identities, dtype=str)),
                *((f"logits_{m}", v) for m, v in out.logits.items()),
            )
        },
        classes=np.asarray(classes, dtype=str),
    )
