"""The sharded head on NCCL: W = the number of GPUs (1 on the device machine, so NCCL's collectives
and the CUDA sharded kernels run even with one GPU) equals the single-process MarginHead on the same
global batch, on the GPU. Run by benchmarks/gpu_check.sh; skipped without a GPU."""

from __future__ import annotations

import random

import pytest
import torch
import torch.distributed as dist
from distributed_testing import spawn
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from angular.nn.heads import MarginHead, MarginSpec
from angular.nn.sharded import ShardedMarginHead

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and dist.is_nccl_available()), reason="needs NCCL and a GPU"
    ),
]

CLASSES, IN_FEATURES, EMBEDDING_DIM, ROWS_PER_RANK = 1000, 32, 64, 16
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def global_batch(world_size: int, seed: int, dtype: torch.dtype):
    generator = torch.Generator().manual_seed(seed)
    rows = ROWS_PER_RANK * world_size
    inputs = torch.randn(rows, IN_FEATURES, generator=generator, dtype=dtype)
    labels = torch.randint(0, CLASSES, (rows,), generator=generator)
    labels[0] = -1  # a row without a target
    weight = torch.randn(EMBEDDING_DIM, IN_FEATURES, generator=generator, dtype=dtype)
    centres = torch.randn(CLASSES, EMBEDDING_DIM, generator=generator, dtype=dtype)
    return inputs, labels, weight, centres


def nccl_worker(rank: int, world_size: int, seed: int, dtype: torch.dtype) -> dict:
    inputs, labels, weight, centres = global_batch(world_size, seed, dtype)
    device = torch.device("cuda", rank)
    backbone = nn.Linear(IN_FEATURES, EMBEDDING_DIM, bias=False, dtype=dtype, device=device)
    with torch.no_grad():
        backbone.weight.copy_(weight)
    model = DistributedDataParallel(backbone, device_ids=[rank])
    head = ShardedMarginHead(
        EMBEDDING_DIM, CLASSES, MarginSpec.arcface(s=32.0, m=0.5), label_smoothing=0.1
    ).to(device=device, dtype=dtype)
    head.load_full_weight(centres.to(device))
    mine = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)
    loss = head.loss(model(inputs[mine].to(device)), labels[mine].to(device))
    loss.backward()
    return dict(
        loss=loss.detach().cpu(),
        backbone=backbone.weight.grad.cpu(),
        centres=head.weight.grad.cpu(),
        class_start=head.class_start,
    )


def single_process(world_size: int, seed: int, dtype: torch.dtype) -> dict:
    inputs, labels, weight, centres = global_batch(world_size, seed, dtype)
    backbone = nn.Linear(IN_FEATURES, EMBEDDING_DIM, bias=False, dtype=dtype, device="cuda")
    head = MarginHead(
        EMBEDDING_DIM,
        CLASSES,
        MarginSpec.arcface(s=32.0, m=0.5),
        label_smoothing=0.1,
        fused_linear=False,
    ).to(device="cuda", dtype=dtype)
    with torch.no_grad():
        backbone.weight.copy_(weight)
        head.weight.copy_(centres)
    loss = head.loss(backbone(inputs.cuda()), labels.cuda())
    loss.backward()
    return dict(
        loss=loss.detach().cpu(),
        backbone=backbone.weight.grad.cpu(),
        centres=head.weight.grad.cpu(),
    )


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).abs().max() / expected.abs().max().clamp(min=1e-300))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sharded_head_on_nccl_equals_the_single_process_head(tmp_path, dtype):
    world_size = torch.cuda.device_count()
    seed = random.randrange(2**31)
    per_rank = spawn(nccl_worker, world_size, tmp_path, seed, dtype, backend="nccl")
    expected = single_process(world_size, seed, dtype)
    shards = sorted(per_rank, key=lambda result: result["class_start"])
    errors = {
        "centres": relative_error(torch.cat([s["centres"] for s in shards]), expected["centres"]),
    }
    for rank, result in enumerate(per_rank):
        errors[f"loss@{rank}"] = relative_error(result["loss"], expected["loss"])
        errors[f"backbone@{rank}"] = relative_error(result["backbone"], expected["backbone"])
    print(f"NCCL, W = {world_size}, {dtype}: relative errors {errors}")
    assert max(errors.values()) <= TOLERANCE[dtype], (seed, errors)
