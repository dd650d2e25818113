"""`heads sweep`: the grid of strategies x backbone pairs x fusion operators x seeds (+ unimodal baselines).

Results are data: one JSON row per run in RESULTS/runs.jsonl, appended as each cell finishes, so an
interrupted sweep resumes. A run whose key (head config + training settings + seed + the store's manifest hash
+ the feature sets' provenance) is already there is skipped. The best head of each cell (by validation
accuracy, never by test) is saved in RESULTS/heads/<cell>/. Which cells exist is heads/grid.py's business;
where they train (this process, `--jobs` workers, torchrun ranks) is heads/dispatch.py's.
"""
from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from embedstore.defaults import resolve_device
from embedstore.streaming import default_memory_budget
from heads.dispatch import (RankGroup, Task, group_tasks, my_tasks, rounds, run_tasks, worker_pool,
                            world)
from heads.end_to_end import EndToEndSettings
from heads.fusion import list_fusions
from heads.decision import LinearSettings
from heads.grid import Cell, build_grid, decision_cells, without_sets_being_written
from heads.inputs import inputs_with_shared_rows
from heads.joined import open_store
from heads.models import HeadConfig, StackedHead
from heads.context import RunContext
from heads.strategies import get_strategy, list_strategies
from heads.throughput import matmul_peak_gflops
from heads.streamed import SweepData
from heads.results import ResultsLock, append_rows, best_of_sweep, read_runs
from heads.rows import cell_fields, non_trainable, provenance, result_row, run_key, store_doc
from heads.saved import head_folder, save_best
from heads.sweep_decisions import DecisionThread, fit_decisions, plan_decisions
from heads.sweep_summary import KEYS, count, new_summary, seeds_to_run
from heads.train import HeadResult, TrainSettings



@dataclass(frozen=True)
class SweepSettings:
    strategies: tuple[str, ...] | None = None   # None: every strategy the store's features allow
    fusions: tuple[str, ...] | None = None      # None: every registered fusion operator
    seeds: tuple[int, ...] = (0, 1, 2)
    baselines: bool = True                # also train the unimodal "image" and "text" heads (Table 7)
    image_sources: tuple[str, ...] = ()   # only these image sources (names or backbones); () = every one
    text_sources: tuple[str, ...] = ()
    batched: bool = True                  # all seeds of a cell in one stack; False: one head at a time
    # also stack cells of the same shape (operators, not only seeds; heads/groups.py) into one step; same rows
    group_cells: bool = True
    device: str | None = None             # None: cuda when available, else cpu
    jobs: int | None = None               # worker processes, one thread each; None: the cores we may use
    # torch.set_num_threads while training in this process (jobs = 1). 1 by default: on this project's 2-vCPU
    # machines one thread measured 0.4-0.5 s per 2-A/2-B head-epoch and two threads 1.1-9.5 s (OpenMP barriers
    # stall whenever the other vCPU is busy); more cores are used through `jobs`, not threads.
    threads: int | None = 1
    dropout: float = 0.3
    train: TrainSettings = field(default_factory=TrainSettings)
    manifest: str | None = None           # 3A/3B train end to end on the raw catalog through this manifest
    end_to_end: EndToEndSettings = field(default_factory=EndToEndSettings)  # their training (heads/end_to_end.py)
    linear: LinearSettings = field(default_factory=LinearSettings)  # LF, ST, LR-* (heads/decision.py)
    progress: bool = True
    # bytes the features of a cell may take in memory; beyond it heads stream them from the store (heads/streamed.py).
    # None: half of the memory available when the sweep starts
    memory_budget: int | None = None
    # after training, time a short matmul on the sweep's cores to set its GFLOP/s against (`heads sweep --verbose`,
    # benchmarks): about a second of both cores, so a sweep that prints no throughput line does not pay for it
    # (measured on every sweep before, it was a tenth of the test suite's CPU time)
    measure_peak: bool = False

    def __post_init__(self):
        known = list_strategies()
        for name in ("strategies", "fusions"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))
        if self.strategies is not None:
            for s in self.strategies:
                if s not in known:
                    raise ValueError(f"unknown strategy {s!r}; known: {', '.join(known)}")
            if not self.strategies:
                raise ValueError("give at least one strategy")
            end_to_end = [s for s in self.strategies if get_strategy(s).trainer == "end-to-end"]
            if end_to_end and not self.manifest:
                raise ValueError(f"strategies {'/'.join(end_to_end)} train end to end on the raw catalog: pass "
                                 "--manifest MANIFEST (the one the store was extracted from)")
        for f in self.fusions or ():
            if f not in list_fusions():
                raise ValueError(f"unknown fusion operator {f!r}; registered: {', '.join(list_fusions())}")
        if not self.seeds:
            raise ValueError("give at least one seed")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {self.threads}")
        if self.jobs is not None and self.jobs < 1:
            raise ValueError(f"--jobs must be at least 1, got {self.jobs}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")


