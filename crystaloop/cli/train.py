"""`crystaloop train` commands: UNet, Cond-DFC-VAE and CGCNN (ensemble)."""

from __future__ import annotations

from pathlib import Path

import typer

from crystaloop.cli._common import console, group

app = group("Train the UNet, VAE and CGCNN models.")

_CONFIG = typer.Option(..., "--config", "-c", help="Training YAML, e.g. configs/train/cpu/unet.yaml.")
_RESUME = typer.Option(False, "--resume", help="Continue the run of this config from its last epoch.")
_VERSION = typer.Option(None, "--version", help="Version name (default: config name + config hash).")
_OUT = typer.Option(None, "--out", help="Run directory root (default: <data_dir>/models).")


def _train(kind: str, config_path: Path, resume: bool, version: str | None, out: Path | None) -> None:
    from crystaloop.db import get_database
    from crystaloop.generative.train.config import load_train_config
    from crystaloop.generative.train.run import default_version, train_and_register
    from crystaloop.settings import get_settings

    config = load_train_config(config_path, kind)
    settings = get_settings()
    version = version or default_version(config_path.stem, config)
    root = out or settings.data_dir / "models"
    console.print(f"training {kind} {version} -> {root / kind / version}", highlight=False)
    doc, metrics = train_and_register(
        kind,
        config,
        get_database(settings),
        root,
        version=version,
        resume=resume,
        device=settings.device,
        console=console,
    )
    shown = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, int | float))
    console.print(f"registered {doc.kind} {doc.version}: {shown}", highlight=False)
    console.print(f"checkpoint {doc.checkpoint}", highlight=False)


@app.command("unet")
def unet(config: Path = _CONFIG, resume: bool = _RESUME, version: str = _VERSION, out: Path = _OUT) -> None:
    """Train the 3-D segmentation UNet (species + mask)."""
    _train("unet", config, resume, version, out)


@app.command("vae")
def vae(config: Path = _CONFIG, resume: bool = _RESUME, version: str = _VERSION, out: Path = _OUT) -> None:
    """Train the Cond-DFC-VAE (needs a registered UNet for the perceptual loss)."""
    _train("vae", config, resume, version, out)


@app.command("cgcnn")
def cgcnn(config: Path = _CONFIG, resume: bool = _RESUME, version: str = _VERSION, out: Path = _OUT) -> None:
    """Train the CGCNN property ensemble."""
    _train("cgcnn", config, resume, version, out)


@app.command("site-shards")
def site_shards(
    out_dir: Path = typer.Argument(..., help="Directory for shard-*.npz and manifest.json."),
    grid: int = typer.Option(16, "--grid", min=8, help="Voxels per cell edge."),
    split: str = typer.Option("train", "--split", help="train (the held-out formulas left out) or all."),
    limit: int = typer.Option(None, "--limit", min=2, help="Only N structures (a quick test)."),
) -> None:
    """Site-channel shards of the loaded training data for `python generative/train/gpu.py`."""
    from crystaloop.db import get_database
    from crystaloop.errors import UserError
    from crystaloop.generative.train.config import DataConfig
    from crystaloop.generative.train.data import composition_split, load_records
    from crystaloop.generative.train.shards import write_site_shards
    from crystaloop.properties import PROPERTY_NAMES

    if split not in ("train", "all"):
        raise UserError(f"--split must be 'train' or 'all', not {split!r}")
    data = DataConfig(grid=grid, limit=limit)
    records = load_records(get_database(), data)
    if split == "train":
        records, _ = composition_split(records, data.test_fraction, data.split_seed)
    manifest = write_site_shards(records, out_dir, PROPERTY_NAMES, grid=grid)
    console.print(f"wrote {len(records)} samples to {manifest.parent}", highlight=False)
