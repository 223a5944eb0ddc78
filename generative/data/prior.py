"""Build, ship and load the offline prior training set.

The build labels every enumerated prototype with CHGNet in worker processes
and appends one JSON line per structure to ``<build_dir>/labels.jsonl``. A
rerun reads that file and skips what is done, so a killed build resumes and
labels nothing twice. ``finalize`` turns the lines into the shipped file: a
gzipped JSON document with one compact record per structure (prototype,
species, a0 and labels; the structure is rebuilt from the prototype) and a
SHA-256 content hash over the records.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crystaloop.generative.data.prototypes import Prototype, enumerate_all, prototype_from_id

DATASET = "prior-v1"
SHIPPED_PATH = Path(__file__).parent / "prior" / f"{DATASET}.json.gz"
SHIPPED_V2_PATH = SHIPPED_PATH.parent / "prior-v2.json.gz"
"""The shipped prior-v2 (general cells): a partial build, copied here by hand, never built here."""
FORMAT = "crystaloop-prior/1"
ORDER_SEED = 20240607
"""Seed of the build order (classes interleaved, so the ETA is steady and --limit spans classes)."""
LABEL_KEYS = (
    "formation_energy_per_atom",
    "energy_per_atom",
    "bulk_modulus",
    "shear_modulus",
    "poisson_ratio",
)
EXTRA_KEYS = ("a0", "c11", "c12", "c44", "eos_b1", "eos_residual", "mechanically_stable")
ROUND = 6


def build_order(limit: int | None = None) -> list[Prototype]:
    """All prototypes in the fixed build order (the first ``limit`` if given).

    The shuffle runs over the enumeration that still held the B3 sublattice swaps (SiC twice),
    and the swaps are dropped afterwards: every other structure keeps the place it had, so
    ``--limit`` builds made before the deduplication label the same structures.
    """
    keep = {p.structure_id for p in enumerate_all()}
    protos = enumerate_all(one_per_crystal=False)
    random.Random(ORDER_SEED).shuffle(protos)
    protos = [p for p in protos if p.structure_id in keep]
    return protos[:limit] if limit else protos


def read_done(labels_path: Path) -> dict[str, dict]:
    """Finished results in ``labels_path`` keyed by structure id.

    A torn last line (no newline: the build was killed while writing it) is skipped; its
    structure is labelled again on resume.

    Raises
    ------
    crystaloop.errors.UserError
        Any other line is not a JSON record with a ``structure_id``; the message names the
        file and the line.
    """
    from crystaloop.errors import UserError

    done: dict[str, dict] = {}
    if not labels_path.exists():
        return done
    lines = labels_path.read_text().split("\n")
    torn = lines.pop()  # "" when the file ends with a newline, else the unterminated tail
    for number, line in enumerate(lines, start=1):
        rec, problem = _parse_label_line(line)
        if problem:
            raise UserError(
                f"{labels_path} line {number}: {problem}; remove that line (its structure is "
                "labelled again) or delete the file to rebuild"
            )
        done[rec["structure_id"]] = rec
    rec, problem = _parse_label_line(torn) if torn else (None, "empty")
    if not problem:  # killed between the record and its newline: the record is complete
        done[rec["structure_id"]] = rec
    return done


def _parse_label_line(line: str) -> tuple[dict | None, str | None]:
    """``(record, None)`` for a valid line, else ``(None, what is wrong)``."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON ({exc.msg} at column {exc.colno})"
    if not isinstance(rec, dict) or not isinstance(rec.get("structure_id"), str):
        return None, "not a label record (no structure_id)"
    return rec, None


def _repair_torn_tail(labels_path: Path) -> None:
    """End the file on a complete line before appending: drop a torn tail, or add the newline
    of a complete one (appending to a torn line would corrupt the next record)."""
    if not labels_path.exists():
        return
    data = labels_path.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    cut = data.rfind(b"\n") + 1
    _, problem = _parse_label_line(data[cut:].decode("utf-8", errors="replace"))
    with labels_path.open("r+b") as fh:
        if problem:
            fh.truncate(cut)
        else:
            fh.seek(0, os.SEEK_END)
            fh.write(b"\n")


_LABELLER = None


