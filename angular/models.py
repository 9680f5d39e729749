"""Backbones that map an image batch (B, channels, H, W) to embeddings (B, embedding_dim) (DESIGN §4).

- ``small_cnn``: the original repository's network: two 3x3 conv + pool blocks and a dense embedding
  layer (with batch norm, so the embedding is well scaled for the cosine head).
- ``resnet18`` / ``resnet34``: torchvision ResNets adapted to small and greyscale inputs: a 3x3 stride-1
  stem without the max-pool (so 8x8 digits or 64x64 faces keep their resolution), ``in_channels``
  input planes, and the classifier replaced by a linear embedding with batch norm.
"""

from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Two conv blocks (3x3 conv, BN, ReLU, 2x2 max-pool) then a dense embedding layer."""

    def __init__(
        self, in_channels: int = 1, embedding_dim: int = 128, width: int = 32, dropout: float = 0.0
    ):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2, ceil_mode=True),
            # A fixed spatial size makes the dense layer independent of the input resolution.
            nn.AdaptiveAvgPool2d(4),
        )
        self.embedding = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(2 * width * 16, embedding_dim, bias=False),
            nn.BatchNorm1d(embedding_dim),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embedding(self.features(images))


class ResNetEmbedding(nn.Module):
    """A torchvision ResNet with a small-input stem and an embedding layer instead of the classifier."""

    def __init__(self, depth: int, in_channels: int = 1, embedding_dim: int = 128):
        super().__init__()
        from torchvision.models import resnet18, resnet34

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
        return self.net(images)


BACKBONES = ("small_cnn", "resnet18", "resnet34")


def build_backbone(
    name: str, *, in_channels: int = 1, embedding_dim: int = 128, **options
) -> nn.Module:
    """Backbone by its name in ``params.yaml``: one of :data:`BACKBONES`."""
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    if embedding_dim < 1:
        raise ValueError(f"embedding_dim must be >= 1, got {embedding_dim}")
    if name == "small_cnn":
        return SmallCNN(in_channels=in_channels, embedding_dim=embedding_dim, **options)
    if name in ("resnet18", "resnet34"):
        return ResNetEmbedding(int(name[6:]), in_channels=in_channels, embedding_dim=embedding_dim)
    raise ValueError(f"backbone must be one of {', '.join(BACKBONES)}, got {name!r}")
