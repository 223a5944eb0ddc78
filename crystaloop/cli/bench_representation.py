"""`crystaloop bench representation`."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the representation benchmark command to ``app``."""
