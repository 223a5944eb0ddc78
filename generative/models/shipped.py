"""Checkpoints shipped with the package, described by ``checkpoints/manifest.json``."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from crystaloop.errors import UserError

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"
MANIFEST = CHECKPOINT_DIR / "manifest.json"


def shipped_models() -> list[dict]:
    """Manifest entries: kind, version, file, command, dataset_hash, metrics, torch_version, config."""
    if not MANIFEST.is_file():
        return []
    return json.loads(MANIFEST.read_text())["models"]


def register_shipped(database, kinds: Iterable[str] | None = None) -> list:
    """Register every shipped checkpoint (or those of ``kinds``) as the default of its kind.

    ``kinds`` are model names as the campaign uses them (``vae``, ``unet``, ``cgcnn``); a
    ``cgcnn-ensemble`` entry counts as ``cgcnn``.

    Raises
    ------
    UserError
        If no checkpoints are shipped or one listed in the manifest is missing.
    """
    from crystaloop.db.documents import ModelDoc
    from crystaloop.db.registry import ModelRegistry

    entries = shipped_models()
    if kinds is not None:
        entries = [e for e in entries if e["kind"].split("-")[0] in set(kinds)]
    if not entries:
        raise UserError("this install ships no default checkpoints; train them with `crystaloop train ...`")
    registry = ModelRegistry(database)
    docs = []
    for entry in entries:
        path = CHECKPOINT_DIR / entry["file"]
        if not path.is_file():
            raise UserError(f"shipped checkpoint {path} is missing; reinstall crystaloop")
        doc = ModelDoc(
            kind=entry["kind"],
            version=entry["version"],
            dataset_hash=entry["dataset_hash"],
            config=entry.get("config", {}),
            metrics=entry.get("metrics", {}),
            checkpoint=str(path),
            torch_version=entry.get("torch_version"),
        )
        docs.append(registry.register(doc, make_default=True))
    return docs


def resolve_models(database, *, vae: str | None = None, unet: str | None = None, cgcnn: str | None = None):
    """Checkpoint paths of the models a campaign uses, keyed ``vae``, ``unet`` and ``cgcnn``.

    Each reference is a registry version or a checkpoint path; ``None`` takes the registry default.
    A kind with nothing registered falls back to its shipped checkpoint (registered first, as
    ``crystaloop models load-default`` does, without touching the other kinds), so a fresh install
    runs with them unless told otherwise.

    Raises
    ------
    UserError
        If a reference is unknown, or nothing is registered and nothing is shipped.
    """
    from crystaloop.generative.train.run import resolve_checkpoint

    paths, missing = {}, []
    for name, ref in {"vae": vae, "unet": unet, "cgcnn": cgcnn}.items():
        try:
            paths[name] = resolve_checkpoint(ref, name, database)
        except UserError:
            if ref is not None or not shipped_models():
                raise
            missing.append(name)
    if missing:
        register_shipped(database, kinds=missing)
        paths.update({name: resolve_checkpoint(None, name, database) for name in missing})
    return paths


def ship(doc, command: str) -> dict:
    """Copy a registered model's checkpoint into the package and record it in the manifest.

    Parameters
    ----------
    doc
        The :class:`~crystaloop.db.documents.ModelDoc` of the trained model.
    command
        The exact command that trained it.
    """
    import shutil

    CHECKPOINT_DIR.mkdir(parents=True, exist_ok=True)
    name = f"{doc.kind}-{doc.version}.pt"
    shutil.copyfile(doc.checkpoint, CHECKPOINT_DIR / name)
    entry = {
        "kind": doc.kind,
        "version": doc.version,
        "file": name,
        "command": command,
        "dataset_hash": doc.dataset_hash,
        "metrics": doc.metrics,
        "torch_version": doc.torch_version,
        "config": doc.config,
    }
    entries = [e for e in shipped_models() if e["kind"] != doc.kind] + [entry]
    MANIFEST.write_text(json.dumps({"models": entries}, indent=1) + "\n")
    return entry
