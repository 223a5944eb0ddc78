"""The ``training_structures`` collection: indexes and dataset replacement."""

from __future__ import annotations

from collections.abc import Sequence

from pymongo import ASCENDING
from pymongo.database import Database

COLLECTION = "training_structures"


def ensure_indexes(db: Database) -> None:
    """Create the indexes the data commands and loaders query by."""
    coll = db[COLLECTION]
    coll.create_index([("structure_id", ASCENDING)], unique=True)
    coll.create_index([("dataset", ASCENDING), ("material_class", ASCENDING)])
    coll.create_index([("reduced_formula", ASCENDING)])


def replace_dataset(db: Database, dataset: str, documents: Sequence[dict], *, batch: int = 2000) -> int:
    """Replace every document of ``dataset`` with ``documents``; returns the number inserted."""
    ensure_indexes(db)
    coll = db[COLLECTION]
    coll.delete_many({"dataset": dataset})
    for start in range(0, len(documents), batch):
        coll.insert_many(list(documents[start : start + batch]), ordered=False)
    return len(documents)


def upsert_documents(db: Database, documents: Sequence[dict]) -> int:
    """Insert or replace ``documents`` by ``structure_id``; returns how many were written."""
    from pymongo import ReplaceOne

    ensure_indexes(db)
    if not documents:
        return 0
    ops = [ReplaceOne({"structure_id": d["structure_id"]}, d, upsert=True) for d in documents]
    db[COLLECTION].bulk_write(ops, ordered=False)
    return len(ops)
