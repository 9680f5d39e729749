"""Helpers of the reliability tests (issue 6): stages run as real processes, in temporary projects.

The pipeline tests' helpers (``tests/pipeline/pipeline_testing.py``: the shipped params made tiny,
image folders, the prepared-digits fixtures) are reused from here; conftest.py re-exports the
fixtures. A uniquely named module, so that no other test folder's helpers can shadow it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

PIPELINE_TESTS = Path(__file__).resolve().parents[1] / "pipeline"
if str(PIPELINE_TESTS) not in sys.path:
    sys.path.insert(0, str(PIPELINE_TESTS))

from pipeline_testing import (  # noqa: E402  (needs the path above)
    REPO,
    digits_prepared,
    make_image_folder,
    project,
    set_key,
    shipped_raw,
    tiny_raw,
    write_params,
)

from angular.training import TrainPaths  # noqa: E402

__all__ = [
    "REPO",
    "STEPS_PER_EPOCH",
    "digits_prepared",
    "project",
    "make_image_folder",
    "set_key",
    "shipped_raw",
    "tiny_raw",
    "write_params",
    "stage_environment",
    "run_stage_process",
    "run_python",
    "closed_port",
    "paths_in",
    "model_state",
    "assert_same_state",
    "copy_prepared",
]

STEPS_PER_EPOCH = 15  # 935 training digits (shipped data params) in batches of 64


def stage_environment(**overrides: str | None) -> dict[str, str]:
    """The environment a stage runs in: the repository importable (stages are ``python -m
    pipeline.<stage>`` run from a project folder), this interpreter first on the PATH; an override
    of None removes the variable."""
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for name, value in overrides.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def run_stage_process(
    folder: Path, stage: str, *args: str, timeout: float = 300, **env: str | None
) -> subprocess.CompletedProcess:
    """``python -m pipeline.<stage> [args]`` in the project ``folder``, as DVC runs it."""
    return subprocess.run(
        [sys.executable, "-m", f"pipeline.{stage}", *args],
        cwd=folder,
        env=stage_environment(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_python(
    folder: Path, code: str, *, timeout: float = 300, **env: str | None
) -> subprocess.CompletedProcess:
    """A Python snippet in a fresh interpreter, in ``folder``, with the stages' environment."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=folder,
        env=stage_environment(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def closed_port() -> int:
    """A localhost port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def paths_in(folder: Path) -> TrainPaths:
    return TrainPaths(
        model=folder / "model.pt",
        checkpoints=folder / "checkpoints",
        metrics=folder / "metrics.json",
        loss_plot=folder / "loss.tsv",
        accuracy_plot=folder / "accuracy.tsv",
    )


def model_state(path: Path) -> dict:
    return torch.load(path, weights_only=True)["state_dict"]


def assert_same_state(first: dict, second: dict) -> None:
    """Bitwise equality of two state dicts."""
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def copy_prepared(prepared: Path, folder: Path) -> Path:
    """A project folder holding a copy of prepared data at data/prepared."""
    shutil.copytree(prepared, folder / "data" / "prepared")
    return folder
