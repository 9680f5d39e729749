"""Stage ``calibrate@<item>``: a temperature per head of a trained item.

``python -m pipeline.calibrate arcface``. Each head's logits on the validation split are divided by a
temperature ``T``: fitted (``calibrate.method: fit``, minimising the NLL over ``log T``) or fixed
(``method: fixed``, ``calibrate.temperature``: the original's ``SCALING_FACTOR``). When a head classifies every validation
image correctly the NLL has no minimum (it falls as ``T -> 0``): T stays 1, and the stage says so.
Writes the
temperatures (``outputs/calibration/<item>.json``, read by evaluate), NLL / ECE / Brier / accuracy
before (T = 1) and after (``metrics/calibrate/<item>.json``), and a reliability diagram per head
before and after (``outputs/plots/calibrate/<item>/``).
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Sequence

from angular.config import load_params
from angular.eval.calibration import calibrate_logits
from angular.eval.classification import softmax
from angular.eval.plots import reliability_diagram
from angular.files import atomic_write_text
from angular.nn.recognition import load_model
from angular.serve.inference import run_model
from angular.train.loop import limit_threads
from angular.train.tracking import StageRun
from pipeline import (
    CALIBRATE_METRICS_DIR,
    CALIBRATE_PLOTS_DIR,
    calibration_path,
    model_path,
    read_split_manifest,
    run_stage,
    stage_parser,
)

PARAM_KEYS = ("calibrate",)


def calibrate_item(params, item: str, manifest, *, run=None) -> dict:
    """Fit (or fix) each head's temperature on val; write the temperatures, metrics and plots."""
    config = params.calibrate
    loaded = load_model(model_path(item))
    outputs = run_model(
        loaded,
        manifest.paths("val"),
        manifest.labels("val"),
        manifest.identities("val"),
        batch_size=config.batch_size,
    )
    plots_dir = CALIBRATE_PLOTS_DIR / item
    if plots_dir.exists():
        shutil.rmtree(plots_dir)
    temperatures, metrics = {}, {}
    for member, logits in outputs.logits.items():
        found = calibrate_logits(
            logits,
            outputs.labels,
            method=config.method,
            temperature=config.temperature,
            n_bins=config.n_bins,
            max_iter=config.max_iter,
        )
        if config.method == "fit" and not found["fitted"]:
            print(
                f"calibrate@{item}: {member} classifies every validation image correctly, so the "
                "NLL has no minimum over T; keeping T = 1 (use more validation images, or "
                "calibrate.method: fixed)",
                file=sys.stderr,
            )
        temperature, before, after = found["temperature"], found["before"], found["after"]
        temperatures[member] = temperature
        metrics[member] = found
        for when, value in (("before", 1.0), ("after", temperature)):
            probs = softmax(logits, value)
            reliability_diagram(
                probs.max(axis=1),
                probs.argmax(axis=1) == outputs.labels,
                plots_dir / f"{member}_{when}.png",
                f"{member} on val, {when} calibration (T = {value:.4g})",
                n_bins=config.n_bins,
            )
        if run is not None:
            run.log_metrics(
                {f"{member}/temperature": temperature}
                | {f"{member}/{k}_before": v for k, v in before.items()}
                | {f"{member}/{k}_after": v for k, v in after.items()}
            )
    document = {"method": config.method, "temperatures": temperatures}
    atomic_write_text(calibration_path(item), json.dumps(document, indent=2) + "\n")
    metrics_path = CALIBRATE_METRICS_DIR / f"{item}.json"
    atomic_write_text(metrics_path, json.dumps(metrics, indent=2) + "\n")
    if run is not None:
        for path in (calibration_path(item), metrics_path, plots_dir):
            run.log_artifact(path)
    return metrics


def main(argv: Sequence[str] | None = None) -> None:
    args = stage_parser(__doc__, item=True).parse_args(argv)
    params = load_params(args.params)
    limit_threads(params.calibrate.num_threads)
    item = params.item(args.item)
    manifest = read_split_manifest("calibrate")
    with StageRun(
        params.tracking,
        stage=f"calibrate@{args.item}",
        heads=list(item.heads),
        params={"calibrate": params.raw["calibrate"]},
    ) as run:
        metrics = calibrate_item(params, args.item, manifest, run=run)
    for member, values in metrics.items():
        b, a = values["before"], values["after"]
        print(
            f"calibrate@{args.item}: {member}: T = {values['temperature']:.4g}; val NLL "
            f"{b['nll']:.4f} -> {a['nll']:.4f}, ECE {b['ece']:.4f} -> {a['ece']:.4f}",
            file=sys.stderr,
        )


if __name__ == "__main__":
    sys.exit(run_stage(main))
