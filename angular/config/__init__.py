"""The one typed, validated loader of ``params.yaml`` (docs/design.md, Pipeline).

:func:`load_params` reads the file as DVC does (YAML 1.2) and validates it with the pydantic models
below, one per section, into a frozen :class:`Params`. Every key is required (the shipped
``params.yaml`` is the single place where the experiment's numbers live, and DVC needs each key a
stage reads to exist there), except a head's ``straight_through`` (default ``false``) and
``fused_linear`` (default ``null``), ``data.max_images_per_class`` and ``data.crop`` (default
``null``), and
``evaluate.verification.pairs_file`` and ``pairs_root`` (default ``null``),
``evaluate.unknown_far`` (default ``0.05``) and ``flip_test`` (default ``false``), and
``tracking.register_model`` (default ``null``). An
unknown key, a missing key or a bad value raises :class:`ConfigError`, whose message starts with
the dotted key, e.g. ``train.epochs: must be an integer >= 1, got 0``.

Sections: ``data`` (read by prepare, and the image format by train), ``model``, ``heads``
(``heads.<name>`` is a margin head, or a ``joint`` group of heads sharing one backbone), ``train``,
``calibrate``, ``evaluate``, ``tracking``. ``params.yaml`` documents each key.

Modules: ``rules`` (the field rules, the wording of errors, the base :class:`Section`), one per
section (``data``, ``model``, ``heads``, ``train``, ``evaluate`` with calibrate, ``tracking``),
``items`` (what ``heads`` validates into), ``params`` (the whole file), ``schema`` (its JSON
schema), ``reader`` (reading the file).

Adding a key: one line in its section's model, typed with a helper that states the rule and the
wording of its error, e.g. ``patience: integer(low=1)``, ``on_collapse: choice("stop", "warn")``,
``margin: number(0.0, 1.0, high_open=True)``, ``name: text(optional=True)``, ``enabled: flag()``
(``= default`` only for a key older files may lack). A rule between keys goes in the model's
``@model_validator(mode="after")`` and raises ``problem("must be ...", "key")``. Then give the key
its value (and a comment) in ``params.yaml``, ``experiments/faces/params.yaml`` and
``experiments/lfw-dev/params.yaml``, regenerate the
JSON schema editors check the file with (``python -m angular.config --schema >
params.schema.json``), and list its bad values in tests/config/test_config_errors.py.
"""

from angular.config.data import SOURCES, Crop, DataConfig
from angular.config.evaluate import (
    CALIBRATION_METHODS,
    CalibrateConfig,
    EvaluateConfig,
    MembersConfig,
    VerificationConfig,
)
from angular.config.heads import (
    HEAD_TYPES,
    JOINT,
    AdaFaceHead,
    ArcFaceHead,
    CombinedHead,
    CosFaceHead,
    CurricularFaceHead,
    ElasticArcFaceHead,
    ElasticCosFaceHead,
    HeadSpec,
    JointGroup,
    MagFaceHead,
    MarginHeadSpec,
    SphereFaceHead,
    SphereFaceLambda,
    SubCenterArcFaceHead,
)
from angular.config.items import HeadConfig, TrainItem
from angular.config.model import IResNetOptions, MobileFaceNetOptions, ModelConfig, SmallCnnOptions
from angular.config.params import SECTIONS, Params, parse_params
from angular.config.reader import load_params, read_yaml
from angular.config.rules import ConfigError, choice, flag, integer, number, text
from angular.config.schema import SCHEMA_FILE, params_schema
from angular.config.tracking import TrackingConfig
from angular.config.train import (
    BACKENDS,
    COLLAPSE_POLICIES,
    DEVICES,
    NONFINITE_POLICIES,
    OPTIMIZERS,
    SAMPLERS,
    SCHEDULES,
    SMOOTHING_MODES,
    AugmentSpec,
    CollapseConfig,
    DistributedConfig,
    PrioritizedConfig,
    TrainConfig,
)

__all__ = [
    "SOURCES",
    "OPTIMIZERS",
    "SCHEDULES",
    "SMOOTHING_MODES",
    "NONFINITE_POLICIES",
    "COLLAPSE_POLICIES",
    "DEVICES",
    "CALIBRATION_METHODS",
    "HEAD_TYPES",
    "JOINT",
    "SCHEMA_FILE",
    "ConfigError",
    "integer",
    "number",
    "flag",
    "text",
    "choice",
    "Crop",
    "DataConfig",
    "SmallCnnOptions",
    "MobileFaceNetOptions",
    "IResNetOptions",
    "ModelConfig",
    "HeadConfig",
    "TrainItem",
    "ArcFaceHead",
    "CosFaceHead",
    "SphereFaceLambda",
    "SphereFaceHead",
    "CombinedHead",
    "AdaFaceHead",
    "ElasticArcFaceHead",
    "ElasticCosFaceHead",
    "MagFaceHead",
    "CurricularFaceHead",
    "SubCenterArcFaceHead",
    "MarginHeadSpec",
    "JointGroup",
    "HeadSpec",
    "AugmentSpec",
    "CollapseConfig",
    "BACKENDS",
    "DistributedConfig",
    "SAMPLERS",
    "PrioritizedConfig",
    "TrainConfig",
    "CalibrateConfig",
    "VerificationConfig",
    "MembersConfig",
    "EvaluateConfig",
    "TrackingConfig",
    "Params",
    "SECTIONS",
    "parse_params",
    "params_schema",
    "read_yaml",
    "load_params",
]
