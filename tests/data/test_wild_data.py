"""Data options for images in the wild: data.crop, colour handling, data.max_images_per_class."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from pipeline_testing import make_image_folder, shipped_raw

from angular.config import ConfigError, parse_params
from angular.data import DataError, load_image, prepare_dataset, read_manifest


def folder_config(path, **overrides):
    raw = shipped_raw()
    raw["data"].update(source="imagefolder", path=str(path), **overrides)
    return parse_params(raw).data


def gradient_image(width: int, height: int) -> np.ndarray:
    """Pixel (y, x) = 10 y + x (mod 256): each crop region has its own values."""
    y, x = np.mgrid[0:height, 0:width]
    return ((10 * y + x) % 256).astype(np.uint8)


def two_people(root, size=(30, 40), per_person=4):
    """Two identities of gradient images (height, width = size), and two more random ones."""
    for name in ("ann", "bob"):
        (root / name).mkdir(parents=True)
        for index in range(per_person):
            Image.fromarray(gradient_image(size[1], size[0])).save(root / name / f"{index}.png")
    return make_image_folder(root, {"cid": per_person, "dan": per_person}, size=size)


def test_a_box_crop_is_applied_before_resizing_and_recorded(tmp_path):
    root = two_people(tmp_path / "faces")
    config = folder_config(root, crop=[5, 2, 25, 12], unknown_identities=1)
    manifest = prepare_dataset(config, tmp_path / "prepared")
    record = next(r for r in manifest.records if r.identity == "ann")
    cropped = np.asarray(Image.open(manifest.resolve(record)))
    assert cropped.shape == (10, 20)  # bottom - top, right - left
    np.testing.assert_array_equal(cropped, gradient_image(40, 30)[2:12, 5:25])
    # Inside the prepared folder, so relative; the checksum is of the cropped file.
    assert not record.path.startswith("/") and record.path.startswith("cropped/")
    info = json.loads((tmp_path / "prepared" / "classes.json").read_text())
    assert info["crop"] == {"box": [5, 2, 25, 12]}
    # Resizing comes after the crop: the crop keeps its gradient at the new size.
    image = load_image(manifest.resolve(record), image_size=(5, 10), channels=1)
    resized = Image.fromarray(cropped).resize((10, 5), Image.Resampling.BILINEAR)
    np.testing.assert_array_equal(image[0].numpy(), np.asarray(resized))
    # A changed crop changes the manifest (so DVC reruns what depends on it).
    other = prepare_dataset(
        folder_config(root, crop={"central": 0.5}, unknown_identities=1), tmp_path / "other"
    )
    assert [r.md5 for r in other.records] != [r.md5 for r in manifest.records]
    record = next(r for r in other.records if r.identity == "ann")
    np.testing.assert_array_equal(
        np.asarray(Image.open(other.resolve(record))), gradient_image(40, 30)[7:22, 10:30]
    )


def test_load_image_crops_like_prepare(tmp_path):
    path = tmp_path / "one.png"
    Image.fromarray(gradient_image(40, 30)).save(path)
    config = folder_config(tmp_path, crop={"central": 0.5})
    image = load_image(path, image_size=(15, 20), channels=1, crop=config.crop)
    np.testing.assert_array_equal(image[0].numpy(), gradient_image(40, 30)[7:22, 10:30])
    outside = folder_config(tmp_path, crop=[0, 0, 41, 30]).crop
    with pytest.raises(DataError, match=r"one.png: data.crop \[0, 0, 41, 30\] lies outside.*40x30"):
        load_image(path, image_size=(8, 8), channels=1, crop=outside)


def test_a_box_outside_some_images_names_them_before_anything_is_split(tmp_path):
    root = two_people(tmp_path / "faces")
    Image.fromarray(gradient_image(20, 20)).save(root / "bob" / "small.png")
    with pytest.raises(DataError) as caught:
        prepare_dataset(folder_config(root, crop=[0, 0, 25, 25]), tmp_path / "prepared")
    message = str(caught.value)
    assert message.startswith("data.crop: the box [0, 0, 25, 25]") and "1 image(s)" in message
    assert "small.png (20x20)" in message


@pytest.mark.parametrize(
    ("crop", "key", "words"),
    [
        ([10, 0, 5, 8], "data.crop", "left < right"),
        ([0, 0, 8], "data.crop", "a box [left, top, right, bottom]"),
        ({"central": 0.0}, "data.crop", "central must be a fraction in (0, 1]"),
        ({"central": 1.2}, "data.crop", "central must be a fraction in (0, 1]"),
        ({"middle": 0.5}, "data.crop", "{central: f}"),
    ],
)
def test_a_bad_crop_names_the_key(tmp_path, crop, key, words):
    with pytest.raises(ConfigError) as caught:
        folder_config(tmp_path, crop=crop)
    assert caught.value.key == key and words in caught.value.problem, str(caught.value)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "CMYK", "I;16"])
def test_any_source_colour_is_read_as_grey_or_rgb(tmp_path, mode, channels):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
    grey = np.asarray(Image.fromarray(rgb).convert("L"))
    if mode == "I;16":  # a 16-bit grey: 8-bit values times 257 (the full 16-bit range)
        source = Image.fromarray(grey.astype(np.uint16) * 257)
        assert source.mode == "I;16"
        expected = grey
    elif mode == "L":
        source, expected = Image.fromarray(grey), grey
    else:
        source = Image.fromarray(rgb).convert(mode)
        expected = np.asarray(source.convert("L" if channels == 1 else "RGB"))
    path = tmp_path / ("image.tiff" if mode == "CMYK" else "image.png")
    source.save(path)
    image = load_image(path, image_size=(6, 5), channels=channels).numpy()
    assert image.shape == (channels, 6, 5) and image.dtype == np.uint8
    if expected.ndim == 2:
        expected = np.repeat(expected[None], channels, axis=0)
    else:
        expected = expected.transpose(2, 0, 1)
    np.testing.assert_array_equal(image, expected)


def test_the_exif_orientation_is_applied_before_cropping(tmp_path):
    pixels = gradient_image(40, 30)
    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored on its side: shown rotated 90 degrees clockwise
    Image.fromarray(pixels).save(path, exif=exif, quality=100)
    image = load_image(path, image_size=(40, 30), channels=1)
    assert image.shape == (1, 40, 30)  # upright: the stored 40 x 30 becomes 30 wide, 40 high
    upright = np.rot90(pixels, k=-1)
    assert np.abs(image[0].numpy().astype(int) - upright).mean() < 3  # JPEG's loss


def test_max_images_per_class_caps_known_and_unknown_identities_with_the_seed(tmp_path):
    root = make_image_folder(tmp_path / "faces", {"ann": 12, "bob": 5, "cid": 9, "dan": 3})
    config = folder_config(root, max_images_per_class=4, unknown_identities=["cid"])
    manifest = prepare_dataset(config, tmp_path / "prepared")
    per_person = {
        n: sum(r.identity == n for r in manifest.records) for n in "ann bob cid dan".split()
    }
    assert per_person == {"ann": 4, "bob": 4, "cid": 4, "dan": 3}
    assert manifest.info["capped"] == {"ann": 12, "bob": 5, "cid": 9}
    again = prepare_dataset(config, tmp_path / "again")
    assert again.records == manifest.records  # same seed, same choice
    other = prepare_dataset(
        folder_config(root, max_images_per_class=4, unknown_identities=["cid"], seed=1),
        tmp_path / "other",
    )
    chosen = {r.path.rsplit("/", 1)[-1] for r in manifest.records if r.identity == "ann"}
    assert chosen != {r.path.rsplit("/", 1)[-1] for r in other.records if r.identity == "ann"}
    # No cap: today's manifest, unchanged.
    uncapped = prepare_dataset(folder_config(root, unknown_identities=["cid"]), tmp_path / "all")
    assert len(uncapped.records) == 29 and uncapped.info["capped"] == {}
    written = read_manifest(tmp_path / "prepared")
    assert written.info["max_images_per_class"] == 4
