"""`crystaloop bench db`."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the db benchmark command to ``app``."""
