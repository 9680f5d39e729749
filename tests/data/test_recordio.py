"""insightface RecordIO without MXNet (angular.data.recordio): the reader against files MXNet 1.9.1
wrote (../shared/data/insightface, skipped when absent), and the writer and reader on sets written
here, bad input included."""

from __future__ import annotations

import io
import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from angular.data import DataError, RecordFile, write_record_folder
from angular.data.recordio import (
    MAGIC,
    MAGIC_BYTES,
    RecordHeader,
    fingerprint,
    frame_record,
    pack_header,
    pack_images,
    unpack_header,
)

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "../shared/data/insightface"
needs_fixture = pytest.mark.skipif(
    not (FIXTURE / "train.rec").is_file(), reason=f"the MXNet-written fixture is not at {FIXTURE}"
)


def jpeg(rng: np.random.Generator, size: int = 24, comment: bytes = b"") -> bytes:
    """A random RGB JPEG; ``comment`` goes into a COM segment right after the SOI marker."""
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    data = buffer.getvalue()
    if comment:
        segment = b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment
        data = data[:2] + segment + data[2:]
    return data


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image).copy())


def index_of(folder: Path) -> dict[int, int]:
    lines = (folder / "train.idx").read_text().splitlines()
    return {int(key): int(offset) for key, offset in (line.split("\t") for line in lines)}


@pytest.fixture
def small_set(tmp_path) -> tuple[Path, list[tuple[int, bytes]]]:
    """Three classes (3, 1 and 2 images); image 2 carries the magic at an aligned record offset
    (a multi-part record), image 5 twice."""
    rng = np.random.default_rng(0)
    # The JPEG starts at record offset 24; its COM data at 30: "xx" puts the magic at 32.
    images = [
        (0, jpeg(rng)),
        (0, jpeg(rng, comment=b"xx" + MAGIC_BYTES + b"tail")),
        (0, jpeg(rng)),
        (1, jpeg(rng)),
        (2, jpeg(rng, comment=b"xx" + MAGIC_BYTES + b"abcd" + MAGIC_BYTES)),
        (2, jpeg(rng)),
    ]
    write_record_folder(tmp_path / "set", images, image_size=(24, 24))
    return tmp_path / "set", images


# --------------------------------------------------------------------------------------------------
# The format.


def test_frame_record_cuts_at_aligned_magic_only_and_reader_joins():
    """Parts end where the magic stands at an aligned offset (cflag 1, 2, 3), an unaligned magic
    stays inside a part, consecutive magics give empty parts, and padding reaches 4 bytes."""
    record = b"abcd" + MAGIC_BYTES + MAGIC_BYTES + b"e" + MAGIC_BYTES + b"fg" + MAGIC_BYTES + b"i"
    framed = frame_record(record)
    parts, position = [], 0
    while position < len(framed):
        magic, lrecord = struct.unpack_from("<II", framed, position)
        assert magic == MAGIC
        flag, length = lrecord >> 29, lrecord & (2**29 - 1)
        parts.append((flag, framed[position + 8 : position + 8 + length]))
        position += 8 + length + (-length % 4)
    assert parts == [(1, b"abcd"), (2, b""), (3, b"e" + MAGIC_BYTES + b"fg" + MAGIC_BYTES + b"i")]
    assert len(framed) % 4 == 0
    assert frame_record(b"plain") == MAGIC_BYTES + struct.pack("<I", 5) + b"plain\0\0\0"


def test_header_round_trip():
    header = RecordHeader(2, 0.0, 7, 0, (3.0, 9.0))
    assert unpack_header(pack_header(header, b"payload")) == (header, b"payload")
    plain = RecordHeader(0, 4.0, 12, 0)
    assert unpack_header(pack_header(plain, b"x")) == (plain, b"x")
    with pytest.raises(ValueError, match="shorter than"):
        unpack_header(b"short")


