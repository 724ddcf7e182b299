"""One error family: every fault cellseg reports to a user is a :class:`CellsegError`.

Each message is one line that names the bad value and what is allowed. Engine messages name
configuration fields (``lr=-1: must be > 0``); the CLI shows them as options (``--lr -1``).
This module imports nothing heavy, so the CLI can catch these without loading torch.
"""

from __future__ import annotations


class CellsegError(Exception):
    """Base of every error cellseg reports in one line."""


class SpecError(CellsegError, ValueError):
    """A bad spec string. ``str(err)`` is one line naming the term and the column (1-based)."""

    def __init__(self, message: str, column: int | None = None, term: str | None = None):
        where = []
        if term:
            where.append(f"term {term if len(term) <= 24 else term[:23] + '…'!r}")
        if column is not None:
            where.append(f"column {column}")
        prefix = f"bad model spec ({', '.join(where)}): " if where else "bad model spec: "
        super().__init__(prefix + message)
        self.column = column
        self.term = term


class PluginConfigError(CellsegError, ValueError):
    """A plugin's or architecture's parameters do not fit the model (one line)."""


class DataError(CellsegError, ValueError):
    """A bad data set, file, checkpoint or option; names the file and the value."""


class ConfigError(DataError):
    """A configuration field with a bad value; ``str()`` names the field, ``flag()`` the
    command-line option."""

    def __init__(self, name: str, value, reason: str):
        self.name, self.value, self.reason = name, value, reason
        super().__init__(f"{name}={value!r}: {reason}")

    def flag(self) -> str:
        """The message with the command-line option in place of the field."""
        value = repr(self.value) if isinstance(self.value, str) else self.value
        return f"--{self.name.replace('_', '-')} {value}: {self.reason}"


class TrainingError(CellsegError, RuntimeError):
    """Training cannot go on (diverged loss, a failed write, failed runs); one line."""


class CLIError(CellsegError):
    """A command-line option the engine does not see (tile sizes, jobs, ...)."""
