"""The ``train`` section: which items train (one stage each) and how."""

import functools
import sys
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, model_validator

from angular.config.rules import (
    UNIQUE,
    Section,
    choice,
    describe,
    flag,
    integer,
    must,
    number,
    problem,
    text,
    unique,
)

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "step", "constant", "poly")
PRECISIONS = ("fp32", "bf16", "fp16")
SMOOTHING_MODES = ("all", "others")
NONFINITE_POLICIES = ("stop", "skip")
COLLAPSE_POLICIES = ("stop", "warn")
DEVICES = ("auto", "cpu", "cuda")


class AugmentSpec(BaseModel):
    """One torchvision transform (``torchvision.transforms.v2.<name>(**kwargs)``), applied to each
    training image. Built (and its arguments checked) when training starts."""

    model_config = ConfigDict(frozen=True)

    name: str
    kwargs: dict[str, Any]
    key: str  # its place in params.yaml, for error messages


def _augment(value) -> tuple[AugmentSpec, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise problem(f"must be a list of transforms ({{name: ..., ...}}), got {value!r}")
    specs = []
    for index, entry in enumerate(value):
        if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
            raise problem(
                "must be a mapping with a transform name, e.g. {name: RandomAffine, degrees: 10}; "
                f"got {entry!r}",
                index,
            )
        kwargs = {k: v for k, v in entry.items() if k != "name"}
        specs.append(AugmentSpec(name=entry["name"], kwargs=kwargs, key=f"train.augment[{index}]"))
    return tuple(specs)


_TRANSFORM = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}


class CollapseConfig(Section):
    """``train.collapse``: when a head counts as collapsed (docs/design.md, Collapse)."""

    max_centre_cosine: number(-1.0, 1.0)
    max_accuracy_drop: number(0.0, 1.0, low_open=True, high_open=True)
    min_room: number(0.0)
    # Partial collapse (angular.train.collapse.DriftMonitor): warn, never stop.
    max_centre_cosine_rise: number(0.0, 2.0, low_open=True) = 0.3
    max_spread_drop: number(0.0, 1.0, low_open=True, high_open=True) = 0.3


BACKENDS = ("auto", "gloo", "nccl")


class DistributedConfig(Section):
    """``train.distributed``: data-parallel training over torchrun workers (README, Scaling out)."""

    world_size: integer(1)  # 1: one process, today's path
    backend: choice(*BACKENDS)  # auto: nccl with CUDA, else gloo
    sample_rate: number(0.0, 1.0, low_open=True)  # share of each shard's centres per step
    timeout_s: number(0.0, low_open=True)  # a collective waiting longer fails the stage
    # A head whose full centres (C x K x D x element size) take at most this many MiB is gathered
    # onto rank 0 and saved in today's model file; a larger one is saved as its ranks' shards in
    # the one model file (angular.train.model_files), so that no rank ever holds the C x D head.
    gather_head_mib: number(0.0) = 1024.0


SAMPLERS = ("uniform", "prioritized")


class TrainVerificationConfig(Section):
    """``train.verification``: insightface's verification sets (``.bin`` files, relative to the
    folder the stage runs in), scored on the model's embeddings every ``every_steps`` optimizer
    steps and at the end (angular.train.verification); the best checkpoint is kept by their mean
    accuracy. TAR is reported at ``evaluate.verification.fars``."""

    bins: Annotated[
        must(
            Annotated[tuple[text(), ...], Field(min_length=1)],
            "a non-empty list of .bin files",
            show=repr,
        ),
        unique("a verification set"),
        UNIQUE,
    ]
    every_steps: integer(1)


class PrioritizedConfig(Section):
    """``train.prioritized``: the prioritized sampler (angular.train.sampler): priority
    ``(loss + eps)^alpha``, importance weight ``(N P)^-beta`` over its largest."""

    alpha: number(0.0)
    beta: number(0.0, 1.0)
    eps: number(0.0, low_open=True)


