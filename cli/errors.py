"""One-line errors for the CLI: known faults print ``error: ...`` and exit with code 2."""

from __future__ import annotations

import functools
import sys

import typer

from ..engine.config import ConfigError
from ..engine.data import DataError
from ..engine.train import TrainingError
from ..registry import PluginConfigError, SpecError


class CLIError(Exception):
    """A user error the CLI reports in one line (bad option value, bad file, ...)."""


USER_ERRORS = (CLIError, SpecError, PluginConfigError, DataError, TrainingError)


def user_message(error: Exception) -> str:
    """One line for a user error: configuration fields are named as their options."""
    text = error.flag() if isinstance(error, ConfigError) else str(error)
    return " ".join(text.split())


def fail(message: str, code: int = 2):
    """Print ``error: message`` on one line to stderr and exit with ``code``."""
    message = " ".join(str(message).split())
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(code)


def reports_errors(fn):
    """Decorator for commands: user errors become one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            fail(user_message(e))

    return wrapper
