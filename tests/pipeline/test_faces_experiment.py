"""The faces experiment (experiments/faces, docs/faces.md): its params are valid and in step with the
project's, its dvc.yaml is the project's stages run from there, it stops early with a clear
message without the ORL faces, and (when ../shared/data/orl is there) a tiny version runs end to
end under `dvc repro`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
FACES = REPO / "experiments" / "faces"
import check_data  # noqa: E402
import dvc_yaml  # noqa: E402
from pipeline_testing import ORL, shipped_raw  # noqa: E402

from angular.config import load_params  # noqa: E402

# Keys the faces params may leave out or add: the optional ones of angular.config.
OPTIONAL = {"evaluate.verification.pairs_file", "evaluate.verification.flip_test"}


def keys(node, prefix="") -> set[str]:
    """Dotted keys of nested mappings (heads.<name> entries are names, not keys: skipped)."""
    found = set()
    for key, value in node.items():
        name = f"{prefix}.{key}" if prefix else key
        if name == "heads":
            continue
        found.add(name)
        if isinstance(value, dict):
            found |= keys(value, name)
    return found


def test_the_faces_params_are_valid_and_hold_the_projects_keys():
    params = load_params(FACES / "params.yaml")
    assert params.data.source == "imagefolder" and params.data.unknown_identities == 10
    assert (FACES / params.data.path).resolve() == ORL.resolve()
    assert params.train.items == ("arcface", "cosface", "sphereface")
    assert params.train.num_threads == 1 and params.tracking.experiment == "angular-faces"
    faces = yaml.safe_load((FACES / "params.yaml").read_text(encoding="utf-8"))
    assert keys(faces) - OPTIONAL == keys(shipped_raw()) - OPTIONAL


def test_the_faces_dvc_yaml_is_the_projects_stages_run_from_there():
    current = (FACES / "dvc.yaml").read_text(encoding="utf-8")
    assert current == dvc_yaml.text(), "run `python experiments/faces/dvc_yaml.py`"
    assert dvc_yaml.main(["--check"]) == 0
    project = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))
    faces = yaml.safe_load(current)
    assert list(faces["stages"]) == list(project["stages"])
    assert faces["plots"] == project["plots"]
    for name, stage in faces["stages"].items():
        body, original = (
            stage.get("do", stage),
            project["stages"][name].get("do", project["stages"][name]),
        )
        assert body["cmd"] == f"PYTHONPATH=../.. {original['cmd']}"
        for key in ("params", "outs", "metrics"):
            assert body.get(key) == original.get(key), (name, key)
        for dep, original_dep in zip(body["deps"], original["deps"], strict=True):
            if original_dep.split("/")[0] in ("angular", "pipeline", "csrc"):
                assert dep == f"../../{original_dep}" and (FACES / dep).exists(), dep
            else:
                assert dep == original_dep  # this experiment's own files


def test_without_the_orl_faces_it_says_where_to_put_them(tmp_path):
    raw = yaml.safe_load((FACES / "params.yaml").read_text(encoding="utf-8"))
    raw["data"]["path"] = "../nowhere/orl"
    params = tmp_path / "experiment" / "params.yaml"
    params.parent.mkdir()
    params.write_text(yaml.safe_dump(raw), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(FACES / "check_data.py"), "--params", str(params)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    message = done.stderr
    assert str((tmp_path / "nowhere" / "orl").resolve()) in message
    assert "does not exist" in message and "Olivetti Research Laboratory" in message
    assert f"set data.path in {params}" in message
    (tmp_path / "nowhere" / "orl").mkdir(parents=True)  # a folder, but no identities in it
    with pytest.raises(check_data.MissingFaces, match="holds no identity folder"):
        check_data.check(params)


def dvc(folder: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_a_tiny_faces_experiment_runs_end_to_end_under_dvc(tmp_path):
    """The faces dvc.yaml in a copy of the project, on 8 ORL people (2 unknown), one head and one
    epoch: every stage runs in experiments/faces and writes there."""
    if not (ORL / "s1").is_dir():
        pytest.skip(f"the ORL faces are not at {ORL}")
    project = tmp_path / "project"
    for name in ("angular", "pipeline", "csrc"):
        shutil.copytree(
            REPO / name, project / name, ignore=shutil.ignore_patterns("__pycache__", "*.o")
        )
    for name in ("dvc.yaml", "params.yaml"):  # DVC reads every dvc.yaml of the project
        shutil.copy(REPO / name, project)
    faces = project / "experiments" / "faces"
    faces.mkdir(parents=True)
    shutil.copy(FACES / "dvc.yaml", faces)
    people = tmp_path / "orl"
    people.mkdir()
    for index in range(1, 9):
        (people / f"s{index}").symlink_to(ORL.resolve() / f"s{index}", target_is_directory=True)
    raw = yaml.safe_load((FACES / "params.yaml").read_text(encoding="utf-8"))
    raw["data"].update(path="../../../orl", unknown_identities=2)  # relative, as shipped
    raw["train"].update(items=["arcface"], epochs=1)
    raw["evaluate"]["embedding_plot"] = False
    raw["tracking"]["enabled"] = False
    (faces / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    assert dvc(project, "init", "--no-scm", "-q").returncode == 0

    done = dvc(project, "repro", "experiments/faces/dvc.yaml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Running stage 'experiments/faces/dvc.yaml:evaluate'" in done.stdout
    results = json.loads((faces / "metrics" / "evaluate.json").read_text(encoding="utf-8"))
    assert list(results["heads"]) == ["arcface"]
    assert results["verification"]["unknown"]["arcface"]["n_genuine"] == 2 * 45
    prepared = json.loads((faces / "metrics" / "prepare.json").read_text(encoding="utf-8"))
    assert prepared["known_identities"] == 6 and prepared["unknown_identities"] == 2
    assert (faces / "outputs" / "models" / "arcface.pt").is_file()
    assert not (project / "outputs").exists() and not (project / "metrics").exists()
    again = dvc(project, "repro", "experiments/faces/dvc.yaml")
    assert again.returncode == 0 and "Running stage" not in again.stdout


def _evaluated(accuracy: float, auc: float, tar: float) -> dict:
    """An evaluate.json shaped like the stage's, with the given figures for every row."""
    classification = {"closed_set_accuracy": accuracy, "open_set_accuracy": accuracy - 0.1}
    classification |= {"ece": 0.02, "open_set_auroc": 0.9, "oscr": 0.9}
    verification = {"accuracy": 0.97, "auc": auc, "tar@far=1e-2": tar, "eer": 0.05}
    verification |= {"n_genuine": 450, "n_impostor": 4500}
    heads = ("arcface", "cosface")
    return {
        "heads": {
            h: dict(classification, closed_set_accuracy=accuracy - 0.02, ece_uncalibrated=0.03)
            for h in heads
        },
        "ensembles": {"mean_prob": dict(classification)},
        "verification": {"unknown": {h: dict(verification) for h in (*heads, "ensemble")}},
    }


