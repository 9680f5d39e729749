"""angular: train and evaluate recognition models with angular-margin heads (ArcFace, CosFace,
SphereFace) on a fused margin kernel. See README.md and docs/design.md.

What users import most is here: ``from angular import ArcFace, margin_cross_entropy, build_backbone``.
The layers, each importing only those before it: ``ops`` -> ``nn`` -> ``data``, ``eval`` ->
``train`` -> ``serve`` -> ``cli`` (``config`` is the params.yaml schema the pipeline layers share).
"""

from angular.nn import (
    AdaFace,
    ArcFace,
    CombinedMargin,
    CosFace,
    CurricularFace,
    ElasticArcFace,
    ElasticCosFace,
    MagFace,
    MarginHead,
    MarginSpec,
    SphereFace,
    SubCenterArcFace,
    build_backbone,
)
from angular.ops import backend, linear_margin_cross_entropy, margin_cross_entropy, margin_logits

__version__ = "0.1.0"

__all__ = [
    "AdaFace",
    "ArcFace",
    "CombinedMargin",
    "CosFace",
    "CurricularFace",
    "ElasticArcFace",
    "ElasticCosFace",
    "MagFace",
    "MarginHead",
    "MarginSpec",
    "SphereFace",
    "SubCenterArcFace",
    "backend",
    "build_backbone",
    "linear_margin_cross_entropy",
    "margin_cross_entropy",
    "margin_logits",
]
