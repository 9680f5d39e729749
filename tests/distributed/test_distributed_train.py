"""train with train.distributed.world_size > 1 (README, Scaling out): torchrun workers on gloo, a
SIGKILLed worker and the bitwise resume, a worker that raises or hangs, and what is refused before
any worker starts (resuming on another world size: test_reshard_resume.py).

The end-to-end tests launch torchrun (each launch starts three Python processes: seconds each), so
there are few of them, on tiny params; the rest call the pieces directly.
"""

from __future__ import annotations

import re
import shutil

import pytest
import torch
from pipeline_testing import assert_same_state, model_state, tiny_raw, write_params

from angular.config import parse_params
from angular.data import read_manifest
from angular.nn.adaptive import ADAPTIVE_HEADS, CurricularFace
from angular.nn.recognition import load_model
from angular.train import checkpoint, world
from angular.train import loop as training
from pipeline import EXIT_CONFIG, EXIT_FAILURE, run_stage
from pipeline import train as train_stage

MODEL = "outputs/models/arcface.pt"
CHECKPOINTS = "outputs/checkpoints/arcface"


def distributed_raw(**overrides) -> dict:
    """Tiny params on two gloo workers; a collective waits at most 20 s."""
    settings = dict(
        train__epochs=3,
        train__distributed__world_size=2,
        train__distributed__backend="gloo",
        train__distributed__timeout_s=20.0,
    )
    return tiny_raw(**{**settings, **overrides})


def last_line(capfd) -> str:
    return capfd.readouterr().err.strip().splitlines()[-1]


@pytest.mark.slow
def test_a_sigkilled_worker_fails_the_stage_and_a_rerun_resumes_to_the_same_model(
    project, monkeypatch, capfd
):
    write_params(project, distributed_raw())
    assert run_stage(train_stage.main, ["arcface"]) == 0
    uninterrupted = model_state(project / MODEL)
    loaded = load_model(project / MODEL)  # today's format: the full head, no params needed
    manifest = read_manifest(project / "data" / "prepared")
    assert loaded.classes == list(manifest.classes) and loaded.members == ["arcface"]
    assert loaded.model.heads["arcface"].weight.shape == (len(manifest.classes), 16)
    assert not list((project / CHECKPOINTS).rglob("*.pt"))  # dropped once the model is written
    shutil.rmtree(project / "outputs")
    capfd.readouterr()

    # Rank 1 SIGKILLs itself in epoch 2: rank 0 fails on its next collective.
    monkeypatch.setenv(world.FAULT_ENV, "1:kill:2:3")
    assert run_stage(train_stage.main, ["arcface"]) == EXIT_FAILURE
    message = last_line(capfd)
    # Rank 1 is named as silent. Rank 0 usually reports its failed collective, but torchrun may
    # stop it first (once in CI: "ranks 0, 1 ended without a report"); both are the right message.
    assert re.search(r"ranks? (\d+, )*1 ended without a report", message), message
    assert "SIGKILL" in message, message
    assert not (project / MODEL).exists()
    for rank in (0, 1):
        assert (project / CHECKPOINTS / f"rank-{rank}-of-2" / "epoch-0001.pt").is_file()

    monkeypatch.delenv(world.FAULT_ENV)
    write_params(project, distributed_raw())
    assert run_stage(train_stage.main, ["arcface"]) == 0
    assert "resuming after epoch 1 of 3" in capfd.readouterr().err
    assert_same_state(model_state(project / MODEL), uninterrupted)


