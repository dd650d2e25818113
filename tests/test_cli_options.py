"""Both command groups, every command: each option says what it does, defaults are shown one way (click's
"[default: ...]"), one option name means one thing, and `--version` answers."""
from __future__ import annotations

import re

import click
import pytest
from click.testing import CliRunner

import pipelines.predict
import pipelines.paper
from cli.common import package_version
from cli.embed import embed
from cli.heads import heads as heads_group

GROUPS = {"embed": embed, "heads": heads_group}


def commands():
    """(path, command) for every command of both groups, nested groups included."""
    def walk(group, path):
        for name, command in sorted(group.commands.items()):
            if isinstance(command, click.Group):
                yield from walk(command, path + [name])
            else:
                yield path + [name], command
    for name, group in GROUPS.items():
        yield from walk(group, [name])


ALL = list(commands())


def test_the_walk_finds_every_command():
    names = {" ".join(path) for path, _ in ALL}
    assert {"embed prepare", "embed extract", "embed finetune", "embed paper", "heads sweep", "heads predict",
            "heads ensemble"} <= names


@pytest.mark.parametrize("path, command", ALL, ids=[" ".join(p) for p, _ in ALL])
def test_every_option_has_help_and_no_hand_written_default(path, command):
    options = [p for p in command.params if isinstance(p, click.Option)]
    missing = [o.opts[0] for o in options if not (o.help or "").strip()]
    assert not missing, f"{' '.join(path)}: options without help: {missing}"
    # a default belongs in show_default (click prints "[default: ...]"), not typed into the help a second way
    typed = [o.opts[0] for o in options if re.search(r"default", o.help or "", re.I)]
    assert not typed, f"{' '.join(path)}: help text spells out a default: {typed}"


@pytest.mark.parametrize("path, command", ALL, ids=[" ".join(p) for p, _ in ALL])
def test_every_help_page_shows_defaults(path, command):
    result = CliRunner().invoke(GROUPS[path[0]], path[1:] + ["--help"])
    assert result.exit_code == 0, result.output
    valued = [o for o in command.params if isinstance(o, click.Option) and not o.hidden and not o.is_flag
              and isinstance(o.default, (int, float, str)) and not isinstance(o.default, bool)]
    if valued:  # the groups' show_default setting reaches every command
        assert "[default: " in result.output


@pytest.mark.parametrize("group", GROUPS)
def test_version(group):
    result = CliRunner().invoke(GROUPS[group], ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"{group}, version {package_version()}"
    assert re.match(r"\d+\.\d+", package_version())  # the installed distribution's version


def test_the_bf16_help_says_what_was_measured():
    sweep_help = CliRunner().invoke(heads_group, ["sweep", "--help"]).output
    flat = " ".join(sweep_help.split())
    assert "1.2-1.7x faster" in flat and "~2x" not in flat


# ------------------------------------------------------------ --top-k: models in `heads ensemble`, not labels
@pytest.fixture
def predict_settings(monkeypatch, tmp_path):
    """The PredictSettings `heads predict` hands to the library (which is not run)."""
    seen = []

    class Summary:
        def format(self):
            return "predicted"

    def fake(head_dir, inputs, out, settings):
        seen.append(settings)
        return Summary()

    monkeypatch.setattr(pipelines.predict, "predict_products", fake)
    return seen


def test_predict_counts_labels_with_top_labels(predict_settings, tmp_path):
    result = CliRunner().invoke(heads_group, ["predict", str(tmp_path), str(tmp_path), "--out",
                                              str(tmp_path / "o.csv"), "--top-labels", "5"])
    assert result.exit_code == 0, result.output
    assert predict_settings[-1].top_k == 5
    help_text = CliRunner().invoke(heads_group, ["predict", "--help"]).output
    assert "--top-labels" in help_text and "--top-k" not in help_text  # the old name is hidden


def test_predicts_old_top_k_still_works_with_a_notice(predict_settings, tmp_path):
    args = ["predict", str(tmp_path), str(tmp_path), "--out", str(tmp_path / "o.csv")]
    result = CliRunner().invoke(heads_group, args + ["--top-k", "2"])
    assert result.exit_code == 0, result.output
    assert predict_settings[-1].top_k == 2 and "now --top-labels" in result.output
    both = CliRunner().invoke(heads_group, args + ["--top-k", "2", "--top-labels", "4"])
    assert both.exit_code == 2 and "give one of them" in both.output


def test_ensemble_keeps_top_k_for_models():
    help_text = " ".join(CliRunner().invoke(heads_group, ["ensemble", "--help"]).output.split())
    assert "--top-k" in help_text and "saved models" in help_text


def test_paper_scales_the_split_like_prepare(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(pipelines.paper, "run_paper", lambda catalog, out, settings, log: seen.append(settings) or out)
    result = CliRunner().invoke(embed, ["paper", str(tmp_path), "--out", str(tmp_path / "p"), "--min-items", "40",
                                        "--items-per-class", "40"])
    assert result.exit_code == 0, result.output
    split = seen[0].split
    assert (split.train, split.val, split.test, split.items_per_class) == (28, 4, 8, 40)


def test_status_counts_are_printed_as_words_not_a_dict():
    from embedstore.inspect import format_counts

    assert format_counts({"ok": 1038, "skipped: missing image": 2}) == "ok: 1,038, skipped (missing image): 2"
    assert format_counts({}) == "no rows"


def test_predict_on_a_missing_input_says_so_before_loading_anything(predict_settings, tmp_path):
    result = CliRunner().invoke(heads_group, ["predict", str(tmp_path), str(tmp_path / "nowhere.csv"), "--out",
                                              str(tmp_path / "o.csv")])
    assert result.exit_code == 2 and f"input not found: {tmp_path / 'nowhere.csv'}" in result.output
    assert predict_settings == []  # the library (which loads the head and its backbones) was never called
