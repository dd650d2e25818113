"""Splits streamed from the feature store (embedstore/streaming.py) for heads whose features exceed the memory
budget: the same two iterators as the in-memory `heads.train.Split`, so the trainer does not know the difference.

What changes against the in-memory split: every head of a stack sees the same batches (one read feeds them all),
in the block-shuffled order of `RowStream.shuffled_batches` instead of a per-head full permutation. The order is
seeded from (order_seed, epoch) and not from the heads' generators, which then draw only their init and dropout
masks: a head therefore trains the same alone (`batched=False`) as in a stack. Seeds of one cell differ in init and
dropout, not in data order.
"""
from __future__ import annotations

import numpy as np
import torch

from embedstore.defaults import SPLITS
from embedstore.streaming import RowStream


class StreamedSplit:
    """A DataSplit (heads.train) whose rows are read from the store block by block in a background thread."""

    def __init__(self, stream: RowStream, device: str | torch.device = "cpu", *, order_seed: int = 0):
        self.stream = stream
        self.device = torch.device(device)
        self.order_seed = int(order_seed)
        # epochs counted per head generator: a stack's heads joined together, so they agree on the count, and a
        # head trained alone starts at epoch 1 like it would in a stack (the generators are kept alive, so an id
        # is never reused by another generator while this split exists)
        self._epochs: dict[int, tuple[torch.Generator, int]] = {}

    def __len__(self) -> int:
        return len(self.stream)

    def label_counts(self, num_classes: int) -> torch.Tensor:
        return torch.bincount(torch.from_numpy(self.stream.labels), minlength=num_classes)   # (C,)

    def _next_epoch(self, generators: list[torch.Generator]) -> int:
        epoch = 1 + max((self._epochs.get(id(g), (g, 0))[1] for g in generators), default=0)
        for g in generators:
            self._epochs[id(g)] = (g, epoch)
        return epoch

    def train_batches(self, generators, batch_size):
        """One epoch: the same batch for every head of the stack, (A, B, D_m) views of one (B, D_m) read."""
        A = len(generators)
        epoch = self._next_epoch(generators)
        for xs, y in self.stream.shuffled_batches(batch_size, seed=self.order_seed, epoch=epoch):
            xs, y = [self._to_device(x) for x in xs], self._to_device(y)
            yield [x.unsqueeze(0).expand(A, -1, -1) for x in xs], y.unsqueeze(0).expand(A, -1)

    def eval_batches(self, chunk):
        for xs, y in self.stream.sequential_batches(chunk):
            yield [self._to_device(x) for x in xs], self._to_device(y)

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":   # pinned host memory lets the copy overlap compute
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor


def streamed_head_data(store, names: list[str], *, device: str | torch.device = "cpu", budget: int | None = None,
                       require_test: bool = True, order_seed: int = 0, rows: np.ndarray | None = None):
    """HeadData whose train/val/test splits stream from the store the rows ok in every named set, less those
    holding NaN or inf (FeatureStore.finite_ok_rows: the in-memory path's rule); or `rows`, when given."""
    from heads.train import HeadData

    ok = store.finite_ok_rows(names)[0] if rows is None else rows
    return HeadData.from_split_rows(
        ok, np.asarray(store.split)[ok],
        lambda rows: StreamedSplit(RowStream(store, names, rows, budget=budget), device, order_seed=order_seed),
        require_test=require_test, where=str(store.path))


def load_head_data(store, names: list[str], *, device: str | torch.device, budget: int | None,
                   log=print) -> tuple:
    """The named sets' HeadData, in memory when that fits `budget` bytes (None: half the available memory),
    else streamed; and the row counts a result row records, with "data_access": "in memory" | "streamed"."""
    from embedstore.streaming import default_memory_budget, format_size, in_memory_bytes
    from heads.train import HeadData

    budget = default_memory_budget() if budget is None else budget
    need = in_memory_bytes(store, names, len(store.ok_rows(names)))
    if need <= budget:   # the rule `streams` states
        data = store.load(names, upcast=False)   # float16 stays float16; batches are upcast
        head_data = HeadData.from_arrays([data.features.pop(n) for n in names], data.labels, data.split, device)
        # rows marked ok that hold NaN/inf were left out (and warned about) by the reader: count them too
        counts = {"rows": len(data.labels), "skipped_rows": data.skipped, "non_finite_rows": data.non_finite,
                  "split_rows": {name: int((data.split == name).sum()) for name in SPLITS}}
        return head_data, {**counts, "data_access": "in memory"}
    # rows marked ok that hold NaN/inf: left out, counted and warned about as in memory (one rule, one pass)
    ok, non_finite = store.finite_ok_rows(names)
    split = np.asarray(store.split)[ok]
    counts = {"rows": len(ok), "skipped_rows": len(store.ids) - len(ok), "non_finite_rows": non_finite,
              "split_rows": {name: int((split == name).sum()) for name in SPLITS}}
    head_data = streamed_head_data(store, names, device=device, budget=budget, rows=ok)
    stream = head_data.train.stream
    log(f"{' + '.join(names)}: {format_size(need)} to hold in memory exceeds the memory budget of "
        f"{format_size(budget)}; streaming from the store in blocks of {stream.block} rows")
    share, n_classes = window_class_share(stream)
    if share < MIN_WINDOW_CLASS_SHARE:
        log(f"warning: a shuffle window of {stream.window_blocks} blocks holds about {share:.0%} of the {n_classes} "
            "training classes (the store keeps items class by class); streamed heads then learn far worse than in "
            "memory (measured with 1,000 classes: 0.1 % against 28 % test accuracy after one epoch). Give a larger "
            "--memory-budget, or extract with --dtype float16 so that the features fit in memory")
    return head_data, {**counts, "data_access": "streamed", "window_class_share": round(share, 3),
                       "block_rows": int(stream.block), "window_blocks": int(stream.window_blocks)}


