"""insightface's MXNet RecordIO training sets (``train.rec``, ``train.idx``, ``property``), read and
written without MXNet.

The format, as MXNet 1.9.1 (dmlc-core's ``RecordIOWriter``) writes it:

- ``train.idx`` is text, one ``key<TAB>offset`` line per record (the offset in ``train.rec``);
- each record in ``train.rec`` is the magic word ``0xced7230a``, then ``lrecord`` (a uint32: the
  continuation flag ``cflag`` in its top 3 bits, the part's length in its low 29), the part, and
  zero padding to 4 bytes. A payload that holds the magic at a 4-byte aligned offset is cut there
  into parts flagged 1 (first), 2 (middle) and 3 (last); the reader joins them with the magic
  between them;
- a payload starts with the IRHeader ``<IfQQ`` (flag, label, id, id2); when flag > 0, ``flag``
  float32 labels follow it (and ``label`` is 0);
- record 0's header (flag 2) holds ``[first identity key, end key)``: the image records are keys 1
  to first - 1, each ``flag=0, label=<class>, id=<key>``, followed by one record per identity whose
  two labels are the ``[first key, end key)`` of its images;
- ``property`` is ``num_classes,height,width``.

:class:`RecordFile` reads such a folder by offset, one record at a time: it never holds the images
in memory, and each process (each DataLoader worker) opens its own file handle. A prepared
``data.source: insightface_rec`` manifest's rows resolve to :class:`PackedImage` records, a split
to :class:`PackedImages` (one index array), which :mod:`angular.data.images` decodes as it decodes
files.
:func:`fingerprint` identifies a set from its index and file sizes, without reading the images.
:func:`write_record_folder` and :func:`pack_images` (``angular pack images``) write the same
layout, byte for byte as MXNet does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import os
import struct
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from angular.data.align import align_face, landmarks_for, read_landmarks
from angular.data.errors import DataError

__all__ = [
    "MAGIC",
    "PackedImage",
    "PackedImages",
    "RecordHeader",
    "RecordFile",
    "fingerprint",
    "frame_record",
    "pack_header",
    "unpack_header",
    "write_record_folder",
    "encode_face",
    "pack_images",
]

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
LREC = struct.Struct("<II")  # magic, lrecord
IR_HEADER = struct.Struct("<IfQQ")  # flag, label, id, id2
# A one-part record's first 36 bytes: magic, lrecord, then the IRHeader's flag and label, its two
# ids skipped, and the first of its labels (when flag > 0).
RECORD_HEAD = struct.Struct("<IIIf16xf")
LENGTH_BITS = 29
LENGTH_MASK = (1 << LENGTH_BITS) - 1
REC_FILE, IDX_FILE, PROPERTY_FILE = "train.rec", "train.idx", "property"
JPEG_QUALITY = 95
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".ppm", ".tif", ".tiff", ".webp")


@dataclasses.dataclass(frozen=True)
class RecordHeader:
    """A record's IRHeader: ``labels`` holds the ``flag`` float32 labels that follow it (empty when
    flag is 0, and then ``label`` is the one label)."""

    flag: int
    label: float
    id: int
    id2: int
    labels: tuple[float, ...] = ()


def pack_header(header: RecordHeader, payload: bytes) -> bytes:
    """The record bytes of ``payload`` behind ``header`` (``mx.recordio.pack``)."""
    labels = np.asarray(header.labels, dtype="<f4").tobytes()
    head = IR_HEADER.pack(len(header.labels), header.label, header.id, header.id2)
    return head + labels + payload


def unpack_header(record: bytes) -> tuple[RecordHeader, bytes]:
    """``(header, payload)`` of a record's bytes (``mx.recordio.unpack``); ValueError when the
    record is too short for its header."""
    if len(record) < IR_HEADER.size:
        raise ValueError(f"{len(record)} bytes, shorter than the {IR_HEADER.size}-byte header")
    flag, label, key, key2 = IR_HEADER.unpack_from(record)
    end = IR_HEADER.size + 4 * flag
    if len(record) < end:
        raise ValueError(f"{len(record)} bytes, too short for the header's {flag} labels")
    labels = tuple(float(x) for x in np.frombuffer(record, "<f4", flag, IR_HEADER.size))
    return RecordHeader(flag, label, key, key2, labels), record[end:]


def frame_record(record: bytes) -> bytes:
    """The bytes of one record in a ``.rec`` file, as dmlc's ``RecordIOWriter::WriteRecord``
    writes them: cut where the magic stands at an aligned offset, each part framed, zero padding."""
    if len(record) > LENGTH_MASK:
        raise ValueError(f"a record of {len(record)} bytes exceeds RecordIO's 2**29 - 1")
    out, start, found = [], 0, record.find(MAGIC_BYTES)
    while found != -1:
        if found % 4 == 0:
            flag = 1 if start == 0 else 2
            out += [MAGIC_BYTES, struct.pack("<I", flag << LENGTH_BITS | found - start)]
            out.append(record[start:found])
            start = found + 4
            found = record.find(MAGIC_BYTES, start)
        else:
            found = record.find(MAGIC_BYTES, found + 1)
    flag = 3 if start else 0
    out += [MAGIC_BYTES, struct.pack("<I", flag << LENGTH_BITS | len(record) - start)]
    out += [record[start:], bytes(-len(record) % 4)]
    return b"".join(out)


def locate(path: str | Path) -> tuple[Path, Path, Path]:
    """``(rec, idx, property)`` paths of a set given as its folder or its ``.rec`` file."""
    path = Path(path)
    rec = path / REC_FILE if path.is_dir() else path
    if not rec.is_file():
        raise DataError(f"{rec}: no such RecordIO file (give the folder or the .rec file)")
    idx = rec.with_suffix(".idx")
    if not idx.is_file():
        raise DataError(f"{idx}: the index of {rec} is missing")
    return rec, idx, rec.parent / PROPERTY_FILE


def _parse_index(text: bytes) -> np.ndarray | None:
    """The ``(key, offset)`` rows of an index written as MXNet writes it (each line
    ``digits<TAB>digits``), parsed by numpy in one pass with no object per number (MS1MV3's
    index has 5.2M lines); None for any other text, which :func:`read_index` reads line by line."""
    data = np.frombuffer(text, np.uint8)
    allowed = np.zeros(256, dtype=bool)
    allowed[[ord(c) for c in "0123456789\t\n"]] = True
    if not allowed[data].all():
        return None
    ends = np.flatnonzero(data == ord("\n"))
    lines = len(ends) + (1 if text and not text.endswith(b"\n") else 0)
    tabs = np.flatnonzero(data == ord("\t"))
    if len(tabs) != lines or not np.array_equal(np.searchsorted(ends, tabs), np.arange(lines)):
        return None  # a line without exactly one tab (a blank line, a third field)
    numbers = np.fromstring(text.decode("ascii"), dtype=np.int64, sep=" ")
    if len(numbers) != 2 * lines or (len(numbers) and numbers.max() == np.iinfo(np.int64).max):
        return None  # an empty field, or a number beyond int64 (numpy saturates it)
    return numbers.reshape(-1, 2)


def read_index(idx: Path, rec_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The keys and offsets of an ``.idx`` file, sorted by key; every offset checked against the
    ``.rec`` file's size."""
    text = idx.read_bytes()
    pairs = _parse_index(text)
    if pairs is None:  # find the line to name (slow, but only for a bad or unusual file)
        for number, line in enumerate(text.splitlines(), 1):
            parts = line.split()
            if parts and (len(parts) != 2 or not all(p.isdigit() for p in parts)):
                raise DataError(f"{idx}: line {number}: {line[:60]!r} is not 'key<TAB>offset'")
        try:  # every line is fine: blank lines, or numbers beyond int64
            pairs = np.array(text.split(), dtype=np.int64).reshape(-1, 2)
        except (ValueError, OverflowError):
            raise DataError(f"{idx}: not a RecordIO index") from None
    if not len(pairs):
        raise DataError(f"{idx}: the index is empty")
    order = np.argsort(pairs[:, 0], kind="stable")
    keys, offsets = pairs[order, 0], pairs[order, 1]
    duplicate = np.flatnonzero(np.diff(keys) == 0)
    if len(duplicate):
        raise DataError(f"{idx}: record {keys[duplicate[0]]} is listed twice")
    past = np.flatnonzero((offsets < 0) | (offsets + LREC.size > rec_size))
    if len(past):
        key, offset = keys[past[0]], offsets[past[0]]
        more = f" (with {len(past) - 1} more of the {len(keys)} records)" if len(past) > 1 else ""
        raise DataError(
            f"{idx}: record {key}: offset {offset} is past the end of the .rec "
            f"({rec_size} bytes){more}; the .rec is truncated or belongs to another index"
        )
    return keys, offsets


