"""`crystaloop bench representation`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from crystaloop.cli._common import output_option


def register(app: typer.Typer) -> None:
    """Add the representation benchmark command to ``app``."""
    app.command("representation")(bench_representation)


def bench_representation(
    n: int = typer.Option(2100, "--n", help="Structures in the benchmark set."),
    grid: int = typer.Option(32, "--grid", help="Voxels per cell edge."),
    seed: int = typer.Option(0, "--seed", help="Seed of the benchmark set."),
    compare: bool = typer.Option(
        True, "--compare/--no-compare", help="Also run the paper's non-periodic variant."
    ),
    output: Path = output_option(),
) -> None:
    """Round trip voxelize -> segment -> to_structure: accuracy table and median ms per step."""
    from rich.progress import Progress
    from rich.table import Table

    from crystaloop.cli._common import console
    from crystaloop.errors import UserError
    from crystaloop.loop.bench.roundtrip import (
        CLASSES,
        benchmark_structures,
        by_prototype,
        result_document,
        run_round_trip,
        summarize,
    )
    from crystaloop.loop.bench.targets import ROUNDTRIP, ROUNDTRIP_SPEED_MS

    if n < 1:
        raise UserError(f"--n must be at least 1; got {n}")
    if grid < 8:
        raise UserError(f"--grid must be at least 8 voxels; got {grid}")
    items = benchmark_structures(n, seed=seed)
    variants = {"periodic": True, "periodic=False": False} if compare else {"periodic": True}
    results = {}
    with Progress(console=console, transient=True) as progress:
        for name, periodic in variants.items():
            task = progress.add_task(f"{name} round trip", total=len(items))
            results[name] = run_round_trip(
                items, grid=grid, periodic=periodic, progress=lambda t=task: progress.advance(t)
            )
    summaries = {name: summarize(rs) for name, rs in results.items()}

    counts = {c: sum(item.prototype == c for item in items) for c in CLASSES}
    shifted = sum(item.shifted for item in items)
    title = (
        f"Representation round trip, grid {grid}: {n} cubic structures "
        f"({', '.join(f'{k} {v}' for k, v in counts.items())}; "
        f"{n - shifted} in the standard setting with atoms on corners/faces)"
    )
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("target")
    for name in summaries:
        table.add_column(name, justify="right")
    rows = [
        ("exact number of sites", "exact_site_count_share", "pct"),
        ("mean |ΔN_sites|", "mean_abs_site_count_error", "f3"),
        ("sites with the right species", "species_accuracy", "pct"),
        ("mean site displacement (Å)", "mean_displacement_angstrom", "f4"),
        ("lattice MAE (Å)", "lattice_mae_angstrom", "e"),
        ("StructureMatcher equivalent", "structure_match_share", "pct"),
        ("median voxelize (ms)", "median_voxelize_ms", "f2"),
        ("median segment (ms)", "median_segment_ms", "f2"),
    ]
    speed = {f"median_{step}_ms": limit for step, limit in ROUNDTRIP_SPEED_MS.items()}
    for label, key, fmt in rows:
        if key in ROUNDTRIP:
            op, value = ROUNDTRIP[key]
            target = f"{op} {_format(value, fmt)}"
        elif key in speed:
            target = f"<= {speed[key]:g}"
        else:
            target = ""
        table.add_row(label, target, *(_format(getattr(s, key), fmt) for s in summaries.values()))
    console.print(table)

    per_class = Table(title="By prototype: exact site count / StructureMatcher equivalent")
    per_class.add_column("prototype")
    for name in summaries:
        per_class.add_column(name, justify="right")
    split = {name: by_prototype(rs) for name, rs in results.items()}
    for prototype in CLASSES:
        cells = []
        for parts in split.values():
            s = parts[prototype]
            cells.append(
                "-"
                if s is None
                else f"{_format(s.exact_site_count_share, 'pct')} / {_format(s.structure_match_share, 'pct')}"
            )
        per_class.add_row(prototype, *cells)
    console.print(per_class)

    missed = summaries["periodic"].missed_targets()
    console.print("periodic: all targets met" if not missed else f"periodic: missed {', '.join(missed)}")
    if output is not None:
        payload = result_document(n=n, grid=grid, seed=seed, results=results)
        output.write_text(json.dumps(payload, indent=2))
        console.print(f"wrote {output}")


def _format(value: float, fmt: str) -> str:
    if fmt == "pct":
        return f"{100.0 * value:.2f} %"
    if fmt == "e":
        return f"{value:.1e}"
    return f"{value:.{fmt[1:]}f}"
