"""Backbones that map an image batch (B, channels, H, W) to embeddings (B, embedding_dim)
(docs/design.md, Heads and backbones).

- ``small_cnn``: by default the original repository's network: two 3x3 conv + pool blocks and a
  dense embedding layer (with batch norm, so the embedding is well scaled for the cosine head); more
  and deeper blocks on request (``blocks``, ``convs_per_block``).
- ``resnet18`` / ``resnet34``: torchvision ResNets adapted to small and greyscale inputs: a 3x3 stride-1
  stem without the max-pool (so 8x8 digits or 64x64 faces keep their resolution), ``in_channels``
  input planes, and the classifier replaced by a linear embedding with batch norm.
- ``mobilefacenet``: MobileFaceNet (Chen et al., 2018; insightface's ``mbf``): inverted residual
  bottlenecks with PReLU and a global depthwise conv (GDC) embedding; about 1M parameters.
- ``iresnet18`` / ``iresnet34`` / ``iresnet50`` / ``iresnet100`` / ``iresnet200``: the improved
  ResNets of insightface's arcface_torch (BN-conv-BN-PReLU-conv-BN blocks, a BN-Dropout-FC-BN
  embedding layer), with its blocks per stage; its published ``backbone.pth`` files load into them
  (:mod:`angular.nn.published`, whose key mapping reads the ``INSIGHTFACE_NAMES`` kept here beside
  the layers they name).

The face backbones divide the input by 16 (four stride-2 stages) and their embedding layer reads the
whole final map (the GDC's kernel, the FC's input), so they are built for one ``input_size``
(``params.yaml``'s ``data.image_size``; 112x112 as published) and need at least
:data:`MIN_FACE_INPUT` pixels a side (a 2x2 final map); another size is a clear error.

With ``checkpoint=True`` (``model.<backbone>.checkpoint``; arcface_torch's ``using_ckpt``) the face
backbones' residual blocks keep no activations for the backward pass and recompute them there:
less memory for more time, the same numbers (:class:`CheckpointedBlock`).
"""

from __future__ import annotations

import contextlib
import math
import numbers

import torch
import torch.utils.checkpoint
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


def _check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _check_dropout(dropout) -> None:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")


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
        _check_dropout(dropout)
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


# Four stride-2 stages: a side of MIN_FACE_INPUT pixels leaves a 2x2 map for the embedding layer.
FACE_STRIDE = 16
MIN_FACE_INPUT = 32


def check_input_size(value) -> tuple[int, int]:
    """``input_size`` of a face backbone: ``(height, width)``, each >= :data:`MIN_FACE_INPUT`."""
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in value)
    ):
        raise TypeError(f"input_size must be (height, width), two ints, got {value!r}")
    if min(value) < MIN_FACE_INPUT:
        raise ValueError(
            f"input_size must be at least {MIN_FACE_INPUT}x{MIN_FACE_INPUT} for the face backbones "
            f"(four stride-2 stages leave a 2x2 map), got {value[0]}x{value[1]}"
        )
    return int(value[0]), int(value[1])


def _final_map(input_size: tuple[int, int]) -> tuple[int, int]:
    # A 3x3 stride-2 conv with padding 1 maps n pixels to ceil(n / 2).
    return tuple(math.ceil(side / FACE_STRIDE) for side in input_size)


class _FaceBackbone(nn.Module):
    """Shared input checks: channels, and the size the embedding layer was built for."""

    def __init__(self, in_channels: int, embedding_dim: int, input_size):
        super().__init__()
        self.in_channels = check_size("in_channels", in_channels)
        self.embedding_dim = check_size("embedding_dim", embedding_dim)
        self.input_size = check_input_size(input_size)

    def _check(self, images: torch.Tensor) -> None:
        _check_images(images, self.in_channels)
        if tuple(images.shape[2:]) != self.input_size:
            height, width = self.input_size
            raise ValueError(
                f"images must be {height}x{width} (the input_size this backbone was built for), "
                f"got {images.shape[2]}x{images.shape[3]}"
            )