def streams(store, names: list[str], budget: int | None) -> bool:
    """Whether `load_head_data` streams these sets under `budget` bytes (None: half the available memory)."""
    from embedstore.streaming import default_memory_budget, in_memory_bytes

    budget = default_memory_budget() if budget is None else budget
    return in_memory_bytes(store, names, len(store.ok_rows(names))) > budget


def access_key(counts: dict) -> dict:
    """What of a split's data access changes the heads trained on it, for their run keys: nothing in memory;
    streamed, the batch order depends on the block and shuffle-window sizes (and these on the budget)."""
    if counts["data_access"] != "streamed":
        return {}
    return {"data_access": "streamed", "block_rows": counts["block_rows"], "window_blocks": counts["window_blocks"]}


MIN_WINDOW_CLASS_SHARE = 0.5


def window_class_share(stream: RowStream) -> tuple[float, int]:
    """(mean share of the split's classes one shuffle window holds, number of classes), over epoch 1's windows."""
    per_block = [np.unique(stream.labels[first:stop]) for first, stop in stream.blocks]
    n_classes = len(np.unique(stream.labels))
    if not per_block:
        return 1.0, n_classes
    order = np.random.default_rng(0).permutation(len(per_block))
    W = stream.window_blocks
    shares = [len(np.unique(np.concatenate([per_block[i] for i in order[k:k + W]]))) / n_classes
              for k in range(0, len(order), W)]
    return float(np.mean(shares)), n_classes


def only_input(split, index: int):
    """The split with one modality's input only (the unimodal baselines), in memory or streamed alike."""
    if split is None:
        return None
    if isinstance(split, StreamedSplit):
        return StreamedSplit(split.stream.only(index), split.device, order_seed=split.order_seed)
    return type(split)([split.inputs[index]], split.labels)


class SweepData:
    """A sweep's features on the training device, loaded once per set of row-defining feature sets (a cell's
    `row_sets`): in memory when they fit the memory budget, else streamed from the store."""

    def __init__(self, store, device: torch.device, budget: int | None, log):
        self.store, self.device, self.budget, self.log = store, device, budget, log
        self.loaded: dict[tuple[str, ...], tuple] = {}   # row sets -> (HeadData, counts)
        self.decided: dict[tuple[str, ...], bool] = {}   # row sets -> streamed, before loading anything

    def counts(self, cell) -> dict:
        return self._load(cell.row_sets)[1]

    def rows(self, cell):
        """Every feature set of the cell's rows (a baseline's too), as loaded for its heads."""
        return self._load(cell.row_sets)[0]

    def streamed(self, task) -> bool:
        return self.counts(task.cell)["data_access"] == "streamed"

    def access(self, cell) -> dict:
        """The run-key part of the cell's data access (heads/streamed.py access_key), without loading features
        that would be held in memory (a resumed sweep with nothing left to train loads nothing)."""
        if cell.row_sets not in self.decided:   # many cells share row sets: read their status columns once
            self.decided[cell.row_sets] = streams(self.store, list(cell.row_sets), self.budget)
        return access_key(self.counts(cell)) if self.decided[cell.row_sets] else {}

    def _load(self, row_sets: tuple[str, ...]):
        if row_sets not in self.loaded:
            data, counts = load_head_data(self.store, list(row_sets), device=self.device, budget=self.budget,
                                          log=self.log)
            if counts["data_access"] == "in memory" and self.device.type == "cpu":
                for split in (data.train, data.val, data.test):   # worker processes then map these pages
                    for x in split.inputs + [split.labels]:        # instead of receiving copies
                        x.share_memory_()
            self.loaded[row_sets] = (data, counts)
        return self.loaded[row_sets]

    def for_task(self, task):
        from heads.train import HeadData

        cell = task.cell
        data, _ = self._load(cell.row_sets)
        if cell.feature_sets == cell.row_sets:
            return data
        column = cell.row_sets.index(cell.feature_sets[0])   # a baseline: one modality of its rows
        return HeadData(*(only_input(sp, column) for sp in (data.train, data.val, data.test)))
