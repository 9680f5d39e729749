"""Face alignment as insightface does it: five landmarks mapped onto the ArcFace template.

:func:`similarity_transform` fits the least-squares similarity transform (Umeyama, 1991) of the
five points onto :func:`template`, the standard 112x112 ArcFace points (insightface's
``arcface_dst``); :func:`align_face` warps the image with it (bilinear, black outside). :func:`read_landmarks` reads a landmarks TSV:
a header ``path score x1 y1 ... x5 y5`` (``score`` optional), one row per image, the points in
the order left eye, right eye, nose tip, left mouth corner, right mouth corner (left and right as
seen in the image), in pixels of the image the row names.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from angular.data.errors import DataError

__all__ = [
    "ARCFACE_TEMPLATE",
    "LANDMARK_COLUMNS",
    "align_face",
    "check_landmarks",
    "landmarks_for",
    "read_landmarks",
    "similarity_transform",
    "template",
]

# insightface's arcface_dst: the five points in a 112x112 crop.
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ]
)
LANDMARK_COLUMNS = tuple(f"{axis}{k}" for k in range(1, 6) for axis in "xy")
# Detectors place the landmarks of a face cut by the frame a little outside the image (lfw-dev
# has an eye at y = -18.9 of 250); a point farther out than this fraction of the image's side
# means the landmarks belong to another image or size.
OUTSIDE_TOLERANCE = 0.25


def template(size: int = 112) -> np.ndarray:
    """The template for a ``size`` x ``size`` crop, scaled as insightface's ``estimate_norm``
    scales it: by size / 112, or for multiples of 128 by size / 128 and shifted 8 px right."""
    if size < 1:
        raise ValueError(f"the aligned size must be >= 1, got {size}")
    if size % 112 != 0 and size % 128 == 0:
        ratio = size / 128
        return ARCFACE_TEMPLATE * ratio + np.array([8.0 * ratio, 0.0])
    return ARCFACE_TEMPLATE * (size / 112)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 matrix ``[s R | t]`` minimising ``sum |s R src_i + t - dst_i|^2`` over scales
    ``s``, proper rotations ``R`` (det +1: a mirrored fit is never returned) and translations
    ``t`` (Umeyama, "Least-squares estimation of transformation parameters between two point
    patterns", 1991)."""
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    if src.ndim != 2 or src.shape[1] != 2 or src.shape != dst.shape:
        raise ValueError(f"need two (N, 2) point sets of one shape, got {src.shape}, {dst.shape}")
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    variance = (src_c**2).sum() / len(src)
    if not variance > 0:
        raise ValueError("the source points coincide: no transform fits them")
    u, singular, vt = np.linalg.svd(dst_c.T @ src_c / len(src))
    signs = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:  # the best orthogonal map mirrors: flip the last
        signs[-1] = -1.0
    rotation = u @ np.diag(signs) @ vt
    scale = (singular * signs).sum() / variance
    return np.hstack([scale * rotation, (dst_mean - scale * rotation @ src_mean)[:, None]])


def check_landmarks(points: np.ndarray, width: int, height: int) -> None:
    """Raise ``ValueError`` (one line) for NaN points or points outside a ``width`` x
    ``height`` image by more than :data:`OUTSIDE_TOLERANCE` of its side."""
    points = np.asarray(points, np.float64)
    if points.shape != (5, 2):
        raise ValueError(f"need 5 (x, y) landmarks, got shape {points.shape}")
    if not np.isfinite(points).all():
        raise ValueError("a landmark is NaN or infinite")
    low = -OUTSIDE_TOLERANCE * np.array([width, height])
    high = (1 + OUTSIDE_TOLERANCE) * np.array([width, height])
    outside = np.flatnonzero(((points < low) | (points > high)).any(1))
    if len(outside):
        x, y = points[outside[0]]
        raise ValueError(
            f"landmark {outside[0] + 1} at ({x:g}, {y:g}) lies outside the {width}x{height} image"
        )


def align_face(image: Image.Image, landmarks: np.ndarray, size: int = 112) -> Image.Image:
    """The ``size`` x ``size`` RGB crop of ``image`` whose five ``landmarks`` (pixels, (5, 2))
    are fitted onto the ArcFace template, warped with PIL (bilinear, black outside the image) as
    the fixture's faces were; insightface's ``norm_crop`` warps with OpenCV."""
    check_landmarks(landmarks, *image.size)
    matrix = np.vstack([similarity_transform(landmarks, template(size)), [0.0, 0.0, 1.0]])
    # PIL's output pixel p samples the input at inverse(p + 0.5) - 0.5 (pixel centres at
    # integer + 0.5); OpenCV's at inverse(p). The fixture (../shared/data/insightface) was made
    # with PIL's: 0.5 (inverse scale - 1) px apart, about 0.1 px in the 112x112 crop.
    inverse = np.linalg.inv(matrix)[:2]
    coefficients = tuple(inverse.ravel())
    return image.convert("RGB").transform(
        (size, size), Image.Transform.AFFINE, coefficients, Image.Resampling.BILINEAR
    )


def read_landmarks(path: str | Path, *, allow_nan: bool = False) -> dict[str, np.ndarray]:
    """A landmarks TSV as ``{relative path: (5, 2) float64 points}``. A missing column, a
    malformed or repeated row, or a NaN point is one ``DataError`` naming the file and line;
    with ``allow_nan`` NaN rows are kept (for :func:`check_landmarks` to refuse per image, so
    that prepare can skip them under ``data.skip_bad_images``)."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle, delimiter="\t"))
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot read the landmarks file ({error})") from None
    if not rows:
        raise DataError(f"{path}: empty; need a header 'path score x1 y1 ... x5 y5'")
    header = rows[0]
    missing = [name for name in ("path", *LANDMARK_COLUMNS) if name not in header]
    if missing:
        raise DataError(
            f"{path}, line 1: the header lacks {', '.join(missing)} "
            "(need 'path score x1 y1 ... x5 y5', tab-separated)"
        )
    where = [header.index(name) for name in LANDMARK_COLUMNS]
    landmarks: dict[str, np.ndarray] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if len(row) != len(header):
            raise DataError(f"{path}, line {line}: {len(row)} fields, the header has {len(header)}")
        try:
            values = [float(row[i]) for i in where]
        except ValueError:
            raise DataError(f"{path}, line {line}: a coordinate is not a number") from None
        if not (allow_nan or all(math.isfinite(v) for v in values)):
            raise DataError(f"{path}, line {line}: a landmark is NaN or infinite")
        name = row[header.index("path")].replace("\\", "/")
        if name in landmarks:
            raise DataError(f"{path}, line {line}: {name} has a second row")
        landmarks[name] = np.array(values).reshape(5, 2)
    return landmarks


def landmarks_for(
    names: Iterable[str], landmarks: dict[str, np.ndarray], source: str | Path
) -> list[np.ndarray]:
    """The landmarks of each of ``names`` in order; images without a row are one ``DataError``
    that lists them (the first ten, and how many in all)."""
    names = list(names)
    missing = [name for name in names if name not in landmarks]
    if missing:
        shown = ", ".join(missing[:10]) + (
            f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        )
        raise DataError(f"{source}: no landmarks for {len(missing)} image(s): {shown}")
    return [landmarks[name] for name in names]
