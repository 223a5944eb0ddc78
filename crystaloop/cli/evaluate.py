"""`crystaloop evaluate` commands: reconstruction (Table 5), properties (Table 1) and sampling."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import typer

from crystaloop.cli._common import check_output, console, eta_progress, group

app = group("Evaluate trained models against the papers' tables.")

_LIMIT = typer.Option(None, "--limit", min=1, help="Random held-out subset of N (fixed seed).")
_SEED = typer.Option(0, "--seed", help="Seed of the --limit subset.")
_FORMAT = typer.Option("table", "--format", help="table or json.")


def _check_plot(path: Path | None) -> Path | None:
    """Refuse a --plot path that could not be written (or is no image format), before any work.

    Raises
    ------
    UserError
        The folder is missing or not writable, or matplotlib cannot write the file's suffix.
    """
    from crystaloop.errors import UserError

    if check_output(path, "--plot") is None:
        return None
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix.lower().lstrip(".") not in formats:
        raise UserError(f"--plot {path}: matplotlib cannot write {path.suffix!r} files; end the name in .png")
    return path


def _check_format(fmt: str) -> Literal["table", "json"]:
    from crystaloop.errors import UserError

    if fmt not in ("table", "json"):
        raise UserError(f"--format must be 'table' or 'json', not {fmt!r}")
    return fmt  # type: ignore[return-value]


def _command(name: str, **options) -> str:
    """The evaluate command line as given (options left at None are omitted)."""
    parts = ["crystaloop", "evaluate", name]
    for key, value in options.items():
        if value is not None:
            parts += [f"--{key.replace('_', '-')}", str(value)]
    return " ".join(parts)


_SYMPREC = typer.Option(
    None,
    "--symprec",
    help="Symmetrise each decoded crystal onto the space group spglib finds at this tolerance (angstrom, e.g. 0.3).",
)


def _check_symprec(symprec: float | None) -> None:
    from crystaloop.errors import UserError

    if symprec is not None and not 0 < symprec <= 1.0:
        raise UserError(f"--symprec must be in (0, 1] angstrom, not {symprec}; 0.3 suits decoded samples")


_MANIFEST = typer.Option(
    False,
    "--update-manifest",
    help="Also write the numbers into the shipped checkpoints' manifest (for maintainers shipping models).",
)


def _record(
    database,
    kinds: dict[str, str | None],
    command: str,
    metrics: dict,
    key: str = "held_out",
    *,
    manifest: bool = False,
) -> None:
    """Write evaluate output into the registry entries evaluated (and, with ``manifest``, into the
    shipped manifest entries of those that are shipped)."""
    from crystaloop.generative.models.shipped import record_held_out
    from crystaloop.generative.train.run import resolve_checkpoint

    for kind, reference in kinds.items():
        record_held_out(
            database,
            resolve_checkpoint(reference, kind, database),
            command,
            metrics,
            key=key,
            manifest=manifest,
        )


def _numbers(metrics: dict) -> dict:
    """The numeric shares and timings of a sampling report (distributions and paths left out)."""
    return {k: v for k, v in metrics.items() if isinstance(v, int | float) and k != "paper_valid_share"}


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def split_reconstruction(metrics: dict) -> tuple[dict, dict]:
    """The reconstruction numbers that belong to the VAE, and those that belong to the UNet (its
    recall on true densities, which does not depend on the VAE); both keep ``n_structures``."""
    vae_only = {k: v for k, v in metrics.items() if not k.startswith("unet_")}
    unet_only = {k: v for k, v in metrics.items() if k == "n_structures" or k.startswith("unet_")}
    return vae_only, unet_only


@app.command("reconstruction")
def reconstruction(
    vae: str = typer.Option(None, "--vae", help="VAE version or checkpoint (default: registry default)."),
    unet: str = typer.Option(None, "--unet", help="UNet version or checkpoint (default: registry default)."),
    method: str = typer.Option(
        None, "--method", help="Decoding path: paper, pursuit or sites (default: the VAE's)."
    ),
    lattice: str = typer.Option(
        "auto", "--lattice", help="Lattice source: auto (the VAE's lattice head when stored), head or fit."
    ),
    limit: int = _LIMIT,
    seed: int = _SEED,
    symprec: float = _SYMPREC,
    fmt: str = _FORMAT,
    update_manifest: bool = _MANIFEST,
) -> None:
    """VAE + UNet + watershed reconstruction of held-out crystals, against the paper's Table 5."""
    from rich.table import Table

    from crystaloop.db import get_database
    from crystaloop.generative.evaluate import evaluate_reconstruction
    from crystaloop.loop.bench.targets import PAPER_TABLE5, RECONSTRUCTION

    fmt = _check_format(fmt)
    _check_symprec(symprec)
    database = get_database()
    progress, update = eta_progress("reconstructing")
    with progress:
        metrics = evaluate_reconstruction(
            database,
            vae=vae,
            unet=unet,
            limit=limit,
            seed=seed,
            method=method,
            lattice=lattice,
            symprec=symprec,
            progress=update,
        )
    command = _command(
        "reconstruction",
        vae=vae,
        unet=unet,
        method=method,
        lattice=lattice if lattice != "auto" else None,
        limit=limit,
        seed=seed or None,
        symprec=symprec,
    )
    vae_only, unet_only = split_reconstruction(metrics)
    key = "held_out" if symprec is None else "held_out_symmetrized"
    _record(database, {"vae": vae}, command, vae_only, key=key, manifest=update_manifest)
    if symprec is None:  # the UNet's recall does not depend on the symmetrisation
        _record(database, {"unet": unet}, command, unet_only, manifest=update_manifest)
    if fmt == "json":
        print(json.dumps(metrics))
        return
    table = Table(
        title=f"reconstruction ({metrics['n_structures']} held-out structures, {metrics['method']} decoding)"
    )
    for column in ("metric", "this model", "paper", "target"):
        table.add_column(column)
    for key, value in metrics.items():
        if key in ("method", "lattice", "symprec", "by_crystal_system"):
            continue
        target = RECONSTRUCTION.get(key)
        table.add_row(
            key, _fmt(value), _fmt(PAPER_TABLE5.get(key)), f"{target[0]} {target[1]}" if target else ""
        )
    console.print(table)
    systems = Table(title="by crystal system of the true crystal")
    for column in ("crystal system", "n", "match rate", "lattice MAE (A)", "angle MAE (deg)"):
        systems.add_column(column)
    for system, row in metrics["by_crystal_system"].items():
        systems.add_row(
            system, str(row["n"]), _fmt(row["match_rate"]), _fmt(row["lattice_mae_angstrom"]),
            _fmt(row["angle_mae_degrees"]),
        )  # fmt: skip
    console.print(systems)


