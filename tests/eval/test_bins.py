"""insightface's verification protocol (angular.eval.bins) against an fp64 re-implementation of
arcface_torch's eval/verification.py written here (scikit-learn's KFold for the folds, the
threshold grid by brute force, AUC by Mann-Whitney, TAR by scanning every threshold), on fresh
random embeddings; and the sets run through a model (angular.train.bins): preprocessing against
PIL and numpy, the cache, eval mode, bad files as one line, and lfw-dev.bin when ../shared is
there."""

from __future__ import annotations

import io
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.model_selection import KFold

from angular.data import DataError, load_image, read_bin, write_bin
from angular.eval.bins import bin_metrics, flip_embeddings, insightface_folds
from angular.train import bins as train_bins
from angular.train.bins import bin_inputs, bin_pixels, embed_bin, verify_bins

REPO = Path(__file__).resolve().parents[2]
FIXTURE_BIN = REPO / "../shared/data/insightface/lfw-dev.bin"
FARS = (1e-1, 1e-2, 1e-3)


# --- the reference ---------------------------------------------------------------------------


def reference_metrics(embeddings, flipped, same, fars, folds=10) -> dict[str, float]:
    """arcface_torch's test() and calculate_roc(), plus AUC / TAR over all pairs, in fp64."""
    e = np.asarray(embeddings, dtype=np.float64)
    if flipped is not None:
        e = e + np.asarray(flipped, dtype=np.float64)
    e = e / np.sqrt((e**2).sum(axis=1, keepdims=True))
    e1, e2 = e[0::2], e[1::2]
    dist = ((e1 - e2) ** 2).sum(axis=1)
    thresholds = np.arange(0, 4, 0.01)
    accuracy = []
    for train, test in KFold(n_splits=folds, shuffle=False).split(np.arange(len(same))):
        train_accuracy = [np.mean((dist[train] < t) == same[train]) for t in thresholds]
        best = thresholds[int(np.argmax(train_accuracy))]
        accuracy.append(np.mean((dist[test] < best) == same[test]))
    similarity = (e1 * e2).sum(axis=1)
    genuine, impostor = similarity[same], similarity[~same]
    greater = (genuine[:, None] > impostor[None, :]).mean()
    ties = (genuine[:, None] == impostor[None, :]).mean()
    result = {
        "accuracy": np.mean(accuracy),
        "accuracy_std": np.std(accuracy),
        "auc": greater + 0.5 * ties,
    }
    for far in fars:
        best_tar = 0.0
        for t in np.r_[np.unique(similarity), np.inf]:
            if (impostor >= t).mean() <= far:
                best_tar = max(best_tar, (genuine >= t).mean())
        result[f"tar@{far_key_reference(far)}"] = best_tar if len(impostor) * far >= 1 else math.nan
    return result


def far_key_reference(far: float) -> str:
    return "far=" + {1e-1: "1e-1", 1e-2: "1e-2", 1e-3: "1e-3", 0.5: "5e-1", 1e-6: "1e-6"}[far]


def random_pairs(rng, n_pairs: int, dim: int = 16, noise: float = 1.0, genuine_share=0.5):
    """(2P, D) embeddings whose genuine pairs share a base vector, and same (P,)."""
    same = rng.random(n_pairs) < genuine_share
    base = rng.normal(size=(n_pairs, dim))
    first = base + noise * rng.normal(size=(n_pairs, dim))
    other = np.where(same[:, None], base, rng.normal(size=(n_pairs, dim)))
    second = other + noise * rng.normal(size=(n_pairs, dim))
    embeddings = np.empty((2 * n_pairs, dim))
    embeddings[0::2], embeddings[1::2] = first, second
    return embeddings.astype(np.float32), same


def assert_matches(found: dict, expected: dict):
    for key, value in expected.items():
        if math.isnan(value):
            assert math.isnan(found[key]), key
        else:
            assert found[key] == pytest.approx(value, abs=1e-12), key


# --- the metrics -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seed", "n_pairs", "folds", "flip"),
    [(0, 600, 10, True), (1, 203, 10, False), (2, 97, 7, True), (3, 2000, 10, True)],
)
def test_bin_metrics_match_insightface_on_random_embeddings(seed, n_pairs, folds, flip):
    rng = np.random.default_rng(seed)
    embeddings, same = random_pairs(rng, n_pairs, genuine_share=rng.uniform(0.3, 0.7))
    flipped = (embeddings + 0.5 * rng.normal(size=embeddings.shape)).astype(np.float32)
    flipped = flipped if flip else None
    found = bin_metrics(embeddings, flipped, same, FARS, folds)
    assert_matches(found, reference_metrics(embeddings, flipped, same, FARS, folds))
    assert found["n_genuine"] == same.sum() and found["n_impostor"] == (~same).sum()
    assert 0.5 < found["accuracy"] < 1.0  # informative but imperfect embeddings
    assert "threshold" not in found


