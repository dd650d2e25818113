"""The report's figures: accuracy and training time as horizontal bars, one per summary, coloured by model kind.

Honest axes: accuracy runs from 0 (and, when the best models sit high, a second panel zoomed on their range,
marked as such and drawn as points, not bars, since it has no zero); training time goes on a log axis when one
slow model would flatten the rest. Each figure carries its title, a legend of the kinds and a caption saying
what the bars and whiskers are; figure_lines links them from a report's Markdown.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from embedstore.outputs import partial_file
from heads.strategies import get_strategy, list_strategies

# Colours by model kind (Okabe-Ito, readable by colour-blind readers); the legend names them.
KIND_COLOURS = {"unimodal: image": "#E69F00", "unimodal: text": "#D55E00", "fusion head": "#0072B2",
                "linear / decision-level fusion": "#009E73", "ensemble": "#CC79A7", "other": "#999999"}
SPREAD_OVER_SEEDS = "± 1 sample std over seeds"


def model_kind(cell: dict) -> str:
    """The kind a figure colours a summary by, from its strategy's declaration (heads/strategies.py); an int
    strategy is one modality's module (`embed paper`: cells "image S1", ...)."""
    strategy = cell.get("strategy")
    if isinstance(strategy, int):
        return "unimodal: image" if "image" in cell["cell"] else "unimodal: text"
    if strategy == "ensemble":
        return "ensemble"
    if strategy not in list_strategies():
        return "other"
    declared = get_strategy(strategy)
    if not declared.multimodal:
        return f"unimodal: {declared.modalities[0]}"
    # heads and end-to-end models fuse with an operator; the linear strategies fuse decisions or one regression
    return "linear / decision-level fusion" if declared.trainer == "linear" else "fusion head"


def _runs(cell: dict) -> int | None:
    return cell.get("seeds", cell.get("runs"))


def _bar_labels(cells: list[dict]) -> tuple[list[str], str]:
    """Bar labels and the caption's "n = ..." part: the most common n in the caption, any other in its label."""
    counts = [_runs(c) for c in cells]
    common = max(set(counts), key=counts.count)
    labels = [c["cell"] if _runs(c) == common else f"{c['cell']} (n={_runs(c)})" for c in cells]
    if common is None:
        return labels, ""
    return labels, f"n = {common} per bar" + (" unless its label says" if len(set(counts)) > 1 else "")


def plot_bars(cells: list[dict], out_dir: Path, prefix: str = "", *, title: str = "Fusion head sweep",
              spread: str = SPREAD_OVER_SEEDS) -> list[Path]:
    """PREFIXaccuracy.png and PREFIXtraining_time.png: one horizontal bar per summary (keys: cell, strategy,
    accuracy_mean/_std, train_seconds_mean/_std, seeds or runs), sorted by value, coloured by model_kind.
    Honest axes: accuracy from 0 (and, when the best models sit high, a second panel zoomed on their range,
    marked as such and drawn as points, not bars, since it has no zero); time on a log axis when one slow model
    would flatten the rest. `spread` names what the whiskers are (the captions say it)."""
    plt = pyplot()
    return [_plot_accuracy(plt, cells, out_dir / f"{prefix}accuracy.png", title, spread),
            _plot_time(plt, cells, out_dir / f"{prefix}training_time.png", title, spread)]


