"""Shared pieces of the CLI: consoles and error reporting."""

from __future__ import annotations

from rich.console import Console

from crystaloop.errors import UserError

PIPE_WIDTH = 240
"""Console width when the output is not a terminal, so tables in logs and pipes are never cut."""


def _console(**kwargs) -> Console:
    probe = Console(**kwargs)
    return probe if probe.is_terminal else Console(width=PIPE_WIDTH, **kwargs)


console = _console()
err_console = _console(stderr=True)


def progress_bar():
    """The project's rich progress bar (description, bar, n/total, elapsed), cleared when done."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


def report_user_error(exc: UserError) -> None:
    """Print a user error as one line (plus one line per listed problem)."""
    err_console.print(f"[bold red]error:[/] {exc.message}", highlight=False, soft_wrap=True)
    for line in exc.lines:
        err_console.print(f"  {line}", highlight=False, soft_wrap=True)


def group(help_text: str):
    """A typer sub-app with the project's defaults."""
    import typer

    return typer.Typer(help=help_text, no_args_is_help=True, pretty_exceptions_enable=False)
