"""Where a sweep's cells train: in this process, in N worker processes (`--jobs N`, one thread each), and across
torchrun ranks (several machines). Every head's randomness comes from its own generator (heads/train.py), so a
cell gives the same weights and metrics wherever it trains: `--jobs 2` and a 2-rank torchrun equal `--jobs 1`.

Workers are spawned (a fork of a process that has run OpenMP code can hang) and receive the features through
torch's shared memory (the tensors are not copied per worker). Ranks deal the cells round-robin in grid order
and train their own in rounds (`rounds`): in each, every rank trains its next `--jobs` groups (a streamed group
alone), then all ranks gather that round's results to rank 0, which alone writes rows and heads, before the next
round. The ranks agree on the number of rounds first (`RankGroup.agree_max`), so a rank with fewer (fewer groups,
or more cores per process on its machine) sends empty rounds and none waits forever. A sweep killed mid-way keeps
every round rank 0 recorded and loses only the groups in flight; a rerun trains the rest.

Workers die with the sweep: each asks Linux to SIGKILL it when its parent dies (prctl PR_SET_PDEATHSIG) and
watches its parent pid in a thread (the portable fallback), so a sweep killed with kill -9 leaves no orphans
holding features in memory; a SIGTERM of the sweep kills its workers before the sweep dies of it. Ctrl-C reaches
the whole process group from the terminal: workers ignore it (from their first instruction: SIGINT is blocked
while they are started, and ignored once they run), and the sweep, which gets KeyboardInterrupt, kills them, so
no worker prints a traceback.

The unit of dispatch is a group of tasks (`group_tasks`): cells whose heads share one stacked step (same feature
sets and rows, same StackedHead.shape_key; heads/groups.py) go to one worker or rank together, since splitting a
group across workers would take away the stacking it exists for. A head's results do not depend on its group.
"""
from __future__ import annotations

import contextlib
import errno
import os
import signal
import threading
import time
from concurrent.futures import Executor, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.multiprocessing

from embedstore.workers import start_worker
from heads.grid import Cell
from heads.models import HeadConfig, StackedHead
from heads.train import HeadData, HeadResult, TrainSettings, train_group
from heads.strategies import install, registered


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


def group_tasks(tasks: list[Task], *, enabled: bool = True) -> list[list[Task]]:
    """Tasks whose heads can share one stacked step, in grid order of each group's first task; with `enabled`
    False, every task is its own group (one stacked step per cell)."""
    if not enabled:
        return [[t] for t in tasks]
    groups: dict[tuple, list[Task]] = {}
    for t in tasks:
        key = (t.cell.feature_sets, t.cell.row_sets, StackedHead(t.config).shape_key())
        groups.setdefault(key, []).append(t)
    return list(groups.values())


def default_jobs(device: torch.device) -> int:
    """The cores this process may use on a CPU; one process per GPU on CUDA."""
    if device.type != "cpu":
        return 1
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _heads(group: list[Task]) -> list[tuple[HeadConfig, int]]:
    return [(t.config, s) for t in group for s in t.seeds]


def _per_task(group: list[Task], results: list[HeadResult]) -> Iterator[tuple[Task, list[HeadResult]]]:
    start = 0
    for task in group:
        yield task, results[start:start + len(task.seeds)]
        start += len(task.seeds)


def _with_strategies(strategies, fn, *args, **kwargs):
    """fn(*args, **kwargs) in a worker that knows the parent's strategies (heads/strategies.py)."""
    install(strategies)
    return fn(*args, **kwargs)


@contextlib.contextmanager
def worker_pool(jobs: int) -> Iterator[Executor | None]:
    """`jobs` spawned worker processes for `run_tasks(pool=...)` (None when jobs = 1), kept for several calls:
    torchrun rounds would otherwise start (and import torch in) a new pool each round."""
    if jobs <= 1:
        yield None
        return
    context = torch.multiprocessing.get_context("spawn")
    # one torch thread per worker: N processes use N cores with no OpenMP barriers; start_worker lives in a module
    # that imports no torch, so it runs (and ties the worker to this process) before the worker's heavy imports
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=start_worker,
                               initargs=(os.getpid(), 1))
    try:
        with _kill_workers_on_sigterm(pool):
            yield pool
    except BaseException:   # Ctrl-C, a worker that died, an error: end the workers now, not after their tasks
        _kill_workers(pool)
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def _kill_workers(pool: ProcessPoolExecutor) -> None:
    processes = list((getattr(pool, "_processes", None) or {}).values())   # the executor's own table of workers
    for process in processes:
        with contextlib.suppress(OSError, ValueError):
            process.kill()
    for process in processes:
        with contextlib.suppress(OSError, ValueError, AssertionError):
            process.join(timeout=5)


