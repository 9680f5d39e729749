"""Refuse a first `make setup` that would run out of disk half-way through installing torch.

The virtual environment holds torch with its CUDA libraries (about 6.5 GiB) and pip unpacks the
wheels in the temporary folder first, so a disk with a few GiB free fails minutes later with
"OSError: [Errno 28] No space left on device" in the middle of pip's output. This says so at once.

    python scripts/check_free_space.py FOLDER [GIB]    (GIB: default $ANGULAR_MIN_FREE_GIB or 8)

Exit status 0 when FOLDER's file system (and the temporary folder's, when it is another one) has
GIB free, 1 otherwise. ANGULAR_MIN_FREE_GIB=0 skips the check (a CPU-only torch needs far less).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

DEFAULT_GIB = 8.0
GIB = 1024**3


def shortfalls(folder: Path, needed_gib: float) -> list[str]:
    """One line per file system (the folder's, the temporary folder's) with less than needed."""
    lines, seen = [], set()
    for place in (folder, Path(tempfile.gettempdir())):
        device = os.stat(place).st_dev
        if device in seen:
            continue
        seen.add(device)
        free = shutil.disk_usage(place).free / GIB
        if free < needed_gib:
            lines.append(f"{place}: {free:.1f} GiB free, {needed_gib:g} GiB needed")
    return lines


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2:
        print(__doc__, file=sys.stderr)
        return 2
    folder = Path(argv[0]).resolve()
    folder = folder if folder.exists() else folder.parent
    raw = argv[1] if len(argv) == 2 else os.environ.get("ANGULAR_MIN_FREE_GIB", str(DEFAULT_GIB))
    try:
        needed = float(raw)
    except ValueError:
        print(f"check_free_space: the GiB needed must be a number, got {raw!r}", file=sys.stderr)
        return 2
    problems = shortfalls(folder, needed)
    for line in problems:
        print(
            f"make setup: not enough disk space to install torch and its CUDA libraries ({line}). "
            "Free some space, or set ANGULAR_MIN_FREE_GIB=0 to try anyway.",
            file=sys.stderr,
        )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