def resolve_feature_sets(store, strategy: str, image_source: str | None = None,
                         text_source: str | None = None) -> list[str]:
    """The store's feature sets a strategy's cell loads (image first); heads/inputs.py decides."""
    return inputs_with_shared_rows(store, strategy, image_source, text_source)


def run_sweep(store_path: str | Path, out_dir: str | Path, settings: SweepSettings = SweepSettings(),
              *, log: Callable[[str], None] = print) -> dict:
    """Train every cell's missing seeds; returns {"trained", "trained_by_kind", "skipped", "seconds", "best",
    "cells", "notes", "gflops", "peak_gflops" (with `measure_peak`), ...}. `trained_by_kind`: models trained per
    trainer ("head", "linear", "end-to-end"); `best`: the sweep's best model by validation (`best_of_sweep`), None
    when it has none."""
    threads_before = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        return _run_sweep(Path(store_path), Path(out_dir), settings, log)
    finally:  # the thread count suits small heads only: give the caller's back (extraction wants them all)
        torch.set_num_threads(threads_before)


def _run_sweep(store_path: Path, out_dir: Path, settings: SweepSettings, log) -> dict:
    from embedstore.outputs import check_writable

    check_writable(out_dir, folder=True)  # before any work, and as one line naming the path
    _refuse_one_class(store_path)
    with contextlib.ExitStack() as stack:
        device, group = resolve_device(settings.device), None
        if world()[1] > 1:  # under torchrun: join the ranks (gloo on CPU, nccl on CUDA), leave on the way out
            from embedstore.training import training_processes
            device, _ = stack.enter_context(training_processes(settings.device))
            group = RankGroup()
        if world()[0] == 0:  # one sweep per results folder: a second refuses in one line; rank 0 is the writer
            stack.enter_context(ResultsLock(out_dir))
        # every rank decides in memory / streamed (and so the run keys) with rank 0's budget, so all deal alike
        budget = settings.memory_budget
        if group is not None:
            budget = group.broadcast(default_memory_budget() if budget is None else budget)
        context = RunContext.resolve(device, precision=settings.train.precision, jobs=settings.jobs,
                                     memory_budget=budget)
        return _sweep_ranks(store_path, out_dir, settings, context, group, log)


def _refuse_one_class(store_path: Path) -> None:
    """A store of one class has nothing to classify: say so in one line before any work, instead of training every
    head and failing in scikit-learn (LR, ST) at the end of the sweep, on every rerun."""
    from embedstore.store import FeatureStore

    with FeatureStore(store_path) as store:
        classes = list(store.classes)
    if len(classes) < 2:
        held = f"one class ({classes[0]!r})" if classes else "no classes"
        raise ValueError(f"{store_path} holds {held}: nothing to classify; prepare a manifest from a catalog with at "
                         "least two classes (`embed prepare`) and extract a store from it")


