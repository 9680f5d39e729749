"""Training on several processes (README, Scaling out; docs/design.md, Pipeline): torchrun workers, a
DDP backbone and sharded margin heads (:class:`angular.nn.sharded.ShardedMarginHead`; for the adaptive
heads, :class:`angular.nn.sharded.ShardedAdaptiveHead`).

With ``train.distributed.world_size`` W > 1 the train stage calls :func:`launch`, which starts W
workers with ``python -m torch.distributed.run --standalone`` and waits. Each worker runs the stage
again (:func:`is_worker` tells it apart), joins the process group (:func:`worker_group`) and trains
with :func:`train_item_distributed`:

- Start: every rank builds the one-process model exactly as ``train_item`` does (the same seeded
  draws, so the same initial backbone and centres), keeps its shard of each head
  (``load_full_weight``) and wraps the backbone in DDP. ``train.batch_size`` is the global batch:
  each rank takes ``batch_size / W`` images a step (W must divide it).
- Data: a ``DistributedSampler`` (seed ``train.seed``, reshuffled each epoch) with ``drop_last``:
  each epoch the ``N mod W`` images left over by the shuffle are dropped (no image is repeated), so
  every rank has as many batches, of the same sizes (the sharded head needs that).
- A step: the head's loss is the mean over the gathered batch, the same on every rank; the gradient
  norm (and its clipping) is that of the whole model, the shards' squares all-reduced; so every
  rank takes the same decision on a non-finite loss or gradient (``train.on_nonfinite``).
- The optimizer sees each shard as one dense parameter: with ``sample_rate < 1`` the centres a step
  did not sample get a zero gradient, and weight decay and momentum still apply to them
  (docs/design.md, "Sharded softmax").
- Each epoch the shards are all-gathered and rank 0 validates the full model on the whole
  validation split, computes the epoch's row (centre cosine of the full head, embedding spread) and
  broadcasts it: every rank holds the same history, so the collapse checks stop every rank at once.
  Rank 0 alone writes the plots, the metrics, the model file (today's format, the full head: an
  adaptive head with its buffers and generator state, as one process writes it) and logs to MLflow.
- Checkpoints: one file per rank per epoch in ``<checkpoints>/rank-<r>-of-<W>/`` (its shard, the
  shared backbone, its optimizer state and RNG states). A rerun resumes from the newest epoch that
  every rank still has; at least two are kept, since a kill can leave one rank an epoch ahead. A
  checkpoint of the same params written with another world size is refused with a message naming
  both (:func:`angular.train.world.refuse_other_world_size`); it is not resharded.
- Failures: the process group has ``train.distributed.timeout_s``, so a rank waiting on a dead or
  hung peer fails; torchrun then stops the others. Each worker leaves a one-line report, and the
  launcher raises :class:`WorkerError` naming the ranks that failed and those that ended without a
  report (killed, or hung and stopped).

Test hook: ``ANGULAR_TEST_WORKER_FAULT=<rank>:<raise|hang|kill>:<epoch>:<step>`` makes that rank
raise, sleep for ever or SIGKILL itself before that training step (tests/pipeline/
test_distributed_train.py); unset, it costs one environment lookup per run.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from angular.config import ConfigError, DistributedConfig, Params, TrainItem
from angular.data import Manifest
from angular.files import atomic_write_text
from angular.nn.recognition import RecognitionModel
from angular.nn.sharded import ShardedMarginHead
from angular.ops.sharded import all_gather_equal
from angular.train import loop
from angular.train.loop import TrainPaths
from angular.train.world import WorkerError, rank_folder, refuse_other_world_size

__all__ = [
    "WORKER_ENV",
    "FAULT_ENV",
    "WorkerError",
    "check_supported",
    "is_worker",
    "rank",
    "launch",
    "worker_group",
    "resolve_backend",
    "train_item_distributed",
]

WORKER_ENV = "ANGULAR_DISTRIBUTED_WORKER"  # set by launch: this process is one of the workers
REPORTS_ENV = "ANGULAR_WORKER_REPORTS"  # the folder where each worker leaves its report
FAULT_ENV = "ANGULAR_TEST_WORKER_FAULT"  # test only, see the module doc
REPORT_CHARS = 400


def is_worker() -> bool:
    return os.environ.get(WORKER_ENV) == "1"


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def resolve_backend(name: str, device: torch.device) -> str:
    """``auto``: nccl on CUDA, gloo on CPU."""
    if name == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if name == "nccl" and device.type != "cuda":
        raise ConfigError(
            "train.distributed.backend",
            f"nccl needs CUDA devices, and this run trains on {device.type} (train.device): "
            "use gloo or auto",
        )
    return name


def check_supported(params: Params, item: TrainItem) -> None:
    """Refuse what several processes cannot train (before any worker starts)."""
    config = params.train
    world_size = config.distributed.world_size
    resolve_backend(config.distributed.backend, loop.select_device(config.device))
    if config.batch_size % world_size:
        raise ConfigError(
            "train.batch_size",
            f"{config.batch_size} is the global batch and must be a multiple of "
            f"train.distributed.world_size ({world_size}): every rank takes the same share",
        )
    for member, head in item.heads.items():
        if head.fused_linear:
            key = f"heads.{item.name}.heads.{head.name}" if item.joint else f"heads.{item.name}"
            raise ConfigError(
                f"{key}.fused_linear",
                f"true is not supported with train.distributed.world_size > 1 ({member}): the "
                "sharded head computes its shard's cosines itself; leave it null or false",
            )


# --------------------------------------------------------------------------------------------------
# The launcher (the stage's own process).


def _python_path() -> str:
    """The workers import what this process imports (the stage's package lives in the project)."""
    entries = [os.environ.get("PYTHONPATH", ""), *sys.path]
    return os.pathsep.join(entry for entry in entries if entry)


def launch(module: str, arguments: Sequence[str], config: DistributedConfig, label: str) -> None:
    """Run ``python -m module *arguments`` as ``config.world_size`` torchrun workers on this node
    and wait; raise :class:`WorkerError` naming the ranks when the run fails."""
    with tempfile.TemporaryDirectory(prefix="angular-workers-") as reports:
        environment = {
            **os.environ,
            WORKER_ENV: "1",
            REPORTS_ENV: reports,
            "PYTHONPATH": _python_path(),
        }
        # torchrun sets 1 itself, with a warning; train.num_threads sets torch's threads anyway.
        environment.setdefault("OMP_NUM_THREADS", "1")
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={config.world_size}",
            "--max-restarts=0",
            "-m",
            module,
            *arguments,
        ]
        loop._say(f"{label}: {config.world_size} workers: torchrun {' '.join(command[3:])}")
        status = subprocess.run(command, env=environment, check=False).returncode
        if status != 0:
            raise WorkerError(_failure(label, Path(reports), config.world_size, status))


