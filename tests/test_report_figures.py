"""The report's figures: colours by model kind, honest axes (accuracy from 0, zoom only as a marked second
panel, log time axis when one model is far slower), and report.md linking every figure it writes."""
from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from heads.figures import KIND_COLOURS, _zoom, figure_lines, log_time_axis, model_kind, plot_bars


def cell(name, strategy, acc, seconds, runs=3):
    return {"cell": name, "strategy": strategy, "accuracy_mean": acc, "accuracy_std": 0.01,
            "train_seconds_mean": seconds, "train_seconds_std": seconds / 10, "seeds": runs}


@pytest.mark.parametrize("summary,kind", [
    ({"cell": "image", "strategy": "image"}, "unimodal: image"),
    ({"cell": "LR-text", "strategy": "LR-text"}, "unimodal: text"),
    ({"cell": "text S3", "strategy": 3}, "unimodal: text"),             # a module of `embed paper`
    ({"cell": "2B-gated", "strategy": "2B"}, "fusion head"),
    ({"cell": "3A-concat", "strategy": "3A"}, "fusion head"),           # end to end
    ({"cell": "LR-concat", "strategy": "LR-concat"}, "linear / decision-level fusion"),
    ({"cell": "ST", "strategy": "ST"}, "linear / decision-level fusion"),
    ({"cell": "ensemble", "strategy": "ensemble"}, "ensemble"),
    ({"cell": "who knows", "strategy": "9Z"}, "other"),
])
def test_every_model_has_a_kind_with_a_colour(summary, kind):
    assert model_kind(summary) == kind and kind in KIND_COLOURS


def test_accuracy_is_zoomed_only_as_a_second_panel_on_the_best_models_range():
    # the best models all above 90 %: a zoomed panel on their range (a unimodal model far below is left off it)
    assert _zoom(np.array([82.0, 96.0, 97.5]), np.array([1.0, 0.5, 0.5])) == (94.0, 99.0)
    # the demo: the differences are wide enough to read on the axis from 0
    assert _zoom(np.array([40.0, 45.0, 60.0]), np.array([2.0, 2.0, 2.0])) is None


def test_a_slow_model_puts_time_on_a_log_axis():
    assert log_time_axis(np.array([0.2, 0.5, 250.0]))
    assert not log_time_axis(np.array([0.2, 0.5, 3.0]))
    assert not log_time_axis(np.array([0.0, 3.0]))   # one positive time: nothing to compare on a log axis


def test_plot_bars_draws_every_kind_including_a_zero_time_and_uneven_runs(tmp_path):
    cells = [cell("image", "image", 0.82, 9.5), cell("text", "text", 0.97, 4.0),
             cell("2A-concat", "2A", 0.965, 10.0), cell("LFM", "LFM", 0.978, 0.0),
             cell("ST", "ST", 0.972, 228.0), cell("ensemble", "ensemble", 0.98, 5.3, runs=2)]
    paths = plot_bars(cells, tmp_path, prefix="x_", title="A sweep")
    assert [p.name for p in paths] == ["x_accuracy.png", "x_training_time.png"]
    for path in paths:
        width, height = Image.open(path).size
        assert width > 600 and height > 300


def test_the_report_links_every_figure(tmp_path):

    paths = plot_bars([cell("image", "image", 0.5, 1.0), cell("2A-add", "2A", 0.9, 2.0)], tmp_path)
    md = "\n".join(figure_lines(paths))
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert linked == ["accuracy.png", "training_time.png"] and "whiskers ± 1 sample std over seeds" in md
