"""Loads the compiled extension (``angular.ops._C``) once and says which backend serves the ops.

Importing ``angular.ops._C`` runs the extension's ``TORCH_LIBRARY(angular, m)`` block, which defines
the ``torch.ops.angular.*`` schemas and registers the CPU (and, when built with CUDA, CUDA) kernels.
When the import fails, or ``ANGULAR_BACKEND=python`` is set, the ops run the Python reference and
one warning names the reason.

The extension lives in this package (``setup.py`` builds it here), so loading it imports nothing
above ``angular.ops``. Builds before that put it at ``angular/_C*.so``: such a file is never loaded
(it would register the same ops twice), and the reason names it so that a stale build is rebuilt,
not silently ignored.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import torch

BACKEND_ENV = "ANGULAR_BACKEND"
_VALID_CHOICES = ("auto", "python", "cpp", "cuda")


@functools.lru_cache(maxsize=1)
def load() -> tuple[bool, str]:
    """Return ``(loaded, reason)``; ``reason`` says why the fused ops are off when they are."""
    choice = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if choice not in _VALID_CHOICES:
        raise ValueError(f"{BACKEND_ENV}={choice!r}: expected one of {', '.join(_VALID_CHOICES)}")
    if choice == "python":
        return False, f"{BACKEND_ENV}=python is set"
    try:
        from angular.ops import _C  # noqa: F401  (importing registers the ops)
    except ImportError as error:
        detail = f"{error}{stale_build_note()}"
        if choice != "auto":
            raise RuntimeError(
                f"{BACKEND_ENV}={choice} but the compiled extension failed to load: {detail}"
            ) from error
        return False, f"the compiled extension angular.ops._C is not available ({detail})"
    return True, ""


def stale_build_note() -> str:
    """Names the libraries that builds from before the move to ``angular.ops`` left in angular/."""
    root = Path(__file__).resolve().parents[1]
    stale = sorted(path.name for path in root.glob("_C.*") if path.suffix in (".so", ".pyd"))
    if not stale:
        return ""
    names = ", ".join(f"angular/{name}" for name in stale)
    return f"; {names} is an older build, not loaded: rebuild with `make build`"


def has_kernel(device_type: str) -> bool:
    """Whether the loaded extension has a kernel for tensors on ``device_type`` ("cpu" or "cuda")."""
    loaded, _ = load()
    if not loaded:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "angular::margin_logits", key
    )


@functools.cache
def warn_fallback_once(reason: str) -> None:
    """Say once per process (and per reason) that the reference serves the ops, and why."""
    warnings.warn(
        f"angular: running the pure-PyTorch reference margin ops because {reason}; "
        "build the extension (see README) for the fused kernels.",
        RuntimeWarning,
        stacklevel=4,  # warn_fallback_once <- _fused_for <- ops.margin_* <- caller,
    )
