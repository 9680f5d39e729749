"""``data.source: insightface_rec`` (issue 25 part 1): prepare splits a RecordIO set by identity
from its record headers alone (no image decoded or hashed), the manifest's rows resolve to records
read by offset, and the trainer, the inference and the prepare stage run on it. A set written here
by :func:`angular.data.recordio.write_record_folder` covers everything; the MXNet-written fixture
(../shared/data/insightface, skipped when absent) the real format."""

from __future__ import annotations

import io
import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pipeline_testing import make_image_folder, tiny_raw
from reliability_testing import run_stage_process, write_params
from torch.utils.data import DataLoader

from angular.config import parse_params
from angular.data import (
    SPLITS,
    DataError,
    ImageDataset,
    RecordFile,
    load_image,
    prepare_dataset,
    read_manifest,
    write_record_folder,
)
from angular.data.recordio import (
    PackedImage,
    PackedImages,
    RecordHeader,
    frame_record,
    pack_header,
    unpack_header,
)
from angular.eval.pairs import PairsError, pair_names
from angular.nn.recognition import load_model
from angular.serve.inference import run_model
from angular.train.loop import TrainPaths, train_item
from pipeline import EXIT_FAILURE

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "../shared/data/insightface"
needs_fixture = pytest.mark.skipif(
    not (FIXTURE / "train.rec").is_file(), reason=f"the MXNet-written fixture is not at {FIXTURE}"
)
COUNTS = [7, 3, 9, 5, 6, 4]  # images per identity of the synthetic set


def rec_config(path, **data):
    """The tiny params on a RecordIO set (RGB, 32x32 as the trainer tests use)."""
    raw = tiny_raw(data__source="insightface_rec", data__path=str(path))
    settings = dict(image_size=[32, 32], channels=3, mean=0.5, std=0.5, unknown_identities=1)
    raw["data"].update(settings | data)
    raw["train"]["preload_images"] = False  # refused with a RecordIO set
    return raw


def random_jpeg(rng: np.random.Generator, size: int = 20) -> bytes:
    buffer = io.BytesIO()
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture
def synthetic(tmp_path) -> Path:
    """A RecordIO set of six identities (COUNTS images each, random 20x20 JPEGs)."""
    rng = np.random.default_rng(7)
    images = [(label, random_jpeg(rng)) for label, n in enumerate(COUNTS) for _ in range(n)]
    write_record_folder(tmp_path / "set", images, image_size=(20, 20))
    return tmp_path / "set"


def no_decoding(monkeypatch):
    """Make every image decode and every md5 fail: prepare must do neither."""

    def refuse(*args, **kwargs):
        raise AssertionError("prepare decoded or hashed an image")

    monkeypatch.setattr(Image, "open", refuse)
    monkeypatch.setattr(RecordFile, "decode", refuse)
    monkeypatch.setattr("angular.data.manifest.hashlib.md5", refuse)


def check_identity_splits(manifest, labels_in_set: np.ndarray) -> None:
    """Every image once; an identity's images all unknown or all in train/val/test, with at least
    one in train; labels follow the known identities; identities are the set's labels."""
    indices = sorted(int(r.path) for r in manifest.records)
    assert indices == list(range(len(labels_in_set)))
    assert sum(manifest.info["counts"].values()) == len(labels_in_set)
    by_identity: dict[str, set] = {}
    for record in manifest.records:
        assert record.identity == str(labels_in_set[int(record.path)])
        by_identity.setdefault(record.identity, set()).add(record.split)
        if record.split == "unknown":
            assert record.label == -1 and record.identity in manifest.unknown
        else:
            assert manifest.classes[record.label] == record.identity
    for identity, splits in by_identity.items():
        assert splits == {"unknown"} if identity in manifest.unknown else "train" in splits
        assert "unknown" not in splits or splits == {"unknown"}


# --------------------------------------------------------------------------------------------------
# prepare


