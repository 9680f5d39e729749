"""IJB-style template verification (angular.eval.templates): pooling against an fp64 loop written
here as eval_ijbc.py pools (per template, per media), the three protocol files read back as
written, TAR and AUC against a scan of every threshold, each bad file as one line naming the file
and line, and a small IJB-style set built from lfw-dev's photographs (when ../shared is there)."""

from __future__ import annotations

import math
import re
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from angular.data import DataError
from angular.eval.templates import (
    TemplateError,
    TemplatePairs,
    pool_templates,
    read_face_scores,
    read_template_media,
    read_template_pairs,
    template_similarity,
    template_verification,
)
from angular.train.templates import verify_templates

REPO = Path(__file__).resolve().parents[2]
LFW_DEV = REPO / "../shared/data/lfw-dev"
FARS = (1e-1, 1e-2)


# --- references --------------------------------------------------------------------------------


def reference_pool(embeddings, templates, medias, weights=None, flipped=None, norm_score=False):
    """eval_ijbc's image2template_feature, in fp64 loops: {template: unit embedding}."""
    features = np.asarray(embeddings, np.float64)
    if flipped is not None:
        features = features + np.asarray(flipped, np.float64)
    if not norm_score:
        features = features / np.sqrt((features**2).sum(axis=1, keepdims=True))
    if weights is not None:
        features = features * np.asarray(weights, np.float64)[:, None]
    pooled = {}
    for template in sorted(set(templates.tolist())):
        in_template = templates == template
        media_means = [
            features[in_template & (medias == media)].mean(axis=0)
            for media in sorted(set(medias[in_template].tolist()))
        ]
        total = np.sum(media_means, axis=0)  # eval_ijbc sums the media: the same after normalising
        pooled[template] = total / np.linalg.norm(total)
    return pooled


def reference_tar_auc(similarity, same, fars):
    genuine, impostor = similarity[same], similarity[~same]
    auc = (genuine[:, None] > impostor[None, :]).mean()
    auc += 0.5 * (genuine[:, None] == impostor[None, :]).mean()
    tars = {}
    for far in fars:
        best = 0.0
        for t in np.r_[np.unique(similarity), np.inf]:
            if (impostor >= t).mean() <= far:
                best = max(best, (genuine >= t).mean())
        tars[far] = best if len(impostor) * far >= 1 else math.nan
    return auc, tars


def random_protocol(rng, n_images=300, n_templates=25, dim=8):
    """Templates with 1-4 media of 1-5 images (some single-image media, some single-media
    templates), ids neither contiguous nor sorted, one media id reused by two templates."""
    templates = rng.choice(rng.permutation(10_000)[:n_templates], size=n_images)
    medias = rng.integers(0, 4, size=n_images) + 10 * templates
    medias[templates == templates[0]] = 7  # a media id that another template also uses
    medias[templates == templates[1]] = 7
    identity = {t: rng.normal(size=dim) for t in np.unique(templates)}
    embeddings = np.stack([identity[t] for t in templates]) + rng.normal(size=(n_images, dim))
    return embeddings.astype(np.float32), templates, medias


# --- pooling and scoring -------------------------------------------------------------------------


