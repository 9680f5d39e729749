"""Resuming on another world size (issue 28, part 6): a checkpoint written by W ranks resumes on W'
ranks, the sharded centres and their optimizer state regrouped exactly, the replicated parts taken
from rank 0, the epoch continued from the global position where it stopped.

The end-to-end test moves one run W = 2 -> 3 -> 1 through the stage (torchrun workers on gloo,
stopped by the test fault hook) within an epoch, with SGD momentum; the others check the pieces.
"""

from __future__ import annotations

import pytest
import torch
from pipeline_testing import model_state, tiny_raw, write_params

from angular.ops import sharded
from angular.train import checkpoint, reshard, world
from angular.train import epoch as training_epoch
from angular.train.sampler import EpochBatchSampler, order_permutation
from pipeline import EXIT_FAILURE, run_stage
from pipeline import train as train_stage

CHECKPOINTS = "outputs/checkpoints/arcface"
CENTRES = "heads.arcface.weight"
BATCH = 96  # a multiple of 1, 2 and 3 (the global batch): 10 steps an epoch on every world size


def reshard_raw(world_size: int) -> dict:
    return tiny_raw(
        train__epochs=2,
        train__batch_size=BATCH,
        train__optimizer="sgd",
        train__momentum=0.9,
        train__checkpoint_every_steps=3,
        train__distributed__world_size=world_size,
        train__distributed__backend="gloo",
        train__distributed__timeout_s=20.0,
    )


