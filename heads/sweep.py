"""`heads sweep`: the grid of strategies x fusion operators x seeds (+ unimodal baselines) over one store.

Results are data: one JSON row per run in RESULTS/runs.jsonl, appended as each cell finishes, so an
interrupted sweep resumes. A run whose key (head config + training settings + seed + the store's manifest hash
+ the feature sets' provenance) is already there is skipped. The best head of each cell (by validation
accuracy, never by test) is saved as RESULTS/heads/<cell>/{model.safetensors, config.json}.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from heads.end_to_end import END_TO_END, EndToEndSettings
from heads.estimator import FusionHead
from heads.fusion import list_fusions
from heads.inputs import inputs_with_shared_rows
from heads.models import BASELINES, MULTIMODAL_STRATEGIES, HeadConfig, StackedHead
from heads.train import HeadData, TrainSettings, train_heads

DEFAULT_FUSIONS = ("add", "average", "product", "concat", "gated")


@dataclass(frozen=True)
class SweepSettings:
    strategies: tuple[str, ...] = MULTIMODAL_STRATEGIES
    fusions: tuple[str, ...] = DEFAULT_FUSIONS
    seeds: tuple[int, ...] = (0, 1, 2)
    baselines: bool = True                # also train the unimodal "image" and "text" heads (Table 7)
    batched: bool = True                  # all seeds of a cell in one stack; False: one head at a time
    device: str | None = None             # None: cuda when available, else cpu
    # torch.set_num_threads while training. 1 by default: on this project's 2-vCPU machines one thread measured
    # 0.4-0.5 s per 2-A/2-B head-epoch and two threads 1.1-9.5 s (OpenMP barriers stall whenever the other vCPU
    # is busy). Give more on a dedicated many-core machine; None leaves torch's own setting.
    threads: int | None = 1
    dropout: float = 0.3
    train: TrainSettings = field(default_factory=TrainSettings)
    manifest: str | None = None           # 3A/3B train end to end on the raw catalog through this manifest
    end_to_end: EndToEndSettings = field(default_factory=EndToEndSettings)  # their training (heads/end_to_end.py)

    def __post_init__(self):
        known = MULTIMODAL_STRATEGIES + BASELINES + END_TO_END
        if set(self.strategies) & set(END_TO_END) and not self.manifest:
            raise ValueError("strategies 3A/3B train end to end on the raw catalog: pass --manifest MANIFEST "
                             "(the one the store was extracted from)")
        for s in self.strategies:
            if s not in known:
                raise ValueError(f"unknown strategy {s!r}; known: {', '.join(known)}")
        for f in self.fusions:
            if f not in list_fusions():
                raise ValueError(f"unknown fusion operator {f!r}; registered: {', '.join(list_fusions())}")
        if not self.seeds:
            raise ValueError("give at least one seed")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {self.threads}")

    def cells(self) -> list[tuple[str, str | None]]:
        cells = [(s, f) for s in self.strategies if s not in BASELINES for f in self.fusions]
        extra = BASELINES if self.baselines else tuple(s for s in self.strategies if s in BASELINES)
        return cells + [(b, None) for b in extra]


def resolve_feature_sets(store, strategy: str, image_source: str | None = None,
                         text_source: str | None = None) -> list[str]:
    """The store's feature sets a strategy's cell loads (image first); heads/inputs.py decides."""
    return inputs_with_shared_rows(store, strategy, image_source, text_source)


def _provenance(info) -> dict:
    return {k: v for k, v in info.provenance.items() if k != "complete"}


def run_key(config: HeadConfig, train: TrainSettings, seed: int, manifest_sha256: str, provenance: dict) -> str:
    doc = {"config": config.to_dict(), "train": asdict(train), "seed": seed, "manifest_sha256": manifest_sha256,
           "feature_sets": provenance}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def read_runs(out_dir: str | Path) -> list[dict]:
    path = Path(out_dir) / "runs.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _non_trainable(sets: dict) -> tuple[int, str | None]:
    missing = [n for n, p in sets.items() if "parameters" not in p]
    total = sum(int(p.get("parameters", 0)) for p in sets.values())
    note = f"no 'parameters' in the provenance of {', '.join(missing)}; counted as 0" if missing else None
    return total, note


def resolve_device(name: str | None) -> torch.device:
    """None -> cuda when present, else cpu; a named device must exist here."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available here; use --device cpu")
    return device


def run_sweep(store_path: str | Path, out_dir: str | Path, settings: SweepSettings = SweepSettings(),
              *, log: Callable[[str], None] = print) -> dict:
    """Train every cell's missing seeds; returns {"trained": n, "skipped": n, "seconds": s, "cells": [...]}."""
    threads_before = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        return _run_sweep(store_path, out_dir, settings, log)
    finally:  # the thread count suits small heads only: give the caller's back (extraction wants them all)
        torch.set_num_threads(threads_before)


