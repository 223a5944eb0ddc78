"""User-facing errors.

A :class:`UserError` carries one line that names the problem and the fix. The
CLI prints it and exits with code 2; it never shows a traceback for one.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or environment, not a bug.

    Parameters
    ----------
    message
        One line: what is wrong and how to fix it.
    lines
        Optional extra lines (e.g. one per validation problem).
    """

    exit_code = 2

    def __init__(self, message: str, lines: list[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.lines = list(lines or [])


class ConfigError(UserError):
    """An invalid campaign, training or settings file."""


class DatabaseUnavailable(UserError):
    """The MongoDB server cannot be reached."""