def test_prepare_splits_a_record_set_by_identity_without_decoding(synthetic, tmp_path, monkeypatch):
    labels = RecordFile(synthetic).labels()
    no_decoding(monkeypatch)
    config = parse_params(rec_config(synthetic)).data
    manifest = prepare_dataset(config, tmp_path / "prepared")
    check_identity_splits(manifest, labels)
    assert len(manifest.classes) == 5 and len(manifest.unknown) == 1
    assert all(r.md5 == "" for r in manifest.records)
    again = read_manifest(tmp_path / "prepared")
    assert again.records == manifest.records and again.classes == manifest.classes
    recordio = again.info["recordio"]
    assert recordio["images"] == sum(COUNTS) and recordio["num_classes"] == len(COUNTS)


def test_the_split_is_the_image_folders_split_of_the_same_images(synthetic, tmp_path):
    """One split for both sources: the folder of the same identities and counts (named 0..5,
    files in record order) gets the same unknowns and, image for image, the same splits."""
    make_image_folder(tmp_path / "folder", {str(i): n for i, n in enumerate(COUNTS)})
    folder_raw = rec_config(synthetic)
    folder_raw["data"].update(source="imagefolder", path=str(tmp_path / "folder"))
    folder = prepare_dataset(parse_params(folder_raw).data, tmp_path / "from_folder")
    records = prepare_dataset(parse_params(rec_config(synthetic)).data, tmp_path / "from_rec")
    assert folder.classes == records.classes and folder.unknown == records.unknown
    first_index = np.cumsum([0, *COUNTS])
    from_folder = sorted(
        (first_index[int(r.identity)] + int(Path(r.path).stem), r.split, r.label)
        for r in folder.records
    )
    from_rec = sorted((int(r.path), r.split, r.label) for r in records.records)
    assert from_folder == from_rec


def test_val_fraction_zero_gives_an_empty_val_split(synthetic, tmp_path):
    config = parse_params(rec_config(synthetic, val_fraction=0.0)).data
    manifest = prepare_dataset(config, tmp_path / "prepared")
    assert manifest.info["counts"]["val"] == 0 and len(manifest.paths("val")) == 0
    assert manifest.info["counts"]["test"] > 0


def test_the_cap_and_the_minimum_apply_to_records(synthetic, tmp_path):
    capped = prepare_dataset(
        parse_params(rec_config(synthetic, max_images_per_class=4)).data, tmp_path / "a"
    )
    per_identity = {n: sum(r.identity == n for r in capped.records) for n in map(str, range(6))}
    assert per_identity == {str(i): min(n, 4) for i, n in enumerate(COUNTS)}
    assert capped.info["capped"] == {str(i): n for i, n in enumerate(COUNTS) if n > 4}

    with pytest.raises(DataError) as caught:
        prepare_dataset(parse_params(rec_config(synthetic, min_images_per_class=5)).data, "x")
    message = str(caught.value)
    assert "\n" not in message and message.startswith("data.path: 2 identities of ")
    assert "identity 1 has 3; identity 5 has 4" in message and "skip_bad_images" in message

    skipped = prepare_dataset(
        parse_params(rec_config(synthetic, min_images_per_class=5, skip_bad_images=True)).data,
        tmp_path / "b",
    )
    assert {r.identity for r in skipped.records} == {"0", "2", "3", "4"}
    assert [s["path"].rsplit(", ", 1)[1] for s in skipped.info["skipped"]] == [
        "identity 1",
        "identity 5",
    ]


def test_unknown_identities_by_name_are_labels(synthetic, tmp_path):
    config = parse_params(rec_config(synthetic, unknown_identities=["4", "0"])).data
    manifest = prepare_dataset(config, tmp_path / "prepared")
    assert manifest.unknown == ("0", "4") and manifest.classes == ("1", "2", "3", "5")
    with pytest.raises(DataError, match=r"^data.unknown_identities: \['9'\] are not identities"):
        prepare_dataset(parse_params(rec_config(synthetic, unknown_identities=["9"])).data, "y")


