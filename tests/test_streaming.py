"""Streaming reads (embedstore/streaming.py): every row once per epoch, block-shuffled and deterministic,
sequential evaluation chunks, a bounded read-ahead queue, memory budgets."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

import embedstore.chunks as chunks
import embedstore.streaming as streaming
from embedstore.store import FeatureStore
from embedstore.streaming import RowStream, fits_in_memory, parse_memory_size, queue_blocks_for
from store_factory import make_feature_store

N = 500


@pytest.fixture()
def store_path(tmp_path, monkeypatch):
    """Column 0 of each set holds the row index, so a batch says which rows it carries. Chunks of 8 and 32
    rows, so blocks of 32."""
    monkeypatch.setattr(chunks, "CHUNK_BYTES", 8 * 16 * 4)   # (N, 16) float32 -> 8 rows; (N, 4) -> 32 rows
    rng = np.random.default_rng(0)
    image, text = rng.normal(size=(N, 16)), rng.normal(size=(N, 4))
    image[:, 0] = text[:, 0] = np.arange(N)
    split = ["train", "train", "train", "val", "test"] * (N // 5)
    return make_feature_store(tmp_path / "s.h5", classes=3, splits=split, nan_rows={"image/i/pooled": [7]},
                              features={"image/i/pooled": image, "text/t/pooled": text}).path   # row 7: skipped


NAMES = ["image/i/pooled", "text/t/pooled"]


def _train_stream(store, **kwargs) -> RowStream:
    ok = store.ok_rows(NAMES)
    return RowStream(store, NAMES, ok[store.split[ok] == "train"], **kwargs)


def _rows_of(batches) -> list[np.ndarray]:
    return [xs[0][:, 0].numpy().astype(int) for xs, _ in batches]


def test_every_row_once_per_epoch_in_full_batches(store_path):
    with FeatureStore(store_path) as store:
        stream = _train_stream(store, queue_blocks=3)
        assert stream.block == 32 and 7 not in stream.rows      # the widest chunk: (N, 4) -> 32 rows
        batches = list(stream.shuffled_batches(10, seed=0, epoch=1))
        seen = np.concatenate(_rows_of(batches))
        assert sorted(seen) == list(stream.rows)                # every row exactly once
        assert [len(y) for _, y in batches] == [10] * (len(seen) // 10) + [len(seen) % 10] * (len(seen) % 10 > 0)
        for xs, y in batches:                                   # features, labels and sets stay aligned
            rows = xs[0][:, 0].numpy().astype(int)
            assert xs[0].dtype == xs[1].dtype == torch.float32
            assert (xs[1][:, 0].numpy().astype(int) == rows).all() and (y.numpy() == rows % 3).all()


def test_order_is_deterministic_per_seed_and_epoch(store_path):
    with FeatureStore(store_path) as store:
        stream = _train_stream(store, window_blocks=4)
        first = np.concatenate(_rows_of(stream.shuffled_batches(10, seed=0, epoch=1)))
        again = np.concatenate(_rows_of(stream.shuffled_batches(10, seed=0, epoch=1)))
        other_epoch = np.concatenate(_rows_of(stream.shuffled_batches(10, seed=0, epoch=2)))
        other_seed = np.concatenate(_rows_of(stream.shuffled_batches(10, seed=1, epoch=1)))
    assert (first == again).all()
    assert not (first == other_epoch).all() and not (first == other_seed).all()


def test_one_block_window_keeps_blocks_together_in_a_shuffled_order(store_path):
    with FeatureStore(store_path) as store:
        # batches of 1: no rows are carried over from one window into the next
        rows = np.concatenate(_rows_of(_train_stream(store, window_blocks=1).shuffled_batches(1, seed=0, epoch=1)))
    blocks = rows // 32
    runs = blocks[np.r_[True, blocks[1:] != blocks[:-1]]]
    assert len(runs) == len(set(blocks))                       # each block's rows arrive together
    assert list(runs) != sorted(runs)                          # in a shuffled block order
    assert not (rows == np.sort(rows)).all()                   # and shuffled within blocks


def test_windows_mix_blocks_within_batches(store_path):
    with FeatureStore(store_path) as store:
        stream = _train_stream(store, window_blocks=4)
        batches = _rows_of(stream.shuffled_batches(10, seed=0, epoch=1))
    mixed = [len(set(rows // 32)) > 1 for rows in batches]
    assert sum(mixed) > 0.8 * len(batches)                     # one block per batch would be one class per batch
    # drawn from one window of 4 blocks, plus < 10 rows carried over from the previous window's 4 blocks
    assert max(len(set(rows // 32)) for rows in batches) <= 4 + 4


@pytest.mark.parametrize("window", [1, 4, 64])   # 64: more than the split's blocks, one window for all
def test_batch_sizes_for_any_window(store_path, window):
    with FeatureStore(store_path) as store:
        stream = _train_stream(store, window_blocks=window)
        sizes = [len(y) for _, y in stream.shuffled_batches(32, seed=0, epoch=1)]
        n = len(stream)
    assert sizes == [32] * (n // 32) + [n % 32] * (n % 32 > 0)


def test_sequential_chunks_equal_load(store_path):
    with FeatureStore(store_path) as store:
        ok = store.ok_rows(NAMES)
        stream = RowStream(store, NAMES, ok[store.split[ok] == "val"], queue_blocks=2)
        batches = list(stream.sequential_batches(7))
        loaded = store.load(NAMES)
        val = loaded.split == "val"
        for m, name in enumerate(NAMES):
            np.testing.assert_array_equal(np.concatenate([xs[m].numpy() for xs, _ in batches]),
                                          loaded.features[name][val])
        assert np.concatenate([y.numpy() for _, y in batches]).tolist() == loaded.labels[val].tolist()


def test_reads_are_chunk_aligned(store_path):
    spans = []
    with FeatureStore(store_path) as store:
        stream = _train_stream(store)
        read = stream.read_block

        def spy(i):
            first, stop = stream.blocks[i]
            spans.append((int(stream.rows[first]), int(stream.rows[stop - 1])))
            return read(i)
        stream.read_block = spy
        list(stream.shuffled_batches(16, seed=0, epoch=1))
    assert spans and all(lo // 32 == hi // 32 for lo, hi in spans)   # a read never crosses a block boundary


def test_read_ahead_is_bounded(store_path):
    reads = []
    with FeatureStore(store_path) as store:
        stream = _train_stream(store, queue_blocks=2, window_blocks=1)
        read = stream.read_block
        stream.read_block = lambda i: (reads.append(i), read(i))[1]
        batches = stream.shuffled_batches(1, seed=0, epoch=1)
        next(batches)                      # the consumer holds one block and stops consuming
        time.sleep(0.5)                    # the reader runs ahead as far as the queue lets it
        assert len(reads) <= 1 + 2 + 1 < len(stream.blocks)   # consumed + queued + one waiting to be queued
        threads = threading.active_count()
        batches.close()                    # stopping early ends the reader thread
        assert threading.active_count() == threads - 1


def test_reader_errors_reach_the_consumer(store_path):
    with FeatureStore(store_path) as store:
        stream = _train_stream(store)

        def broken(i):
            raise OSError("disk went away")
        stream.read_block = broken
        with pytest.raises(OSError, match="disk went away"):
            list(stream.shuffled_batches(10, seed=0, epoch=1))


def test_float16_store_streams_float32(tmp_path):
    values = make_feature_store(tmp_path / "h.h5", classes=1, splits=["train"] * 40, separation=0.0,
                                features={"image/i/pooled": 6}, dtype="float16").features["image/i/pooled"]
    with FeatureStore(tmp_path / "h.h5") as store:
        xs, _ = next(iter(RowStream(store, ["image/i/pooled"], np.arange(40)).sequential_batches(40)))
    assert xs[0].dtype == torch.float32
    np.testing.assert_array_equal(xs[0].numpy(), values.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("text, size", [("1GB", 10**9), ("512MiB", 512 * 2**20), ("1.5G", 1_500_000_000),
                                        ("2048", 2048), ("64 kb", 64_000), (4096, 4096)])
def test_parse_memory_size(text, size):
    assert parse_memory_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "1 XB", "0", "-1GB", "1e9"])
def test_parse_memory_size_refuses(text):
    with pytest.raises(ValueError, match="memory size"):
        parse_memory_size(text)


def test_budget_decision_and_queue_size(store_path, monkeypatch):
    monkeypatch.setattr(streaming, "available_memory", lambda: 8 * 10**9)
    assert streaming.default_memory_budget() == 4 * 10**9
    with FeatureStore(store_path) as store:
        need = streaming.in_memory_bytes(store, NAMES, 100)
        assert need == 2 * 100 * (16 + 4) * 4                   # float32 rows, times the loading copies
        assert fits_in_memory(store, NAMES, 100, need) and not fits_in_memory(store, NAMES, 100, need - 1)
    assert queue_blocks_for(10**9, 10**6) == 16 and queue_blocks_for(1, 10**6) == 2
    assert queue_blocks_for(10**9, 10**6, 8, (16, 64)) == 64 and queue_blocks_for(1, 10**6, 8, (16, 64)) == 16
    with FeatureStore(store_path) as store:
        tiny = _train_stream(store, budget=1)      # a tiny budget still mixes 16 blocks per window
        assert (tiny.queue_blocks, tiny.window_blocks) == (2, 16)
    assert queue_blocks_for(320 * 10**6, 10**6) == 10
