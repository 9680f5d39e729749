"""Trained models on new images: who is it (or ``unknown``), and embeddings to use elsewhere.

The Python API behind the ``angular predict`` and ``angular embed`` commands (:mod:`angular.cli`).
A :class:`Predictor` is one head, or an ensemble of heads combined by a rule of
:mod:`angular.eval.ensemble`, with each head's temperature (from calibration) and the open-set
threshold on confidence (from evaluate). :func:`load_predictor` builds it from a project after
``make repro`` (or ``dvc repro``), reading what the pipeline wrote there:

    outputs/models/<item>.pt           the trained models (angular.nn.recognition.load_model)
    outputs/calibration/<item>.json    each head's temperature (calibrate@<item>)
    metrics/evaluate.json              which heads evaluate scored, and the threshold of each head
                                       and ensemble rule (chosen on the validation images)

or from explicit model files with a temperature and a threshold given by the caller. A model file
may also be an ONNX file written by ``angular export`` (:mod:`angular.serve.export`), run by
onnxruntime: for ``embed`` any export, for ``predict`` one exported with ``--probabilities`` (its
probabilities already hold the fitted temperature, so ``--temperature`` does not apply).
An image is predicted as the head's (or rule's) most probable known identity when its calibrated
confidence is at least the threshold, and as unknown otherwise (evaluate's open-set rule).
Embeddings are those of evaluate's verification: one model's embedding, or the concatenation of
the models' normalised embeddings; :func:`embed` returns them normalised to unit length, so that
the dot product of two rows is their cosine similarity.

Every expected failure (a missing path, a folder without images, an unreadable image, a missing or
foreign model file, an unknown head or rule, an unavailable device) raises :class:`PredictError`
with a one-line message that names the path or option.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

# numpy-only modules; torch and the models are imported when first needed, so that the command
# line answers a mistyped path at once instead of after loading torch.
from angular.eval.classification import softmax
from angular.eval.ensemble import RULES, combine
from angular.eval.verification import unit_rows

if TYPE_CHECKING:
    import torch

    from angular.nn.recognition import LoadedModel

__all__ = [
    "PredictError",
    "Prediction",
    "Predictor",
    "Embeddings",
    "find_images",
    "load_predictor",
    "predict",
    "embed",
    "write_embeddings",
    "check_output",
    "select_device",
    "MODELS_DIR",
    "CALIBRATION_DIR",
    "EVALUATE_METRICS",
    "EMBEDDING_FORMATS",
]

# Where the pipeline writes (the same paths as pipeline/__init__.py, relative to the project).
MODELS_DIR = Path("outputs/models")
CALIBRATION_DIR = Path("outputs/calibration")
EVALUATE_METRICS = Path("metrics/evaluate.json")

EMBEDDING_FORMATS = (".npz", ".npy", ".csv")
_COMMON_SUFFIXES = {".png", ".jpg", ".jpeg", ".pgm", ".bmp", ".tif", ".tiff", ".webp"}
MAX_LISTED_PROBLEMS = 10


class PredictError(Exception):
    """A problem with the caller's input or the project; the message names the path or option."""


@dataclasses.dataclass(frozen=True)
class Prediction:
    """What a predictor says about one image."""

    path: str
    identity: str | None  # the predicted known identity; None: unknown (confidence < threshold)
    closest: str  # the most probable known identity, also when the image is rejected
    confidence: float  # calibrated probability of ``closest`` (for the rule ``vote``: its vote)
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
            "confidence": self.confidence,
            "threshold": self.threshold,
        }


@dataclasses.dataclass(frozen=True)
class Embeddings:
    paths: list[str]
    vectors: np.ndarray  # (N, D) float32, rows of unit length
    models: list[str]  # the items whose embeddings are concatenated, in order


# --------------------------------------------------------------------------------------------------
# Inputs: images and devices.


def _image_suffixes() -> set[str]:
    from PIL import Image

    return {suffix.lower() for suffix in Image.registered_extensions()}


