"""The ``train`` section: which items train (one stage each) and how."""

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, model_validator

from angular.config.rules import (
    UNIQUE,
    Section,
    choice,
    flag,
    integer,
    must,
    number,
    problem,
    unique,
)

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "step", "constant")
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


BACKENDS = ("auto", "gloo", "nccl")


class DistributedConfig(Section):
    """``train.distributed``: data-parallel training over torchrun workers (README, Scaling out)."""

    world_size: integer(1)  # 1: one process, today's path
    backend: choice(*BACKENDS)  # auto: nccl with CUDA, else gloo
    sample_rate: number(0.0, 1.0, low_open=True)  # share of each shard's centres per step
    timeout_s: number(0.0, low_open=True)  # a collective waiting longer fails the stage


SAMPLERS = ("uniform", "prioritized")


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
    bf16: flag()
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
    distributed: DistributedConfig
    sampler: choice(*SAMPLERS)
    prioritized: PrioritizedConfig  # sampler: prioritized only

    @model_validator(mode="after")
    def _sampler_runs_in_one_process(self):
        if self.sampler == "prioritized" and self.distributed.world_size > 1:
            raise problem(
                "must be uniform when train.distributed.world_size > 1 (the prioritized "
                "sampler runs in one process), got 'prioritized'",
                "sampler",
            )
        return self
