"""``data.align`` in prepare (issue 25 part 4): each face of an image folder aligned onto the
ArcFace template from its landmarks and cached in the prepared folder, exactly as
:func:`angular.data.align.align_face` makes it; images without usable landmarks are an error that
lists them, or are skipped and counted. lfw-dev's photographs and detected landmarks
(../shared/data/lfw-dev, skipped when absent) and a synthetic folder written here."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pipeline_testing import tiny_raw

from angular.config import parse_params
from angular.data import DataError, ImageDataset, align_face, prepare_dataset, read_landmarks
from angular.data.align import template

REPO = Path(__file__).resolve().parents[2]
LFW = REPO / "../shared/data/lfw-dev"
LANDMARKS = LFW / "landmarks.tsv"
needs_lfw = pytest.mark.skipif(
    not LANDMARKS.is_file(), reason=f"lfw-dev and its landmarks are not at {LFW}"
)
HEADER = "path\tscore\t" + "\t".join(f"x{k}\ty{k}" for k in range(1, 6)) + "\n"


def align_config(path, landmarks, size=112, **data):
    raw = tiny_raw(data__source="imagefolder", data__path=str(path))
    settings = dict(image_size=[56, 56], channels=3, mean=0.5, std=0.5, unknown_identities=1)
    settings.update(val_fraction=0.25, test_fraction=0.25)  # a val and test image of 3
    raw["data"].update(settings | {"align": {"landmarks": str(landmarks), "size": size}} | data)
    return parse_params(raw).data


def copy_people(tmp_path: Path, people: dict[str, int]) -> Path:
    """The first ``n`` photographs of each of lfw-dev's ``people``."""
    root = tmp_path / "faces"
    for person, count in people.items():
        (root / person).mkdir(parents=True)
        for file in sorted((LFW / person).iterdir())[:count]:
            shutil.copy(file, root / person / file.name)
    return root


def check_aligned(manifest, root: Path, landmarks: dict, size: int) -> int:
    """Every prepared image is the cached PNG of align_face on its source photograph."""
    checked = 0
    for record in manifest.records:
        prepared = manifest.resolve(record)
        assert prepared.parent.parent.name == "path" and prepared.parts[-4] == "aligned"
        name = f"{record.identity}/{prepared.name.removesuffix('.png')}"
        with Image.open(root / name) as source:
            expected = np.asarray(align_face(source, landmarks[name], size))
        with Image.open(prepared) as cached:
            assert cached.size == (size, size) and cached.mode == "RGB"
            np.testing.assert_array_equal(np.asarray(cached), expected)
        checked += 1
    return checked


@needs_lfw
@pytest.mark.parametrize("size", [112, 96])
def test_prepare_caches_the_aligned_lfw_faces(tmp_path, size):
    root = copy_people(tmp_path, {"Abdullah_Gul": 4, "Adrien_Brody": 3, "Andy_Roddick": 3})
    config = align_config(root, LANDMARKS, size)
    manifest = prepare_dataset(config, tmp_path / "prepared")
    assert check_aligned(manifest, root, read_landmarks(LANDMARKS), size) == 10
    assert manifest.info["align"] == {"landmarks": str(LANDMARKS), "size": size}
    # The trainer reads the aligned crops and resizes them to data.image_size as usual.
    dataset = ImageDataset(
        manifest.paths("train"),
        manifest.labels("train"),
        image_size=config.image_size,
        channels=3,
        mean=config.mean,
        std=config.std,
    )
    assert dataset[0][0].shape == (3, 56, 56)


@needs_lfw
def test_images_without_landmarks_are_listed_or_skipped(tmp_path):
    """lfw-dev's two photographs without a detected face: one line naming both, or skipped."""
    root = copy_people(
        tmp_path, {"Dominique_de_Villepin": 14, "John_Bolton": 13, "Abdullah_Gul": 3}
    )
    with pytest.raises(DataError) as caught:
        prepare_dataset(align_config(root, LANDMARKS), tmp_path / "a")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(
        f"data.align.landmarks: 2 image(s) of data.path cannot be aligned with {LANDMARKS}: "
    )
    assert "Dominique_de_Villepin/Dominique_de_Villepin_0013.jpg (no landmarks)" in message
    assert "John_Bolton/John_Bolton_0013.jpg (no landmarks)" in message
    assert "skip_bad_images" in message

    manifest = prepare_dataset(align_config(root, LANDMARKS, skip_bad_images=True), tmp_path / "b")
    assert len(manifest.records) == 14 + 13 + 3 - 2
    skipped = sorted(Path(s["path"]).name for s in manifest.info["skipped"])
    assert skipped == ["Dominique_de_Villepin_0013.jpg", "John_Bolton_0013.jpg"]
    assert all(
        s["reason"] == "data.align.landmarks: no landmarks" for s in manifest.info["skipped"]
    )
    check_aligned(manifest, root, read_landmarks(LANDMARKS), 112)


