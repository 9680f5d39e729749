"""insightface's verification .bin files (angular.data.verification_bin): loaded with an unpickler
that refuses every global, written as the published Python 2 files are (byte for byte against the
MXNet-era fixture in ../shared/data/insightface, skipped when absent), packed from a pairs file."""

from __future__ import annotations

import io
import json
import os
import pickle
import pickletools
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from angular.data import DataError, RecordFile, load_bin, read_bin, write_bin
from angular.data.verification_bin import pack_pairs, read_pairs

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "../shared/data/insightface"
LFW_DEV = REPO / "../shared/data/lfw-dev"
needs_fixture = pytest.mark.skipif(
    not (FIXTURE / "lfw-dev.bin").is_file(), reason=f"the fixture is not at {FIXTURE}"
)


def jpeg(seed: int, size: int = 16) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_write_then_read_and_load(tmp_path):
    images = [jpeg(seed) for seed in range(6)]
    same = [True, False, True]
    write_bin(tmp_path / "set.bin", images, same)
    encoded, flags = read_bin(tmp_path / "set.bin")
    assert encoded == images and flags.dtype == bool and flags.tolist() == same
    decoded, flags = load_bin(tmp_path / "set.bin")
    assert decoded.shape == (6, 16, 16, 3) and decoded.dtype == np.uint8
    for array, data in zip(decoded, images):
        assert np.array_equal(array, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    # What insightface's Python 3 loader does, and no global anywhere in the file.
    raw = (tmp_path / "set.bin").read_bytes()
    assert pickle.loads(raw, encoding="bytes") == (images, same)
    opcodes = [op.name for op, _, _ in pickletools.genops(raw)]
    assert opcodes[0] == "PROTO" and "BINSTRING" in opcodes
    assert not {"GLOBAL", "STACK_GLOBAL", "REDUCE", "BINUNICODE"} & set(opcodes)
    with pytest.raises(ValueError, match="two images per pair"):
        write_bin(tmp_path / "bad.bin", images[:5], same)


def test_a_pickle_that_would_run_code_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "ran"

    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([RunsCode()], [True]), protocol=2))
    with pytest.raises(DataError) as error:
        read_bin(path)
    message = one_line(error)
    assert str(path) in message and "a downloaded pickle can run code" in message
    assert f"`{os.system.__module__}.system`" in message and "refused" in message
    with pytest.raises(DataError):
        load_bin(path)
    assert not marker.exists()
    # Any global at all, even a harmless one (numpy arrays need numpy's).
    path.write_bytes(pickle.dumps((np.zeros(2), [True]), protocol=2))
    with pytest.raises(DataError, match="numpy"):
        read_bin(path)


@pytest.mark.parametrize(
    "content, words",
    [
        (b"this is not a pickle at all", "not a readable pickle"),
        (b"", "not a readable pickle"),
        (pickle.dumps({"images": []}, protocol=2), "expected (images, same)"),
        # Protocol 3: Python 3's protocol 2 stores bytes through a global (_codecs.encode).
        (pickle.dumps(([b"a", b"b", b"c"], [True]), protocol=3), "3 images for 1 pairs"),
        (pickle.dumps(([b"a", b"b"], ["yes"]), protocol=3), "not booleans"),
        (pickle.dumps((["a", "b"], [True]), protocol=3), "not a list of bytes"),
    ],
    ids=["text", "empty", "dict", "count", "labels", "strings"],
)
def test_bad_bins_get_one_line(tmp_path, content, words):
    path = tmp_path / "bad.bin"
    path.write_bytes(content)
    with pytest.raises(DataError) as error:
        read_bin(path)
    message = one_line(error)
    assert str(path) in message and words in message


def test_undecodable_image_and_mixed_sizes(tmp_path):
    write_bin(tmp_path / "a.bin", [jpeg(0), b"junk"], [True])
    with pytest.raises(DataError, match="image 1: cannot decode"):
        load_bin(tmp_path / "a.bin")
    write_bin(tmp_path / "b.bin", [jpeg(0), jpeg(1, size=20)], [True])
    with pytest.raises(DataError, match="must share one size"):
        load_bin(tmp_path / "b.bin")
    with pytest.raises(DataError, match="cannot read"):
        read_bin(tmp_path / "missing.bin")


