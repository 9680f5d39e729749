"""Run an experiment (faces, lfw-dev) for several seeds and write the mean and spread of every metric.

    python experiments/faces/seeds.py                 # seeds 0 1 2 (make faces-seeds)
    python experiments/faces/seeds.py --experiment lfw-dev   # make lfw-dev-seeds
    python experiments/faces/seeds.py --seeds 0 1 2 3 --jobs 1

Each seed ``n`` runs the project's stages (``python -m pipeline.<stage>``, as ``dvc repro`` runs
them) in ``experiments/<name>/runs/seed-<n>/`` on that folder's ``params.yaml`` with
``data.seed = train.seed = n``: another choice of the unknown people, of each known person's
train / val / test faces, and of the initial weights, shuffling and augmentation. MLflow tracking
is off for these runs. Then it writes ``seeds.md`` (the tables of docs/faces.md: mean, sample
standard deviation and range over the seeds, and the issue's bars seed by seed) and
``seeds.json`` (every seed's metrics) into the experiment's folder.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
from check_data import EXPERIMENTS, MissingFaces, check  # noqa: E402

PARAMS = HERE / "params.yaml"

# (key, label) of the columns of each table.
CLASSIFICATION = (
    ("closed_set_accuracy", "closed-set accuracy"),
    ("open_set_accuracy", "open-set accuracy"),
    ("open_set_auroc", "open-set AUROC"),
    ("oscr", "OSCR"),
    ("ece", "ECE"),
    ("ece_uncalibrated", "ECE uncalibrated"),
)
VERIFICATION = (
    ("accuracy", "10-fold accuracy"),
    ("auc", "ROC AUC"),
    ("eer", "EER"),
    ("tar@far=1e-1", "TAR@FAR=1e-1"),
    ("tar@far=1e-2", "TAR@FAR=1e-2"),
    ("tar@far=1e-3", "TAR@FAR=1e-3"),
)
CALIBRATION = (
    ("temperature", "T"),
    ("nll_before", "val NLL before"),
    ("nll_after", "val NLL after"),
    ("ece_before", "val ECE before"),
    ("ece_after", "val ECE after"),
)


def run_seed(seed: int, raw: dict, faces: Path, experiment: str = "faces", tag: str = "") -> dict:
    """Run every stage for one seed; returns its metrics and wall time."""
    folder = EXPERIMENTS[experiment].folder / "runs" / f"{tag + '-' if tag else ''}seed-{seed}"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    params = copy.deepcopy(raw)
    params["data"].update(seed=seed, path=str(faces))
    params["train"]["seed"] = seed
    params["tracking"]["enabled"] = False
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    commands = [["prepare"]]
    for item in params["train"]["items"]:
        commands += [["train", item], ["calibrate", item]]
    commands.append(["evaluate"])
    start = time.monotonic()
    with open(folder / "log.txt", "w", encoding="utf-8") as log:
        for stage, *args in commands:
            print(f"seed {seed}: {' '.join([stage, *args])}", file=sys.stderr, flush=True)
            done = subprocess.run(
                [sys.executable, "-m", f"pipeline.{stage}", *args],
                cwd=folder,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            if done.returncode != 0:
                raise SystemExit(
                    f"seed {seed}: {stage} {' '.join(args)} failed (exit {done.returncode}); "
                    f"see {folder / 'log.txt'}"
                )
    seconds = time.monotonic() - start
    evaluated = json.loads((folder / "metrics" / "evaluate.json").read_text(encoding="utf-8"))
    calibration = {}
    for item in params["train"]["items"]:
        path = folder / "metrics" / "calibrate" / f"{item}.json"
        for member, values in json.loads(path.read_text(encoding="utf-8")).items():
            calibration[member] = {
                "temperature": values["temperature"],
                "nll_before": values["before"]["nll"],
                "nll_after": values["after"]["nll"],
                "ece_before": values["before"]["ece"],
                "ece_after": values["after"]["ece"],
            }
    return {"seed": seed, "seconds": seconds, "evaluate": evaluated, "calibration": calibration}


def _stats(values: list) -> dict | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return None
    mean = sum(values) / len(values)
    std = (
        math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        if len(values) > 1
        else 0.0
    )
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": len(values)}


def _cell(stats: dict | None, n_seeds: int, key: str) -> str:
    """``mean ± std``; empty when no seed has a value (``n/r`` for a FAR too small to resolve)."""
    if stats is None:
        return "n/r" if key.startswith("tar@") else ""
    text = f"{stats['mean']:.4f} ± {stats['std']:.4f}"
    return text if stats["n"] == n_seeds else f"{text} ({stats['n']} seeds)"


def _table(title: str, rows: dict[str, list[dict]], columns) -> list[str]:
    """A markdown table: one row per head (its per-seed dicts), one column per metric."""
    lines = [f"**{title}**", "", "| | " + " | ".join(label for _, label in columns) + " |"]
    lines.append("|---|" + "---:|" * len(columns))
    for name, per_seed in rows.items():
        cells = [
            _cell(_stats([entry.get(key) for entry in per_seed]), len(per_seed), key)
            for key, _ in columns
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


# The headline table (README): (section of evaluate.json, key, label); verification on the unknown people.
HEADLINE = (
    ("classification", "closed_set_accuracy", "closed-set accuracy"),
    ("classification", "open_set_accuracy", "open-set accuracy"),
    ("classification", "ece", "ECE"),
    ("verification", "accuracy", "unknown: 10-fold accuracy"),
    ("verification", "auc", "unknown: ROC AUC"),
    ("verification", "tar@far=1e-2", "unknown: TAR@FAR=1e-2"),
)


def headline(results: list[dict], rule: str = "mean_prob") -> list[str]:
    """One row per head and one for the ensemble (``rule`` for classification, the concatenated
    embeddings for verification): the table the README quotes."""
    first = results[0]["evaluate"]
    rows = {}
    # One head alone has no ensemble row (evaluate scores no ensemble of one member).
    names = [
        *first["heads"],
        *(["ensemble"] if "ensemble" in first["verification"]["unknown"] else []),
    ]
    for name in names:
        rows[name] = [
            {
                **(e["heads"][name] if name in e["heads"] else e["ensembles"][rule]),
                **{f"v:{k}": v for k, v in e["verification"]["unknown"][name].items()},
            }
            for e in (r["evaluate"] for r in results)
        ]
    columns = [(k if part == "classification" else f"v:{k}", label) for part, k, label in HEADLINE]
    return _table(
        f"Faces, mean ± std over seeds (ensemble: {rule.replace('_', ' ')} of the calibrated heads; "
        "its verification concatenates their embeddings)",
        rows,
        columns,
    )


def _best_head_accuracy(e: dict) -> float:
    return max(v["closed_set_accuracy"] for v in e["heads"].values())


def _unknown_ensemble(e: dict) -> dict:
    found = e["verification"]["unknown"]
    return found.get("ensemble") or next(iter(found.values()))


def _head_gap(e: dict, value, worse: str = "sphereface", better: str = "arcface") -> float:
    """``worse``'s figure minus ``better``'s (``value(e, head)``); 0 when a head is missing."""
    if worse not in e["heads"] or better not in e["heads"]:
        return 0.0
    return value(e, worse) - value(e, better)


def _unknown_auc(e: dict, head: str) -> float:
    return e["verification"]["unknown"][head]["auc"]


def _accuracy(e: dict, head: str) -> float:
    return e["heads"][head]["closed_set_accuracy"]


def bars(experiment: str = "faces") -> tuple:
    """The issue's bars for an experiment: (text, the measured value of one seed, its floor)."""
    described = EXPERIMENTS[experiment]
    found = []
    if described.min_head_accuracy is not None:
        floor = described.min_head_accuracy
        found.append(
            (
                f"lowest head closed-set accuracy >= {floor:g}",
                lambda e: min(v["closed_set_accuracy"] for v in e["heads"].values()),
                lambda e: floor,
            )
        )
    found += [
        (
            "lowest ensemble rule closed-set accuracy >= the best head's",
            lambda e: min(v["closed_set_accuracy"] for v in e["ensembles"].values()),
            _best_head_accuracy,
        ),
        (
            f"ensemble verification on the unknown people: ROC AUC >= {described.auc_floor:g}",
            lambda e: _unknown_ensemble(e)["auc"],
            lambda e: described.auc_floor,
        ),
        (
            f"ensemble verification on the unknown people: TAR@FAR=1e-2 >= {described.tar_floor:g}",
            lambda e: _unknown_ensemble(e)["tar@far=1e-2"] or 0.0,
            lambda e: described.tar_floor,
        ),
        (
            "sphereface - arcface closed-set accuracy >= -0.02",
            lambda e: _head_gap(e, _accuracy),
            lambda e: -0.02,
        ),
        (
            "sphereface - arcface unknown-pair ROC AUC >= -0.03",
            lambda e: _head_gap(e, _unknown_auc),
            lambda e: -0.03,
        ),
    ]
    return tuple(found)