def _run_sweep(store_path, out_dir, settings: SweepSettings, log) -> dict:
    from embedstore.store import FeatureStore  # the store's reader contract, docs/ARCHITECTURE.md

    device = str(resolve_device(settings.device))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    done = {row["run_key"] for row in read_runs(out_dir)}
    t_start, trained, skipped, cells_done = time.perf_counter(), 0, 0, []
    with FeatureStore(store_path) as store:
        cells = settings.cells()
        names_by_strategy = {s: resolve_feature_sets(store, s) for s, _ in cells
                             if s not in END_TO_END}  # refuse before training
        sets_info = store.feature_sets
        classes, manifest = list(store.classes), store.manifest_sha256
        loaded: dict[tuple[str, ...], tuple[HeadData, dict]] = {}
        for strategy, fusion in cells:
            if strategy in END_TO_END:  # slow: the whole model on the raw catalog, one run per seed
                from heads.end_to_end import is_rank_zero, sweep_cell
                end_to_end = EndToEndSettings(**{**asdict(settings.end_to_end), "device": device})
                rows, n_skipped = sweep_cell(store, store_path, settings.manifest, out_dir, strategy, fusion,
                                             settings.seeds, end_to_end, done, log=log)
                if rows and is_rank_zero():  # under torchrun only rank 0 writes
                    with open(out_dir / "runs.jsonl", "a") as f:
                        f.writelines(json.dumps(row, sort_keys=True) + "\n" for row in rows)
                trained, skipped = trained + len(rows), skipped + n_skipped
                cells_done += [f"{strategy}-{fusion}"] if rows else []
                continue
            names = names_by_strategy[strategy]
            if strategy in BASELINES:
                modality_index = 0 if strategy == "image" or len(names) == 1 else 1
                names_used = [names[modality_index]]
            else:
                names_used = names
            provenance = {n: _provenance(sets_info[n]) for n in names_used}
            config = HeadConfig(strategy, fusion, tuple(sets_info[n].dim for n in names_used), len(classes),
                                dropout=settings.dropout)
            keys = {s: run_key(config, settings.train, s, manifest, provenance) for s in settings.seeds}
            todo = [s for s in settings.seeds if keys[s] not in done]
            skipped += len(settings.seeds) - len(todo)
            if not todo:
                log(f"{config.cell}: all {len(settings.seeds)} seeds already in {out_dir / 'runs.jsonl'}; skipped")
                continue
            if tuple(names) not in loaded:  # features -> float32 tensors on the device, once per set of sets
                data = store.load(names)
                loaded[tuple(names)] = (HeadData.from_arrays([data.features[n] for n in names], data.labels,
                                                             data.split, device),
                                        {"rows": len(data.labels), "skipped_rows": data.skipped,
                                         "split_rows": {k: int((data.split == k).sum())
                                                        for k in ("train", "val", "test")}})
            head_data, row_counts = loaded[tuple(names)]
            if strategy in BASELINES:
                i = modality_index
                head_data = HeadData(*(type(sp)([sp.inputs[i]], sp.labels)
                                       for sp in (head_data.train, head_data.val, head_data.test)))
            results = train_heads(config, todo, head_data, settings.train, batched=settings.batched)
            non_trainable, note = _non_trainable(provenance)
            rows = []
            for r in results:
                rows.append({
                    "run_key": keys[r.seed], "cell": config.cell, "strategy": strategy, "fusion": fusion,
                    "seed": r.seed, "config": config.to_dict(), "train_settings": asdict(settings.train),
                    "store": {"path": str(store_path), "manifest_sha256": manifest, "feature_sets": provenance,
                              **row_counts},
                    "test_accuracy": r.test_accuracy, "test_macro_f1": r.test_macro_f1,
                    "best_val_accuracy": r.best_val_accuracy, "best_epoch": r.best_epoch,
                    "epochs_run": r.epochs_run, "train_seconds": r.train_seconds,
                    "group_seconds": r.group_seconds, "group_size": r.group_size, "batched": settings.batched,
                    "device": device, "trainable_parameters": StackedHead(config).num_parameters(),
                    "non_trainable_parameters": non_trainable, "non_trainable_note": note,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                })
            with open(out_dir / "runs.jsonl", "a") as f:
                f.writelines(json.dumps(row, sort_keys=True) + "\n" for row in rows)
            _save_best(out_dir, config, results, rows, classes)
            trained += len(results)
            cells_done.append(config.cell)
            accs = ", ".join(f"{r.test_accuracy:.4f}" for r in results)
            log(f"{config.cell}: {len(results)} heads in {sum(r.train_seconds for r in results):.1f} s "
                f"(test accuracy {accs})")
    return {"trained": trained, "skipped": skipped, "seconds": time.perf_counter() - t_start, "cells": cells_done}


def _save_best(out_dir: Path, config: HeadConfig, results, rows, classes) -> None:
    """Keep the cell's saved head unless a new seed beats it on validation accuracy (same store features)."""
    i = max(range(len(results)), key=lambda j: (results[j].best_val_accuracy, -results[j].seed))
    best, row = results[i], rows[i]
    directory = out_dir / "heads" / config.cell
    if (directory / "config.json").exists():
        saved = json.loads((directory / "config.json").read_text())
        now = json.loads(json.dumps({"store": row["store"], "config": config.to_dict(),
                                     "train_settings": row["train_settings"]}))  # tuples -> lists, as saved
        same = all(saved.get(k) == v for k, v in now.items())
        if same and saved.get("best_val_accuracy", -1) >= best.best_val_accuracy:
            return
    head = FusionHead.from_trained(config, best.params, classes, seed=best.seed)
    head.save_pretrained(directory, metadata={
        "store": row["store"], "run_key": row["run_key"], "train_settings": row["train_settings"],
        "best_val_accuracy": best.best_val_accuracy, "test_accuracy": best.test_accuracy,
        "test_macro_f1": best.test_macro_f1, "best_epoch": best.best_epoch,
        "inputs": list(row["store"]["feature_sets"]),
    })