def test_reader_reads_raw_records_without_a_header_record(tmp_path):
    """Arbitrary records (magic at offsets 0 and 4, empty) read back byte for byte."""
    records = {1: MAGIC_BYTES + MAGIC_BYTES + b"xyz", 2: b"", 3: b"q" * 4 + MAGIC_BYTES}
    with open(tmp_path / "train.rec", "wb") as rec, open(tmp_path / "train.idx", "w") as idx:
        for key, record in records.items():
            idx.write(f"{key}\t{rec.tell()}\n")
            rec.write(frame_record(record))
    reader = RecordFile(tmp_path / "train.rec")
    assert reader.header is None and list(reader.image_keys) == [1, 2, 3]
    assert reader.num_classes is None
    for key, record in records.items():
        assert reader.read_record(key) == record


# --------------------------------------------------------------------------------------------------
# Sets written here.


def test_write_then_read(small_set):
    folder, images = small_set
    reader = RecordFile(folder)
    assert len(reader) == 6 and reader.num_classes == 3 and reader.property == (3, 24, 24)
    assert reader.header == RecordHeader(2, 0.0, 0, 0, (7.0, 10.0))
    assert [reader.read_header(key).labels for key in (7, 8, 9)] == [
        (1.0, 4.0),
        (4.0, 5.0),
        (5.0, 7.0),
    ]
    assert reader.labels().tolist() == [label for label, _ in images]
    for index, (label, data) in enumerate(images):
        assert reader.image_record(index) == (label, data)
        image, got = reader[index]
        assert got == label and image.mode == "RGB"
        assert np.array_equal(np.asarray(image), np.asarray(Image.open(io.BytesIO(data))))
    assert RecordFile(folder / "train.rec").labels().tolist() == reader.labels().tolist()
    offsets = index_of(folder)
    rec = (folder / "train.rec").read_bytes()
    flags = {key: struct.unpack_from("<I", rec, offsets[key] + 4)[0] >> 29 for key in offsets}
    assert [key for key, flag in flags.items() if flag] == [2, 5]
    with pytest.raises(IndexError):
        reader[6]


def test_writer_refuses_classes_out_of_order(tmp_path):
    with pytest.raises(ValueError, match="grouped by class"):
        write_record_folder(tmp_path, [(0, b"a"), (2, b"b")])
    with pytest.raises(ValueError, match="grouped by class"):
        write_record_folder(tmp_path, [(0, b"a"), (1, b"b"), (0, b"c")])


def test_pack_images_round_trip(tmp_path):
    """An image folder (PNG, grey, odd sizes, a JPEG already 32x32) -> .rec: labels in sorted
    folder order, faces 32x32 RGB close to the resized originals, the ready JPEG kept as is."""
    rng = np.random.default_rng(1)
    people = tmp_path / "people"
    ready = jpeg(rng, size=32)
    sources = {}
    for person, shapes in {
        "bob": [(40, 50), (32, 32)],
        "alice": [(32, 32)],
        "carl": [(64, 48)],
    }.items():
        (people / person).mkdir(parents=True)
        for number, (h, w) in enumerate(shapes):
            pixels = rng.integers(0, 256, (h, w), dtype=np.uint8)
            pixels = np.repeat(np.repeat(pixels[::8, ::8], 8, 0), 8, 1)[:h, :w]  # smooth blocks
            path = people / person / f"{person}_{number:04d}.png"
            Image.fromarray(pixels).save(path)
            sources[path] = pixels
    (people / "bob" / "bob_0002.jpg").write_bytes(ready)
    (people / "alice" / "notes.txt").write_text("not an image")
    assert pack_images(people, tmp_path / "set", size=32) == (5, 3)
    reader = RecordFile(tmp_path / "set")
    assert reader.labels().tolist() == [0, 1, 1, 1, 2]  # alice, bob x3, carl
    assert reader.property == (3, 32, 32)
    assert reader.image_record(3) == (1, ready)
    order = [people / "alice/alice_0000.png", people / "bob/bob_0000.png"]
    order += [people / "bob/bob_0001.png", None, people / "carl/carl_0000.png"]
    for index, path in enumerate(order):
        image, _ = reader[index]
        assert image.size == (32, 32) and image.mode == "RGB"
        if path is None:
            continue
        expected = Image.fromarray(sources[path]).convert("RGB").resize((32, 32), Image.BILINEAR)
        error = np.abs(np.asarray(image, float) - np.asarray(expected, float)).mean()
        assert error < 6.0, (path, error)


