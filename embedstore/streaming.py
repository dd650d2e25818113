"""Streaming row batches from the feature store, for heads whose features do not fit a memory budget.

Reads are chunk-aligned: the store's rows are cut into blocks of `block` rows (the widest chunk of the named
sets; chunks are powers of two, so every set's chunk boundaries fall on block boundaries), and a block is read as
one contiguous slice per set: the span from its first to its last row of the split. A training epoch visits the
split's blocks in a shuffled order; every `window_blocks` consecutive blocks of that order (plus the few rows
the previous window left over) are pooled and permuted, which also shuffles each block, and batches are cut from
the permuted window (all full but the last). The generators are seeded from (seed, epoch).

This is not a full permutation: a batch draws its rows from one window of blocks (8k-65k rows), not from
the whole split, and the rows of one block reach the model within one window. The window is what makes it
work: the manifest stores items class by class, so one block usually holds one class, and batches cut from one
block at a time (measured: 72 % test accuracy after one epoch against 100 % in memory on a 100k-row synthetic
store) would each see a single class. Validation and test are one sequential pass in chunks.

A background thread reads blocks into a bounded queue while the caller trains, so reading overlaps compute and
memory stays bounded: at most `queue_blocks` blocks waiting, one being read, and one window being consumed.
Both sizes come from the memory budget (1/WINDOW_SHARE and 1/QUEUE_SHARE of it, within their bounds), and a
window is held once: its blocks are released as soon as they are joined, and the joined window before the next
one is gathered.
"""
from __future__ import annotations

import copy
import os
import queue
import re
import threading
from typing import Iterable, Iterator

import numpy as np
import torch

from embedstore.chunks import block_rows

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
# The shuffle window may hold 1/8 of the memory budget, at least 16 blocks (~55 MB for 1664 float32 features: a
# window of 2 blocks of a class-by-class store held ~2 classes, and one epoch reached 30 % test accuracy against
# 100 % in memory) and at most 64.
WINDOW_SHARE, WINDOW_BLOCKS = 8, (16, 64)
# The queue of blocks read ahead only has to hide reading behind compute (a 3.4 MB block reads in ~1 ms from the
# page cache and trains in ~0.1 s): 1/32 of the budget, 2-16 blocks.
QUEUE_SHARE, QUEUE_BLOCKS = 32, (2, 16)
IN_MEMORY_FACTOR = 2      # the in-memory path holds the loaded matrix and its per-split copies at once


def parse_memory_size(text: str | int) -> int:
    """"1GB" -> 10**9, "512MiB" -> 512 * 2**20, "1.5G" -> 1.5e9, "2048" -> 2048 bytes."""
    if isinstance(text, int):
        size = text
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        unit = match.group(2).lower() if match else None
        if not match or unit not in _UNITS:
            raise ValueError(f"memory size {text!r} is not a size; write e.g. 1GB, 512MiB, 2.5G or a byte count")
        size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"memory size {text!r} must be positive")
    return size