def test_pack_pairs_from_a_pairs_file(tmp_path):
    root = tmp_path / "people"
    for name, count in {"Ann": 2, "Bo": 1}.items():
        (root / name).mkdir(parents=True)
        for number in range(1, count + 1):
            (root / name / f"{name}_{number:04d}.jpg").write_bytes(jpeg(number, size=20))
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("1\t2\nAnn\t1\t2\nAnn\t2\tBo\t1\n")
    assert read_pairs(pairs) == [("Ann", 1, "Ann", 2), ("Ann", 2, "Bo", 1)]
    assert pack_pairs(pairs, root, tmp_path / "out.bin", size=20) == (2, 1)
    encoded, same = read_bin(tmp_path / "out.bin")
    ann = [(root / "Ann" / f"Ann_{n:04d}.jpg").read_bytes() for n in (1, 2)]
    assert same.tolist() == [True, False]
    assert encoded == [ann[0], ann[1], ann[1], (root / "Bo" / "Bo_0001.jpg").read_bytes()]
    images, _ = load_bin(tmp_path / "out.bin")
    assert images.shape == (4, 20, 20, 3)
    pack_pairs(pairs, root, tmp_path / "small.bin", size=8)  # re-encoded at 8x8
    assert load_bin(tmp_path / "small.bin")[0].shape == (4, 8, 8, 3)

    pairs.write_text("Ann\t1\t3\nCy\t1\tBo\t1\n")
    with pytest.raises(DataError) as error:
        pack_pairs(pairs, root, tmp_path / "x.bin")
    message = one_line(error)
    assert "2 image(s) not under" in message and "Ann_0003.jpg" in message
    assert "Cy_0001.jpg" in message and not (tmp_path / "x.bin").exists()
    pairs.write_text("Ann\t1\nAnn 1 2\n")
    with pytest.raises(DataError, match="line 1: 'Ann\\\\t1' is not"):
        read_pairs(pairs)


# --------------------------------------------------------------------------------------------------
# The fixture.


@needs_fixture
def test_fixture_bin():
    expected = json.loads((FIXTURE / "expected.json").read_text())
    images, same = load_bin(FIXTURE / "lfw-dev.bin")
    assert images.shape == (2 * expected["pairs"], 112, 112, 3)
    assert len(same) == expected["pairs"] and same.sum() == expected["same"]
    folds = same.reshape(10, 60)  # 10 folds: 30 same pairs, then 30 different
    assert folds[:, :30].all() and not folds[:, 30:].any()


@needs_fixture
def test_writing_the_fixture_bin_again_gives_the_same_bytes(tmp_path):
    encoded, same = read_bin(FIXTURE / "lfw-dev.bin")
    write_bin(tmp_path / "again.bin", encoded, same)
    assert (tmp_path / "again.bin").read_bytes() == (FIXTURE / "lfw-dev.bin").read_bytes()


@needs_fixture
@pytest.mark.skipif(not LFW_DEV.is_dir(), reason=f"lfw-dev is not at {LFW_DEV}")
def test_pack_pairs_on_the_fixtures_faces_gives_the_fixture_bin(tmp_path):
    """The aligned faces of train.rec, laid out as lfw-dev's photographs (people and photographs in
    sorted order, the two without landmarks left out), packed from lfw-dev-pairs.txt: the bin is
    the fixture's, byte for byte, but for the two faces that carry the RecordIO magic in a JPEG
    comment in train.rec only: the same pixels there."""
    expected = json.loads((FIXTURE / "expected.json").read_text())
    skipped = set(expected["skipped_no_landmarks"])
    names = [
        f"{person.name}/{photo.name}"
        for person in sorted(p for p in LFW_DEV.iterdir() if p.is_dir())
        for photo in sorted(person.glob("*.jpg"))
    ]
    names = [name for name in names if name not in skipped]
    reader = RecordFile(FIXTURE)
    assert len(names) == len(reader)
    root = tmp_path / "aligned"
    for index, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(reader.image_record(index)[1])
    out = tmp_path / "lfw-dev.bin"
    assert pack_pairs(FIXTURE / "lfw-dev-pairs.txt", root, out) == (600, 300)
    ours, our_same = read_bin(out)
    theirs, their_same = read_bin(FIXTURE / "lfw-dev.bin")
    assert np.array_equal(our_same, their_same) and len(ours) == len(theirs)
    commented = {reader.image_record(key - 1)[1] for key in expected["multi_part_record_keys"]}
    differ = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
    assert len(differ) == 5 and all(ours[i] in commented for i in differ)
    for i in differ:
        pixels = [np.asarray(Image.open(io.BytesIO(data))) for data in (ours[i], theirs[i])]
        assert np.array_equal(*pixels)
    write_bin(
        tmp_path / "same.bin",
        [theirs[i] if i in differ else x for i, x in enumerate(ours)],
        our_same,
    )
    assert (tmp_path / "same.bin").read_bytes() == (FIXTURE / "lfw-dev.bin").read_bytes()
