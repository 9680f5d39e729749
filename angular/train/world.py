"""The processes a training run spans: its *world* (README, Scaling out).

:func:`angular.train.loop.train_item` is written once, for any world; what only several processes
need sits behind :class:`World`, whose one-process implementation (:data:`ONE_PROCESS`) does
nothing or the plain local thing, and whose :class:`ProcessGroup` does it over
``torch.distributed``:

- the model: :meth:`World.shard` keeps this rank's shard of each head
  (:class:`angular.nn.sharded.ShardedMarginHead`) and runs the backbone in DDP (:meth:`World.embed`);
- the data: :meth:`World.train_loader` gives each rank its share of each global batch
  (:class:`angular.train.sampler.EpochBatchSampler`, reshuffled by :meth:`World.begin_epoch`);
- the numbers every rank must agree on: the whole model's gradient norm
  (:meth:`World.gradient_norm`), the correct predictions over all classes (:meth:`World.correct`),
  the smallest or largest of an integer (:meth:`World.min_int`, :meth:`World.max_int`: the epoch to
  resume, weights that broke), a sum (:meth:`World.sum`: the shards' centre sums of the centre
  cosine), rank 0's backbone buffers (:meth:`World.share_buffers`, before validation), the full
  heads when they fit ``train.distributed.gather_head_mib`` (:meth:`World.gather_heads`, for the
  model file) and what rank 0 alone computes (:meth:`World.from_rank_zero`: the verification
  sets, the model file).

Elsewhere, by what they are about: each rank's checkpoint folder and the resume of another world
size's checkpoints (:mod:`angular.train.checkpoint`, :mod:`angular.train.reshard`), what several
processes cannot train (:func:`angular.train.loop.check_supported`).

The launch of the workers is here too: :func:`launch` starts ``train.distributed.world_size``
torchrun workers and raises :class:`WorkerError` naming the ranks that failed or ended without a
report; each worker joins the process group with :func:`worker_group`, which yields its
:class:`ProcessGroup` and leaves the report.

Test hook: ``ANGULAR_TEST_WORKER_FAULT=<rank>:<raise|hang|kill>:<epoch>:<step>`` makes that rank
raise, sleep for ever or SIGKILL itself before that training step
(tests/distributed/test_distributed_train.py); unset, it costs one environment lookup per run.
"""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from angular.config import ConfigError, DistributedConfig
from angular.files import atomic_write_text
from angular.nn.recognition import RecognitionModel
from angular.nn.sharded import ShardedMarginHead
from angular.ops.sharded import all_gather_equal
from angular.train.sampler import EpochBatchSampler
from angular.train.session import say

__all__ = [
    "WORKER_ENV",
    "FAULT_ENV",
    "WorkerError",
    "World",
    "ONE_PROCESS",
    "ProcessGroup",
    "is_worker",
    "resolve_backend",
    "launch",
    "failure_message",
    "worker_group",
]

WORKER_ENV = "ANGULAR_DISTRIBUTED_WORKER"  # set by launch: this process is one of the workers
REPORTS_ENV = "ANGULAR_WORKER_REPORTS"  # the folder where each worker leaves its report
FAULT_ENV = "ANGULAR_TEST_WORKER_FAULT"  # test only, see the module doc
REPORT_CHARS = 400

T = TypeVar("T")


class WorkerError(RuntimeError):
    """A worker of a distributed train stage failed, died or hung; the message names the ranks."""


# --------------------------------------------------------------------------------------------------
# The interface, and the world of one process.