@contextlib.contextmanager
def _kill_workers_on_sigterm(pool: ProcessPoolExecutor) -> Iterator[None]:
    """While the pool lives, a SIGTERM of this process kills its workers first, then is handled as it would have
    been (by default: this process dies of it). Signal handlers belong to the main thread only."""
    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or previous == signal.SIG_IGN:
        yield
        return

    def on_sigterm(signum, frame):
        _kill_workers(pool)
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)
        else:
            os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is on_sigterm:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _submit(pool: Executor, fn, *args, **kwargs):
    """pool.submit with SIGINT blocked in this thread: a worker process it starts inherits the blocked signal (the
    mask survives exec), so a Ctrl-C during the worker's start-up (importing torch, seconds) is held until
    embedstore.workers.start_worker discards it, instead of a KeyboardInterrupt traceback per worker. A Ctrl-C
    meant for this process is delivered as soon as the mask is restored."""
    if not hasattr(signal, "pthread_sigmask"):
        return pool.submit(fn, *args, **kwargs)
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        return pool.submit(fn, *args, **kwargs)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def run_tasks(groups: list[list[Task]], data_for: Callable[[Task], HeadData], train: TrainSettings, *, jobs: int,
              batched: bool, precision: str | None = None,
              pool: Executor | None = None) -> Iterator[tuple[Task, list[HeadResult]]]:
    """Trains each group (`group_tasks`) in one stack; yields (task, results) per task as groups finish: in
    order in this process (jobs = 1), else as workers finish (in `pool` when given, else in a pool of its own).
    Every task of a group reads data_for(group[0])."""
    if jobs <= 1 or len(groups) <= 1:
        for group in groups:
            results = train_group(_heads(group), data_for(group[0]), train, batched=batched, precision=precision)
            yield from _per_task(group, results)
        return
    with contextlib.ExitStack() as stack:
        if pool is None:
            pool = stack.enter_context(worker_pool(min(jobs, len(groups))))
        # largest first: a long group started last would leave the other workers idle at the end
        order = sorted(groups, key=lambda g: -sum(t.cost for t in g))
        strategies = registered()   # strategies registered at run time reach the spawned workers too
        futures = {_submit(pool, _with_strategies, strategies, train_group, _heads(g), data_for(g[0]), train,
                           batched=batched, precision=precision): i for i, g in enumerate(order)}
        try:
            for future in as_completed(futures):
                yield from _per_task(order[futures[future]], future.result())
        except BrokenProcessPool as error:  # a worker was killed (out of memory, a signal): say so in one line
            raise OSError(errno.ECHILD, f"a sweep worker process died ({error}); the cells recorded so far are "
                                        "kept, so a rerun resumes (with fewer --jobs if memory ran out)") from None


# ------------------------------------------------------------------------------------------------- torchrun


def world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) without it."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def my_tasks(groups: list, rank: int, size: int) -> list:
    """Rank r trains groups (or tasks) r, r + size, r + 2 size, ... of the grid order: the same deal on every
    rank."""
    return groups[rank::size]


def rounds(in_memory: list, streamed: list, jobs: int) -> list[tuple[list, int]]:
    """A rank's groups as rounds of (groups, jobs), after each of which rank 0 records what finished: the
    in-memory groups `jobs` at a time (one per worker, so a kill loses at most `jobs` groups per rank), largest
    first (a round lasts as long as its slowest group on any rank, so groups of like cost should meet in one),
    then each streamed group alone (it trains in this process, one at a time)."""
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    order = sorted(in_memory, key=lambda g: -sum(t.cost for t in g))
    return [(order[i:i + jobs], jobs) for i in range(0, len(order), jobs)] + [([g], 1) for g in streamed]


class RankGroup:
    """The sweep's collectives under torchrun, on a gloo group (objects travel through host memory, whatever
    backend the default group uses)."""

    def __init__(self):
        import torch.distributed as dist
        self.dist = dist
        self.group = dist.new_group(backend="gloo")
        self.waited = 0.0   # seconds spent in gathers, all rounds together (waiting for the slowest rank)

    def broadcast(self, obj):
        box = [obj]
        self.dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def agree_max(self, n: int) -> int:
        """The largest `n` over the ranks, on every rank (the number of rounds all of them take part in)."""
        every = [None] * self.dist.get_world_size()
        self.dist.all_gather_object(every, n, group=self.group)
        return max(every)

    def gather(self, obj) -> list | None:
        """Every rank's `obj` on rank 0 (None elsewhere), after all ranks arrive."""
        rank = self.dist.get_rank()
        out = [None] * self.dist.get_world_size() if rank == 0 else None
        started = time.perf_counter()
        self.dist.gather_object(obj, out, dst=0, group=self.group)
        self.waited += time.perf_counter() - started
        return out