def test_ties_in_distances_and_thresholds():
    """Few distinct embeddings: many pairs share a distance, many grid thresholds share the best
    training accuracy (insightface keeps the first); AUC and TAR count tied similarities."""
    rng = np.random.default_rng(4)
    # Rows of norm 2 (entries +-1) or 4 (one +-4): unit entries and their dot products are exact,
    # so tied pairs tie in every implementation, not only up to rounding.
    signs = rng.choice([-1.0, 1.0], size=(4, 4))
    palette = np.vstack([signs, 4.0 * np.eye(4)[:2], -4.0 * np.eye(4)[2:3]]).astype(np.float32)
    embeddings = palette[rng.integers(0, len(palette), size=400)]
    same = rng.random(200) < 0.5
    found = bin_metrics(embeddings, None, same, FARS, 10)
    assert_matches(found, reference_metrics(embeddings, None, same, FARS, 10))
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    assert len(np.unique((unit[0::2] * unit[1::2]).sum(1))) <= 9  # 200 pairs, a few values


def test_the_folds_are_kfolds_without_shuffling():
    for n_pairs, folds in [(600, 10), (203, 10), (7, 7), (11, 2), (6000, 10)]:
        expected = np.empty(n_pairs, dtype=np.int64)
        for fold, (_, test) in enumerate(KFold(folds, shuffle=False).split(np.arange(n_pairs))):
            expected[test] = fold
        np.testing.assert_array_equal(insightface_folds(n_pairs, folds), expected)


def test_the_flip_test_adds_raw_embeddings_then_normalises():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(6, 3)), 3.0 * rng.normal(size=(6, 3))
    expected = (a + b) / np.linalg.norm(a + b, axis=1, keepdims=True)
    np.testing.assert_allclose(flip_embeddings(a, b), expected, rtol=1e-14)
    np.testing.assert_allclose(
        flip_embeddings(a), a / np.linalg.norm(a, axis=1, keepdims=True), rtol=1e-14
    )


def test_fars_above_and_below_what_the_pairs_resolve():
    rng = np.random.default_rng(6)
    embeddings, same = random_pairs(rng, 300)
    fars = (0.5, 1e-1, 1e-6)
    found = bin_metrics(embeddings, None, same, fars, 10)
    assert_matches(found, reference_metrics(embeddings, None, same, fars, 10))
    assert found["resolvable@far=5e-1"] == 1.0 and found["tar@far=5e-1"] >= found["tar@far=1e-1"]
    assert found["resolvable@far=1e-6"] == 0.0 and math.isnan(found["tar@far=1e-6"])


def test_the_smallest_set_two_pairs_two_folds():
    embeddings = np.array([[1, 0], [1, 0.1], [1, 0], [0, 1]], dtype=np.float32)
    same = np.array([True, False])
    found = bin_metrics(embeddings, None, same, (0.5,), 2)
    assert_matches(found, reference_metrics(embeddings, None, same, (0.5,), 2))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(same=np.ones(5, bool)), r"^same has no impostor \(False\) pair"),
        (dict(same=np.zeros(5, bool)), r"^same has no genuine \(True\) pair"),
        (dict(folds=6), r"^folds \(6\) must not exceed the number of pairs \(5\)$"),
        (dict(folds=1), r"^folds must be an integer >= 2, got 1$"),
        (dict(embeddings=np.ones((9, 4))), r"^embeddings has 9 rows for 5 pairs"),
        (dict(flipped=np.ones((10, 3))), r"^flipped has shape \(10, 3\), embeddings \(10, 4\)"),
        (dict(embeddings=np.full((10, 4), np.nan)), r"^embeddings must be finite"),
        (dict(fars=(1.5,)), r"^fars must lie in \(0, 1\), got 1.5$"),
    ],
)
def test_bad_input_is_one_line(change, message):
    rng = np.random.default_rng(7)
    arguments = dict(
        embeddings=rng.normal(size=(10, 4)),
        flipped=None,
        same=np.array([True, False, True, False, True]),
        fars=FARS,
        folds=5,
    )
    arguments.update(change)
    with pytest.raises(ValueError, match=message):
        bin_metrics(**arguments)


# --- sets run through a model ----------------------------------------------------------------

RGB_112 = SimpleNamespace(image_size=(112, 112), channels=3, mean=(0.5, 0.4, 0.3), std=(0.2,) * 3)
GREY_SMALL = SimpleNamespace(image_size=(40, 32), channels=1, mean=(0.45,), std=(0.25,))


def random_faces(rng, n: int, height=112, width=112) -> np.ndarray:
    return rng.integers(0, 256, size=(n, height, width, 3), dtype=np.uint8)


