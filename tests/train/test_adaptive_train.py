"""Adaptive heads and the prioritized sampler in training: a new head trains through
``train_item`` into a model file that ``load_model`` rebuilds, and a prioritized run resumed after
an interruption equals an uninterrupted one bitwise (CPU)."""

from __future__ import annotations

import pytest
import torch
from pipeline_testing import STEPS_PER_EPOCH, assert_same_state, model_state, paths_in, tiny_raw
from test_train import Interrupt, interrupt_training_at

from angular.config import ConfigError, parse_params
from angular.data import read_manifest
from angular.nn.adaptive import ElasticArcFace, SubCenterArcFace
from angular.nn.recognition import load_model
from angular.train.loop import train_item


def test_an_adaptive_head_trains_and_loads_without_params(project):
    params = parse_params(tiny_raw(train__epochs=2, train__items=["subcenter_arcface"]))
    manifest = read_manifest("data/prepared")
    paths = paths_in(project / "out")
    metrics = train_item(params, "subcenter_arcface", manifest, paths)
    assert metrics["val_accuracy"] > 0.3  # well above chance (1/8)
    loaded = load_model(paths.model)
    head = loaded.model.heads["subcenter_arcface"]
    assert isinstance(head, SubCenterArcFace) and head.weight.shape == (8 * 3, 16)
    assert loaded.head_specs["subcenter_arcface"]["options"] == {"m": 0.5, "k": 3}


@pytest.mark.slow
def test_prioritized_resume_equals_an_uninterrupted_run(project, monkeypatch, capsys):
    # ElasticFace too: its margin generator must resume with the model.
    params = parse_params(
        tiny_raw(train__epochs=3, train__sampler="prioritized", train__items=["elasticface_arc"])
    )
    manifest = read_manifest("data/prepared")
    reference = paths_in(project / "reference")
    train_item(params, "elasticface_arc", manifest, reference)

    resumed = paths_in(project / "resumed")
    interrupt_training_at(monkeypatch, STEPS_PER_EPOCH + 5)  # epoch 2, step 5
    with pytest.raises(Interrupt):
        train_item(params, "elasticface_arc", manifest, resumed)
    monkeypatch.undo()
    monkeypatch.chdir(project)
    train_item(params, "elasticface_arc", manifest, resumed)
    assert "resuming after epoch 1 of 3" in capsys.readouterr().err
    assert_same_state(model_state(reference.model), model_state(resumed.model))
    assert resumed.metrics.read_text() == reference.metrics.read_text()
    assert isinstance(load_model(resumed.model).model.heads["elasticface_arc"], ElasticArcFace)

    # The sampler changes the run: a uniform one ends elsewhere.
    uniform = paths_in(project / "uniform")
    train_item(
        parse_params(tiny_raw(train__epochs=3, train__items=["elasticface_arc"])),
        "elasticface_arc",
        manifest,
        uniform,
    )
    key = "heads.elasticface_arc.weight"
    assert not torch.equal(model_state(uniform.model)[key], model_state(reference.model)[key])


def test_the_prioritized_sampler_refuses_several_processes():
    # (Adaptive heads train sharded: tests/distributed/test_distributed_train.py.)
    with pytest.raises(ConfigError, match="train.sampler: must be uniform when"):
        parse_params(tiny_raw(train__sampler="prioritized", train__distributed__world_size=2))