class TrainConfig(Section):
    """``train``: which items train (one stage each) and how."""

    items: Annotated[
        must(
            Annotated[tuple[Annotated[str, Field(strict=True)], ...], Field(min_length=1)],
            "a non-empty list of head names",
            show=repr,
        ),
        unique("an item"),
        UNIQUE,
    ]
    epochs: integer(1)
    batch_size: integer(1)
    optimizer: choice(*OPTIMIZERS)
    lr: number(0.0, low_open=True)
    weight_decay: number(0.0)
    momentum: number(0.0, 1.0, high_open=True)
    schedule: choice(*SCHEDULES)
    # Optional (older files lack them); their defaults are today's training.
    poly_power: number(0.0, low_open=True) = 2.0  # schedule: poly (insightface's PolyScheduler: 2)
    warmup_steps: integer(0) = 0  # linear warm-up over these optimizer steps (0: none)
    warmup_epochs: number(0.0) = 0.0  # or over these epochs (not both)
    accumulate: integer(1) = 1  # micro-batches per optimizer step (train.batch_size in all)
    step_size: integer(1)
    gamma: number(0.0, 1.0, low_open=True)
    label_smoothing: number(0.0, 1.0, high_open=True)
    label_smoothing_mode: choice(*SMOOTHING_MODES)
    grad_clip_norm: number(0.0, low_open=True, optional=True)
    augment: Annotated[
        tuple[AugmentSpec, ...],
        BeforeValidator(_augment),
        WithJsonSchema({"anyOf": [{"type": "array", "items": _TRANSFORM}, {"type": "null"}]}),
    ]
    precision: choice(*PRECISIONS)  # replaces bf16 (true: bf16, false: fp32), still read
    # NHWC conv backbones (BENCHMARKS.md, "Face backbones on CPU"); optional: older files lack it.
    channels_last: flag() = False
    device: choice(*DEVICES)
    seed: integer(0)
    deterministic: flag()
    num_threads: integer(0)
    num_workers: integer(0)
    preload_images: flag()
    on_nonfinite: choice(*NONFINITE_POLICIES)
    centre_norm: number(0.0, low_open=True, optional=True)  # null: keep N(0, 0.01) centres
    on_collapse: choice(*COLLAPSE_POLICIES)
    collapse: CollapseConfig
    keep_checkpoints: integer(1)
    # Also a checkpoint every N training steps within an epoch (0: at the epoch ends only).
    checkpoint_every_steps: integer(0) = 0
    # Verification sets scored every N steps, the best checkpoint kept (null: none).
    verification: TrainVerificationConfig | None = None
    distributed: DistributedConfig
    sampler: choice(*SAMPLERS)
    prioritized: PrioritizedConfig  # sampler: prioritized only

    model_config = ConfigDict(json_schema_extra=lambda schema: bf16_in_schema(schema))

    @model_validator(mode="before")
    @classmethod
    def _bf16_is_precision(cls, value):
        return bf16_to_precision(value)

    @model_validator(mode="after")
    def _one_warmup_and_whole_micro_batches(self):
        if self.warmup_steps and self.warmup_epochs:
            raise problem(
                f"give train.warmup_steps ({self.warmup_steps}) or train.warmup_epochs "
                f"({self.warmup_epochs:g}), not both; set the other to 0",
                "warmup_epochs",
            )
        if self.batch_size % self.accumulate:
            raise problem(
                f"{self.accumulate} does not divide train.batch_size ({self.batch_size}), the "
                "images of one optimizer step: its micro-batches must be equal; use a divisor",
                "accumulate",
            )
        return self

    @model_validator(mode="after")
    def _sampler_runs_in_one_process(self):
        if self.sampler == "prioritized" and self.distributed.world_size > 1:
            raise problem(
                "must be uniform when train.distributed.world_size > 1 (the prioritized "
                "sampler runs in one process), got 'prioritized'",
                "sampler",
            )
        return self


# --------------------------------------------------------------------------------------------------
# train.bf16, the key train.precision replaced.

BF16_DEPRECATION = (
    "params: train.bf16 is deprecated: use train.precision (fp32 | bf16 | fp16); "
    "bf16: true is precision: bf16, bf16: false is precision: fp32"
)


@functools.cache
def say_bf16_is_deprecated() -> None:
    """Once per process: the old key still works, and what replaces it."""
    print(BF16_DEPRECATION, file=sys.stderr, flush=True)


def bf16_to_precision(value):
    """A ``train`` mapping with ``bf16`` read as ``precision`` (both given: an error)."""
    if not isinstance(value, Mapping) or "bf16" not in value:
        return value
    bf16 = value["bf16"]
    if not isinstance(bf16, bool):
        raise problem(f"must be true or false, got {describe(bf16)}", "bf16")
    if "precision" in value:
        raise problem(
            "give train.precision or the deprecated train.bf16, not both; remove bf16", "bf16"
        )
    say_bf16_is_deprecated()
    converted = {k: v for k, v in value.items() if k != "bf16"}
    converted["precision"] = "bf16" if bf16 else "fp32"
    return converted


def bf16_in_schema(schema: dict) -> None:
    """Editors accept the deprecated ``bf16`` in place of ``precision`` (not both)."""
    schema["properties"]["bf16"] = {
        "type": "boolean",
        "deprecated": True,
        "description": "deprecated: train.precision (true: bf16, false: fp32)",
    }
    schema["required"] = [key for key in schema["required"] if key != "precision"]
    schema["oneOf"] = [{"required": ["precision"]}, {"required": ["bf16"]}]