@pytest.mark.parametrize("norm_score", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("flip", [False, True])
def test_pooling_matches_eval_ijbc(weighted, flip, norm_score):
    rng = np.random.default_rng(int(weighted) * 4 + int(flip) * 2 + int(norm_score))
    embeddings, templates, medias = random_protocol(rng)
    embeddings *= rng.uniform(0.5, 3.0, size=(len(embeddings), 1)).astype(np.float32)  # norms
    weights = rng.uniform(0.1, 1.0, size=len(templates)) if weighted else None
    flipped = rng.normal(size=embeddings.shape) if flip else None
    ids, unit = pool_templates(
        embeddings,
        templates,
        medias,
        weights=weights,
        flipped=flipped,
        normalize_images=not norm_score,
    )
    expected = reference_pool(embeddings, templates, medias, weights, flipped, norm_score)
    assert ids.tolist() == sorted(expected)
    np.testing.assert_allclose(unit, np.stack([expected[t] for t in ids]), rtol=0, atol=1e-13)
    assert unit.dtype == np.float64


def test_pooling_edges_one_image_and_weights_that_matter():
    one = pool_templates(np.array([[3.0, 4.0]]), [5], [9])
    assert one[0].tolist() == [5] and np.allclose(one[1], [[0.6, 0.8]])
    # One template, two media: one image along x, three along y. Media are averaged first, so x
    # and y count alike; weighting the x image 3x tilts the template toward x.
    embeddings = np.array([[1.0, 0.0], [0.0, 2.0], [0.0, 5.0], [0.0, 1.0]])
    _, unit = pool_templates(embeddings, [1, 1, 1, 1], [0, 1, 1, 1])
    np.testing.assert_allclose(unit, [[math.sqrt(0.5), math.sqrt(0.5)]], atol=1e-15)
    _, unit = pool_templates(embeddings, [1, 1, 1, 1], [0, 1, 1, 1], weights=[3.0, 1, 1, 1])
    np.testing.assert_allclose(unit, [[3 / math.sqrt(10), 1 / math.sqrt(10)]], atol=1e-15)


def write_protocol(folder: Path, names, templates, medias, pairs, landmarks=None, scores=None):
    """The three files, written as IJB-C's are (space-separated, one record a line)."""
    media_path = folder / "ijbc_face_tid_mid.txt"
    media_path.write_text(
        "".join(f"{n} {t} {m}\n" for n, t, m in zip(names, templates, medias)), encoding="utf-8"
    )
    pairs_path = folder / "ijbc_template_pair_label.txt"
    pairs_path.write_text("".join(f"{a} {b} {int(s)}\n" for a, b, s in pairs), encoding="utf-8")
    scores_path = None
    if landmarks is not None:
        scores_path = folder / "ijbc_name_5pts_score.txt"
        scores_path.write_text(
            "".join(
                f"{n} " + " ".join(f"{v:.2f}" for v in points.ravel()) + f" {score:.4f}\n"
                for n, points, score in zip(names, landmarks, scores)
            ),
            encoding="utf-8",
        )
    return media_path, pairs_path, scores_path


def all_pairs(ids, owner):
    a, b = np.triu_indices(len(ids), k=1)
    return [(ids[i], ids[j], owner[ids[i]] == owner[ids[j]]) for i, j in zip(a, b)]


def test_files_read_back_and_verification_against_references(tmp_path):
    rng = np.random.default_rng(5)
    embeddings, templates, medias = random_protocol(rng, n_images=400, n_templates=40)
    names = [f"img/{index}.jpg" for index in range(len(templates))]
    ids = np.unique(templates)
    owner = {t: int(rng.integers(0, 12)) for t in ids}  # templates of one of 12 people
    person = rng.normal(size=(12, embeddings.shape[1]))
    embeddings = np.stack([person[owner[t]] for t in templates])
    embeddings += 1.5 * rng.normal(size=embeddings.shape)
    landmarks = rng.uniform(0, 200, size=(len(names), 5, 2))
    scores = rng.uniform(0.2, 1.0, size=len(names))
    media_path, pairs_path, scores_path = write_protocol(
        tmp_path, names, templates, medias, all_pairs(ids, owner), landmarks, scores
    )
    media_list = read_template_media(media_path)
    assert media_list.names == tuple(names)
    assert media_list.templates.tolist() == templates.tolist()
    assert media_list.medias.tolist() == medias.tolist()
    pairs = read_template_pairs(pairs_path)
    assert len(pairs.same) == len(ids) * (len(ids) - 1) // 2 and pairs.lines[-1] == len(pairs.same)
    face_scores = read_face_scores(scores_path)
    np.testing.assert_allclose(face_scores.landmarks, np.round(landmarks, 2), atol=1e-9)
    np.testing.assert_allclose(face_scores.scores, np.round(scores, 4), atol=1e-12)

    found = template_verification(embeddings, media_list, pairs, fars=FARS, face_scores=face_scores)
    pooled = reference_pool(embeddings, templates, medias, face_scores.scores)
    similarity = np.array([pooled[a] @ pooled[b] for a, b in zip(pairs.first, pairs.second)])
    auc, tars = reference_tar_auc(similarity, pairs.same, FARS)
    assert found["auc"] == pytest.approx(auc, abs=1e-12)
    for far in FARS:
        key = f"tar@far={far:.0e}".replace("e-0", "e-")
        assert found[key] == pytest.approx(tars[far], abs=1e-12), key
    assert found["n_templates"] == len(ids) and found["n_genuine"] == pairs.same.sum()
    assert found["auc"] > 0.8  # the templates of one person share their person's vector
    weighted = pool_templates(embeddings, templates, medias, weights=face_scores.scores)
    np.testing.assert_allclose(template_similarity(*weighted, pairs), similarity, atol=1e-13)


def test_blank_lines_keep_the_line_numbers(tmp_path):
    (tmp_path / "pairs.txt").write_text("1 2 1\n\n1 3 0\n", encoding="utf-8")
    pairs = read_template_pairs(tmp_path / "pairs.txt")
    assert pairs.first.tolist() == [1, 1] and pairs.second.tolist() == [2, 3]
    assert pairs.same.tolist() == [True, False] and pairs.lines.tolist() == [1, 3]
    (tmp_path / "plain.txt").write_text("1 2 1\n1 3 0", encoding="utf-8")  # no final newline
    plain = read_template_pairs(tmp_path / "plain.txt")
    assert plain.first.tolist() == [1, 1] and plain.lines.tolist() == [1, 2]
    ids, unit = pool_templates(np.eye(3), [1, 2, 9], [0, 0, 0])
    with pytest.raises(TemplateError, match=r"^\S*pairs\.txt: line 3: template 3 is not in "):
        template_similarity(ids, unit, pairs)


# --- bad input: one line naming the file and line ------------------------------------------------


@pytest.mark.parametrize(
    ("reader", "text", "message"),
    [
        (read_template_media, "a.jpg 1 2\nb.jpg 1\n", r"line 2: expected 'image_name template_id"),
        (read_template_media, "a.jpg 1 2\n\nb.jpg x 3\n", r"line 3: the template id 'x' is not an"),
        (read_template_media, "a.jpg 1 2.5\n", r"line 1: the media id '2.5' is not an integer"),
        (read_template_media, "\n\n", r"no images$"),
        (read_template_pairs, "1 2 1\n3 4 2\n", r"line 2: the label must be 1 or 0, got 2$"),
        (read_template_pairs, "1 2 1\n3 4\n", r"line 2: expected 'template_1 template_2 label'"),
        (read_template_pairs, "1 2 1\n\n3 b 0\n", r"line 3: the template id 'b' is not an"),
        (read_template_pairs, "", r"no pairs$"),
        (read_face_scores, "a.jpg 1 2 3 4 5 6 7 8 9 10\n", r"line 1: expected 'image_name x1 y1"),
        (read_face_scores, "a.jpg 1 2 3 4 5 6 7 8 9 x 0.9\n", r"line 1: the landmarks and score"),
        (read_face_scores, "a.jpg 1 2 3 4 5 6 7 8 9 nan 0.9\n", r"line 1: .* must be finite"),
        (read_face_scores, "a.jpg 1 2 3 4 5 6 7 8 9 10 -1\n", r"line 1: .* the score >= 0"),
    ],
)
def test_a_bad_line_is_one_error_naming_file_and_line(tmp_path, reader, text, message):
    path = tmp_path / "protocol.txt"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(TemplateError, match=f"^{re.escape(str(path))}: " + message) as caught:
        reader(path)
    assert "\n" not in str(caught.value)


def test_missing_file_and_files_that_disagree(tmp_path):
    with pytest.raises(TemplateError, match=r"^\S*nothing\.txt: cannot read"):
        read_template_pairs(tmp_path / "nothing.txt")
    with pytest.raises(TemplateError, match=r"^\S*nothing\.txt: cannot read"):
        read_template_media(tmp_path / "nothing.txt")
    media_path, pairs_path, scores_path = write_protocol(
        tmp_path,
        ["a.jpg", "b.jpg", "c.jpg"],
        [1, 1, 2],
        [0, 1, 2],
        [(1, 2, False), (2, 1, False), (1, 1, True), (2, 5, False)],
        np.zeros((3, 5, 2)),
        [1.0, 1.0, 1.0],
    )
    media_list, pairs = read_template_media(media_path), read_template_pairs(pairs_path)
    embeddings = np.random.default_rng(6).normal(size=(3, 4))
    with pytest.raises(TemplateError, match=r"pair_label\.txt: line 4: template 5 is not in \S*"):
        template_verification(embeddings, media_list, pairs, folds=2)
    with pytest.raises(ValueError, match=r"^embeddings has 2 rows; \S*tid_mid\.txt lists 3 images"):
        template_verification(embeddings[:2], media_list, pairs)
    scores_path.write_text(
        scores_path.read_text(encoding="utf-8").replace("b.jpg", "x.jpg"), encoding="utf-8"
    )
    with pytest.raises(TemplateError, match=r"5pts_score\.txt: line 2: image 'x\.jpg', but line 2"):
        template_verification(
            embeddings, media_list, pairs, face_scores=read_face_scores(scores_path)
        )


# --- a small IJB-style set from lfw-dev ----------------------------------------------------------


def face_embedding(path: Path, points: np.ndarray) -> np.ndarray:
    """A crude embedding: the aligned face, grey, 16 x 16, centred (no network needed)."""
    from angular.data import align_face

    with Image.open(path) as image:
        face = align_face(image, points, 112).convert("L")
    vector = np.asarray(face.resize((16, 16), Image.Resampling.BILINEAR), np.float64).ravel()
    return vector - vector.mean()


@pytest.mark.skipif(not (LFW_DEV / "landmarks.tsv").is_file(), reason="no ../shared/data/lfw-dev")
def test_an_ijb_style_set_built_from_lfw_dev(tmp_path):
    """16 people with 8 photographs: two templates each of 4 photographs in 2 media of 2, the
    three files written in IJB-C's formats (landmarks and scores from lfw-dev's landmarks.tsv),
    every template pair scored: pooling as the reference, and well above chance."""
    from angular.data import read_landmarks

    landmarks = read_landmarks(LFW_DEV / "landmarks.tsv")
    scores = {}
    for line in (LFW_DEV / "landmarks.tsv").read_text(encoding="utf-8").splitlines()[1:]:
        fields = line.split("\t")
        scores[fields[0]] = float(fields[1])
    people: dict[str, list[str]] = {}
    for name in sorted(landmarks):
        people.setdefault(name.split("/")[0], []).append(name)
    chosen = [person for person in sorted(people) if len(people[person]) >= 8][:16]
    assert len(chosen) == 16
    names, templates, medias, owner = [], [], [], {}
    template, media = 100, 5000
    for person in chosen:
        photos = people[person][:8]
        for half in (photos[:4], photos[4:]):
            template += 7
            owner[template] = person
            for group in (half[:2], half[2:]):
                media += 1
                names += group
                templates += [template] * len(group)
                medias += [media] * len(group)
    ids = sorted(owner)
    media_path, pairs_path, scores_path = write_protocol(
        tmp_path,
        names,
        templates,
        medias,
        all_pairs(ids, owner),
        [landmarks[n] for n in names],
        [scores[n] for n in names],
    )
    media_list = read_template_media(media_path)
    face_scores = read_face_scores(scores_path)
    pairs = read_template_pairs(pairs_path)
    embeddings = np.stack(
        [face_embedding(LFW_DEV / n, face_scores.landmarks[i]) for i, n in enumerate(names)]
    )
    pooled_ids, unit = pool_templates(
        embeddings, media_list.templates, media_list.medias, weights=face_scores.scores
    )
    expected = reference_pool(embeddings, np.array(templates), np.array(medias), face_scores.scores)
    np.testing.assert_allclose(unit, np.stack([expected[t] for t in pooled_ids]), atol=1e-13)
    found = template_verification(embeddings, media_list, pairs, fars=FARS, face_scores=face_scores)
    assert found["n_genuine"] == 16 and found["n_impostor"] == 31 * 16 - 16
    assert found["n_templates"] == 32
    assert found["auc"] > 0.7  # crude pixels of aligned faces, but templates of one person agree
    assert found["tar@far=1e-1"] > 0.3  # chance would be 0.1
    similarity = template_similarity(pooled_ids, unit, pairs)
    auc, tars = reference_tar_auc(similarity, pairs.same, FARS)
    assert found["auc"] == pytest.approx(auc, abs=1e-12)
    assert found["tar@far=1e-1"] == pytest.approx(tars[1e-1], abs=1e-12)
    # Swapping the labels turns the ranking around: AUC becomes 1 - AUC.
    swapped = TemplatePairs(pairs.path, pairs.first, pairs.second, ~pairs.same, pairs.lines)
    flipped_labels = template_verification(embeddings, media_list, swapped, fars=FARS)
    unweighted = template_verification(embeddings, media_list, pairs, fars=FARS)
    assert flipped_labels["auc"] == pytest.approx(1 - unweighted["auc"], abs=1e-12)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(flipped=np.ones((4, 2))), r"^flipped has shape \(4, 2\), embeddings \(4, 3\)$"),
        (dict(weights=[1.0, 2.0]), r"^weights has 2 entries for 4 images$"),
        (dict(weights=[1.0, np.nan, 1.0, 1.0]), r"^weights must be finite"),
        (dict(templates=[1, 1, 2]), r"^embeddings \(4 rows\), templates \(3\) and medias \(4\)"),
        (dict(templates=[1, 1.5, 2, 2]), r"^templates"),
        (dict(embeddings=np.full((4, 3), np.inf)), r"^embeddings must be finite"),
    ],
)
def test_pooling_refuses_bad_arrays(change, message):
    arguments = dict(
        embeddings=np.random.default_rng(7).normal(size=(4, 3)),
        templates=[1, 1, 2, 2],
        medias=[0, 1, 0, 0],
    )
    arguments.update(change)
    with pytest.raises(ValueError, match=message):
        pool_templates(**arguments)


