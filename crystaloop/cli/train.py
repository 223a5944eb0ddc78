"""`crystaloop train` commands: UNet, Cond-DFC-VAE and CGCNN (ensemble)."""

from __future__ import annotations

from pathlib import Path

import typer

from crystaloop.cli._common import check_out_dir, console, eta_progress, group

app = group("Train the UNet, VAE and CGCNN models.")

_CONFIG = typer.Option(..., "--config", "-c", help="Training YAML, e.g. configs/train/cpu/unet.yaml.")
_RESUME = typer.Option(False, "--resume", help="Continue the run of this config from its last epoch.")
_VERSION = typer.Option(None, "--version", help="Version name (default: config name + config hash).")
_OUT = typer.Option(None, "--out", help="Run directory root (default: <data_dir>/models).")
_DEFAULT = typer.Option(
    True, "--default/--no-default", help="Make the trained model the default of its kind (campaigns use it)."
)


def _train(
    kind: str, config_path: Path, resume: bool, version: str | None, out: Path | None, default: bool
) -> None:
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
        default=default,
    )
    shown = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, int | float))
    role = "the default" if default else "not the default"
    console.print(f"registered {doc.kind} {doc.version} ({role}): {shown}", highlight=False)
    console.print(f"checkpoint {doc.checkpoint}", highlight=False)


def _trainer(kind: str, summary: str):
    """Register ``crystaloop train KIND`` (the three trainers take the same options)."""

    def command(
        config: Path = _CONFIG,
        resume: bool = _RESUME,
        version: str = _VERSION,
        out: Path = _OUT,
        default: bool = _DEFAULT,
    ) -> None:
        _train(kind, config, resume, version, out, default)

    command.__name__, command.__doc__ = kind, summary
    return app.command(kind)(command)


unet = _trainer("unet", "Train the 3-D segmentation UNet (species + mask).")
vae = _trainer("vae", "Train the Cond-DFC-VAE (needs a registered UNet for the perceptual loss).")
cgcnn = _trainer("cgcnn", "Train the CGCNN property ensemble.")


@app.command("site-shards")
def site_shards(
    out_dir: Path = typer.Argument(..., help="Directory for shard-*.npz and manifest.json."),
    grid: int = typer.Option(16, "--grid", min=8, help="Voxels per cell edge."),
    split: str = typer.Option("train", "--split", help="train (the held-out formulas left out) or all."),
    limit: int = typer.Option(None, "--limit", min=2, help="Only N structures (a quick test)."),
    dataset: str = typer.Option(
        None, "--dataset", help="Only this loaded dataset (prior-v1, prior-v2 for general cells); default all."
    ),
    mix: list[str] = typer.Option(
        None, "--mix", help="NAME=N: N random records of another dataset with --dataset (data.mix); repeatable."
    ),
) -> None:
    """Site-channel shards of the loaded training data for `python generative/train/gpu.py`."""
    from pydantic import ValidationError

    from crystaloop.db import get_database
    from crystaloop.errors import UserError
    from crystaloop.generative.train.config import DataConfig
    from crystaloop.generative.train.data import composition_split, load_records
    from crystaloop.generative.train.shards import write_site_shards
    from crystaloop.properties import LABEL_NAMES

    if split not in ("train", "all"):
        raise UserError(f"--split must be 'train' or 'all', not {split!r}")
    mixed = {}
    for item in mix or ():
        name, _, count = item.partition("=")
        if not name or not count.isdigit():
            raise UserError(f"--mix {item!r} must read NAME=N, e.g. prior-v1=1000")
        mixed[name] = int(count)
    check_out_dir(out_dir, "the shards")
    try:
        data = DataConfig(grid=grid, limit=limit, dataset=dataset, mix=mixed)
    except ValidationError as error:  # the validator's own message names data.mix
        raise UserError(f"--mix: {error.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    records = load_records(get_database(), data)
    if split == "train":
        records, _ = composition_split(records, data.test_fraction, data.split_seed)
    progress, update = eta_progress("site channels")
    with progress:
        manifest = write_site_shards(records, out_dir, LABEL_NAMES, grid=grid, progress=update)
    console.print(f"wrote {len(records)} samples to {manifest.parent}", highlight=False)


@app.command("lattice-head")
def lattice_head(
    vae: str = typer.Option(
        None, "--vae", help="VAE version or checkpoint (default: the registered default)."
    ),
    version: str = typer.Option(..., "--version", help="Version name of the VAE with the head."),
    hidden: int = typer.Option(128, "--hidden", min=8, help="Hidden width of the head's MLP."),
    epochs: int = typer.Option(300, "--epochs", min=1, help="Passes over the training posteriors."),
    noise: float = typer.Option(1.0, "--noise", min=0.0, help="z = mu + noise * sigma * eps in training."),
    out: Path = _OUT,
) -> None:
    """Train a lattice head on a frozen VAE's latent space and register the VAE with it.

    The encoder's posteriors are cached in the run folder, so a rerun on the same VAE starts from
    the head (a rerun on another VAE encodes again).
    """
    from rich.progress import Progress

    from crystaloop.db import get_database
    from crystaloop.db.registry import ModelRegistry
    from crystaloop.generative.models.shipped import split_metrics
    from crystaloop.generative.train.lattice_head import lattice_head_run
    from crystaloop.generative.train.run import register
    from crystaloop.settings import get_settings

    settings = get_settings()
    database = get_database(settings)
    run_dir = (out or settings.data_dir / "models") / "vae" / version
    with Progress(console=console, transient=True) as bar:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done)

        path, extra, metrics = lattice_head_run(
            database,
            vae,
            run_dir,
            hidden=hidden,
            epochs=epochs,
            noise=noise,
            progress=progress,
            note=lambda line: bar.console.print(line, highlight=False),
        )
    # the source VAE's validation metrics hold for the new version too (same weights)
    source = (
        ModelRegistry(database).get("vae", version=vae) if vae is None or not Path(vae).is_file() else None
    )
    inherited = split_metrics(source.metrics)[0] if source is not None else {}
    doc = register(database, "vae", version, path, extra, {**inherited, **metrics})
    shown = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items())
    console.print(f"registered {doc.kind} {doc.version}: {shown}", highlight=False)
    console.print(f"checkpoint {doc.checkpoint}", highlight=False)
