"""The registry of trained model versions (collection ``models``)."""

from __future__ import annotations

from typing import Any

import pymongo
from pymongo.database import Database

from crystaloop.db.documents import ModelDoc


class ModelRegistry:
    """Register, list and look up trained models.

    Parameters
    ----------
    database
        The crystaloop database.
    """

    def __init__(self, database: Database) -> None:
        self.collection = database["models"]
        self.collection.create_index([("kind", 1), ("version", 1)], unique=True)
        self.collection.create_index([("kind", 1), ("created_at", -1)])

    def register(self, doc: ModelDoc, *, make_default: bool = False) -> ModelDoc:
        """Insert or replace ``doc`` (keyed by kind and version)."""
        if make_default:
            self.collection.update_many({"kind": doc.kind}, {"$set": {"default": False}})
            doc = doc.model_copy(update={"default": True})
        self.collection.replace_one({"kind": doc.kind, "version": doc.version}, doc.model_dump(), upsert=True)
        return doc

    def list(self, kind: str | None = None) -> list[ModelDoc]:
        """All registered models, newest first, optionally of one ``kind``."""
        query: dict[str, Any] = {"kind": kind} if kind else {}
        cursor = self.collection.find(query, {"_id": 0}).sort("created_at", pymongo.DESCENDING)
        return [ModelDoc.model_validate(d) for d in cursor]

    def get(self, kind: str, version: str | None = None) -> ModelDoc | None:
        """One model: the given version, else the default, else the newest of ``kind``."""
        if version:
            found = self.collection.find_one({"kind": kind, "version": version}, {"_id": 0})
        else:
            found = self.collection.find_one(
                {"kind": kind},
                {"_id": 0},
                sort=[("default", pymongo.DESCENDING), ("created_at", pymongo.DESCENDING)],
            )
        return ModelDoc.model_validate(found) if found else None