def fingerprint(path: str | Path) -> str:
    """A SHA-256 hex digest identifying a RecordIO set without reading its images: it covers the
    whole ``.idx`` (every key and offset, hence every record's place), the ``.rec`` file's size
    and the ``property`` file. An image rewritten in place with the same length is not seen."""
    rec, idx, prop = locate(path)
    digest = hashlib.sha256(b"insightface-recordio-1\n")
    with open(idx, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    digest.update(f"\nrec size {rec.stat().st_size}\n".encode())
    digest.update(prop.read_bytes() if prop.is_file() else b"no property")
    return digest.hexdigest()


class RecordFile(Dataset):
    """An insightface RecordIO set (the folder, or its ``.rec`` file) as a Dataset: ``[i]`` is
    ``(RGB PIL image, int label)`` of the i-th image record in key order (``transform`` applied to
    the image when given). Records are read by offset through a handle each process opens for
    itself, so DataLoader workers share nothing; bad input raises one :class:`DataError` naming
    the file and the record key."""

    def __init__(self, path: str | Path, transform: Callable | None = None):
        self._handle: int | None = None  # the .rec's descriptor, opened by process _pid
        self._pid: int | None = None
        self.rec_path, self.idx_path, property_path = locate(path)
        self.transform = transform
        self._size = self.rec_path.stat().st_size
        self._keys, self._offsets = read_index(self.idx_path, self._size)
        self.property = self._read_property(property_path)
        self.header = self.read_header(0) if self._keys[0] == 0 else None
        if self.header is not None and len(self.header.labels) >= 2:
            first, end = (int(x) for x in self.header.labels[:2])
            if not 1 <= first <= end:
                raise DataError(
                    f"{self.rec_path}: record 0: header labels {list(self.header.labels)} are "
                    "not [first identity key, end key)"
                )
            self.image_keys = np.arange(1, first, dtype=np.int64)
            self.identity_keys = np.arange(first, end, dtype=np.int64)
            self._image_offsets = self._offsets_of(self.image_keys, "record 0's header announces")
            self.num_classes = end - first
        else:  # no header record: every record is an image
            self.image_keys = self._keys[self._keys != 0]
            self.identity_keys = np.zeros(0, dtype=np.int64)
            self._image_offsets = self._offsets[self._keys != 0]
            self.num_classes = self.property[0] if self.property else None
        if self.property and self.num_classes != self.property[0]:
            raise DataError(
                f"{property_path}: {self.property[0]} classes, but the header of "
                f"{self.rec_path} gives {self.num_classes} identity records"
            )

    def _read_property(self, path: Path) -> tuple[int, ...] | None:
        if not path.is_file():
            return None
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        try:
            values = tuple(int(x) for x in text.split(","))
        except ValueError:
            values = ()
        if len(values) != 3 or min(values) < 1:
            raise DataError(f"{path}: {text[:60]!r} is not 'num_classes,height,width'")
        return values

    def _offsets_of(self, keys: np.ndarray, wanted_by: str = "") -> np.ndarray:
        positions = np.searchsorted(self._keys, keys).clip(0, len(self._keys) - 1)
        missing = np.flatnonzero(self._keys[positions] != keys)
        if len(missing):
            count = f" ({len(missing)} of the {len(keys)} records {wanted_by})" if wanted_by else ""
            raise DataError(f"{self.idx_path}: record {keys[missing[0]]} is missing{count}")
        return self._offsets[positions]

    # ---------------------------------------------------------------------------------------------
    # Reading.

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_handle=None, _pid=None)  # a new process opens its own handle
        return state

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        if self._handle is not None and self._pid == os.getpid():
            os.close(self._handle)
        self._handle = None

    def _fd(self) -> int:
        if self._handle is None or self._pid != os.getpid():
            # After a fork the parent's descriptor is shared: open our own (never close theirs).
            self._handle = os.open(self.rec_path, os.O_RDONLY)
            self._pid = os.getpid()
        return self._handle

    def _error(self, key: int, what: str) -> DataError:
        return DataError(f"{self.rec_path}: record {key}: {what}")

    def _read(self, key: int, offset: int, limit: int | None = None) -> bytes:
        """Record ``key``'s bytes at ``offset``, parts joined; with ``limit``, reading may stop
        once that many bytes are in."""
        fd, parts, total, position = self._fd(), [], 0, int(offset)
        while True:
            head = os.pread(fd, LREC.size if limit is None else LREC.size + limit, position)
            if len(head) < LREC.size:
                raise self._error(key, f"the .rec ends at byte {self._size} inside a record head")
            magic, lrecord = LREC.unpack_from(head)
            if magic != MAGIC:
                raise self._error(
                    key, f"wrong magic 0x{magic:08x} at byte {position} (not a RecordIO record)"
                )
            flag, length = lrecord >> LENGTH_BITS, lrecord & LENGTH_MASK
            if flag > 3 or (flag in (0, 1)) != (not parts):
                raise self._error(key, f"part flag {flag} out of sequence at byte {position}")
            part = head[LREC.size : LREC.size + length]
            if len(part) < length:
                part += os.pread(fd, length - len(part), position + LREC.size + len(part))
            if len(part) < length:
                raise self._error(
                    key, f"the .rec is truncated: a {length}-byte part at byte {position}"
                )
            parts.append(part)
            total += length
            position += LREC.size + length + (-length % 4)
            if flag in (0, 3) or (limit is not None and total >= limit):
                return MAGIC_BYTES.join(parts)

    def read_record(self, key: int) -> bytes:
        """The raw bytes of record ``key`` (IRHeader, labels and payload)."""
        return self._read(key, self._offsets_of(np.array([key]))[0])

    def read_header(self, key: int) -> RecordHeader:
        record = self._read(key, self._offsets_of(np.array([key]))[0])
        return self._unpack(key, record)[0]

    def _unpack(self, key: int, record: bytes) -> tuple[RecordHeader, bytes]:
        try:
            return unpack_header(record)
        except ValueError as error:
            raise self._error(key, f"bad IRHeader: {error}") from None

    def _label(self, key: int, header: RecordHeader) -> int:
        value = header.labels[0] if header.labels else header.label
        limit = self.num_classes
        whole = math.isfinite(value) and value == int(value) and value >= 0
        if not (whole and (limit is None or value < limit)):
            bound = f"[0, {limit})" if limit is not None else "0, 1, 2, ..."
            raise self._error(key, f"label {value} is not a class in {bound}")
        return int(value)

    def __len__(self) -> int:
        return len(self.image_keys)

    def image_record(self, index: int) -> tuple[int, bytes]:
        """``(label, encoded image bytes)`` of the ``index``-th image record."""
        if not 0 <= index < len(self):
            raise IndexError(f"image {index} of {len(self)}")
        key = int(self.image_keys[index])
        header, payload = self._unpack(key, self._read(key, self._image_offsets[index]))
        return self._label(key, header), payload

    def decode(self, index: int) -> tuple[Image.Image, int]:
        """``(PIL image as stored, label)`` of the ``index``-th image record, decoded (loaded)."""
        label, payload = self.image_record(index)
        try:
            image = Image.open(io.BytesIO(payload))
            image.load()
        except UnidentifiedImageError:
            raise self._error(
                int(self.image_keys[index]), "cannot decode the image (not an image PIL reads)"
            ) from None
        except (OSError, SyntaxError, ValueError) as error:
            key = int(self.image_keys[index])
            raise self._error(key, f"cannot decode the image ({error})") from None
        except Image.DecompressionBombError as error:
            raise self._error(int(self.image_keys[index]), f"refused by PIL ({error})") from None
        return image, label

    def __getitem__(self, index: int):
        image, label = self.decode(index)
        image = image.convert("RGB")
        return (image if self.transform is None else self.transform(image)), label

    def image(self, index: int) -> PackedImage:
        """The ``index``-th image record as a :class:`PackedImage` (read when decoded)."""
        if not 0 <= index < len(self):
            raise DataError(
                f"{self.rec_path}: image {index} does not exist (the set holds {len(self)}); "
                "rerun prepare"
            )
        return PackedImage(self, index)

    def labels(self) -> np.ndarray:
        """Every image's label (int64, in image order), from the record headers alone: one small
        read per record, no image decoded. Scales to millions of records: the per-record loop
        only reads and unpacks; the labels are checked all at once."""
        want = IR_HEADER.size + 4  # the header and the first of its labels, if any
        fd, size = self._fd(), LREC.size + want
        values = np.empty(len(self), dtype=np.float64)
        keys = self.image_keys.tolist()
        for index, offset in enumerate(self._image_offsets.tolist()):
            head = os.pread(fd, size, offset)
            if len(head) == size:  # the usual record: one part holding the whole header
                magic, lrecord, flag, label, first = RECORD_HEAD.unpack_from(head)
                need = IR_HEADER.size + (4 if flag else 0)
                if magic == MAGIC and lrecord >> LENGTH_BITS == 0 and lrecord >= need:
                    values[index] = first if flag else label
                    continue
            key = keys[index]
            header = self._unpack(key, self._read(key, offset, limit=want))[0]  # or its fault
            values[index] = header.labels[0] if header.labels else header.label
        limit = np.inf if self.num_classes is None else self.num_classes
        with np.errstate(invalid="ignore"):
            good = np.isfinite(values) & (values == np.floor(values)) & (values >= 0)
            good &= values < limit
        if not good.all():
            first_bad = int(np.argmin(good))
            key = keys[first_bad]
            self._label(key, RecordHeader(0, float(values[first_bad]), key, 0))  # raises
        return values.astype(np.int64)

    def fingerprint(self) -> str:
        """:func:`fingerprint` of this set."""
        return fingerprint(self.rec_path)


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class PackedImage:
    """One image of a RecordIO set, the ``index``-th image record of ``file``: what a manifest row
    of a ``data.source: insightface_rec`` set resolves to, where an image file's row resolves to
    its path. Images of one set share one :class:`RecordFile`, so pickling a list of them (to a
    DataLoader worker) carries the index once, and each process reads through its own handle."""

    file: RecordFile
    index: int

    def decode(self) -> Image.Image:
        """The image as stored (a :class:`DataError` naming the file and record when it is bad)."""
        return self.file.decode(self.index)[0]

    def __str__(self) -> str:
        return f"{self.file.rec_path}, record {int(self.file.image_keys[self.index])}"

    def __repr__(self) -> str:
        return f"PackedImage({str(self.file.rec_path)!r}, index={self.index})"


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class PackedImages(Sequence):
    """Many images of one set as ``indices`` into ``file``: a sequence of :class:`PackedImage`
    held as one array, not one object per image. A Dataset of millions of images keeps it so:
    forked DataLoader workers would otherwise copy a list of objects page by page as they touch
    the objects' reference counts."""

    file: RecordFile
    indices: np.ndarray  # int64

    @classmethod
    def of(cls, images: Sequence[PackedImage]) -> PackedImages | None:
        """The images as one :class:`PackedImages` when they are all records of one set."""
        if isinstance(images, PackedImages):
            return images
        if not images or not all(isinstance(image, PackedImage) for image in images):
            return None
        file = images[0].file
        if any(image.file is not file for image in images):
            return None
        return cls(file, np.fromiter((image.index for image in images), np.int64, len(images)))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position):
        if isinstance(position, slice):
            return PackedImages(self.file, self.indices[position])
        return PackedImage(self.file, int(self.indices[position]))

    def __add__(self, other):
        """Another set's images, or a list, concatenated (as lists of paths concatenate)."""
        if isinstance(other, PackedImages) and other.file is self.file:
            return PackedImages(self.file, np.concatenate([self.indices, other.indices]))
        return [*self, *other]

    def __radd__(self, other):
        return [*other, *self]

    def __repr__(self) -> str:
        return f"PackedImages({str(self.file.rec_path)!r}, {len(self)} images)"


