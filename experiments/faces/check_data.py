"""Stop early, with a message that says what to do, when the ORL faces are not where the faces
experiment's ``params.yaml`` says (``data.path``, relative to this folder).

    python experiments/faces/check_data.py     # exit status 0 when the faces are there, else 1

``make faces`` runs it before ``dvc repro``; ``seeds.py`` runs it before anything else.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
PARAMS = HERE / "params.yaml"


class MissingFaces(Exception):
    """The ORL folder is missing or not a folder of identities."""


def orl_folder(params_path: Path = PARAMS) -> Path:
    """The folder ``data.path`` of the faces params names, resolved against the params' folder."""
    raw = yaml.safe_load(params_path.read_text(encoding="utf-8"))
    return (params_path.parent / raw["data"]["path"]).resolve()


def check(params_path: Path = PARAMS) -> Path:
    """The ORL folder; :class:`MissingFaces` when it is not a folder with identity sub-folders."""
    folder = orl_folder(params_path)
    identities = [p for p in folder.iterdir() if p.is_dir()] if folder.is_dir() else []
    if not identities:
        state = "holds no identity folder" if folder.is_dir() else "does not exist"
        raise MissingFaces(
            f"the faces experiment needs the AT&T/ORL face database (Olivetti Research "
            f"Laboratory: 40 folders s1 .. s40 of 10 PGM images each) at {folder}, which "
            f"{state}. Put the ORL folder there (../shared/data/orl next to the project), or "
            f"set data.path in {params_path} to where it is (relative to {params_path.parent})."
        )
    return folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=PARAMS, help="default: the faces params")
    args = parser.parse_args(argv)
    try:
        folder = check(args.params)
    except MissingFaces as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    count = sum(1 for p in folder.iterdir() if p.is_dir())
    print(f"faces: {count} identity folders in {folder}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