# --- with a model: angular.train.templates ------------------------------------------------------


def pixel_embed(images: torch.Tensor) -> torch.Tensor:
    """A stand-in model: the normalised image at 16 x 16, grey, centred."""
    grey = torch.nn.functional.interpolate(images.mean(1, keepdim=True), size=(16, 16))
    flat = grey.flatten(1)
    return flat - flat.mean(1, keepdim=True)


@pytest.mark.skipif(not (LFW_DEV / "landmarks.tsv").is_file(), reason="no ../shared/data/lfw-dev")
def test_verify_templates_runs_a_model_on_the_aligned_photographs(tmp_path):
    """lfw-dev photographs as an IJB-style set: verify_templates against the same pipeline done
    here by hand (align_face, numpy normalisation, the stand-in model, template_verification)."""
    from angular.data import align_face, read_landmarks

    landmarks = read_landmarks(LFW_DEV / "landmarks.tsv")
    people: dict[str, list[str]] = {}
    for name in sorted(landmarks):
        people.setdefault(name.split("/")[0], []).append(name)
    chosen = [person for person in sorted(people) if len(people[person]) >= 6][:6]
    names, templates, medias, owner = [], [], [], {}
    for p, person in enumerate(chosen):
        for half in range(2):
            owner[10 * p + half] = person
            photos = people[person][3 * half : 3 * half + 3]
            names += photos
            templates += [10 * p + half] * 3
            medias += [100 * p + 10 * half, 100 * p + 10 * half, 100 * p + 10 * half + 1]
    scores = np.linspace(0.5, 1.0, len(names))
    files = write_protocol(
        tmp_path,
        names,
        templates,
        medias,
        all_pairs(sorted(owner), owner),
        [landmarks[n] for n in names],
        scores,
    )
    data = types.SimpleNamespace(image_size=(112, 112), channels=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    found = verify_templates(pixel_embed, LFW_DEV, *files, data, FARS, batch_size=5)

    face_scores = read_face_scores(files[2])
    faces = np.stack(
        [
            np.asarray(align_face(Image.open(LFW_DEV / n), face_scores.landmarks[i]))
            for i, n in enumerate(names)
        ]
    )
    inputs = torch.from_numpy(((faces / 255.0 - 0.5) / 0.5).transpose(0, 3, 1, 2)).float()
    with torch.no_grad():
        embeddings, flipped = pixel_embed(inputs).numpy(), pixel_embed(inputs.flip(-1)).numpy()
    expected = template_verification(
        embeddings,
        read_template_media(files[0]),
        read_template_pairs(files[1]),
        fars=FARS,
        face_scores=face_scores,
        flipped=flipped,
        normalize_images=False,
    )
    assert found.keys() == expected.keys()
    for key, value in expected.items():
        assert found[key] == pytest.approx(value, abs=1e-6, nan_ok=True), key
    assert found["n_templates"] == 12 and found["n_genuine"] == 6


def test_verify_templates_checks_every_file_before_embedding(tmp_path):
    calls = []

    def embed(images):
        calls.append(len(images))
        return images.flatten(1)[:, :4]

    image = tmp_path / "faces" / "a.png"
    image.parent.mkdir()
    Image.fromarray(np.full((60, 50, 3), 128, np.uint8)).save(image)
    points = np.array([[15, 20], [35, 20], [25, 30], [18, 42], [32, 42]], float)
    data = types.SimpleNamespace(image_size=(112, 112), channels=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    files = write_protocol(
        tmp_path,
        ["a.png", "b.png"],
        [1, 2],
        [1, 2],
        [(1, 2, False), (1, 3, True)],
        [points, points],
        [0.9, 0.8],
    )
    with pytest.raises(
        DataError, match=r"pair_label\.txt: line 2: template 3 is not in \S*tid_mid"
    ):
        verify_templates(embed, tmp_path / "faces", *files, data, FARS)
    assert calls == []
    files = write_protocol(
        tmp_path,
        ["a.png", "b.png"],
        [1, 2],
        [1, 2],
        [(1, 2, False), (1, 1, True)],
        [points, points],
        [0.9, 0.8],
    )
    with pytest.raises(DataError, match=r"^\S*faces/b\.png: cannot read the image"):
        verify_templates(embed, tmp_path / "faces", *files, data, FARS, folds=2)
    far_out = points + 500
    files = write_protocol(
        tmp_path,
        ["a.png", "b.png"],
        [1, 2],
        [1, 2],
        [(1, 2, False), (1, 1, True)],
        [far_out, points],
        [0.9, 0.8],
    )
    with pytest.raises(DataError, match=r"5pts_score\.txt: line 1: a\.png: landmark 1 at"):
        verify_templates(embed, tmp_path / "faces", *files, data, FARS, folds=2)
