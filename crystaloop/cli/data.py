"""`crystaloop data` commands."""

from __future__ import annotations

from crystaloop.cli._common import group

app = group("data commands.")
