"""Activation checkpointing of the face backbones (``model.<backbone>.checkpoint``, issue 28): the
same loss, gradients and BatchNorm running statistics as without it, bit for bit; no checkpointing
in eval mode or without gradients; the config key and the model file."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import pytest
import torch
import torch.utils.checkpoint
import yaml

from angular.config import ConfigError, parse_params
from angular.nn.backbones import CheckpointedBlock, build_backbone
from angular.nn.recognition import build_model
from angular.train.checkpoint import describe_model

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"
SIZE = 32  # the smallest face input: fast, and every block still runs
BLOCKS = {"iresnet18": 8, "mobilefacenet": 15}


def pair(name: str, dtype: torch.dtype, seed: int):
    """The backbone without and with checkpointing, with the same weights and buffers."""
    torch.manual_seed(seed)
    plain = build_backbone(name, in_channels=3, embedding_dim=16, input_size=(SIZE, SIZE))
    checkpointed = build_backbone(
        name, in_channels=3, embedding_dim=16, input_size=(SIZE, SIZE), checkpoint=True
    )
    checkpointed.load_state_dict(plain.state_dict())
    return plain.to(dtype).train(), checkpointed.to(dtype).train()


def training_step(net, images, weights):
    """Loss and gradients of a random linear function of the embeddings, in train mode."""
    loss = (net(images) * weights).sum()
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_checkpointing_changes_no_loss_gradient_or_running_statistic(name, dtype):
    plain, checkpointed = pair(name, dtype, seed=11)
    generator = torch.Generator().manual_seed(12)
    for _ in range(2):  # two steps: the second normalises nothing differently either
        images = torch.randn(4, 3, SIZE, SIZE, generator=generator, dtype=dtype)
        weights = torch.randn(4, 16, generator=generator, dtype=dtype)
        expected = training_step(plain, images, weights)
        assert torch.equal(training_step(checkpointed, images, weights), expected)
    grads = dict(checkpointed.named_parameters())
    for key, parameter in plain.named_parameters():
        assert (parameter.grad is None) == (grads[key].grad is None), key
        if parameter.grad is not None:
            assert torch.equal(grads[key].grad, parameter.grad), key
    buffers = dict(checkpointed.named_buffers())
    for key, buffer in plain.named_buffers():  # running_mean, running_var, num_batches_tracked
        assert torch.equal(buffers[key], buffer), key


def test_without_the_frozen_statistics_the_recompute_would_update_them_twice(monkeypatch):
    # Why RunningStatsFrozen exists: torch's recompute runs the BatchNorms in train mode again.
    monkeypatch.setattr(
        CheckpointedBlock, "_contexts", lambda self: (contextlib.nullcontext(),) * 2
    )
    plain, checkpointed = pair("iresnet18", torch.float32, seed=3)
    images = torch.randn(2, 3, SIZE, SIZE)
    weights = torch.randn(2, 16)
    training_step(plain, images, weights)
    training_step(checkpointed, images, weights)
    counts = dict(checkpointed.named_buffers())
    assert counts["features.3.layers.0.num_batches_tracked"].item() == 2
    assert plain.get_buffer("features.3.layers.0.num_batches_tracked").item() == 1


@pytest.fixture
def checkpoint_calls(monkeypatch):
    calls = []
    original = torch.utils.checkpoint.checkpoint

    def counted(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counted)
    return calls


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_only_training_with_gradients_checkpoints(name, checkpoint_calls):
    plain, checkpointed = pair(name, torch.float32, seed=5)
    images = torch.randn(2, 3, SIZE, SIZE)
    plain(images).sum().backward()
    assert checkpoint_calls == []  # the option off: never
    checkpointed(images).sum().backward()
    assert len(checkpoint_calls) == BLOCKS[name]
    assert all(call["use_reentrant"] is False for call in checkpoint_calls)
    with torch.no_grad():  # train mode (both, so their running statistics stay equal)
        plain(images)
        checkpointed(images)
    checkpointed.eval()
    expected = plain.eval()(images)
    assert torch.equal(checkpointed(images), expected)
    assert len(checkpoint_calls) == BLOCKS[name]  # no_grad and eval: plain calls


def test_build_backbone_refuses_a_checkpoint_that_is_not_a_bool():
    with pytest.raises(TypeError, match="^checkpoint must be a bool, got str$"):
        build_backbone("iresnet18", input_size=(SIZE, SIZE), checkpoint="yes")
    with pytest.raises(TypeError, match="takes no options"):
        build_backbone("resnet18", checkpoint=True)


# --------------------------------------------------------------------------------------------------
# params.yaml and the model file.


def _params(backbone: str, **model):
    raw = copy.deepcopy(yaml.safe_load(PARAMS.read_text(encoding="utf-8")))
    raw["model"]["backbone"] = backbone
    for section, options in model.items():
        raw["model"][section].update(options)
    raw["data"]["image_size"] = [SIZE, SIZE]
    return parse_params(raw)


@pytest.mark.parametrize(
    "name, section", [("iresnet18", "iresnet"), ("mobilefacenet", "mobilefacenet")]
)
def test_the_config_key_reaches_the_model_file_and_the_rebuilt_backbone(name, section):
    off = _params(name)
    assert getattr(off.model, section).checkpoint is False
    assert "checkpoint" not in off.model.options  # model files and fingerprints as before
    on = _params(name, **{section: {"checkpoint": True}})
    backbone, heads, _ = describe_model(on, on.item(on.train.items[0]))
    assert backbone["options"]["checkpoint"] is True
    model = build_model(backbone, heads, num_classes=3)
    blocks = [m for m in model.modules() if isinstance(m, CheckpointedBlock)]
    assert len(blocks) == BLOCKS[name] and all(block.checkpoint for block in blocks)


def test_a_model_file_without_the_key_rebuilds_without_checkpointing():
    params = _params("iresnet18")
    backbone, heads, _ = describe_model(params, params.item(params.train.items[0]))
    model = build_model(backbone, heads, num_classes=3)
    assert not any(m.checkpoint for m in model.modules() if isinstance(m, CheckpointedBlock))


def test_a_params_file_without_the_key_reads_it_as_false():
    raw = copy.deepcopy(yaml.safe_load(PARAMS.read_text(encoding="utf-8")))
    del raw["model"]["iresnet"]["checkpoint"]
    del raw["model"]["mobilefacenet"]["checkpoint"]
    params = parse_params(raw)
    assert params.model.iresnet.checkpoint is False
    assert params.model.mobilefacenet.checkpoint is False


@pytest.mark.parametrize("section", ["iresnet", "mobilefacenet"])
def test_a_checkpoint_that_is_not_true_or_false_is_refused_in_one_line(section):
    with pytest.raises(ConfigError) as caught:
        _params("iresnet18", **{section: {"checkpoint": 1}})
    assert str(caught.value) == f"model.{section}.checkpoint: must be true or false, got 1"