def find_images(inputs: Sequence[str | Path]) -> list[Path]:
    """The image files named by ``inputs``: files as given (in order), folders searched
    recursively for files with an image suffix PIL knows (sorted; hidden entries skipped)."""
    if not inputs:
        raise PredictError("no image given: pass image files or folders")
    suffixes = _image_suffixes()
    found: list[Path] = []
    for entry in inputs:
        path = Path(entry)
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            images = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix.lower() in suffixes
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not images:
                raise PredictError(
                    f"{path}: no image files in this folder (looked for "
                    f"{', '.join(sorted(s for s in suffixes if s in _COMMON_SUFFIXES))}, ...)"
                )
            found.extend(images)
        elif path.exists():
            raise PredictError(f"{path}: not a file or folder")
        else:
            raise PredictError(f"{path}: no such file or folder")
    return found


def select_device(name: str = "cpu") -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:<index>``."""
    from angular import devices  # imports torch: not at module level (fast ``--help``)

    try:
        return devices.select_device(name)
    except ValueError as error:
        raise PredictError(f"--device {name}: {error}") from None


class _ImageCache:
    """Decodes each image once per preprocessing (size, channels); every unreadable image is
    reported at once, naming its file."""

    def __init__(self, paths: Sequence[Path], *, progress: str | None = None):
        self.paths = list(paths)
        self.decoded: dict[tuple, torch.Tensor] = {}
        self.progress = progress  # the label of progress bars on stderr (None: silent)

    def uint8(self, size: Sequence[int], channels: int, crop: dict | None = None) -> torch.Tensor:
        """The images decoded to ``size`` and ``channels`` after the model's ``data.crop``
        (``crop``: as the model file stores it; None: the whole image)."""
        import torch

        from angular.config import Crop
        from angular.data import DataError, load_image

        key = (tuple(size), channels, None if crop is None else repr(sorted(crop.items())))
        region = None if crop is None else Crop(**crop)
        if key not in self.decoded:
            images, problems = [], []
            paths = self.paths
            if self.progress is not None:
                from angular.serve.inference import with_progress

                label = f"{self.progress}: reading images"
                paths = with_progress(paths, len(paths), label, size=lambda _: 1)
            for path in paths:
                try:
                    images.append(load_image(path, image_size=size, channels=channels, crop=region))
                except DataError as error:
                    cause = error.__cause__ or error
                    problems.append(f"{path}: cannot read the image ({cause})")
            if problems:
                more = len(problems) - MAX_LISTED_PROBLEMS
                raise PredictError(
                    "; ".join(problems[:MAX_LISTED_PROBLEMS])
                    + (f"; and {more} more unreadable image(s)" if more > 0 else "")
                )
            self.decoded[key] = torch.stack(images)
        return self.decoded[key]

    def batches(self, loaded: LoadedModel, batch_size: int):
        from angular.data import normalize

        image = loaded.image
        pixels = self.uint8(image["size"], image["channels"], image.get("crop"))
        for start in range(0, len(pixels), batch_size):
            yield normalize(pixels[start : start + batch_size], image["mean"], image["std"])


# --------------------------------------------------------------------------------------------------
# The predictor.


@dataclasses.dataclass
class Predictor:
    """Models, the heads used and how they are combined, their temperatures and the threshold."""

    models: list[LoadedModel]
    heads: list[str]  # the ensemble members used (model heads), in order
    temperatures: dict[str, float]
    rule: str | None  # None: a single head
    threshold: float
    classes: list[str]
    device: torch.device | str = "cpu"
    batch_size: int = 64
    sources: dict[str, str] = dataclasses.field(default_factory=dict)  # what came from where

    def describe(self) -> str:
        how = f"head {self.heads[0]}" if self.rule is None else f"ensemble {self.rule} of "
        if self.rule is not None:
            how += ", ".join(self.heads)
        temperatures = ", ".join(f"{h} {self.temperatures[h]:.4g}" for h in self.heads)
        return (
            f"{how}; temperature {temperatures} ({self.sources.get('temperature', 'given')}); "
            f"threshold {self.threshold:.4g} ({self.sources.get('threshold', 'given')})"
        )

    def _outputs(self, images: _ImageCache, *, flip_test: bool = False):
        from angular.serve.export import OnnxModel
        from angular.serve.inference import run_batches, with_progress

        outputs = {}
        for loaded in self.models:
            if isinstance(loaded, OnnxModel):
                outputs[loaded.item] = loaded.run_batches(
                    (batch.numpy() for batch in images.batches(loaded, self.batch_size)),
                    flip_test=flip_test,
                )
                continue
            batches = images.batches(loaded, self.batch_size)
            if images.progress is not None:
                images.uint8(  # its own bar first
                    loaded.image["size"], loaded.image["channels"], loaded.image.get("crop")
                )
                label = f"{images.progress}: {loaded.item}"
                batches = with_progress(batches, len(images.paths), label)
            outputs[loaded.item] = run_batches(
                loaded, batches, device=self.device, flip_test=flip_test
            )
        return outputs

    def predict(self, paths: Sequence[str | Path]) -> list[Prediction]:
        images = _ImageCache(find_images(paths))
        outputs = self._outputs(images)
        logits = {
            member: member_logits[member]
            for _, member_logits in outputs.values()
            for member in member_logits
        }
        probs = [softmax(logits[head], self.temperatures[head]) for head in self.heads]
        if self.rule is None:
            predicted, confidence = probs[0].argmax(axis=1), probs[0].max(axis=1)
        else:
            predicted, confidence, _ = combine(probs, self.rule)
        return [
            Prediction(
                path=str(path),
                identity=self.classes[label] if conf >= self.threshold else None,
                closest=self.classes[label],
                confidence=float(conf),
                threshold=self.threshold,
            )
            for path, label, conf in zip(images.paths, predicted, confidence)
        ]

    def embed(
        self, paths: Sequence[str | Path], *, flip_test: bool = False, progress: bool = False
    ) -> Embeddings:
        images = _ImageCache(find_images(paths), progress="angular embed" if progress else None)
        outputs = self._outputs(images, flip_test=flip_test)
        parts = [unit_rows(embeddings) for embeddings, _ in outputs.values()]
        vectors = unit_rows(np.concatenate(parts, axis=1)).astype(np.float32)
        return Embeddings([str(p) for p in images.paths], vectors, list(outputs))


def load_model_file(path: Path) -> LoadedModel:
    """A model file (``.pt``, or ``.onnx`` from ``angular export``); problems raise PredictError."""
    if Path(path).suffix.lower() == ".onnx":
        from angular.serve.export import ExportError, load_onnx

        try:
            return load_onnx(path)
        except ExportError as error:
            raise PredictError(f"--model {error}") from None
    from angular.nn.recognition import load_model

    try:
        return load_model(path, map_location="cpu")
    except (FileNotFoundError, ValueError) as error:
        raise PredictError(str(error)) from None


def read_json_object(path: Path, what: str) -> dict:
    """The JSON object in ``path`` (``what`` names it in the PredictError of a bad file)."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise PredictError(f"{path}: cannot read {what} ({error})") from None
    if not isinstance(document, dict):
        raise PredictError(f"{path}: not {what} (expected a JSON object)")
    return document