# --------------------------------------------------------------------------------------------------
# A synthetic folder: faces drawn where their landmarks say.


def synthetic_faces(tmp_path: Path, people=("ann", "bob", "cid"), per_person=3):
    """Random photographs (60x50) with landmarks near the template's, shifted, scaled and turned
    a little per image; returns the folder and the landmarks file's rows."""
    rng = np.random.default_rng(3)
    root, rows = tmp_path / "faces", {}
    for person in people:
        (root / person).mkdir(parents=True)
        for k in range(per_person):
            pixels = rng.integers(0, 256, (60, 50, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / person / f"{k}.png")
            angle = rng.uniform(-0.3, 0.3)
            turn = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
            points = (template(112) - 56) @ turn.T * rng.uniform(0.3, 0.4) + [25, 30]
            rows[f"{person}/{k}.png"] = points + rng.normal(0, 0.5, (5, 2))
    return root, rows


def write_tsv(path: Path, rows: dict) -> Path:
    lines = [HEADER]
    for name, points in rows.items():
        lines.append("\t".join([name, "0.99", *(f"{v:.3f}" for v in np.ravel(points))]) + "\n")
    path.write_text("".join(lines))
    return path


def test_synthetic_faces_are_aligned_as_align_face_does(tmp_path):
    root, rows = synthetic_faces(tmp_path)
    tsv = write_tsv(tmp_path / "landmarks.tsv", rows)
    manifest = prepare_dataset(align_config(root, tsv, 64), tmp_path / "prepared")
    assert check_aligned(manifest, root, read_landmarks(tsv), 64) == 9
    assert all(len(r.md5) == 32 for r in manifest.records)  # the cached crops' checksums


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (np.full((5, 2), np.nan), "a landmark is NaN or infinite"),
        (
            [[10, 10], [20, 10], [15, 20], [10, 200], [20, 30]],
            "landmark 4 at (10, 200) lies outside the 50x60 image",
        ),
    ],
    ids=["nan", "outside"],
)
def test_unusable_landmarks_are_named_or_skipped(tmp_path, bad, reason):
    root, rows = synthetic_faces(tmp_path)
    rows["bob/1.png"] = np.asarray(bad, dtype=float)
    tsv = write_tsv(tmp_path / "landmarks.tsv", rows)
    with pytest.raises(DataError) as caught:
        prepare_dataset(align_config(root, tsv), tmp_path / "a")
    assert str(caught.value) == (
        f"data.align.landmarks: 1 image(s) of data.path cannot be aligned with {tsv}: "
        f"bob/1.png ({reason}) (set data.skip_bad_images: true to skip and count them)"
    )
    manifest = prepare_dataset(align_config(root, tsv, skip_bad_images=True), tmp_path / "b")
    assert manifest.info["skipped"] == [
        {"path": str(root / "bob" / "1.png"), "reason": f"data.align.landmarks: {reason}"}
    ]
    assert len(manifest.records) == 8


def test_an_identity_left_with_too_few_aligned_images_is_skipped(tmp_path):
    root, rows = synthetic_faces(tmp_path, people=("ann", "bob", "cid", "dan"))
    for k in (0, 1):
        del rows[f"dan/{k}.png"]
    tsv = write_tsv(tmp_path / "landmarks.tsv", rows)
    manifest = prepare_dataset(align_config(root, tsv, skip_bad_images=True), tmp_path / "p")
    assert "dan" not in {r.identity for r in manifest.records}
    reasons = {Path(s["path"]).name: s["reason"] for s in manifest.info["skipped"]}
    assert reasons["dan"].startswith("only 1 image(s) with usable landmarks")
    assert reasons["0.png"] == reasons["1.png"] == "data.align.landmarks: no landmarks"


def test_many_missing_rows_are_counted_on_one_line(tmp_path):
    root, rows = synthetic_faces(tmp_path, per_person=4)
    tsv = write_tsv(tmp_path / "landmarks.tsv", dict(list(rows.items())[:2]))
    with pytest.raises(DataError) as caught:
        prepare_dataset(align_config(root, tsv), tmp_path / "p")
    message = str(caught.value)
    assert "\n" not in message and ": 10 image(s) of data.path cannot be aligned" in message
    assert message.count("(no landmarks)") == 5 and "; and 5 more (set" in message
