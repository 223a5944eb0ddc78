"""`crystaloop bench campaign`: the loop against random acquisition and against no model."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add the campaign benchmark command to ``app``."""
    app.command("campaign")(bench_campaign)


def bench_campaign(
    config_path: Path = typer.Option(
        Path("configs/demo-surrogate.yaml"), "--config", help="Base campaign file."
    ),
    rounds: int = typer.Option(5, "--rounds", min=1, help="Rounds per arm."),
    fmt: str = typer.Option("table", "--format", help="table or json."),
    output: Path = typer.Option(None, "--output", help="Also write the numbers as JSON here."),
) -> None:
    """Hit rate per round and cumulative hits: loop (uncertainty + retraining), random acquisition, no model."""
    from rich.table import Table

    from crystaloop.cli._common import console
    from crystaloop.db import get_database
    from crystaloop.errors import UserError
    from crystaloop.loop.benchmark import run_benchmark
    from crystaloop.loop.config import load_campaign_config

    if fmt not in ("table", "json"):
        raise UserError(f"unknown format {fmt!r}; use --format table or --format json")
    base = load_campaign_config(config_path)
    result = run_benchmark(
        base, database=get_database(), rounds=rounds, log=lambda line: console.print(line, highlight=False)
    )
    if output:
        output.write_text(json.dumps(result, indent=1, default=str))
    if fmt == "json":
        console.print_json(json.dumps(result, default=str))
        return
    table = Table("arm", "round", "relaxed", "hits", "hit rate", "cumulative hits", "screening MAE (eV/atom)")
    for arm, data in result["arms"].items():
        for row in data["rows"]:
            rate = "-" if row["hit_rate"] is None else f"{100 * row['hit_rate']:.0f} %"
            mae = "-" if row["mae_screening"] is None else f"{row['mae_screening']:.3f}"
            table.add_row(
                arm,
                str(row["round"]),
                str(row["relaxed"]),
                str(row["hits"]),
                rate,
                str(row["cumulative_hits"]),
                mae,
            )
    console.print(table)
