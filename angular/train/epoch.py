"""One epoch of training, for one process or many: the pass over the training batches with its
step guard (:func:`take_step`), then the validation that makes the epoch's history row
(:func:`validate`).

- The loss is ``head.loss`` (the fused margin cross-entropy of :mod:`angular.ops`); a joint item sums
  the losses of its heads on one shared backbone (the original's combined mode). On several
  processes it is the mean over the gathered global batch, the same on every rank.
- A non-finite loss, or a non-finite gradient norm (on several processes the whole model's), stops
  training with :class:`NonFiniteLossError` naming the epoch and step (the last good checkpoint
  stays), or with ``train.on_nonfinite: skip`` the step is skipped and counted; every rank decides
  alike. Weights that turned non-finite anyway (a finite step to inf) stop training at the end of
  the epoch, before its checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch

from angular.nn.recognition import RecognitionModel
from angular.train.checkpoint import kept_checkpoint
from angular.train.collapse import centre_cosine, embedding_spread
from angular.train.session import Session
from angular.train.world import ONE_PROCESS, World

__all__ = [
    "NonFiniteLossError",
    "batch_loss",
    "loss_of_embeddings",
    "evaluate",
    "history_row",
    "take_step",
    "train_epoch",
    "validate",
]


class NonFiniteLossError(RuntimeError):
    """The loss turned NaN or infinite (``train.on_nonfinite: stop``)."""


def batch_loss(
    model: RecognitionModel,
    images,
    labels,
    autocast: bool,
    device: torch.device,
    reduction="mean",
    *,
    world: World = ONE_PROCESS,
):
    """Summed margin loss of the heads (per sample with ``reduction="none"``), and each head's
    count of correct arg-max predictions, of a training batch."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        embeddings = world.embed(model, images)
    return loss_of_embeddings(model, embeddings, labels, autocast, device, reduction, world=world)


def loss_of_embeddings(
    model: RecognitionModel,
    embeddings,
    labels,
    autocast: bool,
    device,
    reduction="mean",
    *,
    world: World = ONE_PROCESS,
):
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        losses = [head.loss(embeddings, labels, reduction) for head in model.heads.values()]
    with torch.no_grad():
        detached = embeddings.detach().float()
        correct = {
            name: world.correct(head, detached, labels) for name, head in model.heads.items()
        }
    return torch.stack([loss.float() for loss in losses]).sum(0), correct


def non_finite_tensors(model: torch.nn.Module) -> list[str]:
    """Names of the model's floating tensors (weights and buffers) holding NaN or inf."""
    return [
        name
        for name, tensor in model.state_dict().items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]


def take_step(
    session: Session,
    loss: torch.Tensor,
    gradient_norm: Callable[[], torch.Tensor],
    epoch: int,
    step: int,
) -> bool:
    """Backpropagate ``loss`` and step the optimizer, unless the loss or the gradient norm
    (``gradient_norm()``, which also clips) is non-finite: then training stops or the step is
    skipped (``train.on_nonfinite``). Whether the optimizer stepped."""
    optimizer = session.optimizer
    optimizer.zero_grad(set_to_none=True)
    problem = None if torch.isfinite(loss) else f"the loss is {float(loss.detach())}"
    if problem is None:
        loss.backward()
        norm = gradient_norm()
        if not torch.isfinite(norm):
            problem = f"the gradient norm is {float(norm)} (the loss is finite)"
    if problem is not None:
        if session.config.on_nonfinite == "stop":
            raise NonFiniteLossError(
                f"{session.label}: {problem} at epoch {epoch}, step {step}; training stopped "
                f"({kept_checkpoint(session.checkpoints)}). Lower train.lr, set "
                "train.grad_clip_norm, or set train.on_nonfinite: skip to skip such steps."
            )
        session.skipped_steps += 1
        optimizer.zero_grad(set_to_none=True)
        return False
    optimizer.step()
    return True


