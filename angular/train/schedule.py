"""The learning-rate schedules (``train.schedule``), by epoch as before or by optimizer step.

Cosine, step and constant without a warm-up are today's PyTorch schedulers, stepped once per
epoch. A linear warm-up (``train.warmup_steps`` or ``train.warmup_epochs``) or the ``poly``
schedule make one :class:`torch.optim.lr_scheduler.LambdaLR` stepped after each optimizer step
(:func:`lr_factor`).
"""

from __future__ import annotations

import math
from functools import partial

import torch

from angular.config import ConfigError, TrainConfig

__all__ = ["constant", "warmup_steps", "lr_factor", "make_scheduler"]


def constant(epoch: int) -> float:
    return 1.0


def warmup_steps(config: TrainConfig, steps_per_epoch: int) -> int:
    """The optimizer steps of the linear warm-up (``train.warmup_steps``, or
    ``train.warmup_epochs`` of ``steps_per_epoch`` steps, at least one)."""
    if config.warmup_epochs:
        return max(1, round(config.warmup_epochs * steps_per_epoch))
    return config.warmup_steps


def lr_factor(
    step: int,
    *,
    schedule: str,
    warmup: int,
    total: int,
    steps_per_epoch: int,
    epochs: int,
    step_size: int,
    gamma: float,
    power: float,
) -> float:
    """The factor of ``train.lr`` at optimizer step ``step`` (0-based) of ``total``: a linear
    warm-up over the first ``warmup`` steps (1/warmup up to 1), times the schedule: ``poly``
    decays by step over the steps after the warm-up, ``(1 - (step - warmup) / (total - warmup))
    ^ power`` (insightface's arcface_torch); cosine, step and constant keep their value per
    epoch."""
    warm = (step + 1) / warmup if step < warmup else 1.0
    epoch = step // steps_per_epoch
    if schedule == "poly":
        decay = 1.0 if step < warmup else (1 - (step - warmup) / (total - warmup)) ** power
    elif schedule == "cosine":
        decay = 0.5 * (1 + math.cos(math.pi * epoch / epochs))
    elif schedule == "step":
        decay = gamma ** (epoch // step_size)
    else:
        decay = 1.0
    return warm * decay


def make_scheduler(
    config: TrainConfig, optimizer, steps_per_epoch: int
) -> tuple[torch.optim.lr_scheduler.LRScheduler, bool]:
    """The schedule, and whether it is stepped after each optimizer step (a warm-up, or poly)
    rather than once per epoch (cosine, step and constant without a warm-up: today's)."""
    warmup = warmup_steps(config, steps_per_epoch)
    if warmup == 0 and config.schedule != "poly":
        if config.schedule == "cosine":
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
        elif config.schedule == "step":
            scheduler = torch.optim.lr_scheduler.StepLR(
                optimizer, step_size=config.step_size, gamma=config.gamma
            )
        else:
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, constant)
        return scheduler, False
    total = config.epochs * steps_per_epoch
    if warmup >= total:
        key = "train.warmup_epochs" if config.warmup_epochs else "train.warmup_steps"
        raise ConfigError(
            key,
            f"a warm-up of {warmup} optimizer steps leaves none of the run's {total} "
            f"({config.epochs} epochs of {steps_per_epoch}) to the schedule; warm up over fewer",
        )
    factor = partial(
        lr_factor,
        schedule=config.schedule,
        warmup=warmup,
        total=total,
        steps_per_epoch=steps_per_epoch,
        epochs=config.epochs,
        step_size=config.step_size,
        gamma=config.gamma,
        power=config.poly_power,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor), True