def _init_worker(batch_size: int) -> None:
    import torch

    torch.set_num_threads(1)
    global _LABELLER
    from crystaloop.generative.data.label import CHGNetLabeller

    _LABELLER = CHGNetLabeller(batch_size=batch_size)


def _label_chunk(ids: list[str]) -> list[dict]:
    assert _LABELLER is not None
    results = _LABELLER.label([prototype_from_id(i) for i in ids])
    return [dict(r.as_dict(), labeller=_LABELLER.name) for r in results]


@dataclass
class BuildReport:
    """What one build call did."""

    total: int
    labelled_now: int
    already_done: int
    seconds: float
    labels_path: Path

    @property
    def seconds_per_structure(self) -> float | None:
        """Wall seconds per structure labelled in this call."""
        return self.seconds / self.labelled_now if self.labelled_now else None


def build(
    build_dir: Path,
    *,
    limit: int | None = None,
    workers: int = 2,
    chunk_size: int = 24,
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> BuildReport:
    """Label the prior set into ``build_dir/labels.jsonl``, resuming what is there.

    Parameters
    ----------
    limit
        Label only the first ``limit`` prototypes of the build order.
    workers
        Worker processes (one torch thread each); 1 labels in this process.
    progress
        Called with (done, total) after every chunk.

    Raises
    ------
    crystaloop.errors.UserError
        ``labels.jsonl`` has a malformed line other than a torn last one (see :func:`read_done`).
    """
    build_dir.mkdir(parents=True, exist_ok=True)
    labels_path = build_dir / "labels.jsonl"
    protos = build_order(limit)
    done = read_done(labels_path)
    _repair_torn_tail(labels_path)
    todo = [p.structure_id for p in protos if p.structure_id not in done]
    already = len(protos) - len(todo)
    chunks = [todo[i : i + chunk_size] for i in range(0, len(todo), chunk_size)]
    start = time.perf_counter()
    n_done = already
    if progress:
        progress(n_done, len(protos))
    with labels_path.open("a") as fh:
        for batch in _run_chunks(chunks, workers, batch_size):
            for rec in batch:
                fh.write(json.dumps(rec) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
            n_done += len(batch)
            if progress:
                progress(n_done, len(protos))
    return BuildReport(len(protos), len(todo), already, time.perf_counter() - start, labels_path)


def _run_chunks(chunks: list[list[str]], workers: int, batch_size: int) -> Iterable[list[dict]]:
    return worker_map(_label_chunk, chunks, workers=workers, initializer=_init_worker, initargs=(batch_size,))


def worker_map(
    fn: Callable, items: list, *, workers: int, initializer: Callable, initargs: tuple = ()
) -> Iterable:
    """``fn`` over ``items``: in this process when ``workers`` <= 1, else in a spawn pool of that
    many processes, each set up by ``initializer(*initargs)``; results in the order they finish."""
    if not items:
        return
    if workers <= 1:
        initializer(*initargs)
        for item in items:
            yield fn(item)
        return
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=initializer, initargs=initargs) as pool:
        yield from pool.imap_unordered(fn, items)


def rounded(x: Any) -> Any:
    """A float rounded to the stored precision (``ROUND`` decimals); anything else as it is."""
    return round(x, ROUND) if isinstance(x, float) else x


def make_record(proto: Prototype, result: dict, references: dict[str, float] | None) -> dict:
    """The compact shipped record of one labelled (or rejected) prototype."""
    from crystaloop.generative.data.label import formation_energy

    rec: dict[str, Any] = {
        "structure_id": proto.structure_id,
        "prototype": proto.name,
        "species": list(proto.species),
        "formula": proto.formula,
        "labeller": result.get("labeller"),
        "converged": bool(result.get("converged")),
        "reject_reason": result.get("reject_reason"),
    }
    if rec["reject_reason"]:
        rec["a0"] = rounded(proto.lattice_guess())
        return rec
    labels = {k: result.get(k) for k in LABEL_KEYS}
    if references is not None and set(proto.species) <= set(references):
        labels["formation_energy_per_atom"] = formation_energy(proto, result["energy_per_atom"], references)
    rec["labels"] = {k: rounded(v) for k, v in labels.items()}
    rec.update({k: rounded(result.get(k)) for k in EXTRA_KEYS})
    return rec


def content_hash(records: Sequence[dict]) -> str:
    """SHA-256 (hex) of the canonical JSON of ``records``."""
    canon = json.dumps(list(records), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


def finalize(
    labels_path: Path, output: Path, references: dict[str, dict], *, limit: int | None = None
) -> dict:
    """Write the shipped file from finished labels; returns its header (with the content hash)."""
    import chgnet

    done = read_done(labels_path)
    energies = {s: v["energy_per_atom"] for s, v in references.items()}
    records = [
        make_record(p, done[p.structure_id], energies) for p in build_order(limit) if p.structure_id in done
    ]
    records.sort(key=lambda r: r["structure_id"])
    header = {
        "format": FORMAT,
        "dataset": DATASET,
        "labeller": next((r["labeller"] for r in records if r.get("labeller")), None),
        "chgnet_package": chgnet.__version__,
        "elastic": "clamped-ion cubic C11, C12, C44 from +/-1% mixed xx+yz strain, CHGNet stresses",
        "units": {
            "a0": "angstrom",
            "energy_per_atom": "eV/atom",
            "formation_energy_per_atom": "eV/atom",
            "bulk_modulus": "GPa (Birch-Murnaghan B0)",
            "shear_modulus": "GPa (VRH)",
            "c11": "GPa",
            "eos_residual": "eV/atom (RMS)",
        },
        "references": {s: {k: rounded(v) for k, v in ref.items()} for s, ref in sorted(references.items())},
    }
    return write_prior(output, header, records)


def write_prior(output: Path, header: dict, records: list[dict]) -> dict:
    """Write a shipped file (gzip level 9, no timestamp: the bytes depend on the content only).

    ``count`` and ``content_hash`` are set from ``records``; returns the header written.
    """
    header = {**header, "count": len(records), "content_hash": content_hash(records)}
    output.parent.mkdir(parents=True, exist_ok=True)
    payload = json.dumps({**header, "records": records}, separators=(",", ":")).encode()
    with output.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as gz:
        gz.write(payload)
    return header


def read_prior(path: Path = SHIPPED_PATH) -> dict:
    """The shipped document (header and ``records``).

    Raises
    ------
    crystaloop.errors.UserError
        If the file is missing or its content hash does not match.
    """
    from crystaloop.errors import UserError

    if not path.exists():
        raise UserError(f"prior set {path} not found; build it with `crystaloop data build-prior`")
    try:
        with gzip.open(path, "rb") as fh:
            doc = json.loads(fh.read())
    except (OSError, EOFError, ValueError) as exc:  # not gzip, truncated, not JSON
        raise UserError(
            f"{path} is not a prior set (a gzipped JSON document) ({type(exc).__name__}); "
            "pass a file written by `crystaloop data build-prior`"
        ) from None
    if not isinstance(doc, dict) or not {"records", "content_hash"} <= doc.keys():
        raise UserError(
            f"{path} is not a prior set (no records or content hash); pass a file written by `crystaloop data build-prior`"
        )
    if content_hash(doc["records"]) != doc["content_hash"]:
        raise UserError(f"prior set {path} is corrupt (content hash mismatch); rebuild or re-checkout it")
    return doc


def to_documents(doc: dict) -> list[dict]:
    """TrainingStructureDoc dicts for every record of a shipped document (prior-v1 or prior-v2)."""
    from crystaloop.db.documents import StructureFields, TrainingStructureDoc

    if doc.get("format") != FORMAT:
        from crystaloop.generative.data import prior_v2

        return prior_v2.to_documents(doc)
    out = []
    for rec in doc["records"]:
        proto = Prototype(rec["prototype"], tuple(rec["species"]))
        structure = proto.conventional(rec["a0"])
        fields = StructureFields.fields_from(structure, spacegroup=False)
        fields["spacegroup"] = proto.spacegroup
        model = TrainingStructureDoc(
            **fields,
            structure_id=rec["structure_id"],
            source="prior",
            dataset=doc["dataset"],
            material_class=proto.material_class,
            prototype=proto.name,
            labels=rec.get("labels", {}),
            labeller=rec.get("labeller"),
            converged=rec["converged"],
            eos_residual=rec.get("eos_residual"),
            reject_reason=rec.get("reject_reason"),
        )
        out.append(model.model_dump())
    return out