def _project_models(project: Path) -> list[Path]:
    """The model files the pipeline wrote in ``project``."""
    if not project.is_dir():
        raise PredictError(f"--project {project}: no such folder")
    models_dir = project / MODELS_DIR
    files = sorted(models_dir.glob("*.pt")) if models_dir.is_dir() else []
    if not files:
        raise PredictError(
            f"{models_dir}: no trained model; run `make repro` (or `dvc repro`) in {project} "
            "first, or pass --model"
        )
    return files


def _model_files(paths: Sequence[str | Path]) -> list[Path]:
    for path in map(Path, paths):
        if not path.is_file():
            raise PredictError(f"--model {path}: no such model file")
    return [Path(p) for p in paths]


def _check_batch_size(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise PredictError(f"--batch-size must be an integer >= 1, got {batch_size!r}")


def _check_threshold(threshold) -> float:
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, (int, float))
        or not (math.isfinite(threshold) and 0.0 <= threshold <= 1.0)
    ):
        raise PredictError(f"--threshold must be a confidence in [0, 1], got {threshold!r}")
    return float(threshold)


def _check_temperature(temperature) -> float:
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not (math.isfinite(temperature) and temperature > 0)
    ):
        raise PredictError(f"--temperature must be a number > 0, got {temperature!r}")
    return float(temperature)


