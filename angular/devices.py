"""Device names as users write them (``auto``, ``cpu``, ``cuda``, ``cuda:N``), resolved once for
training and serving alike. Callers put the problem into their own error (a config key, a flag)."""

from __future__ import annotations

import torch


def select_device(name: str = "cpu") -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:<index>``, as a device this
    machine has; ``ValueError`` saying what is wrong otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError("not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("no CUDA device is available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ValueError("only cpu and cuda are supported")
    return device
