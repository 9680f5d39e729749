"""Face alignment (angular.data.align): the Umeyama fit against a closed-form fp64 reference on
fresh random points, the template, a drawn marker landing on its template position, bad landmark
files as one line, and lfw-dev's photographs against the MXNet fixture's aligned faces when
../shared is there."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from angular.data import DataError, RecordFile, align_face, read_landmarks, similarity_transform
from angular.data.align import ARCFACE_TEMPLATE, landmarks_for, template

REPO = Path(__file__).resolve().parents[2]
LFW_DEV = REPO / "../shared/data/lfw-dev"
FIXTURE = REPO / "../shared/data/insightface"
HEADER = "path\tscore\t" + "\t".join(f"x{k}\ty{k}" for k in range(1, 6)) + "\n"


def random_similarity(rng: np.random.Generator, mirrored: bool = False) -> np.ndarray:
    """A 2x3 similarity ``[s R | t]``; ``mirrored`` makes R a reflection (det -1)."""
    angle, scale = rng.uniform(-np.pi, np.pi), rng.uniform(0.2, 5.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    if mirrored:
        rotation = rotation @ np.diag([1.0, -1.0])
    return np.hstack([scale * rotation, rng.uniform(-100, 100, (2, 1))])


def apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


def complex_least_squares(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The reference: a proper 2-D similarity is z -> a z + b with complex a, b, so its least
    squares fit is linear: a = <src_c, dst_c> / |src_c|^2."""
    s = src[:, 0] + 1j * src[:, 1]
    d = dst[:, 0] + 1j * dst[:, 1]
    sc, dc = s - s.mean(), d - d.mean()
    a = (np.conj(sc) * dc).sum() / (np.abs(sc) ** 2).sum()
    b = d.mean() - a * s.mean()
    return np.array([[a.real, -a.imag, b.real], [a.imag, a.real, b.imag]])


@pytest.mark.parametrize("seed", range(5))
def test_umeyama_recovers_a_random_similarity(seed):
    rng = np.random.default_rng(1000 + seed)
    src = rng.uniform(0, 250, (5, 2))
    truth = random_similarity(rng)
    fitted = similarity_transform(src, apply(truth, src))
    np.testing.assert_allclose(fitted, truth, rtol=0, atol=1e-9 * np.abs(truth).max())
    noisy = apply(truth, src) + rng.normal(0, 2.0, (5, 2))
    np.testing.assert_allclose(
        similarity_transform(src, noisy), complex_least_squares(src, noisy), rtol=0, atol=1e-9
    )


@pytest.mark.parametrize("seed", range(3))
def test_a_mirrored_fit_returns_the_best_proper_rotation(seed):
    rng = np.random.default_rng(2000 + seed)
    src = rng.uniform(0, 250, (5, 2))
    dst = apply(random_similarity(rng, mirrored=True), src)
    fitted = similarity_transform(src, dst)
    assert np.linalg.det(fitted[:, :2]) > 0  # a rotation and a positive scale, never a mirror
    np.testing.assert_allclose(fitted, complex_least_squares(src, dst), rtol=0, atol=1e-9)


def test_the_template_maps_onto_itself():
    assert template(112).tolist() == ARCFACE_TEMPLATE.tolist()
    np.testing.assert_allclose(
        similarity_transform(ARCFACE_TEMPLATE, template(112)), np.eye(2, 3), atol=1e-12
    )
    np.testing.assert_allclose(template(224), 2 * ARCFACE_TEMPLATE)
    np.testing.assert_allclose(template(128)[0], ARCFACE_TEMPLATE[0] + [8.0, 0.0])


def test_a_marker_at_a_landmark_lands_on_the_template():
    """A face twice the template's size, rotated and shifted in a 300x300 image: the marker drawn
    at its nose tip is found at the template's nose tip in the aligned crop."""
    rng = np.random.default_rng(7)
    truth = np.hstack([2.0 * np.array([[0.96, -0.28], [0.28, 0.96]]), [[40.0], [60.0]]])
    landmarks = apply(truth, ARCFACE_TEMPLATE) + rng.normal(0, 0.01, (5, 2))
    image = Image.new("RGB", (300, 300), (20, 20, 20))
    nose = landmarks[2]
    ImageDraw.Draw(image).ellipse([*(nose - 4), *(nose + 4)], fill=(255, 255, 255))
    aligned = align_face(image, landmarks)
    assert aligned.size == (112, 112) and aligned.mode == "RGB"
    bright = np.asarray(aligned, float)[..., 0]
    ys, xs = np.nonzero(bright > 128)
    weights = bright[ys, xs]
    centre = np.array([(xs * weights).sum(), (ys * weights).sum()]) / weights.sum()
    np.testing.assert_allclose(centre, ARCFACE_TEMPLATE[2], atol=0.6)