def test_dataloader_two_workers_same_as_in_process(small_set):
    folder, _ = small_set
    reader = RecordFile(folder, transform=to_tensor)
    reader[0]  # the parent opens its handle first: each worker must open its own
    batches = {}
    for workers in (0, 2):
        loader = DataLoader(reader, batch_size=4, num_workers=workers, shuffle=False)
        batches[workers] = [(images.clone(), labels.clone()) for images, labels in loader]
    assert len(batches[0]) == len(batches[2]) == 2
    for (a, la), (b, lb) in zip(batches[0], batches[2]):
        assert torch.equal(a, b) and torch.equal(la, lb)
    assert reader[5][1] == 2  # the parent's handle still works
    copy = pickle.loads(pickle.dumps(reader))  # as a spawned worker receives it: opens its own
    assert torch.equal(copy[4][0], reader[4][0]) and copy[4][1] == reader[4][1]
    with pytest.raises(DataError, match=r"train.idx: record 99 is missing$"):
        reader.read_record(99)


def test_fingerprint_covers_index_and_sizes_not_image_bytes(small_set, tmp_path):
    folder, images = small_set
    first = fingerprint(folder)
    assert first == RecordFile(folder).fingerprint() == fingerprint(folder / "train.rec")
    assert len(first) == 64
    rec = bytearray((folder / "train.rec").read_bytes())
    offset = index_of(folder)[1]
    rec[offset + 40] ^= 0xFF  # one image byte changed in place: same index, same sizes
    (folder / "train.rec").write_bytes(bytes(rec))
    assert fingerprint(folder) == first  # documented: image bytes are not hashed
    (folder / "train.rec").write_bytes(bytes(rec) + b"\0\0\0\0")
    assert fingerprint(folder) != first
    write_record_folder(tmp_path / "other", images[:5], image_size=(24, 24))
    assert fingerprint(tmp_path / "other") != first


# --------------------------------------------------------------------------------------------------
# Bad input: one DataError naming the file and the record key.


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and "struct" not in message.lower()
    return message


def test_truncated_rec(small_set):
    """Cut inside the last record (record 0, written last): the reader says so when it opens; cut
    inside an image record that the index still lists: when that record is read."""
    folder, _ = small_set
    rec = folder / "train.rec"
    data = rec.read_bytes()
    rec.write_bytes(data[:-4])
    with pytest.raises(DataError) as error:
        RecordFile(folder)
    message = one_line(error)
    assert str(rec) in message and "record 0" in message and "truncated" in message
    offset = index_of(folder)[4]
    rec.write_bytes(data[: offset + 20])
    (folder / "train.idx").write_text(f"4\t{offset}\n")
    reader = RecordFile(folder)
    for action in (lambda: reader[0], reader.labels, lambda: reader.read_record(4)):
        with pytest.raises(DataError) as error:
            action()
        message = one_line(error)
        assert str(rec) in message and "record 4" in message and "truncated" in message


def test_truncated_rec_index_past_the_end(small_set):
    folder, _ = small_set
    rec = folder / "train.rec"
    offsets = index_of(folder)
    rec.write_bytes(rec.read_bytes()[: offsets[5]])
    with pytest.raises(DataError) as error:
        RecordFile(folder)
    message = one_line(error)
    assert str(folder / "train.idx") in message and "past the end" in message
    assert "record 0: offset" in message and "with 5 more of the 10 records" in message


def test_truncated_multi_part_record(small_set):
    """A record whose first part (cflag 1) is the last thing in the file: an error, no hang."""
    folder, _ = small_set
    rec = folder / "train.rec"
    offsets = index_of(folder)
    data = rec.read_bytes()
    first_part = 8 + (struct.unpack_from("<I", data, offsets[2] + 4)[0] & (2**29 - 1))
    rec.write_bytes(data[: offsets[2] + first_part] + bytes(8 + 64))  # zeros: no magic after
    (folder / "train.idx").write_text(f"2\t{offsets[2]}\n")
    with pytest.raises(DataError) as error:
        RecordFile(folder).read_record(2)
    assert "record 2" in one_line(error) and "wrong magic" in str(error.value)


