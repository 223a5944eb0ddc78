"""``crystaloop campaign`` commands."""

from __future__ import annotations

from pathlib import Path

import typer

from crystaloop.cli._common import console, group

app = group("Validate, run and report campaigns.")


@app.command("validate")
def validate(path: Path = typer.Argument(..., help="Campaign YAML file.")) -> None:
    """Check a campaign file; print one line per problem (exit 2) or a summary."""
    from crystaloop.loop.config import load_campaign_config
    from crystaloop.properties import PROPERTIES

    config = load_campaign_config(path)
    windows = []
    for t in config.targets:
        unit = PROPERTIES[t.property].unit
        lo = "-inf" if t.min is None else f"{t.min:g}"
        hi = "+inf" if t.max is None else f"{t.max:g}"
        windows.append(f"{t.property} in [{lo}, {hi}]{' ' + unit if unit else ''}")
    console.print(f"[green]ok[/] {path}: campaign [bold]{config.name}[/]", highlight=False)
    console.print(f"  targets: {'; '.join(windows)}", highlight=False)
    console.print(
        f"  classes: {', '.join(config.material_classes)}; rounds: {config.max_rounds}; "
        f"per round: {config.budget.candidates_per_round} generated, {config.budget.dft_per_round} DFT; "
        f"dft: {config.dft.engine}/{config.dft.preset}; backend: {config.execution.backend}",
        highlight=False,
    )