def test_the_fingerprint_follows_the_index_not_the_clock(synthetic, tmp_path):
    """A changed .idx changes the fingerprint (and a manifest refuses the changed set); copying
    the files, touching them or preparing again does not."""
    config = parse_params(rec_config(synthetic)).data
    first = prepare_dataset(config, tmp_path / "p1").info["recordio"]["fingerprint"]
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("train.rec", "train.idx", "property"):
        (copy / name).write_bytes((synthetic / name).read_bytes())
    assert RecordFile(copy).fingerprint() == first
    (synthetic / "train.idx").touch()
    second = prepare_dataset(config, tmp_path / "p2")
    assert second.info["recordio"]["fingerprint"] == first
    assert second.records == read_manifest(tmp_path / "p1").records

    # The same keys and offsets, the lines in another order: still the same index, another file.
    lines = (synthetic / "train.idx").read_text().splitlines()
    (synthetic / "train.idx").write_text("\n".join(lines[::-1]) + "\n")
    reordered = RecordFile(synthetic).fingerprint()
    assert reordered != first
    with pytest.raises(DataError, match=r"train.rec: its index.*changed since prepare.*rerun"):
        read_manifest(tmp_path / "p1").paths("train")
    assert prepare_dataset(config, tmp_path / "p3").info["recordio"]["fingerprint"] == reordered

    # What it does not read: an image rewritten in place with the same length is not seen; a
    # .rec of another size or another property file is.
    rec = synthetic / "train.rec"
    data = bytearray(rec.read_bytes())
    data[index_of(synthetic)[1] + 40] ^= 0xFF
    rec.write_bytes(bytes(data))
    assert RecordFile(synthetic).fingerprint() == reordered
    rec.write_bytes(bytes(data) + bytes(4))
    assert RecordFile(synthetic).fingerprint() not in (first, reordered)
    rec.write_bytes(bytes(data))
    (synthetic / "property").write_text("6,21,21\n")
    assert RecordFile(synthetic).fingerprint() not in (first, reordered)


