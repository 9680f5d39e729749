"""Backbones (``angular.models``): every name maps small greyscale and colour images to embeddings of
the requested size, trains (a backward pass reaches every weight), and bad arguments name themselves."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from angular.nn.backbones import BACKBONES, FACE_BACKBONES, build_backbone

# The backbones that take any input size; the face backbones are built for one input size of at
# least 32x32 and have their own tests (tests/nn/test_face_backbones.py).
ANY_SIZE_BACKBONES = tuple(name for name in BACKBONES if name not in FACE_BACKBONES)

INPUT_SHAPES = [(1, 8, 8), (1, 64, 64), (3, 32, 32)]


@pytest.fixture
def seed() -> int:
    value = torch.seed()
    random.seed(value)
    return value


@pytest.mark.parametrize("image_shape", INPUT_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", ANY_SIZE_BACKBONES)
def test_maps_images_to_embeddings(seed, name, image_shape):
    embedding_dim = random.randint(8, 40)
    net = build_backbone(name, in_channels=image_shape[0], embedding_dim=embedding_dim)
    batch = random.randint(2, 3)
    images = torch.randn(batch, *image_shape)
    with torch.no_grad():
        train_out = net(images)
        net.eval()
        eval_out = net(images[:1])  # one image works in eval mode (batch norm uses running stats)
    assert train_out.shape == (batch, embedding_dim), f"seed={seed}"
    assert eval_out.shape == (1, embedding_dim), f"seed={seed}"
    assert torch.all(torch.isfinite(train_out)) and torch.all(torch.isfinite(eval_out))
    # Different images give different embeddings (the network is not constant).
    assert not torch.allclose(train_out[0], train_out[1]), f"seed={seed}"


@pytest.mark.parametrize("name", ANY_SIZE_BACKBONES)
def test_backward_reaches_every_weight(seed, name):
    net = build_backbone(name, in_channels=1, embedding_dim=16)
    images = torch.randn(2, 1, 8, 8)
    target = torch.randn(2, 16)
    loss = (net(images) - target).square().mean()
    loss.backward()
    for param_name, param in net.named_parameters():
        assert param.grad is not None, f"{name}: no gradient for {param_name}"
        assert torch.all(torch.isfinite(param.grad)), f"{name}: {param_name} seed={seed}"
    assert any(p.grad.abs().sum() > 0 for p in net.parameters()), f"seed={seed}"
    # One optimiser step changes the output.
    before = net(images).detach()
    torch.optim.SGD(net.parameters(), lr=0.1).step()
    assert not torch.allclose(net(images).detach(), before), f"seed={seed}"


def test_small_cnn_options_are_passed_through():
    net = build_backbone("small_cnn", in_channels=1, embedding_dim=8, width=4, dropout=0.2)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [4, 8]
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.2 for m in net.modules())


@pytest.mark.parametrize("blocks,convs_per_block", [(1, 1), (3, 2), (4, 1)])
def test_small_cnn_depth_options(seed, blocks, convs_per_block):
    net = build_backbone(
        "small_cnn", embedding_dim=8, width=4, blocks=blocks, convs_per_block=convs_per_block
    )
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    widths = [4 * 2 ** min(block, 2) for block in range(blocks)]
    assert [c.out_channels for c in convs] == [w for w in widths for _ in range(convs_per_block)]
    pools = [m for m in net.modules() if isinstance(m, torch.nn.MaxPool2d)]
    assert len(pools) == blocks
    for shape in ((1, 8, 8), (1, 56, 46)):  # 8x8 digits survive 4 halvings (ceil mode)
        out = net(torch.randn(2, *shape))
        assert out.shape == (2, 8) and torch.all(torch.isfinite(out)), f"seed={seed}"


def test_small_cnn_default_keeps_the_original_layout():
    # Checkpoints of the two-block network must keep loading: same parameter names and shapes.
    net = build_backbone("small_cnn", embedding_dim=16, width=8)
    shapes = {
        name: tuple(t.shape) for name, t in net.state_dict().items() if "num_batches" not in name
    }
    assert shapes == {
        "features.0.weight": (8, 1, 3, 3),
        **{f"features.1.{k}": (8,) for k in ("weight", "bias", "running_mean", "running_var")},
        "features.4.weight": (16, 8, 3, 3),
        **{f"features.5.{k}": (16,) for k in ("weight", "bias", "running_mean", "running_var")},
        "embedding.2.weight": (16, 16 * 16),
        **{f"embedding.3.{k}": (16,) for k in ("weight", "bias", "running_mean", "running_var")},
    }


def test_numpy_integer_sizes_are_accepted():
    net = build_backbone("small_cnn", in_channels=np.int64(1), embedding_dim=np.int64(8))
    assert net(torch.randn(2, 1, 8, 8)).shape == (2, 8)


@pytest.mark.parametrize(
    "name,kwargs,argument",
    [
        ("vgg16", {}, "name"),
        ("ResNet18", {}, "name"),
        ("", {}, "name"),
        (None, {}, "name"),
        ("small_cnn", dict(in_channels=0), "in_channels"),
        ("resnet18", dict(in_channels=-1), "in_channels"),
        ("resnet34", dict(in_channels=1.5), "in_channels"),
        ("small_cnn", dict(embedding_dim=0), "embedding_dim"),
        ("resnet18", dict(embedding_dim=-8), "embedding_dim"),
        ("small_cnn", dict(embedding_dim="128"), "embedding_dim"),
        ("resnet34", dict(embedding_dim=True), "embedding_dim"),
        ("small_cnn", dict(width=0), "width"),
        ("small_cnn", dict(dropout=1.0), "dropout"),
        ("small_cnn", dict(dropout=-0.1), "dropout"),
        ("small_cnn", dict(depth=3), "depth"),
        ("small_cnn", dict(blocks=0), "blocks"),
        ("small_cnn", dict(blocks=2.0), "blocks"),
        ("small_cnn", dict(convs_per_block=0), "convs_per_block"),
        ("resnet18", dict(width=64), "options"),
    ],
)
def test_bad_arguments_name_themselves(name, kwargs, argument):
    with pytest.raises((ValueError, TypeError), match=rf"\b{argument}\b"):
        build_backbone(name, **kwargs)


@pytest.mark.parametrize("name", BACKBONES)
def test_wrong_image_shape_names_images(name):
    net = build_backbone(name, in_channels=1, embedding_dim=8)
    for bad in (torch.randn(2, 3, 8, 8), torch.randn(1, 8, 8), torch.randn(2, 1, 1, 8, 8)):
        with pytest.raises(ValueError, match=r"\bimages\b"):
            net(bad)
