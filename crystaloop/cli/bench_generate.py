"""``crystaloop bench generate``: generation throughput and the paper's Table 2."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from crystaloop.cli._common import output_option


def register(app: typer.Typer) -> None:
    """Add the generation benchmark command to ``app``."""
    app.command("generate")(bench_generate)


def bench_generate(
    config: Path = typer.Option(Path("configs/demo.yaml"), "--config", "-c", help="Campaign YAML file."),
    n: int = typer.Option(200, "--n", min=0, help="Latent samples per throughput run (0: skip)."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Latent vectors per decoder pass."),
    workers: int = typer.Option(None, "--workers", min=1, help="Watershed processes (default: all cores)."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed (and the Table 2 base draw)."),
    compare: bool = typer.Option(
        True, "--compare/--no-compare", help="Also measure without the decoding-time element restriction."
    ),
    uip: bool = typer.Option(None, "--uip/--no-uip", help="Run the CHGNet screen (default: the campaign's)."),
    threads: int = typer.Option(1, "--threads", min=1, help="torch CPU threads."),
    method: str = typer.Option(
        None, "--method", help="Decoder path: paper, pursuit or sites (default: the VAE's)."
    ),
    vae: str = typer.Option(None, "--vae", help="VAE version or checkpoint path (default: the campaign's)."),
    table2: bool = typer.Option(False, "--table2", help="Also reproduce the paper's Table 2."),
    per_base: int = typer.Option(1000, "--per-base", min=1, help="Table 2: samples per base compound."),
    output: Path = output_option(),
    output_format: str = typer.Option("table", "--format", help="table or json."),
) -> None:
    """Candidates per second to validity and through the cascade, time per step; Table 2."""
    import torch

    from crystaloop.cli._common import console
    from crystaloop.cli.generate import wide_console
    from crystaloop.db import get_database
    from crystaloop.errors import UserError
    from crystaloop.loop.bench.generation import measure
    from crystaloop.loop.config import load_campaign_config
    from crystaloop.settings import get_settings

    if output_format not in ("table", "json"):
        raise UserError(f"--format must be 'table' or 'json'; got {output_format!r}")
    torch.set_num_threads(threads)
    campaign = load_campaign_config(config)
    if vae is not None:
        campaign = campaign.model_copy(update={"models": campaign.models.model_copy(update={"vae": vae})})
    database = get_database(get_settings())
    header = {
        "config": str(config),
        "batch_size": batch_size,
        "vae": vae,
        "threads": threads,
        "device": get_settings().resolve_device(),
    }
    result = measure(
        campaign,
        database,
        n=n,
        batch_size=batch_size,
        seed=seed,
        compare=compare,
        uip=uip,
        workers=workers,
        method=method,
        vae=vae,
        table2_per_base=per_base if table2 else None,
        header=header,
        step=console.status,
        log=lambda line: console.log(line, highlight=False),
    )
    if output is not None:
        output.write_text(json.dumps(result, indent=1) + "\n")
    if output_format == "json":
        typer.echo(json.dumps(result, indent=1))
        return
    print_bench(result, wide_console(console))


def print_bench(result: dict, console) -> None:
    """Throughput and Table 2 tables."""

    runs = result["throughput"]
    if runs:
        print_throughput(result, console)
    print_table2(result, console)


def print_throughput(result: dict, console) -> None:
    """The throughput table: one column per variant."""
    from rich.table import Table

    runs = result["throughput"]
    console.print(
        (
            f"Generation throughput, {result['config']}, batch {result['batch_size']}, "
            f"{result['threads']} torch thread(s) on {result['device']}; paper {result['paper_per_s']:.2f}/s, "
            f"target {result['target_per_s_to_valid']:g}/s to validity"
        ),
        highlight=False,
        soft_wrap=True,
    )
    table = Table()
    table.add_column("measure")
    for name in runs:
        table.add_column(name, justify="right")
    rows = [
        ("samples", lambda r: str(r["n"])),
        ("valid (validity rate)", lambda r: f"{r['valid']} ({100 * r['validity_rate']:.0f} %)"),
        ("shortlisted", lambda r: str(r["shortlisted"])),
        ("candidates/s to validity", lambda r: f"{r['per_s_to_valid']:.2f}"),
        ("candidates/s full cascade", lambda r: f"{r['per_s_full_cascade']:.2f}"),
    ]
    for label, fmt in rows:
        table.add_row(label, *(fmt(r) for r in runs.values()))
    steps = list(next(iter(runs.values()))["seconds"])
    for step in steps:
        table.add_row(
            f"  {step} (s, share)",
            *(
                f"{r['seconds'].get(step, 0.0):.2f} ({100 * r['time_share'].get(step, 0.0):.0f} %)"
                for r in runs.values()
            ),
        )
    for stage in next(iter(runs.values()))["stages"]:
        name = stage["stage"]
        table.add_row(
            f"  {name}: in -> out",
            *(
                next((f"{s['n_in']} -> {s['n_out']}" for s in r["stages"] if s["stage"] == name), "-")
                for r in runs.values()
            ),
        )
    console.print(table)


def print_table2(result: dict, console) -> None:
    """Table 2 next to the paper's, one table per variant."""
    from rich.table import Table

    for name, t2 in result.get("table2", {}).items():
        console.print(
            (
                f"Table 2 ({name}): {len(t2['bases'])} bases ({', '.join(t2['bases'])}), "
                f"{t2['per_base']} samples each, mean count scaled to 1000"
            ),
            highlight=False,
            soft_wrap=True,
        )
        table = Table()
        table.add_column("stage")
        table.add_column("paper", justify="right")
        table.add_column("crystaloop", justify="right")
        for stage, value in t2["mean_per_1000"].items():
            paper = t2["paper"].get(stage)
            table.add_row(stage, "-" if paper is None else str(paper), f"{value:.1f}")
        console.print(table)