def _sweep_ranks(store_path: Path, out_dir: Path, settings: SweepSettings, context: RunContext, group, log) -> dict:
    rank, size = world()
    device, jobs = context.device, context.jobs
    out_dir.mkdir(parents=True, exist_ok=True)
    done = {row["run_key"] for row in read_runs(out_dir)} if rank == 0 else None
    done = group.broadcast(done) if group else done
    t_start = time.perf_counter()
    summary = new_summary(jobs=jobs, ranks=size, device=device)
    # joined sources ("a,b": heads/joined.py) read as one more source of their modality
    joins = {"image": settings.image_sources, "text": settings.text_sources}
    with open_store(store_path, joins) as store:
        cells, notes = build_grid(store, strategies=_cached(settings.strategies), fusions=settings.fusions,
                                  baselines=settings.baselines, image_sources=settings.image_sources,
                                  text_sources=settings.text_sources)
        decisions, more = decision_cells(store, strategies=settings.strategies, baselines=settings.baselines,
                                         image_sources=settings.image_sources, text_sources=settings.text_sources)
        notes += more
        cells, decisions, more = without_sets_being_written(store, cells, decisions, settings.image_sources,
                                                            settings.text_sources)
        notes += more
        summary["notes"] = notes
        for note in notes:
            log(note)
        data = SweepData(store, device, context.memory_budget, log)
        tasks = _tasks(store, cells, settings, done, summary, log, out_dir, data)
        # a group of cells (heads/groups.py) is the unit of dispatch: one stack, one worker or rank
        mine = my_tasks(group_tasks(tasks, enabled=settings.group_cells and settings.batched), rank, size)
        # decision-level models: planned now (their skips counted) so that one bar counts every model of the sweep
        planned = plan_decisions(store, decisions, settings, done, summary, log, out_dir) if rank == 0 else []
        end_to_end = _of_trainer(settings.strategies, "end-to-end")
        # end to end: at most this many (their skips are known only per cell; the total shrinks by them)
        n_end_to_end = len(end_to_end) * len(settings.fusions or list_fusions()) * len(settings.seeds)
        bar = tqdm(total=sum(len(t.seeds) for g in mine for t in g) + sum(len(p[3]) for p in planned) + n_end_to_end,
                   unit="model", desc="heads sweep", disable=not settings.progress or rank != 0, leave=False,
                   dynamic_ncols=True)
        # streamed cells read the store in this process (an open HDF5 file does not travel to workers); a
        # group's cells share their rows, so its first decides
        streamed = [g for g in mine if data.streamed(g[0])]
        in_memory = [g for g in mine if not data.streamed(g[0])]
        common = dict(data_for=data.for_task, train=settings.train, batched=settings.batched,
                      precision=context.precision)
        decide = (store, store_path, out_dir, planned, settings, data, device, summary, log, bar)
        if group is None:  # write as each cell finishes, so a killed sweep resumes from here
            lock = threading.Lock()   # runs.jsonl, the summary and the bar, shared with the DecisionThread
            beside = planned and jobs > 1 and in_memory   # the workers train the heads: this process is free
            for cell, *_ in planned if beside else ():    # their rows, loaded here before the thread reads them
                data.rows(cell)
            with DecisionThread(fit_decisions, *decide, lock=lock) if beside else contextlib.nullcontext():
                for task, results in _chain(run_tasks(in_memory, jobs=jobs, **common),
                                            run_tasks(streamed, jobs=1, **common)):
                    with lock:
                        bar.update(len(results))
                        _record(out_dir, store, store_path, task, results, settings, device, data, summary, log)
            planned = [] if beside else planned
        else:  # rounds (heads/dispatch.py): rank 0 records each round's results of every rank before the next
            by_name = {t.cell.name: t for t in tasks}
            mine_rounds = rounds(in_memory, streamed, jobs)
            # every rank takes part in every gather: a rank with fewer rounds sends empty ones
            n_rounds = group.agree_max(len(mine_rounds))
            with worker_pool(min(jobs, len(in_memory))) as pool:
                for k in range(n_rounds):
                    groups, round_jobs = mine_rounds[k] if k < len(mine_rounds) else ([], 1)
                    finished = []
                    for task, results in run_tasks(groups, jobs=round_jobs, pool=pool, **common):
                        bar.update(len(results))
                        finished.append((task.cell.name, results))
                    gathered = group.gather(finished)
                    for name, results in (pair for part in gathered or [] for pair in part):   # rank 0 only
                        _record(out_dir, store, store_path, by_name[name], results, settings, device, data,
                                summary, log)
            summary["rounds"], summary["gather_seconds"] = n_rounds, group.waited
        if rank == 0 and planned:   # decision-level models fit in this process; under torchrun rank 0 alone
            fit_decisions(*decide)
        if end_to_end:
            _end_to_end(store, store_path, out_dir, settings, context, done, summary, log, bar)
        bar.close()
    seconds = time.perf_counter() - t_start
    summary["seconds"] = seconds
    keys = summary.pop(KEYS)
    summary["best"] = best_of_sweep(out_dir, keys) if rank == 0 else None
    if summary["trained"]:
        precision = context.precision
        summary["precision"] = precision
        summary["gflops"] = summary["train_flops"] / seconds / 1e9
        if settings.measure_peak:
            summary["peak_gflops"] = matmul_peak_gflops(device, precision,
                                                        threads=jobs if device.type == "cpu" else 1)
    return summary


def _chain(*iterators):
    for iterator in iterators:
        yield from iterator


def _of_trainer(strategies, trainer: str) -> tuple[str, ...]:
    return tuple(s for s in strategies or () if get_strategy(s).trainer == trainer)


def _cached(strategies):
    return None if strategies is None else _of_trainer(strategies, "head")


