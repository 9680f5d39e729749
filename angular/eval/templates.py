"""IJB-B / IJB-C style 1:1 template verification, as insightface's ``eval_ijbc.py`` computes it.

A template is a set of images of one person (photographs and video frames); a media is one
photograph or one video, so a template holds several media and a media several images. The
protocol files (IJB-C's names; IJB-B's are the same with ``ijbb``):

- ``ijbc_face_tid_mid.txt``: ``image_name template_id media_id`` per line, one line per image;
  :func:`read_template_media`.
- ``ijbc_template_pair_label.txt``: ``template_1 template_2 label`` per line (1: the same person,
  0: not); :func:`read_template_pairs`.
- ``ijbc_name_5pts_score.txt``: ``image_name x1 y1 ... x5 y5 score`` per line, the five landmarks
  (align with :func:`angular.data.align_face`) and the face detector's score, in the images' order
  of the template/media list; :func:`read_face_scores`.

:func:`pool_templates` turns the images' embeddings into one unit embedding per template: each
image embedding (with a flip test: plus its mirror's) L2-normalised (or not: eval_ijbc's
``use_norm_score``, where the embedding's norm weights the image), optionally multiplied by its
detector score (eval_ijbc's ``use_detector_score``, the quality weighting), averaged per media,
the media averaged per template, L2-normalised. eval_ijbc's defaults, those of published IJB
numbers, are a flip test, the detector score and the norms kept (``normalize_images=False``). :func:`template_verification` scores the pairs by
cosine similarity and reports :func:`angular.eval.verification.verification_metrics`: TAR at each
FAR (IJB-C is quoted at 1e-6 ... 1e-1, ``evaluate.verification.fars``), AUC, EER. The TAR is the
highest at a FAR <= F; eval_ijbc reads the point of scikit-learn's thinned ROC curve whose FAR is
nearest to F, which may lie just above F, so its figure can be a little higher where the curve is
steep.

Bad files raise :class:`TemplateError`: one line naming the file and the line.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from angular.eval.checks import as_float_array, as_int_array
from angular.eval.verification import DEFAULT_FARS, unit_rows, verification_metrics

__all__ = [
    "FaceScores",
    "TemplateError",
    "TemplateMediaList",
    "TemplatePairs",
    "check_same_images",
    "pool_templates",
    "read_face_scores",
    "read_template_media",
    "read_template_pairs",
    "template_rows",
    "template_similarity",
    "template_verification",
]

PAIR_CHUNK = 100_000  # pairs scored at a time (IJB-C has 15.6M): 2 x 100k x D float64 rows


class TemplateError(ValueError):
    """A malformed IJB-style protocol file, or a pair naming an unknown template."""


@dataclasses.dataclass(frozen=True)
class TemplateMediaList:
    """The template/media list: per image (in file order) its name, template and media."""

    path: Path
    names: tuple[str, ...]
    templates: np.ndarray  # (N,) int64
    medias: np.ndarray  # (N,) int64
    lines: np.ndarray  # (N,) the line of each image in the file (blank lines skipped)


@dataclasses.dataclass(frozen=True)
class TemplatePairs:
    """The template pairs to verify and whether each shows one person."""

    path: Path
    first: np.ndarray  # (P,) int64 template ids
    second: np.ndarray  # (P,) int64
    same: np.ndarray  # (P,) bool
    lines: np.ndarray  # (P,) the line of each pair in the file


@dataclasses.dataclass(frozen=True)
class FaceScores:
    """Per image: its name, five landmarks (x, y) and the detector's score."""

    path: Path
    names: tuple[str, ...]
    landmarks: np.ndarray  # (N, 5, 2) float64
    scores: np.ndarray  # (N,) float64
    lines: np.ndarray  # (N,)