def _conv_bn(in_c: int, out_c: int, kernel: int, stride: int, groups: int = 1, act: bool = True):
    """Conv (no bias), BN and, unless linear, PReLU: MobileFaceNet's unit."""
    layers = [
        nn.Conv2d(in_c, out_c, kernel, stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_c),
    ]
    if act:
        layers.append(nn.PReLU(out_c))
    return nn.Sequential(*layers)


class RunningStatsFrozen:
    """While entered, the BatchNorms of ``module`` update copies of their running statistics
    (``running_mean``, ``running_var``, ``num_batches_tracked``), dropped on exit: the buffers are
    left as they were.

    The recompute context of a checkpointed block: the first forward has updated the statistics
    already, and a second update would move them twice as far per step as without checkpointing.
    Copies rather than ``track_running_stats=False``, which would save other tensors for backward
    than the first forward did (torch's checkpoint refuses that); swapped, not copied back, so the
    buffers are never written in place. A class, not a generator, so that it can be entered again
    (a second backward with ``retain_graph``)."""

    STATISTICS = ("running_mean", "running_var", "num_batches_tracked")

    def __init__(self, module: nn.Module):
        norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
        self.norms = [m for m in module.modules() if isinstance(m, norms) and m.track_running_stats]
        self.originals: list[tuple[nn.Module, str, torch.Tensor]] = []

    def __enter__(self) -> None:
        for norm in self.norms:
            for name in self.STATISTICS:
                buffer = getattr(norm, name)
                if buffer is not None:
                    self.originals.append((norm, name, buffer))
                    setattr(norm, name, buffer.clone())

    def __exit__(self, *exc) -> None:
        # Also on torch's early stop of the recompute (an exception raised through the block).
        for norm, name, buffer in self.originals:
            setattr(norm, name, buffer)
        self.originals.clear()


class CheckpointedBlock(nn.Module):
    """A residual block whose :meth:`compute` is run under ``torch.utils.checkpoint`` (non-reentrant)
    when ``checkpoint`` is on, the block is training and gradients are enabled; in eval mode or
    under ``torch.no_grad`` it is a plain call. The recompute restores the RNG and autocast state
    (torch's defaults) and updates no BatchNorm running statistics (:class:`RunningStatsFrozen`),
    so the loss, the gradients and the running statistics equal the plain call's."""

    def __init__(self, checkpoint: bool = False):
        super().__init__()
        self.checkpoint = _check_flag("checkpoint", checkpoint)

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpoint and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(
                self.compute, x, use_reentrant=False, context_fn=self._contexts
            )
        return self.compute(x)

    def _contexts(self):
        # (around the first forward, around the recompute)
        return contextlib.nullcontext(), RunningStatsFrozen(self)


class Bottleneck(CheckpointedBlock):
    """MobileNetV2's inverted residual with PReLU: 1x1 expand, 3x3 depthwise, linear 1x1 project;
    a shortcut when the shape is kept."""

    def __init__(
        self, in_c: int, out_c: int, expansion: int, stride: int, checkpoint: bool = False
    ):
        super().__init__(checkpoint)
        hidden = in_c * expansion
        self.residual = stride == 1 and in_c == out_c
        self.layers = nn.Sequential(
            _conv_bn(in_c, hidden, 1, 1),
            _conv_bn(hidden, hidden, 3, stride, groups=hidden),
            _conv_bn(hidden, out_c, 1, 1, act=False),
        )

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layers(x) if self.residual else self.layers(x)


