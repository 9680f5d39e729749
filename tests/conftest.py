"""Fixtures shared by every test folder.

The test tree mirrors the package (ops, nn, data, eval, train, serve, config, distributed), with
pipeline/ for the DVC stages and experiments, benchmarks/ for the benchmark scripts, and
reliability/ for fault injection (killed processes, a full disk, a broken tracking server): those
tests drive whole stages as processes and prove the guarantees of docs/reliability.md, so they sit
together where that document points. Helpers live in tests/support/, on pytest's pythonpath.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pipeline_testing import digits_prepared, project  # noqa: F401  (fixtures)
from serve_testing import faces_raw, orl_slice, run_pipeline


@pytest.fixture(scope="session")
def orl_project(tmp_path_factory) -> Path:
    """ArcFace trained for 30 epochs on ORL people s1-s24 (16 known, 8 unknown), calibrated and
    evaluated (the faces experiment's params otherwise); s25-s40 are never seen by the pipeline."""
    folder = tmp_path_factory.mktemp("orl_project")
    faces = orl_slice(folder / "faces", range(1, 25))
    return run_pipeline(folder, faces_raw(faces, unknown=8, epochs=30))
