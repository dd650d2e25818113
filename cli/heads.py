"""`heads`: fusion heads over a feature store. Commands parse options and call one library function."""
from __future__ import annotations

from pathlib import Path

import click

from cli.common import comma_list, one_line_errors


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def heads():
    """Train fusion heads (strategies 1-A/1-B/2-A/2-B x fusion operators x seeds) over cached features."""


def _seeds(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in comma_list(text))
    except ValueError:
        raise ValueError(f"--seeds takes comma-separated integers, got {text!r}") from None


@heads.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(path_type=Path),
              help="Results directory: runs.jsonl and heads/<cell>/ (re-runs skip runs already there).")
@click.option("--strategies", default="1A,1B,2A,2B", show_default=True,
              help="Comma-separated: 1A, 1B (fine-tuned modules' features), 2A, 2B (pooled backbone features); "
                   "image, text name a unimodal baseline alone; "
                   "3A, 3B train end to end on the raw catalog (slow, needs --manifest).")
@click.option("--fusions", default="add,average,product,concat,gated", show_default=True,
              help="Comma-separated fusion operators.")
@click.option("--seeds", default="0,1,2", show_default=True, help="Comma-separated seeds; one head per seed.")
@click.option("--baselines/--no-baselines", default=True, show_default=True,
              help="Also train the unimodal image-only and text-only heads (Table 7).")
@click.option("--sequential", is_flag=True, help="Train one head at a time instead of all seeds of a cell at once.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... [default: cuda if available, else cpu]")
@click.option("--threads", type=int, default=None, help="torch.set_num_threads for the CPU.")
@click.option("--batch-size", default=128, show_default=True)
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--max-epochs", default=40, show_default=True)
@click.option("--patience", default=5, show_default=True, help="Epochs without a better validation accuracy.")
@click.option("--manifest", type=click.Path(path_type=Path), default=None,
              help="3A/3B: the manifest the store was extracted from (they train end to end on the raw catalog, "
                   "with the backbones named in the store's provenance).")
@click.option("--end-to-end-epochs", type=int, default=10, show_default=True, help="3A/3B: most epochs.")
@click.option("--max-steps-per-epoch", type=int, default=None,
              help="3A/3B: stop each epoch after this many steps (the full epoch's time is extrapolated).")
@one_line_errors
def sweep(store, out, strategies, fusions, seeds, baselines, sequential, device, threads, batch_size, lr,
          max_epochs, patience, manifest, end_to_end_epochs, max_steps_per_epoch):
    """Train the grid over STORE; one JSON row per run in OUT/runs.jsonl, best head per cell in OUT/heads/."""
    from heads.end_to_end import EndToEndSettings
    from heads.sweep import SweepSettings, run_sweep
    from heads.train import TrainSettings

    settings = SweepSettings(
        strategies=tuple(comma_list(strategies)), fusions=tuple(comma_list(fusions)), seeds=_seeds(seeds),
        baselines=baselines, batched=not sequential, device=device, threads=threads,
        train=TrainSettings(batch_size=batch_size, lr=lr, max_epochs=max_epochs, patience=patience),
        manifest=str(manifest) if manifest else None,
        end_to_end=EndToEndSettings(max_epochs=end_to_end_epochs, max_steps_per_epoch=max_steps_per_epoch))
    summary = run_sweep(store, out, settings, log=click.echo)
    click.echo(f"trained {summary['trained']} heads, skipped {summary['skipped']} already in {out / 'runs.jsonl'}, "
               f"{summary['seconds']:.1f} s")


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


main = heads

if __name__ == "__main__":
    main()