def write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "landmarks.tsv"
    path.write_text(body)
    return path


def test_reads_the_landmarks_file(tmp_path):
    row = "a/a_0001.jpg\t0.99\t" + "\t".join(str(v) for v in range(10)) + "\n"
    landmarks = read_landmarks(write(tmp_path, HEADER + row))
    assert list(landmarks) == ["a/a_0001.jpg"]
    assert landmarks["a/a_0001.jpg"].tolist() == np.arange(10.0).reshape(5, 2).tolist()


@pytest.mark.parametrize(
    "body, words",
    [
        ("path\tx1\ty1\n", "line 1: the header lacks x2, y2"),
        (HEADER + "a.jpg\t1\t1\t2\n", "line 2: 4 fields, the header has 12"),
        (HEADER + "a.jpg\t1\t1\t2\t3\t4\t5\t6\t7\t8\tnine\t10\n", "line 2: a coordinate is not"),
        (HEADER + "a.jpg\t1\t1\t2\t3\tnan\t5\t6\t7\t8\t9\t10\n", "line 2: a landmark is NaN"),
        (HEADER + "a.jpg" + "\t1" * 11 + "\n" + "a.jpg" + "\t1" * 11 + "\n", "line 3: a.jpg has a"),
        ("", "empty"),
    ],
    ids=["header", "fields", "not-a-number", "nan", "repeated", "empty"],
)
def test_a_bad_landmarks_file_is_one_line_naming_file_and_row(tmp_path, body, words):
    path = write(tmp_path, body)
    with pytest.raises(DataError) as error:
        read_landmarks(path)
    message = str(error.value)
    assert message.startswith(f"{path}") and words in message and "\n" not in message


def test_out_of_image_points_and_missing_images_are_named():
    image = Image.new("RGB", (100, 80))
    far = ARCFACE_TEMPLATE.copy()
    far[3] = [60.0, 150.0]  # 150 > 80 * 1.25: landmarks of another image
    with pytest.raises(ValueError, match=r"landmark 4 at \(60, 150\) lies outside the 100x80"):
        align_face(image, far)
    near = ARCFACE_TEMPLATE.copy()
    near[0] = [38.0, -10.0]  # a little outside, as a face cut by the frame gives: aligned
    assert align_face(image, near).size == (112, 112)
    known = {"a.jpg": ARCFACE_TEMPLATE}
    with pytest.raises(DataError, match=r"^lm.tsv: no landmarks for 2 image\(s\): b.jpg, c.jpg$"):
        landmarks_for(["a.jpg", "b.jpg", "c.jpg"], known, "lm.tsv")


def lfw_dev_faces() -> list[str]:
    """The photographs in the fixture's order (sorted, those without landmarks left out)."""
    return sorted(read_landmarks(LFW_DEV / "landmarks.tsv"))


@pytest.mark.skipif(
    not (LFW_DEV / "landmarks.tsv").is_file() or not (FIXTURE / "train.rec").is_file(),
    reason="no ../shared/data (lfw-dev and the insightface fixture)",
)
def test_lfw_dev_aligns_as_the_mxnet_fixture():
    """Our crops against MXNet's records of the same photographs: after the same JPEG encoding
    (quality 95) they are the same pixels; before it, JPEG's loss alone (about 0.7 grey levels)."""
    landmarks = read_landmarks(LFW_DEV / "landmarks.tsv")
    names = lfw_dev_faces()
    assert len(landmarks) == 1299
    reader = RecordFile(FIXTURE)
    raw, encoded = [], []
    for index in (0, 46, 300, 649, 1000, 1298):  # 46 and 649 are the multi-part records
        theirs, _ = reader[index]
        with Image.open(LFW_DEV / names[index]) as photo:
            ours = align_face(photo, landmarks[names[index]])
        assert ours.size == (112, 112) and ours.mode == "RGB"
        buffer = io.BytesIO()
        ours.save(buffer, "JPEG", quality=95)
        ours_jpeg = Image.open(buffer).convert("RGB")
        theirs = np.asarray(theirs, float)
        raw.append(np.abs(np.asarray(ours, float) - theirs).mean())
        encoded.append(np.abs(np.asarray(ours_jpeg, float) - theirs).mean())
    assert max(raw) < 1.5, raw  # grey levels of 255: the same alignment, JPEG's loss apart
    assert max(encoded) < 0.05, encoded