def _failure(label: str, reports: Path, world_size: int, status: int) -> str:
    """One line: the ranks that reported an error (the earliest first), then the silent ones."""
    errors = []
    for worker in range(world_size):
        path = reports / f"rank-{worker}.error"
        if path.is_file():
            errors.append((path.stat().st_mtime_ns, worker, path.read_text(encoding="utf-8")))
    reported = {worker for _, worker, _ in errors}
    silent = [
        worker
        for worker in range(world_size)
        if worker not in reported and not (reports / f"rank-{worker}.done").exists()
    ]
    parts = [f"rank {worker}: {message}" for _, worker, message in sorted(errors)]
    if silent:
        names = ", ".join(str(worker) for worker in silent)
        parts.append(
            f"rank{'s' if len(silent) > 1 else ''} {names} ended without a report (killed, e.g. "
            "SIGKILL or out of memory, or hung or waiting and stopped by torchrun)"
        )
    if not parts:
        parts.append("no worker reported anything")
    return f"{label}: the distributed run failed (torchrun exit status {status}): " + "; ".join(
        parts
    )


# --------------------------------------------------------------------------------------------------
# A worker.


def _report(kind: str, text: str) -> None:
    folder = os.environ.get(REPORTS_ENV)
    if folder:
        atomic_write_text(Path(folder) / f"rank-{os.environ.get('RANK', '0')}.{kind}", text)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    if len(text) > REPORT_CHARS:
        text = text[: REPORT_CHARS - 3] + "..."
    return f"{type(error).__name__}: {text}"