def test_bad_record_files_are_one_line_naming_file_and_record(synthetic, tmp_path):
    config = parse_params(rec_config(synthetic)).data
    rec = synthetic / "train.rec"
    data = rec.read_bytes()
    offsets = index_of(synthetic)

    rec.write_bytes(data[: len(data) // 2])  # truncated: offsets past the end
    with pytest.raises(DataError) as caught:
        prepare_dataset(config, tmp_path / "a")
    assert "\n" not in str(caught.value)
    assert "train.idx: record" in str(caught.value) and "past the end" in str(caught.value)

    broken = bytearray(data)  # the third image record's magic overwritten
    broken[offsets[3] : offsets[3] + 4] = b"\x00\x01\x02\x03"
    rec.write_bytes(bytes(broken))
    with pytest.raises(DataError, match=rf"^{rec}: record 3: wrong magic 0x03020100") as caught:
        prepare_dataset(config, tmp_path / "b")
    assert "\n" not in str(caught.value)

    rng = np.random.default_rng(1)  # a label beyond the header's 2 identities
    write_record_folder(tmp_path / "bad", [(0, random_jpeg(rng)), (1, random_jpeg(rng))])
    (tmp_path / "bad" / "property").write_text("1,112,112\n")
    with pytest.raises(DataError, match="property: 1 classes, but the header"):
        prepare_dataset(parse_params(rec_config(tmp_path / "bad")).data, tmp_path / "c")


def index_of(folder: Path) -> dict[int, int]:
    lines = (folder / "train.idx").read_text().splitlines()
    return {int(key): int(offset) for key, offset in (line.split("\t") for line in lines)}


def test_a_missing_set_or_index_is_one_line(synthetic, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=rf"^data.path: {missing} does not exist \(an insightface"):
        prepare_dataset(parse_params(rec_config(missing)).data, tmp_path / "a")
    (synthetic / "train.idx").unlink()
    with pytest.raises(
        DataError, match=rf"^{synthetic / 'train.idx'}: the index of .* is missing$"
    ):
        prepare_dataset(parse_params(rec_config(synthetic)).data, tmp_path / "b")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=rf"^{empty / 'train.rec'}: no such RecordIO file"):
        prepare_dataset(parse_params(rec_config(empty)).data, tmp_path / "c")


@pytest.mark.parametrize("bad", [7.0, 1.5, -1.0, float("nan")])
def test_a_label_out_of_range_names_the_record(tmp_path, bad):
    """A record whose label is not one of the header's identities: prepare names it."""
    rng = np.random.default_rng(2)
    folder = tmp_path / "set"
    images = [(0, random_jpeg(rng)), (0, random_jpeg(rng)), (1, random_jpeg(rng))]
    write_record_folder(folder, images)
    # Record 2 rewritten in place with label 7 (the same length: every offset stays right).
    header, payload = unpack_header(RecordFile(folder).read_record(2))
    record = frame_record(pack_header(RecordHeader(0, bad, 2, 0), payload))
    data = bytearray((folder / "train.rec").read_bytes())
    start = index_of(folder)[2]
    data[start : start + len(record)] = record
    (folder / "train.rec").write_bytes(bytes(data))
    raw = rec_config(folder, unknown_identities=0, val_fraction=0.0, test_fraction=0.3)
    rec = folder / "train.rec"
    with pytest.raises(
        DataError, match=rf"^{rec}: record 2: label {bad} is not a class in \[0, 2\)$"
    ):
        prepare_dataset(parse_params(raw).data, tmp_path / "p")


def test_the_prepare_stage_reports_a_bad_set_in_one_line(synthetic, tmp_path):
    rec = synthetic / "train.rec"
    rec.write_bytes(rec.read_bytes()[:-100])
    project = tmp_path / "project"
    project.mkdir()
    write_params(project, rec_config(synthetic))
    result = run_stage_process(project, "prepare")
    assert result.returncode == EXIT_FAILURE, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "train.idx: record" in lines[0] and "past the end" in lines[0]
    assert not (project / "data" / "prepared" / "manifest.csv").exists()


# --------------------------------------------------------------------------------------------------
# Reading the records: datasets, workers, inference


def test_a_splits_records_are_one_index_array(synthetic, tmp_path):
    """Manifest.paths of a record set: PackedImages in manifest order, sliced and concatenated
    as lists of paths are (the evaluation stages concatenate test and unknown)."""
    manifest = prepare_dataset(parse_params(rec_config(synthetic)).data, tmp_path / "prepared")
    test, unknown = manifest.paths("test"), manifest.paths("unknown")
    assert isinstance(test, PackedImages) and test.indices.dtype == np.int64
    assert test.indices.tolist() == [int(r.path) for r in manifest.split("test")]
    assert [image.index for image in test] == test.indices.tolist()
    assert [manifest.resolve(r).index for r in manifest.split("test")] == test.indices.tolist()
    both = test + unknown
    assert isinstance(both, PackedImages) and both.file is test.file
    assert both.indices.tolist() == test.indices.tolist() + unknown.indices.tolist()
    assert (
        isinstance(test[1:3], PackedImages)
        and test[1:3].indices.tolist() == test.indices.tolist()[1:3]
    )
    assert isinstance(test[-1], PackedImage) and test[-1].index == test.indices[-1]
    mixed = [tmp_path / "a.png"] + test
    assert mixed[0] == tmp_path / "a.png" and [i.index for i in mixed[1:]] == test.indices.tolist()
    with pytest.raises(IndexError):
        test[len(test)]


def test_records_load_as_their_images_do(synthetic, tmp_path):
    """load_image of a manifest's record is the image decoded and resized as a file's would be."""
    manifest = prepare_dataset(parse_params(rec_config(synthetic)).data, tmp_path / "prepared")
    records = RecordFile(synthetic)
    for record in manifest.records[:6]:
        image = manifest.resolve(record)
        assert isinstance(image, PackedImage) and image.index == int(record.path)
        label, payload = records.image_record(image.index)
        assert str(label) == record.identity
        file = tmp_path / f"{image.index}.jpg"
        file.write_bytes(payload)
        for channels, size in ((3, (32, 32)), (1, (11, 7))):
            expected = load_image(file, image_size=size, channels=channels)
            got = load_image(image, image_size=size, channels=channels)
            assert got.dtype == torch.uint8 and torch.equal(got, expected)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_an_image_dataset_of_records_reads_in_workers(synthetic, tmp_path, num_workers):
    manifest = prepare_dataset(parse_params(rec_config(synthetic)).data, tmp_path / "prepared")
    common = dict(image_size=(16, 16), channels=3, mean=(0.5,) * 3, std=(0.25,) * 3)
    expected = ImageDataset(
        manifest.paths("train"), manifest.labels("train"), preload=True, **common
    )
    lazy = ImageDataset(manifest.paths("train"), manifest.labels("train"), preload=False, **common)
    # One array of indices into one reader, not an object per image (forked workers share it).
    assert isinstance(lazy.paths, PackedImages) and lazy.paths.indices.dtype == np.int64
    assert [p.index for p in lazy.paths] == [p.index for p in manifest.paths("train")]
    restored = pickle.loads(pickle.dumps(lazy))  # as a spawned worker receives it
    assert restored.paths[0].file is restored.paths[-1].file  # one reader for the set
    assert restored.paths[0].file._handle is None  # the parent's handle stays with the parent
    loader = DataLoader(lazy, batch_size=5, num_workers=num_workers)
    images = torch.cat([batch for batch, _ in loader])
    labels = torch.cat([batch for _, batch in loader])
    assert torch.equal(images, torch.stack([expected[i][0] for i in range(len(expected))]))
    assert torch.equal(labels, torch.as_tensor(manifest.labels("train")))


def test_a_bad_record_during_training_is_one_line(synthetic, tmp_path):
    manifest = prepare_dataset(parse_params(rec_config(synthetic)).data, tmp_path / "prepared")
    image = manifest.paths("train")[0]
    key = int(image.file.image_keys[image.index])
    offset = index_of(synthetic)[key]
    rec = synthetic / "train.rec"
    data = bytearray(rec.read_bytes())
    data[offset + 8 + 24 : offset + 8 + 40] = bytes(16)  # the JPEG's first bytes: no image
    rec.write_bytes(bytes(data))
    fresh = read_manifest(tmp_path / "prepared").paths("train")[0]
    with pytest.raises(
        DataError, match=rf"^{rec}: record {key}: cannot decode the image"
    ) as caught:
        load_image(fresh, image_size=(8, 8), channels=3)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_bad_record_stops_training_with_one_line(synthetic, tmp_path, num_workers):
    """Records damaged after prepare: training stops with the reader's line, naming the file and
    the record (from a worker: its line, not the worker's traceback)."""
    raw = rec_config(synthetic)
    raw["train"].update(epochs=1, batch_size=8, num_workers=num_workers, preload_images=False)
    prepare_dataset(parse_params(raw).data, tmp_path / "prepared")
    rec, offsets = synthetic / "train.rec", index_of(synthetic)
    data = bytearray(rec.read_bytes())
    for key in range(1, sum(COUNTS) + 1):  # every image's first JPEG bytes
        data[offsets[key] + 32 : offsets[key] + 48] = bytes(16)
    rec.write_bytes(bytes(data))
    with pytest.raises(DataError) as caught:
        train_on(read_manifest(tmp_path / "prepared"), tmp_path, raw)
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message
    pattern = rf"^{rec}: record \d+: cannot decode the image \(not an image PIL reads\)"
    if num_workers:
        pattern += r" \(in DataLoader worker \d+\)"
    assert re.match(pattern + "$", message), message


def train_on(manifest, tmp_path, raw, item="arcface"):
    paths = TrainPaths(*(tmp_path / "run" / name for name in ("m.pt", "ck", "m.json", "l", "a")))
    metrics = train_item(parse_params(raw), item, manifest, paths)
    return metrics, paths


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_short_training_on_the_synthetic_records(synthetic, tmp_path, num_workers):
    raw = rec_config(synthetic)
    raw["train"].update(epochs=1, batch_size=8, num_workers=num_workers, preload_images=False)
    manifest = prepare_dataset(parse_params(raw).data, tmp_path / "prepared")
    metrics, paths = train_on(read_manifest(tmp_path / "prepared"), tmp_path, raw)
    assert metrics["epoch"] == 1 and np.isfinite(metrics["train_loss"])
    loaded = load_model(paths.model)
    outputs = run_model(
        loaded, manifest.paths("test"), manifest.labels("test"), manifest.identities("test")
    )
    assert outputs.embeddings.shape == (manifest.info["counts"]["test"], 16)
    assert np.isfinite(outputs.embeddings).all()


# --------------------------------------------------------------------------------------------------
# The MXNet-written fixture


@needs_fixture
def test_prepare_on_the_fixture(tmp_path, monkeypatch):
    labels = RecordFile(FIXTURE).labels()
    no_decoding(monkeypatch)
    config = parse_params(rec_config(FIXTURE, unknown_identities=8)).data
    manifest = prepare_dataset(config, tmp_path / "prepared")
    check_identity_splits(manifest, labels)
    assert len(manifest.classes) + len(manifest.unknown) == 96 == len(set(labels.tolist()))
    assert len(manifest.unknown) == 8
    counts = manifest.info["counts"]
    assert sum(counts.values()) == 1299 == len(manifest.records)
    assert all(counts[split] > 0 for split in SPLITS)


@needs_fixture
@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_short_training_on_the_fixture(tmp_path, num_workers):
    """small_cnn at 32x32 for one epoch through the trainer on MXNet's records, with no
    validation split; then inference on the unknown people's records."""
    raw = rec_config(FIXTURE, unknown_identities=8, val_fraction=0.0, max_images_per_class=4)
    raw["train"].update(epochs=1, batch_size=32, num_workers=num_workers, preload_images=False)
    manifest = prepare_dataset(parse_params(raw).data, tmp_path / "prepared")
    assert manifest.info["counts"]["val"] == 0
    metrics, paths = train_on(read_manifest(tmp_path / "prepared"), tmp_path, raw)
    assert metrics["epoch"] == 1 and np.isfinite(metrics["train_loss"])
    # No validation split: no validation numbers, rather than zeros.
    assert np.isnan(metrics["val_loss"]) and np.isnan(metrics["val_accuracy"])
    outputs = run_model(
        load_model(paths.model),
        manifest.paths("unknown"),
        manifest.labels("unknown"),
        manifest.identities("unknown"),
    )
    assert outputs.embeddings.shape == (len(manifest.split("unknown")), 16)
    assert np.isfinite(outputs.embeddings).all()


def test_the_prepare_stage_on_a_record_set(synthetic, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    write_params(project, rec_config(synthetic, val_fraction=0.0))
    result = run_stage_process(project, "prepare")
    assert result.returncode == 0, result.stderr
    fingerprint = RecordFile(synthetic).fingerprint()
    assert f"{sum(COUNTS)} images, fingerprint {fingerprint[:16]}" in result.stderr
    metrics = json.loads((project / "metrics" / "prepare.json").read_text())
    assert metrics["images"]["val"] == 0 and sum(metrics["images"].values()) == sum(COUNTS)
    manifest = read_manifest(project / "data" / "prepared")
    assert manifest.info["recordio"]["fingerprint"] == fingerprint
    assert Path(manifest.info["recordio"]["rec"]).is_absolute()  # data.path was absolute
    # The stages that choose on the validation split refuse an empty one in one line.
    for stage in ("calibrate arcface", "evaluate"):
        refused = run_stage_process(project, *stage.split())
        assert refused.returncode == 2, refused.stderr
        assert refused.stderr.startswith("error in params.yaml: data.val_fraction: is 0: the ")
        assert refused.stderr.count("\n") == 1, refused.stderr


def test_a_damaged_manifest_row_is_one_line(synthetic, tmp_path):
    prepare_dataset(parse_params(rec_config(synthetic)).data, tmp_path / "prepared")
    path = tmp_path / "prepared" / "manifest.csv"
    lines = path.read_text().splitlines()
    lines[3] = lines[3].rsplit(",", 1)[0]  # a row without its last field
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"^{path}, line 4: not a manifest row .*rerun prepare$"):
        read_manifest(tmp_path / "prepared")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3\t96\n1\t0\n2\t48\n", [(1, 0), (2, 48), (3, 96)]),  # as MXNet writes it, any order
        ("1\t0\n2\t48\n3\t96", [(1, 0), (2, 48), (3, 96)]),  # no final newline
        ("1\t0\n\n2\t48\n", [(1, 0), (2, 48)]),  # a blank line (read line by line)
        ("1 0\n2  48\r\n", [(1, 0), (2, 48)]),  # spaces and CRLF (read line by line)
        ("1\t0\t5\n2\n", "line 1: b'1\\t0\\t5' is not 'key<TAB>offset'"),  # fields cross lines
        ("1\t0\n2\t\n", "line 2: b'2\\t' is not 'key<TAB>offset'"),
        ("1\t0\n2\t-48\n", "line 2: b'2\\t-48' is not 'key<TAB>offset'"),
        ("1\t0\n2\t4.5\n", "line 2: b'2\\t4.5' is not 'key<TAB>offset'"),
        ("1\t0\n99999999999999999999\t4\n", "not a RecordIO index"),
        ("", "the index is empty"),
    ],
)
def test_the_index_is_read_in_one_pass_or_line_by_line_alike(tmp_path, text, expected):
    """MXNet's layout is parsed by numpy in one pass; anything else line by line, which names
    a bad line; both give the same keys and offsets."""
    from angular.data.recordio import read_index

    idx = tmp_path / "train.idx"
    idx.write_bytes(text.encode())
    if isinstance(expected, str):
        with pytest.raises(DataError) as caught:
            read_index(idx, rec_size=1000)
        assert str(caught.value) == f"{idx}: {expected}"
    else:
        keys, offsets = read_index(idx, rec_size=1000)
        assert list(zip(keys.tolist(), offsets.tolist())) == expected
        assert keys.dtype == offsets.dtype == np.int64