class MobileFaceNet(_FaceBackbone):
    """MobileFaceNet as the paper's Table 1 (insightface ``mbf`` with ``scale`` 1): a 3x3 stride-2
    conv, a depthwise 3x3, bottlenecks (expansion t, channels c, repeats n, first stride s) of
    (2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1), a 1x1 conv to 512,
    then the linear global depthwise conv over the whole final map (7x7 at 112x112) and a linear
    layer with BN to the embedding. ``scale`` multiplies the 64/128 channel widths (insightface's
    default ``mbf`` is ``scale=2``); ``checkpoint`` checkpoints the bottlenecks."""

    SETTINGS = ((2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1))

    def __init__(
        self,
        in_channels: int = 1,
        embedding_dim: int = 128,
        input_size=(112, 112),
        scale: int = 1,
        checkpoint: bool = False,
    ):
        super().__init__(in_channels, embedding_dim, input_size)
        scale = check_size("scale", scale)
        self.checkpoint = _check_flag("checkpoint", checkpoint)
        width = 64 * scale
        layers = [
            _conv_bn(in_channels, width, 3, 2),
            _conv_bn(width, width, 3, 1, groups=width),
        ]
        channels = width
        for expansion, out_c, repeats, stride in self.SETTINGS:
            for index in range(repeats):
                out = out_c * scale
                first_stride = stride if index == 0 else 1
                layers.append(Bottleneck(channels, out, expansion, first_stride, checkpoint))
                channels = out
        layers.append(_conv_bn(channels, 512, 1, 1))
        self.features = nn.Sequential(*layers)
        self.embedding = nn.Sequential(
            # GDC: one weight per channel and final-map position, no padding -> 1x1.
            nn.Conv2d(512, 512, _final_map(self.input_size), groups=512, bias=False),
            nn.BatchNorm2d(512),
            nn.Flatten(),
            nn.Linear(512, embedding_dim, bias=False),
            nn.BatchNorm1d(embedding_dim),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self._check(images)
        return self.embedding(self.features(images))


class IBasicBlock(CheckpointedBlock):
    """arcface_torch's block: BN, 3x3 conv, BN, PReLU, 3x3 conv (the stride), BN; plus the
    shortcut (a 1x1 conv with BN when the shape changes)."""

    # Our module -> arcface_torch's (its IBasicBlock's attributes), in the order of both state dicts.
    INSIGHTFACE_NAMES = {
        "layers.0": "bn1",
        "layers.1": "conv1",
        "layers.2": "bn2",
        "layers.3": "prelu",
        "layers.4": "conv2",
        "layers.5": "bn3",
        "shortcut.0": "downsample.0",
        "shortcut.1": "downsample.1",
    }

    def __init__(self, in_c: int, out_c: int, stride: int, checkpoint: bool = False):
        super().__init__(checkpoint)
        self.layers = nn.Sequential(
            nn.BatchNorm2d(in_c, eps=1e-5),
            nn.Conv2d(in_c, out_c, 3, 1, padding=1, bias=False),
            nn.BatchNorm2d(out_c, eps=1e-5),
            nn.PReLU(out_c),
            nn.Conv2d(out_c, out_c, 3, stride, padding=1, bias=False),
            nn.BatchNorm2d(out_c, eps=1e-5),
        )
        self.shortcut = (
            nn.Identity()
            if stride == 1 and in_c == out_c
            else nn.Sequential(
                nn.Conv2d(in_c, out_c, 1, stride, bias=False), nn.BatchNorm2d(out_c, eps=1e-5)
            )
        )

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x) + self.shortcut(x)


