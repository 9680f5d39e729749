"""The adaptive heads sharded by class on W gloo processes (docs/design.md, "Sharded softmax") equal
the one-process head on the same global batch: two SGD steps of a DDP backbone and the head, each
step's loss, the backbone's (DDP-averaged) gradient and the full centres' gradient, then the head's
state (AdaFace's EMAs, CurricularFace's t, ElasticFace's generator, ``step``). Rows without a target,
C % W != 0, MagFace's margin gradient through the norm, CurricularFace rows whose hard negatives sit
on other shards, and class sampling (compared with the one-process head restricted to the sampled
classes, as tests/distributed/test_sharded_exactness.py does). Also: a replicated AdaFace or
CurricularFace head under DDP all-reduces its statistics, and the bytes each head sends per step.
One spawn per world size runs every case.

Tolerance: largest absolute difference over largest absolute expected value (fp64 1e-12, fp32 1e-5).
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.distributed as dist
from distributed_testing import spawn
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from angular.nn.adaptive import ADAPTIVE_HEADS, AdaFace, CurricularFace
from angular.nn.heads import MarginHead, MarginSpec
from angular.nn.sharded import ShardedAdaptiveHead, ShardedMarginHead
from angular.ops import reference
from angular.ops.sharded import count_communication, shard_range, sharded_cross_entropy

IN_FEATURES, EMBEDDING_DIM, ROWS_PER_RANK, STEPS, LR = 6, 8, 3, 2, 0.05
SCALE = 5.0  # embedding norms around 35: inside MagFace's [l_a, u_a], so its margin has a gradient
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}
f64, f32 = torch.float64, torch.float32

CASES = [
    dict(type="adaface", dtype=f64, classes=11, smoothing=0.1, no_target=True),
    dict(type="adaface", dtype=f32, classes=7),
    dict(type="elasticface_arc", dtype=f64, classes=7, options=dict(plus=True), no_target=True),
    dict(type="elasticface_cos", dtype=f32, classes=11, smoothing=0.1),
    dict(type="magface", dtype=f64, classes=13, no_target=True),
    dict(type="magface", dtype=f32, classes=11, smoothing=0.1),
    dict(type="curricularface", dtype=f64, classes=13, no_target=True, t=0.3),
    dict(type="curricularface", dtype=f32, classes=11, smoothing=0.1),
    dict(type="curricularface", dtype=f64, classes=40, rate=0.3, t=0.2),
    dict(type="subcenter_arcface", dtype=f64, classes=11, no_target=True),
    dict(type="subcenter_arcface", dtype=f64, classes=40, rate=0.3, smoothing=0.1),
    dict(type="subcenter_arcface", dtype=f32, classes=7, options=dict(k=2)),
]


def make_head(case: dict, seed: int):
    """The one-process head of a case, with random centres (the same on every rank)."""
    options = dict(case.get("options", {}))
    if case["type"].startswith("elasticface"):
        options["seed"] = seed
    head = ADAPTIVE_HEADS[case["type"]](
        EMBEDDING_DIM,
        case["classes"],
        s=16.0,
        label_smoothing=case.get("smoothing", 0.0),
        **options,
    )
    head = head.to(case["dtype"])
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator, dtype=f64))
        if "t" in case:
            head.t.fill_(case["t"])
    return head


def make_backbone(case: dict, seed: int) -> nn.Linear:
    backbone = nn.Linear(IN_FEATURES, EMBEDDING_DIM, dtype=case["dtype"])
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for parameter in backbone.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=f64))
    return backbone


def batch(case: dict, world_size: int, seed: int, step: int):
    generator = torch.Generator().manual_seed(seed + 100 + step)
    rows = ROWS_PER_RANK * world_size
    inputs = torch.randn(rows, IN_FEATURES, generator=generator, dtype=case["dtype"])
    labels = torch.randint(0, case["classes"], (rows,), generator=generator)
    if case.get("no_target"):
        labels[1] = -1  # a row without a target, on rank 0
    return inputs, labels


def sgd(parameters) -> None:
    with torch.no_grad():
        for parameter in parameters:
            parameter -= LR * parameter.grad
            parameter.grad = None


def flat_grad(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in module.parameters()])


def sharded_run(rank: int, world_size: int, case: dict, seed: int) -> dict:
    head = ShardedAdaptiveHead(
        make_head(case, seed), sample_rate=case.get("rate", 1.0), generator_seed=seed
    )
    backbone = make_backbone(case, seed)
    model = DistributedDataParallel(backbone) if world_size > 1 else backbone
    mine = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)
    steps = []
    for step in range(STEPS):
        inputs, labels = batch(case, world_size, seed, step)
        index, _, _ = head.sample(labels)  # before loss(), which advances the step
        loss = head.loss(model(inputs[mine]) * SCALE, labels[mine])
        loss.backward()
        steps.append(
            dict(
                loss=loss.detach(),
                backbone=flat_grad(backbone),
                centres=head.weight.grad.clone(),
                classes=None if index is None else index + head.class_start,
            )
        )
        sgd([*backbone.parameters(), head.weight])
    return dict(steps=steps, state=head.full_state_dict())


def restricted(head, classes: torch.Tensor):
    """A one-process head of the same type over ``classes`` only, with ``head``'s state."""
    case_head = type(head)(
        head.embedding_dim,
        classes.numel(),
        s=head.margin.s,
        label_smoothing=head.label_smoothing,
        **head.options,
    ).to(head.weight.dtype)
    case_head.load_state_dict(shared_state(head), strict=False)
    k = head.centres_per_class
    with torch.no_grad():
        case_head.weight.copy_(head.weight.view(head.num_classes, k, -1)[classes].flatten(0, 1))
    return case_head