def test_bin_inputs_in_the_model_format_is_numpy_fp64():
    images = random_faces(np.random.default_rng(8), 3)
    found = bin_inputs(images, RGB_112)
    mean, std = np.array(RGB_112.mean), np.array(RGB_112.std)
    expected = (images.astype(np.float64) / 255.0 - mean) / std
    assert found.dtype == torch.float32 and found.shape == (3, 3, 112, 112)
    np.testing.assert_allclose(found.numpy(), expected.transpose(0, 3, 1, 2), atol=1e-6)


def test_bin_inputs_convert_as_pil_and_load_image_do(tmp_path):
    """Grey and resized: what PIL's luma and bilinear resize give, and what load_image gives for
    the same face saved as a PNG file (the path training images take)."""
    images = random_faces(np.random.default_rng(9), 2, 60, 50)
    found = bin_pixels(images, GREY_SMALL)
    assert found.dtype == torch.uint8 and found.shape == (2, 1, 40, 32)
    for index, image in enumerate(images):
        pil = Image.fromarray(image).convert("L").resize((32, 40), Image.Resampling.BILINEAR)
        np.testing.assert_array_equal(found[index, 0].numpy(), np.asarray(pil))
        Image.fromarray(image).save(tmp_path / f"{index}.png")
        from_file = load_image(tmp_path / f"{index}.png", image_size=(40, 32), channels=1)
        assert torch.equal(found[index], from_file)
    inputs = bin_inputs(images, GREY_SMALL)
    expected = (found.double() / 255.0 - 0.45) / 0.25
    np.testing.assert_allclose(inputs.numpy(), expected.numpy(), atol=1e-6)


@pytest.mark.parametrize(
    "images", [np.zeros((2, 8, 8), np.uint8), np.zeros((2, 8, 8, 3), np.float32)]
)
def test_bin_inputs_refuse_other_arrays(images):
    with pytest.raises(ValueError, match=r"^images must be \(N, height, width, 3\) uint8 RGB"):
        bin_inputs(images, RGB_112)


