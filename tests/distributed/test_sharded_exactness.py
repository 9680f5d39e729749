"""The sharded head on W = 1..4 gloo processes equals the single-process MarginHead on the same global
batch (docs/design.md, "Sharded softmax"): loss, the DDP-averaged gradient of a backbone, and the
centres' gradient, for every preset, label smoothing, straight-through, SphereFace's lam, rows without
a target, C % W != 0 and every dtype. One spawn per world size runs every case (each spawn costs a
torch import per process).

Tolerance: the largest absolute difference divided by the largest absolute expected value
(fp64 1e-10, fp32 1e-5; fp16/bf16 the dtype's own rounding, 2e-2)."""

from __future__ import annotations

import random

import pytest
import torch
from distributed_testing import spawn
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from angular.nn.heads import LambdaSchedule, MarginHead, MarginSpec
from angular.nn.sharded import ShardedMarginHead

pytestmark = pytest.mark.slow

IN_FEATURES, EMBEDDING_DIM, ROWS_PER_RANK = 6, 8, 3
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}

CASES = [
    dict(dtype=torch.float64, margin="arcface", classes=11),
    dict(dtype=torch.float64, margin="cosface", classes=11, smoothing=0.1, no_target=True),
    dict(dtype=torch.float64, margin="sphereface", classes=13, step=40),
    dict(dtype=torch.float64, margin="combined", classes=7, smoothing=0.2, straight_through=True),
    dict(dtype=torch.float64, margin="arcface", classes=37, no_target=True, step=3),
    dict(dtype=torch.float32, margin="arcface", classes=11, smoothing=0.1),
    dict(dtype=torch.float32, margin="sphereface", classes=9, step=10, straight_through=True),
    dict(dtype=torch.float16, margin="arcface", classes=11),
    dict(dtype=torch.bfloat16, margin="cosface", classes=11, smoothing=0.1, no_target=True),
]


def margin_of(name: str) -> MarginSpec:
    if name == "sphereface":
        return MarginSpec.sphereface(s=16.0, schedule=LambdaSchedule())
    return getattr(MarginSpec, name)(s=16.0)


def case_data(case: dict, world_size: int, seed: int):
    """The global batch, labels and initial weights of a case (the same on every rank)."""
    generator = torch.Generator().manual_seed(seed)
    param_dtype = torch.float64 if case["dtype"] == torch.float64 else torch.float32
    rows = ROWS_PER_RANK * world_size
    inputs = torch.randn(rows, IN_FEATURES, generator=generator, dtype=param_dtype)
    labels = torch.randint(0, case["classes"], (rows,), generator=generator)
    if case.get("no_target"):
        labels[1] = -1  # one row without a target, on rank 0
    backbone = nn.Linear(IN_FEATURES, EMBEDDING_DIM, dtype=param_dtype)
    with torch.no_grad():
        for parameter in backbone.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=param_dtype))
    centres = torch.randn(case["classes"], EMBEDDING_DIM, generator=generator, dtype=param_dtype)
    return inputs, labels, backbone.state_dict(), centres


def head_options(case: dict) -> dict:
    return dict(
        label_smoothing=case.get("smoothing", 0.0),
        straight_through=case.get("straight_through", False),
    )


def sharded_worker(rank: int, world_size: int, seed: int) -> list[dict]:
    results = []
    for index, case in enumerate(CASES):
        inputs, labels, state, centres = case_data(case, world_size, seed + index)
        backbone = nn.Linear(IN_FEATURES, EMBEDDING_DIM, dtype=centres.dtype)
        backbone.load_state_dict(state)
        model = DistributedDataParallel(backbone)
        head = ShardedMarginHead(
            EMBEDDING_DIM, case["classes"], margin_of(case["margin"]), **head_options(case)
        ).to(centres.dtype)
        head.load_full_weight(centres)
        head.step.fill_(case.get("step", 0))
        mine = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)
        loss = head.loss(model(inputs[mine]).to(case["dtype"]), labels[mine])
        loss.backward()
        results.append(
            dict(
                loss=loss.detach(),
                backbone=torch.cat([p.grad.flatten() for p in backbone.parameters()]),
                centres=head.weight.grad,
                class_start=head.class_start,
                full_weight=head.full_weight(),
            )
        )
    return results


def single_process(case: dict, world_size: int, seed: int) -> dict:
    inputs, labels, state, centres = case_data(case, world_size, seed)
    backbone = nn.Linear(IN_FEATURES, EMBEDDING_DIM, dtype=centres.dtype)
    backbone.load_state_dict(state)
    head = MarginHead(
        EMBEDDING_DIM,
        case["classes"],
        margin_of(case["margin"]),
        fused_linear=False,
        **head_options(case),
    ).to(centres.dtype)
    with torch.no_grad():
        head.weight.copy_(centres)
    head.step.fill_(case.get("step", 0))
    loss = head.loss(backbone(inputs).to(case["dtype"]), labels)
    loss.backward()
    return dict(
        loss=loss.detach(),
        backbone=torch.cat([p.grad.flatten() for p in backbone.parameters()]),
        centres=head.weight.grad,
        full_weight=centres,
    )


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).abs().max() / expected.abs().max().clamp(min=1e-300))


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_sharded_head_equals_the_single_process_head(tmp_path, world_size):
    seed = random.randrange(2**31)
    per_rank = spawn(sharded_worker, world_size, tmp_path, seed)
    worst = {}
    for index, case in enumerate(CASES):
        expected = single_process(case, world_size, seed + index)
        tolerance = TOLERANCE[case["dtype"]]
        label = f"case {index} {case} seed {seed}"
        shards = sorted((rank[index] for rank in per_rank), key=lambda r: r["class_start"])
        centres = torch.cat([shard["centres"] for shard in shards])
        errors = {
            "centres": relative_error(centres, expected["centres"]),
            "full_weight": relative_error(shards[0]["full_weight"], expected["full_weight"]),
        }
        for rank, result in enumerate(per_rank):
            errors[f"loss@{rank}"] = relative_error(result[index]["loss"], expected["loss"])
            errors[f"backbone@{rank}"] = relative_error(
                result[index]["backbone"], expected["backbone"]
            )
        assert max(errors.values()) <= tolerance, (label, errors)
        worst[str(case["dtype"])] = max(worst.get(str(case["dtype"]), 0.0), max(errors.values()))
    print(f"W={world_size} worst relative error per dtype: {worst}")
