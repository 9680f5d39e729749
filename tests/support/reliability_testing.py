"""Helpers of the reliability tests (docs/reliability.md): stages run as real processes, in temporary projects.

The pipeline tests' helpers (``tests/support/pipeline_testing.py``: the shipped params made tiny,
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

from pipeline_testing import (
    REPO,
    STEPS_PER_EPOCH,
    assert_same_state,
    create_empty_store,
    digits_prepared,
    make_image_folder,
    model_state,
    paths_in,
    project,
    set_key,
    shipped_raw,
    tiny_raw,
    write_params,
)

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
    "create_empty_store",
    "paths_in",
    "model_state",
    "assert_same_state",
    "copy_prepared",
]


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


def copy_prepared(prepared: Path, folder: Path) -> Path:
    """A project folder holding a copy of prepared data at data/prepared."""
    shutil.copytree(prepared, folder / "data" / "prepared")
    return folder
