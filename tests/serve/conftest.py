"""Fixtures of the serving tests (helpers in serve_testing.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from serve_testing import faces_raw, orl_slice, run_pipeline


@pytest.fixture(scope="session")
def orl_project(tmp_path_factory) -> Path:
    """ArcFace trained for 30 epochs on ORL people s1-s24 (16 known, 8 unknown), calibrated and
    evaluated (the faces experiment's params otherwise); s25-s40 are never seen by the pipeline."""
    folder = tmp_path_factory.mktemp("orl_project")
    faces = orl_slice(folder / "faces", range(1, 25))
    return run_pipeline(folder, faces_raw(faces, unknown=8, epochs=30))
