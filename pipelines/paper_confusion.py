"""The confusion matrix in `embed paper`'s report: the best cached fusion head by validation, scored on its store's
test items; a CSV, a PNG (power colour scale, errors in red) and the most confused class pairs in Markdown."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from heads.figures import pyplot, save_png
from heads.tables import markdown_table, write_csv


def confusion(heads_rows: list[dict], best: dict, report_dir: Path) -> tuple[list[str], list[Path]]:
    """Confusion matrix of the best cached multimodal cell's best saved head (by validation accuracy) on its
    store's test items: PNG + CSV, and the 10 most confused class pairs as Markdown lines (paths in them are
    relative to the report's folder: a report names no machine's folders)."""
    from sklearn.metrics import confusion_matrix

    from embedstore.outputs import relative_to_folder
    from embedstore.store import FeatureStore
    from heads.estimator import FusionHead
    from heads.saved import head_store_path

    mine = [r for r in heads_rows if r["group"] == best["cell"]]
    dirs = sorted({r["results_dir"] for r in mine})
    # saved under the sweep's cell name: "1A-concat" for the group "1A-concat (cross-fit)" too
    saved = [Path(d) / "heads" / (mine[0].get("cell") or best["cell"]) for d in dirs]
    saved = [d for d in saved if (d / "config.json").exists()]
    if not saved:
        return [f"No saved head of {best['cell']}; no confusion matrix."], []
    head_dir = max(saved, key=lambda d: json.loads((d / "config.json").read_text())["best_val_accuracy"])
    head = FusionHead.from_pretrained(head_dir)
    with FeatureStore(head_store_path(head_dir, head.metadata_)) as store:
        data = store.load(head.metadata_["inputs"])
        classes = list(store.classes)
    test = data.split == "test"
    predicted = head.predict([data.features[n][test] for n in head.metadata_["inputs"]])
    matrix = confusion_matrix(np.asarray(classes)[data.labels[test]], predicted, labels=classes)  # class names
    csv_path, png_path = report_dir / "confusion_matrix.csv", report_dir / "confusion_matrix.png"
    write_csv(csv_path, ["true \\ predicted"] + classes, [[c] + list(r) for c, r in zip(classes, matrix)])
    where = f"{head_dir.parents[3].name}, {head_dir.parents[1].name}, seed {head.seed}"  # OUT/<m>/results/<r>/heads
    _plot_confusion(matrix, classes, png_path, f"{best['cell']} ({where}): test accuracy "
                                               f"{np.trace(matrix) / matrix.sum():.4f}")
    off = [(int(matrix[i, j]), classes[i], classes[j]) for i in range(len(classes)) for j in range(len(classes))
           if i != j and matrix[i, j]]
    pairs = sorted(off, key=lambda x: (-x[0], x[1], x[2]))[:10]
    lines = [f"Best fusion head (1-A, 1-B, 2-A, 2-B: the models with a saved head to score) by validation "
             f"accuracy: **{best['cell']}**, saved head `{relative_to_folder(head_dir, report_dir)}` (seed "
             f"{head.seed}, validation accuracy {head.metadata_['best_val_accuracy']:.4f}), on the "
             f"{int(test.sum())} test items of its store."
             + (f" The {len(pairs)} most confused pairs (true -> predicted):" if pairs else ""), ""]
    lines.append(markdown_table(["true", "predicted", "count"], [[t, p, n] for n, t, p in pairs]) if pairs
                 else "No test item was misclassified.")
    return lines, [csv_path, png_path]


def _plot_confusion(matrix: np.ndarray, classes: list[str], path: Path, title: str) -> None:
    plt = pyplot()
    from matplotlib.colors import PowerNorm

    size = max(5.0, 0.28 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    # a power scale, so that the few errors of a good model are visible beside the full diagonal
    image = ax.imshow(matrix, cmap="Blues", norm=PowerNorm(0.4, vmin=0, vmax=max(1, matrix.max())))
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02, label="test items (power scale)")
    for i, j in zip(*np.nonzero(matrix)):   # every count written, errors in red
        ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=5.5,
                color="white" if i == j and matrix[i, j] > 0.5 * matrix.max() else "#b00000" if i != j else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=6)
    ax.set_yticks(range(len(classes)), classes, fontsize=6)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"Confusion matrix: {title}\n(counts in the cells; off-diagonal counts in red are errors)",
                 fontsize=8)
    fig.tight_layout()
    save_png(fig, path)

