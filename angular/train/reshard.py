"""Regrouping a checkpoint written by W ranks for a rank of W' (docs/design.md, "Resume"): the pure
part of a resume on another world size (:func:`angular.train.checkpoint.resume` finds the files).

A head's centres are split by class over the ranks, in rank order (one process: one part, the
whole matrix; :class:`angular.nn.sharded.ShardedMarginHead`), and so is every optimizer state of
the same shape (SGD's momentum, Adam's moments): rank r' of W' takes its rows of the W parts
stacked (:func:`take_rows`), which needs no part whole. Everything else is replicated, the same on
every rank (backbone, its optimizer state, a head's step and margin-rule state, Adam's step count,
schedule, scaler, RNG, history), and is taken from rank 0's file. The state-dict keys of a sharded
adaptive head's rule (``heads.<name>.rule.<key>``) are those of the one-process head
(``heads.<name>.<key>``): :func:`plain_key`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from angular.nn.recognition import RecognitionModel
from angular.nn.sharded import ShardedMarginHead

__all__ = ["take_rows", "plain_key", "rows_of", "regrouped_state"]


def take_rows(parts: Sequence[torch.Tensor], start: int, count: int) -> torch.Tensor:
    """Rows ``[start, start + count)`` of ``parts`` stacked in order (a copy)."""
    pieces, offset = [], 0
    for part in parts:
        low, high = max(start, offset), min(start + count, offset + part.shape[0])
        if low < high:
            pieces.append(part[low - offset : high - offset])
        offset += part.shape[0]
    if start < 0 or start + count > offset or not pieces:
        raise ValueError(f"rows [{start}, {start + count}) are not in the {offset} rows saved")
    return torch.cat(pieces).clone()


def plain_key(key: str) -> str:
    """The one-process head's key of a sharded adaptive head's rule key (others: the key)."""
    return key.replace(".rule.", ".")


def rows_of(model: RecognitionModel) -> dict[str, tuple[int, int]]:
    """Each head's centre parameter (its state-dict key) and the rows ``(start, count)`` of the
    full matrix this rank holds."""
    rows = {}
    for name, head in model.heads.items():
        if isinstance(head, ShardedMarginHead):
            k = head.centres_per_class
            rows[f"heads.{name}.weight"] = (head.class_start * k, head.class_count * k)
        else:
            rows[f"heads.{name}.weight"] = (0, head.weight.shape[0])
    return rows


def by_plain_key(state: Mapping[str, torch.Tensor]) -> dict:
    """A state dict by :func:`plain_key` (a head's own key wins over its rule's copy)."""
    plain = {plain_key(key): value for key, value in state.items() if ".rule." in key}
    plain.update({key: value for key, value in state.items() if ".rule." not in key})
    return plain


def cloned(value):
    """``value`` with every tensor in it copied (they may map a file that is about to go)."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, Mapping):
        return {key: cloned(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(cloned(item) for item in value)
    return value


def regrouped_state(
    states: Sequence[Mapping], model: RecognitionModel, optimizer: torch.optim.Optimizer
) -> dict:
    """The checkpoint state of this rank of ``model`` (its shards) from ``states``, the states of
    every rank of another world size in rank order. Raises ValueError when they do not fit."""
    first = states[0]
    rows = rows_of(model)
    parts = {key: [state["model"][key] for state in states] for key in rows}
    for key in rows:
        if any(part.dim() != 2 for part in parts[key]):
            raise ValueError(f"{key} is not a matrix of centres in every rank's file")
    plain = by_plain_key(first["model"])
    model_state = {}
    for key, target in model.state_dict().items():
        if key in rows:
            model_state[key] = take_rows(parts[key], *rows[key])
        elif plain_key(key) in plain:
            model_state[key] = cloned(plain[plain_key(key)])
        else:
            raise ValueError(f"the checkpoint holds no {plain_key(key)}")
        if isinstance(target, torch.Tensor) and model_state[key].shape != target.shape:
            raise ValueError(
                f"{key} has shape {tuple(model_state[key].shape)} there, {tuple(target.shape)} here"
            )
    return {
        **{key: cloned(value) for key, value in first.items() if key not in ("model", "optimizer")},
        "model": model_state,
        "optimizer": regrouped_optimizer(states, model, optimizer, rows),
    }


def regrouped_optimizer(
    states: Sequence[Mapping],
    model: RecognitionModel,
    optimizer: torch.optim.Optimizer,
    rows: Mapping[str, tuple[int, int]],
) -> dict:
    """The optimizer state of this rank: per parameter by name, the centres' states of their shape
    regrouped by rows, the rest from rank 0."""
    names = [plain_key(name) for name, _ in model.named_parameters()]
    saved = [plain_key(name) for name in states[0].get("parameter_names", names)]
    if sorted(saved) != sorted(names):
        raise ValueError(f"its parameters are {saved}, the model's here {names}")
    index = {name: position for position, name in enumerate(saved)}
    regrouped = {}
    for position, name in enumerate(names):
        old = index[name]
        entries = [state["optimizer"]["state"].get(old) for state in states]
        if entries[0] is None:
            continue  # no step taken yet
        if name not in rows:
            regrouped[position] = cloned(entries[0])
            continue
        if any(entry is None for entry in entries):
            raise ValueError(f"the optimizer state of {name} is missing in some rank's file")
        shapes = [state["model"][name].shape for state in states]
        entry = {}
        for key, value in entries[0].items():
            if isinstance(value, torch.Tensor) and value.shape == shapes[0]:
                entry[key] = take_rows([each[key] for each in entries], *rows[name])
            else:  # a step count, the same on every rank
                entry[key] = cloned(value)
        regrouped[position] = entry
    groups = cloned(states[0]["optimizer"]["param_groups"])
    current = optimizer.state_dict()["param_groups"]
    if [len(group["params"]) for group in groups] != [len(group["params"]) for group in current]:
        raise ValueError("its optimizer's parameter groups differ from this one's")
    for group, here in zip(groups, current):
        group["params"] = list(here["params"])
    return {"state": regrouped, "param_groups": groups}
