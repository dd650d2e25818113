"""`heads`: fusion heads over a feature store. Commands parse options and call one library function."""
from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path

import click

from cli.common import (BF16_MEASURED, DEVICE_DEFAULT, GROUP_SETTINGS, NON_NEGATIVE, POSITIVE, FiniteFloat,
                        InputError, comma_list, int_list, one_line_errors, package_version, setting_option)


@click.group(context_settings=GROUP_SETTINGS)
@click.version_option(package_version(), "--version", prog_name="heads")
def heads():
    """Train fusion heads (strategies 1-A/1-B/2-A/2-B x fusion operators x seeds) over cached features."""


@heads.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(path_type=Path),
              help="Results directory: runs.jsonl and heads/<cell>/ (re-runs skip runs already there).")
@click.option("--strategies", default=None, show_default="every strategy the store's features allow",
              help="Comma-separated: 1A, 1B (fine-tuned modules' features), 2A, 2B (pooled backbone features); "
                   "image, text name a unimodal baseline alone; LF (late fusion), ST (stacking), LR-image, LR-text, "
                   "LR-concat (logistic regressions) over pooled features; 3A, 3B train end to end on the raw catalog "
                   "(slow, needs --manifest).")
@click.option("--fusions", default=None, show_default="every registered operator",
              help="Comma-separated fusion operators.")
@click.option("--image-source", "image_sources", multiple=True, show_default="every image source in the store",
              help="Only this image source (a feature set's source or backbone name); repeatable. Each (image, "
                   "text) source pair is swept. Sources joined by commas (efficientnet_lite0,efficientnet_lite2) "
                   "are one source: their features side by side.")
@click.option("--text-source", "text_sources", multiple=True, show_default="every text source in the store",
              help="Only this text source; repeatable; commas join sources as for --image-source.")
@setting_option("--seeds", setting="heads.sweep:SweepSettings.seeds", help="Comma-separated seeds; one head per seed.")
@setting_option("--baselines/--no-baselines", setting="heads.sweep:SweepSettings.baselines",
              help="Also train the unimodal image-only and text-only heads (Table 7).")
@click.option("--sequential", is_flag=True, help="Train one head at a time instead of all seeds of a cell at once.")
@setting_option("--group-cells/--no-group-cells", setting="heads.sweep:SweepSettings.group_cells",
              help="Stack cells of the same shape (e.g. a strategy's add, average and product) into one training "
                   "step; --no-group-cells: one step per cell, for comparison. Same rows either way.")
@click.option("--device", default=None, show_default=DEVICE_DEFAULT, help="cpu, cuda, cuda:1 ...")
@click.option("--jobs", type=POSITIVE, default=None, show_default="the cores this process may use on a CPU, 1 on CUDA",
              help="Worker processes training cells at once, one thread each. Same rows as --jobs 1.")
@setting_option("--threads", type=POSITIVE, setting="heads.sweep:SweepSettings.threads",
              help="CPU threads while training in this process (--jobs 1); 1 measured fastest for small heads.")
@setting_option("--batch-size", type=POSITIVE, setting="heads.train:TrainSettings.batch_size", help="Training rows per step of each head.")
@setting_option("--lr", setting="heads.train:TrainSettings.lr", type=FiniteFloat(min=0, min_open=True), help="AdamW learning rate.")
@setting_option("--max-epochs", type=POSITIVE, setting="heads.train:TrainSettings.max_epochs",
              help="Most epochs of a head (early stopping may end it sooner).")
@setting_option("--patience", type=POSITIVE, setting="heads.train:TrainSettings.patience",
              help="Epochs without a better validation accuracy.")
@setting_option("--class-weight", type=click.Choice(["none", "balanced"]), setting="heads.train:TrainSettings.class_weight",
              help="balanced: weigh each class n / (C * n_class) in the loss, for imbalanced catalogs.")
@setting_option("--precision", type=click.Choice(["auto", "bf16", "fp32"]), setting="heads.train:TrainSettings.precision",
              help=f"auto: bf16 autocast on CUDA, float32 on CPU (see docs/sweeps.md, Precision). {BF16_MEASURED}.")