def shared_state(head) -> dict:
    return {key: v for key, v in head.state_dict().items() if key not in ("weight", "dominant")}


def one_process_run(case: dict, world_size: int, seed: int, sampled: list) -> dict:
    head = make_head(case, seed)
    backbone = make_backbone(case, seed)
    k, classes_total = head.centres_per_class, case["classes"]
    steps = []
    for step in range(STEPS):
        inputs, labels = batch(case, world_size, seed, step)
        x = backbone(inputs) * SCALE
        if case["type"] == "magface":
            norms = x.detach().norm(dim=1)
            assert ((norms > head.l_a) & (norms < head.u_a)).sum() >= 2, norms
        classes = sampled[step]
        if classes is None:
            loss = head.loss(x, labels)
            loss.backward()
            centres, grads = head.weight.grad.clone(), flat_grad(backbone)
            sgd([*backbone.parameters(), head.weight])
        else:
            part = restricted(head, classes)
            local = torch.where(labels >= 0, torch.searchsorted(classes, labels), -1)
            loss = part.loss(x, local)
            loss.backward()
            centres = torch.zeros_like(head.weight).view(classes_total, k, -1)
            centres[classes] = part.weight.grad.view(-1, k, EMBEDDING_DIM)
            centres, grads = centres.flatten(0, 1), flat_grad(backbone)
            sgd([*backbone.parameters(), part.weight])
            with torch.no_grad():
                head.weight.view(classes_total, k, -1)[classes] = part.weight.view(
                    -1, k, EMBEDDING_DIM
                )
            head.load_state_dict(shared_state(part), strict=False)
        steps.append(dict(loss=loss.detach(), backbone=grads, centres=centres))
    return dict(steps=steps, state=head.state_dict())


def relative_error(actual, expected) -> float:
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).abs().max() / expected.abs().max().clamp(min=1e-300))


