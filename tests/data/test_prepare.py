"""prepare: digits and image folders, splits, determinism, and every kind of bad data."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from pipeline_testing import ORL, make_image_folder, shipped_raw, tiny_raw, write_params

from angular.config import parse_params
from angular.data import SPLITS, DataError, ImageDataset, prepare_dataset, read_manifest
from angular.nn.recognition import load_model
from angular.serve.inference import run_model
from angular.train.loop import TrainPaths, train_item


def data_config(**overrides):
    raw = shipped_raw()
    for key, value in overrides.items():
        raw["data"][key] = value
    return parse_params(raw).data


def folder_config(path, **overrides):
    return data_config(source="imagefolder", path=str(path), **overrides)


def test_digits_splits_known_and_unknown_identities(digits_prepared):
    manifest = read_manifest(digits_prepared)
    assert len(manifest.records) == 1797
    assert len(manifest.classes) == 8 and len(manifest.unknown) == 2
    assert set(manifest.classes) | set(manifest.unknown) == {str(d) for d in range(10)}
    counts = {split: len(manifest.split(split)) for split in SPLITS}
    assert counts["unknown"] == sum(1 for r in manifest.records if r.identity in manifest.unknown)
    assert all(r.label == -1 for r in manifest.split("unknown"))
    for split in ("train", "val", "test"):
        records = manifest.split(split)
        assert {r.identity for r in records} == set(manifest.classes)
        assert all(manifest.classes[r.label] == r.identity for r in records)
    # Per identity roughly 65 / 15 / 20 percent.
    assert 0.6 < counts["train"] / (1797 - counts["unknown"]) < 0.7
    # Every path is a distinct readable file.
    paths = [manifest.resolve(r) for r in manifest.records]
    assert len(set(paths)) == len(paths) and all(p.is_file() for p in paths)
    images = ImageDataset(
        paths[:5], [0] * 5, image_size=(8, 8), channels=1, mean=(0.5,), std=(0.5,)
    )
    image, _ = images[0]
    assert image.shape == (1, 8, 8) and image.min() >= -1.0 and image.max() <= 1.0


def test_prepare_is_deterministic_for_a_seed(tmp_path, digits_prepared):
    again = prepare_dataset(data_config(), tmp_path / "again")
    first = (digits_prepared / "manifest.csv").read_text()
    assert (tmp_path / "again" / "manifest.csv").read_text() == first
    other = prepare_dataset(data_config(seed=1), tmp_path / "other")
    assert (tmp_path / "other" / "manifest.csv").read_text() != first
    assert again.unknown != other.unknown or again.records != other.records


def test_an_image_folder_with_mixed_formats_and_stray_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = make_image_folder(tmp_path / "faces", {f"p{i}": 6 for i in range(5)}, suffix=".pgm")
    make_image_folder(root, {"p5": 6}, suffix=".jpg", seed=1)
    (root / "README").write_text("not an identity")
    (root / "p0" / ".DS_Store").write_bytes(b"\0\1")
    manifest = prepare_dataset(
        folder_config("faces", unknown_identities=["p5"], val_fraction=0.2, test_fraction=0.2),
        "prepared",
    )
    assert manifest.unknown == ("p5",)
    assert manifest.classes == ("p0", "p1", "p2", "p3", "p4")
    assert {split: len(manifest.split(split)) for split in SPLITS} == {
        "train": 20,
        "val": 5,
        "test": 5,
        "unknown": 6,
    }
    assert any("README" in path for path in manifest.info["ignored"])
    # A relative data.path gives paths relative to the prepared folder (the project can move).
    assert all(r.path.startswith("../faces/p") for r in manifest.records)
    assert all(manifest.resolve(r).is_file() for r in manifest.records)
    assert read_manifest("prepared").records == manifest.records


def test_a_test_folder_supplies_the_test_images_and_the_unknowns(tmp_path):
    train = make_image_folder(tmp_path / "train", {"a": 5, "b": 5, "c": 5})
    test = make_image_folder(tmp_path / "test", {"a": 2, "b": 2, "z": 3}, seed=2)
    manifest = prepare_dataset(
        folder_config(train, test_path=str(test), test_fraction=0.0, unknown_identities=0),
        tmp_path / "prepared",
    )
    assert manifest.classes == ("a", "b", "c") and manifest.unknown == ("z",)
    assert {r.identity for r in manifest.split("test")} == {"a", "b"}
    assert len(manifest.split("test")) == 4 and len(manifest.split("unknown")) == 3
    assert all(str(tmp_path / "test") in str(manifest.resolve(r)) for r in manifest.split("test"))
    assert not any(r.identity == "z" for r in manifest.split("train"))


def corrupt_png(root):
    data = (root / "a" / "0.png").read_bytes()
    (root / "a" / "1.png").write_bytes(data[: len(data) // 2])
    return root / "a" / "1.png", "corrupt or truncated image"


def non_image(root):
    (root / "b" / "notes.txt").write_text("hello")
    return root / "b" / "notes.txt", "not an image file PIL can read"


def empty_class(root):
    (root / "empty").mkdir()
    return root / "empty", "empty identity folder"


def one_image_class(root):
    make_image_folder(root, {"single": 1})
    return root / "single", "only 1 image(s)"


BAD_DATA = {
    "corrupt": corrupt_png,
    "non-image": non_image,
    "empty class": empty_class,
    "one image": one_image_class,
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_is_an_error_naming_the_file(tmp_path, case):
    root = make_image_folder(tmp_path / "faces", {name: 4 for name in "abcd"})
    path, reason = BAD_DATA[case](root)
    with pytest.raises(DataError) as caught:
        prepare_dataset(folder_config(root, unknown_identities=1), tmp_path / "prepared")
    message = str(caught.value)
    assert message.startswith("data.path: 1 problem(s)")
    assert f"{path}: {reason}" in message
    assert "data.skip_bad_images" in message


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_is_skipped_and_counted_when_asked(tmp_path, case):
    root = make_image_folder(tmp_path / "faces", {name: 4 for name in "abcd"})
    path, reason = BAD_DATA[case](root)
    manifest = prepare_dataset(
        folder_config(root, unknown_identities=1, skip_bad_images=True), tmp_path / "prepared"
    )
    assert manifest.info["skipped"] == [
        {"path": str(path), "reason": manifest.info["skipped"][0]["reason"]}
    ]
    assert manifest.info["skipped"][0]["reason"].startswith(reason)
    assert all(manifest.resolve(r) != path for r in manifest.records)
    assert len(manifest.records) == 16 - (case == "corrupt")


def test_all_problems_are_listed_at_once(tmp_path):
    root = make_image_folder(tmp_path / "faces", {name: 4 for name in "abcd"})
    for make in BAD_DATA.values():
        make(root)
    with pytest.raises(DataError, match=r"4 problem\(s\)") as caught:
        prepare_dataset(folder_config(root, unknown_identities=1), tmp_path / "prepared")
    assert str(caught.value).count("\n  ") == 4


def test_a_missing_or_wrong_path_names_the_param(tmp_path):
    with pytest.raises(DataError, match=rf"^data\.path: {tmp_path / 'nowhere'} does not exist"):
        prepare_dataset(folder_config(tmp_path / "nowhere"), tmp_path / "prepared")
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(DataError, match=r"^data\.path: .* is not a folder"):
        prepare_dataset(folder_config(tmp_path / "file.png"), tmp_path / "prepared")
    train = make_image_folder(tmp_path / "train", {"a": 3, "b": 3})
    with pytest.raises(DataError, match=r"^data\.test_path: .*missing.* does not exist"):
        prepare_dataset(
            folder_config(
                train, test_path=str(tmp_path / "missing"), test_fraction=0.0, unknown_identities=0
            ),
            tmp_path / "prepared",
        )


def test_too_few_identities_for_the_splits_names_the_param(tmp_path):
    root = make_image_folder(tmp_path / "faces", {"a": 4, "b": 4, "c": 4})
    with pytest.raises(
        DataError, match=r"^data\.unknown_identities: holding out 2 of 3 identities"
    ):
        prepare_dataset(folder_config(root, unknown_identities=2), tmp_path / "prepared")
    with pytest.raises(DataError, match=r"^data\.unknown_identities: \['x'\] are not identities"):
        prepare_dataset(folder_config(root, unknown_identities=["x"]), tmp_path / "prepared")
    # Two images per identity: nothing is left for the validation split.
    small = make_image_folder(tmp_path / "small", {"a": 2, "b": 2, "c": 2})
    with pytest.raises(DataError, match=r"^data\.val_fraction: the val split is empty"):
        prepare_dataset(folder_config(small, unknown_identities=0), tmp_path / "prepared2")


def test_the_prepare_stage_reports_bad_data_and_exits_non_zero(tmp_path, monkeypatch, capsys):
    from pipeline import prepare, run_stage

    root = make_image_folder(tmp_path / "faces", {name: 4 for name in "abcd"})
    path, _ = non_image(root)
    write_params(
        tmp_path,
        tiny_raw(data__source="imagefolder", data__path=str(root), data__unknown_identities=1),
    )
    monkeypatch.chdir(tmp_path)
    assert run_stage(prepare.main, []) == 1
    err = capsys.readouterr().err
    assert str(path) in err and "Traceback" not in err
    assert not (tmp_path / "data" / "prepared" / "manifest.csv").exists()


@pytest.mark.skipif(not ORL.is_dir(), reason=f"{ORL} (the ORL faces) is not on this machine")
def test_a_slice_of_the_orl_faces(tmp_path):
    """Six people of ORL (PGM, 92x112): prepare, then load images at a reduced size."""
    people = sorted(p.name for p in ORL.iterdir() if p.is_dir())[:6]
    for person in people:
        shutil.copytree(ORL / person, tmp_path / "orl" / person)
    manifest = prepare_dataset(
        folder_config(tmp_path / "orl", unknown_identities=2, val_fraction=0.1, test_fraction=0.2),
        tmp_path / "prepared",
    )
    assert len(manifest.classes) == 4 and len(manifest.unknown) == 2
    assert {split: len(manifest.split(split)) for split in SPLITS} == {
        "train": 28,
        "val": 4,
        "test": 8,
        "unknown": 20,
    }
    dataset = ImageDataset(
        manifest.paths("train"),
        manifest.labels("train"),
        image_size=(56, 46),
        channels=1,
        mean=(0.5,),
        std=(0.5,),
    )
    image, label = dataset[0]
    assert image.shape == (1, 56, 46) and 0 <= int(label) < 4
    assert float(image.std()) > 0.05  # a real face, not a blank
    assert np.unique(manifest.labels("train")).tolist() == [0, 1, 2, 3]

    # One epoch of training on the faces, and the model reads them back for inference.
    raw = tiny_raw(
        data__source="imagefolder",
        data__path=str(tmp_path / "orl"),
        data__image_size=[56, 46],
        train__epochs=1,
        train__batch_size=8,
    )
    paths = TrainPaths(*(tmp_path / "run" / name for name in ("m.pt", "ck", "m.json", "l", "a")))
    metrics = train_item(parse_params(raw), "arcface", manifest, paths)
    assert metrics["epoch"] == 1 and np.isfinite(metrics["train_loss"])
    outputs = run_model(
        load_model(paths.model), manifest.paths("unknown"), manifest.labels("unknown"), ["?"] * 20
    )
    assert outputs.embeddings.shape == (20, 16) and outputs.logits["arcface"].shape == (20, 4)