def load_predictor(
    project: str | Path = ".",
    *,
    head: str | None = None,
    ensemble: str | None = None,
    model_paths: Sequence[str | Path] | None = None,
    temperature: float | None = None,
    threshold: float | None = None,
    device: str = "cpu",
    batch_size: int = 64,
) -> Predictor:
    """A predictor from a project's pipeline outputs, or from explicit ``model_paths``.

    - ``head``: use one head (a member name: ``arcface``, ``joint_cosface``); ``ensemble``: combine
      every head by this rule (:data:`angular.eval.ensemble.RULES`). Neither: the only head when there
      is one, else the first ensemble rule evaluate scored (``mean_prob`` by default).
    - ``temperature``: the same temperature for every head, instead of the calibrated ones (with
      ``model_paths`` the default is 1, no calibration).
    - ``threshold``: the open-set threshold, instead of evaluate's (required with ``model_paths``;
      0 accepts every image).
    """
    if head is not None and ensemble is not None:
        raise PredictError("--head and --ensemble exclude each other: choose one")
    if ensemble is not None and ensemble not in RULES:
        raise PredictError(f"--ensemble {ensemble}: unknown rule; known: {', '.join(RULES)}")
    _check_batch_size(batch_size)
    if threshold is not None:
        threshold = _check_threshold(threshold)
    if temperature is not None:
        temperature = _check_temperature(temperature)
    project = Path(project)
    sources: dict[str, str] = {}

    evaluated: dict | None = None
    if model_paths:
        if threshold is None:
            raise PredictError(
                "--threshold is needed with --model (the open-set threshold on confidence, "
                "e.g. from metrics/evaluate.json; 0 accepts every image)"
            )
        files = _model_files(model_paths)
    else:
        files = _project_models(project)
        metrics_path = project / EVALUATE_METRICS
        if metrics_path.is_file():
            evaluated = read_json_object(metrics_path, "evaluate's metrics")
        elif threshold is None:
            raise PredictError(
                f"{metrics_path}: missing, so there is no open-set threshold; run the evaluate "
                "stage (`dvc repro`) or pass --threshold"
            )
    torch_device = select_device(device)
    models = [load_model_file(path) for path in files]
    if evaluated is not None:
        # The heads evaluate scored (a model file left over from an old run is not used).
        scored = set(evaluated.get("heads", {}))
        models = [m for m in models if set(m.members) <= scored] or models

    classes = models[0].classes
    for loaded in models[1:]:
        if loaded.classes != classes:
            raise PredictError(
                f"the models {models[0].item} and {loaded.item} know different identities; "
                "they cannot be combined"
            )
    member_of = {member: loaded for loaded in models for member in loaded.members}
    for loaded in models:
        if not loaded.members:  # an ONNX export without probabilities
            raise PredictError(
                f"--model {loaded.path}: exported without --probabilities, it gives embeddings "
                "only (use `angular embed`, or export it again with --probabilities)"
            )
        if getattr(loaded, "temperature", None) is not None and temperature is not None:
            raise PredictError(
                f"--temperature: {loaded.path} already applies its fitted temperature "
                f"{loaded.temperature:.4g} to its probabilities"
            )

    if head is not None:
        if head not in member_of:
            raise PredictError(f"--head {head}: no such head; available: {', '.join(member_of)}")
        heads, rule = [head], None
        models = [member_of[head]]
    else:
        heads = list(member_of)
        rule = ensemble
        if rule is None and len(heads) > 1:
            evaluated_rules = list((evaluated or {}).get("ensembles", {}))
            rule = evaluated_rules[0] if evaluated_rules else RULES[0]

    if temperature is not None:
        temperatures = {h: temperature for h in heads}
        sources["temperature"] = "given"
    elif model_paths:
        temperatures = {h: 1.0 for h in heads}
        sources["temperature"] = "uncalibrated; pass --temperature"
    else:
        temperatures = {}
        for loaded in models:
            path = project / CALIBRATION_DIR / f"{loaded.item}.json"
            if not path.is_file():
                raise PredictError(
                    f"{path}: missing; run calibrate@{loaded.item} (`dvc repro`) or pass "
                    "--temperature"
                )
            found = read_json_object(path, "a calibration file").get("temperatures", {})
            for member in loaded.members:
                if member in heads:
                    if member not in found:
                        raise PredictError(f"{path}: no temperature for {member}")
                    temperatures[member] = _check_temperature(found[member])
        sources["temperature"] = f"from {project / CALIBRATION_DIR}"

    if threshold is None:
        group, name = ("heads", heads[0]) if rule is None else ("ensembles", rule)
        entry = (evaluated or {}).get(group, {}).get(name)
        if not isinstance(entry, dict) or entry.get("threshold") is None:
            raise PredictError(
                f"{project / EVALUATE_METRICS}: no threshold for "
                f"{'head' if rule is None else 'ensemble rule'} {name} (evaluate did not score "
                "it; add it to evaluate.rules and rerun, or pass --threshold)"
            )
        threshold = _check_threshold(entry["threshold"])
        sources["threshold"] = f"from {project / EVALUATE_METRICS}"

    for loaded in models:
        if hasattr(loaded, "model"):  # ONNX models run on onnxruntime's CPU provider
            loaded.model.to(torch_device)
    return Predictor(
        models=models,
        heads=heads,
        temperatures=temperatures,
        rule=rule,
        threshold=threshold,
        classes=list(classes),
        device=torch_device,
        batch_size=batch_size,
        sources=sources,
    )


