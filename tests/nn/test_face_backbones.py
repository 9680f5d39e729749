"""The face backbones (docs/design.md, Heads and backbones): MobileFaceNet and IResNet-18/34/50 as
published, their input sizes, a training step, and the config that selects them."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml

from angular.config import ConfigError, parse_params
from angular.nn.backbones import (
    BACKBONES,
    FACE_BACKBONES,
    MIN_FACE_INPUT,
    IResNet,
    MobileFaceNet,
    build_backbone,
)
from angular.nn.heads import MarginHead, MarginSpec
from angular.nn.recognition import build_model
from angular.train.loop import describe_model

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# Published sizes at 112x112 RGB: MobileFaceNet 0.99M (Chen et al. 2018, Table 2, 128-d); the
# arcface_torch IResNets with a 512-d embedding: 24.0M, 34.1M, 43.6M.
@pytest.mark.parametrize(
    "name, embedding_dim, published, tolerance",
    [
        ("mobilefacenet", 128, 0.99e6, 0.02),
        ("iresnet18", 512, 24.0e6, 0.005),
        ("iresnet34", 512, 34.1e6, 0.005),
        ("iresnet50", 512, 43.6e6, 0.005),
    ],
)
def test_parameter_counts_match_the_published_figures(name, embedding_dim, published, tolerance):
    net = build_backbone(name, in_channels=3, embedding_dim=embedding_dim, input_size=(112, 112))
    assert parameter_count(net) == pytest.approx(published, rel=tolerance)


def test_the_published_mobilefacenet_ends_in_a_7x7_global_depthwise_conv():
    net = MobileFaceNet(in_channels=3, embedding_dim=128)
    gdc = net.embedding[0]
    assert gdc.kernel_size == (7, 7) and gdc.groups == 512 and gdc.padding == (0, 0)
    # Depthwise everywhere but the stem and the 1x1 convs: no dense 3x3 conv after the first.
    dense_3x3 = [
        m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)
    ]
    assert [m.groups == 1 for m in dense_3x3].count(True) == 1


def test_iresnet_embedding_layer_is_bn_dropout_fc_bn_with_fixed_scale():
    net = IResNet(18, in_channels=1, embedding_dim=64, input_size=(64, 64), dropout=0.2)
    kinds = [type(m).__name__ for m in net.embedding]
    assert kinds == ["BatchNorm2d", "Dropout", "Flatten", "Linear", "BatchNorm1d"]
    assert net.embedding[1].p == 0.2
    assert net.embedding[3].in_features == 512 * 4 * 4
    assert not net.embedding[-1].weight.requires_grad
    assert any(isinstance(m, torch.nn.PReLU) for m in net.modules())


@pytest.mark.parametrize(
    "name, size",
    [
        ("mobilefacenet", (112, 112)),
        ("mobilefacenet", (56, 46)),
        ("mobilefacenet", (MIN_FACE_INPUT, MIN_FACE_INPUT)),
        ("iresnet18", (64, 64)),
        ("iresnet18", (56, 46)),
        pytest.param("iresnet34", (MIN_FACE_INPUT, 40), marks=pytest.mark.slow),
        pytest.param("iresnet50", (MIN_FACE_INPUT, MIN_FACE_INPUT), marks=pytest.mark.slow),
    ],
)
@pytest.mark.parametrize("channels, embedding_dim", [(1, 128), (3, 96)])
def test_embedding_shapes_for_each_supported_input(name, size, channels, embedding_dim):
    torch.manual_seed(0)
    net = build_backbone(name, in_channels=channels, embedding_dim=embedding_dim, input_size=size)
    images = torch.randn(3, channels, *size)
    embeddings = net(images)
    assert embeddings.shape == (3, embedding_dim) and torch.isfinite(embeddings).all()
    net.eval()  # a single image in evaluation mode (running BN statistics)
    assert net(images[:1]).shape == (1, embedding_dim)


def test_channels_last_and_bf16_autocast_give_the_same_embeddings():
    torch.manual_seed(0)
    net = build_backbone("mobilefacenet", in_channels=1, embedding_dim=128, input_size=(64, 64))
    net.eval()
    images = torch.randn(4, 1, 64, 64)
    with torch.no_grad():
        reference = net(images)
        channels_last = net.to(memory_format=torch.channels_last)(
            images.contiguous(memory_format=torch.channels_last)
        )
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = net(images).float()
    torch.testing.assert_close(channels_last, reference, rtol=1e-4, atol=1e-4)
    cosine = torch.nn.functional.cosine_similarity(bf16, reference)
    assert cosine.min() > 0.99


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilefacenet", "iresnet18"])
def test_a_training_step_lowers_the_loss_on_the_same_batch(name):
    torch.manual_seed(0)
    net = build_backbone(name, in_channels=1, embedding_dim=64, input_size=(32, 32))
    head = MarginHead(64, 4, MarginSpec.arcface(s=16.0, m=0.2))
    images, labels = torch.randn(8, 1, 32, 32), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    optimizer = torch.optim.Adam([*net.parameters(), *head.parameters()], lr=1e-3)
    losses = []
    for _ in range(3):
        loss = head.loss(net(images), labels)
        optimizer.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("name", FACE_BACKBONES)
def test_an_input_size_below_the_minimum_is_a_clear_error(name):
    with pytest.raises(ValueError, match=r"input_size must be at least 32x32.*got 31x64"):
        build_backbone(name, input_size=(31, 64))
    with pytest.raises(TypeError, match="input_size must be"):
        build_backbone(name, input_size=(64,))


@pytest.mark.parametrize("name", FACE_BACKBONES)
def test_images_of_another_size_or_channel_count_are_a_clear_error(name):
    net = build_backbone(name, in_channels=1, embedding_dim=16, input_size=(32, 32))
    with pytest.raises(ValueError, match=r"images must be 32x32 .*got 48x48"):
        net(torch.randn(2, 1, 48, 48))
    with pytest.raises(ValueError, match=r"images must have shape \(B, 1, H, W\)"):
        net(torch.randn(2, 3, 32, 32))


def test_bad_options_name_the_argument():
    with pytest.raises(ValueError, match="depth must be one of"):
        IResNet(101)
    with pytest.raises(ValueError, match="dropout must be a number in"):
        IResNet(18, dropout=1.0)
    with pytest.raises(ValueError, match="scale must be >= 1"):
        MobileFaceNet(scale=0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'width'"):
        build_backbone("iresnet18", input_size=(64, 64), width=3)


# --------------------------------------------------------------------------------------------------
# Selected in params.yaml: model.backbone, model.mobilefacenet / model.iresnet, data.image_size.


def _params(backbone: str, image_size=(64, 64), **model):
    raw = copy.deepcopy(yaml.safe_load(PARAMS.read_text(encoding="utf-8")))
    raw["model"]["backbone"] = backbone
    raw["model"].update(model)
    raw["data"]["image_size"] = list(image_size)
    return parse_params(raw)


def test_every_backbone_is_a_config_choice():
    assert set(FACE_BACKBONES) < set(BACKBONES)
    for name in BACKBONES:
        assert _params(name).model.backbone == name


@pytest.mark.parametrize("name", FACE_BACKBONES)
def test_the_model_file_description_rebuilds_the_backbone_for_the_image_size(name):
    params = _params(name, (56, 46), iresnet={"dropout": 0.1}, mobilefacenet={"scale": 2})
    backbone, heads, image = describe_model(params, params.item(params.train.items[0]))
    assert backbone["options"]["input_size"] == [56, 46]
    expected = {"scale": 2} if name == "mobilefacenet" else {"dropout": 0.1}
    assert {k: v for k, v in backbone["options"].items() if k != "input_size"} == expected
    model = build_model(backbone, heads, num_classes=5)
    images = torch.randn(2, params.data.channels, 56, 46)
    assert model(images).shape == (2, params.model.embedding_dim)


def test_a_face_backbone_on_images_below_the_minimum_is_a_config_error():
    with pytest.raises(ConfigError) as caught:
        _params("mobilefacenet", (28, 28))
    assert caught.value.key == "model.backbone"
    assert "data.image_size of at least [32, 32]" in caught.value.problem
    assert _params("small_cnn", (28, 28)).model.backbone == "small_cnn"
