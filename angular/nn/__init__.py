"""Modules: margin heads (:mod:`angular.nn.heads`, :mod:`angular.nn.adaptive`, and sharded,
:mod:`angular.nn.sharded`; each head type registered once in :mod:`angular.nn.registry`), backbones
(:mod:`angular.nn.backbones`), published weights loaded into them (:mod:`angular.nn.published`)
and the recognition model with its file format (:mod:`angular.nn.recognition`).

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
    build_adaptive_head,
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
from angular.nn.published import (
    PublishedWeightsError,
    insightface_state_dict,
    load_insightface_backbone,
)
from angular.nn.registry import HEADS
from angular.nn.sharded import ShardedAdaptiveHead, ShardedMarginHead, initial_centres

__all__ = [
    "ADAPTIVE_HEADS",
    "BACKBONES",
    "HEADS",
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
    "PublishedWeightsError",
    "ShardedAdaptiveHead",
    "ShardedMarginHead",
    "SphereFace",
    "SubCenterArcFace",
    "build_adaptive_head",
    "build_backbone",
    "initial_centres",
    "insightface_state_dict",
    "load_insightface_backbone",
]