def hard_negatives_elsewhere(case: dict, world_size: int, seed: int) -> int:
    """Rows of the first batch with a hard negative (cos_j > f_y) on another shard than y's."""
    head = make_head(case, seed)
    inputs, labels = batch(case, world_size, seed, 0)
    with torch.no_grad():
        cos = head.cosine(make_backbone(case, seed)(inputs) * SCALE).double()
        has_target = labels >= 0
        cos_y = cos.gather(1, labels.clamp(min=0).unsqueeze(1)).squeeze(1)
        f_y = reference.target_logit(cos_y, m1=1.0, m2=head.margin.m2, m3=0.0, lam=0.0)
    starts = torch.tensor(
        [shard_range(case["classes"], world_size, r)[0] for r in range(world_size)]
    )
    shard = torch.bucketize(torch.arange(case["classes"]), starts, right=True) - 1
    elsewhere = (cos > f_y.unsqueeze(1)) & (
        shard.unsqueeze(0) != shard[labels.clamp(min=0)].unsqueeze(1)
    )
    return int((elsewhere.any(dim=1) & has_target).sum())


# --------------------------------------------------------------------------------------------------
# A replicated head under DDP: each rank its own rows, the statistics all-reduced.


def replicated_run(rank: int, world_size: int, seed: int, sync: bool) -> dict:
    generator = torch.Generator().manual_seed(seed)
    adaface = AdaFace(EMBEDDING_DIM, 5, s=16.0, sync_statistics=sync).double()
    curricular = CurricularFace(EMBEDDING_DIM, 5, s=16.0, sync_statistics=sync).double()
    with torch.no_grad():
        for head in (adaface, curricular):
            head.weight.copy_(torch.randn(head.weight.shape, generator=generator, dtype=f64))
    mine = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)
    for x, labels in replicated_batches(world_size, seed):
        for head in (adaface, curricular):
            head.loss(x[mine], labels[mine])
    return dict(mean=adaface.batch_mean, std=adaface.batch_std, t=curricular.t)


def replicated_batches(world_size: int, seed: int):
    generator = torch.Generator().manual_seed(seed + 7)
    rows = ROWS_PER_RANK * world_size
    for _ in range(STEPS):
        x = torch.randn(rows, EMBEDDING_DIM, generator=generator, dtype=f64) * SCALE
        labels = torch.randint(0, 5, (rows,), generator=generator)
        labels[0] = -1
        yield x, labels


def check_replicated(per_rank: list[dict], world_size: int, seed: int, sync: bool) -> None:
    for rank, result in enumerate(per_rank):
        adaface = AdaFace(EMBEDDING_DIM, 5, s=16.0).double()
        curricular = CurricularFace(EMBEDDING_DIM, 5, s=16.0).double()
        with torch.no_grad():
            generator = torch.Generator().manual_seed(seed)
            for head in (adaface, curricular):
                head.weight.copy_(torch.randn(head.weight.shape, generator=generator, dtype=f64))
        rows = slice(None) if sync else slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)
        for x, labels in replicated_batches(world_size, seed):
            for head in (adaface, curricular):
                head.loss(x[rows], labels[rows])
        expected = dict(mean=adaface.batch_mean, std=adaface.batch_std, t=curricular.t)
        for name, value in expected.items():
            assert relative_error(result[name], value) <= 1e-12, (rank, name, sync)
    if sync:
        for name in ("mean", "std", "t"):
            assert len({float(result[name]) for result in per_rank}) == 1, name
    else:
        assert per_rank[0]["t"] != per_rank[1]["t"]


# --------------------------------------------------------------------------------------------------
# Communication: the adaptive heads send what the plain sharded head sends, CurricularFace and
# ElasticFace-plus one all-reduce of B target cosines more.


def bytes_per_step(rank: int, world_size: int) -> dict:
    heads = {
        "arcface": ShardedMarginHead(EMBEDDING_DIM, 7, MarginSpec.arcface(16.0)),
        **{
            name: ShardedAdaptiveHead(ADAPTIVE_HEADS[name](EMBEDDING_DIM, 7, s=16.0, **options))
            for name, options in [
                ("adaface", {}),
                ("magface", {}),
                ("curricularface", {}),
                ("elasticface_arc", dict(plus=True, seed=1)),
                ("subcenter_arcface", {}),
            ]
        },
    }
    counts = {}
    for name, head in heads.items():
        x = torch.randn(ROWS_PER_RANK, EMBEDDING_DIM, requires_grad=True)
        with count_communication() as counter:
            head.loss(x * SCALE, torch.arange(ROWS_PER_RANK) + rank).backward()
        counts[name] = counter["bytes"]
    return counts


