"""Data: sources, the manifest of splits, image loading and transforms (docs/design.md, Pipeline: prepare).

Sources (``data.source``):

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 identities, no
  download). :func:`prepare_dataset` writes them as 8-bit greyscale PNG files
  ``<out>/images/<digit>/<index>.png`` (pixel values 0..16 scaled to 0..255), so that every later
  step reads images the same way whatever the source.
- ``imagefolder``: ``data.path`` holds one sub-folder per identity with its images, in any format
  PIL reads (PNG, JPEG, PGM, ...). Hidden entries (names starting with ".") and plain files at the
  top level (a README) are ignored. With ``data.test_path`` (as the original repository), the test
  images come from that folder and its identities absent from training are the unknowns. With
  ``data.align`` each face is aligned onto the ArcFace template from its five landmarks
  (:mod:`angular.data.align`) and the aligned crops are cached in the prepared folder, as
  ``data.crop``'s crops are.
- ``insightface_rec``: ``data.path`` is an insightface RecordIO set (its folder, or its ``.rec``),
  read by :class:`angular.data.recordio.RecordFile`. Nothing is decoded or hashed: the labels come
  from the record headers, the set is identified by :func:`angular.data.recordio.fingerprint` (its
  index and file sizes), and a manifest row's ``path`` is the image's index in the set (its
  ``md5`` is empty). An identity is named by its label in the set (``"0"``, ``"1"``, ...).

Every image file is decoded once while preparing, so an unreadable, corrupt or non-image file, an
empty identity folder or an identity with too few images is reported (all problems at once, each
naming its file or folder) before any training, or skipped and counted with
``data.skip_bad_images``.

Splits: a seeded choice of ``unknown`` identities is held out entirely (open-set evaluation); the
images of each known identity are shuffled with the seed and cut into ``train``, ``val`` and
``test`` (at least one training image per identity). The prepared folder holds ``manifest.csv``
(``path, identity, label, split, md5``; paths relative to the folder unless ``data.path`` was
absolute; label -1 for unknowns) and ``classes.json`` (the known identities in label order, the
unknown ones, counts, skipped files; for a RecordIO set its path and fingerprint).
:meth:`Manifest.resolve` gives a row's image: a path, or a :class:`angular.data.recordio.PackedImage`.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import gc
import hashlib
import io
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from angular.config import Crop, DataConfig
from angular.config.data import Align
from angular.data.align import align_face, check_landmarks, read_landmarks
from angular.data.errors import DataError
from angular.data.recordio import PackedImage, PackedImages, RecordFile

__all__ = [
    "SPLITS",
    "MANIFEST_FILE",
    "CLASSES_FILE",
    "DataError",
    "Record",
    "Manifest",
    "prepare_dataset",
    "read_manifest",
    "crop_region",
]

SPLITS = ("train", "val", "test", "unknown")
MANIFEST_FILE = "manifest.csv"
CLASSES_FILE = "classes.json"
CROPPED_DIR = "cropped"  # data.crop: the cropped images, inside the prepared folder
ALIGNED_DIR = "aligned"  # data.align: the aligned faces, inside the prepared folder
RECORDIO_SOURCE = "insightface_rec"
MANIFEST_COLUMNS = ("path", "identity", "label", "split", "md5")
MAX_LISTED_PROBLEMS = 20
MAX_LISTED_ON_ONE_LINE = 5


@dataclasses.dataclass(frozen=True)
class Record:
    # As stored in the manifest: relative to the manifest's folder, or absolute; for a RecordIO
    # set, the image's index in it.
    path: str
    identity: str
    label: int  # index into Manifest.classes; -1 for unknown identities
    split: str
    md5: str


@dataclasses.dataclass(frozen=True)
class Manifest:
    root: Path  # the prepared folder; relative record paths are relative to it
    records: tuple[Record, ...]
    classes: tuple[str, ...]  # known identities, in label order
    unknown: tuple[str, ...]
    info: dict

    def split(self, name: str) -> list[Record]:
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        return [r for r in self.records if r.split == name]

    def resolve(self, record: Record) -> Path | PackedImage:
        """A row's image: its file, or for a RecordIO set its record (read when decoded)."""
        if self.info.get("source") == RECORDIO_SOURCE:
            return self.record_file.image(int(record.path))
        path = Path(record.path)
        return path if path.is_absolute() else self.root / path

    def paths(self, split: str) -> list[Path] | PackedImages:
        """The images of a split (:meth:`resolve`), which :func:`angular.data.load_image` and
        :class:`angular.data.ImageDataset` read whatever the source: paths, or for a RecordIO
        set a :class:`PackedImages` (a sequence of its records held as one index array: a set
        may have millions)."""
        if self.info.get("source") == RECORDIO_SOURCE:
            rows = self.split(split)
            indices = np.fromiter((int(r.path) for r in rows), np.int64, len(rows))
            if len(indices) and not 0 <= indices.min() <= indices.max() < len(self.record_file):
                bad = indices.min() if indices.min() < 0 else indices.max()
                self.record_file.image(int(bad))  # raises, naming it
            return PackedImages(self.record_file, indices)
        return [self.resolve(r) for r in self.split(split)]

    @functools.cached_property
    def record_file(self) -> RecordFile:
        """The RecordIO set of an ``insightface_rec`` manifest, opened once; a set whose
        fingerprint differs from the one prepare saw is an error (rerun prepare)."""
        recordio = self.info.get("recordio")
        if recordio is None:
            raise DataError(f"{self.root / CLASSES_FILE}: not prepared from a RecordIO set")
        path = Path(recordio["rec"])
        records = RecordFile(path if path.is_absolute() else self.root / path)
        if records.fingerprint() != recordio["fingerprint"]:
            raise DataError(
                f"{records.rec_path}: its index, size or property file changed since prepare "
                f"wrote {self.root / MANIFEST_FILE}; rerun prepare"
            )
        return records

    def labels(self, split: str) -> np.ndarray:
        return np.array([r.label for r in self.split(split)], dtype=np.int64)

    def identities(self, split: str) -> list[str]:
        return [r.identity for r in self.split(split)]