def _lines(path: Path):
    """``(line number, fields)`` of each non-blank line of a text file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise TemplateError(f"{path}: cannot read ({error})") from None
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if fields:
            yield number, fields


def _integer(path: Path, number: int, value: str, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise TemplateError(f"{path}: line {number}: {what} {value!r} is not an integer") from None


def read_template_media(path: str | Path) -> TemplateMediaList:
    """``ijbc_face_tid_mid.txt``: ``image_name template_id media_id`` per line."""
    path = Path(path)
    names, templates, medias, lines = [], [], [], []
    for number, fields in _lines(path):
        if len(fields) != 3:
            raise TemplateError(
                f"{path}: line {number}: expected 'image_name template_id media_id', got "
                f"{len(fields)} field(s): {' '.join(fields)[:80]!r}"
            )
        names.append(fields[0])
        templates.append(_integer(path, number, fields[1], "the template id"))
        medias.append(_integer(path, number, fields[2], "the media id"))
        lines.append(number)
    if not names:
        raise TemplateError(f"{path}: no images")
    return TemplateMediaList(
        path,
        tuple(names),
        np.array(templates, np.int64),
        np.array(medias, np.int64),
        np.array(lines),
    )


def read_template_pairs(path: str | Path) -> TemplatePairs:
    """``ijbc_template_pair_label.txt``: ``template_1 template_2 label`` (1 or 0) per line. IJB-C's
    15.6M lines are read by numpy; a bad line is then found and named line by line."""
    path = Path(path)
    try:
        content = path.read_bytes()
    except OSError as error:
        raise TemplateError(f"{path}: cannot read ({error.strerror or error})") from None
    n_lines = content.count(b"\n") + (not content.endswith(b"\n") and len(content) > 0)
    fast = False
    if content.strip():
        try:
            table = np.loadtxt(path, dtype=np.int64, ndmin=2, comments=None)
            fast = table.shape == (n_lines, 3) and np.isin(table[:, 2], (0, 1)).all()
        except ValueError:
            pass
    if fast:  # every line a pair: line k is pair k
        lines = np.arange(1, n_lines + 1)
    else:
        rows, numbers = [], []
        for number, fields in _lines(path):
            if len(fields) != 3:
                raise TemplateError(
                    f"{path}: line {number}: expected 'template_1 template_2 label', got "
                    f"{len(fields)} field(s): {' '.join(fields)[:80]!r}"
                )
            first = _integer(path, number, fields[0], "the template id")
            second = _integer(path, number, fields[1], "the template id")
            label = _integer(path, number, fields[2], "the label")
            if label not in (0, 1):
                raise TemplateError(f"{path}: line {number}: the label must be 1 or 0, got {label}")
            rows.append((first, second, label))
            numbers.append(number)
        table, lines = np.array(rows, np.int64).reshape(-1, 3), np.array(numbers)
    if len(table) == 0:
        raise TemplateError(f"{path}: no pairs")
    return TemplatePairs(path, table[:, 0], table[:, 1], table[:, 2] == 1, lines)


def read_face_scores(path: str | Path) -> FaceScores:
    """``ijbc_name_5pts_score.txt``: ``image_name x1 y1 ... x5 y5 score`` per line (finite
    numbers; the score, a detector's confidence, >= 0)."""
    path = Path(path)
    names, values, lines = [], [], []
    for number, fields in _lines(path):
        if len(fields) != 12:
            raise TemplateError(
                f"{path}: line {number}: expected 'image_name x1 y1 ... x5 y5 score' (12 fields), "
                f"got {len(fields)}: {' '.join(fields)[:80]!r}"
            )
        try:
            row = [float(value) for value in fields[1:]]
        except ValueError:
            raise TemplateError(
                f"{path}: line {number}: the landmarks and score must be numbers"
            ) from None
        if not all(math.isfinite(value) for value in row) or row[-1] < 0:
            raise TemplateError(
                f"{path}: line {number}: the landmarks and score must be finite and the score "
                f">= 0, got {' '.join(fields[1:])}"
            )
        names.append(fields[0])
        values.append(row)
        lines.append(number)
    if not names:
        raise TemplateError(f"{path}: no images")
    table = np.array(values, dtype=np.float64)
    return FaceScores(
        path, tuple(names), table[:, :10].reshape(-1, 5, 2), table[:, 10], np.array(lines)
    )


def pool_templates(
    embeddings,
    templates,
    medias,
    *,
    weights=None,
    flipped=None,
    normalize_images: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """``(template ids (T,) sorted, unit template embeddings (T, D) float64)`` of the images'
    ``embeddings`` (N, D): each image's (plus ``flipped``, its mirror's) L2-normalised (unless
    ``normalize_images`` is False), times its ``weights`` (e.g. the detector scores; None: 1),
    averaged per (template, media), the media averaged per template, L2-normalised."""
    features = as_float_array(embeddings, "embeddings", ndim=2)
    templates, medias = as_int_array(templates, "templates"), as_int_array(medias, "medias")
    if not len(features) == len(templates) == len(medias) > 0:
        raise ValueError(
            f"embeddings ({len(features)} rows), templates ({len(templates)}) and medias "
            f"({len(medias)}) must have one entry per image, and there must be images"
        )
    # Sorted by (template, media), each media and then each template is a contiguous run; the
    # sorted copy is then worked on in place (IJB-C: 469k images of 512 numbers).
    order = np.lexsort((medias, templates))
    templates, medias, features = templates[order], medias[order], features[order]
    if flipped is not None:
        flipped = as_float_array(flipped, "flipped", ndim=2)
        if flipped.shape != features.shape:
            raise ValueError(f"flipped has shape {flipped.shape}, embeddings {features.shape}")
        features += flipped[order]
    if normalize_images:
        features = unit_rows(features)
    if weights is not None:
        weights = as_float_array(weights, "weights", ndim=1)
        if len(weights) != len(features):
            raise ValueError(f"weights has {len(weights)} entries for {len(features)} images")
        features *= weights[order, None]
    media_start = np.flatnonzero(
        np.r_[True, (templates[1:] != templates[:-1]) | (medias[1:] != medias[:-1])]
    )
    media_size = np.diff(np.r_[media_start, len(features)])
    media_means = np.add.reduceat(features, media_start, axis=0) / media_size[:, None]
    media_template = templates[media_start]
    template_start = np.flatnonzero(np.r_[True, media_template[1:] != media_template[:-1]])
    template_size = np.diff(np.r_[template_start, len(media_means)])
    pooled = np.add.reduceat(media_means, template_start, axis=0) / template_size[:, None]
    return media_template[template_start], unit_rows(pooled)


def template_rows(
    template_ids: np.ndarray, pairs: TemplatePairs, *, media_path=None
) -> tuple[np.ndarray, np.ndarray]:
    """The rows of each pair's two templates among ``template_ids`` (sorted, as
    :func:`pool_templates` gives them); a template not among them raises one
    :class:`TemplateError` naming the pairs file's line (and ``media_path``, the list it is
    missing from)."""
    rows = []
    for side in (pairs.first, pairs.second):
        row = np.minimum(np.searchsorted(template_ids, side), len(template_ids) - 1)
        unknown = np.flatnonzero(template_ids[row] != side)
        if len(unknown):
            where = f" {media_path}" if media_path is not None else " the template/media list"
            raise TemplateError(
                f"{pairs.path}: line {pairs.lines[unknown[0]]}: template {side[unknown[0]]} is "
                f"not in{where} ({len(unknown)} pair(s) name unknown templates)"
            )
        rows.append(row)
    return rows[0], rows[1]


def template_similarity(
    template_ids: np.ndarray, unit: np.ndarray, pairs: TemplatePairs, *, media_path=None
) -> np.ndarray:
    """Cosine similarity of each pair's templates (rows of ``unit``, ids ``template_ids``:
    :func:`template_rows`), ``PAIR_CHUNK`` pairs at a time."""
    first, second = template_rows(template_ids, pairs, media_path=media_path)
    similarity = np.empty(len(pairs.same), dtype=np.float64)
    for start in range(0, len(similarity), PAIR_CHUNK):
        part = slice(start, start + PAIR_CHUNK)
        similarity[part] = np.einsum("pd,pd->p", unit[first[part]], unit[second[part]])
    return similarity


def check_same_images(face_scores: FaceScores, media_list: TemplateMediaList) -> None:
    """The landmarks file lists the template/media list's images, in its order (eval_ijbc reads
    both by row)."""
    if face_scores.names == media_list.names:
        return
    for index, (name, expected) in enumerate(zip(face_scores.names, media_list.names)):
        if name != expected:
            raise TemplateError(
                f"{face_scores.path}: line {face_scores.lines[index]}: image {name!r}, but line "
                f"{media_list.lines[index]} of {media_list.path} is {expected!r}: both files "
                "must list the same images in the same order"
            )
    raise TemplateError(
        f"{face_scores.path}: {len(face_scores.names)} images, {media_list.path} "
        f"{len(media_list.names)}: both files must list the same images in the same order"
    )


def template_verification(
    embeddings,
    media_list: TemplateMediaList,
    pairs: TemplatePairs,
    *,
    fars: Sequence[float] = DEFAULT_FARS,
    face_scores: FaceScores | None = None,
    flipped=None,
    normalize_images: bool = True,
    folds: int = 10,
    seed: int = 0,
) -> dict[str, float]:
    """1:1 verification of ``pairs`` on the images' ``embeddings`` (rows in ``media_list``'s
    order; ``flipped``: their mirrors'), pooled by :func:`pool_templates` (``normalize_images``),
    weighted by ``face_scores``'s detector scores when given (whose images must be ``media_list``'s, in its
    order). Returns :func:`~angular.eval.verification.verification_metrics` (``tar@far=F`` for
    each of ``fars``, ``auc``, ``eer``, the 10-fold ``accuracy``, pair counts) and
    ``n_templates``."""
    embeddings = as_float_array(embeddings, "embeddings", ndim=2)
    if len(embeddings) != len(media_list.names):
        raise ValueError(
            f"embeddings has {len(embeddings)} rows; {media_list.path} lists "
            f"{len(media_list.names)} images"
        )
    weights = None
    if face_scores is not None:
        check_same_images(face_scores, media_list)
        weights = face_scores.scores
    template_ids, unit = pool_templates(
        embeddings,
        media_list.templates,
        media_list.medias,
        weights=weights,
        flipped=flipped,
        normalize_images=normalize_images,
    )
    similarity = template_similarity(template_ids, unit, pairs, media_path=media_list.path)
    result = verification_metrics(similarity, pairs.same, folds=folds, seed=seed, fars=fars)
    result["n_templates"] = float(len(template_ids))
    return result