@contextmanager
def worker_group(config: DistributedConfig, device: torch.device) -> Iterator[int]:
    """Join the torchrun workers' process group (the collectives time out after
    ``config.timeout_s``); yields this rank. Leaves the report :func:`launch` reads."""
    try:
        backend = resolve_backend(config.backend, device)
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=config.timeout_s))
        if dist.get_world_size() != config.world_size:
            raise ConfigError(
                "train.distributed.world_size",
                f"is {config.world_size}, but torchrun started {dist.get_world_size()} workers "
                "(--nnodes x --nproc-per-node): make them equal",
            )
        yield dist.get_rank()
    except BaseException as error:
        _report("error", _one_line(error))
        raise
    else:
        _report("done", "")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _read_fault() -> tuple[int, str, int, int] | None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    target, kind, epoch, step = spec.split(":")
    if kind not in ("raise", "hang", "kill"):
        raise ValueError(f"{FAULT_ENV}: unknown fault {kind!r} (raise, hang or kill)")
    return int(target), kind, int(epoch), int(step)


def _inject_fault(fault, epoch: int, step: int) -> None:
    if fault is None or (fault[0], fault[2], fault[3]) != (dist.get_rank(), epoch, step):
        return
    kind = fault[1]
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "hang":
        while True:
            time.sleep(1.0)
    raise RuntimeError(f"the test fault {FAULT_ENV}={os.environ[FAULT_ENV]}")


# --------------------------------------------------------------------------------------------------
# Checkpoints.


def _all_reduce_int(value: int, op, device: torch.device) -> int:
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=op)
    return int(tensor.item())


def _read_epoch(folder: Path, epoch: int, fingerprint: str) -> dict | None:
    path = loop._checkpoint_path(folder, epoch)
    try:
        if loop._damaged_member(path):
            return None
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    if isinstance(state, dict) and state.get("fingerprint") == fingerprint:
        return state
    return None


def _agreed_checkpoint(session) -> dict | None:
    """This rank's checkpoint of the newest epoch every rank has, or None on every rank."""
    folder = session.paths.checkpoints
    folder.mkdir(parents=True, exist_ok=True)
    state = loop._load_checkpoint(folder, session.fingerprint, session.label)
    newest = 0 if state is None else int(state["epoch"])
    epoch = _all_reduce_int(newest, dist.ReduceOp.MIN, session.device)
    if epoch == 0:
        return None
    if newest != epoch:  # killed a step ahead of another rank: take the epoch they share
        state = _read_epoch(folder, epoch, session.fingerprint)
    if _all_reduce_int(int(state is not None), dist.ReduceOp.MIN, session.device) == 0:
        return None
    return state


# --------------------------------------------------------------------------------------------------
# The loop.


@torch.no_grad()
def _global_correct(head: ShardedMarginHead, embeddings, labels) -> int:
    """Correct arg-max predictions over all C classes for the gathered batch (collective): each
    rank's best class in its shard, then the best of the ranks (ties: the lowest class, as argmax)."""
    gathered = torch.cat(all_gather_equal(embeddings.contiguous(), head.group))
    gathered_labels = torch.cat(all_gather_equal(labels.contiguous(), head.group))
    best, index = head.cosine(gathered).max(dim=1)
    bests = torch.stack(all_gather_equal(best, head.group))
    indices = torch.stack(all_gather_equal(index + head.class_start, head.group))
    predicted = indices.gather(0, bests.argmax(dim=0, keepdim=True)).squeeze(0)
    return int((predicted == gathered_labels).sum())


