"""Helpers of the serving tests: small models trained by the pipeline's own stages, on a slice of
the ORL faces (real images; skipped when ../shared/data/orl is absent) or on the digits."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
from pipeline_testing import ORL, tiny_raw, write_params  # noqa: E402

from pipeline import calibrate, evaluate, prepare, run_stage  # noqa: E402
from pipeline import train as train_stage  # noqa: E402

FACES_PARAMS = REPO / "experiments" / "faces" / "params.yaml"


def run_pipeline(folder: Path, raw: dict, *, evaluate_too: bool = True) -> Path:
    """prepare -> train -> calibrate (-> evaluate) in ``folder``, in this process."""
    write_params(folder, raw)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        assert run_stage(prepare.main, []) == 0
        for item in raw["train"]["items"]:
            assert run_stage(train_stage.main, [item]) == 0
            assert run_stage(calibrate.main, [item]) == 0
        if evaluate_too:
            assert run_stage(evaluate.main, []) == 0
    return folder


def orl_slice(folder: Path, people: range) -> Path:
    """A folder of symbolic links to some of the ORL people (``s<n>``)."""
    if not (ORL / "s1").is_dir():
        pytest.skip(f"the ORL faces are not at {ORL}")
    folder.mkdir(parents=True)
    for index in people:
        (folder / f"s{index}").symlink_to(ORL.resolve() / f"s{index}", target_is_directory=True)
    return folder


def faces_raw(path: Path, *, unknown: int, epochs: int, evaluate_too: bool = True) -> dict:
    """The faces experiment's params on ``path``, one ArcFace head."""
    raw = yaml.safe_load(FACES_PARAMS.read_text(encoding="utf-8"))
    raw["data"].update(path=str(path), unknown_identities=unknown)
    raw["train"].update(items=["arcface"], epochs=epochs, num_threads=0)
    raw["evaluate"]["embedding_plot"] = False
    raw["tracking"]["enabled"] = False
    return raw


def digits_raw(**overrides) -> dict:
    return tiny_raw(train__items=["arcface"], train__epochs=1, **overrides)


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m angular.cli ARGS`` in ``cwd``, as a user runs it."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("ANGULAR_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "angular.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
