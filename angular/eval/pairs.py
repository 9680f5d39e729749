"""Pairs for verification: drawn from a split's identities, or read from an LFW ``pairs.txt``.

:func:`verification_pairs` draws every genuine pair and a seeded sample of impostor pairs;
:func:`parse_pairs_file` reads a pairs file by image name (``<person>_<n:04d>``, LFW's file stems),
and :func:`pairs_of_file` finds its images among the evaluated ones (:func:`pair_names`) or, with
``pairs_root``, in a folder of the user's (:func:`external_pairs`). A pair is ``(index_a, index_b,
same)`` (plus ``fold_of``, a pairs file's own folds, or None).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from angular.eval.checks import as_array

__all__ = [
    "MAX_IMPOSTOR_PAIRS",
    "PAIRS_FILE_KEY",
    "PAIRS_ROOT_KEY",
    "ExternalPairs",
    "PairsError",
    "PairsFile",
    "external_pairs",
    "pair_names",
    "pairs_of_file",
    "parse_pairs_file",
    "read_pairs_file",
    "verification_pairs",
]

MAX_IMPOSTOR_PAIRS = 10_000_000  # beyond this, listing or scoring the pairs would exhaust memory
PAIRS_FILE_KEY = "evaluate.verification.pairs_file"
PAIRS_ROOT_KEY = "evaluate.verification.pairs_root"


def verification_pairs(
    identities,
    *,
    seed: int,
    max_impostors: int | None = None,
    impostors_per_genuine: float | None = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs for verification: every genuine pair and a seeded sample of impostor pairs.

    Genuine pairs are all ``(i, j)``, ``i < j``, with the same identity. The number of impostor
    pairs (``i < j``, different identities, drawn without replacement) is
    ``impostors_per_genuine * n_genuine`` (``None``: no such limit), capped by ``max_impostors``
    and by how many exist. Returns ``(index_a, index_b, same)``: genuine pairs first, then
    impostors, each sorted; the same seed gives the same pairs.
    """
    identities = as_array(identities, "identities", ndim=1)
    if len(identities) < 2:
        raise ValueError(f"identities needs at least 2 samples, got {len(identities)}")
    if max_impostors is not None and (isinstance(max_impostors, bool) or max_impostors < 0):
        raise ValueError(f"max_impostors must be >= 0 or None, got {max_impostors!r}")
    if impostors_per_genuine is not None and not impostors_per_genuine >= 0:
        raise ValueError(f"impostors_per_genuine must be >= 0 or None, got {impostors_per_genuine}")
    _, codes = np.unique(identities, return_inverse=True)
    codes = codes.ravel()
    n = len(codes)

    genuine_a, genuine_b = [], []
    for identity in np.unique(codes):
        members = np.flatnonzero(codes == identity)
        a, b = np.triu_indices(len(members), k=1)
        genuine_a.append(members[a])
        genuine_b.append(members[b])
    genuine_a = np.concatenate(genuine_a)
    genuine_b = np.concatenate(genuine_b)
    order = np.lexsort((genuine_b, genuine_a))
    genuine_a, genuine_b = genuine_a[order], genuine_b[order]

    n_all_pairs = n * (n - 1) // 2
    n_available = n_all_pairs - len(genuine_a)
    wanted = n_available
    if impostors_per_genuine is not None:
        wanted = min(wanted, int(math.floor(impostors_per_genuine * len(genuine_a))))
    if max_impostors is not None:
        wanted = min(wanted, int(max_impostors))

    if wanted > MAX_IMPOSTOR_PAIRS:
        raise ValueError(
            f"{wanted} impostor pairs requested (more than {MAX_IMPOSTOR_PAIRS}); "
            "set max_impostors or impostors_per_genuine to sample fewer"
        )
    rng = np.random.default_rng(seed)
    if wanted == 0:
        impostor_a = impostor_b = np.zeros(0, dtype=np.int64)
    elif n_all_pairs <= 2_000_000 or 2 * wanted >= n_available:
        # Few enough pairs to list: choose among all impostor pairs without replacement.
        a, b = np.triu_indices(n, k=1)
        different = codes[a] != codes[b]
        a, b = a[different], b[different]
        chosen = np.sort(rng.choice(len(a), size=wanted, replace=False))
        impostor_a, impostor_b = a[chosen], b[chosen]
    else:
        # Many pairs and a small sample: draw random pairs, keep new impostor pairs until enough.
        seen: set[tuple[int, int]] = set()
        while len(seen) < wanted:
            draws = rng.integers(0, n, size=(2 * (wanted - len(seen)) + 16, 2))
            for i, j in draws:
                if i != j and codes[i] != codes[j]:
                    seen.add((min(i, j), max(i, j)))
                    if len(seen) == wanted:
                        break
        pairs = np.array(sorted(seen), dtype=np.int64)
        impostor_a, impostor_b = pairs[:, 0], pairs[:, 1]

    index_a = np.concatenate([genuine_a, impostor_a]).astype(np.int64)
    index_b = np.concatenate([genuine_b, impostor_b]).astype(np.int64)
    same = np.r_[np.ones(len(genuine_a), bool), np.zeros(len(impostor_a), bool)]
    return index_a, index_b, same


