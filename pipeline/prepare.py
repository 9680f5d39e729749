"""Stage ``prepare``: the data source -> ``data/prepared`` (manifest of splits + class list).

``python -m pipeline.prepare``; reads ``data.*`` of ``params.yaml`` (see :mod:`angular.data`): an
image folder, the digits, or an insightface RecordIO set (``data.source: insightface_rec``).
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Sequence

from angular.config import load_params
from angular.data import prepare_dataset
from angular.files import atomic_write_text
from angular.train.tracking import StageRun
from pipeline import PREPARE_METRICS, PREPARED_DIR, run_stage, stage_parser

# The keys of params.yaml this stage reads (its `params` in dvc.yaml).
PARAM_KEYS = (
    "data.source",
    "data.path",
    "data.test_path",
    "data.unknown_identities",
    "data.val_fraction",
    "data.test_fraction",
    "data.min_images_per_class",
    "data.skip_bad_images",
    "data.seed",
    "data.max_images_per_class",
    "data.crop",
    "data.align",
)


def main(argv: Sequence[str] | None = None) -> None:
    args = stage_parser(__doc__).parse_args(argv)
    params = load_params(args.params)
    data_params = {k: v for k, v in params.raw["data"].items() if f"data.{k}" in PARAM_KEYS}
    with StageRun(params.tracking, stage="prepare", params={"data": data_params}) as run:
        if PREPARED_DIR.exists():  # DVC removes it first; a manual rerun must not mix old files in
            shutil.rmtree(PREPARED_DIR)
        manifest = prepare_dataset(params.data, PREPARED_DIR)
        info = manifest.info
        metrics = {
            "images": dict(info["counts"]),
            "known_identities": info["known_identities"],
            "unknown_identities": info["unknown_identities"],
            "skipped_files": len(info["skipped"]),
        }
        atomic_write_text(PREPARE_METRICS, json.dumps(metrics, indent=2) + "\n")
        counts = ", ".join(f"{split} {n}" for split, n in info["counts"].items())
        print(
            f"prepare: {info['known_identities']} known identities, "
            f"{info['unknown_identities']} unknown; images: {counts}",
            file=sys.stderr,
        )
        if "recordio" in info:  # what identifies the set (docs/design.md, Pipeline: prepare)
            print(
                f"prepare: {info['recordio']['rec']}: {info['recordio']['images']} images, "
                f"fingerprint {info['recordio']['fingerprint'][:16]} (index and file sizes)",
                file=sys.stderr,
            )
        if info["skipped"]:
            print(
                f"prepare: skipped {len(info['skipped'])} file(s) or folder(s) "
                f"(data.skip_bad_images), listed in {PREPARED_DIR / 'classes.json'}",
                file=sys.stderr,
            )
        run.log_metrics(
            {f"images_{k}": v for k, v in info["counts"].items()}
            | {"skipped_files": len(info["skipped"])}
        )
        run.log_artifact(PREPARE_METRICS)


if __name__ == "__main__":
    sys.exit(run_stage(main))