class World:
    """One process: every method does the local thing (or nothing). :class:`ProcessGroup`
    overrides them for several."""

    size = 1
    rank = 0

    def shard(self, model: RecognitionModel, sample_rate: float, seed: int) -> RecognitionModel:
        """The model this process trains (several: this rank's shard of each head, its backbone run
        through DDP by :meth:`embed`; only called on several)."""
        return model

    def embed(self, model: RecognitionModel, images: torch.Tensor) -> torch.Tensor:
        """The embeddings of a training batch."""
        return model(images)

    def train_loader(self, dataset: Dataset, batch_size: int, num_workers: int, seed: int):
        """The loader of this rank's share of each global batch (only called on several)."""
        raise NotImplementedError("one process keeps the loader it has")

    def begin_epoch(self, loader: DataLoader, epoch: int) -> None:
        """Before each epoch's pass (several: reshuffle the distributed sampler)."""

    def before_step(self, epoch: int, step: int) -> None:
        """Before each training step (several: the test fault hook)."""

    def gradient_norm(self, model: torch.nn.Module, clip: float | None) -> torch.Tensor:
        """The total gradient norm, clipping the gradients to ``clip`` when it is set."""
        parameters = [p for p in model.parameters() if p.grad is not None]
        if clip is not None:
            return torch.nn.utils.clip_grad_norm_(parameters, clip)
        if not parameters:
            return torch.zeros(())
        return torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(p.grad.detach().float()) for p in parameters])
        )

    def correct(self, head: torch.nn.Module, embeddings: torch.Tensor, labels) -> int:
        """Correct arg-max predictions of ``head`` on the batch (``embeddings`` detached)."""
        return int((head.cosine(embeddings).argmax(1) == labels).sum())

    def min_int(self, value: int) -> int:
        return value

    def max_int(self, value: int) -> int:
        return value

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over the ranks of ``tensor`` (several: an all-reduce, into a copy)."""
        return tensor

    def share_buffers(self, module: torch.nn.Module) -> None:
        """Several: rank 0's buffers of ``module`` (BatchNorm's running statistics) on every rank,
        as DDP's next training forward sets them anyway (each rank's last forward updated its own
        from its share of the batch): the ranks then embed alike."""

    def gather_heads(self, model: RecognitionModel, full_model: RecognitionModel | None) -> None:
        """Copy each head's shards into ``full_model`` (several: collective)."""

    def from_rank_zero(self, compute: Callable[[], T]) -> T:
        """``compute()`` on rank 0, its result on every rank."""
        return compute()


ONE_PROCESS = World()


# --------------------------------------------------------------------------------------------------
# The world of several processes.


