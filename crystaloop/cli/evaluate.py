"""`crystaloop evaluate` commands."""

from __future__ import annotations

from crystaloop.cli._common import group

app = group("Evaluate trained models against the papers' tables.")
