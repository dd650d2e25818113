"""Both command groups, every command: each option says what it does, defaults are shown one way (click's
"[default: ...]"), one option name means one thing, and `--version` answers."""
from __future__ import annotations

import re

import click
from click.core import UNSET   # click's "no default given"
import pytest
from click.testing import CliRunner

import pipelines.predict
import pipelines.paper
from cli.common import SettingOption, as_cli_text, package_version, setting_default
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
    ctx = click.Context(command)
    valued = [o for o in command.params if isinstance(o, click.Option) and not o.hidden and not o.is_flag
              and isinstance(o.get_default(ctx, call=False), (int, float, str))]
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


# the options whose default is no settings field's: what the command line alone decides
OWN_DEFAULTS = {"embed demo --out"}


@pytest.mark.parametrize("path, command", ALL, ids=[" ".join(p) for p, _ in ALL])
def test_defaults_come_from_the_settings_objects(path, command):
    """One source of defaults: an option with a default reads it from the settings dataclass its value goes to
    (cli.common.SettingOption), apart from OWN_DEFAULTS; flags and "unset" (None) options have none to keep."""
    ctx = click.Context(command)
    for option in (p for p in command.params if isinstance(p, click.Option) and not p.hidden):
        name = f"{' '.join(path)} {option.opts[0]}"
        if isinstance(option, SettingOption):
            assert option.get_default(ctx) == as_cli_text(setting_default(option.setting)), name
            continue
        default = option.get_default(ctx, call=False)
        unset = default in (None, UNSET) or option.required or option.multiple or (option.is_flag and not option.secondary_opts and default is False)
        assert unset or name in OWN_DEFAULTS, f"{name}: default {default!r} typed in the CLI, not read from settings"


def test_a_settings_default_is_what_the_cli_uses(monkeypatch):
    """Changing a default in the library changes the command line's: nothing else spells it."""
    from heads.train import TrainSettings

    monkeypatch.setattr(TrainSettings.__dataclass_fields__["max_epochs"], "default", 17)
    result = CliRunner().invoke(heads_group, ["sweep", "--help"], terminal_width=200)
    assert result.exit_code == 0 and re.search(r"--max-epochs.*\[default: 17;", result.output), result.output
    from embedstore.defaults import DEFAULT_IMAGE_BACKBONE
    from embedstore.extract_plan import ExtractSettings
    assert setting_default("embedstore.extract_plan:ExtractSettings.image_backbone") == DEFAULT_IMAGE_BACKBONE
    assert ExtractSettings().image_backbone == DEFAULT_IMAGE_BACKBONE