class ProcessGroup(World):
    """The ranks of the current process group; the collectives run on ``device``."""

    def __init__(self, device: torch.device):
        self.size, self.rank = dist.get_world_size(), dist.get_rank()
        self.device = device
        self.fault = read_fault()
        self.backbone: DistributedDataParallel | None = None

    def shard(self, model: RecognitionModel, sample_rate: float, seed: int) -> RecognitionModel:
        heads = {
            name: ShardedMarginHead.from_head(head, sample_rate=sample_rate, generator_seed=seed)
            for name, head in model.heads.items()
        }
        model = RecognitionModel(model.backbone, heads).to(self.device)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self.backbone = DistributedDataParallel(model.backbone, device_ids=device_ids)
        return model

    def embed(self, model: RecognitionModel, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)  # DDP around model.backbone (shard)

    def train_loader(self, dataset: Dataset, batch_size: int, num_workers: int, seed: int):
        """``batch_size`` is the global batch. The ``N mod W`` images a shuffle leaves over are
        dropped each epoch, so every rank has as many batches, of the same sizes (the sharded head
        needs that); :class:`EpochBatchSampler` draws ``DistributedSampler``'s order and can resume
        within an epoch, on any world size."""
        sampler = EpochBatchSampler(
            len(dataset), batch_size // self.size, world_size=self.size, rank=self.rank, seed=seed
        )
        return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers)

    def begin_epoch(self, loader: DataLoader, epoch: int) -> None:
        loader.batch_sampler.set_epoch(epoch)

    def before_step(self, epoch: int, step: int) -> None:
        fault = self.fault
        if fault is None or (fault[0], fault[2], fault[3]) != (self.rank, epoch, step):
            return
        kind = fault[1]
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if kind == "hang":
            while True:
                time.sleep(1.0)
        raise RuntimeError(f"the test fault {FAULT_ENV}={os.environ[FAULT_ENV]}")

    def gradient_norm(self, model: torch.nn.Module, clip: float | None) -> torch.Tensor:
        """The gradient norm of the whole model (the backbone's gradients are the same on every
        rank after DDP; the shards' squares are summed over the ranks), clipping as
        clip_grad_norm_ does."""
        shared = [p for p in model.backbone.parameters() if p.grad is not None]
        shards = [p for p in model.heads.parameters() if p.grad is not None]

        def squares(parameters) -> torch.Tensor:
            total = torch.zeros((), dtype=torch.float32, device=self.device)
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

    @torch.no_grad()
    def correct(self, head: torch.nn.Module, embeddings: torch.Tensor, labels) -> int:
        """Over all C classes for the gathered batch (collective): each rank's best class in its
        shard, then the best of the ranks (ties: the lowest class, as argmax)."""
        gathered = torch.cat(all_gather_equal(embeddings.contiguous(), head.group))
        gathered_labels = torch.cat(all_gather_equal(labels.contiguous(), head.group))
        best, index = head.cosine(gathered).max(dim=1)
        bests = torch.stack(all_gather_equal(best, head.group))
        indices = torch.stack(all_gather_equal(index + head.class_start, head.group))
        predicted = indices.gather(0, bests.argmax(dim=0, keepdim=True)).squeeze(0)
        return int((predicted == gathered_labels).sum())

    def min_int(self, value: int) -> int:
        return self.all_reduce_int(value, dist.ReduceOp.MIN)

    def max_int(self, value: int) -> int:
        return self.all_reduce_int(value, dist.ReduceOp.MAX)

    def all_reduce_int(self, value: int, op) -> int:
        tensor = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(tensor, op=op)
        return int(tensor.item())

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.detach().clone()
        dist.all_reduce(total)
        return total

    @torch.no_grad()
    def share_buffers(self, module: torch.nn.Module) -> None:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)

    @torch.no_grad()
    def gather_heads(self, model: RecognitionModel, full_model: RecognitionModel | None) -> None:
        """All-gather each head's shards (collective); rank 0 copies them, with the head's state,
        into ``full_model``. Only for heads that fit ``train.distributed.gather_head_mib``
        (:mod:`angular.train.model_files`); validation needs no full head."""
        for name, head in model.heads.items():
            state = head.full_state_dict()
            if full_model is not None:
                full_model.heads[name].load_state_dict(state)

    def from_rank_zero(self, compute: Callable[[], T]) -> T:
        box: list = [compute() if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def read_fault() -> tuple[int, str, int, int] | None:
    """The test fault of ``ANGULAR_TEST_WORKER_FAULT`` (module doc), or None."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    target, kind, epoch, step = spec.split(":")
    if kind not in ("raise", "hang", "kill"):
        raise ValueError(f"{FAULT_ENV}: unknown fault {kind!r} (raise, hang or kill)")
    return int(target), kind, int(epoch), int(step)


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


# --------------------------------------------------------------------------------------------------
# The launcher (the stage's own process).


def is_worker() -> bool:
    """Whether this process is one of the workers :func:`launch` started."""
    return os.environ.get(WORKER_ENV) == "1"


def python_path() -> str:
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
            "PYTHONPATH": python_path(),
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
        say(f"{label}: {config.world_size} workers: torchrun {' '.join(command[3:])}")
        status = subprocess.run(command, env=environment, check=False).returncode
        if status != 0:
            raise WorkerError(failure_message(label, Path(reports), config.world_size, status))


def failure_message(label: str, reports: Path, world_size: int, status: int) -> str:
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


def report(kind: str, text: str) -> None:
    """Leave this worker's report (``error`` or ``done``) where :func:`launch` reads it."""
    folder = os.environ.get(REPORTS_ENV)
    if folder:
        atomic_write_text(Path(folder) / f"rank-{os.environ.get('RANK', '0')}.{kind}", text)


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    if len(text) > REPORT_CHARS:
        text = text[: REPORT_CHARS - 3] + "..."
    return f"{type(error).__name__}: {text}"


@contextmanager
def worker_group(config: DistributedConfig, device: torch.device) -> Iterator[ProcessGroup]:
    """Join the torchrun workers' process group (the collectives time out after
    ``config.timeout_s``); yields this rank's :class:`ProcessGroup`. Leaves the report
    :func:`launch` reads."""
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
        yield ProcessGroup(device)
    except BaseException as error:
        report("error", one_line(error))
        raise
    else:
        report("done", "")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
