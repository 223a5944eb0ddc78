"""Bring a candidate database to the current layout (summaries, counters, lean indexes).

:func:`ensure_layout` runs on every :class:`~crystaloop.db.store.CandidateStore`
construction and costs one ``find_one`` once the layout is current. A database
written before summaries existed is migrated on first use. The migration only
adds derived documents and swaps indexes: every candidate document is kept as
it was, and running it again gives the same result.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pymongo import ReplaceOne
from pymongo.database import Database
from pymongo.errors import OperationFailure

from crystaloop.db.documents import utcnow
from crystaloop.db.summaries import (
    CANDIDATE_INDEXES,
    COUNTER_COLLECTION,
    LAYOUT_VERSION,
    LEGACY_CANDIDATE_INDEXES,
    META_COLLECTION,
    SUMMARY_COLLECTION,
    SUMMARY_INDEXES,
    SUMMARY_SOURCE_FIELDS,
    CandidateSummaryDoc,
    counter_document,
)

_LAYOUT_ID = "candidate_layout"


@dataclass
class MigrationReport:
    """What :func:`migrate_candidates` did."""

    from_version: int | None
    candidates: int = 0
    summaries_written: int = 0
    orphan_summaries_removed: int = 0
    counters: int = 0
    dropped_indexes: list[str] = field(default_factory=list)


def layout_version(database: Database) -> int | None:
    """The stored layout version, or None for a database written before versions existed."""
    meta = database[META_COLLECTION].find_one({"_id": _LAYOUT_ID})
    return meta.get("version") if meta else None


def ensure_indexes(database: Database) -> None:
    """Create the current layout's indexes (idempotent)."""
    for keys, options in CANDIDATE_INDEXES:
        database["candidates"].create_index(keys, **options)
    for keys, options in SUMMARY_INDEXES:
        database[SUMMARY_COLLECTION].create_index(keys, **options)
    database[COUNTER_COLLECTION].create_index("campaign")


def ensure_layout(database: Database) -> MigrationReport | None:
    """Migrate ``database`` when its layout is older than :data:`LAYOUT_VERSION`.

    Returns the report of the migration that ran, or None when the layout was current.
    """
    if layout_version(database) == LAYOUT_VERSION:
        return None
    return migrate_candidates(database)


def migrate_candidates(database: Database, *, batch: int = 1_000) -> MigrationReport:
    """Rebuild summaries and counters from the full documents and swap the indexes.

    Safe to run whenever no campaign is writing (``crystaloop db migrate --rebuild`` checks
    the campaign leases): writes made during the scan would be missing from the recount. Summaries are
    replaced by the ones derived from the stored candidates, summaries without a
    candidate are removed, counters are recounted, and legacy indexes are dropped.
    Candidate documents are only read.
    """
    report = MigrationReport(from_version=layout_version(database))
    ensure_indexes(database)
    candidates, summaries = database["candidates"], database[SUMMARY_COLLECTION]
    counts: Counter[tuple[str, int, str]] = Counter()
    spans: dict[tuple[str, int], list[Any]] = {}
    seen: set[str] = set()
    pending: list[ReplaceOne] = []

    def flush() -> None:
        if pending:
            summaries.bulk_write(pending, ordered=False)
            report.summaries_written += len(pending)
            pending.clear()

    for raw in candidates.find({}, SUMMARY_SOURCE_FIELDS):
        summary = CandidateSummaryDoc.document_from(raw)
        seen.add(summary["_id"])
        counts[summary["campaign"], summary["round"], summary["state"]] += 1
        span = spans.setdefault((summary["campaign"], summary["round"]), [summary["created_at"]] * 2)
        span[0], span[1] = min(span[0], summary["created_at"]), max(span[1], summary["created_at"])
        pending.append(ReplaceOne({"_id": summary["_id"]}, summary, upsert=True))
        if len(pending) >= batch:
            flush()
    flush()
    report.candidates = len(seen)

    orphans = [d["_id"] for d in summaries.find({}, {"_id": 1}) if d["_id"] not in seen]
    for i in range(0, len(orphans), batch):
        report.orphan_summaries_removed += summaries.delete_many(
            {"_id": {"$in": orphans[i : i + batch]}}
        ).deleted_count

    report.counters = _write_counters(database, counts, spans)
    existing = {index["name"] for index in candidates.list_indexes()}
    for name in LEGACY_CANDIDATE_INDEXES:
        if name in existing:
            try:
                candidates.drop_index(name)
                report.dropped_indexes.append(name)
            except OperationFailure:  # another process dropped it first
                pass
    database[META_COLLECTION].replace_one(
        {"_id": _LAYOUT_ID},
        {"_id": _LAYOUT_ID, "version": LAYOUT_VERSION, "migrated_at": utcnow()},
        upsert=True,
    )
    return report


def _write_counters(
    database: Database, counts: Counter[tuple[str, int, str]], spans: dict[tuple[str, int], list[Any]]
) -> int:
    """Replace every counter document with absolute counts and time spans; remove counters of nothing."""
    per_round: dict[tuple[str, int], dict[str, int]] = {}
    for (campaign, round_, state), n in counts.items():
        per_round.setdefault((campaign, round_), {})[state] = n
    counters = database[COUNTER_COLLECTION]
    ids: list[Any] = []
    for (campaign, round_), states in per_round.items():
        doc = counter_document(campaign, round_, states, *spans[campaign, round_])
        ids.append(doc["_id"])
        counters.replace_one({"_id": doc["_id"]}, doc, upsert=True)
    counters.delete_many({"_id": {"$nin": ids}})
    return len(ids)
