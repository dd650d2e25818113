"""What every command shares: one-line errors instead of tracebacks, and option parsing helpers."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.metadata
import inspect
import math
import warnings

import click

# Every command shows its options' defaults the same way, click's "[default: ...]" (a default that depends on
# something else is an option's show_default text, never hand-written into its help).
GROUP_SETTINGS = {"help_option_names": ["-h", "--help"], "show_default": True}
DEVICE_DEFAULT = "cuda when present, else cpu"
BF16_MEASURED = ("bf16 on a CPU with AVX512-BF16/AMX: 1.2-1.7x faster in our measurements "
                 "(benchmarks/results/sweep_scale.md)")


def package_version() -> str:
    """The installed distribution's version (`--version`), or a note that this checkout is not installed."""
    try:
        return importlib.metadata.version("embedstore")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


class InputError(click.ClickException):
    """Bad input named in one line; exit code 2 like click's own usage errors."""

    exit_code = 2


def os_error_line(error: OSError) -> str:
    """'No space left on device: out/runs.jsonl': what went wrong and the path, in one line."""
    what = error.strerror or (str(error.args[0]) if error.args else type(error).__name__)
    what = what.splitlines()[0] if what else type(error).__name__
    paths = [str(p) for p in (error.filename, error.filename2) if p is not None]
    return f"{what}: {' -> '.join(paths)}" if paths else what


def one_line_errors(command):
    """Library code raises ValueError / FileNotFoundError naming the bad value and the fix; show just that.
    Every other OSError (permissions, a file where a folder should be, a full disk) becomes one line naming
    the path too."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            with _data_warnings_as_lines():
                return command(*args, **kwargs)
        except UnicodeDecodeError as error:  # its args[0] is just the codec name ("utf-8")
            raise InputError(f"input is not valid {error.encoding} text (byte {error.start}: {error.reason}); "
                             "re-save it as UTF-8") from None
        except BrokenPipeError:
            raise  # `embed inspect S | head`: click ends quietly (stdout closed by the reader), no "Error: Broken pipe"
        except (ValueError, FileNotFoundError, NotADirectoryError, KeyError) as error:
            if isinstance(error, OSError) and error.strerror:  # its args[0] is the errno ("Error: 2")
                raise InputError(os_error_line(error)) from None
            message = error.args[0] if error.args else str(error)
            raise InputError(str(message).splitlines()[0] if message else type(error).__name__) from None
        except OSError as error:
            raise InputError(os_error_line(error)) from None

    return wrapper


@contextlib.contextmanager
def _data_warnings_as_lines():
    """Data left out and counted (embedstore.store.DataWarning) is said on stderr in one line, every time."""
    from embedstore.store import DataWarning

    with warnings.catch_warnings():
        warnings.simplefilter("always", DataWarning)
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, DataWarning):
                click.echo(f"Warning: {message}", err=True)
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


POSITIVE = click.IntRange(min=1)
NON_NEGATIVE = click.IntRange(min=0)


def setting_default(path: str):
    """The library's default named by "package.module:Owner.name": a settings dataclass field's default (or
    default_factory), or a library function's keyword default."""
    module, _, attribute = path.partition(":")
    owner_name, _, name = attribute.partition(".")
    owner = getattr(importlib.import_module(module), owner_name)
    if dataclasses.is_dataclass(owner):
        field = owner.__dataclass_fields__[name]
        if field.default is not dataclasses.MISSING:
            return field.default
        return field.default_factory()
    default = inspect.signature(owner).parameters[name].default
    if default is inspect.Parameter.empty:
        raise TypeError(f"{path}: {owner_name} has no default for {name}")
    return default


def as_cli_text(value):
    """A setting's value as its option would be typed: tuples comma-separated, None as "none"."""
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return "none" if value is None else value


class SettingOption(click.Option):
    """An option whose default is the library's (`setting="heads.train:TrainSettings.lr"`, setting_default): one
    source of defaults. Read when click needs it (parsing a command line without the option, or the
    command's --help), so `heads --help` does not import torch. `to_cli` turns the field's value into the option's
    (default: as_cli_text)."""

    def __init__(self, *args, setting: str, to_cli=as_cli_text, **kwargs):
        if "default" in kwargs:
            raise TypeError(f"{args[0]}: give `setting` or `default`, not both")
        super().__init__(*args, **kwargs)
        self.setting, self.to_cli = setting, to_cli

    def get_default(self, ctx, call: bool = True):
        return self.to_cli(setting_default(self.setting))


def setting_option(*names: str, setting: str, **kwargs):
    """click.option with its default read from `setting` (SettingOption)."""
    return click.option(*names, cls=SettingOption, setting=setting, **kwargs)


def split_count_options(command):
    """--train / --val / --test per class, shared by `embed prepare` and `embed paper` (unset: the 7:1:2 split of
    --items-per-class)."""
    for name, share, of_250, what in (("test", "2/10", 50, "Test"), ("val", "1/10", 25, "Validation"),
                                      ("train", "7/10", 175, "Training")):
        command = click.option(f"--{name}", default=None, type=NON_NEGATIVE,
                               show_default=f"{share} of --items-per-class, {of_250} of 250",
                               help=f"{what} items per class" + ("; given counts must add up to --items-per-class."
                                                                  if name == "train" else "."))(command)
    return command


class FiniteFloat(click.FloatRange):
    """A float option that must be finite (click's FloatRange lets nan and inf through) and in range."""

    name = "finite float"

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{number} is not a finite number", param, ctx)
        return number


def comma_list(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def int_list(text: str | None, option: str) -> tuple[int, ...]:
    """`--seeds 0,1,2` -> (0, 1, 2), or a one-line error naming the option."""
    try:
        return tuple(int(part) for part in comma_list(text))
    except ValueError:
        raise ValueError(f"{option} takes comma-separated integers, got {text!r}") from None


def optional_name(text: str | None) -> str | None:
    """`--image-backbone none` skips a modality."""
    return None if text is None or text.lower() in ("", "none") else text


def split_counts(items_per_class: int, train: int | None, val: int | None,
                 test: int | None) -> tuple[int, int, int]:
    """`--train/--val/--test` as given; those not given from the paper's 7:1:2 split of `--items-per-class`
    (embedstore.manifest.scaled_split). The counts must add up to --items-per-class (SplitSettings checks)."""
    from embedstore.manifest import scaled_split

    given = (train, val, test)
    if all(count is not None for count in given):
        return given
    return tuple(scaled if count is None else count for count, scaled in zip(given, scaled_split(items_per_class)))
