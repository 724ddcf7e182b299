"""One-line errors for the CLI: every CellsegError prints ``error: ...`` and exits with code 2
(caught once, in :func:`cellseg_plugins.cli.main.main`)."""

from __future__ import annotations

from ..errors import CellsegError, CLIError, ConfigError

__all__ = ["CLIError", "USER_ERRORS", "user_message"]
USER_ERRORS = (CellsegError,)


def user_message(error: Exception) -> str:
    """One line for a user error: configuration fields are named as their options."""
    text = error.flag() if isinstance(error, ConfigError) else str(error)
    return " ".join(text.split())
