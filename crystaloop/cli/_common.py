"""Shared pieces of the CLI: consoles and error reporting."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console

from crystaloop.errors import UserError

PIPE_WIDTH = 240
"""Console width when the output is not a terminal; a wider table widens it for its own print."""


class _PipeConsole(Console):
    """The console of logs and pipes: tables print at their natural width, so no cell is ever cut."""

    def print(self, *objects, **kwargs) -> None:
        from rich.measure import Measurement
        from rich.table import Table

        tables = [o for o in objects if isinstance(o, Table)]
        if not tables:
            return super().print(*objects, **kwargs)
        options = self.options.update_width(1_000_000)
        need = max(Measurement.get(self, options, t).maximum for t in tables)
        saved = self.width
        self.width = max(saved, need)
        try:
            return super().print(*objects, **kwargs)
        finally:
            self.width = saved


def _console(**kwargs) -> Console:
    probe = Console(**kwargs)
    return probe if probe.is_terminal else _PipeConsole(width=PIPE_WIDTH, **kwargs)


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
    """Print a user error as one line (plus one line per listed problem).

    The message echoes user input (paths, windows), so it is printed as is: no markup, no emoji codes.
    """
    from rich.markup import escape

    err_console.print(
        f"[bold red]error:[/] {escape(exc.message)}", highlight=False, soft_wrap=True, emoji=False
    )
    for line in exc.lines:
        err_console.print(f"  {line}", highlight=False, soft_wrap=True, markup=False, emoji=False)


def group(help_text: str):
    """A typer sub-app with the project's defaults."""
    return typer.Typer(help=help_text, no_args_is_help=True, pretty_exceptions_enable=False)


def output_option(help_text: str = "Write the numbers as JSON here."):
    """The ``--output`` option of long commands: the path is checked when parsed, before any work."""

    def checked(value: Path | None) -> Path | None:
        return check_output(value)

    return typer.Option(None, "--output", help=help_text, callback=checked)


def check_output(path: Path | None, option: str = "--output") -> Path | None:
    """Refuse an output file that could not be written, before any long work starts.

    Raises
    ------
    UserError
        ``path`` is a folder, or its folder is missing or not writable.
    """
    if path is None:
        return None
    if path.is_dir():
        raise UserError(f"{option} {path} is a folder; pass a file name")
    parent = path.parent
    if not parent.is_dir():
        raise UserError(f"{option} {path}: the folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise UserError(f"{option} {path}: the folder {parent} is not writable; pick another path")
    return path


def check_out_dir(path: Path, what: str = "the output") -> Path:
    """Refuse an output folder that is an existing file, before any long work starts.

    Raises
    ------
    UserError
        If ``path`` exists and is not a folder.
    """
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} is a file; pass a folder (new or existing) for {what}")
    return path


def eta_progress(description: str, *, on: Console | None = None):
    """A rich bar with ETA and its ``(done, total)`` callback; on a pipe, a log line every 30 s.

    It prints to stderr unless ``on`` names another console, so ``--format json`` output on
    stdout stays clean. Returns ``(progress, update)``; use ``with progress:`` around the work.
    """
    import time

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    out = on or err_console
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=out,
    )
    state: dict = {"task": None, "t0": time.perf_counter(), "first": None, "last_log": 0.0}

    def update(done: int, total: int) -> None:
        now = time.perf_counter()
        if state["task"] is None:
            state["task"] = progress.add_task(description, total=total, completed=done)
            state["first"] = done
        progress.update(state["task"], completed=done)
        if not out.is_terminal and (now - state["last_log"] > 30 or done == total):
            state["last_log"] = now
            rate = (done - state["first"]) / max(now - state["t0"], 1e-9)
            eta = (total - done) / rate if rate > 0 else float("nan")
            out.print(
                f"{description}: {done}/{total}  {rate:.2f}/s  elapsed {now - state['t0']:.0f} s  eta {eta:.0f} s",
                highlight=False,
            )

    return progress, update


@contextmanager
def sigterm_raises():
    """While inside, SIGTERM raises SystemExit (exit code 143), so that cleanup code runs: a
    pw.x being waited for is stopped (``run_pw``) and a campaign releases its lease, instead of
    the process dying on the spot. A no-op outside the main thread (signals go there only)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _exit(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
