"""The sharded head on W = 1..4 gloo processes equals the single-process MarginHead on the same global
batch (docs/design.md, "Sharded softmax"): loss, the DDP-averaged gradient of a backbone, and the
centres' gradient, for every preset, label smoothing, straight-through, SphereFace's lam, rows without
a target, C % W != 0 and every dtype; each case twice: over the shard's cosines, and with
``fused_linear`` (the fused linear kernel in shard mode, no cosines; at W = 1 the one-process fused
linear op). One spawn per world size runs every case (each spawn costs a torch import per
process).

Tolerance: the largest absolute difference divided by the largest absolute expected value: fp64
1e-10 and fp32 1e-5 against the one-process head in the same dtype. fp16 and bf16 are compared with
the fp64 head on the same rounded embeddings, within s times the dtype's unit roundoff (the logits
carry s times the cosine's rounding): two half-precision runs differ by the sum of their errors, and
bf16 against bf16 (up to 0.0375 seen, against a former 2e-2) failed where each was within 0.024 of
fp64. The half cases check the half-precision path; the fp64 and fp32 cases pin the arithmetic (a
label smoothing halved on the shards moves bf16 by 0.047 only, fp64 by far more than 1e-10)."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
import torch.nn.functional as F
from distributed_testing import spawn
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from angular import ops
from angular.nn.heads import LambdaSchedule, MarginHead, MarginSpec
from angular.nn.sharded import ShardedMarginHead
from angular.ops.sharded import shard_range

pytestmark = pytest.mark.slow

IN_FEATURES, EMBEDDING_DIM, ROWS_PER_RANK = 6, 8, 3
SCALE = 16.0  # every case's s
HALF = (torch.float16, torch.bfloat16)
TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: SCALE * 2.0**-11,  # 0.0078; seen up to 0.004 over 1500 random draws
    torch.bfloat16: SCALE * 2.0**-8,  # 0.0625; seen up to 0.030 over 1500 random draws
}

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
        return MarginSpec.sphereface(s=SCALE, schedule=LambdaSchedule())
    return getattr(MarginSpec, name)(s=SCALE)


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


FUSED = (False, True)  # the head's fused_linear


def sharded_worker(rank: int, world_size: int, seed: int) -> dict:
    return dict(
        cases={fused: exactness_cases(rank, world_size, seed, fused) for fused in FUSED},
        sampled=(
            {fused: sampled_case(rank, world_size, seed, fused) for fused in FUSED}
            if world_size == 2
            else None
        ),
        errors=bad_batches(rank) if world_size == 2 else None,
    )


def exactness_cases(rank: int, world_size: int, seed: int, fused: bool) -> list[dict]:
    results = []
    for index, case in enumerate(CASES):
        inputs, labels, state, centres = case_data(case, world_size, seed + index)
        backbone = nn.Linear(IN_FEATURES, EMBEDDING_DIM, dtype=centres.dtype)
        backbone.load_state_dict(state)
        model = DistributedDataParallel(backbone)
        head = ShardedMarginHead(
            EMBEDDING_DIM,
            case["classes"],
            margin_of(case["margin"]),
            fused_linear=fused,
            **head_options(case),
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


SAMPLED = dict(classes=40, rate=0.2, smoothing=0.1)


def sampled_data(world_size: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(
        ROWS_PER_RANK * world_size, EMBEDDING_DIM, generator=generator, dtype=torch.float64
    )
    labels = torch.randint(0, SAMPLED["classes"], (x.shape[0],), generator=generator)
    centres = torch.randn(
        SAMPLED["classes"], EMBEDDING_DIM, generator=generator, dtype=torch.float64
    )
    return x, labels, centres


def sampled_case(rank: int, world_size: int, seed: int, fused: bool) -> dict:
    """Sampling on W ranks: each rank's sample, the loss, and the gradients (no DDP here)."""
    x, labels, centres = sampled_data(world_size, seed)
    head = ShardedMarginHead(
        EMBEDDING_DIM,
        SAMPLED["classes"],
        MarginSpec.arcface(s=16.0),
        sample_rate=SAMPLED["rate"],
        label_smoothing=SAMPLED["smoothing"],
        generator_seed=seed,
        fused_linear=fused,
    ).double()
    head.load_full_weight(centres)
    mine = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)
    index, _, num_sampled = head.sample(labels)
    x_local = x[mine].clone().requires_grad_()
    loss = head.loss(x_local, labels[mine])
    loss.backward()
    return dict(
        classes=index + head.class_start,
        num_sampled=num_sampled,
        loss=loss.detach(),
        x_grad=x_local.grad,
        centres=head.weight.grad,
    )


