"""Galleries: enroll people without retraining, identify them, reject people never enrolled.

On ORL: a model trained on s1-s24 (evaluate's threshold from its 8 unknown people) enrolls s25-s32
from five faces each and identifies their other
five (rank-1), while the faces of s33-s40, never enrolled, must be rejected (false accept rate at
evaluate's threshold). Search results equal a brute-force numpy search; bad input is one clear line
and never leaves a half-written gallery."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from serve_testing import ORL
from test_export import run_cli

from angular.eval import metrics as M
from angular.serve.gallery import (
    APPROXIMATE_MIN_SIZE,
    Gallery,
    GalleryError,
    build_index,
    enroll,
    identify,
    load_gallery,
    save_gallery,
)
from angular.serve.predict import PredictError, embed

ENROLLED = range(25, 33)  # never seen in training; five faces enrolled, five identified
NEVER_ENROLLED = range(33, 41)  # never seen in training nor enrolled: must be rejected


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("approximate", [False, True])
def test_search_finds_what_brute_force_finds(approximate):
    rng = np.random.default_rng(1)
    templates = unit(rng.standard_normal((3000, 32)))
    truth = rng.integers(0, len(templates), 200)
    queries = unit(templates[truth] + 0.15 * rng.standard_normal((200, 32)))
    scores, rows = build_index(templates, approximate=approximate).search(queries, 1)
    expected = (queries @ templates.T).argmax(axis=1)
    agreement = np.mean(rows[:, 0] == expected)
    assert agreement == 1.0 if not approximate else agreement >= 0.95
    hit = rows[:, 0] == expected
    np.testing.assert_allclose(
        scores[hit, 0], np.sum(queries[hit] * templates[rows[hit, 0]], axis=1), atol=1e-5
    )


def test_a_large_gallery_stores_and_uses_its_approximate_index(tmp_path):
    rng = np.random.default_rng(2)
    size = APPROXIMATE_MIN_SIZE
    gallery = Gallery(
        names=[f"p{i}" for i in range(size)],
        templates=unit(rng.standard_normal((size, 16))),
        counts=np.ones(size, np.int64),
        item="arcface",
        embedding_dim=16,
        fingerprint="f",
    )
    save_gallery(gallery, tmp_path / "g.npz")
    loaded = load_gallery(tmp_path / "g.npz")
    assert loaded.index_bytes is not None and loaded.names == gallery.names
    np.testing.assert_array_equal(loaded.templates, gallery.templates)


@pytest.fixture(scope="module")
def enrolment(orl_project, tmp_path_factory):
    """s21-s32 with their faces 1-5 to enroll; their faces 6-10 and every face of s33-s40 to
    identify."""
    folder = tmp_path_factory.mktemp("enrol")
    (folder / "enroll").mkdir()
    probes = []
    for index in ENROLLED:
        person = folder / "enroll" / f"s{index}"
        person.mkdir()
        for face in range(1, 6):
            (person / f"{face}.pgm").symlink_to(ORL.resolve() / f"s{index}" / f"{face}.pgm")
        probes += [(f"s{index}", ORL.resolve() / f"s{index}" / f"{f}.pgm") for f in range(6, 11)]
    for index in NEVER_ENROLLED:
        probes += [(None, ORL.resolve() / f"s{index}" / f"{f}.pgm") for f in range(1, 11)]
    return folder, probes


def test_orl_enroll_identify_rank1_and_false_accepts(orl_project, enrolment):
    folder, probes = enrolment
    model = orl_project / "outputs" / "models" / "arcface.pt"
    gallery_path = folder / "gallery.npz"
    # With the mirror images, as evaluate embedded the pairs its threshold comes from.
    gallery, added, replaced = enroll(model, folder / "enroll", gallery_path, flip_test=True)
    assert added == [f"s{i}" for i in sorted(ENROLLED, key=str)] and replaced == []
    assert list(gallery.counts) == [5] * len(ENROLLED)

    metrics = json.loads((orl_project / "metrics" / "evaluate.json").read_text())
    thresholds = metrics["verification"]["unknown"]["arcface"]
    threshold = thresholds["threshold@far=1e-2"]
    results = identify(model, gallery_path, [p for _, p in probes], threshold=threshold)

    # The same answers as a brute-force search of the templates.
    vectors = embed([p for _, p in probes], model_paths=[model], flip_test=True).vectors
    best = (vectors @ gallery.templates.T).argmax(axis=1)
    assert [r.closest for r in results] == [gallery.names[i] for i in best]

    enrolled = [(who, r) for (who, _), r in zip(probes, results) if who is not None]
    strangers = [r for (who, _), r in zip(probes, results) if who is None]
    rank1 = np.mean([r.closest == who for who, r in enrolled])
    identified = np.mean([r.identity == who for who, r in enrolled])
    false_accepts = np.mean([r.known for r in strangers])
    print(
        f"\nORL gallery: {len(ENROLLED)} people enrolled (5 faces each), "
        f"{len(enrolled)} probes: rank-1 {rank1:.3f}, identified at the threshold "
        f"{threshold:.4f} {identified:.3f}; {len(strangers)} faces of {len(NEVER_ENROLLED)} people "
        f"never enrolled: false accept rate {false_accepts:.3f}"
    )
    similarity = np.asarray([r.similarity for r in results])
    for far in ("1e-1", "1e-3"):
        other = thresholds[f"threshold@far={far}"]
        known = similarity >= other
        print(
            f"at evaluate's threshold@far={far} {other:.4f}: identified "
            f"{np.mean([r.closest == who and k for (who, r), k in zip(enrolled, known)]):.3f}, "
            f"false accept rate {np.mean(known[len(enrolled) :]):.3f}"
        )
    assert rank1 >= 0.6  # chance: 1/8
    # The threshold separates: enrolled people pass far more often than strangers. (The pairwise
    # FAR does not bound the open-set one: a stranger is compared with every template.)
    assert identified >= false_accepts + 0.3

    # Enrolling again replaces those people and adds new ones.
    (folder / "more").mkdir()
    shutil.copytree(folder / "enroll" / "s25", folder / "more" / "s25", symlinks=True)
    (folder / "more" / "s25" / "1.pgm").unlink()
    shutil.copytree(folder / "enroll" / "s26", folder / "more" / "new", symlinks=True)
    again, added, replaced = enroll(model, folder / "more", gallery_path, flip_test=True)
    assert added == ["new"] and replaced == ["s25"] and len(again) == len(ENROLLED) + 1
    assert again.counts[again.names.index("s25")] == 4
    np.testing.assert_allclose(
        again.templates[again.names.index("new")],
        again.templates[again.names.index("s26")],
        atol=1e-6,
    )


def test_identify_on_the_command_line_uses_evaluates_threshold(orl_project, enrolment):
    folder, probes = enrolment
    gallery = folder / "cli.npz"
    result = run_cli(
        "enroll", "outputs/models/arcface.pt", str(folder / "enroll"), "--gallery", str(gallery),
        "--flip-test", cwd=orl_project,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    images = [str(p) for _, p in probes[:3] + probes[-2:]]
    result = run_cli(
        "identify", "outputs/models/arcface.pt", "--gallery", str(gallery), "--json", *images,
        cwd=orl_project,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    metrics = json.loads((orl_project / "metrics" / "evaluate.json").read_text())
    expected = metrics["verification"]["unknown"]["arcface"]["threshold@far=1e-2"]
    assert document["threshold"] == expected and "FAR 0.01" in document["threshold_source"]
    assert [r["path"] for r in document["identifications"]] == images
    for entry in document["identifications"]:
        assert entry["known"] == (entry["similarity"] >= expected)
        assert entry["identity"] == (entry["closest"] if entry["known"] else "unknown")


def test_bad_input_is_a_clear_error_and_leaves_the_gallery_as_it_was(
    orl_project, enrolment, tmp_path
):
    folder, _ = enrolment
    model = orl_project / "outputs" / "models" / "arcface.pt"
    gallery = tmp_path / "g.npz"
    enroll(model, folder / "enroll", gallery)
    before = gallery.read_bytes()

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(GalleryError, match="no person sub-folders"):
        enroll(model, empty, gallery)
    (empty / "nobody").mkdir()
    with pytest.raises(PredictError, match="nobody: no image files in this folder"):
        enroll(model, empty, gallery)
    broken = tmp_path / "broken"
    shutil.copytree(folder / "enroll" / "s25", broken / "s25", symlinks=True)
    (broken / "s25" / "9.pgm").write_bytes(b"P5 not really an image")
    with pytest.raises(PredictError, match="9.pgm: cannot read the image"):
        enroll(model, broken, gallery)

    # Another model: the same network with one weight changed (same size, other fingerprint).
    document = torch.load(model, weights_only=True)
    name = next(k for k, v in document["state_dict"].items() if v.is_floating_point())
    document["state_dict"][name] = document["state_dict"][name] + 0.01
    other = tmp_path / "other.pt"
    torch.save(document, other)
    with pytest.raises(GalleryError, match="made with another model"):
        enroll(other, folder / "enroll", gallery)
    with pytest.raises(GalleryError, match="made with another model"):
        identify(other, gallery, [str(folder / "enroll" / "s25" / "1.pgm")], threshold=0.5)
    # A different embedding size.
    small = Gallery([], np.zeros((0, 8), np.float32), np.zeros(0, np.int64), "x", 8, "f")
    save_gallery(small, tmp_path / "small.npz")
    with pytest.raises(GalleryError, match="embeddings of size 8"):
        enroll(model, folder / "enroll", tmp_path / "small.npz")
    assert gallery.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []

    (tmp_path / "junk.npz").write_bytes(b"junk")
    result = run_cli(
        "identify", str(model), "--gallery", str(tmp_path / "junk.npz"), "--threshold", "0.5",
        str(folder / "enroll" / "s25" / "1.pgm"), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1 and "junk.npz: not a readable gallery" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    result = run_cli("enroll", str(model), str(empty), "--gallery", str(gallery), cwd=tmp_path)
    assert result.returncode == 1 and "nobody: no image files" in result.stderr
    assert gallery.read_bytes() == before


def test_the_threshold_at_a_far_is_the_lowest_that_keeps_it():
    rng = np.random.default_rng(3)
    similarity = rng.uniform(-1, 1, 1000)
    similarity[:10] = similarity[10]  # ties
    same = rng.random(1000) < 0.3
    impostor = similarity[~same]
    for far, threshold in zip(
        (0.1, 0.01, 0.001), M.thresholds_at_far(similarity, same, (0.1, 0.01, 0.001)).values()
    ):
        assert np.mean(impostor >= threshold) <= far
        below = np.nextafter(threshold, -np.inf)
        assert np.mean(impostor >= below) > far


def test_thresholds_at_far_need_an_impostor_pair():
    with pytest.raises(ValueError, match="no impostor pair"):
        M.thresholds_at_far(np.array([0.5, 0.7]), np.array([True, True]), (0.1,))
    # FAR 1 accepts every impostor.
    found = M.thresholds_at_far(np.array([0.5, 0.7, 0.1]), np.array([True, False, False]), (1.0,))
    assert found["threshold@far=1e0"] <= 0.1
