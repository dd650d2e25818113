"""Decision-level models (LF, ST, LR-*: heads/decision.py) in a sweep: planned with the heads (their skips counted,
one progress bar), then fit in the sweep's process, beside the heads' `--jobs` workers when there are some
(DecisionThread), else after them.
"""
from __future__ import annotations

import contextlib
import threading
from pathlib import Path

from heads.decision import DecisionFits, cell_rows, model_config, stacking_folds
from heads.results import append_rows
from heads.rows import cell_fields, non_trainable, provenance, run_key, store_doc
from heads.saved import head_folder, save_best
from heads.strategies import get_strategy
from heads.sweep_summary import count, seeds_to_run


def plan_decisions(store, cells: list, settings, done, summary: dict, log, out_dir: Path) -> list[tuple]:
    """(cell, config, run keys, seeds to fit) of each decision-level cell with seeds left; the rest skipped."""
    sets, classes, train = store.feature_sets, list(store.classes), settings.linear.to_dict()
    planned = []
    for cell in cells:
        feature_sets = {n: provenance(sets[n]) for n in cell.feature_sets}
        config = model_config(cell.strategy, tuple(sets[n].dim for n in cell.feature_sets), len(classes))
        keys = {s: run_key(config=config, train=train, seed=s, manifest_sha256=store.manifest_sha256,
                           feature_sets=feature_sets) for s in settings.seeds}
        todo = seeds_to_run(cell, keys, done, summary, log, out_dir)
        if todo:
            planned.append((cell, config, keys, todo))
    return planned


def fit_decisions(store, store_path: Path, out_dir: Path, planned: list[tuple], settings, data, device,
                  summary: dict, log, bar, *, lock=contextlib.nullcontext(), stop: threading.Event | None = None
                  ) -> None:
    """LF, ST, LR-*: logistic regressions over pooled features (heads/decision.py), fit in this process on the
    sweep's device; the per-modality regressions are fit once per row set and shared by the cells and seeds
    that use them. `lock` guards what the heads' recording shares (runs.jsonl, the summary, the bar) when this
    runs beside them (DecisionThread); `stop`, once set, ends it after the cell being fit."""
    sets, classes, fits = store.feature_sets, list(store.classes), {}
    train = settings.linear.to_dict()
    for cell, config, keys, todo in planned:
        if stop is not None and stop.is_set():
            return
        with lock:
            bar.set_postfix_str(f"fitting {cell.name}", refresh=True)
        if cell.row_sets not in fits:
            columns = {sets[n].modality: i for i, n in enumerate(cell.row_sets)}
            fits[cell.row_sets] = DecisionFits(data.rows(cell), columns, len(classes), settings.linear, device=device)
        if get_strategy(cell.strategy).combine == "stack":   # stratified folds need train rows of every class
            folds, why = stacking_folds(fits[cell.row_sets].splits["train"][1], settings.linear.folds, classes)
            with lock:
                if why:
                    note = f"{'skipped ' if folds < 2 else ''}{cell.name}: {why}"
                    summary["notes"].append(note)
                    log(note)
                if folds < 2:   # recorded as a note, never as rows: a rerun says it again instead of failing
                    bar.total -= len(todo)
            if folds < 2:
                continue
        store_info = store_doc(store, store_path, out_dir, cell.feature_sets, data.counts(cell))
        non_trainable_parameters, note = non_trainable(store_info["feature_sets"])
        common = {"names": cell_fields(cell), "config": config, "train_settings": train, "store": store_info,
                  "non_trainable_parameters": non_trainable_parameters, "non_trainable_note": note}
        rows, models = cell_rows(fits[cell.row_sets], cell.strategy, todo, keys, common, classes,
                                 on_row=lambda _: _locked(lock, bar.update, 1))
        directory = head_folder(out_dir, cell)
        save_best(out_dir, directory, rows, lambda i, metadata: models[i].save_pretrained(directory, metadata=metadata),
                  recorded=("seed", "config", "chosen"))
        with lock:
            append_rows(out_dir, rows)
            count(summary, "linear", len(rows))
            summary["cells"].append(cell.name)
            accs = ", ".join(f"{r['test_accuracy']:.4f}" for r in rows)
            log(f"{cell.name}: {len(rows)} models in {sum(r['train_seconds'] for r in rows):.1f} s (test accuracy "
                f"{accs})")
    with lock:
        bar.set_postfix_str("", refresh=False)


def _locked(lock, function, *args):
    with lock:
        return function(*args)


class DecisionThread:
    """The decision-level models fit in a thread of the sweep's process while its `--jobs` workers train the heads:
    the regressions use one core, which the sweep's process leaves idle while it waits for the workers, so the
    default grid ends about when its heads do instead of after them. Rows, models and their order in runs.jsonl
    per cell are the same as fit after the heads (each cell's rows are appended whole, under the sweep's lock).

        with DecisionThread(fit_decisions, *args, lock=lock):   # joined on the way out; its error raised there
            ...train the heads...
    """

    def __init__(self, fit, *args, lock, **kwargs):
        self.stop, self.error = threading.Event(), None

        def run():
            try:
                fit(*args, lock=lock, stop=self.stop, **kwargs)
            except BaseException as error:   # raised in the sweep's thread by __exit__
                self.error = error

        self.thread = threading.Thread(target=run, name="decision-level models", daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, kind, error, traceback):
        if error is not None:   # the heads failed or were stopped: end after the cell being fit, write no more
            self.stop.set()
        self.thread.join()
        if error is None and self.error is not None:
            raise self.error
        return False
