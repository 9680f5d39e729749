"""Bad data (docs/reliability.md, Data) is a clear message naming the path or the parameter,
before any training: the prepare stage (a real ``python -m pipeline.prepare`` process in a
temporary project) exits 1 with that message and no traceback, and writes no manifest. With
``data.skip_bad_images: true`` the bad files and folders are skipped and counted instead.

Rarer cases run in-process through :func:`angular.data.prepare_dataset` (the stage turns its
``DataError`` into the same one-line exit, as the process cases show).
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import pytest
from reliability_testing import (
    make_image_folder,
    run_stage_process,
    tiny_raw,
    write_params,
)

from angular.config import parse_params
from angular.data import DataError, prepare_dataset, read_manifest
from pipeline import EXIT_FAILURE, run_stage
from pipeline import train as train_stage

IDENTITIES = {name: 4 for name in ("anna", "ben", "carl", "dora")}


def corrupt_image(root: Path) -> list[str]:
    path = root / "anna" / "1.png"
    path.write_bytes((root / "anna" / "0.png").read_bytes()[:60])
    return [f"{path}: corrupt or truncated image"]


def non_image_file(root: Path) -> list[str]:
    path = root / "ben" / "notes.txt"
    path.write_text("not a picture")
    return [f"{path}: not an image file PIL can read"]


def empty_class_folder(root: Path) -> list[str]:
    (root / "erin").mkdir()
    return [f"{root / 'erin'}: empty identity folder"]


def class_with_one_image(root: Path) -> list[str]:
    make_image_folder(root, {"finn": 1})
    return [f"{root / 'finn'}: only 1 image(s)", "data.min_images_per_class = 2"]


def missing_path(root: Path) -> list[str]:
    return [f"data.path: {root} does not exist"]


def too_few_identities(root: Path) -> list[str]:
    for name in ("carl", "dora"):
        for file in (root / name).iterdir():
            file.unlink()
        (root / name).rmdir()
    return ["data.unknown_identities: holding out 1 of 2 identities leaves 1 known"]


PROCESS_CASES = {
    "a corrupt image": corrupt_image,
    "a non-image file": non_image_file,
    "an empty class folder": empty_class_folder,
    "a class with one image": class_with_one_image,
    "a path that does not exist": missing_path,
    "fewer identities than the splits need": too_few_identities,
}


def faces_project(tmp_path: Path, **data) -> Path:
    """A project folder whose params point at ``tmp_path/faces`` (four identities, 4 images)."""
    root = make_image_folder(tmp_path / "faces", IDENTITIES)
    settings = {"data__source": "imagefolder", "data__path": str(root)}
    settings.update({"data__unknown_identities": 1, **{f"data__{k}": v for k, v in data.items()}})
    write_params(tmp_path, tiny_raw(**settings))
    return root


@pytest.mark.parametrize("case", list(PROCESS_CASES))
def test_the_prepare_stage_stops_with_a_message_naming_the_problem(tmp_path, case):
    root = faces_project(tmp_path)
    if case == "a path that does not exist":
        root = root.rename(tmp_path / "elsewhere").parent / "faces"
    expected = PROCESS_CASES[case](root)
    result = run_stage_process(tmp_path, "prepare")
    assert result.returncode == EXIT_FAILURE, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("error: data."), result.stderr  # names the parameter first
    for text in expected:
        assert text in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data" / "prepared" / "manifest.csv").exists()
    assert not (tmp_path / "metrics" / "prepare.json").exists()


def test_the_prepare_stage_skips_and_counts_bad_data_when_allowed(tmp_path):
    root = faces_project(tmp_path, skip_bad_images=True)
    bad = [corrupt_image(root), non_image_file(root), empty_class_folder(root)]
    bad.append(class_with_one_image(root))
    result = run_stage_process(tmp_path, "prepare")
    assert result.returncode == 0, result.stderr
    assert "prepare: skipped 4 file(s) or folder(s) (data.skip_bad_images)" in result.stderr
    metrics = json.loads((tmp_path / "metrics" / "prepare.json").read_text())
    assert metrics["skipped_files"] == 4
    skipped = json.loads((tmp_path / "data" / "prepared" / "classes.json").read_text())["skipped"]
    listed = [f"{entry['path']}: {entry['reason']}" for entry in skipped]
    for expected in bad:
        assert any(line.startswith(expected[0]) for line in listed), (expected, listed)
    manifest = read_manifest(tmp_path / "data" / "prepared")
    assert len(manifest.records) == 15  # 16 images, one of them corrupt
    assert {r.identity for r in manifest.records} == set(IDENTITIES)


# --------------------------------------------------------------------------------------------------
# Rarer cases, in-process.


def png_bomb(path: Path) -> None:
    """A valid PNG header announcing 30000 x 30000 pixels: PIL refuses to decode it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def config_for(root: Path, **data):
    raw = tiny_raw(data__source="imagefolder", data__path=str(root), data__unknown_identities=1)
    raw["data"].update(data)
    return parse_params(raw).data


