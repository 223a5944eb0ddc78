"""``crystaloop bench db``."""

from __future__ import annotations

import json

import typer

from crystaloop.cli._common import console


def register(app: typer.Typer) -> None:
    """Add the database benchmark command to ``app``."""

    @app.command("db")
    def bench_db(
        n: int = typer.Option(100_000, "-n", min=1, help="Candidates to insert."),
        batch: int = typer.Option(2_000, min=1, help="Insert batch size."),
        repeats: int = typer.Option(20, min=1, help="Repetitions per query (median reported)."),
        uri: str = typer.Option(None, help="Benchmark this server instead of a fresh embedded one."),
        legacy: bool = typer.Option(
            False,
            "--legacy",
            help="Also time the queries on the full documents alone (the layout before summaries).",
        ),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    ) -> None:
        """Insert N candidates and time a window query, an elements query and a status count."""
        from rich.progress import Progress
        from rich.table import Table

        from crystaloop.loop.bench.database import run_on_server

        with Progress(console=console, transient=True) as bar:
            task = bar.add_task("inserting", total=n)
            target, result = run_on_server(
                uri,
                n=n,
                batch=batch,
                repeats=repeats,
                legacy=legacy,
                progress=lambda k: bar.advance(task, k),
            )
        if as_json:
            print(json.dumps({"target": target, **result.__dict__}))
            return
        table = Table(title=f"candidate store on {target}, {result.n:,} candidates")
        table.add_column("measure")
        table.add_column("value", justify="right")
        if legacy:
            table.add_column("full documents alone", justify="right")
        table.add_column("plan")
        extra = [f"{result.legacy_inserts_per_second:,.0f}"] if legacy else []
        phases = ", ".join(f"{name} {sec:.1f}" for name, sec in result.insert_phase_seconds.items())
        table.add_row(
            "inserts/s",
            f"{result.inserts_per_second:,.0f}",
            *extra,
            f"{result.insert_seconds:.1f} s total ({phases} s)",
        )
        for name, ms in result.query_ms.items():
            old = [f"{result.legacy_query_ms[name]:.1f}"] if legacy else []
            table.add_row(f"{name} (median ms)", f"{ms:.1f}", *old, result.plans.get(name, ""))
        console.print(table)