def _tasks(store, cells: list[Cell], settings: SweepSettings, done: set, summary: dict, log, out_dir,
           data: SweepData) -> list[Task]:
    """The cells' missing seeds, in grid order; cells with nothing left are logged and counted as skipped."""
    sets, classes, manifest = store.feature_sets, store.classes, store.manifest_sha256
    tasks = []
    for cell in cells:
        feature_sets = {n: provenance(sets[n]) for n in cell.feature_sets}
        config = HeadConfig(cell.strategy, cell.fusion, tuple(sets[n].dim for n in cell.feature_sets), len(classes),
                            dropout=settings.dropout)
        access = data.access(cell)
        keys = {s: run_key(config=config.to_dict(), train=asdict(settings.train), seed=s, manifest_sha256=manifest,
                           feature_sets=feature_sets, access=access) for s in settings.seeds}
        todo = seeds_to_run(cell, keys, done, summary, log, out_dir)
        if todo:
            tasks.append(Task(cell, config, todo, keys))
    return tasks


def _record(out_dir: Path, store, store_path: Path, task: Task, results: list[HeadResult], settings: SweepSettings,
            device, data: SweepData, summary: dict, log) -> None:
    """The cell's best head first, then its rows: a crash between the two leaves a head and no rows (the runs
    train again), never rows without their head."""
    cell, config = task.cell, task.config
    store_info = store_doc(store, store_path, out_dir, cell.feature_sets, data.counts(cell))
    non_trainable_parameters, note = non_trainable(store_info["feature_sets"])
    rows = [result_row(
        run_key=task.keys[r.seed], names=cell_fields(cell), seed=r.seed, config=config.to_dict(),
        train_settings=asdict(settings.train), store=store_info,
        test_accuracy=r.test_accuracy, test_macro_f1=r.test_macro_f1, best_val_accuracy=r.best_val_accuracy,
        best_epoch=r.best_epoch, epochs_run=r.epochs_run, diverged=r.diverged,
        train_seconds=r.train_seconds, group_seconds=r.group_seconds, group_size=r.group_size,
        batched=settings.batched, device=str(device), precision=r.precision, train_flops=r.train_flops,
        trainable_parameters=StackedHead(config).num_parameters(),
        non_trainable_parameters=non_trainable_parameters, non_trainable_note=note) for r in results]
    classes = list(store.classes)

    def save(i: int, metadata: dict) -> None:
        from heads.estimator import FusionHead   # here: the estimator imports scikit-learn, and only rank 0 saves

        best = results[i]
        FusionHead.from_trained(config, best.params, classes, seed=best.seed).save_pretrained(
            head_folder(out_dir, cell), metadata=metadata)

    save_best(out_dir, head_folder(out_dir, cell), rows, save, recorded=("best_epoch", "precision"))
    append_rows(out_dir, rows)
    count(summary, "head", len(results))
    summary["train_flops"] += sum(r.train_flops for r in results)
    summary["cells"].append(cell.name)
    accs = ", ".join("diverged" if r.diverged else f"{r.test_accuracy:.4f}" for r in results)
    log(f"{cell.name}: {len(results)} heads in {sum(r.train_seconds for r in results):.1f} s "
        f"(test accuracy {accs})")


def _end_to_end(store, store_path, out_dir, settings: SweepSettings, context: RunContext, done, summary, log,
                bar) -> None:
    """3A/3B: the whole model on the raw catalog, one run per seed (slow; heads/end_to_end.py), on the sweep's
    device and with its --precision (the user's word: "auto" stays out of their run keys, as before it existed)."""
    from heads.end_to_end import is_rank_zero, sweep_cell
    end_to_end = EndToEndSettings(**{**asdict(settings.end_to_end), "device": str(context.device),
                                     "precision": settings.train.precision})
    for strategy in _of_trainer(settings.strategies, "end-to-end"):
        for fusion in settings.fusions or list_fusions():
            rows, n_skipped = sweep_cell(store, store_path, settings.manifest, out_dir, strategy, fusion,
                                         settings.seeds, end_to_end, done, log=log)
            if rows and is_rank_zero():  # under torchrun only rank 0 writes
                append_rows(out_dir, rows)
            count(summary, "end-to-end", len(rows))
            summary[KEYS].update(r["run_key"] for r in rows)   # its skipped keys are sweep_cell's own
            summary["skipped"] += n_skipped
            bar.total -= n_skipped   # the bar counted every seed of the cell
            bar.update(len(rows))
            summary["cells"] += [f"{strategy}-{fusion}"] if rows else []