def gathered(folder, world_size: int, name: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The full centre matrix and its momentum from the W rank files ``name``, and rank 0's state."""
    states = [
        torch.load(checkpoint.rank_folder(folder, rank, world_size) / name, weights_only=True)
        for rank in range(world_size)
    ]
    index = states[0]["parameter_names"].index(CENTRES)
    centres = torch.cat([state["model"][CENTRES] for state in states])
    momentum = torch.cat(
        [state["optimizer"]["state"][index]["momentum_buffer"] for state in states]
    )
    return centres, momentum, states[0]


def assert_replicated_equal(first: dict, second: dict) -> None:
    """The parts every rank holds alike: backbone weights and buffers, the head's step, the
    backbone's momentum, schedule, history and the epoch's position."""
    for key, value in first["model"].items():
        if key != CENTRES:
            assert torch.equal(value, second["model"][key]), key
    names = first["parameter_names"]
    assert names == second["parameter_names"]
    for index, name in enumerate(names):
        if name != CENTRES:
            assert torch.equal(
                first["optimizer"]["state"][index]["momentum_buffer"],
                second["optimizer"]["state"][index]["momentum_buffer"],
            ), name
    for key in ("epoch", "step", "position", "partial", "scheduler", "step_lrs", "history"):
        assert first[key] == second[key], key


class Interrupt(BaseException):
    """Stops the one-process stage at its first training step (not an Exception: not caught)."""


@pytest.mark.slow
def test_a_run_moves_from_2_to_3_to_1_ranks_within_an_epoch_with_its_centres_and_momentum(
    project, monkeypatch, capfd
):
    root = project / CHECKPOINTS
    # W = 2: steps 1-5 of epoch 1, a checkpoint after step 3, rank 1 killed before step 6.
    write_params(project, reshard_raw(2))
    monkeypatch.setenv(world.FAULT_ENV, "1:kill:1:6")
    assert run_stage(train_stage.main, ["arcface"]) == EXIT_FAILURE
    name = "epoch-0000-step-000003.pt"
    centres_2, momentum_2, first_2 = gathered(root, 2, name)
    assert first_2["position"] == 3 * BATCH
    assert float(momentum_2.abs().sum()) > 0  # the centres have momentum to regroup

    # W = 3: resumes after step 3; its moved checkpoint is written at once, W = 2's removed.
    write_params(project, reshard_raw(3))
    monkeypatch.setenv(world.FAULT_ENV, "2:kill:1:8")
    capfd.readouterr()
    assert run_stage(train_stage.main, ["arcface"]) == EXIT_FAILURE
    err = capfd.readouterr().err
    assert "moved the checkpoint of 2 ranks (epoch-0000-step-000003.pt) onto 3" in err, err
    assert "resuming at step 3 of epoch 1 of 2" in err, err
    assert not list(root.glob("rank-*-of-2"))
    centres_3, momentum_3, first_3 = gathered(root, 3, name)
    shard_rows = [
        torch.load(root / f"rank-{r}-of-3" / name, weights_only=True)["model"][CENTRES].shape[0]
        for r in range(3)
    ]
    classes = centres_2.shape[0]
    assert shard_rows == [sharded.shard_range(classes, 3, r)[1] for r in range(3)]
    assert torch.equal(centres_3, centres_2) and torch.equal(momentum_3, momentum_2)
    assert_replicated_equal(first_3, first_2)
    # It trained on: steps 4-7, a checkpoint after step 6.
    centres_6, momentum_6, first_6 = gathered(root, 3, "epoch-0000-step-000006.pt")
    assert first_6["position"] == 6 * BATCH and not torch.equal(centres_6, centres_3)

    # W = 1 (in this process): resumes after step 6; stopped at its first step, the moved
    # checkpoint holds the same full centres and momentum.
    monkeypatch.delenv(world.FAULT_ENV)
    write_params(project, reshard_raw(1))

    def interrupted(*args, **kwargs):
        raise Interrupt

    monkeypatch.setattr(training_epoch, "batch_loss", interrupted)
    with pytest.raises(Interrupt):
        run_stage(train_stage.main, ["arcface"])
    err = capfd.readouterr().err
    assert "moved the checkpoint of 3 ranks (epoch-0000-step-000006.pt) onto 1" in err, err
    assert not list(root.glob("rank-*"))
    one = torch.load(root / "epoch-0000-step-000006.pt", weights_only=True)
    index = one["parameter_names"].index(CENTRES)
    assert torch.equal(one["model"][CENTRES], centres_6)
    assert torch.equal(one["optimizer"]["state"][index]["momentum_buffer"], momentum_6)
    assert_replicated_equal(one, first_6)

    # And it trains to the end, on one process.
    monkeypatch.undo()
    monkeypatch.chdir(project)
    assert run_stage(train_stage.main, ["arcface"]) == 0
    assert "resuming at step 6 of epoch 1 of 2" in capfd.readouterr().err
    state = model_state(project / "outputs/models/arcface.pt")
    assert state[CENTRES].shape == centres_6.shape
    assert all(
        bool(torch.isfinite(value).all()) for value in state.values() if value.is_floating_point()
    )


def test_the_rest_of_an_epoch_goes_to_the_new_ranks_once_each():
    """W = 2 takes 3 steps, W = 3 the rest of the epoch: every image of the permutation is taken at
    most once, those of the first 3 steps by W = 2, in the order's positions."""
    size, batch = 935, 96
    order = {"seed": 11}
    permutation = order_permutation(order, size).tolist()
    first = []
    for rank in range(2):
        sampler = EpochBatchSampler(size, batch // 2, world_size=2, rank=rank, seed=10)
        sampler.set_epoch(1)
        assert sampler.order is None
        batches = list(sampler)[:3]
        assert sampler.order == order
        first += [index for b in batches for index in b]
    assert sorted(first) == sorted(permutation[: 3 * batch])
    rest = []
    for rank in range(3):
        sampler = EpochBatchSampler(size, batch // 3, world_size=3, rank=rank, seed=10)
        sampler.resume(order, 3 * batch)
        rest += [index for b in sampler for index in b]
    left = size - 3 * batch
    assert sorted(rest) == sorted(permutation[3 * batch : 3 * batch + left - left % 3])


def shard_state(full: torch.Tensor, momentum: torch.Tensor, world_size: int, rank: int) -> dict:
    start, count = sharded.shard_range(full.shape[0], world_size, rank)
    return {
        "model": {"backbone.w": torch.ones(2), "heads.h.weight": full[start : start + count]},
        "parameter_names": ["backbone.w", "heads.h.weight"],
        "optimizer": {
            "state": {
                0: {"momentum_buffer": torch.full((2,), 3.0)},
                1: {"momentum_buffer": momentum[start : start + count], "step": torch.tensor(7.0)},
            },
            "param_groups": [{"lr": 0.1, "params": [0, 1]}],
        },
        "epoch": 1,
    }


@pytest.mark.parametrize(("old", "new"), [(2, 3), (3, 1), (1, 4), (4, 2), (5, 5)])
def test_regrouping_rows_is_exact_for_every_pair_of_world_sizes(old, new):
    classes = 11
    full = torch.randn(classes, 4, dtype=torch.float64)
    momentum = torch.randn(classes, 4, dtype=torch.float64)
    states = [shard_state(full, momentum, old, rank) for rank in range(old)]
    for rank in range(new):
        start, count = sharded.shard_range(classes, new, rank)
        parts = [state["model"]["heads.h.weight"] for state in states]
        assert torch.equal(reshard.take_rows(parts, start, count), full[start : start + count])
        moments = [state["optimizer"]["state"][1]["momentum_buffer"] for state in states]
        assert torch.equal(
            reshard.take_rows(moments, start, count), momentum[start : start + count]
        )
    with pytest.raises(ValueError, match=r"rows \[9, 13\) are not in the 11 rows saved"):
        reshard.take_rows([full], 9, 4)


def test_a_sharded_head_regroups_its_state_dict_through_the_model(digits_prepared):
    """regrouped_state on a real one-process model: from 2 shards of a random head to the whole."""
    from pipeline_testing import tiny_raw as raw_of

    from angular.config import parse_params
    from angular.train import loop as training

    params = parse_params(raw_of())
    item = params.item("arcface")
    model = training.build_model(*training.describe_model(params, item)[:2], 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    names = [name for name, _ in model.named_parameters()]
    full = torch.randn(10, 16)
    momentum = torch.randn(10, 16)
    states = []
    for rank in range(2):
        start, count = sharded.shard_range(10, 2, rank)
        state = {key: value.clone() for key, value in model.state_dict().items()}
        state[CENTRES] = full[start : start + count]
        entries = {
            position: {"momentum_buffer": torch.randn_like(parameter) * 0 + position}
            for position, (_, parameter) in enumerate(model.named_parameters())
        }
        entries[names.index(CENTRES)] = {"momentum_buffer": momentum[start : start + count]}
        states.append(
            {
                "model": state,
                "parameter_names": names,
                "optimizer": {
                    "state": entries,
                    "param_groups": optimizer.state_dict()["param_groups"],
                },
                "history": [],
            }
        )
    result = reshard.regrouped_state(states, model, optimizer)
    assert torch.equal(result["model"][CENTRES], full)
    assert torch.equal(
        result["optimizer"]["state"][names.index(CENTRES)]["momentum_buffer"], momentum
    )
    model.load_state_dict(result["model"])
    optimizer.load_state_dict(result["optimizer"])
    # Shards of another number of classes do not regroup: one ValueError (resume turns it into a
    # ConfigError of train.distributed.world_size, one line).
    states[1]["model"][CENTRES] = full[5:9]
    with pytest.raises(ValueError, match="rows"):
        reshard.regrouped_state(states, model, optimizer)


def checkpoint_state(model, optimizer) -> dict:
    return {
        "model": model.state_dict(),
        "parameter_names": [name for name, _ in model.named_parameters()],
        "optimizer": optimizer.state_dict(),
        "history": [],
    }


def test_an_adaptive_heads_rule_state_moves_between_one_process_and_its_shard(digits_prepared):
    """CurricularFace's state (its EMA t, its step) is the one-process head's ``t`` and the shard's
    ``rule.t``: regrouped both ways, with the centres and their momentum."""
    from angular.config import parse_params
    from angular.nn.recognition import RecognitionModel
    from angular.nn.sharded import ShardedMarginHead
    from angular.train import loop as training

    params = parse_params(tiny_raw(train__items=["curricularface"]))
    item = params.item("curricularface")
    one = training.build_model(*training.describe_model(params, item)[:2], 10)
    head = one.heads["curricularface"]
    with torch.no_grad():
        head.weight.copy_(torch.randn_like(head.weight))
        head.t.fill_(0.375)
        head.step.fill_(41)
    optimizer = torch.optim.SGD(one.parameters(), lr=0.1, momentum=0.9)
    one(torch.randn(2, 1, *params.data.image_size)).sum().backward()
    head.weight.grad = torch.randn_like(head.weight)
    optimizer.step()

    shard = RecognitionModel(one.backbone, {"curricularface": ShardedMarginHead.from_head(head)})
    shard_optimizer = torch.optim.SGD(shard.parameters(), lr=0.1, momentum=0.9)
    state = reshard.regrouped_state([checkpoint_state(one, optimizer)], shard, shard_optimizer)
    shard.load_state_dict(state["model"])
    shard_optimizer.load_state_dict(state["optimizer"])
    moved = shard.heads["curricularface"]
    assert float(moved.rule.t) == 0.375 and int(moved.step) == 41
    assert torch.equal(moved.weight, head.weight)
    names = [name for name, _ in shard.named_parameters()]
    index = names.index("heads.curricularface.weight")
    momentum = optimizer.state_dict()["state"][index]["momentum_buffer"]
    assert torch.equal(shard_optimizer.state_dict()["state"][index]["momentum_buffer"], momentum)

    # And back to one process.
    fresh = training.build_model(*training.describe_model(params, item)[:2], 10)
    fresh_optimizer = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    back = reshard.regrouped_state(
        [checkpoint_state(shard, shard_optimizer)], fresh, fresh_optimizer
    )
    fresh.load_state_dict(back["model"])
    assert float(fresh.heads["curricularface"].t) == 0.375
    assert_same = [
        torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), one.state_dict().values())
    ]
    assert all(assert_same)


def test_adam_moments_and_step_counts_regroup_to_the_state_that_continues_alike():
    """Adam: the moments of the centres regroup by rows, its step count is rank 0's; the regrouped
    optimizer then steps exactly as the original (fp64)."""
    from angular.nn.recognition import RecognitionModel

    torch.manual_seed(3)
    model = RecognitionModel(torch.nn.Linear(5, 4).double(), {"h": torch.nn.Module()})
    model.heads["h"].weight = torch.nn.Parameter(torch.randn(7, 4, dtype=torch.float64))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(3):
        for parameter in model.parameters():
            parameter.grad = torch.randn_like(parameter)
        optimizer.step()
    full = checkpoint_state(model, optimizer)
    index = full["parameter_names"].index("heads.h.weight")
    states = []
    for rank in range(3):
        start, count = sharded.shard_range(7, 3, rank)
        state = {**full, "model": dict(full["model"])}
        state["model"]["heads.h.weight"] = full["model"]["heads.h.weight"][start : start + count]
        entries = dict(full["optimizer"]["state"])
        entries[index] = {
            key: value[start : start + count] if value.dim() else value
            for key, value in entries[index].items()
        }
        state["optimizer"] = {**full["optimizer"], "state": entries}
        states.append(state)

    again = RecognitionModel(torch.nn.Linear(5, 4).double(), {"h": torch.nn.Module()})
    again.heads["h"].weight = torch.nn.Parameter(torch.zeros(7, 4, dtype=torch.float64))
    again_optimizer = torch.optim.Adam(again.parameters(), lr=0.01)
    regrouped = reshard.regrouped_state(states, again, again_optimizer)
    again.load_state_dict(regrouped["model"])
    again_optimizer.load_state_dict(regrouped["optimizer"])
    moved = again_optimizer.state_dict()["state"][index]
    original = optimizer.state_dict()["state"][index]
    assert moved.keys() == original.keys() and float(moved["step"]) == 3.0
    for key in original:
        assert torch.equal(moved[key], original[key]), key
    gradients = [torch.randn_like(p) for p in model.parameters()]
    for first, second, gradient in zip(model.parameters(), again.parameters(), gradients):
        first.grad, second.grad = gradient.clone(), gradient.clone()
    optimizer.step()
    again_optimizer.step()
    for first, second in zip(model.parameters(), again.parameters()):
        assert torch.equal(first, second)


def test_a_finished_run_drops_the_checkpoints_other_world_sizes_left_of_its_params(tmp_path):
    def write(path, fingerprint):
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(
            {"format": checkpoint.CHECKPOINT_FORMAT, "base_fingerprint": fingerprint, "epoch": 1},
            path,
        )

    for rank in range(2):
        write(tmp_path / f"rank-{rank}-of-2" / "epoch-0001.pt", "these")
    write(tmp_path / "rank-0-of-4" / "epoch-0001-step-000003.pt", "other")
    write(tmp_path / "epoch-0001.pt", "these")  # one process's
    write(tmp_path / "rank-0-of-3" / "epoch-0002.pt", "these")  # the finishing world's own
    checkpoint.drop_other_worlds(tmp_path, "these", 3)
    left = sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*.pt"))
    assert left == ["rank-0-of-3/epoch-0002.pt", "rank-0-of-4/epoch-0001-step-000003.pt"]
    assert not (tmp_path / "rank-0-of-2").exists()


class Stop(BaseException):
    pass


def test_shards_that_do_not_add_up_are_refused_in_one_line(project, monkeypatch):
    """Files of these params from 2 ranks whose shards miss rows (hand-made from a one-process
    checkpoint): one ConfigError line naming train.distributed.world_size and the folder, nothing
    trained."""
    from pipeline_testing import STEPS_PER_EPOCH, paths_in

    from angular.config import ConfigError, parse_params
    from angular.data import read_manifest
    from angular.train.loop import train_item

    params = parse_params(tiny_raw(train__epochs=2))
    manifest = read_manifest("data/prepared")
    paths = paths_in(project / "run")
    original, count = training_epoch.batch_loss, {"n": 0}

    def stopping(model, *args, **kwargs):
        if model.training:
            count["n"] += 1
            if count["n"] == STEPS_PER_EPOCH + 1:
                raise Stop
        return original(model, *args, **kwargs)

    monkeypatch.setattr(training_epoch, "batch_loss", stopping)
    with pytest.raises(Stop):
        train_item(params, "arcface", manifest, paths)
    monkeypatch.undo()
    monkeypatch.chdir(project)
    one = paths.checkpoints / "epoch-0001.pt"
    state = torch.load(one, weights_only=True)
    index = state["parameter_names"].index("heads.arcface.weight")
    classes = state["model"][CENTRES].shape[0]
    short = classes // 2 - 1
    for rank in range(2):  # a row short each
        shard = {**state, "world_size": 2, "rank": rank, "model": dict(state["model"])}
        rows = slice(short * rank, short * rank + short)
        shard["model"][CENTRES] = state["model"][CENTRES][rows]
        entries = dict(state["optimizer"]["state"])
        entries[index] = {
            key: value[rows] if value.dim() else value for key, value in entries[index].items()
        }
        shard["optimizer"] = {**state["optimizer"], "state": entries}
        folder = paths.checkpoints / f"rank-{rank}-of-2"
        folder.mkdir()
        torch.save(shard, folder / "epoch-0001.pt")
    one.unlink()
    with pytest.raises(ConfigError) as caught:
        train_item(params, "arcface", manifest, paths)
    assert caught.value.key == "train.distributed.world_size"
    message = str(caught.value)
    assert "\n" not in message, message
    assert "the checkpoint of 2 ranks" in message and "rank-0-of-2" in message, message
    assert f"rows [0, {classes}) are not in the {2 * short} rows saved" in message, message
    assert not paths.model.exists()
