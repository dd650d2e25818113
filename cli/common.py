"""What every command shares: one-line errors instead of tracebacks, and option parsing helpers."""
from __future__ import annotations

import functools
import math

import click


class InputError(click.ClickException):
    """Bad input named in one line; exit code 2 like click's own usage errors."""

    exit_code = 2


def one_line_errors(command):
    """Library code raises ValueError / FileNotFoundError naming the bad value and the fix; show just that."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (ValueError, FileNotFoundError, NotADirectoryError, KeyError) as error:
            message = error.args[0] if error.args else str(error)
            raise InputError(str(message).splitlines()[0] if message else type(error).__name__) from None

    return wrapper


def finite(ctx, param, value):
    """click callback: refuse NaN and infinities, naming the option."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"must be a finite number, got {value}", ctx=ctx, param=param)
    return value


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