def available_memory() -> int:
    """Bytes of memory available now: MemAvailable from /proc/meminfo, else free pages from os.sysconf."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def default_memory_budget() -> int:
    """Half of the memory available now."""
    return available_memory() // 2


def format_size(size: int) -> str:
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if size >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{size} B"


def in_memory_bytes(store, names: Iterable[str], n_rows: int) -> int:
    """What holding `n_rows` rows of the named sets in memory costs (as stored: float16 stays float16),
    times IN_MEMORY_FACTOR for the copies made while loading."""
    row_bytes = sum(store.dataset(name).shape[1] * store.dataset(name).dtype.itemsize for name in names)
    return IN_MEMORY_FACTOR * n_rows * row_bytes


def fits_in_memory(store, names: Iterable[str], n_rows: int, budget: int) -> bool:
    return in_memory_bytes(store, list(names), n_rows) <= budget


def queue_blocks_for(budget: int, block_bytes: int, share: int = QUEUE_SHARE,
                     bounds: tuple[int, int] = QUEUE_BLOCKS) -> int:
    """Blocks in budget / share, within bounds."""
    low, high = bounds
    return int(min(high, max(low, budget // (share * max(1, block_bytes)))))


_END = object()


class RowStream:
    """Batches of one split's rows of several feature sets, read block by block from the store.

    `rows`: (n,) increasing store row indices (e.g. the rows ok in every set, of one split). Batches are
    (list of (b, D_m) float32 tensors, (b,) int64 labels) on the CPU, upcast from the stored dtype per batch.
    """

    def __init__(self, store, names: list[str], rows: np.ndarray, *, budget: int | None = None,
                 queue_blocks: int | None = None, window_blocks: int | None = None):
        self.names = list(names)
        self.datasets = [store.dataset(name) for name in self.names]
        self.rows = np.asarray(rows, dtype=np.int64)
        if len(self.rows) and np.any(np.diff(self.rows) <= 0):
            raise ValueError("RowStream rows must be increasing and distinct")
        self.labels = np.asarray(store.labels, dtype=np.int64)[self.rows]          # (n,)
        self.block = max(block_rows(d) for d in self.datasets)
        n_store = self.datasets[0].shape[0]
        bounds = np.searchsorted(self.rows, np.arange(0, n_store + self.block, self.block))
        # the blocks holding rows of this split, as [first, stop) positions in self.rows
        self.blocks = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        self.block_bytes = self.block * sum(d.shape[1] * d.dtype.itemsize for d in self.datasets)
        budget = budget if budget is not None else default_memory_budget()
        self.queue_blocks = int(queue_blocks or queue_blocks_for(budget, self.block_bytes))
        self.window_blocks = int(window_blocks or queue_blocks_for(budget, self.block_bytes, WINDOW_SHARE,
                                                                   WINDOW_BLOCKS))

    def __len__(self) -> int:
        return len(self.rows)

    def only(self, index: int) -> "RowStream":
        """The same rows, blocks and queue bound, one feature set only (a unimodal baseline's)."""
        single = copy.copy(self)
        single.names, single.datasets = [self.names[index]], [self.datasets[index]]
        return single

    def read_block(self, i: int) -> tuple[list[np.ndarray], np.ndarray]:
        """Block i's rows of the split: one contiguous slice per set, (m, D_m) as stored, and (m,) labels."""
        first, stop = self.blocks[i]
        lo, hi = int(self.rows[first]), int(self.rows[stop - 1]) + 1
        picked = self.rows[first:stop] - lo
        whole = len(picked) == hi - lo
        return [d[lo:hi] if whole else d[lo:hi][picked] for d in self.datasets], self.labels[first:stop]

    # ------------------------------------------------------------------------------------------- batches
    def shuffled_batches(self, batch_size: int, *, seed: int, epoch: int
                         ) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        """One training epoch: blocks in a shuffled order, rows permuted within windows of blocks, batches."""
        order_rng, window_rng = (np.random.default_rng(s)
                                 for s in np.random.SeedSequence([int(seed), int(epoch)]).spawn(2))
        order = order_rng.permutation(len(self.blocks))
        return _batches(self._read_in_background(order), batch_size, window=self.window_blocks, rng=window_rng)

    def sequential_batches(self, chunk: int) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        """Every row once, in store order, in chunks of `chunk` rows (validation, test)."""
        return _batches(self._read_in_background(np.arange(len(self.blocks))), chunk)

    def _read_in_background(self, order: np.ndarray):
        """Blocks in `order`, read by a thread into a bounded queue."""
        blocks: queue.Queue = queue.Queue(maxsize=self.queue_blocks)
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    blocks.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    continue
            return False

        def work():
            try:
                for i in order:
                    if not put(self.read_block(int(i))):
                        return
                put(_END)
            except BaseException as error:   # re-raised in the consumer, never lost in the thread
                put(error)

        thread = threading.Thread(target=work, name="embedstore-row-stream", daemon=True)
        thread.start()
        try:
            while True:
                item = blocks.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:   # also when the consumer stops early: the thread ends instead of blocking on a full queue
            stop.set()
            thread.join()


def _batches(blocks: Iterator[tuple[list[np.ndarray], np.ndarray]], size: int, *, window: int = 1,
             rng: np.random.Generator | None = None) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
    """Cut a stream of row blocks into batches of `size` rows (only the very last may be smaller), upcast to
    float32. With `rng`: every `window` blocks (and the rows the previous window left over) are permuted
    together first; the last window may hold fewer blocks."""
    pieces: list[tuple[list[np.ndarray], np.ndarray]] = []
    held = waiting = 0
    for xs, y in blocks:
        pieces.append((xs, y))
        held, waiting = held + len(y), waiting + 1
        xs = y = None
        if held < size or (rng is not None and waiting < window):
            continue
        pieces = yield from _cut(pieces, held, size, rng, last=False)
        held, waiting = sum(len(y) for _, y in pieces), 0
    if held:
        yield from _cut(pieces, held, size, rng, last=True)


def _cut(pieces, held: int, size: int, rng, *, last: bool):
    """Yield the full batches of one window (and, if last, the rest); returns the rows left over, as pieces."""
    joined = _join(pieces)
    pieces.clear()   # the blocks are released once joined
    order = None if rng is None else rng.permutation(held)   # (held,)
    n_full = held if last else held // size * size
    for start in range(0, n_full, size):
        yield _as_batch(_take(joined, order, start, min(start + size, n_full)))
    return [_take(joined, order, n_full, held)] if held > n_full else []


def _join(pieces):
    if len(pieces) == 1:
        return pieces[0]
    n_sets = len(pieces[0][0])
    return ([np.concatenate([xs[m] for xs, _ in pieces]) for m in range(n_sets)],
            np.concatenate([y for _, y in pieces]))


def _take(joined, order: np.ndarray | None, start: int, stop: int):
    """Rows start..stop of the joined window, through `order` when given (a gather), else a slice."""
    xs, y = joined
    if order is None:
        return [x[start:stop] for x in xs], y[start:stop]
    index = order[start:stop]
    return [x[index] for x in xs], y[index]


def _as_batch(part) -> tuple[list[torch.Tensor], torch.Tensor]:
    xs, y = part
    return ([torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)) for x in xs],
            torch.from_numpy(np.ascontiguousarray(y)))
