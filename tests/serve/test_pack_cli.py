"""`angular pack images` and `angular pack pairs`: insightface's formats from an image folder and a
pairs file, read back with angular.data; against the MXNet-written fixture when
../shared/data/insightface is there; every user error one line on stderr and exit status 1."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from serve_testing import run_cli

from angular import cli
from angular.data import RecordFile, read_bin

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "../shared/data/insightface"


def jpeg(seed: int, size: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


@pytest.fixture
def people(tmp_path) -> Path:
    """Two people as lfw names them: Ann (2 photos, one PNG 40x30), Bo (1 photo)."""
    root = tmp_path / "people"
    (root / "Ann").mkdir(parents=True)
    (root / "Bo").mkdir()
    (root / "Ann" / "Ann_0001.jpg").write_bytes(jpeg(1, 24))
    Image.fromarray(np.full((30, 40), 128, np.uint8)).save(root / "Ann" / "Ann_0002.jpg", "PNG")
    (root / "Bo" / "Bo_0001.jpg").write_bytes(jpeg(2, 24))
    return root


def test_pack_images_and_pairs_as_a_user_runs_them(people, tmp_path):
    result = run_cli("pack", "images", str(people), "set", "--size", "24", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "3 image(s) of 2 identities written to set" in result.stderr
    reader = RecordFile(tmp_path / "set")
    assert len(reader) == 3 and reader.num_classes == 2 and reader.property == (2, 24, 24)
    assert reader.labels().tolist() == [0, 0, 1]
    assert reader.image_record(0)[1] == (people / "Ann" / "Ann_0001.jpg").read_bytes()
    image, label = reader[1]
    assert image.size == (24, 24) and label == 0
    assert np.abs(np.asarray(image, float) - 128).max() <= 2  # the grey PNG, resized

    (tmp_path / "pairs.txt").write_text("1\t1\nAnn\t1\t2\nAnn\t1\tBo\t1\n")
    result = run_cli(
        "pack", "pairs", "pairs.txt", str(people), "out.bin", "--size", "24", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "2 pairs (1 same, 1 different) written to out.bin" in result.stderr
    encoded, same = read_bin(tmp_path / "out.bin")
    assert same.tolist() == [True, False] and len(encoded) == 4
    assert encoded[0] == encoded[2] == reader.image_record(0)[1]
    assert encoded[1] == reader.image_record(1)[1]


@pytest.mark.parametrize(
    "args, words",
    [
        (["pack", "images", "missing", "out"], "missing: no such folder"),
        (["pack", "images", "{people}", "out", "--size", "0"], "--size must be >= 1"),
        (["pack", "pairs", "missing.txt", "{people}", "out.bin"], "cannot read the pairs file"),
        (["pack", "pairs", "bad.txt", "{people}", "out.bin"], "line 1"),
        (["pack", "pairs", "unknown.txt", "{people}", "out.bin"], "1 image(s) not under"),
    ],
    ids=["no-folder", "size", "no-pairs", "bad-pairs", "unknown-image"],
)
def test_user_errors_are_one_line(people, tmp_path, monkeypatch, capsys, args, words):
    (tmp_path / "bad.txt").write_text("Ann\n")
    (tmp_path / "unknown.txt").write_text("Ann\t1\t7\n")
    (people / "Empty").mkdir()
    monkeypatch.chdir(tmp_path)
    status = cli.main([arg.format(people=people) for arg in args])
    error = capsys.readouterr().err
    assert status == cli.EXIT_ERROR
    assert error.count("\n") == 1 and error.startswith(f"angular pack {args[1]}: error: ")
    assert words in error and "Traceback" not in error
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.bin").exists()


def test_an_empty_identity_folder_is_named(people, tmp_path, capsys):
    (people / "Empty").mkdir()
    assert cli.main(["pack", "images", str(people), str(tmp_path / "out")]) == cli.EXIT_ERROR
    assert f"{people / 'Empty'}: an identity folder without images" in capsys.readouterr().err


def test_pack_without_a_kind_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["pack"])
    assert exit_.value.code == 2 and "usage: angular pack" in capsys.readouterr().err


@pytest.mark.skipif(not (FIXTURE / "train.rec").is_file(), reason=f"no fixture at {FIXTURE}")
def test_pack_images_round_trips_the_mxnet_fixture(tmp_path, capsys):
    """The fixture's faces written out as an image folder, packed: MXNet's files, byte for byte."""
    reader = RecordFile(FIXTURE)
    for index in range(len(reader)):
        label, data = reader.image_record(index)
        (tmp_path / "faces" / f"{label:03d}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "faces" / f"{label:03d}" / f"{index:05d}.jpg").write_bytes(data)
    status = cli.main(["pack", "images", str(tmp_path / "faces"), str(tmp_path / "set")])
    assert status == 0, capsys.readouterr().err
    for name in ("train.rec", "train.idx", "property"):
        assert (tmp_path / "set" / name).read_bytes() == (FIXTURE / name).read_bytes(), name


LFW_DEV = REPO / "../shared/data/lfw-dev"


def landmark_row(name: str, points: np.ndarray) -> str:
    return f"{name}\t0.99\t" + "\t".join(f"{v:.4f}" for v in points.ravel()) + "\n"


def test_pack_images_aligns_with_landmarks(people, tmp_path, capsys):
    """Landmarks at the template's points scaled into each photo: the aligned crop is the photo
    resized onto 112x112; an image without a row, and a row outside its image, are one line."""
    from angular.data.align import ARCFACE_TEMPLATE

    header = "path\tscore\t" + "\t".join(f"x{k}\ty{k}" for k in range(1, 6)) + "\n"
    rows = {
        "Ann/Ann_0001.jpg": ARCFACE_TEMPLATE * 24 / 112,
        "Ann/Ann_0002.jpg": ARCFACE_TEMPLATE * 30 / 112 + [5.0, 0.0],
        "Bo/Bo_0001.jpg": ARCFACE_TEMPLATE * 24 / 112,
    }
    (tmp_path / "lm.tsv").write_text(header + "".join(landmark_row(*r) for r in rows.items()))
    args = ["pack", "images", str(people), str(tmp_path / "set"), "--landmarks"]
    assert cli.main([*args, str(tmp_path / "lm.tsv")]) == 0, capsys.readouterr().err
    assert "3 image(s) of 2 identities" in capsys.readouterr().err
    reader = RecordFile(tmp_path / "set")
    assert len(reader) == 3 and reader.property == (2, 112, 112)
    image, label = reader[1]
    assert image.size == (112, 112) and label == 0
    assert np.abs(np.asarray(image, float)[8:-8, 8:-8] - 128).max() <= 2  # the grey PNG

    del rows["Bo/Bo_0001.jpg"]
    (tmp_path / "missing.tsv").write_text(header + "".join(landmark_row(*r) for r in rows.items()))
    assert cli.main([*args, str(tmp_path / "missing.tsv")]) == cli.EXIT_ERROR
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "no landmarks for 1 image(s): Bo/Bo_0001.jpg" in error

    rows["Bo/Bo_0001.jpg"] = ARCFACE_TEMPLATE * 3  # 24x24 photo, landmarks for a larger one
    (tmp_path / "far.tsv").write_text(header + "".join(landmark_row(*r) for r in rows.items()))
    assert cli.main([*args, str(tmp_path / "far.tsv")]) == cli.EXIT_ERROR
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "Traceback" not in error
    assert "far.tsv, row Bo/Bo_0001.jpg: landmark 1 at (114.884, 155.089) lies outside" in error


@pytest.mark.skipif(
    not (LFW_DEV / "landmarks.tsv").is_file() or not (FIXTURE / "train.rec").is_file(),
    reason="no ../shared/data (lfw-dev and the insightface fixture)",
)
def test_pack_images_with_landmarks_makes_the_mxnet_fixtures_faces(tmp_path, capsys):
    """lfw-dev's first two people aligned and packed: MXNet's records, JPEG byte for byte; a
    person with a photograph the detector missed is named."""
    for person in ("Abdullah_Gul", "Adrien_Brody", "Dominique_de_Villepin"):
        (tmp_path / "faces" / person).mkdir(parents=True)
        for photo in (LFW_DEV / person).iterdir():
            (tmp_path / "faces" / person / photo.name).symlink_to(photo)
    args = ["pack", "images", str(tmp_path / "faces"), str(tmp_path / "set")]
    landmarks = ["--landmarks", str(LFW_DEV / "landmarks.tsv")]
    assert cli.main([*args, *landmarks]) == cli.EXIT_ERROR
    assert (
        "no landmarks for 1 image(s): Dominique_de_Villepin/Dominique_de_Villepin_0013.jpg"
        in capsys.readouterr().err
    )
    for photo in (tmp_path / "faces" / "Dominique_de_Villepin").iterdir():
        photo.unlink()
    (tmp_path / "faces" / "Dominique_de_Villepin").rmdir()
    assert cli.main([*args, *landmarks]) == 0, capsys.readouterr().err
    ours, theirs = RecordFile(tmp_path / "set"), RecordFile(FIXTURE)
    assert len(ours) == 19 + 12 and ours.labels().tolist() == theirs.labels()[:31].tolist()
    for index in range(len(ours)):
        assert ours.image_record(index) == theirs.image_record(index), index
