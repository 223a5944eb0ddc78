"""`crystaloop bench realism`: CHGNet-relaxed non-cubic prototypes against experimental volumes."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from crystaloop.cli._common import output_option


def register(app: typer.Typer) -> None:
    """Add the realism benchmark command to ``app``."""
    app.command("realism")(bench_realism)


def bench_realism(
    compounds: str = typer.Option(None, "--compounds", help="Comma-separated compounds (default: all)."),
    output: Path = output_option("Write the rows as JSON here."),
    fmt: str = typer.Option("table", "--format", help="table or json."),
) -> None:
    """Relax ZnO, TiO2, NiAs, Al2O3, CdI2, MoS2 and BaFe2As2 built from AFLOW prototypes; volume per atom vs experiment."""
    from rich.table import Table

    from crystaloop.cli._common import console
    from crystaloop.errors import UserError
    from crystaloop.loop.bench.realism import load_experimental, measure, summarise
    from crystaloop.loop.bench.targets import REALISM_PERCENT

    if fmt not in ("table", "json"):
        raise UserError(f"unknown format '{fmt}'; choose table or json")
    table_data = load_experimental()["compounds"]
    names = [c.strip() for c in compounds.split(",") if c.strip()] if compounds else list(table_data)
    unknown = sorted(set(names) - set(table_data))
    if unknown:
        raise UserError(f"unknown compounds {', '.join(unknown)}; choose from {', '.join(table_data)}")
    rows = measure(names)
    summary = summarise(rows)
    if output:
        output.write_text(json.dumps(summary, indent=2))
    if fmt == "json":
        print(json.dumps(summary, indent=2))
        return
    table = Table(title=f"CHGNet-relaxed volume per atom vs experiment (target within {REALISM_PERCENT:g} %)")
    for column in ("compound", "prototype", "in decorated set", "system", "V start", "V CHGNet",
                   "V exp", "error (%)", "a err (%)", "c err (%)", "hit", "relaxed", "source"):  # fmt: skip
        table.add_column(column)
    for r in rows:
        in_set = "n/a (Wyckoff split)" if r.in_decorations is None else (
            "yes" if r.in_decorations and r.in_size_limits else
            ("no (cell edge/size limits)" if not r.in_size_limits else "no"))  # fmt: skip
        table.add_row(
            r.name, r.prototype, in_set, r.crystal_system or "-", f"{r.volume_start:.3f}",
            f"{r.volume_relaxed:.3f}", f"{r.volume_experiment:.3f}", f"{r.error_percent:+.2f}",
            f"{r.a_error_percent:+.2f}", f"{r.c_error_percent:+.2f}",
            "yes" if r.hit else "NO", "yes" if r.relax_converged else "no", r.source,
        )  # fmt: skip
    console.print(table)
    console.print(f"{summary['hits']} of {summary['compounds']} within {REALISM_PERCENT:g} % (volumes in A^3/atom)")
