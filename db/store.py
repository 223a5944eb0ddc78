"""The candidate store: insert with deduplication, atomic state transitions, queries.

Every transition is one ``find_one_and_update`` conditional on the current state,
so two loop processes can never select or submit the same candidate.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pymongo
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Structure
from pymongo import ReturnDocument
from pymongo.database import Database

from crystaloop.db.documents import (
    ALLOWED_TRANSITIONS,
    CandidateDoc,
    CandidateState,
    FilterStep,
    StructureFields,
    utcnow,
)
from crystaloop.properties import PROPERTY_NAMES, property_spec

SORTABLE_FIELDS = ("created_at", "round", "nsites", "reduced_formula", "acquisition_score")


class StateError(RuntimeError):
    """A transition that the life cycle does not allow, or a candidate in another state."""


@dataclass(frozen=True)
class Window:
    """A property window; either bound may be None (open).

    Units are those of :data:`crystaloop.properties.PROPERTIES`.
    """

    property: str
    min: float | None = None
    max: float | None = None

    def __post_init__(self) -> None:
        property_spec(self.property)
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"window {self.property}: min {self.min} > max {self.max}")

    def mongo_filter(self, field: str) -> dict[str, Any]:
        """A ``{field: {$gte, $lte}}`` filter."""
        bounds: dict[str, float] = {}
        if self.min is not None:
            bounds["$gte"] = self.min
        if self.max is not None:
            bounds["$lte"] = self.max
        return {field: bounds or {"$exists": True}}


def property_field(name: str, *, dft: bool = False) -> str:
    """The document field that holds property ``name`` (predicted mean, or the DFT value)."""
    property_spec(name)
    return f"dft.{name}" if dft else f"predicted.{name}.mean"


def default_owner() -> str:
    """``host:pid`` of this process, recorded on each transition."""
    return f"{socket.gethostname()}:{os.getpid()}"


class CandidateStore:
    """Candidates of all campaigns in the ``candidates`` collection.

    Parameters
    ----------
    database
        The crystaloop database.
    matcher
        Structure equivalence for deduplication; pymatgen defaults when None.
    """

    def __init__(self, database: Database, matcher: StructureMatcher | None = None) -> None:
        self.collection = database["candidates"]
        self.matcher = matcher or StructureMatcher()
        self.ensure_indexes()

    def ensure_indexes(self) -> None:
        """Create the indexes the queries use (idempotent)."""
        c = self.collection
        c.create_index("candidate_id", unique=True)
        c.create_index([("campaign", 1), ("round", 1), ("state", 1)])
        c.create_index([("campaign", 1), ("reduced_formula", 1)])
        c.create_index("reduced_formula")
        c.create_index("elements")
        c.create_index("chemsys")
        for name in PROPERTY_NAMES:
            c.create_index(property_field(name))
            # Few candidates ever get DFT values, so a sparse index costs little on insert.
            c.create_index(property_field(name, dft=True), sparse=True)

    # -- insertion -------------------------------------------------------------------------

    def find_duplicate(self, structure: Structure, campaign: str) -> str | None:
        """The id of an equivalent candidate in ``campaign``, or None.

        The cheap fingerprint is tried first; ``StructureMatcher`` runs only on
        candidates with the same reduced formula.
        """
        fields = StructureFields.fields_from(structure, spacegroup=False)
        same_formula = list(
            self.collection.find(
                {"campaign": campaign, "reduced_formula": fields["reduced_formula"]},
                {"candidate_id": 1, "structure": 1, "fingerprint": 1},
            )
        )
        same_formula.sort(key=lambda d: d.get("fingerprint") != fields["fingerprint"])
        for doc in same_formula:
            if self.matcher.fit(structure, Structure.from_dict(doc["structure"])):
                return doc["candidate_id"]
        return None

    def add(
        self,
        structure: Structure,
        *,
        campaign: str,
        round: int,
        provenance: dict[str, Any] | None = None,
        predicted: dict[str, dict[str, Any]] | None = None,
        dedup: bool = True,
    ) -> tuple[str, bool]:
        """Store a generated candidate.

        Returns
        -------
        (candidate_id, inserted)
            ``inserted`` is False when an equivalent structure was already stored,
            in which case its id is returned.
        """
        if dedup:
            existing = self.find_duplicate(structure, campaign)
            if existing:
                return existing, False
        doc = self.new_document(
            structure, campaign=campaign, round=round, provenance=provenance, predicted=predicted
        )
        self.collection.insert_one(doc.model_dump())
        return doc.candidate_id, True

    @staticmethod
    def new_document(
        structure: Structure,
        *,
        campaign: str,
        round: int,
        provenance: dict[str, Any] | None = None,
        predicted: dict[str, dict[str, Any]] | None = None,
    ) -> CandidateDoc:
        """A ``generated`` candidate document for ``structure`` (not yet stored)."""
        return CandidateDoc(
            candidate_id=f"{campaign}-{uuid.uuid4().hex[:12]}",
            campaign=campaign,
            round=round,
            provenance=provenance or {},
            predicted=predicted or {},
            state_history=[{"state": CandidateState.GENERATED.value, "at": utcnow()}],
            **StructureFields.fields_from(structure),
        )

    def insert_many(self, docs: Iterable[CandidateDoc]) -> int:
        """Bulk-insert prepared documents without deduplication. Returns the count."""
        payload = [d.model_dump() for d in docs]
        if not payload:
            return 0
        return len(self.collection.insert_many(payload, ordered=False).inserted_ids)

    # -- life cycle ------------------------------------------------------------------------

    def transition(
        self,
        candidate_id: str,
        to: CandidateState | str,
        *,
        reason: str | None = None,
        stage: str | None = None,
        owner: str | None = None,
        update: dict[str, Any] | None = None,
    ) -> CandidateDoc:
        """Move one candidate to state ``to``, atomically, if the life cycle allows it.

        Raises
        ------
        StateError
            The candidate does not exist, or its current state cannot go to ``to``.
        """
        to = CandidateState(to)
        sources = [s.value for s, targets in ALLOWED_TRANSITIONS.items() if to in targets]
        found = self.collection.find_one_and_update(
            {"candidate_id": candidate_id, "state": {"$in": sources}},
            self._transition_update(to, reason=reason, stage=stage, owner=owner, update=update),
            projection={"_id": 0},
            return_document=ReturnDocument.AFTER,
        )
        if found is None:
            current = self.collection.find_one({"candidate_id": candidate_id}, {"state": 1})
            if current is None:
                raise StateError(f"no candidate {candidate_id!r}")
            raise StateError(
                f"candidate {candidate_id} is {current['state']!r}; it cannot become {to.value!r} "
                f"(allowed from: {', '.join(sources) or 'nothing'})"
            )
        return CandidateDoc.model_validate(found)

    def claim(
        self,
        campaign: str,
        *,
        from_state: CandidateState | str,
        to: CandidateState | str,
        limit: int,
        owner: str | None = None,
        round: int | None = None,
    ) -> list[CandidateDoc]:
        """Atomically move up to ``limit`` candidates, best acquisition score first.

        Each candidate is taken by one ``find_one_and_update``, so concurrent
        callers never claim the same candidate.
        """
        from_state, to = CandidateState(from_state), CandidateState(to)
        if to not in ALLOWED_TRANSITIONS[from_state]:
            raise StateError(f"{from_state.value!r} cannot become {to.value!r}")
        query: dict[str, Any] = {"campaign": campaign, "state": from_state.value}
        if round is not None:
            query["round"] = round
        claimed = []
        update = self._transition_update(to, owner=owner)
        for _ in range(limit):
            found = self.collection.find_one_and_update(
                query,
                update,
                projection={"_id": 0},
                sort=[("acquisition_score", pymongo.DESCENDING), ("candidate_id", 1)],
                return_document=ReturnDocument.AFTER,
            )
            if found is None:
                break
            claimed.append(CandidateDoc.model_validate(found))
        return claimed

    @staticmethod
    def _transition_update(
        to: CandidateState,
        *,
        reason: str | None = None,
        stage: str | None = None,
        owner: str | None = None,
        update: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        now = utcnow()
        owner = owner or default_owner()
        fields: dict[str, Any] = {"state": to.value, "updated_at": now, "owner": owner}
        if to is CandidateState.REJECTED:
            fields["rejected_stage"] = stage
            fields["rejected_reason"] = reason
        fields.update(update or {})
        entry = {"state": to.value, "at": now, "owner": owner}
        if reason:
            entry["reason"] = reason
        if stage:
            entry["stage"] = stage
        return {"$set": fields, "$push": {"state_history": entry}}

    def record_filter(self, candidate_id: str, step: FilterStep) -> None:
        """Append one filter-stage outcome to the candidate's trail."""
        self.collection.update_one(
            {"candidate_id": candidate_id},
            {"$push": {"filter_trail": step.model_dump()}, "$set": {"updated_at": utcnow()}},
        )

    # -- queries ---------------------------------------------------------------------------

    def get(self, candidate_id: str) -> CandidateDoc | None:
        """One candidate document, or None."""
        found = self.collection.find_one({"candidate_id": candidate_id}, {"_id": 0})
        return CandidateDoc.model_validate(found) if found else None

    @staticmethod
    def build_filter(
        *,
        campaign: str | None = None,
        round: int | None = None,
        state: str | Sequence[str] | None = None,
        formula: str | None = None,
        elements: Sequence[str] | None = None,
        chemsys: str | None = None,
        windows: Sequence[Window] = (),
        dft: bool = False,
    ) -> dict[str, Any]:
        """The MongoDB filter for the given criteria (all must hold)."""
        from pymatgen.core import Composition

        query: dict[str, Any] = {}
        if campaign is not None:
            query["campaign"] = campaign
        if round is not None:
            query["round"] = round
        if state:
            states = [state] if isinstance(state, str) else list(state)
            states = [CandidateState(s).value for s in states]
            query["state"] = states[0] if len(states) == 1 else {"$in": states}
        if formula:
            query["reduced_formula"] = Composition(formula).reduced_formula
        if elements:
            query["elements"] = {"$all": sorted(elements)}
        if chemsys:
            query["chemsys"] = "-".join(sorted(chemsys.split("-")))
        for window in windows:
            query.update(window.mongo_filter(property_field(window.property, dft=dft)))
        return query

    @staticmethod
    def sort_key(sort: str | None, *, dft: bool = False) -> list[tuple[str, int]]:
        """Translate ``[-]field`` into a pymongo sort; property names map to their field."""
        if not sort:
            return [("created_at", pymongo.DESCENDING)]
        direction = pymongo.DESCENDING if sort.startswith("-") else pymongo.ASCENDING
        name = sort.lstrip("-+")
        if name in PROPERTY_NAMES:
            return [(property_field(name, dft=dft), direction)]
        if name in SORTABLE_FIELDS:
            return [(name, direction)]
        raise ValueError(f"cannot sort by {name!r}; use one of {', '.join(SORTABLE_FIELDS + PROPERTY_NAMES)}")

    def query(
        self,
        *,
        sort: str | None = None,
        limit: int = 50,
        dft: bool = False,
        **criteria: Any,
    ) -> list[tuple[Structure, CandidateDoc]]:
        """Candidates matching ``criteria`` (see :meth:`build_filter`), as structures and documents."""
        query = self.build_filter(dft=dft, **criteria)
        cursor = self.collection.find(query, {"_id": 0}).sort(self.sort_key(sort, dft=dft))
        if limit:
            cursor = cursor.limit(limit)
        out = []
        for raw in cursor:
            doc = CandidateDoc.model_validate(raw)
            out.append((Structure.from_dict(doc.structure), doc))
        return out

    @staticmethod
    def count_pipeline(campaign: str | None = None) -> list[dict[str, Any]]:
        """Aggregation pipeline counting candidates per state."""
        pipeline: list[dict[str, Any]] = []
        if campaign:
            pipeline.append({"$match": {"campaign": campaign}})
        pipeline.append({"$group": {"_id": "$state", "n": {"$sum": 1}}})
        return pipeline

    def count_by_state(self, campaign: str | None = None) -> dict[str, int]:
        """Number of candidates per state (aggregation)."""
        return {row["_id"]: row["n"] for row in self.collection.aggregate(self.count_pipeline(campaign))}
