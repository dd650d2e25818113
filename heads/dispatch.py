"""Where a sweep's cells train: in this process, in N worker processes (`--jobs N`, one thread each), and across
torchrun ranks (several machines). Every head's randomness comes from its own generator (heads/train.py), so a
cell gives the same weights and metrics wherever it trains: `--jobs 2` and a 2-rank torchrun equal `--jobs 1`.

Workers are spawned (a fork of a process that has run OpenMP code can hang) and receive the features through
torch's shared memory (the tensors are not copied per worker). Ranks deal the cells round-robin in grid order,
train their own, and send the results to rank 0, which alone writes rows and heads.
"""
from __future__ import annotations

import errno
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.multiprocessing

from heads.grid import Cell
from heads.models import HeadConfig, StackedHead
from heads.train import HeadData, HeadResult, TrainSettings, train_heads


@dataclass
class Task:
    """One cell's seeds still to train."""
    cell: Cell
    config: HeadConfig
    seeds: list[int]
    keys: dict[int, str] = field(default_factory=dict)   # seed -> run key

    @property
    def cost(self) -> int:
        """Relative work: one head's matmul FLOPs per row, times the heads."""
        return StackedHead(self.config).forward_flops_per_row() * len(self.seeds)


def default_jobs(device: torch.device) -> int:
    """The cores this process may use on a CPU; one process per GPU on CUDA."""
    if device.type != "cpu":
        return 1
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _worker_start() -> None:
    torch.set_num_threads(1)   # one thread per process: N processes use N cores with no OpenMP barriers


def _train(config: HeadConfig, seeds: list[int], data: HeadData, train: TrainSettings, batched: bool,
           cpu_auto_bf16: bool) -> list[HeadResult]:
    return train_heads(config, seeds, data, train, batched=batched, cpu_auto_bf16=cpu_auto_bf16)


def run_tasks(tasks: list[Task], data_for: Callable[[Task], HeadData], train: TrainSettings, *, jobs: int,
              batched: bool, cpu_auto_bf16: bool) -> Iterator[tuple[Task, list[HeadResult]]]:
    """Yields (task, results) as tasks finish: in order in this process (jobs = 1), else as workers finish."""
    if jobs <= 1 or len(tasks) <= 1:
        for task in tasks:
            yield task, _train(task.config, task.seeds, data_for(task), train, batched, cpu_auto_bf16)
        return
    context = torch.multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(jobs, len(tasks)), mp_context=context,
                             initializer=_worker_start) as pool:
        # largest first: a long cell started last would leave the other workers idle at the end
        order = sorted(tasks, key=lambda t: -t.cost)
        futures = {pool.submit(_train, t.config, t.seeds, data_for(t), train, batched, cpu_auto_bf16): t
                   for t in order}
        try:
            for future in as_completed(futures):
                yield futures[future], future.result()
        except BrokenProcessPool as error:  # a worker was killed (out of memory, a signal): say so in one line
            raise OSError(errno.ECHILD, f"a sweep worker process died ({error}); the cells recorded so far are "
                                        "kept, so a rerun resumes (with fewer --jobs if memory ran out)") from None


# ------------------------------------------------------------------------------------------------- torchrun


def world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) without it."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def my_tasks(tasks: list[Task], rank: int, size: int) -> list[Task]:
    """Rank r trains tasks r, r + size, r + 2 size, ... of the grid order: the same deal on every rank."""
    return tasks[rank::size]


class RankGroup:
    """The sweep's collectives under torchrun, on a gloo group (objects travel through host memory, whatever
    backend the default group uses)."""

    def __init__(self):
        import torch.distributed as dist
        self.dist = dist
        self.group = dist.new_group(backend="gloo")

    def broadcast(self, obj):
        box = [obj]
        self.dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather(self, obj) -> list | None:
        """Every rank's `obj` on rank 0 (None elsewhere), after all ranks arrive."""
        rank = self.dist.get_rank()
        out = [None] * self.dist.get_world_size() if rank == 0 else None
        started = time.perf_counter()
        self.dist.gather_object(obj, out, dst=0, group=self.group)
        self.waited = time.perf_counter() - started
        return out
