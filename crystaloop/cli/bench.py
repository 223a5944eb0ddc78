"""``crystaloop bench``: benchmarks whose numbers go in issue notes and the README."""

from __future__ import annotations

from crystaloop.cli._common import group

app = group("Benchmarks with numbers to report.")