def test_a_broken_link_a_sub_folder_and_a_decompression_bomb_are_named(tmp_path):
    root = make_image_folder(tmp_path / "faces", IDENTITIES)
    os.symlink(tmp_path / "gone.png", root / "anna" / "link.png")
    (root / "ben" / "nested").mkdir()
    png_bomb(root / "carl" / "huge.png")
    with pytest.raises(DataError) as caught:
        prepare_dataset(config_for(root), tmp_path / "prepared")
    message = str(caught.value)
    assert message.startswith(f"data.path: 3 problem(s) in {root}"), message
    assert f"{root / 'anna' / 'link.png'}: a broken symbolic link" in message
    assert f"{root / 'ben' / 'nested'}: not a file" in message
    assert f"{root / 'carl' / 'huge.png'}: refused by PIL" in message
    assert not (tmp_path / "prepared" / "manifest.csv").exists()


def test_images_without_identity_folders_are_explained(tmp_path):
    flat = tmp_path / "flat"
    make_image_folder(tmp_path / "staging", {"x": 3})
    (tmp_path / "staging" / "x").rename(flat)
    with pytest.raises(DataError) as caught:
        prepare_dataset(config_for(flat), tmp_path / "prepared")
    assert str(caught.value) == (
        f"data.path: {flat} holds no identity folder with usable images (it holds 3 file(s) at "
        "the top level: put each identity's images in a sub-folder of its own)"
    )


def test_every_identity_below_the_minimum_names_the_parameter(tmp_path):
    root = make_image_folder(tmp_path / "faces", IDENTITIES)
    with pytest.raises(DataError) as caught:
        prepare_dataset(config_for(root, min_images_per_class=5), tmp_path / "prepared")
    assert "data.min_images_per_class = 5" in str(caught.value)
    assert str(caught.value).count("only 4 image(s)") == 4
    skipping = config_for(root, min_images_per_class=5, skip_bad_images=True)
    with pytest.raises(DataError, match=r"holds no identity folder with usable images"):
        prepare_dataset(skipping, tmp_path / "prepared")


def test_a_fraction_of_unknowns_that_leaves_too_few_known_names_the_parameter(tmp_path):
    root = make_image_folder(tmp_path / "faces", IDENTITIES)
    with pytest.raises(DataError, match=r"^data\.unknown_identities: holding out 3 of 4"):
        prepare_dataset(config_for(root, unknown_identities=0.7), tmp_path / "prepared")


def test_a_bad_image_in_the_test_folder_names_data_test_path(tmp_path):
    root = make_image_folder(tmp_path / "faces", IDENTITIES)
    test = make_image_folder(tmp_path / "test", {"anna": 2, "zoe": 2}, seed=3)
    (test / "zoe" / "1.png").write_bytes(b"\x89PNG\r\n")
    config = config_for(root, test_path=str(test), test_fraction=0.0, unknown_identities=0)
    with pytest.raises(DataError) as caught:
        prepare_dataset(config, tmp_path / "prepared")
    assert str(caught.value).startswith(f"data.test_path: 1 problem(s) in {test}")
    assert f"{test / 'zoe' / '1.png'}: " in str(caught.value)


@pytest.mark.parametrize("preload", [True, False])
def test_an_image_damaged_after_prepare_stops_training_naming_it(project, preload, capsys):
    """The images are decoded before the first step (preload) or when first read: either way the
    stage ends with a message naming the file, and no model."""
    write_params(project, tiny_raw(train__epochs=1, train__preload_images=preload))
    manifest = read_manifest("data/prepared")  # as the stage reads it, from the project folder
    damaged = manifest.paths("train")[-1]
    damaged.write_bytes(damaged.read_bytes()[:40])
    assert run_stage(train_stage.main, ["arcface"]) == EXIT_FAILURE
    err = capsys.readouterr().err
    assert f"error: {damaged}: cannot read the image" in err and "rerun prepare" in err, err
    assert "Traceback" not in err
    assert not (project / "outputs" / "models" / "arcface.pt").exists()
    if preload:  # nothing was trained
        checkpoints = project / "outputs" / "checkpoints" / "arcface"
        assert not checkpoints.exists() or not list(checkpoints.iterdir())
