"""ONNX export of a trained model, and running the exported file (``angular export``).

Face-recognition models are deployed as ONNX files (insightface ships its models that way). The
exported graph takes a batch of *preprocessed* images, ``images`` (B, channels, H, W) float32
normalised as in training (``(x / 255 - mean) / std``), with a dynamic batch size, and returns:

- ``embeddings`` (B, D): the backbone's embedding, as :func:`angular.serve.inference.run_batches`
  computes it (not normalised; normalise it for cosine similarity);
- with ``probabilities=True`` also ``probabilities`` (B, C): one head's calibrated class
  probabilities ``softmax(s * cos / T)`` with the temperature ``T`` fitted by calibration.

What is needed to preprocess images and read the outputs travels in the file's metadata
(``metadata_props``): ``angular.item``, ``angular.classes`` (JSON list), ``angular.image`` (JSON:
size, channels, mean, std), ``angular.head`` and ``angular.temperature`` (with probabilities), and
``angular.fingerprint`` (a hash of the model file's weights, shared with the ``.pt`` it came from).

:class:`OnnxModel` runs such a file with onnxruntime; ``angular embed`` and ``angular predict``
accept it in place of a ``.pt`` model.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from angular.eval.verification import unit_rows

__all__ = [
    "ExportError",
    "OnnxModel",
    "export_onnx",
    "load_onnx",
    "model_fingerprint",
    "ONNX_OPSET",
]

ONNX_OPSET = 17
_META = "angular."


class ExportError(Exception):
    """A problem with the model, the options or the output path; the message names it."""


def model_fingerprint(state_dict) -> str:
    """A short hash of a model's weights (names, shapes and values), the same for a ``.pt`` file
    and the ONNX file exported from it: it tells whether two files hold the same model."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    for name in sorted(state_dict):
        value = state_dict[name]
        if not isinstance(value, torch.Tensor):
            continue
        value = value.detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(value.shape)).encode())
        digest.update(str(value.dtype).encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _bins(size: int, out: int):
    """The (out, size) averaging matrix of adaptive average pooling along one axis."""
    import torch

    matrix = torch.zeros(out, size)
    for i in range(out):
        start, end = (i * size) // out, -((-(i + 1) * size) // out)  # floor, ceil as PyTorch
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


def _exportable(model, example):
    """A copy of ``model`` whose adaptive average pools (unsupported by the ONNX exporter when the
    input size is not a multiple of the output size) are the same averages as two constant matmuls,
    for the fixed image size of the model."""
    import copy

    import torch
    from torch import nn

    class FixedAdaptiveAvgPool(nn.Module):
        def __init__(self, height: int, width: int, out: tuple[int, int]):
            super().__init__()
            self.register_buffer("rows", _bins(height, out[0]))
            self.register_buffer("cols", _bins(width, out[1]))

        def forward(self, x):
            return torch.matmul(torch.matmul(self.rows, x), self.cols.T)

    model = copy.deepcopy(model).eval()
    sizes = {}
    hooks = [
        module.register_forward_hook(
            lambda m, args, _out, name=name: sizes.__setitem__(name, tuple(args[0].shape[-2:]))
        )
        for name, module in model.named_modules()
        if isinstance(module, nn.AdaptiveAvgPool2d)
    ]
    with torch.no_grad():
        model(example)
    for hook in hooks:
        hook.remove()
    for name, (height, width) in sizes.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        pool = getattr(parent, child)
        out = pool.output_size if isinstance(pool.output_size, tuple) else (pool.output_size,) * 2
        out = tuple(height if o is None else o for o in out[:1]) + tuple(
            width if o is None else o for o in out[1:]
        )
        setattr(parent, child, FixedAdaptiveAvgPool(height, width, out))
    return model


def _wrapper(loaded, head: str | None, temperature: float | None, example):
    import torch
    from torch import nn

    exportable = _exportable(loaded.model, example)

    class Exported(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = exportable

        def forward(self, images: torch.Tensor):
            embeddings = self.model(images)
            if head is None:
                return embeddings
            logits = self.model.heads[head].logits(embeddings)
            return embeddings, torch.softmax(logits.float() / temperature, dim=1)

        def reference(self, images: torch.Tensor):
            """The same outputs from the original model (the parity check's reference)."""
            embeddings = loaded.model(images)
            if head is None:
                return embeddings
            logits = loaded.model.heads[head].logits(embeddings)
            return embeddings, torch.softmax(logits.float() / temperature, dim=1)

    return Exported().eval()


def export_onnx(
    model_path: str | Path,
    out: str | Path,
    *,
    probabilities: bool = False,
    head: str | None = None,
    temperature: float | None = None,
    calibration: str | Path | None = None,
    opset: int = ONNX_OPSET,
) -> Path:
    """Export the model file ``model_path`` (a ``.pt`` the train stage wrote) to ``out``.

    With ``probabilities``: the head ``head`` (default: the model's only head, else an error
    naming them), at ``temperature``, or else the one fitted for it in ``calibration`` (a file
    calibrate wrote, ``outputs/calibration/<item>.json``). The file is written atomically."""
    import torch

    from angular.files import atomic_write_bytes
    from angular.nn.recognition import load_model

    out = Path(out)
    if out.suffix.lower() != ".onnx":
        raise ExportError(f"--onnx {out}: the file name must end with .onnx")
    if not out.parent.is_dir():
        raise ExportError(f"--onnx {out}: the folder {out.parent} does not exist")
    model_path = Path(model_path)
    if not model_path.is_file():
        raise ExportError(f"{model_path}: no such model file")
    try:
        loaded = load_model(model_path)
    except (FileNotFoundError, ValueError) as error:  # one line: torch's reasons run to pages
        first = str(error).strip().splitlines()[0]
        raise ExportError(first + (")" if first.count("(") > first.count(")") else "")) from None

    chosen = None
    if probabilities:
        members = loaded.members
        if head is None:
            if len(members) != 1:
                raise ExportError(
                    f"--head is needed: {model_path} has the heads {', '.join(members)}"
                )
            head = members[0]
        elif head not in members:
            raise ExportError(f"--head {head}: no such head; available: {', '.join(members)}")
        if temperature is None:
            temperature = _fitted_temperature(calibration, head)
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)) or (
            temperature <= 0
        ):
            raise ExportError(f"--temperature must be a number > 0, got {temperature!r}")
        chosen = head
    elif head is not None or temperature is not None:
        raise ExportError("--head and --temperature only apply with --probabilities")

    size = loaded.image["size"]
    example = torch.zeros(2, loaded.image["channels"], size[0], size[1])
    wrapper = _wrapper(loaded, chosen, None if chosen is None else float(temperature), example)
    outputs = ["embeddings"] + (["probabilities"] if chosen else [])
    import io

    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(
            wrapper,
            (example,),
            buffer,
            input_names=["images"],
            output_names=outputs,
            dynamic_axes={name: {0: "batch"} for name in ["images", *outputs]},
            opset_version=opset,
            dynamo=False,  # the TorchScript exporter: no onnxscript needed, dynamic batch axis
        )
    # (The legacy exporter warns that it is deprecated; it still is PyTorch's supported path
    # without onnxscript.)
    import onnx

    document = onnx.load_from_string(buffer.getvalue())
    metadata = {
        "item": loaded.item,
        "classes": json.dumps(list(loaded.classes)),
        "image": json.dumps(loaded.image),
        "fingerprint": model_fingerprint(loaded.model.state_dict()),
        "embedding_dim": str(int(loaded.model.heads[loaded.members[0]].embedding_dim)),
    }
    if chosen:
        metadata.update(head=chosen, temperature=repr(float(temperature)))
    for key, value in metadata.items():
        entry = document.metadata_props.add()
        entry.key, entry.value = _META + key, value
    onnx.checker.check_model(document)
    data = document.SerializeToString()
    _check_parity(data, wrapper, example.shape[1:])
    atomic_write_bytes(out, data)
    return out