def bad_batches(rank: int) -> list[str]:
    """Errors every rank must raise alike (and then carry on: nothing may hang)."""
    head = ShardedMarginHead(EMBEDDING_DIM, 10, MarginSpec.arcface())
    messages = []
    rows = 3 if rank == 0 else 2
    for labels in (torch.zeros(rows, dtype=torch.int64), torch.tensor([0, 10 + rank, 1])):
        try:
            head.loss(torch.randn(labels.shape[0], EMBEDDING_DIM), labels)
        except ValueError as error:
            messages.append(str(error))
    return messages


def single_process(case: dict, world_size: int, seed: int) -> dict:
    """The one-process MarginHead on the global batch: in the case's dtype for fp32 and fp64, in
    fp64 on the half-precision embeddings for fp16 and bf16 (the reference they are held to)."""
    inputs, labels, state, centres = case_data(case, world_size, seed)
    backbone = nn.Linear(IN_FEATURES, EMBEDDING_DIM, dtype=centres.dtype)
    backbone.load_state_dict(state)
    head_dtype = torch.float64 if case["dtype"] in HALF else centres.dtype
    head = MarginHead(
        EMBEDDING_DIM,
        case["classes"],
        margin_of(case["margin"]),
        fused_linear=False,
        **head_options(case),
    ).to(head_dtype)
    with torch.no_grad():
        head.weight.copy_(centres)
    head.step.fill_(case.get("step", 0))
    loss = head.loss(backbone(inputs).to(case["dtype"]).to(head_dtype), labels)
    loss.backward()
    return dict(
        loss=loss.detach(),
        backbone=torch.cat([p.grad.flatten() for p in backbone.parameters()]),
        centres=head.weight.grad,
        full_weight=centres,
    )


def check_sampled(per_rank: list[dict], world_size: int, seed: int, fused: bool) -> None:
    """The sampled loss is the margin cross-entropy over the union of the ranks' samples (smoothing
    over its size); every rank's embeddings get W times their gradient (DDP divides by W)."""
    x, labels, centres = sampled_data(world_size, seed)
    results = [result["sampled"][fused] for result in per_rank]
    classes = torch.cat([result["classes"] for result in results])
    assert set(labels.tolist()) <= set(classes.tolist())  # every positive is sampled
    for rank, result in enumerate(results):
        start, count = shard_range(SAMPLED["classes"], world_size, rank)
        positives = labels[(labels >= start) & (labels < start + count)].unique().numel()
        assert result["classes"].numel() == max(math.ceil(SAMPLED["rate"] * count), positives)
        assert result["num_sampled"] == classes.numel()
    weight = centres.clone().requires_grad_()
    x = x.clone().requires_grad_()
    remapped = torch.searchsorted(classes, labels)
    loss = ops.margin_cross_entropy(
        F.linear(F.normalize(x, dim=1), F.normalize(weight[classes], dim=1)),
        remapped,
        s=16.0,
        m2=0.5,
        label_smoothing=SAMPLED["smoothing"],
    )
    loss.backward()
    centre_grads = torch.cat([result["centres"] for result in results])
    assert relative_error(centre_grads, weight.grad) <= 1e-10
    for rank, result in enumerate(results):
        assert relative_error(result["loss"], loss.detach()) <= 1e-10
        mine = x.grad[rank * ROWS_PER_RANK : (rank + 1) * ROWS_PER_RANK]
        assert relative_error(result["x_grad"], world_size * mine) <= 1e-10


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).abs().max() / expected.abs().max().clamp(min=1e-300))


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_sharded_head_equals_the_single_process_head(tmp_path, world_size):
    seed = random.randrange(2**31)
    per_rank = spawn(sharded_worker, world_size, tmp_path, seed)
    worst = {}
    if world_size == 2:
        for fused in FUSED:
            check_sampled(per_rank, world_size, seed, fused)
        for result in per_rank:
            assert "rank 0: 3, rank 1: 2" in result["errors"][0], result["errors"]
            assert "labels must be < num_classes = 10, got a label 11" in result["errors"][1]
    for (index, case), fused in itertools.product(enumerate(CASES), FUSED):
        expected = single_process(case, world_size, seed + index)
        tolerance = TOLERANCE[case["dtype"]]
        label = f"case {index} {case} fused_linear={fused} seed {seed}"
        results = [result["cases"][fused] for result in per_rank]
        shards = sorted((rank[index] for rank in results), key=lambda r: r["class_start"])
        centres = torch.cat([shard["centres"] for shard in shards])
        errors = {
            "centres": relative_error(centres, expected["centres"]),
            "full_weight": relative_error(shards[0]["full_weight"], expected["full_weight"]),
        }
        for rank, result in enumerate(results):
            errors[f"loss@{rank}"] = relative_error(result[index]["loss"], expected["loss"])
            errors[f"backbone@{rank}"] = relative_error(
                result[index]["backbone"], expected["backbone"]
            )
        assert max(errors.values()) <= tolerance, (label, errors)
        key = f"{case['dtype']} fused={fused}"
        worst[key] = max(worst.get(key, 0.0), max(errors.values()))
    print(f"W={world_size} worst relative error per dtype: {worst}")
