"""`crystaloop models` commands: list registered models and register the shipped defaults."""

from __future__ import annotations

import typer

from crystaloop.cli._common import console, group

app = group("The registry of trained models.")


@app.command("list")
def list_models(kind: str = typer.Option(None, "--kind", help="unet, vae, cgcnn or cgcnn-ensemble.")) -> None:
    """Show registered models, newest first."""
    from rich.table import Table

    from crystaloop.db import get_database
    from crystaloop.db.registry import ModelRegistry

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
