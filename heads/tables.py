"""The reports' table building blocks, shared by `heads report` (heads/report.py) and `embed paper`'s report
(pipelines/paper_tables.py): a table as a value (title, header, rows), mean ± std and other cell formats, Markdown
rendering and CSV writing.

Summaries, in both reports, are dicts with accuracy_mean/_std, macro_f1_mean/_std and train_seconds_mean/_std
(fractions and seconds); tables show accuracies in percent. Every spread is the sample std (ddof=1; 0 for one run).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Table:
    """One report table: its title (the Markdown section's heading), the header and the rows (cells as written)."""

    title: str
    header: list[str]
    rows: list[list]

    def markdown(self) -> str:
        return markdown_table(self.header, self.rows)


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(path: Path, header: list, rows: list[list]) -> Path:
    """The header and rows as a CSV file, written whole or not at all (embedstore/outputs.py)."""
    from embedstore.outputs import open_atomic

    with open_atomic(path, "w", newline="") as f:
        csv.writer(f).writerows([header] + rows)
    return path


def write_tables(tables: dict[str, Table], out_dir: Path) -> tuple[list[str], list[Path]]:
    """NAME.csv in out_dir per table, and the report's Markdown lines: per table a "## title" section."""
    md, written = [], []
    for name, table in tables.items():
        written.append(write_csv(out_dir / f"{name}.csv", table.header, table.rows))
        md += ["", f"## {table.title}", "", table.markdown()]
    return md, written


# ----------------------------------------------------------------------------------------------- numbers


def mean_std(values) -> tuple[float, float]:
    """Mean and sample std (0 for one value); (NaN, 0) for none."""
    if not len(values):
        return float("nan"), 0.0
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return float(np.mean(values)), std


def pm(mean: float, std: float, scale: float = 100.0, digits: int = 2) -> str:
    """"mean ± std", in percent unless told another scale."""
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def accuracy_pm(summary: dict) -> str:
    return pm(summary["accuracy_mean"], summary["accuracy_std"])


def macro_f1_pm(summary: dict) -> str:
    return pm(summary["macro_f1_mean"], summary["macro_f1_std"])


def seconds_pm(mean: float, std: float) -> str:
    """Training seconds: 1 decimal from 10 s, else 3 (heads over cached features train in fractions of a second)."""
    digits = 1 if mean >= 10 else 3
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def percent(fraction: float) -> str:
    return f"{100 * fraction:.2f}"


def one_decimal(value: float) -> str:
    """A mean such as epochs run, or "" where it does not apply (NaN: a regression has no epochs)."""
    return "" if np.isnan(value) else f"{value:.1f}"


MEAN_HEADER = ["mean acc %", "mean macro-F1 %", "mean train s/head"]   # mean_columns' header


def mean_columns(summaries: list[dict], seconds_digits: int = 2) -> list[str]:
    """Table 6's right-hand columns over summaries (MEAN_HEADER): mean accuracy %, mean macro-F1 %, mean training
    seconds."""
    return [percent(np.mean([c["accuracy_mean"] for c in summaries])),
            percent(np.mean([c["macro_f1_mean"] for c in summaries])),
            f"{np.mean([c['train_seconds_mean'] for c in summaries]):.{seconds_digits}f}"]