BARS = bars("faces")


def summary(results: list[dict], raw: dict, experiment: str = "faces") -> str:
    seeds = ", ".join(str(r["seed"]) for r in results)
    first = results[0]["evaluate"]
    heads = {name: [r["evaluate"]["heads"][name] for r in results] for name in first["heads"]}
    rules = {
        f"ensemble {name}": [r["evaluate"]["ensembles"][name] for r in results]
        for name in first["ensembles"]
    }
    minutes = [r["seconds"] / 60 for r in results]
    lines = [
        f"Seeds {seeds} (data.seed = train.seed); mean ± sample standard deviation over the "
        f"seeds. One seed's pipeline took {min(minutes):.1f} to {max(minutes):.1f} minutes "
        f"({platform.machine()}, {os.cpu_count()} CPU cores, "
        f"{results[0].get('seeds_at_once', 1)} seed(s) at once, train.num_threads "
        f"{raw['train']['num_threads']}). {EXPERIMENTS[experiment].credit}",
        "",
    ]
    if "unknown" in first["verification"]:
        lines += headline(results)
    lines += _table(
        "Closed-set and open-set recognition (test faces of the known people; open set: "
        "+ the faces of the unknown people; thresholds chosen on validation)",
        heads | rules,
        CLASSIFICATION,
    )
    for split, what in (("unknown", "the unknown people"), ("test", "the known people")):
        if split not in first["verification"]:
            continue
        rows = {
            name: [r["evaluate"]["verification"][split][name] for r in results]
            for name in first["verification"][split]
        }
        lines += _table(
            f"Verification on pairs of faces of {what} (cosine similarity"
            f"{', flip-test' if raw['evaluate']['verification']['flip_test'] else ''}; "
            f"{int(first['verification'][split][next(iter(rows))]['n_genuine'])} genuine and "
            f"{int(first['verification'][split][next(iter(rows))]['n_impostor'])} impostor pairs "
            "per seed)",
            rows,
            VERIFICATION,
        )
    calibration = {name: [r["calibration"][name] for r in results] for name in first["heads"]}
    lines += _table(
        "Calibration (temperature fitted on the validation faces; T stays 1 when a head "
        "classifies all of them correctly)",
        calibration,
        CALIBRATION,
    )
    lines += ["**The issue's bars, seed by seed**", ""]
    lines += ["| bar | " + " | ".join(f"seed {r['seed']}" for r in results) + " |"]
    lines += ["|---|" + ":---:|" * len(results)]
    for text, measured, floor in bars(experiment):
        marks = []
        for r in results:
            value = measured(r["evaluate"])
            holds = value >= floor(r["evaluate"]) - 1e-12
            marks.append(f"{value:.4f} {'yes' if holds else '**no**'}")
        lines.append(f"| {text} | " + " | ".join(marks) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--experiment", choices=sorted(EXPERIMENTS), default="faces")
    parser.add_argument("--params", type=Path, help="default: experiments/<name>/params.yaml")
    parser.add_argument(
        "--jobs",
        type=int,
        default=min(3, os.cpu_count() or 1),
        help="seeds run at once (each stage uses train.num_threads threads); default: the CPU "
        "cores, at most 3",
    )
    parser.add_argument(
        "--tag",
        default="",
        help="a variant's name (say, with --params): writes seeds-<tag>.md and seeds-<tag>.json and "
        "runs in runs/<tag>-seed-<n>, leaving the experiment's own tables alone",
    )
    parser.add_argument(
        "--items",
        nargs="+",
        help="the heads to train (train.items); default: the params file's",
    )
    parser.add_argument(
        "--summarize",
        action="store_true",
        help="only rewrite seeds.md from the seeds.json of the last run",
    )
    args = parser.parse_args(argv)
    folder = EXPERIMENTS[args.experiment].folder
    params = args.params or folder / "params.yaml"
    stem = f"seeds-{args.tag}" if args.tag else "seeds"
    seeds_json, seeds_md = folder / f"{stem}.json", folder / f"{stem}.md"
    raw = yaml.safe_load(params.read_text(encoding="utf-8"))
    if args.items:
        raw["train"]["items"] = list(args.items)
    if args.summarize:
        results = json.loads(seeds_json.read_text(encoding="utf-8"))
        text = summary(results, raw, args.experiment)
        seeds_md.write_text(text, encoding="utf-8")
        print(text)
        return 0
    try:
        faces = check(params, args.experiment)
    except MissingFaces as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    started = time.monotonic()
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    # Each seed's stages are subprocesses in their own folder: threads are enough to overlap them.
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(
            pool.map(lambda seed: run_seed(seed, raw, faces, args.experiment, args.tag), args.seeds)
        )
    for result in results:
        result["seeds_at_once"] = min(args.jobs, len(args.seeds))
    seeds_json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    text = summary(results, raw, args.experiment)
    seeds_md.write_text(text, encoding="utf-8")
    print(text)
    print(
        f"seeds: {len(results)} runs in {(time.monotonic() - started) / 60:.1f} minutes; "
        f"wrote {seeds_md} and {seeds_json}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