@app.command("properties")
def properties(
    model: str = typer.Option(
        None, "--model", help="CGCNN version or checkpoint (default: registry default)."
    ),
    limit: int = _LIMIT,
    seed: int = _SEED,
    fmt: str = _FORMAT,
    update_manifest: bool = _MANIFEST,
    plot: Path = typer.Option(None, "--plot", help="Write a parity-plot PNG here.", callback=_check_plot),
) -> None:
    """CGCNN MAE, SMAPE and ensemble calibration on held-out crystals, against Table 1."""
    from rich.table import Table

    from crystaloop.db import get_database
    from crystaloop.generative.evaluate import evaluate_properties
    from crystaloop.loop.bench.targets import PAPER_TABLE1_MAE, PROPERTY_MAE
    from crystaloop.properties import property_spec

    fmt = _check_format(fmt)
    database = get_database()
    metrics = evaluate_properties(
        database, model=model, limit=limit, seed=seed, plot=str(plot) if plot else None
    )
    _record(
        database,
        {"cgcnn": model},
        _command("properties", model=model, limit=limit, seed=seed or None),
        metrics,
        manifest=update_manifest,
    )
    if fmt == "json":
        print(json.dumps(metrics))
        return
    table = Table(title=f"properties ({metrics['n_structures']} held-out structures)")
    for column in ("property", "MAE", "SMAPE %", "within 1σ", "within 2σ", "paper MAE", "target MAE"):
        table.add_column(column)
    for name, mae in metrics.get("mae", {}).items():
        unit = property_spec(name).unit
        target = PROPERTY_MAE.get(name)
        table.add_row(
            f"{name} ({unit})" if unit else name,
            _fmt(mae),
            _fmt(metrics.get("smape", {}).get(name)),
            _fmt(metrics.get("within_1sigma", {}).get(name)),
            _fmt(metrics.get("within_2sigma", {}).get(name)),
            _fmt(PAPER_TABLE1_MAE.get(name)),
            f"<= {target}" if target else "",
        )
    console.print(table)
    if plot:
        console.print(f"parity plot: {plot}", highlight=False)


