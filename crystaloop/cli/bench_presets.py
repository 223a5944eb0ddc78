"""`crystaloop bench presets`: fast, demo and standard on the binary test set."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from crystaloop.cli._common import output_option


def register(app: typer.Typer) -> None:
    """Add the presets benchmark command to ``app``."""
    app.command("presets")(bench_presets)


def bench_presets(
    presets: str = typer.Option("fast,demo,standard", "--presets", help="Comma-separated presets."),
    compounds: str = typer.Option(
        None, "--compounds", help="Comma-separated test-set compounds (default: all)."
    ),
    out_dir: Path = typer.Option(
        None, "--out-dir", help="Per-run JSON results; reruns skip what is there (default: data_dir)."
    ),
    output: Path = output_option("Write the summary as JSON here."),
    fmt: str = typer.Option("table", "--format", help="table or json."),
) -> None:
    """Relax the binary test set per preset: E_f, lattice and pw.x time against experiment and standard."""
    from rich.table import Table

    from crystaloop.cli._common import console
    from crystaloop.errors import UserError
    from crystaloop.loop.bench.presets import run_bench, select_runs, summarise
    from crystaloop.loop.bench.targets import PRESETS
    from crystaloop.settings import get_settings

    if fmt not in ("table", "json"):
        raise UserError(f"unknown format '{fmt}'; choose table or json")
    names, preset_names, family = select_runs(compounds, presets)
    folder = out_dir or get_settings().data_dir / "bench" / "presets"
    results = run_bench(names, preset_names, folder, log=lambda m: console.print(m, highlight=False))
    summary = summarise(results)
    if output:
        output.write_text(json.dumps(summary, indent=2))
    if fmt == "json":
        print(json.dumps(summary, indent=2))
        return
    table = Table(
        title=f"binary test set, family {family.name} (E_f in eV/atom; experiment: {summary['source']})"
    )
    for column in (
        "compound",
        "preset",
        "state",
        "cutoffs (Ry)",
        "E_f",
        "E_f exp",
        "E_f - exp",
        "E_f - standard",
        "a (Å)",
        "a exp",
        "a err (%)",
        "pw.x (s)",
    ):
        table.add_column(column)
    for row in summary["rows"]:
        cut = "-" if row["ecutwfc"] is None else f"{row['ecutwfc']:g}/{row['ecutrho']:g}"
        if row["below_suggested_cutoffs"]:
            cut += " (below)"
        table.add_row(
            row["compound"],
            row["preset"],
            row["state"],
            cut,
            _f(row["formation_energy"]),
            _f(row["exp_ef"]),
            _f(row["ef_minus_exp"]),
            _f(row["ef_minus_standard"]),
            _f(row["a"]),
            _f(row["exp_a"]),
            _f(row["a_error_pct"], ".2f"),
            _f(row["pw_time_s"], ".0f"),
        )
    console.print(table)
    console.print(
        f"targets: standard within {PRESETS['standard_vs_reference_ev']:.2f} eV/atom of the PBE reference "
        "(experiment shown: plain PBE underbinds oxides/nitrides against O2/N2), demo within "
        f"{PRESETS['demo_vs_standard_ev']:.2f} eV/atom of standard, lattice within {PRESETS['lattice_percent']:g} %",
        highlight=False,
    )


def _f(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)