def check_bytes(counts: dict, world_size: int) -> None:
    target_cosines = 4 * ROWS_PER_RANK * world_size  # fp32
    plain = counts["arcface"]
    for name in ("adaface", "magface", "subcenter_arcface"):
        assert counts[name] == plain, (name, counts)
    for name in ("curricularface", "elasticface_arc"):
        assert counts[name] == plain + target_cosines, (name, counts)


# --------------------------------------------------------------------------------------------------


def worker(rank: int, world_size: int, seed: int) -> dict:
    results = dict(
        cases=[sharded_run(rank, world_size, case, seed + i) for i, case in enumerate(CASES)]
    )
    if dist.is_initialized() and world_size == 2:
        results["bytes"] = bytes_per_step(rank, world_size)
        results["replicated"] = {
            sync: replicated_run(rank, world_size, seed, sync) for sync in (True, False)
        }
    return results


def check(per_rank: list[dict], world_size: int, seed: int) -> dict:
    worst = {}
    for index, case in enumerate(CASES):
        runs = [result["cases"][index] for result in per_rank]
        sampled = [
            None
            if runs[0]["steps"][step]["classes"] is None
            else torch.cat([run["steps"][step]["classes"] for run in runs])
            for step in range(STEPS)
        ]
        expected = one_process_run(case, world_size, seed + index, sampled)
        errors = {}
        for step in range(STEPS):
            want = expected["steps"][step]
            centres = torch.cat([run["steps"][step]["centres"] for run in runs])
            errors[f"centres{step}"] = relative_error(centres, want["centres"])
            for rank, run in enumerate(runs):
                got = run["steps"][step]
                errors[f"loss{step}@{rank}"] = relative_error(got["loss"], want["loss"])
                errors[f"backbone{step}@{rank}"] = relative_error(got["backbone"], want["backbone"])
        for rank, run in enumerate(runs):
            assert run["state"].keys() == expected["state"].keys()
            for key, value in expected["state"].items():
                if value.is_floating_point():
                    errors[f"{key}@{rank}"] = relative_error(run["state"][key], value)
                else:
                    assert torch.equal(run["state"][key], value), (case, key, rank)
        label = f"case {index} {case} W={world_size} seed {seed}"
        assert max(errors.values()) <= TOLERANCE[case["dtype"]], (label, errors)
        worst[str(case["dtype"])] = max(worst.get(str(case["dtype"]), 0.0), max(errors.values()))
        if case["type"] == "curricularface" and world_size > 1 and "rate" not in case:
            assert hard_negatives_elsewhere(case, world_size, seed + index) > 0, label
    return worst


def test_one_process_sharded_adaptive_heads_equal_the_adaptive_heads():
    seed = random.randrange(2**31)
    worst = check([worker(0, 1, seed)], 1, seed)
    print(f"W=1 worst relative error per dtype: {worst}")


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3])
def test_sharded_adaptive_heads_equal_the_one_process_heads(tmp_path, world_size):
    seed = random.randrange(2**31)
    per_rank = spawn(worker, world_size, tmp_path, seed)
    worst = check(per_rank, world_size, seed)
    print(f"W={world_size} worst relative error per dtype: {worst}")
    if world_size == 2:
        for result in per_rank:
            check_bytes(result["bytes"], world_size)
        for sync in (True, False):
            check_replicated([result["replicated"][sync] for result in per_rank], 2, seed, sync)