def predict(paths: Sequence[str | Path], **options) -> list[Prediction]:
    """Predict the identity (or unknown) of each image; ``paths`` are files or folders.
    ``options`` are those of :func:`load_predictor`."""
    return load_predictor(**options).predict(paths)


def embed(
    paths: Sequence[str | Path],
    *,
    project: str | Path = ".",
    item: str | None = None,
    model_paths: Sequence[str | Path] | None = None,
    device: str = "cpu",
    flip_test: bool = False,
    batch_size: int = 64,
    progress: bool = False,
) -> Embeddings:
    """Unit-length embeddings of the images: one model's (``item``), or the concatenation of every
    model's normalised embedding (as evaluate's ``ensemble``), normalised again. ``progress``:
    progress bars on stderr while reading the images and running each model."""
    _check_batch_size(batch_size)
    files = _model_files(model_paths) if model_paths else _project_models(Path(project))
    torch_device = select_device(device)
    models = [load_model_file(path) for path in files]
    if item is not None:
        chosen = [m for m in models if m.item == item]
        if not chosen:
            raise PredictError(
                f"--item {item}: no such model; available: {', '.join(m.item for m in models)}"
            )
        models = chosen
    predictor = Predictor(
        models=models,
        heads=[],
        temperatures={},
        rule=None,
        threshold=0.0,
        classes=models[0].classes,
        device=torch_device,
        batch_size=batch_size,
    )
    return predictor.embed(paths, flip_test=flip_test, progress=progress)


def check_output(out: str | Path) -> Path:
    """``out`` as a path, when its suffix is a known format and its folder exists."""
    out = Path(out)
    if out.suffix.lower() not in EMBEDDING_FORMATS:
        raise PredictError(f"--out {out}: unknown format; use {', '.join(EMBEDDING_FORMATS)}")
    if not out.parent.is_dir():
        raise PredictError(f"--out {out}: the folder {out.parent} does not exist")
    if out.is_dir():
        raise PredictError(f"--out {out}: is a folder; give a file name")
    return out


def write_embeddings(result: Embeddings, out: str | Path) -> Path:
    """Write embeddings by the suffix of ``out``: ``.npz`` (``embeddings``, ``paths``,
    ``models``), ``.npy`` (the array only, rows in the order of ``result.paths``) or ``.csv``
    (a ``path`` column, then ``e0 .. e{D-1}``)."""
    out = check_output(out)
    suffix = out.suffix.lower()
    try:
        if suffix == ".npz":
            np.savez(
                out,
                embeddings=result.vectors,
                paths=np.asarray(result.paths, dtype=str),
                models=np.asarray(result.models, dtype=str),
            )
        elif suffix == ".npy":
            np.save(out, result.vectors)
        else:
            with open(out, "w", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle, lineterminator="\n")
                writer.writerow(["path", *(f"e{i}" for i in range(result.vectors.shape[1]))])
                for path, row in zip(result.paths, result.vectors):
                    writer.writerow([path, *(f"{v:.8g}" for v in row)])
    except OSError as error:
        raise PredictError(f"--out {out}: cannot write it ({error.strerror or error})") from None
    return out