# -------------------------------------------------------------------------------------------------
# Writing.


def write_record_folder(
    out_dir: str | Path,
    images: Iterable[tuple[int, bytes]],
    *,
    image_size: tuple[int, int] = (112, 112),
) -> tuple[int, int]:
    """Write ``train.rec``, ``train.idx`` and ``property`` into ``out_dir`` from ``(label,
    encoded image)`` pairs grouped by label 0, 1, 2, ... (every class has an image), laid out as
    insightface's sets: image records keys 1..n, one identity record per class, then record 0's
    header (written last, as MXNet wrote the fixtures). Returns ``(images, classes)``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rec_partial, idx_partial = out / f".{REC_FILE}.partial", out / f".{IDX_FILE}.partial"
    ranges: list[list[int]] = []  # [first key, end key) per class
    key = 0
    with open(rec_partial, "wb") as rec, open(idx_partial, "w", encoding="ascii") as idx:

        def write(record_key: int, record: bytes) -> None:
            idx.write(f"{record_key}\t{rec.tell()}\n")
            rec.write(frame_record(record))

        for label, payload in images:
            key += 1
            if label == len(ranges) - 1:
                ranges[-1][1] = key + 1
            elif label == len(ranges):
                ranges.append([key, key + 1])
            else:
                raise ValueError(
                    f"image {key}: label {label} after class {len(ranges) - 1}: the images must "
                    "come grouped by class, in label order 0, 1, 2, ..."
                )
            write(key, pack_header(RecordHeader(0, float(label), key, 0), payload))
        first = key + 1
        for label, (begin, end) in enumerate(ranges):
            labels = (float(begin), float(end))
            write(first + label, pack_header(RecordHeader(2, 0.0, first + label, 0, labels), b""))
        end_key = first + len(ranges)
        write(0, pack_header(RecordHeader(2, 0.0, 0, 0, (float(first), float(end_key))), b""))
    rec_partial.replace(out / REC_FILE)  # whole files only: a killed run leaves the old set
    idx_partial.replace(out / IDX_FILE)
    height, width = image_size
    (out / PROPERTY_FILE).write_text(f"{len(ranges)},{height},{width}\n", encoding="ascii")
    return key, len(ranges)


def encode_face(
    path: str | Path, size: int, landmarks: np.ndarray | None = None, row: str = ""
) -> bytes:
    """An image file as insightface stores faces: JPEG, RGB, ``size`` x ``size``. A JPEG that is
    already so is kept byte for byte (no second compression); any other is converted, resized
    (bilinear) and encoded at quality 95. With ``landmarks`` ((5, 2) pixels) the face is aligned
    (:func:`angular.data.align.align_face`) instead of resized; landmarks that do not fit the
    image are an error naming ``row`` (where they came from)."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            if landmarks is not None:
                try:
                    image = align_face(image, landmarks, size)
                except ValueError as error:
                    raise DataError(f"{row or path}: {error}") from None
            elif image.format == "JPEG" and image.mode == "RGB" and image.size == (size, size):
                return path.read_bytes()
            image = image.convert("RGB")
            if image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.BILINEAR)
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=JPEG_QUALITY)
            return buffer.getvalue()
    except DataError:
        raise
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
        raise DataError(f"{path}: cannot read the image ({error})") from None