def test_the_seeds_summary_gives_means_spreads_and_the_bars():
    import seeds

    raw = yaml.safe_load((FACES / "params.yaml").read_text(encoding="utf-8"))
    calibration = {"temperature": 1.2, "nll_before": 0.1, "nll_after": 0.09}
    calibration |= {"ece_before": 0.02, "ece_after": 0.01}
    results = [
        {
            "seed": seed,
            "seconds": 60.0 * (seed + 1),
            "evaluate": _evaluated(*figures),
            "calibration": {"arcface": calibration, "cosface": calibration},
        }
        for seed, figures in enumerate([(0.96, 0.99, 0.90), (1.0, 0.97, 0.80)])
    ]
    text = seeds.summary(results, raw)
    headline = next(line for line in text.splitlines() if line.startswith("| ensemble |"))
    # closed-set accuracy 0.98 ± 0.0283 (sample std of 0.96, 1.0); AUC 0.98 ± 0.0141; TAR 0.85.
    assert headline.split(" | ")[1:2] == ["0.9800 ± 0.0283"], headline
    assert "0.9800 ± 0.0141" in headline and "0.8500 ± 0.0707" in headline, headline
    assert "1.0 to 2.0 minutes" in text
    bar = next(line for line in text.splitlines() if "ROC AUC >= 0.98" in line)
    assert "0.9900 yes" in bar and "0.9700 **no**" in bar, bar