def test_wrong_magic(small_set):
    folder, _ = small_set
    rec = folder / "train.rec"
    offset = index_of(folder)[3]
    data = bytearray(rec.read_bytes())
    data[offset : offset + 4] = b"JUNK"
    rec.write_bytes(bytes(data))
    reader = RecordFile(folder)
    for action in (lambda: reader[2], reader.labels):
        with pytest.raises(DataError) as error:
            action()
        message = one_line(error)
        assert str(rec) in message and "record 3" in message and "wrong magic" in message


def test_label_out_of_range(small_set):
    folder, _ = small_set
    rec = folder / "train.rec"
    offset = index_of(folder)[4]
    for label in (3.0, -1.0, 1.5, float("nan")):
        data = bytearray(rec.read_bytes())
        struct.pack_into("<f", data, offset + 8 + 4, label)  # IRHeader.label
        rec.write_bytes(bytes(data))
        reader = RecordFile(folder)
        for action in (lambda reader=reader: reader[3], reader.labels):
            with pytest.raises(DataError) as error:
                action()
            message = one_line(error)
            assert "record 4" in message and "is not a class in [0, 3)" in message


def test_bad_index_and_property(small_set):
    folder, _ = small_set
    idx = folder / "train.idx"
    good = idx.read_text()
    idx.write_text(good.replace("3\t", "3 x ", 1))
    with pytest.raises(DataError) as error:
        RecordFile(folder)
    assert "line 3" in one_line(error) and str(idx) in str(error.value)
    idx.write_text(good + "3\t0\n")
    with pytest.raises(DataError, match="record 3 is listed twice"):
        RecordFile(folder)
    idx.write_text("\n".join(line for line in good.splitlines() if not line.startswith("5\t")))
    with pytest.raises(DataError, match="record 5 is missing"):
        RecordFile(folder)
    idx.write_text(good)
    (folder / "property").write_text("4,24,24\n")
    with pytest.raises(DataError, match="4 classes, but the header"):
        RecordFile(folder)
    with pytest.raises(DataError, match="no such RecordIO file"):
        RecordFile(folder / "missing")


def test_undecodable_image(tmp_path):
    write_record_folder(tmp_path, [(0, b"not a jpeg")])
    with pytest.raises(DataError) as error:
        RecordFile(tmp_path)[0]
    assert "record 1: cannot decode the image" in one_line(error)


# --------------------------------------------------------------------------------------------------
# The MXNet-written fixture.


@pytest.fixture(scope="module")
def expected() -> dict:
    return json.loads((FIXTURE / "expected.json").read_text())


@needs_fixture
def test_fixture_matches_expected(expected):
    reader = RecordFile(FIXTURE)
    assert len(reader) == expected["images"] and reader.num_classes == expected["identities"]
    header = expected["header_record_0"]
    assert (reader.header.flag, list(reader.header.labels)) == (header["flag"], header["label"])
    identity = expected["first_identity_record"]
    first = reader.read_header(identity["key"])
    assert (first.flag, list(first.labels)) == (identity["flag"], identity["label"])
    assert reader.identity_keys[0] == identity["key"]
    for record in expected["records"]:
        index = int(np.flatnonzero(reader.image_keys == record["key"])[0])
        label, payload = reader.image_record(index)
        assert (label, len(payload)) == (record["label"], record["jpeg_bytes"])
        image, label = reader[index]
        assert label == record["label"] and image.mode == "RGB"
        assert int(np.asarray(image, dtype=np.int64).sum()) == record["pixel_sum_pil"]