def test_every_stage_runs_on_a_record_set(synthetic, tmp_path):
    """prepare, train, calibrate and evaluate as DVC runs them, on records read in 2 workers:
    each stage that reads the manifest's images (training, calibration on val, evaluation on
    test and unknown) reads them from the .rec."""
    project = tmp_path / "project"
    project.mkdir()
    raw = rec_config(synthetic, unknown_identities=2, val_fraction=0.25, test_fraction=0.25)
    raw["train"].update(epochs=1, batch_size=8, num_workers=2, preload_images=False)
    raw["train"]["items"] = ["arcface"]
    write_params(project, raw)
    for stage, args in (("prepare", []), ("train", ["arcface"]), ("calibrate", ["arcface"])):
        result = run_stage_process(project, stage, *args)
        assert result.returncode == 0, result.stderr
    result = run_stage_process(project, "evaluate")
    assert result.returncode == 0, result.stderr
    manifest = read_manifest(project / "data" / "prepared")
    outputs = np.load(project / "outputs" / "evaluate" / "arcface.npz")
    assert outputs["test_embeddings"].shape[0] == len(manifest.split("test"))
    assert outputs["unknown_embeddings"].shape[0] == len(manifest.split("unknown"))
    assert (project / "metrics" / "evaluate.json").is_file()