@dataclasses.dataclass(frozen=True)
class PairsFile:
    """The pairs of an LFW ``pairs.txt``, by image name (``<person>_<n:04d>``, LFW's file stems)."""

    path: Path
    first: tuple[str, ...]  # image name of each pair's first image
    second: tuple[str, ...]
    people: tuple[tuple[str, str], ...]  # the two people of each pair
    same: np.ndarray  # (P,) bool: genuine pair
    fold_of: np.ndarray | None  # (P,) int: the file's own folds (header "folds pairs_per_fold")
    lines: tuple[int, ...]  # line number of each pair, for messages


def parse_pairs_file(path: str | os.PathLike) -> PairsFile:
    """Read an LFW ``pairs.txt`` without looking at any image.

    Lines are ``name n1 n2`` (genuine: images ``n1`` and ``n2`` of ``name``) or
    ``name1 n1 name2 n2`` (impostor). A first line ``folds pairs_per_fold`` (View 2: ``10 300``)
    means the pairs come fold by fold, each with ``pairs_per_fold`` genuine and as many impostor
    pairs: they are the folds of :func:`verification_metrics`. A first line of one integer (View 1)
    is a pair count. A file of only genuine or only impostor pairs is refused (no threshold, no
    accuracy, no ROC can come of it)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"pairs file {path} does not exist or is not a file")
    first, second, people, same, lines = [], [], [], [], []
    header = None
    for line_number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if line_number == 1 and len(fields) <= 2 and all(f.isdigit() for f in fields):
            header = [int(f) for f in fields]
            continue
        if len(fields) not in (3, 4):
            raise ValueError(
                f"{path}:{line_number}: expected 'name n1 n2' or 'name1 n1 name2 n2', got {line!r}"
            )
        a = (fields[0], fields[1])
        b = (fields[0], fields[2]) if len(fields) == 3 else (fields[2], fields[3])
        for _, number in (a, b):
            if not re.fullmatch(r"\d+", number):
                raise ValueError(f"{path}:{line_number}: image number {number!r} is not an integer")
        first.append(f"{a[0]}_{int(a[1]):04d}")
        second.append(f"{b[0]}_{int(b[1]):04d}")
        people.append((a[0], b[0]))
        same.append(a[0] == b[0])
        lines.append(line_number)
    same = np.array(same, bool)
    if not len(same):
        raise ValueError(f"pairs file {path} holds no pairs")
    if same.all() or not same.any():
        kind = "genuine" if same.all() else "impostor"
        raise ValueError(
            f"pairs file {path} holds only {kind} pairs ({len(same)}); verification needs both "
            "genuine ('name n1 n2') and impostor ('name1 n1 name2 n2') pairs"
        )
    fold_of = None
    if header is not None and len(header) == 2 and header[0] >= 2:
        folds, per_fold = header
        if folds * 2 * per_fold != len(same):
            raise ValueError(
                f"{path}:1: the header says {folds} folds of {per_fold} genuine and {per_fold} "
                f"impostor pairs ({folds * 2 * per_fold} pairs), but the file "
                f"holds {len(same)} pairs"
            )
        fold_of = np.arange(len(same)) // (2 * per_fold)
    return PairsFile(path, tuple(first), tuple(second), tuple(people), same, fold_of, tuple(lines))


def read_pairs_file(
    path: str | os.PathLike, names: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs from an LFW ``pairs.txt`` (:func:`parse_pairs_file`): ``(index_a, index_b, same)``
    indexing into ``names``, which holds, for each sample, its image path or file name; image ``n``
    of ``name`` is the sample whose file stem is ``{name}_{n:04d}`` (LFW's naming, e.g.
    ``Aaron_Peirsol_0001.jpg``).
    """
    pairs = parse_pairs_file(path)
    index_of: dict[str, int] = {}
    for index, name in enumerate(names):
        stem = Path(str(name)).stem
        if stem in index_of:
            raise ValueError(
                f"names holds the image {stem!r} twice (at {index_of[stem]} and {index})"
            )
        index_of[stem] = index
    index_a, index_b = [], []
    for a, b, line_number in zip(pairs.first, pairs.second, pairs.lines):
        for stem in (a, b):
            if stem not in index_of:
                raise ValueError(f"{pairs.path}:{line_number}: image {stem!r} is not among names")
        index_a.append(index_of[a])
        index_b.append(index_of[b])
    return np.array(index_a, np.int64), np.array(index_b, np.int64), pairs.same