# --------------------------------------------------------------------------------------------------
# Scanning and checking a folder of identities.


@dataclasses.dataclass
class _Scan:
    images: dict[str, list[tuple[Path, str]]]  # identity -> [(path, md5)], sorted by path
    skipped: list[dict]  # {"path", "reason"}
    ignored: list[str]  # top-level files and hidden entries
    landmarks: dict[Path, np.ndarray] = dataclasses.field(default_factory=dict)  # data.align


def _check_image(path: Path) -> tuple[str | None, str]:
    """``(problem, md5)``: problem is None when PIL decodes the whole file."""
    try:
        data = path.read_bytes()
    except OSError as error:
        return f"cannot read it ({error.strerror or error})", ""
    digest = hashlib.md5(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except UnidentifiedImageError:
        return "not an image file PIL can read", digest
    except (OSError, SyntaxError, ValueError) as error:
        return f"corrupt or truncated image ({error})", digest
    except Image.DecompressionBombError as error:
        return f"refused by PIL ({error})", digest
    return None, digest


def _scan_folder(root: Path, param: str, *, skip_bad: bool, min_images: int) -> _Scan:
    if not root.exists():
        raise DataError(f"{param}: {root} does not exist")
    if not root.is_dir():
        raise DataError(
            f"{param}: {root} is not a folder (it must hold one sub-folder per identity)"
        )
    images: dict[str, list[tuple[Path, str]]] = {}
    skipped: list[dict] = []
    ignored: list[str] = []
    problems: list[str] = []

    def bad(path: Path, reason: str) -> None:
        if skip_bad:
            skipped.append({"path": str(path), "reason": reason})
        else:
            problems.append(f"{path}: {reason}")

    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".") or not entry.is_dir():
            ignored.append(str(entry))
            continue
        found = []
        for file in sorted(entry.iterdir()):
            if file.name.startswith("."):
                ignored.append(str(file))
            elif file.is_symlink() and not file.exists():
                bad(file, f"a broken symbolic link (to {os.readlink(file)}, which does not exist)")
            elif not file.is_file():
                bad(file, "not a file (identity folders must hold images only, no sub-folders)")
            else:
                problem, digest = _check_image(file)
                if problem:
                    bad(file, problem)
                else:
                    found.append((file, digest))
        if not found:
            bad(entry, "empty identity folder (no readable images)")
        elif len(found) < min_images:
            bad(
                entry,
                f"only {len(found)} image(s); every identity needs at least "
                f"data.min_images_per_class = {min_images}",
            )
        else:
            images[entry.name] = found
    if problems:
        listed = problems[:MAX_LISTED_PROBLEMS]
        more = len(problems) - len(listed)
        raise DataError(
            f"{param}: {len(problems)} problem(s) in {root} (set data.skip_bad_images: true to "
            "skip and count them instead):\n  "
            + "\n  ".join(listed)
            + (f"\n  ... and {more} more" if more else "")
        )
    if not images:
        loose = sum(
            1 for path in root.iterdir() if path.is_file() and not path.name.startswith(".")
        )
        hint = (
            f" (it holds {loose} file(s) at the top level: put each identity's images in a "
            "sub-folder of its own)"
            if loose
            else ""
        )
        raise DataError(f"{param}: {root} holds no identity folder with usable images{hint}")
    return _Scan(images, skipped, ignored)


