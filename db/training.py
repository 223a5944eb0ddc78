"""The ``training_structures`` collection: labelled structures for the models."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from pymongo import ReplaceOne
from pymongo.database import Database

COLLECTION = "training_structures"
#: Datasets of DFT results that campaigns feed back are named ``campaign:<name>``.
CAMPAIGN_DATASET_PREFIX = "campaign:"


def campaign_dataset(campaign: str) -> str:
    """The dataset name under which ``campaign``'s DFT results join the training data."""
    return f"{CAMPAIGN_DATASET_PREFIX}{campaign}"


def ensure_indexes(db: Database) -> None:
    """Create the indexes the data commands, loaders and retraining query by (idempotent)."""
    coll = db[COLLECTION]
    coll.create_index("structure_id", unique=True)
    coll.create_index([("dataset", 1), ("material_class", 1)])
    coll.create_index("reduced_formula")
    coll.create_index("elements")


def replace_dataset(
    db: Database, dataset: str, documents: Sequence[dict[str, Any]], *, batch: int = 2000
) -> int:
    """Replace every document of ``dataset`` with ``documents``; returns the number inserted."""
    ensure_indexes(db)
    coll = db[COLLECTION]
    coll.delete_many({"dataset": dataset})
    for start in range(0, len(documents), batch):
        coll.insert_many(list(documents[start : start + batch]), ordered=False)
    return len(documents)


def upsert_documents(db: Database, documents: Iterable[dict[str, Any]]) -> int:
    """Insert or replace ``documents`` keyed by ``structure_id``; returns how many were written."""
    ensure_indexes(db)
    ops = [ReplaceOne({"structure_id": d["structure_id"]}, d, upsert=True) for d in documents]
    if not ops:
        return 0
    db[COLLECTION].bulk_write(ops, ordered=False)
    return len(ops)


def dataset_counts(db: Database) -> dict[str, int]:
    """Documents per dataset name."""
    pipeline = [{"$group": {"_id": "$dataset", "n": {"$sum": 1}}}]
    return {row["_id"]: row["n"] for row in db[COLLECTION].aggregate(pipeline)}


def has_source(db: Database, source: str) -> bool:
    """Whether any training structure came from ``source`` (``prior`` once the shipped prior is loaded)."""
    return db[COLLECTION].count_documents({"source": source}, limit=1) > 0
