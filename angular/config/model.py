"""The ``model`` section: the backbone that maps an image to its embedding."""

from typing import Any

from pydantic import model_validator
from torch import nn

from angular.config.rules import ConfigError, Section, choice, flag, integer, number, problem, text
from angular.nn.backbones import BACKBONES, FACE_BACKBONES
from angular.nn.published import PUBLISHED_FORMATS, PublishedWeightsError, load_published_backbone


class SmallCnnOptions(Section):
    """``model.small_cnn``: options of the small_cnn backbone (present, unused, for the resnets)."""

    width: integer(1)
    dropout: number(0.0, 1.0, high_open=True)
    blocks: integer(1)
    convs_per_block: integer(1)


class MobileFaceNetOptions(Section):
    """``model.mobilefacenet``: options of the mobilefacenet backbone."""

    scale: integer(1)  # channel width multiplier: 1 is the paper's ~1M parameters
    checkpoint: flag() = False  # recompute the bottlenecks' activations in backward (less memory)


class IResNetOptions(Section):
    """``model.iresnet``: options of the iresnet18/34/50/100/200 backbones."""

    dropout: number(0.0, 1.0, high_open=True)  # before the embedding FC (arcface_torch: 0)
    checkpoint: flag() = False  # recompute the blocks' activations in backward (using_ckpt)


class InitFrom(Section):
    """``model.init_from``: published weights the training stage's backbone starts from (the heads
    start fresh). ``insightface``: an arcface_torch ``backbone.pth`` of the same iresnet depth
    (``angular.nn.published``)."""

    format: choice(*PUBLISHED_FORMATS)
    path: text()  # relative to where the stage runs (the project root)

    def load_into(self, backbone: nn.Module) -> None:
        """Copy the file's weights into ``backbone``; a file that does not fit is a
        :class:`ConfigError` of ``model.init_from.path`` naming the file and the first bad key."""
        try:
            load_published_backbone(backbone, self.format, self.path)
        except PublishedWeightsError as error:
            raise ConfigError("model.init_from.path", str(error)) from None


class ModelConfig(Section):
    """``model``: the backbone that maps an image to its embedding."""

    backbone: choice(*BACKBONES)
    embedding_dim: integer(1)
    small_cnn: SmallCnnOptions
    # Optional: files older than the face backbones lack them.
    mobilefacenet: MobileFaceNetOptions = MobileFaceNetOptions(scale=1)
    iresnet: IResNetOptions = IResNetOptions(dropout=0.0)
    init_from: InitFrom | None = None  # null: the backbone starts from random weights

    @model_validator(mode="after")
    def _published_weights_fit_the_backbone(self):
        if self.init_from is not None and not self.backbone.startswith("iresnet"):
            raise problem(
                f"{self.init_from.format} weights are an IResNet's: model.backbone must be an "
                f"iresnet, got {self.backbone}",
                "init_from",
            )
        return self

    @property
    def options(self) -> dict[str, Any]:
        """Keyword arguments of the backbone from this section (none for the torchvision resnets)."""
        if self.backbone == "small_cnn":
            return self.small_cnn.model_dump()
        if self.backbone == "mobilefacenet":
            return _network_options(self.mobilefacenet)
        if self.backbone.startswith("iresnet"):
            return _network_options(self.iresnet)
        return {}

    def backbone_kwargs(self, image_size=None) -> dict[str, Any]:
        """:attr:`options`, plus the ``input_size`` (``data.image_size``) a face backbone's
        embedding layer is built for."""
        if self.backbone in FACE_BACKBONES:
            if image_size is None:
                raise ValueError(f"image_size: required by the {self.backbone} backbone")
            return {**self.options, "input_size": list(image_size)}
        return dict(self.options)


def _network_options(section: MobileFaceNetOptions | IResNetOptions) -> dict[str, Any]:
    """A face backbone's options, ``checkpoint`` only when on: it changes memory and time, not the
    network, so the model files and resume fingerprints of runs without it stay as they were (and
    a model file without it loads with checkpointing off)."""
    options = section.model_dump()
    if not options["checkpoint"]:
        del options["checkpoint"]
    return options
