"""The whole file: :class:`Params`, one model per section, and :func:`parse_params`."""

from collections.abc import Mapping
from typing import Any

from pydantic import PrivateAttr, ValidationError, model_validator

from angular.config.data import DataConfig
from angular.config.evaluate import CalibrateConfig, EvaluateConfig
from angular.config.heads import HeadEntries
from angular.config.items import HeadConfig, TrainItem
from angular.config.model import ModelConfig
from angular.config.rules import ConfigError, Section, config_error, problem
from angular.config.tracking import TrackingConfig
from angular.config.train import TrainConfig
from angular.nn.backbones import FACE_BACKBONES, MIN_FACE_INPUT


class Params(Section):
    """params.yaml of the angular project (angular/config.py validates it; every key is required
    unless marked optional)."""

    data: DataConfig
    model: ModelConfig
    heads: HeadEntries  # the file's heads.<name> entries; validated, one TrainItem per name
    train: TrainConfig
    calibrate: CalibrateConfig
    evaluate: EvaluateConfig
    tracking: TrackingConfig
    _raw: dict[str, Any] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _items_are_heads(self):
        items = self.train.items
        for name in items:
            if name not in self.heads:
                defined = ", ".join(self.heads)
                raise problem(
                    f"{name!r} is not a head defined in heads ({defined})", "train", "items"
                )
        members = [member for name in items for member in self.heads[name].heads]
        duplicates = sorted({m for m in members if members.count(m) > 1})
        if duplicates:
            raise problem(
                f"two items give an ensemble member the same name: {duplicates}", "train", "items"
            )
        return self

    @model_validator(mode="after")
    def _face_backbone_fits_the_images(self):
        if self.model.backbone in FACE_BACKBONES and min(self.data.image_size) < MIN_FACE_INPUT:
            raise problem(
                f"{self.model.backbone} needs data.image_size of at least "
                f"[{MIN_FACE_INPUT}, {MIN_FACE_INPUT}] (four stride-2 stages), got "
                f"{list(self.data.image_size)}; use small_cnn, resnet18 or resnet34",
                "model",
                "backbone",
            )
        return self

    @model_validator(mode="after")
    def _records_are_not_preloaded(self):
        if self.data.source == "insightface_rec" and self.train.preload_images:
            raise problem(
                "true would decode the whole RecordIO set into memory (CASIA-WebFace at 112x112: "
                "about 18 GB); set it to false: the DataLoader workers read the records by offset",
                "train",
                "preload_images",
            )
        return self

    @property
    def raw(self) -> dict[str, Any]:
        """The file as read (for logging the parameters to MLflow)."""
        return self._raw

    def item(self, name: str) -> TrainItem:
        """A train item by name; a clear error when it is not in ``train.items``."""
        if name not in self.train.items:
            raise ConfigError(
                "train.items", f"{name!r} is not listed (listed: {', '.join(self.train.items)})"
            )
        return self.heads[name]

    def members(self) -> dict[str, tuple[str, HeadConfig]]:
        """Every ensemble member (a head of a trained item): ``name -> (item, head config)``."""
        return {
            member: (item, head)
            for item in self.train.items
            for member, head in self.heads[item].heads.items()
        }


SECTIONS = tuple(Params.model_fields)


def parse_params(raw: Mapping[str, Any]) -> Params:
    """Validate an already-parsed ``params.yaml`` mapping."""
    try:
        params = Params.model_validate(raw)
    except ValidationError as error:
        raise config_error(error) from None
    params._raw = dict(raw)
    return params
