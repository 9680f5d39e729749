"""angular: train and evaluate recognition models with angular-margin heads (ArcFace, CosFace,
SphereFace) on a fused margin kernel. See README.md and DESIGN.md."""

__version__ = "0.1.0"
