"""Heads built inside ``angular.nn.heads.keeping_shard(W, r)`` keep only rank r's class block of their
initial centres, drawn in blocks: the kept rows are exactly those rows of the whole draw, and the
random stream after the build is the one-process stream (what makes a sharded run with a head too
large to gather start as one process does). The end-to-end run (W = 2, gather_head_mib 0) is
tests/distributed/test_no_full_head.py."""

from __future__ import annotations

import random

import pytest
import torch

from angular.nn import heads as heads_module
from angular.nn.adaptive import build_adaptive_head
from angular.nn.heads import MarginHead, MarginSpec, draw_centres, keeping_shard
from angular.nn.sharded import ShardedMarginHead
from angular.ops.sharded import shard_range


def whole_and_kept(build, world_size: int, rank: int, seed: int):
    """``build()``'s weight built whole and built keeping rank's shard from the same seed, and the
    next draws of the stream after each."""
    torch.manual_seed(seed)
    whole = build()
    after_whole = torch.rand(5)
    torch.manual_seed(seed)
    with keeping_shard(world_size, rank):
        kept = build()
    after_kept = torch.rand(5)
    return whole, kept, after_whole, after_kept


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("classes,dim", [(10, 8), (37, 5), (7, 3)])
def test_a_kept_shard_is_those_rows_of_the_whole_draw(monkeypatch, world_size, classes, dim):
    """Blocks of 64 elements (many blocks, a short last one merged) on uneven shapes: D = 5 and 3
    make totals that are not multiples of 16 (the redrawn tail)."""
    monkeypatch.setattr(heads_module, "DRAW_BLOCK", 64)
    seed = random.randrange(2**31)
    for rank in range(world_size):
        (whole, none), (kept, rows), after_whole, after_kept = whole_and_kept(
            lambda: draw_centres(classes, 1, dim), world_size, rank, seed
        )
        start, count = shard_range(classes, world_size, rank)
        assert none is None and rows == (start, count)
        assert torch.equal(kept, whole[start : start + count]), f"seed {seed} rank {rank}"
        assert torch.equal(after_kept, after_whole), f"seed {seed}: the stream moved differently"


@pytest.mark.parametrize("world_size", [2, 3])
def test_heads_and_their_shards_from_a_kept_build(monkeypatch, world_size):
    """A MarginHead and a sub-center head (K = 3 per class, drawn after the MarginHead's own draw)
    built keeping a shard give the sharded head the rows of the whole head; a shard of another
    rank is refused."""
    monkeypatch.setattr(heads_module, "DRAW_BLOCK", 48)
    seed = random.randrange(2**31)
    builds = {
        "arcface": lambda: MarginHead(6, 11, MarginSpec.arcface(s=16.0)),
        "subcenter": lambda: build_adaptive_head(
            "subcenter_arcface", 6, 11, s=16.0, options={"m": 0.5, "k": 3}
        ),
    }
    for name, build in builds.items():
        for rank in range(world_size):
            whole, kept, after_whole, after_kept = whole_and_kept(build, world_size, rank, seed)
            assert torch.equal(after_kept, after_whole), f"{name} seed {seed}"
            start, count = shard_range(11, world_size, rank)
            k = getattr(whole, "centres_per_class", 1)
            assert kept.kept_classes == (start, count)
            assert torch.equal(kept.weight, whole.weight[start * k : (start + count) * k])
            if name == "arcface":
                shard = ShardedMarginHead(6, 11, MarginSpec.arcface(s=16.0))
                shard.class_start, shard.class_count = start, count
                shard.weight = torch.nn.Parameter(torch.empty(count, 6))
                shard.take_centres_of(kept)
                assert torch.equal(shard.weight, whole.weight[start : start + count])
                shard.class_start = start + 1
                with pytest.raises(ValueError, match="this rank's shard is"):
                    shard.take_centres_of(kept)
