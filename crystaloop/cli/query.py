"""``crystaloop query``."""

from __future__ import annotations


def query() -> None:
    """Query candidates."""
