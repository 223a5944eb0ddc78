"""`crystaloop models` commands: list registered models and register the shipped defaults."""

from __future__ import annotations

from pathlib import Path

import typer

from crystaloop.cli._common import console, group

app = group("The registry of trained models.")


@app.command("list")
def list_models(kind: str = typer.Option(None, "--kind", help="unet, vae, cgcnn or cgcnn-ensemble.")) -> None:
    """Show registered models, newest first."""
    from typing import get_args

    from rich.table import Table

    from crystaloop.db import get_database
    from crystaloop.db.documents import ModelDoc
    from crystaloop.db.registry import ModelRegistry
    from crystaloop.errors import UserError

    kinds = get_args(ModelDoc.model_fields["kind"].annotation)
    if kind is not None and kind not in kinds:
        raise UserError(f"--kind {kind!r} is not a model kind; use one of {', '.join(kinds)}")
    docs = ModelRegistry(get_database()).list(kind)
    if not docs:
        console.print("no models registered; train one or run `crystaloop models load-default`")
        return
    table = Table(title="models")
    for column in ("kind", "version", "default"):
        table.add_column(column, no_wrap=True)
    for column in ("dataset", "metrics", "checkpoint", "created"):
        table.add_column(column, overflow="fold")
    for doc in docs:
        metrics = ", ".join(f"{k}={v:.3g}" for k, v in list(doc.metrics.items())[:3] if v is not None)
        table.add_row(
            doc.kind,
            doc.version,
            "yes" if doc.default else "",
            doc.dataset_hash,
            metrics,
            doc.checkpoint,
            doc.created_at.strftime("%Y-%m-%d %H:%M"),
        )
    console.print(table)


@app.command("load-default")
def load_default() -> None:
    """Register the checkpoints shipped with crystaloop (see their manifest) as the defaults."""
    from crystaloop.db import get_database
    from crystaloop.generative.models.shipped import register_shipped

    docs = register_shipped(get_database())
    for doc in docs:
        console.print(f"registered {doc.kind} {doc.version} ({doc.checkpoint})", highlight=False)


@app.command("register")
def register(
    checkpoint: Path = typer.Argument(
        ..., help="A checkpoint file, e.g. RUN/vae.pt from generative/train/gpu.py."
    ),
    version: str = typer.Option(..., "--version", help="Version name to register it under."),
    default: bool = typer.Option(True, "--default/--no-default", help="Make it the default of its kind."),
) -> None:
    """Register a checkpoint trained elsewhere (such as the GPU trainer's) in the model registry."""
    from crystaloop.db import get_database
    from crystaloop.db.documents import ModelDoc
    from crystaloop.db.registry import ModelRegistry
    from crystaloop.errors import UserError
    from crystaloop.generative.models.checkpoint import load_model

    if not version.strip() or version != version.strip():
        raise UserError(f"--version {version!r}: give a name without surrounding spaces, e.g. gpu-vae-v1")
    try:
        model, extra = load_model(checkpoint)
    except FileNotFoundError as error:
        raise UserError(f"{checkpoint} does not exist; give the path of a .pt checkpoint") from error
    except Exception as error:  # noqa: BLE001 -- any unreadable file is the user's input
        raise UserError(f"{checkpoint} is not a crystaloop checkpoint ({type(error).__name__})") from error
    import torch

    metrics = {k: float(v) for k, v in (extra.get("metrics") or {}).items() if isinstance(v, int | float)}
    doc = ModelDoc(
        kind=model.kind,
        version=version,
        dataset_hash=extra.get("dataset_hash") or "unknown",
        config=extra.get("config") or {},
        metrics=metrics,
        checkpoint=str(Path(checkpoint).resolve()),
        torch_version=torch.__version__,
    )
    ModelRegistry(get_database()).register(doc, make_default=default)
    console.print(f"registered {doc.kind} {doc.version} ({doc.checkpoint})", highlight=False)