class PairsError(ValueError):
    """A pairs file (or its ``pairs_root``) that cannot be used: ``key`` is the parameter at fault
    (:data:`PAIRS_FILE_KEY` or :data:`PAIRS_ROOT_KEY`), ``problem`` says what is wrong."""

    def __init__(self, key: str, problem: str):
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}")


def pair_names(paths, identities) -> list[str]:
    """The names a pairs file uses for these images: the file stem (LFW: ``Aaron_Peirsol_0001``),
    or ``<identity>_<n:04d>`` when the stem is a bare number (ORL: ``s1/3.pgm`` -> ``s1_0003``)."""
    names = []
    for path, identity in zip(paths, identities):
        if not isinstance(path, (str, Path)):  # a RecordIO set's image: an index, no file name
            raise PairsError(
                PAIRS_FILE_KEY,
                "names images by file, and a RecordIO set's images have none: give "
                "evaluate.verification.pairs_root (the pairs' own images) or score verification "
                "sets (evaluate.verification.bins)",
            )
        stem = Path(path).stem
        names.append(f"{identity}_{int(stem):04d}" if stem.isdigit() else stem)
    return names


@dataclasses.dataclass(frozen=True)
class ExternalPairs:
    """A pairs file's pairs of images found under ``pairs_root`` (a benchmark such as LFW)."""

    paths: list[Path]  # each image once; the pairs index into it
    pairs: tuple  # (index_a, index_b, same, fold_of or None)
    dropped: int  # pairs that touched a known (training) identity


def pairs_of_file(verification, manifest):
    """``(pairs, external)`` of ``verification.pairs_file`` (``evaluate.verification``) for the
    prepared data set ``manifest`` (:class:`angular.data.Manifest`): without a pairs file
    ``(None, None)``; with ``pairs_root``, ``(None, external_pairs(...))``; else the pairs
    ``(index_a, index_b, same, fold_of)`` among the test and unknown images (a file may mix them)
    and None. Every problem raises :class:`PairsError` here, before any image is embedded."""
    if verification.pairs_file is None:
        return None, None
    if verification.pairs_root is not None:
        return None, external_pairs(verification, manifest.classes)
    names = pair_names(
        manifest.paths("test") + manifest.paths("unknown"),
        manifest.identities("test") + manifest.identities("unknown"),
    )
    path = verification.pairs_file
    try:
        parsed = parse_pairs_file(path)
        index_a, index_b, same = read_pairs_file(path, names)
    except ValueError as error:
        raise PairsError(
            PAIRS_FILE_KEY,
            f"{error} (without {PAIRS_ROOT_KEY}, its pairs must name test or unknown images)",
        ) from None
    return (index_a, index_b, same, parsed.fold_of), None


def external_pairs(verification, known_identities) -> ExternalPairs:
    """Read the pairs file, drop its pairs that touch a known identity, and find each image that
    is left under ``pairs_root``: every problem is an error here, before any image is embedded."""
    v = verification
    try:
        parsed = parse_pairs_file(v.pairs_file)
    except ValueError as error:
        raise PairsError(PAIRS_FILE_KEY, str(error)) from None
    known = set(known_identities)
    keep = np.array([a not in known and b not in known for a, b in parsed.people], bool)
    dropped = int((~keep).sum())
    same = parsed.same[keep]
    if same.all() or not same.any():
        left = f"{int(same.sum())} genuine and {int((~same).sum())} impostor"
        raise PairsError(
            PAIRS_FILE_KEY,
            f"{dropped} of its {len(keep)} pairs touch an identity the models were trained on and "
            f"are dropped, which leaves {left} pairs: verification needs both",
        )
    root = Path(v.pairs_root)
    if not root.is_dir():
        raise PairsError(PAIRS_ROOT_KEY, f"{root} is not a folder")
    found: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            found.setdefault(path.stem, path)
    kept = np.flatnonzero(keep)
    names = sorted({name for i in kept for name in (parsed.first[i], parsed.second[i])})
    missing = [name for name in names if name not in found]
    if missing:
        listed = ", ".join(missing[:10]) + (
            f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        )
        raise PairsError(
            PAIRS_ROOT_KEY,
            f"{len(missing)} image(s) of {v.pairs_file} are not under {root} (looked for "
            f"<name>_<NNNN>.<any extension> in every sub-folder): {listed}",
        )
    index_of = {name: index for index, name in enumerate(names)}
    index_a = np.array([index_of[parsed.first[i]] for i in kept], np.int64)
    index_b = np.array([index_of[parsed.second[i]] for i in kept], np.int64)
    fold_of = None if parsed.fold_of is None else parsed.fold_of[keep]
    return ExternalPairs(
        [found[name] for name in names], (index_a, index_b, same, fold_of), dropped
    )