@pytest.mark.slow
def test_an_adaptive_head_trains_sharded_and_writes_the_model_file_of_one_process(project):
    raw = distributed_raw(train__epochs=2, train__items=["curricularface"])
    write_params(project, raw)
    assert run_stage(train_stage.main, ["curricularface"]) == 0
    loaded = load_model(project / "outputs/models/curricularface.pt")
    head = loaded.model.heads["curricularface"]
    assert isinstance(head, CurricularFace) and head.options == {"m": 0.5}
    params = parse_params(raw)
    manifest = read_manifest(project / "data" / "prepared")
    description = training.describe_model(params, params.item("curricularface"))
    one_process = training.build_model(*description[:2], len(manifest.classes))
    assert head.state_dict().keys() == one_process.heads["curricularface"].state_dict().keys()
    assert head.weight.shape == (len(manifest.classes), 16)
    assert (
        int(head.step) > 0 and float(head.t) != 0.0
    )  # trained: the EMA of the target cosine moved


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fault", "named"),
    [
        ("1:raise:1:2", "rank 1: RuntimeError: the test fault"),
        # Rank 0 sleeps for ever: rank 1 times out in the head's all-gather, torchrun stops rank 0.
        ("0:hang:1:2", "rank 0 ended without a report"),
    ],
    ids=["raises", "hangs"],
)
def test_a_worker_that_raises_or_hangs_fails_the_stage_naming_its_rank(
    project, monkeypatch, capfd, fault, named
):
    write_params(project, distributed_raw(train__epochs=1, train__distributed__timeout_s=5.0))
    monkeypatch.setenv(world.FAULT_ENV, fault)
    assert run_stage(train_stage.main, ["arcface"]) == EXIT_FAILURE
    message = last_line(capfd)
    assert message.startswith("error: train@arcface: the distributed run failed"), message
    assert named in message, message
    assert not (project / MODEL).exists()


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"train__distributed__world_size": 3}, "train.batch_size"),  # 64 images on 3 ranks
        (
            {"train__distributed__backend": "nccl", "train__device": "cpu"},
            "train.distributed.backend",
        ),
    ],
    ids=["batch", "nccl-on-cpu"],
)
def test_what_several_processes_cannot_train_is_refused_before_any_worker_starts(
    project, capfd, overrides, key
):
    write_params(project, distributed_raw(**overrides))
    started = torch.multiprocessing.active_children()
    assert run_stage(train_stage.main, ["arcface"]) == EXIT_CONFIG
    message = last_line(capfd)
    assert message.startswith(f"error in params.yaml: {key}: "), message
    assert torch.multiprocessing.active_children() == started
    assert not (project / "outputs" / "models").exists()


def test_every_adaptive_head_may_train_on_several_processes():
    for name in ADAPTIVE_HEADS:
        params = parse_params(distributed_raw(train__items=[name]))
        training.check_supported(params, params.item(name))


def test_fused_linear_heads_may_train_on_several_processes():
    """The sharded head runs the fused linear op in shard mode (tests/distributed/
    test_sharded_exactness.py, test_no_full_head.py): nothing to refuse, alone or in a joint item."""
    raw = distributed_raw(train__items=["arcface", "joint"], heads__arcface__fused_linear=True)
    raw["heads"]["joint"]["heads"]["cosface"]["fused_linear"] = True
    params = parse_params(raw)
    for name in ("arcface", "joint"):
        training.check_supported(params, params.item(name))


def test_the_failure_names_the_ranks_that_reported_first_then_the_silent_ones(tmp_path):
    (tmp_path / "rank-2.error").write_text("RuntimeError: gloo timed out", encoding="utf-8")
    (tmp_path / "rank-0.done").write_text("", encoding="utf-8")
    message = world.failure_message("train@x", tmp_path, 4, 1)
    assert message.startswith("train@x: the distributed run failed (torchrun exit status 1): ")
    assert "rank 2: RuntimeError: gloo timed out; ranks 1, 3 ended without a report" in message
    assert "rank 0" not in message


def test_one_process_fingerprints_ignore_the_distributed_section(digits_prepared):
    manifest = read_manifest(digits_prepared)

    def fingerprint(**overrides) -> str:
        params = parse_params(tiny_raw(**overrides))
        item = params.item("arcface")
        model = training.build_model(*training.describe_model(params, item)[:2], 8)
        return checkpoint.fingerprint(params, item, manifest, model)

    one = fingerprint()
    assert fingerprint(train__distributed__backend="gloo", train__distributed__timeout_s=9.0) == one
    two = fingerprint(train__distributed__world_size=2)
    assert two != one
    # Several processes: the world size plays no part (another one resumes, regrouped).
    assert fingerprint(train__distributed__world_size=4) == two
    assert fingerprint(train__distributed__world_size=2, train__distributed__sample_rate=0.5) != two