def _global_gradient_norm(model: RecognitionModel, clip: float | None, device) -> torch.Tensor:
    """The gradient norm of the whole model (the backbone's gradients are the same on every rank
    after DDP; the shards' squares are summed over the ranks), clipping as clip_grad_norm_ does."""
    shared = [p for p in model.backbone.parameters() if p.grad is not None]
    shards = [p for p in model.heads.parameters() if p.grad is not None]

    def squares(parameters) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=device)
        for parameter in parameters:
            total = total + parameter.grad.detach().float().pow(2).sum()
        return total

    shard_squares = squares(shards)
    dist.all_reduce(shard_squares)
    norm = (squares(shared) + shard_squares).sqrt()
    if clip is not None:
        coefficient = (clip / (norm + 1e-6)).clamp(max=1.0)
        for parameter in shared + shards:
            parameter.grad.detach().mul_(coefficient.to(parameter.grad.dtype))
    return norm


def _train_epoch(session, backbone, epoch: int, progress: bool, fault) -> tuple[float, dict]:
    """One pass over this rank's share of the training data; the loss and accuracies returned are
    those of the global batches (the same on every rank)."""
    from tqdm.auto import tqdm

    config, model, device = session.config, session.model, session.device
    world_size = dist.get_world_size()
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
    for step, (images, labels) in enumerate(bar, start=1):
        _inject_fault(fault, epoch, step)
        images, labels = images.to(device), labels.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
            embeddings = backbone(images)
            losses = [head.loss(embeddings, labels) for head in model.heads.values()]
        loss = torch.stack([value.float() for value in losses]).sum()
        detached = embeddings.detach().float()
        batch_correct = {
            name: _global_correct(head, detached, labels) for name, head in model.heads.items()
        }
        gradient_norm = partial(_global_gradient_norm, model, config.grad_clip_norm, device)
        if not loop._take_step(session, loss, gradient_norm, epoch, step):
            continue
        global_batch = len(labels) * world_size
        total_loss += float(loss.detach()) * global_batch
        seen += global_batch
        for name, value in batch_correct.items():
            correct[name] += value
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    bar.close()
    broken = loop._non_finite_tensors(model)
    if _all_reduce_int(len(broken), dist.ReduceOp.MAX, device):
        raise loop._weights_broke(session, epoch, broken)
    train_loss = total_loss / seen if seen else float("nan")
    return train_loss, {name: value / max(seen, 1) for name, value in correct.items()}


@torch.no_grad()
def _gather_full_heads(session, full_model: RecognitionModel | None) -> None:
    """All-gather each head's shards (collective); rank 0 copies them, with the head's state, into
    ``full_model``."""
    for name, head in session.model.heads.items():
        state = head.full_state_dict()
        if full_model is not None:
            full_model.heads[name].load_state_dict(state)


def _epoch_row(session, full_model, epoch, lr, train_loss, train_accuracy) -> dict:
    """Rank 0 validates the full model and builds the epoch's row; every rank gets it."""
    _gather_full_heads(session, full_model)
    box: list = [None]
    if full_model is not None:
        val_loss, val_accuracy, spread = loop._evaluate(
            full_model, session.val_loader, session.config.bf16, session.device
        )
        box[0] = loop._history_row(
            epoch,
            lr,
            train_loss,
            train_accuracy,
            val_loss,
            val_accuracy,
            full_model,
            spread,
            session.item.joint,
        )
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _shard_heads(model: RecognitionModel, sample_rate: float, seed: int) -> RecognitionModel:
    """The same backbone with each head replaced by this rank's shard of it."""
    heads = {
        name: ShardedMarginHead.from_head(head, sample_rate=sample_rate, generator_seed=seed)
        for name, head in model.heads.items()
    }
    return RecognitionModel(model.backbone, heads)