@click.option("--manifest", type=click.Path(path_type=Path), default=None,
              help="3A/3B: the manifest the store was extracted from (they train end to end on the raw catalog, "
                   "with the backbones named in the store's provenance).")
@setting_option("--end-to-end-epochs", type=POSITIVE, setting="heads.end_to_end:EndToEndSettings.max_epochs", help="3A/3B: most epochs.")
@click.option("--max-steps-per-epoch", type=POSITIVE, default=None, show_default="whole epochs",
              help="3A/3B: stop each epoch after this many steps (the full epoch's time is extrapolated).")
@click.option("--memory-budget", default=None, metavar="SIZE", show_default="half the available memory",
              help="Memory the features may take, e.g. 1GB or 512MiB; larger feature sets are streamed from the "
                   "store in row blocks.")
@setting_option("--progress/--no-progress", setting="heads.sweep:SweepSettings.progress", help="Progress bars on stderr.")
@click.option("--verbose", is_flag=True, help="Also print where it ran (jobs, ranks, device) and the GFLOP/s its "
                                              "training matmuls reached beside a matmul peak measured now.")
@one_line_errors
def sweep(store, out, strategies, fusions, image_sources, text_sources, seeds, baselines, sequential, group_cells,
          device, jobs,
          threads, batch_size, lr, max_epochs, patience, class_weight, precision, manifest, end_to_end_epochs,
          max_steps_per_epoch, memory_budget, progress, verbose):
    """Train the grid over STORE; one JSON row per run in OUT/runs.jsonl, best head per cell in OUT/heads/.

    On several machines: `torchrun --nnodes M --nproc_per_node K -m cli.heads sweep ...` deals the cells to the
    ranks; rank 0 writes every row."""
    from embedstore.streaming import parse_memory_size
    from heads.dispatch import world
    from heads.end_to_end import EndToEndSettings
    from heads.sweep import SweepSettings, run_sweep
    from heads.throughput import throughput_line
    from heads.train import TrainSettings

    settings = SweepSettings(
        memory_budget=None if memory_budget is None else parse_memory_size(memory_budget),
        strategies=tuple(comma_list(strategies)) if strategies else None,
        fusions=tuple(comma_list(fusions)) if fusions else None, seeds=int_list(seeds, "--seeds"),
        image_sources=image_sources, text_sources=text_sources,
        baselines=baselines, batched=not sequential, group_cells=group_cells, device=device, jobs=jobs,
        threads=threads, progress=progress, measure_peak=verbose,
        train=TrainSettings(batch_size=batch_size, lr=lr, max_epochs=max_epochs, patience=patience,
                            precision=precision, class_weight=None if class_weight == "none" else class_weight),
        manifest=str(manifest) if manifest else None,
        end_to_end=EndToEndSettings(max_epochs=end_to_end_epochs, max_steps_per_epoch=max_steps_per_epoch))
    summary = run_sweep(store, out, settings, log=click.echo)
    if world()[0] != 0:   # under torchrun rank 0 records every rank's rows: its summary is the sweep's
        return
    for line in sweep_summary_lines(summary, out):
        click.echo(line)
    if not verbose:
        return
    click.echo(f"ran on {summary['device']}: {summary['jobs']} job(s), {summary['ranks']} rank(s)")
    if line := throughput_line(summary):
        click.echo(line)


# what a sweep's summary calls each trainer's models (heads/strategies.py TRAINERS); always plural, as the
# line has always read "trained N heads, skipped M ..." and scripts look for it
KIND_NAMES = {"head": "heads", "linear": "decision-level models", "end-to-end": "end-to-end models"}


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def sweep_summary_lines(summary: dict, out: Path) -> list[str]:
    """The closing lines of `heads sweep`: models trained by kind, skipped, wall time; the sweep's best model by
    validation (its validation and test accuracy, and where it is saved)."""
    by_kind = summary.get("trained_by_kind") or {}
    kinds = [f"{by_kind[k]} {KIND_NAMES.get(k, k)}" for k in KIND_NAMES if by_kind.get(k)]
    trained = " and ".join([", ".join(kinds[:-1]), kinds[-1]] if len(kinds) > 1 else kinds) or "0 models"
    lines = [f"trained {trained}, skipped {summary['skipped']} already in {out / 'runs.jsonl'}, in "
             f"{_duration(summary['seconds'])}"]
    best = summary.get("best")
    if best:
        lines.append(f"best by validation: {best['cell']} (seed {best['seed']}): validation "
                     f"{100 * best['val_accuracy']:.2f} %, test {100 * best['test_accuracy']:.2f} %; its cell's best "
                     f"seed is saved in {out / 'heads'}")
    return lines


