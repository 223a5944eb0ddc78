"""Build prior-v2: decorated AFLOW prototypes of every crystal system, relaxed by CHGNet.

A build folder holds three files:

- ``decorations.json``: the decorations in build order and the settings that
  chose them (seed, size limits, threshold, cap). Written once; a rerun with
  other settings is refused, so a resumed build labels the same list.
- ``labels.jsonl``: one JSON line per labelled (or rejected) structure,
  appended and synced after every chunk. A rerun skips what is there, so a
  killed build resumes where it stopped (prior-v1's reader, torn last line
  included).
- ``prior-v2.json.gz``: written by :func:`finalize` from the labels, with a
  SHA-256 content hash as in prior-v1. It is never written inside the
  package's ``prior/`` folder, where the shipped sets live: a build's file is
  copied there by hand (``prior/prior-v2.json.gz``, a partial build).

:func:`to_documents` turns the records into training structures (Niggli-reduced
cells), which ``crystaloop data load-prior --dataset prior-v2`` loads for the
general-cell VAE (``configs/train/cpu/vae_sites_general.yaml``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crystaloop.generative.data import decorate
from crystaloop.generative.data.prior import (
    BuildReport,
    _repair_torn_tail,
    content_hash,
    read_done,
    rounded,
    worker_map,
    write_prior,
)

DATASET = "prior-v2"
FORMAT = "crystaloop-prior/2"
DECORATIONS = "decorations.json"
LABELS = "labels.jsonl"
LABEL_KEYS = (
    "formation_energy_per_atom",
    "energy_per_atom",
    "bulk_modulus",
    "shear_modulus",
    "poisson_ratio",
)
EXTRA_KEYS = ("eos_b1", "eos_residual", "mechanically_stable", "volume_per_atom", "volume_ratio", "steps")


@dataclass(frozen=True)
class DecorationSettings:
    """What chooses the decorations of a build (see :func:`decorate.decorate_all`)."""

    seed: int = 0
    max_sites: int = decorate.DEFAULT_MAX_SITES
    max_edge: float = decorate.DEFAULT_MAX_EDGE_ANGSTROM
    threshold: float = decorate.DEFAULT_THRESHOLD
    per_prototype: int = decorate.DEFAULT_PER_PROTOTYPE


def shipped_prior_dir() -> Path:
    """The package folder of the shipped prior-v1 (never written by this build)."""
    from crystaloop.generative.data.prior import SHIPPED_PATH

    return SHIPPED_PATH.parent.resolve()


def check_build_dir(build_dir: Path) -> None:
    """Refuse a build folder that is a file or that lies in the shipped prior's folder.

    Raises
    ------
    crystaloop.errors.UserError
        With the fix in the message.
    """
    from crystaloop.errors import UserError

    if build_dir.exists() and not build_dir.is_dir():
        raise UserError(
            f"--out {build_dir} is a file; pass a folder (new or existing) for the prior-v2 build"
        )
    resolved = build_dir.resolve()
    shipped = shipped_prior_dir()
    if resolved == shipped or shipped in resolved.parents:
        raise UserError(
            f"--out {build_dir} is the package folder of the shipped prior-v1; pass a folder outside it"
        )


def load_decorations(
    build_dir: Path,
    settings: DecorationSettings,
    palette: Sequence[str],
    *,
    prototypes: Sequence[str] | None = None,
) -> list[decorate.Decoration]:
    """The build's decorations: read from ``decorations.json``, or chosen and written there.

    Raises
    ------
    crystaloop.errors.UserError
        The folder holds decorations chosen with other settings.
    """
    from crystaloop.errors import UserError

    path = build_dir / DECORATIONS
    wanted = {**settings.__dict__, "prototypes": sorted(prototypes) if prototypes else None}
    if path.exists():
        try:
            doc = json.loads(path.read_text())
            stored = doc["settings"]
            decorations = [decorate.Decoration.from_dict(d) for d in doc["decorations"]]
        except (ValueError, KeyError, TypeError):
            raise UserError(
                f"{path} is not a decorations file; delete it (or the folder) to start over"
            ) from None
        if stored != wanted:
            changed = ", ".join(
                f"{k} {stored.get(k)!r} -> {v!r}" for k, v in wanted.items() if stored.get(k) != v
            )
            raise UserError(
                f"{build_dir} was started with other decoration settings ({changed}); "
                "rerun with the same settings or pass a new --out folder"
            )
        return decorations
    decorations = decorate.decorate_all(
        palette,
        seed=settings.seed,
        max_sites=settings.max_sites,
        max_edge=settings.max_edge,
        threshold=settings.threshold,
        per_prototype=settings.per_prototype,
        prototypes=prototypes,
    )
    build_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"settings": wanted, "decorations": [d.as_dict() for d in decorations]}))
    tmp.replace(path)  # atomic: a killed enumeration leaves no half file
    return decorations


_LABELLER = None


def _init_worker(batch_size: int) -> None:
    import torch

    torch.set_num_threads(1)
    global _LABELLER
    from crystaloop.generative.data.label_relax import CHGNetRelaxLabeller

    _LABELLER = CHGNetRelaxLabeller(batch_size=batch_size)


def label_decoration(decoration: dict) -> dict:
    """Relax and label one decoration (a :meth:`Decoration.as_dict`); the labels.jsonl line."""
    assert _LABELLER is not None, "call _init_worker first"
    dec = decorate.Decoration.from_dict(decoration)
    start = dec.structure()
    res = _LABELLER.label(dec.structure_id, start)
    rec = {**dec.as_dict(), **res.as_dict(), "labeller": _LABELLER.name, "formula": dec.formula}
    rec["start_crystal_system"] = decorate.crystal_system(start)
    if res.structure is not None:
        from pymatgen.core import Structure

        final = Structure.from_dict(res.structure)
        rec["crystal_system"] = decorate.crystal_system(final)
        rec["spacegroup"] = decorate.spacegroup_symbol(final)
    return rec


def build(
    build_dir: Path,
    decorations: Sequence[decorate.Decoration],
    *,
    limit: int | None = None,
    workers: int = 1,
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
) -> BuildReport:
    """Label the first ``limit`` decorations into ``build_dir/labels.jsonl``, resuming what is there.

    Parameters
    ----------
    workers
        Worker processes (one torch thread each); 1 labels in this process.
    progress
        Called with (done, total) after every structure.

    Raises
    ------
    crystaloop.errors.UserError
        ``labels.jsonl`` has a malformed line other than a torn last one.
    """
    build_dir.mkdir(parents=True, exist_ok=True)
    labels_path = build_dir / LABELS
    chosen = list(decorations[:limit] if limit else decorations)
    done = read_done(labels_path)
    _repair_torn_tail(labels_path)
    todo = [d.as_dict() for d in chosen if d.structure_id not in done]
    already = len(chosen) - len(todo)
    start = time.perf_counter()
    n_done = already
    if progress:
        progress(n_done, len(chosen))
    with labels_path.open("a") as fh:
        for rec in _run(todo, workers, batch_size):
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
            n_done += 1
            if progress:
                progress(n_done, len(chosen))
    return BuildReport(len(chosen), len(todo), already, time.perf_counter() - start, labels_path)


def labels_line(record: dict) -> dict:
    """The ``labels.jsonl`` line of one shipped prior-v2 record (the inverse of :func:`make_record`).

    The structure is rebuilt from the stored lattice, species and fractional coordinates, and the
    labels and extras are lifted back to the top level, so that :func:`make_record` of the line
    gives the record again (the formation energy recomputed from the same references).
    """
    from pymatgen.core import Lattice, Structure

    line = {k: v for k, v in record.items() if k not in ("lattice", "species", "frac_coords", "labels")}
    if record.get("lattice"):
        structure = Structure(Lattice(record["lattice"]), record["species"], record["frac_coords"])
        line["structure"] = structure.as_dict()
    line.update(record.get("labels") or {})
    return line


def seed_labels(build_dir: Path, source: Path, decorations: Sequence[decorate.Decoration]) -> tuple[int, int]:
    """Write the records of a finished prior-v2 file into ``build_dir/labels.jsonl`` as done.

    A build seeded from the shipped file labels only the decorations that file lacks. Records
    already in the folder are kept as they are. Records of decorations that are not in this
    build's list (drawn with another seed or settings, or by a release whose draw followed the
    process's hash seed) are written too: they are labelled by the same rules, and the finished
    file holds every labelled record.

    Returns
    -------
    (seeded, foreign)
        Records written now, and how many of them are not in this build's list.

    Raises
    ------
    crystaloop.errors.UserError
        ``source`` is missing or is not a prior-v2 file.
    """
    from crystaloop.errors import UserError
    from crystaloop.generative.data.prior import read_prior

    if not source.exists():
        raise UserError(
            f"--seed-from {source} not found; pass a prior-v2.json.gz (for example the shipped one)"
        )
    doc = read_prior(source)
    if doc.get("format") != FORMAT:
        raise UserError(f"--seed-from {source} is not a prior-v2 file (format {doc.get('format')!r})")
    build_dir.mkdir(parents=True, exist_ok=True)
    labels_path = build_dir / LABELS
    _repair_torn_tail(labels_path)
    done = read_done(labels_path)
    wanted = {d.structure_id for d in decorations}
    seeded = foreign = 0
    with labels_path.open("a") as fh:
        for record in doc["records"]:
            sid = record["structure_id"]
            if sid not in done:
                fh.write(json.dumps(labels_line(record)) + "\n")
                seeded += 1
                foreign += sid not in wanted
        fh.flush()
        os.fsync(fh.fileno())
    return seeded, foreign


def label_elements(labels_path: Path) -> list[str]:
    """The elements of every record in ``labels_path``, sorted: the references a finished file needs."""
    from pymatgen.core import Composition

    return sorted(
        {el.symbol for rec in read_done(labels_path).values() for el in Composition(rec["formula"])}
    )


def labelled_so_far(build_dir: Path, decorations: Sequence[decorate.Decoration]) -> tuple[BuildReport, list]:
    """The report of what ``build_dir`` holds now, and those decorations (for ``--finalize-only``).

    Raises
    ------
    crystaloop.errors.UserError
        The folder has no labels yet.
    """
    from crystaloop.errors import UserError

    labels_path = build_dir / LABELS
    if not labels_path.exists():
        raise UserError(f"{labels_path} not found; run the build without --finalize-only first")
    done = read_done(labels_path)
    chosen = [d for d in decorations if d.structure_id in done]
    return BuildReport(len(chosen), 0, len(chosen), 0.0, labels_path), chosen


def _run(todo: list[dict], workers: int, batch_size: int) -> Iterable[dict]:
    return worker_map(
        label_decoration, todo, workers=workers, initializer=_init_worker, initargs=(batch_size,)
    )


def make_record(result: dict, references: dict[str, float] | None) -> dict:
    """The compact shipped record of one labelled (or rejected) decoration."""
    from pymatgen.core import Structure

    rec: dict[str, Any] = {
        k: result.get(k)
        for k in (
            "structure_id", "prototype", "substitution", "probability", "kind", "formula", "labeller",
            "start_crystal_system", "crystal_system", "spacegroup", "reject_reason",
        )
    }  # fmt: skip
    rec["converged"] = bool(result.get("converged"))
    if result.get("structure"):
        s = Structure.from_dict(result["structure"])
        rec["lattice"] = [[rounded(float(x)) for x in row] for row in s.lattice.matrix]
        rec["species"] = [site.specie.symbol for site in s]
        rec["frac_coords"] = [[round(float(x), 5) for x in row] for row in s.frac_coords]
    if rec["reject_reason"]:
        return rec
    labels = {k: result.get(k) for k in LABEL_KEYS}
    if references is not None and result.get("energy_per_atom") is not None:
        from pymatgen.core import Composition

        comp = Composition(rec["formula"]).fractional_composition
        if all(el.symbol in references for el in comp):
            labels["formation_energy_per_atom"] = result["energy_per_atom"] - sum(
                frac * references[el.symbol] for el, frac in comp.items()
            )
    rec["labels"] = {k: rounded(v) for k, v in labels.items()}
    rec.update({k: rounded(result.get(k)) for k in EXTRA_KEYS})
    return rec


def finalize(labels_path: Path, output: Path, references: dict[str, dict]) -> dict:
    """Write ``output`` (prior-v2 format) from finished labels; returns its header.

    Raises
    ------
    crystaloop.errors.UserError
        ``output`` lies in the shipped prior-v1's folder.
    """
    import chgnet

    from crystaloop.errors import UserError

    if output.resolve().parent == shipped_prior_dir():
        raise UserError(f"{output} is in the package folder of the shipped prior-v1; write it elsewhere")
    done = read_done(labels_path)
    energies = {s: v["energy_per_atom"] for s, v in references.items()}
    records = sorted((make_record(r, energies) for r in done.values()), key=lambda r: r["structure_id"])
    header = {
        "format": FORMAT,
        "dataset": DATASET,
        "labeller": next((r["labeller"] for r in records if r.get("labeller")), None),
        "chgnet_package": chgnet.__version__,
        "source": "pymatgen AFLOW prototype library (Mehl et al. 2017), decorated by ICSD substitution "
        "probabilities (Hautier et al. 2011); CHGNet relaxation of cell and positions",
        "elastic": "clamped-ion 6x6 tensor from +/-1% Voigt strains, CHGNet stresses; VRH averages",
        "units": {
            "energy_per_atom": "eV/atom",
            "formation_energy_per_atom": "eV/atom",
            "bulk_modulus": "GPa (Birch-Murnaghan B0, isotropic scan, ions clamped)",
            "shear_modulus": "GPa (VRH)",
            "volume_per_atom": "angstrom^3/atom",
            "lattice": "angstrom",
        },
        "references": {s: {k: rounded(v) for k, v in ref.items()} for s, ref in sorted(references.items())},
    }
    return write_prior(output, header, records)


def to_documents(doc: dict) -> list[dict]:
    """TrainingStructureDoc dicts of a prior-v2 document's records that hold a structure.

    Records rejected before relaxation (a broken starting cell) carry no structure and are left
    out; every other reject is kept with its ``reject_reason``, as prior-v1 keeps its rejects.
    Cells are stored Niggli-reduced, so that the lattice head learns one setting per crystal. The
    AFLOW label is the ``prototype``; every record is of material class ``other``.
    """
    from pymatgen.core import Lattice, Structure

    from crystaloop.db.documents import StructureFields, TrainingStructureDoc

    out = []
    for rec in doc["records"]:
        if not rec.get("lattice"):
            continue
        relaxed = Structure(Lattice(rec["lattice"]), rec["species"], rec["frac_coords"])
        structure = relaxed.get_reduced_structure("niggli")  # one setting per cell, for the lattice head
        fields = StructureFields.fields_from(structure, spacegroup=False)
        fields["spacegroup"] = rec.get("spacegroup")
        model = TrainingStructureDoc(
            **fields,
            structure_id=rec["structure_id"],
            source="prior",
            dataset=doc["dataset"],
            material_class="other",
            prototype=rec.get("prototype"),
            labels=rec.get("labels") or {},
            labeller=rec.get("labeller"),
            converged=bool(rec.get("converged")),
            eos_residual=rec.get("eos_residual"),
            reject_reason=rec.get("reject_reason"),
        )
        out.append(model.model_dump())
    return out


__all__ = [
    "DATASET",
    "BuildReport",
    "DecorationSettings",
    "build",
    "content_hash",
    "finalize",
    "labelled_so_far",
    "load_decorations",
    "to_documents",
]
