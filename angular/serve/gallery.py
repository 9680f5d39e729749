"""A gallery of enrolled people: add identities without retraining, identify with open-set rejection.

The original repository's point is recognising known people and rejecting unknown ones; in
practice people are added by enrolling their embeddings, not by retraining a classifier.

- ``enroll(model, folder, gallery)``: ``folder`` holds one sub-folder per person. Each person is
  stored as one **template: the normalised mean of the unit embeddings of their images** (with the
  number of images). A mean template is what face-recognition protocols use for multi-image
  subjects (IJB's template averaging): it averages pose and lighting out, one row per person keeps
  search cost and gallery size proportional to the number of people (not of photos), and a score
  is a single cosine similarity, so one threshold applies whatever the number of images per person.
  (Keeping every embedding and taking the best match favours people with many photos and lets one
  mislabelled photo attract impostors.) Enrolling again adds the new people and replaces the
  templates of people enrolled before.
- ``identify(model, gallery, images, threshold)``: the most similar template (cosine similarity)
  and the similarity; ``unknown`` below the threshold. The default threshold is evaluate's
  verification threshold at a false accept rate (``metrics/evaluate.json``:
  ``verification.unknown.<item>.threshold@far=F``, on pairs of people never seen in training).
- Search is faiss (``faiss-cpu``): exact inner product (``IndexFlatIP``) by default, and an
  inverted-file index (``IndexIVFFlat``) from :data:`APPROXIMATE_MIN_SIZE` people on for up to
  :data:`APPROXIMATE_MAX_BATCH` queries at a time, where it pays (``benchmarks/bench_gallery.py``,
  BENCHMARKS.md: Gallery search). The approximate index is built at enrolment and stored in the
  gallery file.

A gallery file (``.npz``) holds the templates, names and counts, and the model's ``item``,
``embedding_dim`` and ``fingerprint`` (a hash of its weights, the same for a ``.pt`` and the ONNX
file exported from it): a gallery is only searched with embeddings of the model that made it. It
is written atomically (a temporary file, fsync, rename): a failed enrolment leaves the previous
gallery as it was. Every expected failure raises :class:`GalleryError` naming the path or option.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from angular.serve.predict import PredictError

__all__ = [
    "GalleryError",
    "Gallery",
    "Identification",
    "APPROXIMATE_MIN_SIZE",
    "build_index",
    "ivf_parameters",
    "load_gallery",
    "save_gallery",
    "enroll",
    "identify",
    "default_threshold",
]

GALLERY_FORMAT = "angular-gallery"
GALLERY_VERSION = 1
# From this many people on, a few queries at a time use the IVF index: measured in
# benchmarks/bench_gallery.py (BENCHMARKS.md, Gallery search): at 10^5 one query costs ~11 ms
# exact and ~2 ms approximate (recall@1 0.97). A large batch of queries is faster exact (one
# matrix product), so batches above APPROXIMATE_MAX_BATCH stay exact.
APPROXIMATE_MIN_SIZE = 100_000
APPROXIMATE_MAX_BATCH = 32


class GalleryError(PredictError):
    """A problem with the gallery, the enrolment folder or an option; the message names it."""


@dataclasses.dataclass
class Gallery:
    names: list[str]
    templates: np.ndarray  # (N, D) float32, unit rows
    counts: np.ndarray  # (N,) images per template
    item: str
    embedding_dim: int
    fingerprint: str
    index_bytes: bytes | None = None  # a serialised approximate index of these templates
    flip_test: bool = False  # embeddings with their mirror image's (identify embeds the same way)

    def __len__(self) -> int:
        return len(self.names)


@dataclasses.dataclass(frozen=True)
class Identification:
    path: str
    identity: str | None  # None: unknown (similarity below the threshold)
    closest: str
    similarity: float
    threshold: float

    @property
    def known(self) -> bool:
        return self.identity is not None

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "identity": self.identity if self.known else "unknown",
            "known": self.known,
            "closest": self.closest,
            "similarity": self.similarity,
            "threshold": self.threshold,
        }


# --------------------------------------------------------------------------------------------------
# Search.


def ivf_parameters(size: int) -> tuple[int, int]:
    """``(nlist, nprobe)`` of the IVF index for ``size`` templates: ~4 sqrt(N) lists, an eighth of
    them probed (embeddings spread evenly over the sphere, as margin losses make them, are the hard
    case for an inverted file: fewer probes lose recall, see BENCHMARKS.md)."""
    nlist = max(1, int(4 * math.sqrt(size)))
    return nlist, max(8, nlist // 8)


def build_index(templates: np.ndarray, *, approximate: bool = False, seed: int = 0):
    """A faiss index of unit ``templates`` searched by inner product (= cosine similarity)."""
    import faiss

    templates = np.ascontiguousarray(templates, dtype=np.float32)
    size, dim = templates.shape
    if not approximate:
        index = faiss.IndexFlatIP(dim)
        index.add(templates)
        return index
    nlist, nprobe = ivf_parameters(size)
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    sample = templates
    if size > 32 * nlist:  # k-means needs ~30-40 points a list; more only costs time
        rng = np.random.default_rng(seed)
        sample = templates[rng.choice(size, 32 * nlist, replace=False)]
    index.cp.seed = seed
    index.train(sample)
    index.add(templates)
    index.nprobe = nprobe
    return index


def _index_of(gallery: Gallery, queries: int):
    import faiss

    if len(gallery) < APPROXIMATE_MIN_SIZE or queries > APPROXIMATE_MAX_BATCH:
        return build_index(gallery.templates)
    if gallery.index_bytes is not None:
        index = faiss.deserialize_index(np.frombuffer(gallery.index_bytes, dtype=np.uint8))
        if index.ntotal == len(gallery):
            index.nprobe = ivf_parameters(len(gallery))[1]
            return index
    return build_index(gallery.templates, approximate=True)


# --------------------------------------------------------------------------------------------------
# The gallery file.


def load_gallery(path: str | Path) -> Gallery:
    path = Path(path)
    if not path.is_file():
        raise GalleryError(f"--gallery {path}: no such gallery (enroll people first)")
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            if meta.get("format") != GALLERY_FORMAT:
                raise ValueError(f"no format: {GALLERY_FORMAT!r}")
            if meta.get("version") != GALLERY_VERSION:
                raise ValueError(f"version {meta.get('version')} is not supported")
            gallery = Gallery(
                names=[str(n) for n in data["names"]],
                templates=np.asarray(data["templates"], dtype=np.float32),
                counts=np.asarray(data["counts"], dtype=np.int64),
                item=meta["item"],
                embedding_dim=int(meta["embedding_dim"]),
                fingerprint=meta["fingerprint"],
                flip_test=bool(meta.get("flip_test", False)),
                index_bytes=data["index"].tobytes() if "index" in data.files else None,
            )
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise GalleryError(f"--gallery {path}: not a readable gallery ({error})") from None
    if gallery.templates.shape != (len(gallery.names), gallery.embedding_dim):
        raise GalleryError(f"--gallery {path}: templates and names disagree (a damaged file)")
    return gallery


def save_gallery(gallery: Gallery, path: str | Path) -> Path:
    """Write ``gallery`` atomically (the approximate index too, when it is large enough)."""
    from angular.files import atomic_write_bytes

    path = Path(path)
    if gallery.index_bytes is None and len(gallery) >= APPROXIMATE_MIN_SIZE:
        import faiss

        index = build_index(gallery.templates, approximate=True)
        gallery.index_bytes = faiss.serialize_index(index).tobytes()
    meta = {
        "format": GALLERY_FORMAT,
        "version": GALLERY_VERSION,
        "item": gallery.item,
        "embedding_dim": gallery.embedding_dim,
        "fingerprint": gallery.fingerprint,
        "flip_test": gallery.flip_test,
        "template": "normalised mean of the unit embeddings of a person's images",
    }
    arrays = {
        "meta": np.asarray(json.dumps(meta)),
        "names": np.asarray(gallery.names, dtype=str),
        "templates": gallery.templates.astype(np.float32),
        "counts": gallery.counts.astype(np.int64),
    }
    if gallery.index_bytes is not None:
        arrays["index"] = np.frombuffer(gallery.index_bytes, dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    try:
        atomic_write_bytes(path, buffer.getvalue())
    except OSError as error:
        raise GalleryError(
            f"--gallery {path}: cannot write it ({error.strerror or error})"
        ) from None
    return path


# --------------------------------------------------------------------------------------------------
# Models.


@dataclasses.dataclass
class _Embedder:
    predictor: object  # angular.serve.predict.Predictor
    item: str
    fingerprint: str
    embedding_dim: int

    def __call__(self, paths: Sequence[Path], flip_test: bool = False) -> np.ndarray:
        return self.predictor.embed(paths, flip_test=flip_test).vectors


def _embedder(model: str | Path, *, device: str = "cpu", batch_size: int = 64) -> _Embedder:
    """One model file (``.pt`` or an ONNX export) ready to embed images, with its fingerprint."""
    from angular.serve.export import OnnxModel, model_fingerprint
    from angular.serve.predict import Predictor, load_model_file, select_device

    path = Path(model)
    if not path.is_file():
        raise GalleryError(f"MODEL {path}: no such model file")
    loaded = load_model_file(path)
    if isinstance(loaded, OnnxModel):
        fingerprint, dim = loaded.fingerprint, loaded.embedding_dim
    else:
        fingerprint = model_fingerprint(loaded.model.state_dict())
        dim = int(loaded.model.heads[loaded.members[0]].embedding_dim)
    predictor = Predictor(
        models=[loaded],
        heads=[],
        temperatures={},
        rule=None,
        threshold=0.0,
        classes=list(loaded.classes),
        device=select_device(device) if not isinstance(loaded, OnnxModel) else "cpu",
        batch_size=batch_size,
    )
    return _Embedder(predictor, loaded.item, fingerprint, dim)


def _check_match(gallery: Gallery, embedder: _Embedder, gallery_path: Path, model: Path) -> None:
    if gallery.embedding_dim != embedder.embedding_dim:
        raise GalleryError(
            f"--gallery {gallery_path}: made with embeddings of size {gallery.embedding_dim}, "
            f"but {model} gives size {embedder.embedding_dim}; use the model that enrolled it"
        )
    if gallery.fingerprint != embedder.fingerprint:
        raise GalleryError(
            f"--gallery {gallery_path}: made with another model (fingerprint "
            f"{gallery.fingerprint}, {model} has {embedder.fingerprint}); use the model that "
            "enrolled it, or enroll into a new gallery"
        )


# --------------------------------------------------------------------------------------------------
# Enrol and identify.


def _people(folder: Path) -> dict[str, list[Path]]:
    from angular.serve.predict import find_images

    if not folder.is_dir():
        raise GalleryError(f"FOLDER {folder}: no such folder")
    people = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not people:
        raise GalleryError(
            f"FOLDER {folder}: no person sub-folders in it (one sub-folder of images per person)"
        )
    return {person.name: find_images([person]) for person in people}


def enroll(
    model: str | Path,
    folder: str | Path,
    gallery_path: str | Path,
    *,
    device: str = "cpu",
    batch_size: int = 64,
    flip_test: bool = False,
) -> tuple[Gallery, list[str], list[str]]:
    """Enroll every person of ``folder`` (adds, or replaces those already in the gallery);
    returns ``(gallery, added, replaced)``. Nothing is written unless every image was read."""
    folder, gallery_path = Path(folder), Path(gallery_path)
    if gallery_path.suffix.lower() != ".npz":
        raise GalleryError(f"--gallery {gallery_path}: the file name must end with .npz")
    if not gallery_path.parent.is_dir():
        raise GalleryError(
            f"--gallery {gallery_path}: the folder {gallery_path.parent} does not exist"
        )
    people = _people(folder)  # path mistakes before loading a model
    embedder = _embedder(model, device=device, batch_size=batch_size)
    existing = load_gallery(gallery_path) if gallery_path.exists() else None
    if existing is not None:
        _check_match(existing, embedder, gallery_path, Path(model))
        if existing.flip_test != flip_test:
            raise GalleryError(
                f"--gallery {gallery_path}: enrolled {'with' if existing.flip_test else 'without'} "
                "--flip-test; enroll the same way"
            )
    paths = [path for images in people.values() for path in images]
    vectors = embedder(paths, flip_test=flip_test)
    templates, counts, start = [], [], 0
    for images in people.values():
        mean = vectors[start : start + len(images)].mean(axis=0)
        templates.append(mean / max(float(np.linalg.norm(mean)), 1e-12))
        counts.append(len(images))
        start += len(images)

    names = list(existing.names) if existing else []
    rows = list(existing.templates) if existing else []
    kept_counts = list(existing.counts) if existing else []
    position = {name: i for i, name in enumerate(names)}
    added, replaced = [], []
    for name, template, count in zip(people, templates, counts):
        if name in position:
            rows[position[name]], kept_counts[position[name]] = template, count
            replaced.append(name)
        else:
            position[name] = len(names)
            names.append(name)
            rows.append(template)
            kept_counts.append(count)
            added.append(name)
    gallery = Gallery(
        names=names,
        templates=np.asarray(rows, dtype=np.float32).reshape(len(names), embedder.embedding_dim),
        counts=np.asarray(kept_counts, dtype=np.int64),
        item=embedder.item,
        embedding_dim=embedder.embedding_dim,
        fingerprint=embedder.fingerprint,
        flip_test=flip_test,
    )
    save_gallery(gallery, gallery_path)
    return gallery, added, replaced


def default_threshold(project: str | Path, item: str, far: float) -> tuple[float, str]:
    """Evaluate's verification threshold of ``item`` at false accept rate ``far`` (pairs of people
    never seen in training), and where it came from."""
    from angular.eval.verification import far_key
    from angular.serve.predict import EVALUATE_METRICS, read_json_object

    path = Path(project) / EVALUATE_METRICS
    if not path.is_file():
        raise GalleryError(
            f"{path}: missing, so there is no verification threshold; run the evaluate stage "
            "(`dvc repro`) or pass --threshold"
        )
    key = f"threshold@{far_key(far)}"
    found = read_json_object(path, "evaluate's metrics").get("verification", {})
    for split in ("unknown", "test"):
        value = found.get(split, {}).get(item, {}).get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            return float(value), f"{path}: verification.{split}.{item}.{key}"
    raise GalleryError(
        f"{path}: no {key} for {item} (rerun evaluate with this FAR, or pass --threshold)"
    )


def identify(
    model: str | Path,
    gallery_path: str | Path,
    images: Sequence[str | Path],
    *,
    threshold: float,
    device: str = "cpu",
    batch_size: int = 64,
) -> list[Identification]:
    """The closest enrolled person of each image, ``unknown`` below ``threshold`` (a cosine
    similarity in [-1, 1]); images are embedded as the gallery's were (``flip_test``)."""
    from angular.serve.predict import find_images

    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, (int, float))
        or not (math.isfinite(threshold) and -1.0 <= threshold <= 1.0)
    ):
        raise GalleryError(f"--threshold must be a cosine similarity in [-1, 1], got {threshold!r}")
    paths = find_images(images)
    gallery = load_gallery(gallery_path)
    if len(gallery) == 0:
        raise GalleryError(f"--gallery {gallery_path}: no one is enrolled")
    embedder = _embedder(model, device=device, batch_size=batch_size)
    _check_match(gallery, embedder, Path(gallery_path), Path(model))
    vectors = embedder(paths, flip_test=gallery.flip_test)
    similarity, index = _index_of(gallery, len(vectors)).search(
        np.ascontiguousarray(vectors, np.float32), 1
    )
    results = []
    for path, score, row in zip(paths, similarity[:, 0], index[:, 0]):
        closest = gallery.names[row] if row >= 0 else ""
        results.append(
            Identification(
                path=str(path),
                identity=closest if row >= 0 and score >= threshold else None,
                closest=closest,
                similarity=float(score),
                threshold=float(threshold),
            )
        )
    return results
