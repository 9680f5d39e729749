"""The fused margin ops: the public API (:mod:`angular.ops.margin`), the pure-PyTorch reference
(:mod:`angular.ops.reference`) and the loader of the compiled extension (:mod:`angular.ops._extension`).

Imports nothing above it: no training, tracking or plotting code."""

from angular.ops._extension import has_kernel as has_fused_kernel
from angular.ops._extension import load as extension_status
from angular.ops.linear import linear_margin_cross_entropy
from angular.ops.margin import (
    FLOAT_DTYPES,
    REDUCTIONS,
    backend,
    check_margin,
    check_number,
    margin_cross_entropy,
    margin_logits,
)
from angular.ops.sharded import sharded_margin_cross_entropy

__all__ = [
    "FLOAT_DTYPES",
    "REDUCTIONS",
    "backend",
    "check_margin",
    "check_number",
    "extension_status",
    "has_fused_kernel",
    "linear_margin_cross_entropy",
    "margin_cross_entropy",
    "margin_logits",
    "sharded_margin_cross_entropy",
]
