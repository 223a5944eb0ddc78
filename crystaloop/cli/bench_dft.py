"""`crystaloop bench dft`."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the dft benchmark command to ``app``."""
