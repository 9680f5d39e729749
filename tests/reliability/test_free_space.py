"""`make setup` refuses at once, naming the free and needed space, when the disk cannot hold torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "check_free_space.py"


def run(*arguments: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *arguments],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=60,
    )


def test_too_little_space_is_refused_with_the_numbers(tmp_path):
    done = run(str(tmp_path / ".venv"), "1e9")
    assert done.returncode == 1
    assert f"{tmp_path}: " in done.stderr and "GiB free, 1e+09 GiB needed" in done.stderr
    assert "ANGULAR_MIN_FREE_GIB=0" in done.stderr


def test_enough_space_or_a_zero_requirement_passes(tmp_path):
    assert run(str(tmp_path), "0").returncode == 0
    assert run(str(tmp_path), ANGULAR_MIN_FREE_GIB="0").returncode == 0
    assert run(str(tmp_path), ANGULAR_MIN_FREE_GIB="1e9").returncode == 1


def test_a_requirement_that_is_not_a_number_is_named():
    done = run(".", ANGULAR_MIN_FREE_GIB="lots")
    assert done.returncode == 2 and "must be a number, got 'lots'" in done.stderr