def train_epoch(session: Session, world: World, epoch: int, progress: bool) -> tuple[float, dict]:
    """One pass over this process's share of the training data; returns the mean loss and each
    head's accuracy over the steps taken, those of the global batches (the same on every rank)."""
    from tqdm.auto import tqdm

    config, model = session.config, session.model
    model.train()
    total_loss, seen = 0.0, 0
    correct = {name: 0 for name in model.heads}
    bar = tqdm(
        session.train_loader,
        desc=f"{session.label} epoch {epoch}/{config.epochs}",
        disable=not progress,
        leave=False,
        unit="batch",
    )
    sampler = session.prioritized()
    for step, (images, labels, *indices) in enumerate(bar, start=1):
        world.before_step(epoch, step)
        images, labels = images.to(session.device), labels.to(session.device)
        if sampler is None:
            loss, batch_correct = batch_loss(
                model, images, labels, config.bf16, session.device, world=world
            )
        else:  # the per-sample losses, weighted by importance; they become the new priorities
            (indices,) = indices
            rows, batch_correct = batch_loss(
                model, images, labels, config.bf16, session.device, reduction="none", world=world
            )
            loss = (sampler.weights(indices).to(rows.device) * rows).mean()
        gradient_norm = partial(world.gradient_norm, model, config.grad_clip_norm)
        if not take_step(session, loss, gradient_norm, epoch, step):
            continue
        if sampler is not None:
            sampler.update(indices, rows)
        global_batch = len(labels) * world.size  # every rank takes as many images a step
        total_loss += float(loss.detach()) * global_batch
        seen += global_batch
        for name, value in batch_correct.items():
            correct[name] += value
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    bar.close()
    # Finite losses and gradients can still step the weights to inf (a huge learning rate):
    # such a model is never checkpointed, so the last checkpoint stays a good one.
    broken = non_finite_tensors(model)
    if world.max_int(len(broken)):
        raise NonFiniteLossError(
            f"{session.label}: the weights turned non-finite during epoch {epoch} "
            f"({', '.join(broken) or 'on another rank'}); training stopped "
            f"({kept_checkpoint(session.checkpoints)}). Lower train.lr or set "
            "train.grad_clip_norm."
        )
    train_loss = total_loss / seen if seen else math.nan
    return train_loss, {name: value / max(seen, 1) for name, value in correct.items()}


# --------------------------------------------------------------------------------------------------
# Validation.


@torch.no_grad()
def evaluate(model: RecognitionModel, loader, autocast: bool, device) -> tuple[float, dict, float]:
    """Validation loss, each head's accuracy, and the spread of the validation embeddings."""
    model.eval()
    total_loss, count = 0.0, 0
    correct = {name: 0 for name in model.heads}
    embeddings = []
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            batch_embeddings = model(images)
        loss, batch_correct = loss_of_embeddings(model, batch_embeddings, labels, autocast, device)
        embeddings.append(batch_embeddings.float())
        total_loss += float(loss) * len(labels)
        count += len(labels)
        for name, value in batch_correct.items():
            correct[name] += value
    spread = embedding_spread(torch.cat(embeddings)) if embeddings else math.nan
    accuracy = {name: value / max(count, 1) for name, value in correct.items()}
    return total_loss / max(count, 1), accuracy, spread


def history_row(
    epoch, lr, train_loss, train_acc, val_loss, val_acc, model: RecognitionModel, spread, joint
) -> dict:
    centres = {name: centre_cosine(head.weight) for name, head in model.heads.items()}
    row = {
        "epoch": epoch,
        "train_loss": train_loss,
        "train_accuracy": sum(train_acc.values()) / len(train_acc),
        "val_loss": val_loss,
        "val_accuracy": sum(val_acc.values()) / len(val_acc),
        "lr": lr,
        "centre_cosine": max(centres.values()),  # the worst head's
        "embedding_spread": spread,
    }
    if joint:  # one accuracy and centre column per head as well
        for name in train_acc:
            row[f"train_accuracy_{name}"] = train_acc[name]
            row[f"val_accuracy_{name}"] = val_acc[name]
            row[f"centre_cosine_{name}"] = centres[name]
    return row


def validate(
    session: Session, world: World, epoch: int, lr: float, train_loss: float, train_accuracy: dict
) -> dict:
    """The epoch's history row: the full model (on several processes: its heads gathered from
    the shards; rank 0 validates it on the whole validation split) is validated; every rank gets
    the row, so that the collapse checks stop every rank at once."""
    world.gather_heads(session.model, session.full_model)

    def row() -> dict:
        model = session.full_model
        val_loss, val_accuracy, spread = evaluate(
            model, session.val_loader, session.config.bf16, session.device
        )
        return history_row(
            epoch,
            lr,
            train_loss,
            train_accuracy,
            val_loss,
            val_accuracy,
            model,
            spread,
            session.item.joint,
        )

    return world.from_rank_zero(row)
