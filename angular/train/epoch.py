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
- ``train.precision``: autocast in bf16 or fp16 (:func:`autocast_dtype`). In fp16 the loss is
  scaled (``torch.amp.GradScaler``); a step whose gradients overflow is skipped and the scale
  lowered, as the scaler does, and counted (``scaler_skipped_steps``): that is normal, no failure.
  A non-finite loss is still one. A scale that keeps falling is reported once
  (:func:`skip_scaled_step`).
- Validation makes the epoch's row: loss and accuracy over all C classes, the embedding spread,
  the centre cosine. On several processes no rank holds a full head for it: each rank embeds its
  block of each validation batch and the sharded heads compute the loss and the arg-max
  (:func:`evaluate_sharded`), the centre cosine comes from the shards' sums
  (:func:`sharded_centre_cosine`); the row equals the one-process row of the same model to
  rounding.
- ``train.accumulate`` N: each batch is cut into N micro-batches, each backpropagated on its own
  with its share of the batch (N micro-batches give the update of one batch; BatchNorm sees the
  micro-batches' statistics).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from functools import partial

import torch
from torch.utils.data import DataLoader

from angular.nn.recognition import RecognitionModel
from angular.ops.sharded import all_gather_equal
from angular.train.checkpoint import kept_checkpoint, non_finite_tensors, restore_rng
from angular.train.collapse import centre_cosine, cosine_of_unit_sum, embedding_spread, unit_sum
from angular.train.session import EpochProgress, Session, say
from angular.train.world import ONE_PROCESS, World

__all__ = [
    "NonFiniteLossError",
    "SCALE_FLOOR",
    "SKIPS_IN_A_ROW",
    "autocast_dtype",
    "blocks",
    "micro_batches",
    "batch_loss",
    "loss_of_embeddings",
    "evaluate",
    "evaluate_sharded",
    "history_row",
    "sharded_centre_cosine",
    "take_step",
    "train_epoch",
    "validate",
]


# A falling fp16 loss scale is reported once it is below SCALE_FLOOR (it then shrinks the
# gradients instead of guarding them from underflow) or after SKIPS_IN_A_ROW skipped steps.
SCALE_FLOOR = 1.0
SKIPS_IN_A_ROW = 20
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(RuntimeError):
    """The loss turned NaN or infinite (``train.on_nonfinite: stop``)."""


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of ``train.precision`` (None: fp32, no autocast)."""
    return AUTOCAST_DTYPES[precision]


def autocasting(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def micro_batches(size: int, count: int) -> list[slice]:
    """``count`` consecutive slices of a batch of ``size`` as equal as can be (none empty)."""
    base, extra = divmod(size, count)
    bounds = [0]
    for index in range(count):
        bounds.append(bounds[-1] + base + (index < extra))
    return [slice(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def batch_loss(
    model: RecognitionModel,
    images,
    labels,
    autocast: torch.dtype | None,
    device: torch.device,
    reduction="mean",
    *,
    world: World = ONE_PROCESS,
):
    """Summed margin loss of the heads (per sample with ``reduction="none"``), and each head's
    count of correct arg-max predictions, of a training batch (``autocast``: its dtype, or None)."""
    with autocasting(device, autocast):
        embeddings = world.embed(model, images)
    return loss_of_embeddings(model, embeddings, labels, autocast, device, reduction, world=world)


def loss_of_embeddings(
    model: RecognitionModel,
    embeddings,
    labels,
    autocast: torch.dtype | None,
    device,
    reduction="mean",
    *,
    world: World = ONE_PROCESS,
):
    with autocasting(device, autocast):
        losses = [head.loss(embeddings, labels, reduction) for head in model.heads.values()]
    with torch.no_grad():
        detached = embeddings.detach().float()
        correct = {
            name: world.correct(head, detached, labels) for name, head in model.heads.items()
        }
    # Summed in fp32 at least (a half-precision loss is widened; an fp64 model keeps fp64).
    widest = torch.float64 if any(x.dtype == torch.float64 for x in losses) else torch.float32
    return torch.stack([loss.to(widest) for loss in losses]).sum(0), correct


def take_step(
    session: Session,
    losses: Iterator[torch.Tensor],
    gradient_norm: Callable[[], torch.Tensor],
    epoch: int,
    step: int,
) -> bool:
    """Backpropagate each of ``losses`` (the micro-batches' losses, each weighted by its share of
    the batch, computed as they are drawn) and step the optimizer, unless a loss or the gradient
    norm (``gradient_norm()``, which also clips) is non-finite: then training stops or the step is
    skipped (``train.on_nonfinite``). In fp16 a non-finite gradient norm is the loss scaler's
    skipped step (:func:`skip_scaled_step`) instead. Whether the optimizer stepped."""
    optimizer, scaler = session.optimizer, session.scaler
    optimizer.zero_grad(set_to_none=True)
    problem = None
    for loss in losses:
        if not torch.isfinite(loss):
            problem = f"the loss is {float(loss.detach())}"
            break
        (loss if scaler is None else scaler.scale(loss)).backward()
    if problem is None:
        if scaler is not None:
            scaler.unscale_(optimizer)  # clipping and the norm see the true gradients
        norm = gradient_norm()
        if not torch.isfinite(norm):
            if scaler is not None:
                skip_scaled_step(session, epoch, step)
                return False
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
    if scaler is not None:
        scaler.update()
        session.scaler_skips_in_a_row = 0
    return True


def skip_scaled_step(session: Session, epoch: int, step: int) -> None:
    """The fp16 step whose gradients overflowed: not taken; the scale backs off (and its growth
    count restarts) as ``GradScaler.update`` does, set from the gradient norm every rank agrees on
    rather than from each rank's own gradients, so that every rank keeps the same scale. Reported
    once, with its cause, when the scale keeps falling."""
    scaler = session.scaler
    scale = scaler.get_scale()
    broken = [
        name
        for name, parameter in session.model.named_parameters()
        if parameter.grad is not None and not bool(torch.isfinite(parameter.grad).all())
    ]
    scaler.update(new_scale=scale * scaler.get_backoff_factor())
    state = scaler.state_dict()
    state["_growth_tracker"] = 0
    scaler.load_state_dict(state)
    session.optimizer.zero_grad(set_to_none=True)
    session.scaler_skipped_steps += 1
    session.scaler_skips_in_a_row += 1
    falling = scaler.get_scale() < SCALE_FLOOR or session.scaler_skips_in_a_row >= SKIPS_IN_A_ROW
    if falling and not session.scale_reported:
        session.scale_reported = True
        where = ", ".join(broken[:3]) + (f" and {len(broken) - 3} more" if len(broken) > 3 else "")
        say(
            f"{session.label}: warning: the fp16 loss scale fell to {scaler.get_scale():g} after "
            f"{session.scaler_skips_in_a_row} skipped steps in a row (epoch {epoch}, step {step}): "
            f"the gradients of {where or 'a shard on another rank'} stay non-finite however far "
            "the loss is scaled down, while the loss is finite: the backward overflows fp16 "
            "(activations or gradients beyond 65504) or the model diverges. Lower train.lr, or "
            "use train.precision: bf16 (fp32's range)."
        )


def micro_batch_losses(
    session: Session, world: World, images, labels, indices, dtype, taken: list
) -> Iterator[torch.Tensor]:
    """The loss of each of the batch's ``train.accumulate`` micro-batches, weighted by its share
    of the batch, computed as it is drawn (so that one micro-batch's graph lives at a time); each
    also goes to ``taken`` with its correct counts and per-sample losses (prioritized sampler)."""
    model, sampler = session.model, session.prioritized()
    parts = micro_batches(len(labels), session.config.accumulate)
    whole = len(parts) == 1  # one batch: today's path, untouched
    # A head counts its training steps (SphereFace's lam schedule): each micro-batch starts from
    # the step's count, so that the batch counts once and every micro-batch sees the same lam.
    counters = [head.step for head in model.heads.values() if hasattr(head, "step")]
    counts = [counter.clone() for counter in counters]
    for part in parts:
        if not whole:
            for counter, count in zip(counters, counts):
                counter.copy_(count)
        part_labels = labels if whole else labels[part]
        part_images = images if whole else images[part]
        if sampler is None:
            loss, correct = batch_loss(
                model, part_images, part_labels, dtype, session.device, world=world
            )
            rows = None
        else:  # the per-sample losses, weighted by importance: the new priorities
            rows, correct = batch_loss(
                model,
                part_images,
                part_labels,
                dtype,
                session.device,
                reduction="none",
                world=world,
            )
            weights = sampler.weights(indices if whole else indices[part])
            loss = (weights.to(rows.device) * rows).mean()
        if not whole:
            loss = loss * (len(part_labels) / len(labels))
        taken.append((loss, correct, rows))
        yield loss


def record_lr(session: Session, step: int) -> None:
    """Note the learning rate optimizer step ``step`` (counted over the run) used, then step a
    schedule by steps."""
    session.step_lrs.append((step, session.optimizer.param_groups[0]["lr"]))
    if session.scheduler_by_step:
        session.scheduler.step()


def train_epoch(
    session: Session,
    world: World,
    epoch: int,
    progress: bool,
    after_step: Callable[[int, int], None] | None = None,
) -> tuple[float, dict]:
    """One pass over this process's share of the training data (the rest of it when a checkpoint
    within this epoch was resumed); returns the mean loss and each head's accuracy over the steps
    taken, those of the global batches (the same on every rank). ``after_step(epoch, step)`` runs
    after each step (checkpoints and verification by step)."""
    from tqdm.auto import tqdm

    config, model = session.config, session.model
    model.train()
    done = session.progress
    if done is None or done.epoch != epoch:
        done = EpochProgress(epoch, correct={name: 0 for name in model.heads})
    session.progress = done
    # Until the step checkpoints, the loader went to tqdm.auto's tqdm, whose constructor opens an
    # iterator of it (and drops it) before the one iterated: that iterator's base-seed draw comes
    # first in every run's random stream, so it is drawn here too and runs keep their numbers.
    torch.empty((), dtype=torch.int64).random_(generator=session.train_loader.generator)
    batches = iter(session.train_loader)
    if session.resume_rng is not None:  # resumed within this epoch: the RNG of that step
        restore_rng(session.resume_rng, session.generator)
        session.resume_rng = None
    bar = tqdm(
        batches,
        desc=f"{session.label} epoch {epoch}/{config.epochs}",
        disable=not progress,
        leave=False,
        unit="batch",
        total=len(session.train_loader),
        initial=done.step,
    )
    sampler = session.prioritized()
    dtype = autocast_dtype(config.precision)
    steps_before = (epoch - 1) * len(session.train_loader)
    for step, (images, labels, *indices) in enumerate(bar, start=done.step + 1):
        world.before_step(epoch, step)
        images, labels = images.to(session.device), labels.to(session.device)
        indices = indices[0] if indices else None
        taken = []  # (loss, correct, per-sample losses) of each micro-batch computed
        losses = micro_batch_losses(session, world, images, labels, indices, dtype, taken)
        gradient_norm = partial(world.gradient_norm, model, config.grad_clip_norm)
        stepped = take_step(session, losses, gradient_norm, epoch, step)
        record_lr(session, steps_before + step)
        global_batch = len(labels) * world.size  # every rank takes as many images a step
        done.step, done.position = step, done.position + global_batch
        if stepped:
            loss = taken[0][0] if len(taken) == 1 else sum(entry[0].detach() for entry in taken)
            if sampler is not None:
                sampler.update(indices, torch.cat([entry[2] for entry in taken]))
            done.total_loss += float(loss.detach()) * global_batch
            done.seen += global_batch
            for _, part_correct, _ in taken:
                for name, value in part_correct.items():
                    done.correct[name] += value
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        if after_step is not None:
            after_step(epoch, step)
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
    session.progress = None
    train_loss = done.total_loss / done.seen if done.seen else math.nan
    return train_loss, {name: value / max(done.seen, 1) for name, value in done.correct.items()}


# --------------------------------------------------------------------------------------------------
# Validation.


@torch.no_grad()
def evaluate(
    model: RecognitionModel, loader, autocast: torch.dtype | None, device
) -> tuple[float, dict, float]:
    """Validation loss, each head's accuracy, and the spread of the validation embeddings
    (``autocast``: its dtype, or None)."""
    model.eval()
    total_loss, count = 0.0, 0
    correct = {name: 0 for name in model.heads}
    embeddings = []
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        with autocasting(device, autocast):
            batch_embeddings = model(images)
        loss, batch_correct = loss_of_embeddings(model, batch_embeddings, labels, autocast, device)
        embeddings.append(batch_embeddings.float())
        total_loss += float(loss) * len(labels)
        count += len(labels)
        for name, value in batch_correct.items():
            correct[name] += value
    if count == 0:  # no validation split (data.val_fraction: 0): no number, rather than 0
        return math.nan, {name: math.nan for name in correct}, math.nan
    spread = embedding_spread(torch.cat(embeddings))
    accuracy = {name: value / count for name, value in correct.items()}
    return total_loss / count, accuracy, spread


@torch.no_grad()
def evaluate_sharded(
    model: RecognitionModel, loader: DataLoader, autocast: torch.dtype | None, device, world: World
) -> tuple[float, dict, float]:
    """:func:`evaluate`'s numbers for a model whose heads are sharded, with no rank holding a
    full head (collective; every rank gets the same numbers).

    Each rank loads and embeds only its block of each of ``loader``'s batches (:func:`blocks`:
    ``ceil(B / W)`` rows, the last blocks padded with zero images labelled -1, no target, which
    the sharded loss and the accuracy do not count); the heads' sharded losses (all-gathered
    embeddings, per-shard partials, all-reduced, over every class: sampling is off) and
    :meth:`World.correct` give the loss and the accuracy over all C classes, the gathered
    embeddings of the real rows, in the batch's order, the spread."""
    model.eval()
    heads = list(model.heads.values())
    rates = [head.sample_rate for head in heads]
    total_loss, count = 0.0, 0
    correct = {name: 0 for name in model.heads}
    embeddings = []
    plan = blocks(len(loader.dataset), loader.batch_size, world.size, world.rank)
    own = DataLoader(
        loader.dataset,
        batch_sampler=[indices for indices, _, _ in plan],
        num_workers=loader.num_workers,
    )
    try:
        for head in heads:  # the one-process validation's softmax is over every class
            head.sample_rate = 1.0
        for (images, labels), (_, size, real) in zip(own, plan):
            share = -(-size // world.size)
            padding = share - real
            block = torch.cat([images[:real], images.new_zeros((padding, *images.shape[1:]))])
            block_labels = torch.cat([labels[:real], labels.new_full((padding,), -1)])
            block, block_labels = block.to(device), block_labels.to(device)
            with autocasting(device, autocast):
                block_embeddings = model(block)
            loss, batch_correct = loss_of_embeddings(
                model, block_embeddings, block_labels, autocast, device, world=world
            )
            gathered = torch.cat(all_gather_equal(block_embeddings.float(), heads[0].group))
            rows = torch.arange(share, device=gathered.device)
            kept = torch.cat([rows < size - rank * share for rank in range(world.size)])
            embeddings.append(gathered[kept])
            total_loss += float(loss) * size
            count += size
            for name, value in batch_correct.items():
                correct[name] += value
    finally:
        for head, rate in zip(heads, rates):
            head.sample_rate = rate
    if count == 0:
        return math.nan, {name: math.nan for name in correct}, math.nan
    spread = embedding_spread(torch.cat(embeddings))
    accuracy = {name: value / count for name, value in correct.items()}
    return total_loss / count, accuracy, spread


def blocks(
    count: int, batch_size: int, world_size: int, rank: int
) -> list[tuple[list[int], int, int]]:
    """Rank ``rank``'s block of each batch of ``batch_size`` of ``count`` images taken in order
    (a validation loader's batches): ``(indices, batch size, real rows)``, the block being rows
    ``[rank b, (rank + 1) b)`` of the batch, ``b = ceil(B / W)``. A rank past the batch's end
    loads its first image, as padding (a loader's batch is never empty)."""
    plan = []
    for first in range(0, count, batch_size):
        size = min(batch_size, count - first)
        share = -(-size // world_size)
        start, stop = min(rank * share, size), min((rank + 1) * share, size)
        indices = list(range(first + start, first + stop)) or [first]
        plan.append((indices, size, stop - start))
    return plan


def sharded_centre_cosine(head, world: World) -> float:
    """:func:`angular.train.collapse.centre_cosine` of a sharded head's full centres, from each
    shard's sum of its unit centres (an all-reduce of D floats)."""
    rows = head.num_classes * getattr(head, "centres_per_class", 1)
    return cosine_of_unit_sum(world.sum(unit_sum(head.weight)), rows)


def history_row(
    epoch,
    lr,
    train_loss,
    train_acc,
    val_loss,
    val_acc,
    model: RecognitionModel,
    spread,
    joint,
    centres: dict[str, float] | None = None,
) -> dict:
    """The epoch's history row; ``centres``: each head's centre cosine (default: of ``model``'s
    full heads)."""
    if centres is None:
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
    """The epoch's history row, the same on every rank (rank 0's), so that the collapse checks
    stop every rank at once. One process validates its model on the whole validation split
    (:func:`evaluate`); several validate their shards together (:func:`evaluate_sharded`, with
    rank 0's backbone buffers; the centre cosine from the shards' sums): no rank gathers a head."""
    dtype = autocast_dtype(session.config.precision)
    centres = None
    if world.size == 1:
        model = session.full_model
        val_loss, val_accuracy, spread = evaluate(model, session.val_loader, dtype, session.device)
    else:
        model = session.model
        world.share_buffers(model.backbone)
        val_loss, val_accuracy, spread = evaluate_sharded(
            model, session.val_loader, dtype, session.device, world
        )
        centres = {name: sharded_centre_cosine(head, world) for name, head in model.heads.items()}
    row = history_row(
        epoch,
        lr,
        train_loss,
        train_accuracy,
        val_loss,
        val_accuracy,
        model,
        spread,
        session.item.joint,
        centres,
    )
    return world.from_rank_zero(lambda: row)
