"""``crystaloop generate``: sample, decode and filter candidates for a campaign."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console


def generate(
    config: Path = typer.Option(..., "--config", "-c", help="Campaign YAML file."),
    n: int = typer.Option(None, "--n", help="Latent samples to draw (default: budget.candidates_per_round)."),
    strategy: str = typer.Option(
        None, "--strategy", help="random, around_base, interpolate, optimize or prototypes (default: sampling.mode)."
    ),
    round: int = typer.Option(0, "--round", min=0, help="Campaign round recorded on the candidates."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Run everything, write nothing."),
    seed: int = typer.Option(None, "--seed", help="Sampling seed (default: from the campaign and round)."),
    restrict: bool = typer.Option(
        None, "--restrict/--no-restrict", help="Restrict decoded species to the campaign's elements."
    ),
    uip: bool = typer.Option(
        None, "--uip/--no-uip", help="Run the CHGNet screen (default: filters.uip_screen)."
    ),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Latent vectors per decoder pass."),
    output_format: str = typer.Option("table", "--format", help="table or json."),
) -> None:
    """Sample candidates, run the filter cascade and store the survivors as shortlisted."""
    from crystaloop.cli._common import console, progress_bar
    from crystaloop.db import get_database
    from crystaloop.errors import UserError
    from crystaloop.loop.config import load_campaign_config
    from crystaloop.loop.generation import generate_candidates
    from crystaloop.settings import get_settings

    if output_format not in ("table", "json"):
        raise UserError(f"--format must be 'table' or 'json'; got {output_format!r}")
    campaign = load_campaign_config(config)
    n = campaign.budget.candidates_per_round if n is None else n
    database = get_database(get_settings())
    kwargs = dict(
        database=database,
        n=n,
        round=round,
        strategy=strategy,
        dry_run=dry_run,
        seed=seed,
        restrict_elements=restrict,
        uip_screen=uip,
        batch_size=batch_size,
    )
    if output_format == "json":
        report = generate_candidates(campaign, **kwargs)
        typer.echo(json.dumps(report.model_dump(mode="json"), indent=1))
        return
    with progress_bar() as bar:
        decode_task = bar.add_task("decode", total=n)
        cascade_task = bar.add_task("filter", total=None)

        def progress(step: str, done: int, total: int) -> None:
            if step == "decode":
                bar.update(decode_task, completed=done, total=total)
            else:
                bar.update(cascade_task, completed=done, total=total, description=f"filter: {step}")

        report = generate_candidates(campaign, progress=progress, **kwargs)
    print_report(report, wide_console(console))


def wide_console(console: Console) -> Console:
    """``console`` on a terminal; a wide one otherwise, so piped tables are never cut."""
    return console if console.is_terminal else Console(width=200, force_terminal=False)


def print_report(report, console: Console) -> None:
    """The cascade table of a :class:`~crystaloop.loop.generation.GenerationReport`."""
    from rich.markup import escape
    from rich.table import Table

    title = (
        f"{report.campaign} round {report.round}: {report.n_requested} {report.strategy} samples, "
        f"seed {report.seed}, species {'restricted' if report.restrict_elements else 'unrestricted'}"
    )
    console.print(title, highlight=False, soft_wrap=True)
    table = Table()
    for name, justify in (("stage", "left"), ("in", "right"), ("out", "right"), ("kept", "right")):
        table.add_column(name, justify=justify)
    table.add_column("seconds", justify="right")
    table.add_column("most frequent rejection", overflow="fold")
    for stage in report.stages:
        reasons = report.rejected_reasons.get(stage.stage, {})
        top = next(iter(reasons.items()), None)
        kept = f"{100 * stage.n_out / stage.n_in:.0f} %" if stage.n_in else "-"
        table.add_row(
            stage.stage,
            str(stage.n_in),
            str(stage.n_out),
            kept,
            f"{stage.seconds:.2f}",
            escape(f"{top[0]} ({top[1]})") if top else "",
        )
    console.print(table)
    verb = "would store" if report.dry_run else "stored"
    console.print(
        f"{verb} {report.n_shortlisted} shortlisted candidate(s) "
        f"(generation {report.generation_id}); models: "
        + ", ".join(f"{k} {v}" for k, v in report.model_versions.items())
        + f"; total {report.total_seconds:.1f} s (decode {report.seconds.get('decode', 0.0):.1f} s)",
        highlight=False,
        soft_wrap=True,
    )
