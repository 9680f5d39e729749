"""Rewrite the code deps of each stage in dvc.yaml: the project modules the stage imports.

    python scripts/update_dvc_deps.py   # after moving code or changing a stage's imports

tests/pipeline/test_dvc_yaml.py checks the same lists; this writes them.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "pipeline"), str(REPO / "tests" / "support")]

from test_dvc_yaml import STAGE_MODULES, closure  # noqa: E402


def main() -> None:
    path = REPO / "dvc.yaml"
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    out, stage, skipping = [], None, False
    for line in lines:
        header = re.match(r"^  (\w+):\s*$", line)
        if header:
            stage = header.group(1)
        dep = re.match(r"^(\s*)- (angular|pipeline)/\S+\.py\s*$", line)
        if dep:
            if not skipping:
                indent = dep.group(1)
                code = closure(Path(STAGE_MODULES[stage].__file__))
                out.extend(f"{indent}- {p}\n" for p in sorted(code))
                skipping = True
            continue
        skipping = False
        out.append(line)
    path.write_text("".join(out), encoding="utf-8")


if __name__ == "__main__":
    main()
