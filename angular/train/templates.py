"""IJB-B / IJB-C style template verification with a model: each image of the landmarks file
(``ijbc_name_5pts_score.txt``) aligned onto the ArcFace template with its five points
(:func:`angular.data.align_face`), embedded with its mirror batch by batch
(:func:`angular.train.bins.embed_bin`), then pooled and scored by
:func:`angular.eval.templates.template_verification` (its module doc gives the protocol).

Like :mod:`angular.train.bins`, it lives in ``train`` because it joins ``data`` (reading and
aligning images) and ``eval`` (the metrics). Every protocol file is read and checked before the
first image is embedded; any bad input is one :class:`~angular.data.DataError` line naming the
file and line (or image).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from angular.data import DataError, align_face
from angular.eval.templates import (
    FaceScores,
    TemplateError,
    check_same_images,
    read_face_scores,
    read_template_media,
    read_template_pairs,
    template_rows,
    template_verification,
)
from angular.train.bins import bin_pixels, embed_bin

__all__ = ["aligned_face", "embed_faces", "verify_templates"]


def aligned_face(root: str | Path, face_scores: FaceScores, index: int, size: int = 112):
    """Image ``index`` of ``face_scores`` (under ``root``), aligned: (size, size, 3) uint8 RGB."""
    path = Path(root) / face_scores.names[index]
    try:
        with Image.open(path) as image:
            face = align_face(image, face_scores.landmarks[index], size)
    except (OSError, UnidentifiedImageError, SyntaxError) as error:
        raise DataError(f"{path}: cannot read the image ({error})") from None
    except ValueError as error:  # landmarks outside the image (angular.data.align)
        line = face_scores.lines[index]
        raise DataError(f"{face_scores.path}: line {line}: {path.name}: {error}") from None
    return np.asarray(face)


def embed_faces(
    embed: Callable[[torch.Tensor], torch.Tensor],
    root: str | Path,
    face_scores: FaceScores,
    data,
    *,
    batch_size: int = 256,
    flip: bool = True,
    size: int = 112,
    device: str | torch.device | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """``(embeddings, flipped)`` (float32; ``flipped`` None without ``flip``) of the images of
    ``face_scores`` under ``root``, each aligned (``size`` x ``size``) then put in the model's
    format (``data``: :func:`angular.train.bins.bin_pixels`), ``batch_size`` at a time: only one
    batch of images is held at once."""
    outputs: list[list[np.ndarray]] = [[], []]
    for start in range(0, len(face_scores.names), batch_size):
        stop = min(start + batch_size, len(face_scores.names))
        faces = np.stack([aligned_face(root, face_scores, i, size) for i in range(start, stop)])
        found = embed_bin(
            embed, bin_pixels(faces, data), data, batch_size=batch_size, flip=flip, device=device
        )
        for kind, value in enumerate(found):
            if value is not None:
                outputs[kind].append(value)
    embeddings = np.concatenate(outputs[0])
    return embeddings, np.concatenate(outputs[1]) if flip else None


def verify_templates(
    embed: Callable[[torch.Tensor], torch.Tensor],
    root: str | Path,
    media_file: str | Path,
    pairs_file: str | Path,
    scores_file: str | Path,
    data,
    fars: Sequence[float],
    *,
    detector_score: bool = True,
    normalize_images: bool = False,
    flip: bool = True,
    batch_size: int = 256,
    folds: int = 10,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """IJB-style 1:1 verification of a model: :func:`~angular.eval.templates.
    template_verification` (TAR at each of ``fars``, AUC, EER, counts) of the images under
    ``root`` listed by ``scores_file`` (``*_name_5pts_score.txt``), with ``media_file``
    (``*_face_tid_mid.txt``) and ``pairs_file`` (``*_template_pair_label.txt``). The defaults are
    eval_ijbc.py's, those of published numbers: a flip test, the detector score as weight and the
    embeddings' norms kept (``normalize_images=False``)."""
    try:
        media_list = read_template_media(media_file)
        pairs = read_template_pairs(pairs_file)
        face_scores = read_face_scores(scores_file)
        check_same_images(face_scores, media_list)
        template_rows(np.unique(media_list.templates), pairs, media_path=media_list.path)
    except TemplateError as error:  # before the long part: embedding every image
        raise DataError(str(error)) from None
    embeddings, flipped = embed_faces(
        embed, root, face_scores, data, batch_size=batch_size, flip=flip, device=device
    )
    return template_verification(
        embeddings,
        media_list,
        pairs,
        fars=fars,
        face_scores=face_scores if detector_score else None,
        flipped=flipped,
        normalize_images=normalize_images,
        folds=folds,
    )