def _check_parity(data: bytes, wrapper, shape, tolerance: float = 1e-3) -> None:
    """Run the exported graph once on a seeded random batch of 3 against PyTorch: an export that
    computes something else is never written. (The tests check 1e-4 on real images.)"""
    import onnxruntime as ort
    import torch

    images = torch.randn((3, *shape), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = wrapper.reference(images)
    expected = expected if isinstance(expected, tuple) else (expected,)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    found = session.run(None, {"images": images.numpy()})
    for name, want, got in zip(("embeddings", "probabilities"), expected, found):
        error = float(np.max(np.abs(want.numpy() - got))) if got.size else 0.0
        if not error <= tolerance:
            raise ExportError(
                f"the exported {name} differ from PyTorch's by {error:.3g} (> {tolerance}); "
                "the ONNX file was not written"
            )


def _fitted_temperature(calibration: str | Path | None, head: str) -> float:
    if calibration is None:
        raise ExportError(
            "--probabilities needs a temperature: --temperature T, or the calibration file "
            "(--calibration outputs/calibration/<item>.json)"
        )
    path = Path(calibration)
    try:
        found = json.loads(path.read_text(encoding="utf-8")).get("temperatures", {})
    except (OSError, ValueError, AttributeError) as error:
        raise ExportError(f"--calibration {path}: cannot read it ({error})") from None
    if head not in found:
        raise ExportError(f"--calibration {path}: no temperature for the head {head}")
    return float(found[head])


@dataclasses.dataclass
class OnnxModel:
    """An exported model run by onnxruntime, with what :mod:`angular.serve.predict` needs of a
    loaded model (``item``, ``classes``, ``image``, ``members``)."""

    path: Path
    session: object  # onnxruntime.InferenceSession
    item: str
    classes: list[str]
    image: dict
    head: str | None  # the head whose probabilities the file outputs (None: embeddings only)
    temperature: float | None
    fingerprint: str
    embedding_dim: int

    @property
    def members(self) -> list[str]:
        return [self.head] if self.head else []

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """``(embeddings (B, D), probabilities (B, C) or None)`` of preprocessed images."""
        outputs = self.session.run(None, {"images": np.ascontiguousarray(images, np.float32)})
        return outputs[0], (outputs[1] if len(outputs) > 1 else None)

    def run_batches(
        self, batches: Iterable, *, flip_test: bool = False
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """As :func:`angular.serve.inference.run_batches`; the "logits" of the head are the log of
        its calibrated probabilities (softmax of them at temperature 1 gives them back)."""
        embeddings, logits = [], []
        for batch in batches:
            batch = np.asarray(batch, dtype=np.float32)
            embedding, probabilities = self.run(batch)
            if flip_test:
                mirrored, _ = self.run(batch[..., ::-1])
                embedding = unit_rows(embedding) + unit_rows(mirrored)
            embeddings.append(embedding)
            if probabilities is not None:
                logits.append(np.log(np.maximum(probabilities, np.finfo(np.float32).tiny)))
        result = {}
        if self.head:
            result[self.head] = (
                np.concatenate(logits) if logits else np.zeros((0, len(self.classes)), np.float32)
            )
        return (
            np.concatenate(embeddings)
            if embeddings
            else np.zeros((0, self.embedding_dim), np.float32),
            result,
        )


def load_onnx(path: str | Path, *, threads: int = 0) -> OnnxModel:
    """An exported file, ready to run (``threads``: onnxruntime's intra-op threads, 0: its
    default). A missing file, or one that is not an ONNX model exported by ``angular export``,
    raises :class:`ExportError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such ONNX file")
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError(
            f"{path}: running ONNX models needs onnxruntime (pip install onnxruntime)"
        ) from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ExportError(f"{path}: not a readable ONNX model ({message})") from None
    meta = session.get_modelmeta().custom_metadata_map
    missing = [k for k in ("item", "classes", "image") if _META + k not in meta]
    if missing:
        raise ExportError(
            f"{path}: not exported by `angular export` (no {', '.join(_META + k for k in missing)} "
            "in its metadata)"
        )
    head = meta.get(_META + "head")
    return OnnxModel(
        path=path,
        session=session,
        item=meta[_META + "item"],
        classes=json.loads(meta[_META + "classes"]),
        image=json.loads(meta[_META + "image"]),
        head=head,
        temperature=float(meta[_META + "temperature"]) if head else None,
        fingerprint=meta.get(_META + "fingerprint", ""),
        embedding_dim=int(meta.get(_META + "embedding_dim", session.get_outputs()[0].shape[1])),
    )