@needs_fixture
def test_fixture_multi_part_records(expected):
    """The records MXNet cut into parts are exactly the expected keys, and decode whole."""
    rec = (FIXTURE / "train.rec").read_bytes()
    assert rec.count(MAGIC_BYTES) == expected["magic_words_in_rec"]
    offsets = index_of(FIXTURE)
    multi = sorted(k for k, o in offsets.items() if struct.unpack_from("<I", rec, o + 4)[0] >> 29)
    assert multi == expected["multi_part_record_keys"]
    reader = RecordFile(FIXTURE)
    for key in multi:
        payload = reader.image_record(key - 1)[1]
        assert MAGIC_BYTES in payload and payload.startswith(b"\xff\xd8")
        assert payload.endswith(b"\xff\xd9")
        Image.open(io.BytesIO(payload)).load()


@needs_fixture
def test_fixture_labels_from_headers_agree_with_identity_records():
    reader = RecordFile(FIXTURE)
    labels = reader.labels()
    assert labels.tolist() == [reader.image_record(i)[0] for i in range(len(reader))]
    for label, key in enumerate(reader.identity_keys):
        begin, end = (int(x) for x in reader.read_header(int(key)).labels)
        assert np.all(labels[begin - 1 : end - 1] == label)
        assert end - begin == np.sum(labels == label)


@needs_fixture
def test_repacking_the_fixture_gives_mxnets_bytes(tmp_path):
    """Our writer on the fixture's images: every record's payload equals MXNet's, and so do the
    whole .rec, .idx and property files; so does `pack_images` on them written out as files."""
    reader = RecordFile(FIXTURE)
    images = [reader.image_record(i) for i in range(len(reader))]
    write_record_folder(tmp_path / "ours", images)
    ours = RecordFile(tmp_path / "ours")
    for key in range(int(reader.identity_keys[-1]) + 1):
        assert ours.read_record(key) == reader.read_record(key), key
    for name in ("train.rec", "train.idx", "property"):
        assert (tmp_path / "ours" / name).read_bytes() == (FIXTURE / name).read_bytes(), name
    folder = tmp_path / "faces"
    for index, (label, data) in enumerate(images):
        (folder / f"{label:03d}").mkdir(parents=True, exist_ok=True)
        (folder / f"{label:03d}" / f"{index:05d}.jpg").write_bytes(data)
    pack_images(folder, tmp_path / "packed", size=112)
    for name in ("train.rec", "train.idx", "property"):
        assert (tmp_path / "packed" / name).read_bytes() == (FIXTURE / name).read_bytes(), name


@needs_fixture
def test_fixture_dataloader_two_workers_same_as_in_process():
    reader = RecordFile(FIXTURE, transform=to_tensor)
    subset = torch.utils.data.Subset(reader, list(range(40, 60)) + [649])
    results = []
    for workers in (0, 2):
        loader = DataLoader(subset, batch_size=7, num_workers=workers)
        results.append([(x.clone(), y.clone()) for x, y in loader])
    for (a, la), (b, lb) in zip(*results):
        assert torch.equal(a, b) and torch.equal(la, lb)


def test_image_records_with_label_arrays(tmp_path, small_set):
    """Some sets store each image's label as a one-element array (flag 1): the first label counts,
    in `[i]` and in `labels()` alike."""
    _, images = small_set
    records = {0: pack_header(RecordHeader(2, 0.0, 0, 0, (4.0, 6.0)), b"")}
    for key, (label, data) in enumerate(images[:3], 1):
        records[key] = pack_header(RecordHeader(1, 0.0, key, 0, (float(label + key % 2),)), data)
    records[4] = pack_header(RecordHeader(2, 0.0, 4, 0, (1.0, 2.0)), b"")
    records[5] = pack_header(RecordHeader(2, 0.0, 5, 0, (2.0, 4.0)), b"")
    with open(tmp_path / "train.rec", "wb") as rec, open(tmp_path / "train.idx", "w") as idx:
        for key, record in records.items():
            idx.write(f"{key}\t{rec.tell()}\n")
            rec.write(frame_record(record))
    reader = RecordFile(tmp_path)
    assert reader.num_classes == 2 and len(reader) == 3
    assert reader.labels().tolist() == [1, 0, 1] == [reader[i][1] for i in range(3)]
