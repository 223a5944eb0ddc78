"""DFT records in MongoDB: the `dft_tasks` records of every relaxation and the `element_references` cache."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from crystaloop.dft.schemas import ElementReference, QETaskDocument

TASKS = "dft_tasks"
REFERENCES = "element_references"


def _database(database=None):
    if database is not None:
        return database
    from crystaloop.db import get_database

    _refuse_to_start_a_server_in_a_job()
    return get_database()


def _refuse_to_start_a_server_in_a_job() -> None:
    """A job may use a configured MongoDB or this workstation's running server, never start one.

    Raises
    ------
    UserError
        Inside a running jobflow job, with no URI configured and no embedded server running.
    """
    from jobflow import CURRENT_JOB

    from crystaloop.db.server import EmbeddedServer
    from crystaloop.errors import UserError
    from crystaloop.settings import get_settings

    settings = get_settings()
    if CURRENT_JOB.job is None or settings.mongodb_uri:
        return
    if EmbeddedServer(settings.data_dir).running() is None:
        raise UserError(
            "a DFT job asked for the database on a worker that has none (no CRYSTALOOP_MONGODB_URI); "
            "jobs of a campaign return their results instead: build the flow with record=False"
        )


def task_record(doc: QETaskDocument, preset: str | None = None) -> dict[str, Any]:
    """The ``DFTTaskRecord`` for a task document, validated, as a dict."""
    from crystaloop.db.documents import DFTTaskRecord

    meta = doc.metadata
    record = DFTTaskRecord(
        task_id=doc.task_id,
        candidate_id=meta.get("candidate_id"),
        campaign=meta.get("campaign"),
        round=meta.get("round"),
        engine=doc.engine,
        preset=preset or doc.input.preset,
        state=doc.state,
        reasons=doc.reasons,
        reduced_formula=doc.final_structure.composition.reduced_formula
        if doc.final_structure is not None
        else doc.formula_pretty,
        elements=doc.elements,
        energy_per_atom=doc.energy_per_atom,
        formation_energy_per_atom=doc.formation_energy_per_atom,
        output=doc.model_dump(mode="json", exclude={"ionic_steps"}),
    )
    return record.model_dump()


def mark_running(
    task_id: str, formula: str, elements: list[str], engine: str, preset: str, meta: dict, database=None
) -> None:
    """Insert (or reset) a ``running`` record so a killed job is visible."""
    from crystaloop.db.documents import DFTTaskRecord

    record = DFTTaskRecord(
        task_id=task_id,
        candidate_id=meta.get("candidate_id"),
        campaign=meta.get("campaign"),
        round=meta.get("round"),
        engine=engine,
        preset=preset,
        state="running",
        reduced_formula=formula,
        elements=elements,
    ).model_dump()
    _database(database)[TASKS].replace_one({"task_id": task_id}, record, upsert=True)


def save_task(doc: QETaskDocument, database=None) -> None:
    """Write the final record of ``doc`` (replacing its running record)."""
    _database(database)[TASKS].replace_one({"task_id": doc.task_id}, task_record(doc), upsert=True)


def set_formation_energy(
    task_id: str, value: float | None, database=None, *, raw: float | None = None, correction: str = "none"
) -> None:
    """Store a formation energy (eV/atom) on a task record, with the raw value and its correction."""
    _database(database)[TASKS].update_one(
        {"task_id": task_id},
        {
            "$set": {
                "formation_energy_per_atom": value,
                "output.formation_energy_per_atom": value,
                "formation_energy_per_atom_raw": value if raw is None else raw,
                "anion_correction": correction,
                "updated_at": datetime.now(UTC),
            }
        },
    )


def reference_key(element: str, engine: str, preset_key: str, md5: str | None) -> dict[str, str]:
    """The cache key of an element reference."""
    return {"element": element, "engine": engine, "preset": preset_key, "md5": md5 or "-"}


def get_reference(
    element: str, engine: str, preset_key: str, md5: str | None, database=None
) -> dict[str, Any] | None:
    """The cached reference (``energy_per_atom`` in eV/atom, ``task_id``), or None."""
    return _database(database)[REFERENCES].find_one(
        reference_key(element, engine, preset_key, md5), {"_id": 0}
    )


def cached_reference(
    element: str, engine: str, preset_key: str, md5: str | None, **fields: Any
) -> ElementReference | None:
    """The cached reference as an :class:`ElementReference` (``cached=True``), or None.

    ``fields`` (the cutoffs of a pw.x reference) are set on it.
    """
    hit = get_reference(element, engine, preset_key, md5)
    if hit is None:
        return None
    return ElementReference(
        element=element,
        engine=engine,
        preset=preset_key,
        energy_per_atom=hit["energy_per_atom"],
        task_id=hit["task_id"],
        cached=True,
        **fields,
    )


def put_reference(
    element: str,
    engine: str,
    preset_key: str,
    md5: str | None,
    energy_per_atom: float,
    task_id: str,
    database=None,
    cutoffs: tuple[float, float] | None = None,
) -> None:
    """Cache an element reference energy (eV/atom), with the cutoffs (Ry) it ran at."""
    key = reference_key(element, engine, preset_key, md5)
    _database(database)[REFERENCES].replace_one(
        key,
        {
            **key,
            "energy_per_atom": energy_per_atom,
            "task_id": task_id,
            "ecutwfc": cutoffs[0] if cutoffs else None,
            "ecutrho": cutoffs[1] if cutoffs else None,
            "created_at": datetime.now(UTC),
        },
        upsert=True,
    )


def final_structure(task_id: str, database=None) -> dict[str, Any] | None:
    """The relaxed structure (``Structure.as_dict()``) of the task ``task_id``, from ``dft_tasks``
    or else the DFT cache that answered it; None when neither has one."""
    from crystaloop.dft.cache import DFTCache

    database = _database(database)
    task = database[TASKS].find_one({"task_id": task_id}, {"output.final_structure": 1})
    final = ((task or {}).get("output") or {}).get("final_structure")
    return final or (DFTCache(database).by_task_id(task_id) or {}).get("final_structure")


def tasks_by_state(database=None) -> dict[str, list[dict[str, Any]]]:
    """``dft_tasks`` grouped by state (newest first), without the full output."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    cursor = _database(database)[TASKS].find({}, {"output": 0, "_id": 0}).sort("updated_at", -1)
    for doc in cursor:
        grouped.setdefault(doc["state"], []).append(doc)
    return grouped


def cache_references(references, database=None) -> None:
    """Cache the element references a flow computed (:class:`ElementReference` outputs), as
    the jobs do when they reach the database; references read from the cache are skipped."""
    from crystaloop.dft.engines import get_engine

    for ref in references:
        if ref.cached:
            continue
        md5 = get_engine(ref.engine).reference_md5(ref.element)
        cutoffs = (ref.ecutwfc, ref.ecutrho) if ref.ecutwfc is not None else None
        put_reference(
            ref.element, ref.engine, ref.preset, md5, ref.energy_per_atom, ref.task_id,
            database=database, cutoffs=cutoffs,
        )  # fmt: skip