def train_item_distributed(
    params: Params,
    item_name: str,
    manifest: Manifest,
    paths: TrainPaths,
    *,
    run=None,
    progress: bool | None = None,
) -> dict:
    """:func:`angular.train.loop.train_item` on the ranks of the current process group (every
    rank calls it; see the module doc). Returns the final epoch's metrics on every rank."""
    config = params.train
    world_size, this_rank = dist.get_world_size(), dist.get_rank()
    item = params.item(item_name)
    check_supported(params, item)
    session = loop._set_up(params, item_name, manifest, paths)
    # Resuming on another world size is refused by the one-process fingerprint of these params.
    one_process = params.model_copy(
        update={
            "train": config.model_copy(
                update={"distributed": config.distributed.model_copy(update={"world_size": 1})}
            )
        }
    )
    base_fingerprint = loop._fingerprint(one_process, item, manifest, session.model)
    full_model = session.model if this_rank == 0 else None  # rank 0 validates and saves it
    model = _shard_heads(session.model, config.distributed.sample_rate, config.seed)
    model = model.to(session.device)
    device_ids = [session.device.index] if session.device.type == "cuda" else None
    backbone = DistributedDataParallel(model.backbone, device_ids=device_ids)
    optimizer = loop._make_optimizer(config, model.parameters())
    dataset = session.train_loader.dataset
    sampler = DistributedSampler(
        dataset,
        num_replicas=world_size,
        rank=this_rank,
        shuffle=True,
        seed=config.seed,
        drop_last=True,
    )
    per_rank = config.batch_size // world_size
    train_loader = DataLoader(
        dataset,
        batch_size=per_rank,
        sampler=sampler,
        num_workers=config.num_workers,
        drop_last=len(sampler) % per_rank == 1,  # a batch of one image would break batch norm
    )
    session = dataclasses.replace(
        session,
        label=f"{session.label} rank {this_rank}/{world_size}",
        config=config.model_copy(update={"keep_checkpoints": max(2, config.keep_checkpoints)}),
        model=model,
        optimizer=optimizer,
        scheduler=loop._make_scheduler(config, optimizer),
        train_loader=train_loader,
        paths=dataclasses.replace(
            paths, checkpoints=rank_folder(paths.checkpoints, this_rank, world_size)
        ),
    )
    refuse_other_world_size(
        paths.checkpoints, base_fingerprint, world_size, session.label, loop.CHECKPOINT_PATTERN
    )
    state = _agreed_checkpoint(session)
    if state is not None:
        loop._apply_checkpoint(session, state, run)
    if progress is None:
        progress = sys.stderr.isatty()
    fault = _read_fault()
    extra = {"world_size": world_size, "rank": this_rank, "base_fingerprint": base_fingerprint}
    started = time.perf_counter()
    for epoch in range(session.start_epoch + 1, config.epochs + 1):
        sampler.set_epoch(epoch)
        train_loss, train_accuracy = _train_epoch(
            session, backbone, epoch, progress and this_rank == 0, fault
        )
        lr = session.optimizer.param_groups[0]["lr"]
        session.scheduler.step()
        row = _epoch_row(session, full_model, epoch, lr, train_loss, train_accuracy)
        session.history.append(row)
        loop._watch_collapse(session, epoch)
        if this_rank == 0:
            loop._write_plots(paths, session.history)
        loop._save_checkpoint(session, epoch, extra)
        if run is not None:
            run.log_metrics({**row, "skipped_steps": session.skipped_steps}, step=epoch)
        if this_rank == 0:
            loop._say(
                f"{session.label} epoch {epoch}/{config.epochs}: loss {train_loss:.4f} "
                f"acc {row['train_accuracy']:.4f} | val loss {row['val_loss']:.4f} "
                f"acc {row['val_accuracy']:.4f} ({time.perf_counter() - started:.1f} s)"
            )
    _gather_full_heads(session, full_model)
    box: list = [None]
    if full_model is not None:
        box[0] = loop._finish(dataclasses.replace(session, model=full_model, paths=paths))
    dist.broadcast_object_list(box, src=0)  # the model file is written before any shard goes
    shutil.rmtree(session.paths.checkpoints, ignore_errors=True)
    return box[0]
