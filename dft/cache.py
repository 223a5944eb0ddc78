"""The DFT result cache: never relax the same crystal twice with the same settings.

A result is reused for a structure that ``StructureMatcher`` finds equivalent to
one already relaxed (its input or its relaxed structure), with identical
settings: engine, preset (with overrides), pseudopotential md5s and code
version. The key holds across rounds and campaigns. Candidates with the same
reduced formula are the only ones compared, so a lookup stays cheap.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from typing import Any

from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Structure

from crystaloop.dft.engines import get_engine
from crystaloop.dft.schemas import QETaskDocument

COLLECTION = "dft_cache"


@lru_cache(maxsize=4)
def engine_version(engine: str, pw_command: str | None = None) -> str:
    """The version string the engine records in its task documents (``pw.x 6.7MaX``, ``chgnet 0.3.0``).

    ``unknown`` when pw.x cannot be run (such results are then never reused).
    """
    return get_engine(engine).code_version(pw_command)


def settings_key(engine: str, preset_key: str, md5s: dict[str, str], code_version: str) -> str:
    """A short hash of everything that makes two relaxations comparable."""
    payload = json.dumps(
        {"engine": engine, "preset": preset_key, "md5": dict(sorted(md5s.items())), "code": code_version},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def relaxation_settings(
    structure: Structure, *, engine: str, preset: str, overrides: dict[str, Any]
) -> dict[str, Any]:
    """The settings a relaxation of ``structure`` would run with, and their key."""
    chosen = get_engine(engine)
    label = chosen.preset_label(preset, overrides)
    md5s = chosen.pseudopotential_md5s(structure)
    version = engine_version(engine)
    return {
        "engine": engine,
        "preset": label,
        "md5s": md5s,
        "code_version": version,
        "key": settings_key(engine, label, md5s, version),
    }


class DFTCache:
    """Finished relaxations keyed by settings and structure (collection ``dft_cache``).

    Parameters
    ----------
    database
        The crystaloop database.
    matcher
        Structure equivalence; pymatgen's defaults when None.
    """

    def __init__(self, database, matcher: StructureMatcher | None = None) -> None:
        self.collection = database[COLLECTION]
        self.collection.create_index([("settings_key", 1), ("reduced_formula", 1)])
        self.matcher = matcher or StructureMatcher()

    def lookup(self, structure: Structure, settings: dict[str, Any]) -> dict[str, Any] | None:
        """The cached result for an equivalent structure with these settings, or None.

        Results recorded with an unknown code version are never returned.
        """
        if settings["code_version"] == "unknown":
            return None
        formula = structure.composition.reduced_formula
        for doc in self.collection.find(
            {"settings_key": settings["key"], "reduced_formula": formula}, {"_id": 0}
        ):
            for stored in (doc["structure"], doc.get("final_structure")):
                if stored and self.matcher.fit(structure, Structure.from_dict(stored)):
                    return doc
        return None

    def put(
        self,
        structure: Structure,
        settings: dict[str, Any],
        task: QETaskDocument | dict[str, Any],
        values: dict[str, float | None],
        *,
        source: dict[str, Any] | None = None,
    ) -> None:
        """Record a successful relaxation of ``structure`` (the input it was given)."""
        if settings["code_version"] == "unknown":
            return
        task = task if isinstance(task, QETaskDocument) else QETaskDocument.model_validate(task)
        final = task.final_structure
        self.collection.update_one(
            {"settings_key": settings["key"], "task_id": task.task_id},
            {
                "$set": {
                    "settings_key": settings["key"],
                    "engine": settings["engine"],
                    "preset": settings["preset"],
                    "md5s": settings["md5s"],
                    "code_version": settings["code_version"],
                    "reduced_formula": structure.composition.reduced_formula,
                    "structure": structure.as_dict(),
                    "final_structure": final.as_dict() if final is not None else None,
                    "values": values,
                    "task_id": task.task_id,
                    "source": source or {},
                }
            },
            upsert=True,
        )

    def by_task_id(self, task_id: str) -> dict[str, Any] | None:
        """The cached result recorded from the task ``task_id``, or None."""
        return self.collection.find_one({"task_id": task_id}, {"_id": 0})

    def count(self) -> int:
        """Number of cached results."""
        return self.collection.count_documents({})