def image_folder(folder: str | Path) -> list[tuple[str, list[Path]]]:
    """``(identity, image paths)`` of a folder with one sub-folder per identity, both sorted by
    name; hidden entries and files that are not images are ignored."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder (one sub-folder of images per identity)")
    identities = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(
            p
            for p in sub.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not files:
            raise DataError(f"{sub}: an identity folder without images")
        identities.append((sub.name, files))
    if not identities:
        raise DataError(f"{folder}: no identity sub-folders")
    return identities


def pack_images(
    folder: str | Path, out_dir: str | Path, size: int = 112, landmarks: str | Path | None = None
) -> tuple[int, int]:
    """``angular pack images``: an image folder (one sub-folder per identity, labels in sorted
    name order) into ``train.rec``/``train.idx``/``property``. With ``landmarks`` (a TSV,
    :func:`angular.data.align.read_landmarks`, paths relative to ``folder``) each face is aligned
    first; an image without a row is an error that lists them. Returns ``(images, classes)``."""
    identities = image_folder(folder)
    paths = [(label, path) for label, (_, files) in enumerate(identities) for path in files]
    names = [path.relative_to(folder).as_posix() for _, path in paths]
    points: list[np.ndarray | None] = [None] * len(paths)
    if landmarks is not None:
        points = landmarks_for(names, read_landmarks(landmarks), landmarks)
    images = (
        (label, encode_face(path, size, where, f"{landmarks}, row {name}"))
        for (label, path), where, name in zip(paths, points, names)
    )
    return write_record_folder(out_dir, images, image_size=(size, size))