def test_what_the_sharded_adaptive_head_refuses_names_the_argument():
    with pytest.raises(TypeError, match="head must be an AdaptiveMarginHead, got MarginSpec"):
        ShardedAdaptiveHead(MarginSpec.arcface())
    subcenter = ADAPTIVE_HEADS["subcenter_arcface"](EMBEDDING_DIM, 4, k=2)
    subcenter.keep_dominant(torch.randn(4, EMBEDDING_DIM), torch.arange(4))
    with pytest.raises(ValueError, match="dominant sub-centres .* shard it before keep_dominant"):
        ShardedAdaptiveHead(subcenter)
    with pytest.raises(ValueError, match=r"weight must have shape \(8, 8\), got \(4, 8\)"):
        ShardedAdaptiveHead(
            ADAPTIVE_HEADS["subcenter_arcface"](EMBEDDING_DIM, 4, k=2)
        ).load_full_weight(torch.randn(4, EMBEDDING_DIM))
    with pytest.raises(ValueError, match="centres_per_class"):
        ShardedMarginHead(EMBEDDING_DIM, 4, MarginSpec.arcface(), centres_per_class=0)
    with pytest.raises(TypeError, match="sync_statistics must be true or false"):
        AdaFace(EMBEDDING_DIM, 4, sync_statistics=1)
    with pytest.raises(
        ValueError, match="group was given but torch.distributed is not initialised"
    ):
        AdaFace(EMBEDDING_DIM, 4, process_group=object()).loss(
            torch.randn(2, EMBEDDING_DIM), torch.tensor([0, 1])
        )
    logits, labels = torch.randn(2, 3, dtype=torch.float16), torch.tensor([0, -1])
    with pytest.raises(TypeError, match="logits must be float32 or float64, got torch.float16"):
        sharded_cross_entropy(logits, labels, labels >= 0, num_classes=3)
    with pytest.raises(ValueError, match="num_classes must be >= C_local = 3, got 2"):
        sharded_cross_entropy(logits.float(), labels, labels >= 0, num_classes=2)


def test_from_head_shards_a_head_with_its_options_and_centres():
    """W = 1: the shard of a head with random centres holds them and computes what the head
    computes (fp64, to rounding), for a plain and an adaptive head; what is not a head is refused."""
    generator = torch.Generator().manual_seed(random.randrange(2**31))
    x = torch.randn(6, EMBEDDING_DIM, dtype=torch.float64, generator=generator) * SCALE
    labels = torch.tensor([0, 4, 2, -1, 1, 4])
    plain = MarginHead(
        EMBEDDING_DIM,
        5,
        MarginSpec.sphereface(16.0, 1.5),
        label_smoothing=0.1,
        straight_through=True,
    )
    adaptive = ADAPTIVE_HEADS["adaface"](EMBEDDING_DIM, 5)
    for head, kind in ((plain, ShardedMarginHead), (adaptive, ShardedAdaptiveHead)):
        with torch.no_grad():
            head.weight.copy_(torch.randn(head.weight.shape, generator=generator))
        shard = ShardedMarginHead.from_head(head, sample_rate=1.0, generator_seed=3)
        assert type(shard) is kind
        assert (shard.label_smoothing, shard.straight_through) == (
            head.label_smoothing,
            head.straight_through,
        )
        assert torch.equal(shard.weight.detach(), head.weight.detach())
        expected = head.double().loss(x, labels)
        assert torch.allclose(shard.double().loss(x, labels), expected, rtol=1e-12, atol=0.0)
    with pytest.raises(TypeError, match="head must be a MarginHead, got MarginSpec"):
        ShardedMarginHead.from_head(MarginSpec.arcface())


@pytest.mark.parametrize("name", ["elasticface_arc", "curricularface", "adaface"])
def test_a_sharded_adaptive_head_resumes_from_its_state_dict(name):
    """What a checkpoint holds (the shard, step, and the head's buffers and generator) resumes it."""
    case = dict(
        type=name, dtype=f64, classes=7, options=dict(plus=True) if "elastic" in name else {}
    )
    first = ShardedAdaptiveHead(make_head(case, 1), sample_rate=0.5, generator_seed=2)
    x, labels = torch.randn(4, EMBEDDING_DIM, dtype=f64) * SCALE, torch.tensor([0, 3, -1, 6])
    first.loss(x, labels)
    resumed = ShardedAdaptiveHead(make_head(case, 99), sample_rate=0.5, generator_seed=2)
    resumed.load_state_dict(first.state_dict())
    assert torch.equal(resumed.loss(x, labels), first.loss(x, labels))
    for key, value in first.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
