"""Row chunks of the store's feature datasets: how many rows a chunk holds, and reading rows block by block.

Feature datasets are stored in chunks of whole rows, at most CHUNK_BYTES each and a power of two rows, so that
a reader wanting a block of rows (streaming heads, embedstore/streaming.py) reads whole chunks and nothing else,
and the chunks of a 1280-d and a 384-d set align (the smaller power of two divides the larger). Stores written
before chunking have contiguous datasets; readers read them in blocks of the rows a new store's chunk would hold.
"""
from __future__ import annotations

import h5py
import numpy as np

FEATURE_DTYPES = ("float32", "float16")
CHUNK_BYTES = 1 << 20   # at most 1 MiB per chunk (h5py's advice: 10 KiB - 1 MiB); a power of two rows >= 0.5 MiB


def chunk_rows_for(dim: int, itemsize: int, n_rows: int | None = None) -> int:
    """Rows per chunk of a (n_rows, dim) dataset: the largest power of two whose rows fit CHUNK_BYTES (at least
    1 row, at most n_rows). Powers of two make every set's chunks align with the widest set's."""
    rows = 1
    while rows * 2 * dim * itemsize <= CHUNK_BYTES:
        rows *= 2
    return max(1, min(rows, n_rows)) if n_rows is not None else rows


def block_rows(dataset: h5py.Dataset) -> int:
    """The row block a reader should read at once: the chunk's rows, or for a contiguous dataset (stores
    written before chunking, merged virtual datasets) the rows a new store's chunk would hold."""
    if dataset.chunks is not None:
        return int(dataset.chunks[0])
    return chunk_rows_for(int(dataset.shape[1]), dataset.dtype.itemsize)


def check_feature_dtype(dtype: str) -> str:
    if dtype not in FEATURE_DTYPES:
        raise ValueError(f"unknown feature dtype {dtype!r}; use one of {', '.join(FEATURE_DTYPES)}")
    return dtype


def read_rows(dataset: h5py.Dataset, rows: np.ndarray, dtype) -> np.ndarray:
    """dataset[rows] for increasing `rows`, read one row block at a time (whole chunks, contiguous slices)."""
    out = np.empty((len(rows), dataset.shape[1]), dtype=dtype or dataset.dtype)   # (n, D)
    block = block_rows(dataset)
    starts = np.searchsorted(rows, np.arange(0, dataset.shape[0] + block, block))
    for first, stop in zip(starts[:-1], starts[1:]):
        if stop > first:
            lo, hi = int(rows[first]), int(rows[stop - 1]) + 1
            out[first:stop] = dataset[lo:hi][rows[first:stop] - lo]
    return out
