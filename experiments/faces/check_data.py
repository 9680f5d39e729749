"""Stop early, with a message that says what to do, when an experiment's faces are not where its
``params.yaml`` says (``data.path``, relative to the experiment's folder).

    python experiments/faces/check_data.py                          # the faces experiment (ORL)
    python experiments/faces/check_data.py --experiment lfw-dev     # experiments/lfw-dev
    # exit status 0 when the faces are there, else 1

``make faces`` / ``make lfw-dev`` run it before ``dvc repro``; ``seeds.py`` runs it before anything
else. :data:`EXPERIMENTS` describes each experiment's data set (what it is, its credit, and the
issue's bars its ``seeds.md`` checks).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
PARAMS = HERE / "params.yaml"


@dataclasses.dataclass(frozen=True)
class Experiment:
    """An experiment folder ``experiments/<name>`` and the faces it runs on."""

    name: str
    data: str  # what the data set is, for the message when it is missing
    shared: str  # where it usually lives, next to the project
    credit: str  # the line seeds.md ends its first paragraph with
    auc_floor: float  # the floors for the ensemble's unknown-pair verification
    tar_floor: float
    min_head_accuracy: float | None  # the lowest closed-set accuracy a head must reach, if any

    @property
    def folder(self) -> Path:
        return HERE.parent / self.name


EXPERIMENTS = {
    e.name: e
    for e in (
        Experiment(
            "faces",
            "the AT&T/ORL face database (Olivetti Research Laboratory: 40 folders s1 .. s40 of "
            "10 PGM images each)",
            "../shared/data/orl",
            "Faces: AT&T/ORL, Olivetti Research Laboratory.",
            auc_floor=0.98,
            tar_floor=0.85,
            min_head_accuracy=0.95,
        ),
        Experiment(
            "lfw-dev",
            "lfw-dev, a development subset of Labeled Faces in the Wild (96 folders of people, "
            "1,301 250x250 JPEGs)",
            "../shared/data/lfw-dev",
            "Faces: Labeled Faces in the Wild (lfw-dev subset), University of Massachusetts, "
            "Amherst (Huang et al., 2007).",
            auc_floor=0.90,
            tar_floor=0.35,
            min_head_accuracy=None,
        ),
    )
}


class MissingFaces(Exception):
    """The experiment's folder of faces is missing or not a folder of identities."""


def orl_folder(params_path: Path = PARAMS) -> Path:
    """The folder ``data.path`` of an experiment's params names, resolved against the params'
    folder."""
    raw = yaml.safe_load(params_path.read_text(encoding="utf-8"))
    return (params_path.parent / raw["data"]["path"]).resolve()


def check(params_path: Path = PARAMS, experiment: str = "faces") -> Path:
    """The faces folder; :class:`MissingFaces` when it is not a folder with identity sub-folders."""
    described = EXPERIMENTS[experiment]
    folder = orl_folder(params_path)
    identities = [p for p in folder.iterdir() if p.is_dir()] if folder.is_dir() else []
    if not identities:
        state = "holds no identity folder" if folder.is_dir() else "does not exist"
        raise MissingFaces(
            f"the {experiment} experiment needs {described.data} at {folder}, which {state}. "
            f"Put the folder there ({described.shared} next to the project), or set data.path "
            f"in {params_path} to where it is (relative to {params_path.parent})."
        )
    return folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", choices=sorted(EXPERIMENTS), default="faces")
    parser.add_argument(
        "--params", type=Path, help="default: the experiment's params.yaml (experiments/<name>/)"
    )
    args = parser.parse_args(argv)
    params = args.params or EXPERIMENTS[args.experiment].folder / "params.yaml"
    try:
        folder = check(params, args.experiment)
    except MissingFaces as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    count = sum(1 for p in folder.iterdir() if p.is_dir())
    print(f"{args.experiment}: {count} identity folders in {folder}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
