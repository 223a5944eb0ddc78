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


def read_yaml(path, *, what: str):
    """The YAML document in the file ``path``, a ``what`` (such as "campaign file").

    Raises
    ------
    ConfigError
        One line when the file cannot be read, is not UTF-8 text, or is not valid YAML (with its line).
    """
    from pathlib import Path

    import yaml

    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, OSError) as exc:
        raise ConfigError(f"{what} {path} cannot be read ({exc}); save it as a UTF-8 text file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{what} {path}: invalid YAML{where}; fix the syntax") from None