class IResNet(_FaceBackbone):
    """insightface's IResNet (arcface_torch ``iresnet.py``): a 3x3 stride-1 stem with BN and PReLU,
    four stages of :class:`IBasicBlock` (64, 128, 256, 512 channels, each starting with stride 2),
    then the embedding layer BN - Dropout - FC (over the whole 7x7 map at 112x112) - BN, whose BN
    scale is fixed at 1 as there; ``checkpoint`` checkpoints the blocks (``using_ckpt`` there).

    The tensors are arcface_torch's, in its order, under other names: ``features.<n>`` for its
    stem and ``layer<stage>.<i>`` blocks, ``embedding.<n>`` for its ``bn2``, ``fc`` and
    ``features`` (:attr:`INSIGHTFACE_STEM`, :attr:`IBasicBlock.INSIGHTFACE_NAMES`,
    :attr:`INSIGHTFACE_EMBEDDING`; our names stay, so earlier model files still load)."""

    # Blocks per stage, as arcface_torch's iresnet18 ... iresnet200.
    LAYERS = {
        18: (2, 2, 2, 2),
        34: (3, 4, 6, 3),
        50: (3, 4, 14, 3),
        100: (3, 13, 30, 3),
        200: (6, 26, 60, 6),
    }
    # Our module -> arcface_torch's: the stem (features.0-2, then the blocks) and the embedding
    # layer (embedding.1 and .2, Dropout and Flatten, hold no tensors).
    INSIGHTFACE_STEM = {"features.0": "conv1", "features.1": "bn1", "features.2": "prelu"}
    INSIGHTFACE_EMBEDDING = {"embedding.0": "bn2", "embedding.3": "fc", "embedding.4": "features"}

    def __init__(
        self,
        depth: int,
        in_channels: int = 1,
        embedding_dim: int = 128,
        input_size=(112, 112),
        dropout: float = 0.0,
        checkpoint: bool = False,
    ):
        super().__init__(in_channels, embedding_dim, input_size)
        if depth not in self.LAYERS:
            raise ValueError(f"depth must be one of {sorted(self.LAYERS)}, got {depth}")
        _check_dropout(dropout)
        self.checkpoint = _check_flag("checkpoint", checkpoint)
        self.depth = depth
        self.blocks_per_stage = self.LAYERS[depth]
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, 64, 3, 1, padding=1, bias=False),
            nn.BatchNorm2d(64, eps=1e-5),
            nn.PReLU(64),
        ]
        channels = 64
        for stage, repeats in enumerate(self.blocks_per_stage):
            out_c = 64 * 2**stage
            for index in range(repeats):
                layers.append(IBasicBlock(channels, out_c, 2 if index == 0 else 1, checkpoint))
                channels = out_c
        self.features = nn.Sequential(*layers)
        height, width = _final_map(self.input_size)
        self.embedding = nn.Sequential(
            nn.BatchNorm2d(512, eps=1e-5),
            nn.Dropout(dropout),
            nn.Flatten(),
            nn.Linear(512 * height * width, embedding_dim),
            nn.BatchNorm1d(embedding_dim, eps=1e-5),
        )
        # arcface_torch keeps the embedding BN's scale at 1 (only its shift learns).
        nn.init.constant_(self.embedding[-1].weight, 1.0)
        self.embedding[-1].weight.requires_grad = False

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self._check(images)
        return self.embedding(self.features(images))


BACKBONES = (
    "small_cnn",
    "resnet18",
    "resnet34",
    "mobilefacenet",
    "iresnet18",
    "iresnet34",
    "iresnet50",
    "iresnet100",
    "iresnet200",
)
FACE_BACKBONES = (
    "mobilefacenet",
    "iresnet18",
    "iresnet34",
    "iresnet50",
    "iresnet100",
    "iresnet200",
)


def build_backbone(
    name: str, *, in_channels: int = 1, embedding_dim: int = 128, **options
) -> nn.Module:
    """Backbone by its name in ``params.yaml``: one of :data:`BACKBONES`. ``options`` go to
    :class:`SmallCNN` (``width``, ``dropout``, ``blocks``, ``convs_per_block``), to
    :class:`MobileFaceNet` (``input_size``, ``scale``, ``checkpoint``) or to :class:`IResNet`
    (``input_size``, ``dropout``, ``checkpoint``); the torchvision ResNets take none."""
    if name not in BACKBONES:
        raise ValueError(f"name: unknown backbone {name!r}; expected one of {', '.join(BACKBONES)}")
    if name == "small_cnn":
        return SmallCNN(in_channels=in_channels, embedding_dim=embedding_dim, **options)
    if name == "mobilefacenet":
        return MobileFaceNet(in_channels=in_channels, embedding_dim=embedding_dim, **options)
    if name.startswith("iresnet"):
        depth = int(name[len("iresnet") :])
        return IResNet(depth, in_channels=in_channels, embedding_dim=embedding_dim, **options)
    if options:
        raise TypeError(f"options: backbone {name!r} takes no options, got {sorted(options)}")
    return ResNetEmbedding(int(name[6:]), in_channels=in_channels, embedding_dim=embedding_dim)
