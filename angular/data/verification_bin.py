"""insightface's verification sets (``lfw.bin``, ``cfp_fp.bin``, ``agedb_30.bin``, ...): read
safely, and written from an LFW-style pairs file (``angular pack pairs``).

A ``.bin`` is a Python 2 pickle (protocol 2) of ``(list of 2P encoded images, list of P bools)``:
images 2k and 2k+1 form pair k, and the bool says whether they show the same person. A pickle can
run code when loaded, and these files are downloaded: :func:`read_bin` loads them with an unpickler
that refuses every global (plain strings, lists, tuples and booleans need none), so a file that
names one is refused before anything runs.
"""

from __future__ import annotations

import io
import pickle
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from angular.data.manifest import DataError
from angular.data.recordio import encode_face

__all__ = ["RefusedGlobal", "read_bin", "load_bin", "write_bin", "read_pairs", "pack_pairs"]


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle names a global (a class or function), which could run code."""


class _DataOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        raise RefusedGlobal(f"{module}.{name}")


def read_bin(path: str | Path) -> tuple[list[bytes], np.ndarray]:
    """``(encoded images, same)`` of a verification ``.bin``: the images' bytes as stored, and a
    bool array with one entry per pair. Loaded with ``encoding='bytes'`` by an unpickler that
    refuses every global; a bad file raises one :class:`DataError` line."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            content = _DataOnlyUnpickler(handle, encoding="bytes").load()
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror or error})") from None
    except RefusedGlobal as error:
        raise DataError(
            f"{path}: refused: a downloaded pickle can run code, and this one names "
            f"`{error}`; a verification .bin holds only image bytes and booleans"
        ) from None
    except Exception as error:  # any malformed pickle: the unpickler raises many kinds
        raise DataError(
            f"{path}: not a verification .bin (not a readable pickle: {type(error).__name__}: "
            f"{error})"
        ) from None
    if not (isinstance(content, (tuple, list)) and len(content) == 2):
        raise DataError(
            f"{path}: not a verification .bin: expected (images, same), got "
            f"{type(content).__name__}"
        )
    images, same = content
    if not isinstance(images, (list, tuple)) or not all(isinstance(x, bytes) for x in images):
        raise DataError(f"{path}: not a verification .bin: the images are not a list of bytes")
    if not isinstance(same, (list, tuple)) or not all(
        isinstance(x, (bool, int, np.bool_)) for x in same
    ):
        raise DataError(f"{path}: not a verification .bin: the pair labels are not booleans")
    if len(images) != 2 * len(same):
        raise DataError(f"{path}: {len(images)} images for {len(same)} pairs (two images per pair)")
    return list(images), np.asarray(same, dtype=bool)


def load_bin(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(images, same)`` of a verification ``.bin``: the images decoded to one uint8 RGB array
    (2P, height, width, 3), pair k being images 2k and 2k+1, and a bool array of the P pairs'
    same-ness. See :func:`read_bin` for the safety of loading."""
    path = Path(path)
    encoded, same = read_bin(path)
    images = None  # filled in place once the first image gives the size: no second copy
    for index, data in enumerate(encoded):
        try:
            with Image.open(io.BytesIO(data)) as image:
                array = np.asarray(image.convert("RGB"))
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
            raise DataError(f"{path}: image {index}: cannot decode ({error})") from None
        if images is None:
            images = np.empty((len(encoded), *array.shape), dtype=np.uint8)
        if array.shape != images.shape[1:]:
            raise DataError(
                f"{path}: image {index} is {array.shape[1]}x{array.shape[0]}, image 0 "
                f"{images.shape[2]}x{images.shape[1]}: the faces must share one size"
            )
        images[index] = array
    if images is None:
        images = np.zeros((0, 0, 0, 3), dtype=np.uint8)
    return images, same


def write_bin(path: str | Path, images: Sequence[bytes], same: Sequence[bool]) -> None:
    """Write a verification ``.bin`` as the published ones are: a Python 2 protocol-2 pickle of
    ``(list of byte strings, list of bools)``, the strings as Python 2 ``str`` (``BINSTRING``), so
    that Python 2 and 3 (``encoding='bytes'``) both load it and no global is named."""
    if len(images) != 2 * len(same):
        raise ValueError(f"{len(images)} images for {len(same)} pairs (two images per pair)")
    out = [b"\x80\x02", b"]("]  # PROTO 2, EMPTY_LIST, MARK
    for data in images:
        out += [b"T", struct.pack("<i", len(data)), bytes(data)]  # BINSTRING
    out.append(b"e](")  # APPENDS, EMPTY_LIST, MARK
    out += [b"\x88" if flag else b"\x89" for flag in same]  # NEWTRUE / NEWFALSE
    out.append(b"e\x86.")  # APPENDS, TUPLE2, STOP
    path = Path(path)
    partial = path.parent / f".{path.name}.partial"
    partial.write_bytes(b"".join(out))
    partial.replace(path)


def read_pairs(path: str | Path) -> list[tuple[str, int, str, int]]:
    """The pairs of an LFW-style ``pairs.txt``: an optional first line of counts, then
    ``name n1 n2`` (the same person) or ``name1 n1 name2 n2`` (two people) per line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot read the pairs file ({error})") from None
    pairs = []
    for number, line in enumerate(lines, 1):
        fields = line.split()
        if not fields or (number == 1 and all(f.isdigit() for f in fields)):
            continue
        try:
            if len(fields) == 3:
                pairs.append((fields[0], int(fields[1]), fields[0], int(fields[2])))
            elif len(fields) == 4:
                pairs.append((fields[0], int(fields[1]), fields[2], int(fields[3])))
            else:
                raise ValueError
        except ValueError:
            raise DataError(
                f"{path}: line {number}: {line[:80]!r} is not 'name n1 n2' or 'name1 n1 name2 n2'"
            ) from None
    if not pairs:
        raise DataError(f"{path}: no pairs")
    return pairs


def pack_pairs(
    pairs_file: str | Path, images_root: str | Path, out: str | Path, size: int = 112
) -> tuple[int, int]:
    """``angular pack pairs``: an LFW-style pairs file and its images (``ROOT/name/name_0001.jpg``)
    into a verification ``.bin`` (faces as :func:`~angular.data.recordio.encode_face` stores
    them). Returns ``(pairs, same pairs)``."""
    pairs = read_pairs(pairs_file)
    root = Path(images_root)
    paths = [
        root / name / f"{name}_{number:04d}.jpg"
        for first, n1, second, n2 in pairs
        for name, number in ((first, n1), (second, n2))
    ]
    missing = [str(p) for p in dict.fromkeys(paths) if not p.is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise DataError(f"{pairs_file}: {len(missing)} image(s) not under {root}: {shown}")
    encoded: dict[Path, bytes] = {}  # a photograph in several pairs is encoded once
    for path in paths:
        if path not in encoded:
            encoded[path] = encode_face(path, size)
    images = [encoded[path] for path in paths]
    same = [first == second for first, _, second, _ in pairs]
    write_bin(out, images, same)
    return len(pairs), sum(same)
