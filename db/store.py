"""The candidate store: insert with deduplication, atomic state transitions, queries.

Every transition is one ``find_one_and_update`` on the full candidate document,
conditional on its current state, so two loop processes can never select or
submit the same candidate. After each write the store brings the candidate's
lean summary and its campaign round's state counter up to date
(:mod:`crystaloop.db.summaries`); queries and counts read those.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pymongo
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Structure
from pymongo import ReturnDocument, UpdateOne
from pymongo.database import Database
from pymongo.errors import BulkWriteError, DuplicateKeyError

from crystaloop.db.documents import (
    ALLOWED_TRANSITIONS,
    CandidateDoc,
    CandidateState,
    FilterStep,
    StructureFields,
    utcnow,
)
from crystaloop.db.migrate import ensure_indexes as ensure_layout_indexes
from crystaloop.db.migrate import ensure_layout
from crystaloop.db.summaries import (
    COUNTER_COLLECTION,
    SUMMARY_COLLECTION,
    CandidateSummaryDoc,
    counter_document,
    counter_id,
    element_key,
    property_key_range,
)
from crystaloop.properties import PROPERTY_NAMES, property_spec

SORTABLE_FIELDS = ("created_at", "round", "nsites", "reduced_formula", "acquisition_score")

#: Sliced reads (a window on the sort property, or the created_at span) start with
#: 1/64 of the span; each next slice is twice the last, until ``limit`` hits are found.
FIRST_SLICE_FRACTION = 1 / 64

#: Below this many matches (by the counters), equalities on campaign, state and
#: round read their compound index at once instead of slicing by time.
TIME_SLICE_MIN_MATCHES = 2_000


#: The states of a candidate that went to DFT.
DFT_STATES = (CandidateState.SUBMITTED, CandidateState.RELAXED, CandidateState.FAILED)


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


def _stored(doc: CandidateDoc) -> dict[str, Any]:
    """``doc.model_dump()``, with the structure dict passed through as it is.

    Dumping the free-form structure dict is over 90 % of ``model_dump``'s time.
    """
    out = doc.model_dump(exclude={"structure"})
    out["structure"] = doc.structure
    return out


class _PhaseClock:
    """Adds the seconds since the last lap to ``timings[phase]`` (does nothing without ``timings``)."""

    def __init__(self, timings: dict[str, float] | None) -> None:
        self.timings = timings
        self.last = time.perf_counter()

    def lap(self, phase: str) -> None:
        if self.timings is not None:
            now = time.perf_counter()
            self.timings[phase] = self.timings.get(phase, 0.0) + now - self.last
            self.last = now


def _datetime(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def _slices(
    bounds: dict[str, Any],
    start: float,
    stop: float,
    *,
    descending: bool,
    value: Callable[[float], Any] = float,
) -> list[dict[str, Any]]:
    """Consecutive ranges that split ``bounds`` (``$gte``/``$lte``, either open) in sort order.

    Each slice is half-open, so a value falls in exactly one; an open end of
    ``bounds`` stays open in the slice that reaches it, so values outside
    ``[start, stop]`` are still covered. The first slice spans
    :data:`FIRST_SLICE_FRACTION` of the span (``bounds`` where given, else
    ``start`` to ``stop``) and each next one doubles. ``value`` turns an edge
    into the stored type.
    """
    lo, hi = bounds.get("$gte"), bounds.get("$lte")
    start = lo if lo is not None else start
    stop = hi if hi is not None else stop
    if not start < stop:
        return [bounds]
    width = (stop - start) * FIRST_SLICE_FRACTION
    edges: list[Any] = []
    offset = width
    while offset < stop - start:
        edges.append(value(start + offset if not descending else stop - offset))
        width *= 2
        offset += width
    slices = []
    if not descending:
        lower: dict[str, Any] = {"$gte": lo} if lo is not None else {}
        for edge in edges:
            slices.append({**lower, "$lt": edge})
            lower = {"$gte": edge}
        slices.append({**lower, **({"$lte": hi} if hi is not None else {})})
    else:
        upper: dict[str, Any] = {"$lte": hi} if hi is not None else {}
        for edge in edges:
            slices.append({"$gte": edge, **upper})
            upper = {"$lt": edge}
        slices.append({**({"$gte": lo} if lo is not None else {}), **upper})
    return slices


def summary_field(name: str, *, dft: bool = False) -> str:
    """The summary field that holds property ``name`` (predicted mean, or the DFT value)."""
    property_spec(name)
    return f"dft.{name}" if dft else f"predicted.{name}"


class CandidateStore:
    """Candidates of all campaigns: full documents in ``candidates``, their summaries and counters.

    Parameters
    ----------
    database
        The crystaloop database. A database written before summaries existed is
        migrated here, once (:func:`crystaloop.db.migrate.ensure_layout`).
    matcher
        Structure equivalence for deduplication; pymatgen defaults when None.
    """

    def __init__(self, database: Database, matcher: StructureMatcher | None = None) -> None:
        self.database = database
        self.collection = database["candidates"]
        self.summaries = database[SUMMARY_COLLECTION]
        self.counters = database[COUNTER_COLLECTION]
        self.matcher = matcher or StructureMatcher()
        ensure_layout(database)

    def ensure_indexes(self) -> None:
        """Create the indexes the queries use (idempotent)."""
        ensure_layout_indexes(self.database)

    # -- insertion -------------------------------------------------------------------------

    def find_duplicate(self, structure: Structure, campaign: str) -> str | None:
        """The id of an equivalent candidate in ``campaign``, or None.

        The cheap fingerprint is tried first; ``StructureMatcher`` runs only on
        candidates with the same reduced formula (found through the summaries).
        """
        fields = StructureFields.fields_from(structure, spacegroup=False)
        ids = [
            d["_id"]
            for d in self.summaries.find(
                {"reduced_formula": fields["reduced_formula"], "campaign": campaign}, {"_id": 1}
            )
        ]
        same_formula = (
            list(
                self.collection.find(
                    {"candidate_id": {"$in": ids}}, {"candidate_id": 1, "structure": 1, "fingerprint": 1}
                )
            )
            if ids
            else []
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
        self.insert_many([doc])
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

    def insert_many(self, docs: Iterable[CandidateDoc], *, timings: dict[str, float] | None = None) -> int:
        """Bulk-insert prepared documents without structure deduplication. Returns the count.

        One write per collection: the full documents, then their summaries, then
        the counters of every campaign round in one bulk write, so a summary never
        names a candidate that is not stored. A ``candidate_id`` that is already
        stored, or repeated in ``docs``, is refused by the unique index; the other
        documents are still inserted with their summaries and counts, and the
        refusal is raised afterwards.

        ``timings``, when given, accumulates seconds per phase: ``dump``,
        ``candidates``, ``build_summaries``, ``summaries`` and ``counters``.

        Raises
        ------
        pymongo.errors.BulkWriteError
            Some documents were refused (duplicate ``candidate_id``).
        """
        clock = _PhaseClock(timings)
        payload = [_stored(d) for d in docs]
        clock.lap("dump")
        if not payload:
            return 0
        refused: BulkWriteError | None = None
        try:
            self.collection.insert_many(payload, ordered=False)
        except BulkWriteError as exc:
            refused = exc
            failed = {e["index"] for e in exc.details.get("writeErrors", ())}
            payload = [d for i, d in enumerate(payload) if i not in failed]
        clock.lap("candidates")
        summaries = [CandidateSummaryDoc.document_from(d) for d in payload]
        clock.lap("build_summaries")
        if summaries:
            self.summaries.insert_many(summaries, ordered=False)
        clock.lap("summaries")
        counts: dict[tuple[str, int], dict[str, int]] = {}
        spans: dict[tuple[str, int], list[datetime]] = {}
        for s in summaries:
            key = (s["campaign"], s["round"])
            per_state = counts.setdefault(key, {})
            per_state[s["state"]] = per_state.get(s["state"], 0) + 1
            span = spans.setdefault(key, [s["created_at"], s["created_at"]])
            span[0], span[1] = min(span[0], s["created_at"]), max(span[1], s["created_at"])
        if counts:
            self.counters.bulk_write(
                [
                    UpdateOne(
                        *self._count_update(*key, per_state, created=(spans[key][0], spans[key][1])),
                        upsert=True,
                    )
                    for key, per_state in counts.items()
                ],
                ordered=False,
            )
        clock.lap("counters")
        if refused is not None:
            raise refused
        return len(payload)

    def repair_round(self, campaign: str, round: int) -> int:
        """Rebuild one campaign round's summaries and counter from its candidates; the round's size.

        :meth:`insert_many` writes candidates, then summaries, then counters: a process killed
        in between leaves candidates that queries, which read summaries and counters, do not
        see. This scans ``candidates`` (indexed by id only), so it is for resuming after a kill.
        """
        docs = list(self.collection.find({"campaign": campaign, "round": round}, {"_id": 0}))
        have = {s["_id"] for s in self.summaries.find({"campaign": campaign, "round": round}, {"_id": 1})}
        missing = [CandidateSummaryDoc.document_from(d) for d in docs if d["candidate_id"] not in have]
        if missing:
            self.summaries.insert_many(missing, ordered=False)
        rows = list(self.summaries.find({"campaign": campaign, "round": round}, {"state": 1, "created_at": 1}))
        if rows:
            counts: dict[str, int] = {}
            for row in rows:
                counts[row["state"]] = counts.get(row["state"], 0) + 1
            created = [row["created_at"] for row in rows]
            doc = counter_document(campaign, round, counts, min(created), max(created))
            self.counters.replace_one({"_id": doc["_id"]}, doc, upsert=True)
        return len(docs)

    @staticmethod
    def _count_update(
        campaign: str,
        round: int,
        deltas: dict[str, int],
        *,
        created: tuple[datetime, datetime] | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The counter filter and update that add ``deltas`` (state -> n) to one campaign round."""
        update: dict[str, Any] = {
            "$inc": {f"counts.{state}": n for state, n in deltas.items()},
            "$setOnInsert": {"campaign": campaign, "round": round},
        }
        if created:
            # The time span that default-sorted queries slice (see matching_ids).
            update["$min"] = {"first_created_at": created[0]}
            update["$max"] = {"last_created_at": created[1]}
        return {"_id": counter_id(campaign, round)}, update

    def _count(
        self,
        campaign: str,
        round: int,
        deltas: dict[str, int],
        *,
        created: tuple[datetime, datetime] | None = None,
    ) -> None:
        self.counters.update_one(*self._count_update(campaign, round, deltas, created=created), upsert=True)

    def _sync_summary(self, candidate: dict[str, Any]) -> None:
        """Replace the summary of ``candidate`` (a full stored document) and move its count.

        The replacement is conditional on the summary's revision, so when two
        transitions of one candidate finish out of order the later state wins,
        and each counter move pairs with the summary it replaced.
        """
        summary = CandidateSummaryDoc.document_from(candidate)
        try:
            before = self.summaries.find_one_and_replace(
                {"_id": summary["_id"], "revision": {"$lte": summary["revision"]}},
                summary,
                projection={"campaign": 1, "round": 1, "state": 1},
                upsert=True,
            )
        except DuplicateKeyError:  # a newer summary is already there
            return
        new_key = (summary["campaign"], summary["round"])
        if before is None:
            self._count(*new_key, {summary["state"]: 1})
        elif (before["campaign"], before["round"]) == new_key:
            if before["state"] != summary["state"]:
                self._count(*new_key, {before["state"]: -1, summary["state"]: 1})
        else:
            self._count(before["campaign"], before["round"], {before["state"]: -1})
            self._count(*new_key, {summary["state"]: 1})

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
        self._sync_summary(found)
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

        The best ids are read from the summaries; each is then taken by one
        ``find_one_and_update`` on the full document, conditional on
        ``from_state``, so concurrent callers never claim the same candidate. An id
        that another caller took first is skipped.
        """
        from_state, to = CandidateState(from_state), CandidateState(to)
        if to not in ALLOWED_TRANSITIONS[from_state]:
            raise StateError(f"{from_state.value!r} cannot become {to.value!r}")
        query: dict[str, Any] = {"state": from_state.value, "campaign": campaign}
        if round is not None:
            query["round"] = round
        claimed: list[CandidateDoc] = []
        taken_elsewhere: set[str] = set()
        update = self._transition_update(to, owner=owner)
        while len(claimed) < limit:
            want = limit - len(claimed)
            ids = [
                d["_id"]
                for d in self.summaries.find(
                    query,
                    {"_id": 1},
                    sort=[("acquisition_score", pymongo.DESCENDING), ("_id", pymongo.ASCENDING)],
                    limit=want + len(taken_elsewhere),
                )
                if d["_id"] not in taken_elsewhere
            ]
            if not ids:
                break
            for candidate_id in ids[:want]:
                found = self.collection.find_one_and_update(
                    {"candidate_id": candidate_id, "state": from_state.value},
                    update,
                    projection={"_id": 0},
                    return_document=ReturnDocument.AFTER,
                )
                if found is None:
                    # Taken by another process (whose summary sync follows), or a summary
                    # left stale by a killed one. Only the process that made a move syncs
                    # its summary: two concurrent syncs of one summary could each count it.
                    taken_elsewhere.add(candidate_id)
                    continue
                self._sync_summary(found)
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

    def set_fields(self, candidate_id: str, fields: dict[str, Any]) -> CandidateDoc:
        """``$set`` fields of one candidate outside a transition (e.g. DFT values), summary included.

        Raises
        ------
        StateError
            No such candidate.
        """
        found = self.collection.find_one_and_update(
            {"candidate_id": candidate_id},
            {"$set": {**fields, "updated_at": utcnow()}},
            projection={"_id": 0},
            return_document=ReturnDocument.AFTER,
        )
        if found is None:
            raise StateError(f"no candidate {candidate_id!r}")
        self._sync_summary(found)
        return CandidateDoc.model_validate(found)

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
        """The MongoDB filter on full candidate documents for the given criteria (all must hold)."""
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
    def summary_filter(
        *,
        campaign: str | None = None,
        round: int | None = None,
        state: str | Sequence[str] | None = None,
        formula: str | None = None,
        elements: Sequence[str] | None = None,
        chemsys: str | None = None,
        windows: Sequence[Window] = (),
        dft: bool = False,
        lead: str | None = None,
    ) -> dict[str, Any]:
        """The filter on summaries for the same criteria as :meth:`build_filter`.

        Clause order is the plan: the embedded server answers the first clause
        that an index can serve and checks the rest on each document it fetched
        (equalities alone ride a compound index instead). The formula comes
        first, then an element key (a pair: exact for ``$all`` of two, and a
        superset for more elements or a chemical system; one element is
        checked, not keyed), then the windows (the window on property ``lead``
        first), then campaign, state and round.
        """
        full = CandidateStore.build_filter(
            campaign=campaign,
            round=round,
            state=state,
            formula=formula,
            elements=elements,
            chemsys=chemsys,
            windows=(),
            dft=dft,
        )
        query: dict[str, Any] = {}
        if "reduced_formula" in full:
            query["reduced_formula"] = full["reduced_formula"]
        symbols = sorted(set(elements or ()))
        if len(symbols) >= 2:
            query["element_keys"] = element_key(symbols)
        elif "chemsys" in full:
            query["element_keys"] = element_key(full["chemsys"].split("-"))
        if len(symbols) != 2 and symbols:
            query["elements"] = symbols[0] if len(symbols) == 1 else full["elements"]
        if "chemsys" in full:
            query["chemsys"] = full["chemsys"]
        effective: dict[str, Window] = {}
        for window in windows:
            # As in build_filter, a later window on the same property replaces an earlier one.
            effective[window.property] = window
        ordered = sorted(effective.values(), key=lambda w: w.property != lead)
        for window in ordered:
            # The first bounded window leads through the one property index; every
            # window is then checked exactly.
            bounds = window.mongo_filter("value")["value"]
            if "$exists" not in bounds:
                query["property_keys"] = property_key_range(window.property, bounds, dft=dft)
                break
        for window in ordered:
            query.update(window.mongo_filter(summary_field(window.property, dft=dft)))
        for key in ("campaign", "state", "round"):
            if key in full:
                query[key] = full[key]
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

    @classmethod
    def summary_sort(cls, sort: str | None, *, dft: bool = False) -> list[tuple[str, int]]:
        """:meth:`sort_key` on summary fields, ties broken by candidate id."""
        ((field, direction),) = cls.sort_key(sort, dft=dft)
        name = field.split(".")[1] if field.startswith(("predicted.", "dft.")) else None
        if name:
            field = summary_field(name, dft=dft)
        return [(field, direction), ("_id", pymongo.ASCENDING)]

    def query(
        self,
        *,
        sort: str | None = None,
        limit: int = 50,
        dft: bool = False,
        **criteria: Any,
    ) -> list[tuple[Structure, CandidateDoc]]:
        """Candidates matching ``criteria`` (see :meth:`build_filter`), as structures and documents.

        The summaries pick the hits (:meth:`matching_ids`); their full documents are read by id.
        """
        ids = self.matching_ids(sort=sort, limit=limit, dft=dft, **criteria)
        return [(Structure.from_dict(doc.structure), doc) for doc in self.get_many(ids)]

    def get_many(self, candidate_ids: Sequence[str]) -> list[CandidateDoc]:
        """Full documents of ``candidate_ids``, in that order (missing ids are skipped)."""
        by_id: dict[str, dict[str, Any]] = {}
        for i in range(0, len(candidate_ids), 1_000):
            chunk = list(candidate_ids[i : i + 1_000])
            for raw in self.collection.find({"candidate_id": {"$in": chunk}}, {"_id": 0}):
                by_id[raw["candidate_id"]] = raw
        return [CandidateDoc.model_validate(by_id[c]) for c in candidate_ids if c in by_id]

    # -- a campaign's candidates ------------------------------------------------------------

    def in_state(self, campaign: str, state: CandidateState | str) -> list[CandidateDoc]:
        """The campaign's candidates in ``state``, found through the query summaries."""
        return self.get_many(self.matching_ids(campaign=campaign, state=CandidateState(state).value, limit=0))

    def selected_in_round(
        self, campaign: str, round: int, *, state: CandidateState | str | None = None, up_to: bool = False
    ) -> list[CandidateDoc]:
        """Candidates the acquisition of round ``round`` selected (of every round up to it with
        ``up_to``), optionally only those in ``state``, by candidate id."""
        query = self._selected_query(campaign, round, [state] if state is not None else None, up_to=up_to)
        cursor = self.collection.find(query, {"_id": 0}).sort("candidate_id", 1)
        return [CandidateDoc.model_validate(d) for d in cursor]

    def count_selected(
        self, campaign: str, round: int, *, states: Sequence[CandidateState | str] | None = None
    ) -> int:
        """How many candidates round ``round`` selected (only those now in ``states``, if given)."""
        return self.collection.count_documents(self._selected_query(campaign, round, states))

    @staticmethod
    def _selected_query(
        campaign: str, round: int, states: Sequence[CandidateState | str] | None, *, up_to: bool = False
    ) -> dict[str, Any]:
        query: dict[str, Any] = {"campaign": campaign, "selected_round": {"$lte": round} if up_to else round}
        if states is not None:
            values = [CandidateState(s).value for s in states]
            query["state"] = values[0] if len(values) == 1 else {"$in": values}
        return query

    def count_generated(self, campaign: str, round: int, generation_id: str) -> int:
        """How many candidates of round ``round`` one generation (``provenance.generation_id``) stored."""
        return self.collection.count_documents(
            {"campaign": campaign, "round": round, "provenance.generation_id": generation_id}
        )

    def dft_total(self, campaign: str) -> int:
        """The campaign's candidates that went to DFT: submitted, relaxed or failed (by the counters)."""
        counts = self.count_by_state(campaign)
        return sum(counts.get(s.value, 0) for s in DFT_STATES)

    def matching_ids(
        self,
        *,
        sort: str | None = None,
        limit: int = 50,
        dft: bool = False,
        stats: dict[str, Any] | None = None,
        **criteria: Any,
    ) -> list[str]:
        """Ids of the candidates :meth:`query` returns, in order, read from the summaries alone.

        With a limit, two kinds of query are read in slices of growing width, in
        sort order, until ``limit`` hits are found; each slice is one indexed
        range, so the server fetches and sorts about as many summaries as the
        answer needs rather than every match:

        - a sort on a property that also has a window: the window is sliced;
        - a sort on ``created_at`` (the default) when nothing more selective
          leads (no formula, element key, window or DFT key, and more than
          :data:`TIME_SLICE_MIN_MATCHES` candidates of the campaign, state and
          round by the counters), or when the
          filter is exactly an element key and a campaign (the compound index
          ``element_keys, campaign, created_at`` serves each slice exactly): the
          campaign's time span, from its counters, is sliced.

        ``stats``, when given, receives the filter sent and the number of slices read.
        """
        stats = stats if stats is not None else {}
        sort_spec = self.summary_sort(sort, dft=dft)
        descending = sort_spec[0][1] == pymongo.DESCENDING
        name = (sort or "").lstrip("-+")
        query = self.summary_filter(dft=dft, lead=name, **criteria)
        stats.update(filter=query, sort=sort_spec, slices=1)
        slices: list[dict[str, Any]] = []
        field = summary_field(name, dft=dft) if name in PROPERTY_NAMES else sort_spec[0][0]
        window = query.get(field)
        if limit and name in PROPERTY_NAMES and window and ("$gte" in window or "$lte" in window):
            spec = property_spec(name)
            slices = _slices(window, spec.lower, spec.upper, descending=descending)
        elif limit and field == "created_at" and self._time_slices_pay(query):
            span = self._time_span(query)
            if span:
                query = {"created_at": {}, **query}  # the slice leads
                slices = _slices({}, *span, descending=descending, value=_datetime)
        if len(slices) < 2:
            cursor = self.summaries.find(query, {"_id": 1}, sort=sort_spec, limit=limit or 0)
            return [d["_id"] for d in cursor]
        ids: list[str] = []
        for stats["slices"], bounds in enumerate(slices, start=1):
            sliced = {**query, field: bounds}
            if name in PROPERTY_NAMES:
                sliced["property_keys"] = property_key_range(name, bounds, dft=dft)
            if stats["slices"] == 1:
                stats["filter"] = sliced
            cursor = self.summaries.find(sliced, {"_id": 1}, sort=sort_spec, limit=limit - len(ids))
            ids += [d["_id"] for d in cursor]
            if len(ids) >= limit:
                break
        return ids

    def _time_slices_pay(self, query: dict[str, Any]) -> bool:
        keys = set(query)
        if "element_keys" in keys:
            return keys == {"element_keys", "campaign"}
        if keys & {"reduced_formula", "property_keys"}:
            return False
        states = query.get("state")
        states = states["$in"] if isinstance(states, dict) else [states] if states else None
        counted = self.count_by_state(query.get("campaign"), round=query.get("round"))
        matches = sum(n for state, n in counted.items() if states is None or state in states)
        return matches > TIME_SLICE_MIN_MATCHES

    def _time_span(self, query: dict[str, Any]) -> tuple[float, float] | None:
        """First and last ``created_at`` (POSIX seconds) of the campaign rounds ``query`` names."""
        scope = {k: query[k] for k in ("campaign", "round") if k in query}
        first, last = None, None
        for counter in self.counters.find(scope, {"first_created_at": 1, "last_created_at": 1}):
            if counter.get("first_created_at") and counter.get("last_created_at"):
                a, b = counter["first_created_at"].timestamp(), counter["last_created_at"].timestamp()
                first = a if first is None else min(first, a)
                last = b if last is None else max(last, b)
        return (first, last) if first is not None and last is not None else None

    def query_full_documents(
        self,
        *,
        sort: str | None = None,
        limit: int = 50,
        dft: bool = False,
        **criteria: Any,
    ) -> list[tuple[Structure, CandidateDoc]]:
        """:meth:`query` answered from the full documents alone, as before summaries existed.

        Slow at scale on the embedded server; it is the reference that the
        summary path is tested against.
        """
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
        """Aggregation pipeline counting full candidate documents per state.

        :meth:`count_by_state` reads counters instead; the pipeline stays for
        checks against the full documents.
        """
        pipeline: list[dict[str, Any]] = []
        if campaign:
            pipeline.append({"$match": {"campaign": campaign}})
        pipeline.append({"$group": {"_id": "$state", "n": {"$sum": 1}}})
        return pipeline

    def count_by_state(self, campaign: str | None = None, *, round: int | None = None) -> dict[str, int]:
        """Number of candidates per state, summed over the counters of each campaign round."""
        query: dict[str, Any] = {}
        if campaign:
            query["campaign"] = campaign
        if round is not None:
            query["round"] = round
        totals: dict[str, int] = {}
        for counter in self.counters.find(query, {"counts": 1}):
            for state, n in counter.get("counts", {}).items():
                totals[state] = totals.get(state, 0) + n
        return {state: n for state, n in totals.items() if n > 0}