@app.command("sampling")
def sampling(
    n: int = typer.Option(100, "--n", min=1, help="Samples to decode."),
    strategy: str = typer.Option(
        "random",
        "--strategy",
        help="random (z from the VAE's fitted latent prior, else N(0, I)) or around_base (sigma = sqrt(0.5)).",
    ),
    prior: str = typer.Option(
        "auto", "--prior", help="Latent prior of random samples: auto (fitted when stored), fitted or normal."
    ),
    method: str = typer.Option(
        None, "--method", help="Decoding path: paper, pursuit or sites (default: the VAE's)."
    ),
    lattice: str = typer.Option(
        "auto", "--lattice", help="Lattice source: auto (the VAE's lattice head when stored), head or fit."
    ),
    vae: str = typer.Option(None, "--vae", help="VAE version or checkpoint (default: registry default)."),
    unet: str = typer.Option(None, "--unet", help="UNet version or checkpoint (default: registry default)."),
    workers: int = typer.Option(None, "--workers", min=1, help="Watershed processes (default: all cores)."),
    seed: int = _SEED,
    symprec: float = _SYMPREC,
    fmt: str = _FORMAT,
    update_manifest: bool = _MANIFEST,
) -> None:
    """Decode N samples and report the shares that are decoded, valid (before and after the decoder's
    repairs), charge-balanced (pymatgen and SMACT), novel (by composition, structure and prototype)
    and unique."""
    from rich.table import Table

    from crystaloop.db import get_database
    from crystaloop.errors import UserError
    from crystaloop.generative.evaluate import evaluate_sampling
    from crystaloop.loop.bench.targets import SAMPLING

    fmt = _check_format(fmt)
    if strategy not in ("random", "around_base"):
        raise UserError(f"--strategy must be 'random' or 'around_base', not {strategy!r}")
    if prior not in ("auto", "fitted", "normal"):
        raise UserError(f"--prior must be 'auto', 'fitted' or 'normal', not {prior!r}")
    _check_symprec(symprec)
    database = get_database()
    progress, update = eta_progress("decoding samples")
    with progress:
        metrics = evaluate_sampling(
            database,
            n=n,
            strategy=strategy,
            vae=vae,
            unet=unet,
            seed=seed,
            method=method,
            workers=workers,
            prior=prior,
            lattice=lattice,
            symprec=symprec,
            progress=update,
        )
    normal = strategy == "random" and prior == "normal"
    command = _command(
        "sampling",
        n=n,
        strategy=strategy,
        prior=prior if prior != "auto" else None,
        method=method,
        lattice=lattice if lattice != "auto" else None,
        vae=vae,
        unet=unet,
        seed=seed or None,
        symprec=symprec,
    )
    key = ("sampling_normal" if normal else f"sampling_{strategy}") + ("_symmetrized" if symprec else "")
    _record(database, {"vae": vae}, command, _numbers(metrics), key=key, manifest=update_manifest)
    if fmt == "json":
        print(json.dumps(metrics))
        return
    symmetrized = f", symmetrised at {symprec} A" if symprec else ""
    table = Table(title=f"sampling ({n} {strategy} samples, {metrics['method']} decoding{symmetrized})")
    for column in ("measure", "this model", "paper", "target"):
        table.add_column(column, overflow="fold")
    for key, value in metrics.items():
        if key == "crystal_systems":  # samples vs training, per system
            rows = value["by_system"].items()
            value = ", ".join(f"{k}: {r['samples']:.2f} vs {r['training']:.2f}" for k, r in rows)
            value += f" (largest gap {metrics['crystal_systems']['largest_gap_points']:.1f} points)"
        elif isinstance(value, dict):
            value = ", ".join(f"{k}: {v}" for k, v in value.items()) or "-"
        target = SAMPLING.get(key)
        if isinstance(target, dict):
            target = target.get(strategy)
        # the paper's share was measured with no merge or lattice bounds: it compares with the share
        # before them; the share after them is true by construction on the sites path
        paper = metrics["paper_valid_share"] if key == "valid_before_repair_share" else None
        if key in ("paper_valid_share", "symprec"):
            continue
        table.add_row(
            key,
            value if isinstance(value, str) else _fmt(value),
            _fmt(paper),
            f"{target[0]} {target[1]}" if target else "",
        )
    console.print(table)
    console.print(
        "valid_share counts the decoder's output after it merges peaks closer than 0.9 Å and rejects "
        "lattices outside its bounds, so it is partly true by construction; valid_before_repair_share "
        "is the measurement, and the one the paper's share compares with.",
        highlight=False,
    )


@app.command("candidates")
def candidates(
    campaign: str = typer.Argument(..., help="Campaign name."),
    model: str = typer.Option(
        None, "--model", help="CGCNN version or checkpoint (default: registry default)."
    ),
    from_round: int = typer.Option(
        0, "--from-round", min=0, help="Only candidates selected in this round (from 0) or later."
    ),
    fmt: str = _FORMAT,
    plot: Path = typer.Option(
        None,
        "--plot",
        help="Write a parity plot (PNG) of predicted against DFT values here.",
        callback=_check_plot,
    ),
) -> None:
    """A CGCNN's errors on a campaign's DFT-relaxed candidates, from their decoded structures."""
    from rich.table import Table

    from crystaloop.db import get_database
    from crystaloop.loop.accuracy import campaign_accuracy

    fmt = _check_format(fmt)
    metrics = campaign_accuracy(
        get_database(), campaign, model=model, from_round=from_round, plot=str(plot) if plot else None
    )
    if fmt == "json":
        print(json.dumps(metrics))
        return
    table = Table(
        title=f"{metrics['n_candidates']} relaxed candidates of {campaign} (rounds >= {from_round})"
    )
    columns = ("n", "mae", "bias", "rmse", "within_1sigma", "within_2sigma", "sigma_scale", "mae_screening")
    table.add_column("property")
    for column in columns:
        table.add_column(column.replace("_", " "))
    for name, row in metrics["properties"].items():
        table.add_row(name, *(_fmt(row[c]) for c in columns))
    console.print(table)
    console.print(
        f"model {metrics['model']}; predicted in every window: {metrics['predicted_in_window']}, of which "
        f"DFT hits: {_fmt(metrics['in_window_precision'])} (all hits: {metrics['hits']})",
        highlight=False,
    )
    if plot:
        console.print(f"parity plot: {plot}", highlight=False)
