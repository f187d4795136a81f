"""Exceptions that carry a user-facing, one-line explanation and a fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class LtframeError(Exception):
    """Base class: its message is shown to the user as is, without a traceback."""


class RecipeError(LtframeError):
    """A recipe value is missing, unknown or of the wrong type."""


class RegistryError(LtframeError):
    """A component name is unknown or registered twice."""


class DataError(LtframeError):
    """A data source cannot be read or a split cannot be made."""


class CheckpointError(LtframeError):
    """A checkpoint is missing, corrupt or does not match the model."""


class NonFiniteLossError(LtframeError):
    """Training produced a NaN or infinite loss."""


def closest(word: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean 'x'?)' for the closest choice, or ''."""
    match = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def allowed(choices: Iterable[str]) -> str:
    items = sorted(choices)
    return ", ".join(items) if items else "(none)"


class RunInterrupted(LtframeError):
    """The user interrupted a run; the message names the step and the resume command."""


class RunLockedError(LtframeError):
    """Another process is writing the run directory (it holds the run's lock)."""


class DiskWriteError(LtframeError, OSError):
    """A file of the run could not be written (full disk, read-only folder, permissions);
    `path` names the file. Also an OSError, so callers catching OSError still do."""

    def __init__(self, message: str, path: str | None = None, errno_: int | None = None) -> None:
        LtframeError.__init__(self, message)
        self.path = path
        self.code = errno_

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class PeerDiedError(LtframeError):
    """Under torchrun, another rank (or the torchrun agent) stopped; this rank stops too."""
