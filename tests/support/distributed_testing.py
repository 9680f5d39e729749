"""Running a function on W gloo (or, on GPUs, nccl) processes on this machine, for the tests of
the sharded head.

``spawn(fn, world_size, tmp_path, *args)`` starts W processes (torch.multiprocessing, spawn), each
joining a gloo process group through a FileStore in ``tmp_path``, runs ``fn(rank, world_size,
*args)`` in each and returns the W return values (saved with torch.save). A worker that raises
fails the test with its traceback; one that hangs is killed after ``timeout`` seconds, and the
collectives themselves time out after ``COLLECTIVE_TIMEOUT``, so no test can hang.
"""

from __future__ import annotations

import datetime
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)


def _worker(rank: int, fn, world_size: int, folder: str, args: tuple, backend: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)  # W processes share the machine's cores
    if backend == "nccl":
        torch.cuda.set_device(rank)  # one GPU per rank, as torchrun's workers use them
    store = dist.FileStore(os.path.join(folder, "store"), world_size)
    dist.init_process_group(
        backend, store=store, rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT
    )
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(folder, f"result-{rank}.pt"))
    finally:
        dist.destroy_process_group()


def spawn(
    fn, world_size: int, tmp_path: Path, *args, timeout: float = 240.0, backend: str = "gloo"
) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes of ``backend`` (gloo on the
    CPU; nccl with rank r on GPU r); their results."""
    folder = tmp_path / f"spawn-{world_size}-{time.monotonic_ns()}"
    folder.mkdir()
    context = mp.start_processes(
        _worker,
        args=(fn, world_size, str(folder), args, backend),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=1.0):  # raises ProcessRaisedException on a worker's error
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world_size} workers still running after {timeout} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [
        torch.load(folder / f"result-{rank}.pt", weights_only=False) for rank in range(world_size)
    ]
