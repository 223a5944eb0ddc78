"""`crystaloop bench dft`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from crystaloop.cli._common import output_option


def register(app: typer.Typer) -> None:
    """Add the dft benchmark command to ``app``."""
    app.command("dft")(bench_dft)


def bench_dft(
    presets: str = typer.Option("fast,standard", "--presets", help="Comma-separated presets."),
    cells: str = typer.Option("si,demo", "--cells", help="si (2 atoms), demo (4-atom 2H-SiC)."),
    repeats: int = typer.Option(3, "--repeats", min=1, help="Timed runs per fast-preset cell."),
    standard_repeats: int = typer.Option(1, "--standard-repeats", min=1),
    output: Path = output_option(),
) -> None:
    """Framework overhead per relaxation (s, % of pw.x) and time per relaxation by preset."""
    from rich.table import Table

    from crystaloop.cli._common import console
    from crystaloop.dft.espresso.inputs import load_preset
    from crystaloop.dft.espresso.run import pw_available
    from crystaloop.dft.pseudos import family_from_settings
    from crystaloop.errors import UserError
    from crystaloop.loop.bench.dft import CELLS, framework_only, summarise, time_relaxations
    from crystaloop.loop.bench.targets import DFT_OVERHEAD, QUACC_OVERHEAD

    preset_names = [p.strip() for p in presets.split(",") if p.strip()]
    cell_names = [c.strip() for c in cells.split(",") if c.strip()]
    unknown = sorted(set(cell_names) - set(CELLS))
    if unknown:
        raise UserError(f"unknown cells {', '.join(unknown)}; choose from {', '.join(CELLS)}")
    for name in preset_names:
        load_preset(name)
    if not pw_available():
        raise UserError("pw.x not found; install quantum-espresso or set CRYSTALOOP_PW_COMMAND")
    family = family_from_settings()
    for cell in cell_names:
        family.require(CELLS[cell]())
    timings = time_relaxations(
        cell_names, preset_names, repeats=repeats, standard_repeats=standard_repeats, step=console.status
    )
    summary = summarise(timings)
    table = Table(title="crystaloop relaxations (run_local, MongoDB JobStore, median)")
    for column in ("cell", "atoms", "preset", "runs", "state", "total (s)", "pw.x process (s)",
                   "overhead (s)", "overhead (%)", "pw.x reported (s)", "total - reported (s)"):
        table.add_column(column)
    for row in summary["rows"]:
        table.add_row(
            f"{row['cell']} ({row['formula']})",
            str(row["nsites"]),
            row["preset"],
            str(row["runs"]),
            ",".join(row["states"]),
            f"{row['total_s']:.2f}",
            f"{row['pw_wall_s']:.2f}",
            f"{row['overhead_s']:.3f}",
            f"{row['overhead_pct']:.1f}",
            f"{row['pw_reported_s']:.2f}",
            f"{row['overhead_vs_reported_s']:.3f}",
        )
    console.print(table)
    with console.status("framework only: replaying each cell's pw.x output"):
        framework = framework_only(timings)
    for key, value in framework.items():
        console.print(
            f"framework only ({key}, pw.x replayed, 10 runs): median {value['median_s']:.3f} s, "
            f"max {value['max_s']:.3f} s"
        )
    summary["framework_only"] = framework
    console.print(
        f"targets: overhead <= {DFT_OVERHEAD['overhead_s']:g} s per job, and "
        f"<= {DFT_OVERHEAD['demo_overhead_percent']:g} % on the demo cell (anchor: {QUACC_OVERHEAD})"
    )
    if output:
        output.write_text(json.dumps(summary, indent=2))
        console.print(f"wrote {output}")
