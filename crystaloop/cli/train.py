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
