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
    """Register every shipped checkpoint (or those of ``kinds``), as the default of its kind unless
    its manifest entry says ``"default": false`` (a second model of a kind, chosen by version).

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
            metrics={
                **entry.get("metrics", {}),
                **entry.get("calibration", {}),
                **{
                    k: v
                    for block in EVALUATIONS
                    for k, v in flatten_metrics(entry.get(block, {}), block + "_").items()
                },
            },
            checkpoint=str(path),
            torch_version=entry.get("torch_version"),
        )
        docs.append(registry.register(doc, make_default=entry.get("default", True)))
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


HELD_OUT_PREFIX = "held_out_"
"""Registry metrics written by ``crystaloop evaluate`` on the held-out split carry this prefix."""

EVALUATIONS = ("held_out", "sampling_random", "sampling_around_base", "sampling_normal")
"""Blocks that ``crystaloop evaluate`` writes: reconstruction or property metrics on the held-out
split, and the sampling shares of each strategy. Registry metrics carry ``<block>_`` prefixes.
Each may also be written with the suffix ``_symmetrized`` (decoded crystals refined by spglib,
``--symprec``)."""
EVALUATIONS += tuple(f"{block}_symmetrized" for block in EVALUATIONS)

CALIBRATION_PREFIXES = ("within_1sigma_", "within_2sigma_")
"""Ensemble coverage on the validation split, where the sigma scale was fitted: about 68 % and 95 %
there by construction, so a calibration check, not model quality."""


def flatten_metrics(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a (nested) metrics dict as ``prefix + a_b`` keys; None and text dropped."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update(flatten_metrics(value, f"{prefix}{key}_"))
        elif isinstance(value, bool | int | float) and value is not None:
            flat[f"{prefix}{key}"] = float(value)
    return flat


def split_metrics(metrics: dict) -> tuple[dict, dict, dict]:
    """Validation metrics, calibration metrics and evaluate blocks ``{block: {key: value}}`` of a
    registry doc's metrics."""
    validation, calibration, held_out = {}, {}, {}
    for key, value in metrics.items():
        # the longest block first: "held_out_symmetrized_x" is not "held_out" + "symmetrized_x"
        block = next((b for b in sorted(EVALUATIONS, key=len, reverse=True) if key.startswith(b + "_")), None)
        if block is not None:
            held_out.setdefault(block, {})[key[len(block) + 1 :]] = value
        elif key.startswith(CALIBRATION_PREFIXES):
            calibration[key] = value
        else:
            validation[key] = value
    return validation, calibration, held_out


def _write_manifest(entries: list[dict]) -> None:
    document = json.loads(MANIFEST.read_text()) if MANIFEST.is_file() else {}
    document["models"] = entries
    MANIFEST.write_text(json.dumps(document, indent=1) + "\n")


def record_held_out(
    database,
    checkpoint: str | Path,
    command: str,
    metrics: dict,
    *,
    key: str = "held_out",
    manifest: bool = False,
) -> dict | None:
    """Store ``crystaloop evaluate`` output for the model at ``checkpoint``.

    The registry entry of that checkpoint gets the numbers as ``<key>_*`` metrics (they replace
    earlier ones of that block). With ``manifest``, when the checkpoint is a shipped one (its kind
    and version are in the manifest), the manifest entry's ``key`` block becomes
    ``{"command": command, **metrics}``; without it the package's files are left alone, so a
    user's quick ``--limit`` run never replaces the shipped numbers. ``key`` is one of
    :data:`EVALUATIONS`. Returns the registry document updated, or ``None`` when the checkpoint
    is not registered.

    Raises
    ------
    UserError
        If ``manifest`` is set and the manifest cannot be written (a read-only install).
    """
    if key not in EVALUATIONS:
        raise ValueError(f"key must be one of {EVALUATIONS}; got {key!r}")
    from crystaloop.db.registry import ModelRegistry

    registry = ModelRegistry(database)
    path = str(Path(checkpoint))
    doc = next((d for d in registry.list() if d.checkpoint == path), None)
    if doc is None:
        return None
    kept = {k: v for k, v in doc.metrics.items() if not k.startswith(key + "_")}
    kept.update(flatten_metrics(metrics, key + "_"))
    doc = doc.model_copy(update={"metrics": kept})
    registry.register(doc, make_default=doc.default)
    if not manifest:
        return doc
    entries = shipped_models()
    for entry in entries:
        if entry["kind"] == doc.kind and entry["version"] == doc.version:
            entry[key] = {"command": command, **metrics}
            try:
                _write_manifest(entries)
            except OSError as exc:
                raise UserError(
                    f"cannot write {MANIFEST} ({exc.strerror}); --update-manifest needs a writable "
                    "checkout (pip install -e .)"
                ) from None
    return doc


def ship(doc, command: str, *, default: bool = True) -> dict:
    """Copy a registered model's checkpoint into the package and record it in the manifest.

    The entry's ``metrics`` are the validation-split metrics registered at training time;
    ensemble coverage fitted on that split goes to ``calibration``; ``held_out`` is what
    ``crystaloop evaluate`` recorded for this version (kept when the same version is re-shipped,
    else rebuilt from the registry's ``held_out_*`` metrics).

    Parameters
    ----------
    doc
        The :class:`~crystaloop.db.documents.ModelDoc` of the trained model.
    command
        The exact command that trained it.
    default
        Replace the kind's default entry (True), or ship beside it, chosen by version
        (``models.vae: <version>``), with ``"default": false`` in its entry.
    """
    import shutil

    CHECKPOINT_DIR.mkdir(parents=True, exist_ok=True)
    name = f"{doc.kind}-{doc.version}.pt"
    target = CHECKPOINT_DIR / name
    if not (target.exists() and target.samefile(doc.checkpoint)):  # re-shipping a shipped one
        shutil.copyfile(doc.checkpoint, target)
    validation, calibration, held_out = split_metrics(doc.metrics)
    previous = next(
        (e for e in shipped_models() if e["kind"] == doc.kind and e["version"] == doc.version), None
    )
    entry = {
        "kind": doc.kind,
        "version": doc.version,
        "file": name,
        "command": command,
        "dataset_hash": doc.dataset_hash,
        "metrics": validation,
        "torch_version": doc.torch_version,
        "config": doc.config,
    }
    if not default:
        entry["default"] = False
    if calibration:
        entry["calibration"] = calibration
    for block in EVALUATIONS:
        if previous is not None and block in previous:
            entry[block] = previous[block]
        elif block in held_out:
            entry[block] = {"command": f"crystaloop evaluate (registry {block}_* metrics)", **held_out[block]}
    def replaced(e: dict) -> bool:
        same_kind = e["kind"] == doc.kind
        return same_kind and (e["version"] == doc.version or (default and e.get("default", True)))

    entries = [e for e in shipped_models() if not replaced(e)] + [entry]
    _write_manifest(entries)
    return entry