def pyplot():
    """matplotlib.pyplot, drawing to files only (the Agg backend: no display)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_png(fig, path: Path) -> Path:
    """A pyplot figure as a 120 dpi PNG at path, whole or not at all (embedstore/outputs.py); the figure closed."""
    import matplotlib.pyplot as plt

    with partial_file(path) as partial:
        fig.savefig(partial, dpi=120, format="png")
    plt.close(fig)
    return path


HEADER_IN, FOOTER_IN, BAR_IN = 0.7, 0.5, 0.24   # figure layout in inches: title + legend, caption, one bar


def _figure(plt, n_bars: int, ncols: int = 1, width: float = 9.0):
    height = HEADER_IN + FOOTER_IN + 0.75 + BAR_IN * n_bars   # 0.75: the x axis' ticks and label
    fig, axes = plt.subplots(1, ncols, figsize=(width, height), sharey=True, squeeze=False,
                             gridspec_kw={"width_ratios": [3, 2][:ncols]})
    return fig, axes[0]


def _finish(fig, path: Path, title: str, kinds: list[str], caption: str) -> Path:
    import textwrap

    from matplotlib.patches import Patch

    width, height = fig.get_size_inches()
    fig.suptitle(title, fontsize=10, y=1 - 0.12 / height, va="top")
    present = [k for k in KIND_COLOURS if k in kinds]
    fig.legend([Patch(color=KIND_COLOURS[k]) for k in present], present, loc="upper center", ncol=len(present),
               bbox_to_anchor=(0.5, 1 - 0.4 / height), frameon=False, fontsize=8)
    fig.text(0.01, 0.08 / height, textwrap.fill(caption, int(width * 15)), fontsize=7.5, color="#333333",
             ha="left", va="bottom")
    fig.tight_layout(pad=0.8, w_pad=2.0, rect=(0, FOOTER_IN / height, 1, 1 - HEADER_IN / height))
    return save_png(fig, path)


def _zoom(mean: np.ndarray, std: np.ndarray) -> tuple[float, float] | None:
    """The zoomed panel's range: the models within 15 points of the best, whiskers included; None when that
    range is not in the upper half of the axis (then the full axis already shows the differences)."""
    near = mean >= np.nanmax(mean) - 15
    low = np.floor(np.nanmin((mean - std)[near])) - 1
    high = min(100.0, np.ceil(np.nanmax(mean + std)) + 1)
    return (low, high) if low >= 50 else None


def _plot_accuracy(plt, cells: list[dict], path: Path, title: str, spread: str) -> Path:
    cells = sorted(cells, key=lambda c: c["accuracy_mean"])   # best at the top (barh draws bottom-up)
    labels, n = _bar_labels(cells)
    mean = np.array([c["accuracy_mean"] for c in cells]) * 100
    std = np.array([c["accuracy_std"] for c in cells]) * 100
    kinds = [model_kind(c) for c in cells]
    colours = [KIND_COLOURS[k] for k in kinds]
    zoom = _zoom(mean, std)
    fig, axes = _figure(plt, len(cells), 2 if zoom is not None else 1)
    y = np.arange(len(cells))
    full = axes[0]
    full.barh(y, mean, xerr=std, color=colours, capsize=2, error_kw={"elinewidth": 0.8, "ecolor": "#333333"})
    for i, m in enumerate(mean):   # the value inside its bar; beside a bar too short to hold it
        if m >= 12:
            full.text(m - 1, i, f"{m:.1f}", va="center", ha="right", fontsize=6.5, color="white")
        else:
            full.text(m + std[i] + 1, i, f"{m:.1f}", va="center", ha="left", fontsize=6.5)
    full.set_yticks(y, labels, fontsize=7.5)
    full.set_ylim(-0.6, len(cells) - 0.4)
    full.set_xlim(0, 100)
    full.set_xlabel("test accuracy % (axis from 0)")
    full.grid(axis="x", color="#dddddd", linewidth=0.6)
    full.set_axisbelow(True)
    if zoom is not None:
        low, high = zoom
        ax = axes[1]
        inside = mean >= low
        ax.errorbar(mean[inside], y[inside], xerr=std[inside], fmt="none", ecolor="#333333", capsize=2,
                    elinewidth=0.8, zorder=3)
        ax.scatter(mean[inside], y[inside], c=np.array(colours)[inside], s=24, zorder=4, edgecolors="#333333",
                   linewidths=0.4)
        for i in np.flatnonzero(~inside):   # off the zoomed range: an arrow at its edge, and the value
            ax.scatter([low], [i], marker="<", c=[colours[i]], s=30, zorder=4, clip_on=False)
            ax.text(low + 0.02 * (high - low), i, f"{mean[i]:.1f} (off the zoomed range)", va="center",
                    fontsize=6.5, color="#555555")
        ax.set_xlim(low, high)
        ax.set_xlabel(f"test accuracy %, ZOOMED to {low:.0f}-{high:.0f}")
        ax.set_title(f"zoomed to {low:.0f}-{high:.0f} % (points: no bars without a zero)", fontsize=8)
        ax.grid(axis="x", color="#dddddd", linewidth=0.6)
        ax.set_facecolor("#f7f7f2")
    return _finish(fig, path, f"{title}: test accuracy", kinds,
                   f"Bars: mean test accuracy; whiskers: {spread}{'; ' + n if n else ''}. Sorted by accuracy, "
                   "best at the top; colours: model kind." + (" Right: the same means zoomed on the best models' "
                                                               "range." if zoom is not None else ""))


def log_time_axis(seconds: np.ndarray) -> bool:
    """A log axis when the slowest model takes 20x the fastest: on a linear one it would flatten the fast heads."""
    positive = seconds[seconds > 0]
    return len(positive) > 1 and positive.max() / positive.min() > 20


def _plot_time(plt, cells: list[dict], path: Path, title: str, spread: str) -> Path:
    cells = sorted(cells, key=lambda c: c["train_seconds_mean"])   # slowest at the top
    labels, n = _bar_labels(cells)
    mean = np.array([c["train_seconds_mean"] for c in cells], dtype=float)
    std = np.array([c["train_seconds_std"] for c in cells], dtype=float)
    kinds = [model_kind(c) for c in cells]
    colours = [KIND_COLOURS[k] for k in kinds]
    log = log_time_axis(mean)
    positive = mean[mean > 0]
    fig, axes = _figure(plt, len(cells), width=8.0)
    ax = axes[0]
    y = np.arange(len(cells))
    note = ""
    style = {"color": colours, "capsize": 2, "error_kw": {"elinewidth": 0.8, "ecolor": "#333333"}}
    if log:
        floor = 10 ** np.floor(np.log10(positive.min()) - 0.01)   # the axis' left end: a power of ten below every bar
        lower = np.where(mean > 0, np.minimum(std, 0.9 * mean), 0)   # a whisker through 0 has no place on a log axis
        if (lower < std).any():
            note = " (lower whiskers cut at 10 % of the mean on the log axis)"
        ax.barh(y, np.where(mean > 0, mean - floor, 0), left=floor, xerr=[lower, std], **style)
        ax.set_xscale("log")
        ax.set_xlim(left=floor)
    else:
        ax.barh(y, mean, xerr=std, **style)
        ax.set_xlim(left=0)
    for i, m in enumerate(mean):
        ax.text(m + std[i] if m > 0 else ax.get_xlim()[0], i, f"  {m:.3g} s", va="center", ha="left", fontsize=6.5)
    ax.set_yticks(y, labels, fontsize=7.5)
    ax.set_ylim(-0.6, len(cells) - 0.4)
    ax.set_xlabel("training time per model, s" + (" (log scale)" if log else " (axis from 0)"))
    ax.grid(axis="x", color="#dddddd", linewidth=0.6)
    ax.set_axisbelow(True)
    ax.margins(x=0.12)
    return _finish(fig, path, f"{title}: training time per model{' (log scale)' if log else ''}", kinds,
                   f"Bars: mean wall time per model (a batched head: its share of the stack); whiskers: {spread}"
                   f"{note}{'; ' + n if n else ''}. Sorted by time, slowest at the top; colours: model kind.")


def figure_lines(paths: list[Path], spread: str = SPREAD_OVER_SEEDS) -> list[str]:
    """Markdown for the figures: each linked by its file name (the report sits beside them), with a caption."""
    lines = []
    for path in paths:
        what = "Test accuracy" if path.stem.endswith("accuracy") else "Training time per model"
        lines += [f"![{what} ({path.stem})]({path.name})", "",
                  f"*{path.name}: {what.lower()}; bars are means, whiskers {spread}; colours: the model's kind "
                  "(unimodal image / text, fusion head, linear / decision-level fusion, ensemble).*", ""]
    return lines
