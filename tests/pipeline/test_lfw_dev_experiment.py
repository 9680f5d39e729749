"""The lfw-dev experiment (experiments/lfw-dev, docs/faces.md "Faces in the wild"): its params are
valid and hold the project's keys, its dvc.yaml is the project's stages run from there (generated
by the faces experiment's dvc_yaml.py), it stops at once and says where to put the folder when
lfw-dev is absent, and its seeds summary checks the issue's bars for it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
LFW_DEV = REPO / "experiments" / "lfw-dev"
FACES = REPO / "experiments" / "faces"
import check_data  # noqa: E402
import dvc_yaml  # noqa: E402
import seeds  # noqa: E402
from test_faces_experiment import OPTIONAL, _evaluated, keys  # noqa: E402

from angular.config import load_params  # noqa: E402

SHARED_LFW_DEV = (REPO / "../shared/data/lfw-dev").resolve()


def test_the_lfw_dev_params_are_valid_and_hold_the_projects_keys():
    params = load_params(LFW_DEV / "params.yaml")
    assert params.data.unknown_identities == 16 and params.data.source == "imagefolder"
    assert (LFW_DEV / params.data.path).resolve() == SHARED_LFW_DEV
    assert params.data.crop.box == (61, 61, 189, 189) and params.data.image_size == (64, 64)
    assert params.train.items == ("arcface", "cosface", "sphereface")
    raw = yaml.safe_load((LFW_DEV / "params.yaml").read_text(encoding="utf-8"))
    project = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    assert keys(raw) - OPTIONAL == keys(project) - OPTIONAL


def test_the_lfw_dev_dvc_yaml_is_generated_like_the_faces_one():
    current = (LFW_DEV / "dvc.yaml").read_text(encoding="utf-8")
    assert current == dvc_yaml.text("lfw-dev"), "run `python experiments/faces/dvc_yaml.py`"
    assert "`make lfw-dev`" in current.splitlines()[2]
    faces = yaml.safe_load((FACES / "dvc.yaml").read_text(encoding="utf-8"))
    assert yaml.safe_load(current) == faces  # the same stages, only the header differs
    assert dvc_yaml.main(["--check"]) == 0


def test_without_lfw_dev_it_stops_at_once_and_says_where_to_put_it(tmp_path):
    raw = yaml.safe_load((LFW_DEV / "params.yaml").read_text(encoding="utf-8"))
    raw["data"]["path"] = "../nowhere/lfw-dev"
    params = tmp_path / "experiment" / "params.yaml"
    params.parent.mkdir()
    params.write_text(yaml.safe_dump(raw), encoding="utf-8")
    command = [sys.executable, str(FACES / "check_data.py"), "--experiment", "lfw-dev"]
    done = subprocess.run(
        [*command, "--params", str(params)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    message = done.stderr
    assert str((tmp_path / "nowhere" / "lfw-dev").resolve()) in message
    assert "the lfw-dev experiment needs lfw-dev" in message and "does not exist" in message
    assert "../shared/data/lfw-dev next to the project" in message
    assert f"set data.path in {params}" in message
    # seeds.py stops the same way, before running anything.
    done = subprocess.run(
        [
            sys.executable,
            str(FACES / "seeds.py"),
            "--experiment",
            "lfw-dev",
            "--params",
            str(params),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and "does not exist" in done.stderr


@pytest.mark.skipif(not SHARED_LFW_DEV.is_dir(), reason=f"lfw-dev is not at {SHARED_LFW_DEV}")
def test_check_data_finds_the_96_people_of_lfw_dev():
    assert check_data.check(LFW_DEV / "params.yaml", "lfw-dev") == SHARED_LFW_DEV
    people = [p for p in SHARED_LFW_DEV.iterdir() if p.is_dir()]
    assert len(people) == 96


def test_the_lfw_dev_seeds_summary_checks_its_own_bars():
    raw = yaml.safe_load((LFW_DEV / "params.yaml").read_text(encoding="utf-8"))
    results = []
    for seed, figures in enumerate([(0.80, 0.91, 0.40), (0.85, 0.88, 0.30)]):
        evaluated = _evaluated(*figures)
        evaluated["heads"]["sphereface"] = dict(
            evaluated["heads"]["arcface"], closed_set_accuracy=figures[0] - 0.05
        )
        evaluated["verification"]["unknown"]["sphereface"] = dict(
            evaluated["verification"]["unknown"]["arcface"], auc=figures[1] - 0.01
        )
        calibration = {"temperature": 1.0, "nll_before": 0.5, "nll_after": 0.5}
        calibration |= {"ece_before": 0.05, "ece_after": 0.04}
        results.append(
            {
                "seed": seed,
                "seconds": 600.0,
                "evaluate": evaluated,
                "calibration": dict.fromkeys(evaluated["heads"], calibration),
            }
        )
    text = seeds.summary(results, raw, "lfw-dev")
    assert "Labeled Faces in the Wild" in text and "Olivetti" not in text
    assert "lowest head closed-set accuracy" not in text  # ORL's bar, not lfw-dev's
    line = next(row for row in text.splitlines() if "ROC AUC >= 0.9 " in row)
    assert "0.9100 yes" in line and "0.8800 **no**" in line, line
    line = next(row for row in text.splitlines() if "TAR@FAR=1e-2 >= 0.35" in row)
    assert "0.4000 yes" in line and "0.3000 **no**" in line, line
    line = next(row for row in text.splitlines() if "closed-set accuracy >= -0.02" in row)
    assert line.count("**no**") == 2, line  # sphereface 0.05 below arcface on both seeds
    line = next(row for row in text.splitlines() if "ROC AUC >= -0.03" in row)
    assert line.count("yes") == 2, line