def png(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


def write_random_bin(path: Path, rng, n_pairs: int, size=(24, 20)) -> tuple[np.ndarray, np.ndarray]:
    """A .bin whose genuine pairs are one face with a little noise, impostors two faces."""
    same = rng.random(n_pairs) < 0.5
    same[:2] = [True, False]
    images = []
    for flag in same:
        first = random_faces(rng, 1, *size)[0]
        other = first if flag else random_faces(rng, 1, *size)[0]
        noise = rng.integers(-20, 21, size=other.shape)
        images += [first, np.clip(other.astype(int) + noise, 0, 255).astype(np.uint8)]
    write_bin(path, [png(image) for image in images], same.tolist())
    return np.stack(images), same


class Projection(torch.nn.Module):
    """A fixed random linear embedding (with a BatchNorm, so that eval mode matters)."""

    def __init__(self, channels: int, height: int, width: int, dim: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(channels * height * width, dim)
        self.norm = torch.nn.BatchNorm1d(dim)
        self.calls = 0

    def forward(self, images):
        self.calls += 1
        assert not torch.is_grad_enabled()
        return self.norm(self.linear(images.flatten(1)))


@pytest.mark.parametrize("flip", [True, False])
def test_verify_bins_against_the_metrics_of_a_direct_run(tmp_path, flip):
    rng = np.random.default_rng(10)
    data = SimpleNamespace(image_size=(24, 20), channels=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    images, same = write_random_bin(tmp_path / "tiny_set.bin", rng, 53)
    model = Projection(3, 24, 20)
    model.norm.running_mean.uniform_(-1, 1)  # eval mode uses these; training mode would not
    model.train()
    train_bins.clear_bin_cache()
    found = verify_bins(model, [tmp_path / "tiny_set.bin"], data, FARS, batch_size=7, flip=flip)
    assert model.training  # given back in its mode
    assert model.calls == math.ceil(106 / 7) * (2 if flip else 1)
    model.eval()
    with torch.no_grad():
        inputs = bin_inputs(images, data)
        embeddings = model(inputs).numpy()
        flipped = model(inputs.flip(-1)).numpy() if flip else None
    assert list(found) == ["tiny_set"]
    expected = reference_metrics(embeddings, flipped, same, FARS, 10)
    for key, value in expected.items():
        if math.isnan(value):
            assert math.isnan(found["tiny_set"][key])
        else:  # the embeddings of a batch of 7 against one of 106: float32 rounding
            assert found["tiny_set"][key] == pytest.approx(value, abs=1e-9), key


def test_each_set_is_decoded_once_until_it_changes(tmp_path, monkeypatch):
    rng = np.random.default_rng(11)
    data = SimpleNamespace(image_size=(24, 20), channels=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    write_random_bin(tmp_path / "a.bin", rng, 20)
    write_random_bin(tmp_path / "b.bin", rng, 30)
    loads = []
    real_load = train_bins.load_bin
    monkeypatch.setattr(train_bins, "load_bin", lambda path: loads.append(path) or real_load(path))
    train_bins.clear_bin_cache()
    model = Projection(3, 24, 20)
    first = verify_bins(model, [tmp_path / "a.bin", tmp_path / "b.bin"], data, FARS, folds=2)
    again = verify_bins(model, [tmp_path / "a.bin", tmp_path / "b.bin"], data, FARS, folds=2)
    assert len(loads) == 2 and list(first) == ["a", "b"]
    assert first == again
    write_random_bin(tmp_path / "a.bin", rng, 25)  # rewritten: decoded again, the new pairs
    changed = verify_bins(model, [tmp_path / "a.bin"], data, FARS, folds=2)
    assert len(loads) == 3 and changed["a"]["n_genuine"] + changed["a"]["n_impostor"] == 25


def test_embed_bin_of_a_plain_function_and_bad_outputs():
    pixels = torch.from_numpy(random_faces(np.random.default_rng(12), 5, 4, 4)).permute(0, 3, 1, 2)
    data = SimpleNamespace(image_size=(4, 4), channels=3, mean=(0.0,) * 3, std=(1.0,) * 3)
    embeddings, flipped = embed_bin(lambda x: x.flatten(1)[:, :3], pixels, data, batch_size=2)
    np.testing.assert_allclose(embeddings, pixels.flatten(1)[:, :3].numpy() / 255.0, rtol=1e-6)
    np.testing.assert_allclose(flipped, pixels.flip(-1).flatten(1)[:, :3].numpy() / 255.0)
    with pytest.raises(ValueError, match=r"^embed gave shape \(5,\) for 5 images"):
        embed_bin(lambda x: x.sum((1, 2, 3)), pixels, data)
    with pytest.raises(ValueError, match=r"^batch_size must be an integer >= 1, got 0$"):
        embed_bin(lambda x: x, pixels, data, batch_size=0)


def test_bad_sets_are_one_line_naming_the_file(tmp_path):
    data = SimpleNamespace(image_size=(24, 20), channels=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    model = Projection(3, 24, 20)
    (tmp_path / "text.bin").write_text("not a pickle")
    image = png(random_faces(np.random.default_rng(13), 1, 24, 20)[0])
    write_bin(tmp_path / "all_same.bin", [image] * 6, [True, True, True])
    write_bin(tmp_path / "short.bin", [image] * 6, [True, False, True])
    cases = [
        (tmp_path / "text.bin", 2, r"text\.bin: not a verification \.bin"),
        (tmp_path / "missing.bin", 2, r"missing\.bin: cannot read"),
        (tmp_path / "all_same.bin", 2, r"all_same\.bin: 3 same and 0 different pairs; a "),
        (tmp_path / "short.bin", 10, r"short\.bin: folds \(10\) must not exceed .* pairs \(3\)$"),
    ]
    for path, folds, message in cases:
        with pytest.raises(DataError, match=f"^{tmp_path}/" + message) as error:
            verify_bins(model, [path], data, FARS, folds=folds)
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=r"distinct file names; repeated: \['lfw'\]"):
        verify_bins(model, [tmp_path / "lfw.bin", tmp_path / "x" / "lfw.bin"], data, FARS)


@pytest.mark.skipif(not FIXTURE_BIN.is_file(), reason="no ../shared/data/insightface")
def test_lfw_dev_bin_through_a_model_against_an_independent_run():
    """The fixture's 600 pairs, decoded here by PIL from the pickle's bytes and normalised in
    numpy, embedded by a small random CNN: the same metrics as verify_bins."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 5, stride=4),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(4),
        torch.nn.Flatten(),
    ).eval()
    data = SimpleNamespace(image_size=(112, 112), channels=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    train_bins.clear_bin_cache()
    found = verify_bins(model, [FIXTURE_BIN], data, FARS)["lfw-dev"]
    encoded, same = read_bin(FIXTURE_BIN)
    images = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in encoded])
    inputs = torch.from_numpy(((images / 255.0 - 0.5) / 0.5).transpose(0, 3, 1, 2)).float()
    with torch.no_grad():
        embeddings, flipped = model(inputs).numpy(), model(inputs.flip(-1)).numpy()
    assert found["n_genuine"] == 300 and found["n_impostor"] == 300
    expected = reference_metrics(embeddings, flipped, same, FARS, 10)
    for key, value in expected.items():
        if math.isnan(value):
            assert math.isnan(found[key])
        else:
            assert found[key] == pytest.approx(value, abs=1e-9), key