def _export_digits(images_dir: Path) -> Path:
    """Write scikit-learn's digits as PNG files, one folder per digit."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    for index, (image, target) in enumerate(zip(pixels, digits.target)):
        folder = images_dir / str(int(target))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{index:04d}.png")
    return images_dir


# --------------------------------------------------------------------------------------------------
# Checking landmarks, capping, cropping and aligning, before splitting.


def _one_line(problems: list[str]) -> str:
    """The first few of ``problems`` and how many in all, on one line."""
    shown = "; ".join(problems[:MAX_LISTED_ON_ONE_LINE])
    more = len(problems) - MAX_LISTED_ON_ONE_LINE
    return shown + (f"; and {more} more" if more > 0 else "")


def _keep_alignable(
    scan: _Scan, root: Path, align: Align, param: str, *, skip_bad: bool, min_images: int
) -> None:
    """Look up each image's landmarks (``data.align.landmarks``, rows named by the path relative
    to ``root``) and check them against the image's size, keeping them in ``scan.landmarks``. An
    image without a row, or whose points are NaN or outside it, is an error listing them, or with
    ``skip_bad`` is skipped and counted (and so is an identity left with fewer than
    ``min_images``)."""
    landmarks = read_landmarks(align.landmarks, allow_nan=True)
    problems: list[tuple[Path, str]] = []
    for name, files in list(scan.images.items()):
        kept = []
        for path, digest in files:
            points = landmarks.get(path.relative_to(root).as_posix())
            if points is None:
                problems.append((path, "no landmarks"))
                continue
            with Image.open(path) as image:  # the header only: the size
                size = image.size
            try:
                check_landmarks(points, *size)
            except ValueError as error:
                problems.append((path, str(error)))
                continue
            scan.landmarks[path] = points
            kept.append((path, digest))
        if len(kept) >= min_images:
            scan.images[name] = kept
        else:  # only when images were dropped: with skip_bad, or an error follows
            del scan.images[name]
            scan.skipped.append(
                {
                    "path": str(root / name),
                    "reason": f"only {len(kept)} image(s) with usable landmarks; every identity "
                    f"needs at least data.min_images_per_class = {min_images}",
                }
            )
    if problems and not skip_bad:
        listed = _one_line(
            [f"{path.relative_to(root).as_posix()} ({why})" for path, why in problems]
        )
        raise DataError(
            f"data.align.landmarks: {len(problems)} image(s) of {param} cannot be aligned with "
            f"{align.landmarks}: {listed} (set data.skip_bad_images: true to skip and count them)"
        )
    scan.skipped.extend(
        {"path": str(path), "reason": f"data.align.landmarks: {why}"} for path, why in problems
    )
    if not scan.images:
        raise DataError(f"data.align.landmarks: no image of {param} has usable landmarks")


def _cap_images(images: dict[str, list], cap: int | None, seed: int) -> dict[str, int]:
    """Keep a seeded choice of at most ``cap`` images of each identity (in place); returns the
    image counts of the identities that were capped."""
    if cap is None:
        return {}
    rng = np.random.default_rng([seed, cap])  # its own stream: the split's draws stay unchanged
    capped = {}
    for name, files in images.items():
        if len(files) > cap:
            capped[name] = len(files)
            keep = sorted(rng.choice(len(files), size=cap, replace=False))
            images[name] = [files[i] for i in keep]
    return capped


def crop_region(crop: Crop, width: int, height: int) -> tuple[int, int, int, int] | None:
    """``(left, top, right, bottom)`` of ``data.crop`` in an image of ``width`` x ``height``, or
    None when the box does not fit inside it."""
    if crop.box is not None:
        left, top, right, bottom = crop.box
        return crop.box if right <= width and bottom <= height else None
    keep_width = max(1, round(width * crop.central))
    keep_height = max(1, round(height * crop.central))
    left, top = (width - keep_width) // 2, (height - keep_height) // 2
    return left, top, left + keep_width, top + keep_height


def _derive_images(
    scan: _Scan, out_dir: Path, derive: Callable[[Path, Image.Image], Image.Image | None]
) -> None:
    """Write ``derive(path, image)`` of each image of ``scan`` as a PNG file
    ``out_dir/<identity>/<file name>.png`` and point ``scan`` at those files: how prepare caches
    the crops of ``data.crop`` and the aligned faces of ``data.align``. ``derive`` returns None
    for an image it cannot make (having noted why)."""
    for name, files in scan.images.items():
        derived = []
        for path, _ in files:
            with Image.open(path) as image:
                image = derive(path, image)
                if image is None:
                    continue
                if image.mode not in ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"):
                    image = image.convert("RGB")  # e.g. CMYK, which PNG cannot hold
                target = out_dir / name / f"{path.name}.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                image.save(target)
            derived.append((target, hashlib.md5(target.read_bytes()).hexdigest()))
        scan.images[name] = derived


def _crop_images(scan: _Scan, crop: Crop | None, out_dir: Path, param: str) -> None:
    """Cache the ``data.crop`` region of each image of ``scan`` (upright, as EXIF says) in
    ``out_dir``. A box outside an image is an error naming the images it does not fit."""
    if crop is None:
        return
    problems = []

    def cut(path: Path, image: Image.Image) -> Image.Image | None:
        image = ImageOps.exif_transpose(image)
        region = crop_region(crop, *image.size)
        if region is None:
            problems.append(f"{path} ({image.width}x{image.height})")
            return None
        return image.crop(region)

    _derive_images(scan, out_dir, cut)
    if problems:
        listed = ", ".join(problems[:MAX_LISTED_PROBLEMS])
        more = len(problems) - MAX_LISTED_PROBLEMS
        raise DataError(
            f"data.crop: the box {list(crop.box)} (left, top, right, bottom) lies outside "
            f"{len(problems)} image(s) of {param}: {listed}"
            + (f" and {more} more" if more > 0 else "")
        )


def _align_images(scan: _Scan, align: Align | None, out_dir: Path) -> None:
    """Cache each image of ``scan`` aligned onto the ArcFace template (``data.align.size``
    square, :func:`angular.data.align.align_face` on the image as stored, the pixels its
    landmarks are given in) in ``out_dir``; :func:`_keep_alignable` checked the landmarks."""
    if align is None:
        return
    _derive_images(
        scan, out_dir, lambda path, image: align_face(image, scan.landmarks[path], align.size)
    )


# --------------------------------------------------------------------------------------------------
# Splitting.


def _round_half_up(value: float) -> int:
    return int(math.floor(value + 0.5))


def _choose_unknown(identities: list[str], spec, seed: int) -> list[str]:
    if isinstance(spec, tuple):
        missing = [name for name in spec if name not in identities]
        if missing:
            raise DataError(
                f"data.unknown_identities: {missing} are not identities of the data "
                f"(found: {', '.join(identities[:20])}{' ...' if len(identities) > 20 else ''})"
            )
        return sorted(spec)
    count = spec if isinstance(spec, int) else max(1, _round_half_up(spec * len(identities)))
    if count > len(identities) - 2:
        raise DataError(
            f"data.unknown_identities: holding out {count} of {len(identities)} identities leaves "
            f"{len(identities) - count} known; at least 2 known identities are needed"
        )
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(identities), size=count, replace=False)
    return sorted(identities[i] for i in chosen)


def _split_identity(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """``(n_val, n_test)`` for an identity with ``n`` images, keeping at least one for training."""
    n_test = _round_half_up(n * test_fraction)
    n_val = _round_half_up(n * val_fraction)
    n_test = min(n_test, n - 1)
    n_val = min(n_val, n - 1 - n_test)
    return n_val, n_test


# A manifest row before it is written: (image, identity, label, split, md5); the image is a path,
# or a RecordIO set's image index.
Row = tuple[object, str, int, str, str]


def _split_identities(
    images: dict[str, list[tuple[object, str]]], identities: list[str], config: DataConfig, param
) -> tuple[list[Row], list[str], list[str]]:
    """``(rows, known, unknown)``: a seeded choice of ``unknown`` identities held out, the images
    ``(image, md5)`` of each known one (``identities`` in label order) shuffled and cut into
    train, val and test, whatever the source."""
    unknown = _choose_unknown(identities, config.unknown_identities, config.seed)
    held_out = set(unknown)  # a set: a RecordIO set may have 93k identities
    known = [name for name in identities if name not in held_out]
    if len(known) < 2:
        raise DataError(
            f"{param}: {len(known)} known identit{'y' if len(known) == 1 else 'ies'} after "
            "holding out the unknowns; classification needs at least 2 (check "
            "data.unknown_identities and data.min_images_per_class)"
        )
    label_of = {name: label for label, name in enumerate(known)}
    rng = np.random.default_rng(config.seed)
    rows: list[Row] = []
    for name in identities:
        files = images[name]
        if name in label_of:
            order = rng.permutation(len(files))
            n_val, n_test = _split_identity(len(files), config.val_fraction, config.test_fraction)
            splits = ["test"] * n_test + ["val"] * n_val
            splits += ["train"] * (len(files) - len(splits))
            for position, index in enumerate(order):
                image, digest = files[index]
                rows.append((image, name, label_of[name], splits[position], digest))
        else:
            rows.extend((image, name, -1, "unknown", digest) for image, digest in files)
    return rows, known, unknown


def _count_splits(rows: list[Row], config: DataConfig, *, test_from_path: bool) -> dict[str, int]:
    """Images per split; an empty val or test split is an error naming the key to change (an
    empty val split is what ``data.val_fraction: 0`` asks for)."""
    counts = {split: 0 for split in SPLITS}
    for row in rows:
        counts[row[3]] += 1
    for split, param_name in (("val", "data.val_fraction"), ("test", "data.test_fraction")):
        wanted = config.val_fraction > 0 if split == "val" else True
        if counts[split] == 0 and wanted:
            source = "data.test_path" if split == "test" and test_from_path else param_name
            raise DataError(
                f"{source}: the {split} split is empty (too few images per identity); "
                f"raise {param_name} or add images"
            )
    return counts


def _relative(path: Path, out_dir: Path, absolute: bool) -> str:
    if absolute:
        return str(path.resolve())
    return Path(os.path.relpath(path.resolve(), out_dir.resolve())).as_posix()


def prepare_dataset(config: DataConfig, out_dir: str | Path) -> Manifest:
    """Scan the source, check every image (a RecordIO set: its index and labels), split, and
    write ``manifest.csv`` and ``classes.json`` into ``out_dir`` (created; for ``digits`` also
    ``out_dir/images``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if config.source == RECORDIO_SOURCE:
        return _prepare_record_file(config, out_dir)
    absolute = False
    if config.source == "digits":
        root, param = _export_digits(out_dir / "images"), "data.source digits"
    else:
        root, param = Path(config.path), "data.path"
        absolute = root.is_absolute()
    scan = _scan_folder(
        root, param, skip_bad=config.skip_bad_images, min_images=config.min_images_per_class
    )
    if config.align is not None:
        _keep_alignable(
            scan,
            root,
            config.align,
            param,
            skip_bad=config.skip_bad_images,
            min_images=config.min_images_per_class,
        )
    test_scan = None
    if config.test_path is not None:
        test_scan = _scan_folder(
            Path(config.test_path), "data.test_path", skip_bad=config.skip_bad_images, min_images=1
        )
    capped = _cap_images(scan.images, config.max_images_per_class, config.seed)
    _crop_images(scan, config.crop, out_dir / CROPPED_DIR / "path", param)
    _align_images(scan, config.align, out_dir / ALIGNED_DIR / "path")
    if test_scan is not None:
        capped |= _cap_images(test_scan.images, config.max_images_per_class, config.seed)
        _crop_images(test_scan, config.crop, out_dir / CROPPED_DIR / "test_path", "data.test_path")

    rows, known, unknown = _split_identities(scan.images, sorted(scan.images), config, param)
    label_of = {name: label for label, name in enumerate(known)}
    if test_scan is not None:
        for name in sorted(test_scan.images):
            split = "test" if name in label_of else "unknown"
            if split == "unknown" and name not in unknown:
                unknown.append(name)
            for path, digest in test_scan.images[name]:
                rows.append((path, name, label_of.get(name, -1), split, digest))
        absolute = absolute or Path(config.test_path).is_absolute()
    counts = _count_splits(rows, config, test_from_path=test_scan is not None)

    # Cropped and aligned images live in the prepared folder: always relative to it.
    absolute = absolute and config.crop is None and config.align is None
    records = tuple(
        Record(_relative(path, out_dir, absolute), identity, label, split, digest)
        for path, identity, label, split, digest in rows
    )
    skipped = scan.skipped + (test_scan.skipped if test_scan else [])
    info = {
        "source": config.source,
        "counts": counts,
        "known_identities": len(known),
        "unknown_identities": len(unknown),
        "skipped": skipped,
        "ignored": scan.ignored + (test_scan.ignored if test_scan else []),
        # How the images were chosen and cut: a change rewrites the manifest (and reruns what
        # depends on it) even where no path or checksum changes.
        "crop": None if config.crop is None else config.crop.model_dump(exclude_none=True),
        "align": None if config.align is None else config.align.model_dump(),
        "max_images_per_class": config.max_images_per_class,
        "capped": capped,  # identity -> its image count before the cap
    }
    _write_manifest(out_dir, records, known, sorted(unknown), info)
    return Manifest(out_dir, records, tuple(known), tuple(sorted(unknown)), info)


def _prepare_record_file(config: DataConfig, out_dir: Path) -> Manifest:
    """:func:`prepare_dataset` of an insightface RecordIO set: the identities and their images
    from the record headers' labels alone (no image decoded or hashed), the same split as an
    image folder's (:func:`_split_identities`), the set identified by its fingerprint."""
    param = "data.path"
    if not Path(config.path).exists():
        raise DataError(
            f"{param}: {config.path} does not exist (an insightface RecordIO set's "
            "folder, holding train.rec, train.idx and property, or its .rec file)"
        )
    records_file = RecordFile(config.path)
    labels = records_file.labels()
    order = np.argsort(labels, kind="stable")  # image indices grouped by label, in index order
    present, starts = np.unique(labels[order], return_index=True)
    groups = np.split(order, starts[1:])
    images: dict[str, list[tuple[object, str]]] = {}
    too_few = []  # (label, its image count)
    for label, indices in zip(present.tolist(), groups):
        if len(indices) < config.min_images_per_class:
            too_few.append((label, len(indices)))
        else:
            images[str(label)] = [(index, "") for index in indices.tolist()]
    rec_path = records_file.rec_path
    need = f"at least data.min_images_per_class = {config.min_images_per_class}"
    if too_few and not config.skip_bad_images:
        listed = _one_line([f"identity {label} has {count}" for label, count in too_few])
        raise DataError(
            f"{param}: {len(too_few)} identit{'y' if len(too_few) == 1 else 'ies'} of {rec_path} "
            f"with fewer images than {need}: {listed} (set data.skip_bad_images: true to skip "
            "and count them)"
        )
    capped = _cap_images(images, config.max_images_per_class, config.seed)
    with _bulk():
        rows, known, unknown = _split_identities(images, list(images), config, param)
        counts = _count_splits(rows, config, test_from_path=False)
        records = tuple(
            Record(str(index), identity, label, split, digest)
            for index, identity, label, split, digest in rows
        )
    info = {
        "source": config.source,
        "counts": counts,
        "known_identities": len(known),
        "unknown_identities": len(unknown),
        "skipped": [
            {"path": f"{rec_path}, identity {label}", "reason": f"only {count} image(s); {need}"}
            for label, count in too_few
        ],
        "ignored": [],
        "crop": None,
        "align": None,
        "max_images_per_class": config.max_images_per_class,
        "capped": capped,
        # What identifies the set (angular.data.recordio.fingerprint): a changed index rewrites
        # the manifest, and a manifest refuses a set that changed after it was written.
        "recordio": {
            "rec": _relative(rec_path, out_dir, Path(config.path).is_absolute()),
            "fingerprint": records_file.fingerprint(),
            "images": len(records_file),
            "num_classes": records_file.num_classes,
        },
    }
    _write_manifest(out_dir, records, known, sorted(unknown), info)
    manifest = Manifest(out_dir, records, tuple(known), tuple(sorted(unknown)), info)
    manifest.__dict__["record_file"] = records_file  # already open and checked
    return manifest


def _write_manifest(out_dir: Path, records, classes, unknown, info) -> None:
    with open(out_dir / MANIFEST_FILE, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(MANIFEST_COLUMNS)
        for r in records:
            writer.writerow((r.path, r.identity, r.label, r.split, r.md5))
    document = {"classes": list(classes), "unknown": list(unknown), **info}
    (out_dir / CLASSES_FILE).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


@contextlib.contextmanager
def _bulk():
    """Python's cyclic garbage collector off while millions of rows are built (none of them in a
    cycle): with it on, its full passes over the growing heap doubled read_manifest's time on a
    5.2M-row manifest."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def read_manifest(prepared_dir: str | Path) -> Manifest:
    """Read what :func:`prepare_dataset` wrote (a clear error when the folder is not prepared)."""
    prepared_dir = Path(prepared_dir)
    manifest_path, classes_path = prepared_dir / MANIFEST_FILE, prepared_dir / CLASSES_FILE
    for path in (manifest_path, classes_path):
        if not path.is_file():
            raise DataError(f"{path} is missing: run the prepare stage first (dvc repro prepare)")
    document = json.loads(classes_path.read_text(encoding="utf-8"))
    with open(manifest_path, newline="", encoding="utf-8") as handle:
        # csv.reader, not DictReader: a RecordIO set's manifest has millions of rows.
        reader = csv.reader(handle)
        header = next(reader, None)
        if tuple(header or ()) != MANIFEST_COLUMNS:
            raise DataError(
                f"{manifest_path}: expected the columns {','.join(MANIFEST_COLUMNS)}, got {header}"
            )
        splits = {split: split for split in SPLITS}  # one string per split, not one per row
        try:
            with _bulk():
                records = tuple(
                    Record(path, identity, int(label), splits.get(split, split), md5)
                    for path, identity, label, split, md5 in reader
                )
        except ValueError as error:
            raise DataError(
                f"{manifest_path}, line {reader.line_num}: not a manifest row ({error}); "
                "rerun prepare"
            ) from None
    info = {k: v for k, v in document.items() if k not in ("classes", "unknown")}
    return Manifest(
        prepared_dir, records, tuple(document["classes"]), tuple(document["unknown"]), info
    )