def test_a_relative_path_stays_relative_to_the_prepared_folder(synthetic, tmp_path, monkeypatch):
    """data.path relative to the project: the manifest names the .rec relative to itself, so the
    project folder can move."""
    monkeypatch.chdir(tmp_path)
    config = parse_params(rec_config(Path("set"), val_fraction=0.0)).data
    prepare_dataset(config, Path("data") / "prepared")
    assert read_manifest("data/prepared").info["recordio"]["rec"] == "../../set/train.rec"
    moved = tmp_path.parent / f"{tmp_path.name}-moved"
    tmp_path.rename(moved)
    try:
        manifest = read_manifest(moved / "data" / "prepared")
        image = manifest.paths("train")[0]
        assert image.file.rec_path == moved / "data" / "prepared" / "../../set/train.rec"
        assert load_image(image, image_size=(8, 8), channels=3).shape == (3, 8, 8)
    finally:
        moved.rename(tmp_path)


def test_a_pairs_file_cannot_name_a_record_sets_images(synthetic, tmp_path):
    """A pairs file names images by file; a RecordIO set's have no names: one line saying what
    to use instead, not a TypeError."""
    manifest = prepare_dataset(parse_params(rec_config(synthetic)).data, tmp_path / "prepared")
    with pytest.raises(
        PairsError, match=r"^evaluate\.verification\.pairs_file: names images .*bins\)$"
    ):
        pair_names(manifest.paths("test"), manifest.identities("test"))
