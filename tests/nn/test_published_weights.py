"""Published weights (issue 25, part 6): insightface arcface_torch's ``backbone.pth`` onto our
IResNet (angular.nn.published), and model.init_from in the training stage.

The reference is arcface_torch's IResNet (insightface, recognition/arcface_torch/backbones/
iresnet.py) transcribed: its attribute names and their order are the file format. Files are written
from it with random weights (every tensor, running statistics included, so that a swapped pair of
equal-shaped tensors changes the output), read into ours, and both networks must give the same
embedding in fp64.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from angular.nn.backbones import IResNet, build_backbone
from angular.nn.published import (
    PublishedWeightsError,
    insightface_names,
    insightface_state_dict,
    load_insightface_backbone,
    load_published_backbone,
)

# arcface_torch's iresnet18 ... iresnet200 (its _iresnet calls)
PUBLISHED_LAYERS = {
    18: [2, 2, 2, 2],
    34: [3, 4, 6, 3],
    50: [3, 4, 14, 3],
    100: [3, 13, 30, 3],
    200: [6, 26, 60, 6],
}


class ReferenceBlock(nn.Module):
    """arcface_torch's IBasicBlock."""

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-05)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-05)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-05)
        self.downsample = downsample

    def forward(self, x):
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class ReferenceIResNet(nn.Module):
    """arcface_torch's IResNet (3-channel 112x112 input, its fc_scale 7 * 7)."""

    fc_scale = 7 * 7

    def __init__(self, layers, dropout=0.0, num_features=512):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, self.inplanes, 3, 1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes, eps=1e-05)
        self.prelu = nn.PReLU(self.inplanes)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1])
        self.layer3 = self._make_layer(256, layers[2])
        self.layer4 = self._make_layer(512, layers[3])
        self.bn2 = nn.BatchNorm2d(512, eps=1e-05)
        self.dropout = nn.Dropout(p=dropout, inplace=True)
        self.fc = nn.Linear(512 * self.fc_scale, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-05)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False

    def _make_layer(self, planes, blocks, stride=2):
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, 1, stride, bias=False),
                nn.BatchNorm2d(planes, eps=1e-05),
            )
        layers = [ReferenceBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [ReferenceBlock(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


def ours(depth: int) -> IResNet:
    return build_backbone(
        f"iresnet{depth}", in_channels=3, embedding_dim=512, input_size=(112, 112)
    )


@torch.no_grad()
def randomise(module: nn.Module, seed: int) -> nn.Module:
    """Every tensor random, at scales that keep a deep network's output finite and informative."""
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in module.state_dict().items():
        if name.endswith("num_batches_tracked"):
            tensor.copy_(torch.randint(0, 10_000, (), generator=generator))
            continue
        if name.endswith("running_var"):
            values = torch.rand(tensor.shape, generator=generator, dtype=torch.float64) + 0.5
        elif tensor.dim() > 1:  # conv and fc weights: variance-preserving
            fan_in = tensor[0].numel()
            values = torch.randn(tensor.shape, generator=generator, dtype=torch.float64)
            values /= fan_in**0.5
        elif name.endswith("weight"):  # BN scale, PReLU slope
            values = torch.rand(tensor.shape, generator=generator, dtype=torch.float64) * 0.5 + 0.5
        else:  # BN shift and running mean, FC bias
            values = torch.randn(tensor.shape, generator=generator, dtype=torch.float64) * 0.1
        tensor.copy_(values)
    return module


def published_file(tmp_path, depth: int, seed: int = 0):
    """A backbone.pth as arcface_torch writes it: the state dict of its IResNet."""
    reference = randomise(ReferenceIResNet(PUBLISHED_LAYERS[depth]), seed)
    path = tmp_path / "backbone.pth"
    torch.save(reference.state_dict(), path)
    return reference, path


# --------------------------------------------------------------------------------------------------
# Names, shapes and order.


@pytest.mark.parametrize("depth", sorted(PUBLISHED_LAYERS))
def test_our_blocks_per_stage_are_arcface_torchs(depth):
    assert list(IResNet.LAYERS[depth]) == PUBLISHED_LAYERS[depth]


@pytest.mark.parametrize("depth", sorted(PUBLISHED_LAYERS))
def test_every_tensor_maps_to_arcface_torchs_name_shape_and_order(depth):
    # Built on the meta device: names and shapes without memory (iresnet200 has 119M parameters).
    with torch.device("meta"):
        reference = ReferenceIResNet(PUBLISHED_LAYERS[depth]).state_dict()
        net = ours(depth)
    names = insightface_names(net)
    assert list(names.values()) == list(reference)  # every key, once, in the file's order
    ours_state = net.state_dict()
    for key, theirs in names.items():
        assert ours_state[key].shape == reference[theirs].shape, (key, theirs)
        assert ours_state[key].dtype == reference[theirs].dtype, (key, theirs)


@pytest.mark.parametrize("depth", [18, pytest.param(50, marks=pytest.mark.slow)])
def test_a_published_file_gives_arcface_torchs_embedding_and_round_trips(tmp_path, depth):
    reference, path = published_file(tmp_path, depth, seed=depth)
    net = ours(depth)
    load_insightface_backbone(net, path)

    # Every tensor round-trips: name, order, shape and value.
    back = insightface_state_dict(net)
    written = torch.load(path, weights_only=True)
    assert list(back) == list(written)
    for name, tensor in written.items():
        assert torch.equal(back[name], tensor), name

    # The same function: fp64, eval mode (the running statistics), fresh random faces.
    reference.double().eval()
    net.double().eval()
    images = torch.randn(
        2, 3, 112, 112, dtype=torch.float64, generator=torch.Generator().manual_seed(7)
    )
    with torch.no_grad():
        expected, got = reference(images), net(images)
    assert expected.std() > 0.1  # an informative output, not a collapsed one
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_a_wrong_mapping_would_be_caught_by_the_embedding_comparison(tmp_path):
    # The check above can fail: swap two equal-shaped tensors (a block's first and second BN) and
    # the embedding moves far beyond its tolerance.
    reference, path = published_file(tmp_path, 18, seed=1)
    state = torch.load(path, weights_only=True)
    for tensor in ("weight", "bias", "running_mean", "running_var"):
        first, second = f"layer2.1.bn1.{tensor}", f"layer2.1.bn2.{tensor}"
        state[first], state[second] = state[second], state[first]
    torch.save(state, path)
    net = ours(18)
    load_insightface_backbone(net, path)
    reference.double().eval()
    net.double().eval()
    images = torch.randn(1, 3, 112, 112, dtype=torch.float64)
    with torch.no_grad():
        difference = (net(images) - reference(images)).abs().max()
    assert difference > 1e-3


def test_a_half_precision_file_loads_into_the_fp32_model(tmp_path):
    reference, _ = published_file(tmp_path, 18, seed=2)
    path = tmp_path / "half.pth"
    torch.save(
        {k: v.half() if v.is_floating_point() else v for k, v in reference.state_dict().items()},
        path,
    )
    net = ours(18)
    load_insightface_backbone(net, path)
    assert net.embedding[3].weight.dtype == torch.float32
    torch.testing.assert_close(
        net.embedding[3].weight, reference.fc.weight.half().float(), rtol=0, atol=0
    )


# --------------------------------------------------------------------------------------------------
# Files that do not fit: one line naming the file and what is wrong; the model is left as it was.


@pytest.fixture(scope="module")
def good_state(tmp_path_factory):
    _, path = published_file(tmp_path_factory.mktemp("published"), 18, seed=3)
    return torch.load(path, weights_only=True)


def refused(net: nn.Module, path, match: str) -> str:
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(PublishedWeightsError, match=match) as caught:
        load_insightface_backbone(net, path)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(str(path))
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # all or nothing
    return message


def test_a_missing_key_is_named(tmp_path, good_state):
    state = dict(good_state)
    del state["layer3.1.prelu.weight"]
    torch.save(state, tmp_path / "b.pth")
    refused(ours(18), tmp_path / "b.pth", r"missing key layer3\.1\.prelu\.weight")


def test_a_ddp_prefixed_file_names_its_first_key(tmp_path, good_state):
    torch.save({f"module.{k}": v for k, v in good_state.items()}, tmp_path / "b.pth")
    refused(
        ours(18),
        tmp_path / "b.pth",
        r"missing key conv1\.weight \(the file's first key is module\.conv1\.weight\)",
    )


def test_an_unexpected_key_is_named(tmp_path, good_state):
    state = dict(good_state)
    state["fc2.weight"] = torch.randn(3)
    torch.save(state, tmp_path / "b.pth")
    refused(ours(18), tmp_path / "b.pth", r"unexpected key fc2\.weight")


def test_a_wrong_shape_is_named_with_both_shapes(tmp_path, good_state):
    state = dict(good_state)
    state["layer1.0.conv2.weight"] = torch.randn(64, 64, 1, 1)
    torch.save(state, tmp_path / "b.pth")
    refused(
        ours(18),
        tmp_path / "b.pth",
        r"layer1\.0\.conv2\.weight has shape \[64, 64, 1, 1\], the model's has \[64, 64, 3, 3\]",
    )


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (
            dict(in_channels=1),
            r"conv1\.weight has shape \[64, 3, 3, 3\], the model's has \[64, 1, 3, 3\]",
        ),
        (
            dict(embedding_dim=128),
            r"fc\.weight has shape \[512, 25088\], the model's has \[128, 25088\]",
        ),
        (
            dict(input_size=(96, 96)),
            r"fc\.weight has shape \[512, 25088\], the model's has \[512, 18432\]",
        ),
    ],
)
def test_a_model_built_otherwise_than_the_published_one_is_named(tmp_path, good_state, kwargs, key):
    torch.save(good_state, tmp_path / "b.pth")
    options = dict(in_channels=3, embedding_dim=512, input_size=(112, 112)) | kwargs
    refused(build_backbone("iresnet18", **options), tmp_path / "b.pth", key)


def test_a_file_of_another_depth_is_named_by_its_depth(tmp_path, good_state):
    torch.save(good_state, tmp_path / "b.pth")
    refused(
        ours(34),
        tmp_path / "b.pth",
        r"holds iresnet18 \(blocks per stage \[2, 2, 2, 2\]\), the model is iresnet34 \(\[3, 4, 6, 3\]\)",
    )


def test_non_finite_weights_are_refused(tmp_path, good_state):
    state = dict(good_state)
    state["layer2.0.bn3.running_var"] = state["layer2.0.bn3.running_var"].clone()
    state["layer2.0.bn3.running_var"][5] = float("nan")
    torch.save(state, tmp_path / "b.pth")
    refused(
        ours(18), tmp_path / "b.pth", r"layer2\.0\.bn3\.running_var holds NaN or infinite values"
    )


def test_an_integer_tensor_in_place_of_a_weight_is_refused(tmp_path, good_state):
    state = dict(good_state)
    state["prelu.weight"] = torch.zeros(64, dtype=torch.int64)
    torch.save(state, tmp_path / "b.pth")
    refused(
        ours(18),
        tmp_path / "b.pth",
        r"prelu\.weight has dtype torch\.int64, expected torch\.float32",
    )


class RunsCode:
    """A pickle that would call os.getcwd when loaded (harmless stand-in for any code)."""

    def __reduce__(self):
        return (os.getcwd, ())


def test_a_pickle_with_a_global_is_refused_unread(tmp_path, good_state):
    torch.save({**good_state, "extra": RunsCode()}, tmp_path / "b.pth")
    message = refused(
        ours(18), tmp_path / "b.pth", r"refused: loading it would import a pickle global"
    )
    assert "getcwd" in message


def test_a_whole_pickled_model_is_refused(tmp_path):
    torch.save(ReferenceIResNet(PUBLISHED_LAYERS[18]), tmp_path / "b.pth")
    refused(ours(18), tmp_path / "b.pth", r"refused: .*ReferenceIResNet")


@pytest.mark.parametrize(
    "content, match",
    [
        (b"not a torch file", r"not a readable torch file"),
        (b"", r"not a readable torch file"),
    ],
)
def test_a_file_that_is_not_a_state_dict_is_refused(tmp_path, content, match):
    (tmp_path / "b.pth").write_bytes(content)
    refused(ours(18), tmp_path / "b.pth", match)


@pytest.mark.parametrize(
    "content, match",
    [
        ([torch.ones(2)], r"not a state dict \(a mapping of tensor names to tensors\), got list"),
        ({1: torch.ones(2)}, r"not a state dict"),
        ({"conv1.weight": [1.0]}, r"conv1\.weight is a list, not a tensor"),
    ],
)
def test_a_torch_file_of_something_else_is_refused(tmp_path, good_state, content, match):
    if isinstance(content, dict) and "conv1.weight" in content:
        content = {**good_state, **content}
    torch.save(content, tmp_path / "b.pth")
    refused(ours(18), tmp_path / "b.pth", match)


def test_a_truncated_file_is_refused(tmp_path, good_state):
    torch.save(good_state, tmp_path / "whole.pth")
    data = (tmp_path / "whole.pth").read_bytes()
    (tmp_path / "b.pth").write_bytes(data[: len(data) // 2])
    refused(ours(18), tmp_path / "b.pth", r"not a readable torch file")


def test_a_missing_file_or_a_folder_is_named(tmp_path):
    refused(ours(18), tmp_path / "absent.pth", r"no such weights file")
    refused(ours(18), tmp_path, r"no such weights file")


def test_another_backbone_or_format_is_refused(tmp_path, good_state):
    torch.save(good_state, tmp_path / "b.pth")
    with pytest.raises(
        PublishedWeightsError,
        match=r"b\.pth: insightface weights are an IResNet's; the model's backbone is a MobileFaceNet",
    ):
        load_insightface_backbone(
            build_backbone("mobilefacenet", in_channels=3), tmp_path / "b.pth"
        )
    with pytest.raises(PublishedWeightsError, match=r"unknown weights format 'onnx'"):
        load_published_backbone(ours(18), "onnx", tmp_path / "b.pth")
