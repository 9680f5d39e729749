"""Modules: margin heads (:mod:`angular.nn.heads`), backbones (:mod:`angular.nn.backbones`) and the
recognition model with its file format (:mod:`angular.nn.recognition`).

Depends only on :mod:`angular.ops` and PyTorch, so the heads can go into any training code without
DVC, MLflow or matplotlib."""

from angular.nn.adaptive import (
    ADAPTIVE_HEADS,
    AdaFace,
    CurricularFace,
    ElasticArcFace,
    ElasticCosFace,
    MagFace,
    SubCenterArcFace,
)
from angular.nn.backbones import BACKBONES, build_backbone
from angular.nn.heads import (
    PRESETS,
    ArcFace,
    CombinedMargin,
    CosFace,
    LambdaSchedule,
    MarginHead,
    MarginSpec,
    SphereFace,
)
from angular.nn.sharded import ShardedAdaptiveHead, ShardedMarginHead

__all__ = [
    "ADAPTIVE_HEADS",
    "BACKBONES",
    "PRESETS",
    "AdaFace",
    "ArcFace",
    "CombinedMargin",
    "CosFace",
    "CurricularFace",
    "ElasticArcFace",
    "ElasticCosFace",
    "LambdaSchedule",
    "MagFace",
    "MarginHead",
    "MarginSpec",
    "ShardedAdaptiveHead",
    "ShardedMarginHead",
    "SphereFace",
    "SubCenterArcFace",
    "build_backbone",
]