@heads.command()
@click.argument("results", type=click.Path(path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(path_type=Path),
              help="Directory for report.md, the tables as CSV and the bar charts (PNG).")
@one_line_errors
def report(results, out):
    """Render RESULTS/runs.jsonl as Tables 5-7 (Markdown + CSV) and bar charts."""
    from heads.report import write_report

    for path in write_report(results, out):
        click.echo(str(path))


@heads.command()
@click.argument("results", nargs=-1, required=True, type=click.Path(path_type=Path))
@setting_option("--top-k", "top_k", setting="heads.ensemble:ensemble.top_k",
              help="How many saved models, best recorded validation accuracy first; auto: the k in 1..N with the "
                   "best ensemble validation accuracy (ties: the smaller k).")
@click.option("--multimodal-only", is_flag=True, help="Leave the unimodal baselines out of the pool.")
@click.option("--only", "only", default=None, metavar="PATTERNS", show_default="every saved model",
              help="Only the saved models whose cell (or path under the first RESULTS) matches one of these "
                   "comma-separated shell patterns, e.g. '2A-*,LF'.")
@setting_option("--select", "select", setting="heads.ensemble:ensemble.select",
              help="Rank members and choose k by: validation (recorded validation accuracy), or cv:K (K-fold "
                   "cross-validation on train + validation, each member refit K times; docs/sweeps.md).")
@one_line_errors
def ensemble(results, top_k, multimodal_only, only, select):
    """Average the class probabilities of the top-k saved heads of RESULTS (one or more `heads sweep` folders,
    aligned by item id), score them on validation and test, and append a row to the first RESULTS'
    ensembles.jsonl (a rerun over the same members and stores skips)."""
    from heads.ensemble import ensemble as run_ensemble, format_summary

    row = run_ensemble(list(results), top_k, multimodal_only=multimodal_only, select=select, only=only,
                       log=click.echo)
    click.echo(format_summary(row))
    if not row["already_recorded"]:
        click.echo(f"row appended to {results[0] / 'ensembles.jsonl'}")


@heads.command()
@click.argument("results", nargs=-1, required=True, type=click.Path(path_type=Path))
@setting_option("--select", "select", setting="heads.select:select_model.select",
              help="cv:K: K-fold cross-validation on train + validation (each saved model refit K times).")
@click.option("--multimodal-only", is_flag=True, help="Leave the unimodal baselines out.")
@click.option("--only", "only", default=None, metavar="PATTERNS", show_default="every saved model",
              help="Only the saved models whose cell (or path under the first RESULTS) matches one of these "
                   "comma-separated shell patterns, e.g. '2A-*,LF'.")
@click.option("--device", default=None, show_default=DEVICE_DEFAULT, help="Where the refits train: cpu, cuda, cuda:N.")
@one_line_errors
def select(results, select, multimodal_only, only, device):
    """The best saved model of RESULTS chosen by validation and by cross-validation, each with its validation,
    CV and test accuracy (test never chooses)."""
    from heads.select import format_selection_table, select_model

    doc = select_model(list(results), select, multimodal_only=multimodal_only, only=only, device=device,
                       log=click.echo)
    click.echo(format_selection_table(doc))


@heads.command()
@click.argument("head_dir", type=click.Path(path_type=Path))
@click.argument("inputs", metavar="INPUT", type=click.Path(path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(path_type=Path),
              help="CSV to write: id, label_k, probability_k for k = 1..--top-labels, reason (empty when predicted).")
@setting_option("--top-labels", setting="pipelines.predict_sources:PredictSettings.top_k", type=POSITIVE, help="Most probable categories per row.")
@click.option("--top-k", "top_k_alias", default=None, type=POSITIVE, hidden=True,
              help="Deprecated name of --top-labels (--top-k means models in `heads ensemble`).")
@setting_option("--batch-size", setting="pipelines.predict_sources:PredictSettings.batch_size", type=POSITIVE, help="Rows per forward pass.")
@click.option("--device", default=None, show_default=DEVICE_DEFAULT, help="cpu, cuda, cuda:1 ...")
@click.option("--image-weights", type=click.Path(path_type=Path),
              help="The image backbone's weights file, when it is not in its standard places (pooled heads).")
@click.option("--text-weights", type=click.Path(path_type=Path),
              help="The text backbone's Hugging Face folder, likewise.")
@click.option("--id-column", default=None, show_default="id when present, else the row number",
              help="Input CSV: the id column.")
@setting_option("--image-column", setting="pipelines.predict_sources:InputColumns.image",
              help="Input CSV: image path column (relative to the CSV's folder, or absolute).")
@setting_option("--title-column", setting="pipelines.predict_sources:InputColumns.title", help="Input CSV: title column.")
@setting_option("--workers", setting="pipelines.predict_sources:PredictSettings.workers", type=NON_NEGATIVE, help="DataLoader processes decoding images.")
@one_line_errors
def predict(head_dir, inputs, out, top_labels, top_k_alias, batch_size, device, image_weights, text_weights,
            id_column, image_column, title_column, workers):
    """Classify the products in INPUT (a CSV of image paths and titles, or a catalog) with the saved head in
    HEAD_DIR (RESULTS/heads/<cell> from `heads sweep`), rebuilding and checking its backbones or modules, or with
    a trained 3-A/3-B model (HEAD_DIR = RESULTS/end_to_end/<cell>/seed-<seed>: images and titles through it)."""
    from pipelines.predict import predict_products
    from pipelines.predict_sources import InputColumns, PredictSettings

    if not inputs.exists():  # before the head and its backbones load (tens of seconds)
        raise InputError(f"input not found: {inputs}; pass a CSV with image and title columns, or a catalog "
                         "folder or zip")
    if top_k_alias is not None:  # the old name still works, with a one-line notice
        context = click.get_current_context()
        if context.get_parameter_source("top_labels") is not click.core.ParameterSource.DEFAULT:
            raise InputError("--top-k is the old name of --top-labels: give one of them")
        click.echo("Note: `heads predict --top-k` is now --top-labels (--top-k means models in `heads ensemble`)",
                   err=True)
        top_labels = top_k_alias
    settings = PredictSettings(
        top_k=top_labels, batch_size=batch_size, device=device, workers=workers,
        image_weights=str(image_weights) if image_weights else None,
        text_weights=str(text_weights) if text_weights else None,
        columns=InputColumns(id=id_column, image=image_column, title=title_column))
    with _sigterm_stops_cleanly(f"{out} was not written (no partial file left behind)"):
        summary = predict_products(head_dir, inputs, out, settings)
    click.echo(summary.format())


class _Terminated(BaseException):
    """Raised in the main thread by SIGTERM: a BaseException, like KeyboardInterrupt, so that no library
    `except Exception` takes it for an error of its own and carries on."""


class TerminatedError(click.ClickException):
    exit_code = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM


@contextlib.contextmanager
def _sigterm_stops_cleanly(outcome: str):
    """SIGTERM (`kill`, a scheduler stopping a job) ends the command like Ctrl-C does, through every cleanup on
    the way out (an output's .partial file and lock removed), instead of killing the process mid-write. Then one
    line, `outcome`, and exit status 143. Ctrl-C itself stays click's: "Aborted!", status 1."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    received = []

    def stop(signum, frame):
        received.append(signum)
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    except BaseException:
        if received:  # whatever the signal interrupted (a DataLoader worker ended by it too, say), it was the signal
            raise TerminatedError(f"stopped by SIGTERM; {outcome}") from None
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


main = heads

if __name__ == "__main__":
    main()
