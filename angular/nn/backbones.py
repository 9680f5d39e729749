"""Backbones that map an image batch (B, channels, H, W) to embeddings (B, embedding_dim)
(docs/design.md, Heads and backbones).

- ``small_cnn``: by default the original repository's network: two 3x3 conv + pool blocks and a
  dense embedding layer (with batch norm, so the embedding is well scaled for the cosine head); more
  and deeper blocks on request (``blocks``, ``convs_per_block``).
- ``resnet18`` / ``resnet34``: torchvision ResNets adapted to small and greyscale inputs: a 3x3 stride-1
  stem without the max-pool (so 8x8 digits or 64x64 faces keep their resolution), ``in_channels``
  input planes, and the classifier replaced by a linear embedding with batch norm.
"""

from __future__ import annotations

import numbers

import torch
from torch import nn


def check_size(name: str, value) -> int:
    """A size argument (channels, dimensions, class counts): an integer >= 1, named when it is not."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def _check_images(images: torch.Tensor, in_channels: int) -> None:
    """A clear error for the commonest mistakes: a missing batch or channel axis, wrong channels."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != in_channels:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must have shape (B, {in_channels}, H, W), got {shape}")


class SmallCNN(nn.Module):
    """``blocks`` conv blocks, then a dense embedding layer with batch norm.

    A block is ``convs_per_block`` x (3x3 conv, BN, ReLU) and a 2x2 max-pool; block ``i`` has
    ``width * 2**min(i, 2)`` channels. The defaults (2 blocks of one conv) are the original
    repository's network; 3 blocks of 2 convs (a small VGG) learn faces that generalise to people
    never seen in training (docs/faces.md).
    """

    def __init__(
        self,
        in_channels: int = 1,
        embedding_dim: int = 128,
        width: int = 32,
        dropout: float = 0.0,
        blocks: int = 2,
        convs_per_block: int = 1,
    ):
        super().__init__()
        self.in_channels = check_size("in_channels", in_channels)
        check_size("embedding_dim", embedding_dim)
        check_size("width", width)
        check_size("blocks", blocks)
        check_size("convs_per_block", convs_per_block)
        if (
            isinstance(dropout, bool)
            or not isinstance(dropout, (int, float))
            or not 0 <= dropout < 1
        ):
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        layers: list[nn.Module] = []
        channels = in_channels
        for block in range(blocks):
            out_channels = width * 2 ** min(block, 2)
            for _ in range(convs_per_block):
                layers += [
                    nn.Conv2d(channels, out_channels, 3, padding=1, bias=False),
                    nn.BatchNorm2d(out_channels),
                    nn.ReLU(inplace=True),
                ]
                channels = out_channels
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        # A fixed spatial size makes the dense layer independent of the input resolution.
        layers.append(nn.AdaptiveAvgPool2d(4))
        self.features = nn.Sequential(*layers)
        self.embedding = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(channels * 16, embedding_dim, bias=False),
            nn.BatchNorm1d(embedding_dim),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images, self.in_channels)
        return self.embedding(self.features(images))


class ResNetEmbedding(nn.Module):
    """A torchvision ResNet with a small-input stem and an embedding layer instead of the classifier."""

    def __init__(self, depth: int, in_channels: int = 1, embedding_dim: int = 128):
        super().__init__()
        from torchvision.models import resnet18, resnet34

        self.in_channels = check_size("in_channels", in_channels)
        check_size("embedding_dim", embedding_dim)

        builders = {18: resnet18, 34: resnet34}
        if depth not in builders:
            raise ValueError(f"depth must be one of {sorted(builders)}, got {depth}")
        net = builders[depth](weights=None)
        net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
        features = net.fc.in_features
        net.fc = nn.Sequential(
            nn.Linear(features, embedding_dim, bias=False), nn.BatchNorm1d(embedding_dim)
        )
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images, self.in_channels)
        return self.net(images)


BACKBONES = ("small_cnn", "resnet18", "resnet34")


def build_backbone(
    name: str, *, in_channels: int = 1, embedding_dim: int = 128, **options
) -> nn.Module:
    """Backbone by its name in ``params.yaml``: one of :data:`BACKBONES`. ``options`` go to
    :class:`SmallCNN` (``width``, ``dropout``, ``blocks``, ``convs_per_block``); the ResNets take
    none."""
    if name not in BACKBONES:
        raise ValueError(f"name: unknown backbone {name!r}; expected one of {', '.join(BACKBONES)}")
    if name == "small_cnn":
        return SmallCNN(in_channels=in_channels, embedding_dim=embedding_dim, **options)
    if options:
        raise TypeError(f"options: backbone {name!r} takes no options, got {sorted(options)}")
    return ResNetEmbedding(int(name[6:]), in_channels=in_channels, embedding_dim=embedding_dim)
