"""A database written by the layout before summaries is migrated on first use, once, keeping every document."""

from __future__ import annotations

import pymongo
import pytest
from pymatgen.core import Lattice, Structure

from crystaloop.db.migrate import layout_version, migrate_candidates
from crystaloop.db.store import CandidateStore, Window, property_field
from crystaloop.db.summaries import (
    COUNTER_COLLECTION,
    LAYOUT_VERSION,
    LEGACY_CANDIDATE_INDEXES,
    SUMMARY_COLLECTION,
)
from crystaloop.loop.bench.database import synthetic_candidates
from crystaloop.properties import PROPERTY_NAMES


def write_legacy_layout(database, n: int = 80) -> list[dict]:
    """Candidates as the previous store wrote them: full documents and their 22 indexes, nothing else."""
    c = database["candidates"]
    c.create_index("candidate_id", unique=True)
    c.create_index([("campaign", 1), ("round", 1), ("state", 1)])
    c.create_index([("campaign", 1), ("reduced_formula", 1)])
    c.create_index("reduced_formula")
    c.create_index("elements")
    c.create_index("chemsys")
    for name in PROPERTY_NAMES:
        c.create_index(property_field(name))
        c.create_index(property_field(name, dft=True), sparse=True)
    docs = [d.model_dump() for d in synthetic_candidates(n, "old")]
    for i, doc in enumerate(docs[:10]):
        doc["dft"] = {"band_gap": 1.0 + i / 10}
    c.insert_many(docs)
    return list(c.find({}).sort("candidate_id", 1))


def test_first_use_migrates_and_keeps_every_document(database):
    before = write_legacy_layout(database)
    assert layout_version(database) is None
    aggregated = {
        row["_id"]: row["n"] for row in database["candidates"].aggregate(CandidateStore.count_pipeline("old"))
    }

    store = CandidateStore(database)

    assert layout_version(database) == LAYOUT_VERSION
    assert list(database["candidates"].find({}).sort("candidate_id", 1)) == before
    assert database[SUMMARY_COLLECTION].count_documents({}) == len(before)
    assert store.count_by_state("old") == aggregated
    indexes = {i["name"] for i in database["candidates"].list_indexes()}
    assert not indexes & set(LEGACY_CANDIDATE_INDEXES)
    # The migrated data answers queries as the full documents do.
    for query in (
        {"campaign": "old", "windows": [Window("band_gap", 1.0, 5.0)], "sort": "-band_gap"},
        {"elements": ["O", "Ti"], "limit": 0, "sort": "nsites"},
        {"windows": [Window("band_gap", 1.0, 1.5)], "dft": True, "limit": 0, "sort": "band_gap"},
    ):
        new = [d.candidate_id for _, d in store.query(**query)]
        old = [d.candidate_id for _, d in store.query_full_documents(**query)]
        assert new and new == old, query
    # Dedup and transitions work on migrated candidates.
    fresh = next(d["candidate_id"] for d in before if d["state"] == "generated")
    assert store.transition(fresh, "shortlisted").state == "shortlisted"
    assert store.count_by_state("old")["shortlisted"] == aggregated.get("shortlisted", 0) + 1


def test_migration_is_idempotent_and_repairs(database):
    write_legacy_layout(database, n=40)
    store = CandidateStore(database)
    summaries = list(database[SUMMARY_COLLECTION].find({}).sort("_id", 1))
    counts = store.count_by_state()
    # Damage the derived data: a stale counter, a lost summary, an orphan summary.
    database[COUNTER_COLLECTION].update_many({}, {"$inc": {"counts.generated": 5}})
    database[SUMMARY_COLLECTION].delete_one({"_id": summaries[0]["_id"]})
    database[SUMMARY_COLLECTION].insert_one({**summaries[1], "_id": "gone"})

    report = migrate_candidates(database)
    assert report.from_version == LAYOUT_VERSION
    assert report.candidates == 40 and report.orphan_summaries_removed == 1
    assert list(database[SUMMARY_COLLECTION].find({}).sort("_id", 1)) == summaries
    assert store.count_by_state() == counts
    assert migrate_candidates(database).summaries_written == 40
    assert list(database[SUMMARY_COLLECTION].find({}).sort("_id", 1)) == summaries


def test_counters_follow_every_write(database):
    store = CandidateStore(database)
    cell = Lattice.cubic(4.2)
    ids = [
        store.add(
            Structure.from_spacegroup(
                "Fm-3m", cell.scale(cell.volume * (1 + i / 10)), ["Mg", "O"], [[0, 0, 0], [0.5] * 3]
            ),
            campaign="k",
            round=i % 2,
            dedup=False,
        )[0]
        for i in range(6)
    ]
    store.transition(ids[0], "rejected", stage="validity", reason="x")
    for cid in ids[1:5]:
        store.transition(cid, "shortlisted", update={"acquisition_score": float(ids.index(cid))})
    store.claim("k", from_state="shortlisted", to="selected", limit=2)
    store.claim("k", from_state="shortlisted", to="selected", limit=5, round=1)
    aggregated = {
        row["_id"]: row["n"] for row in database["candidates"].aggregate(CandidateStore.count_pipeline("k"))
    }
    assert store.count_by_state("k") == aggregated
    assert sum(aggregated.values()) == 6
    by_round = [store.count_by_state("k", round=r) for r in (0, 1)]
    assert sum(sum(c.values()) for c in by_round) == 6
    assert store.count_by_state("nothing") == {}
    with pytest.raises(pymongo.errors.BulkWriteError):
        store.insert_many([store.get(ids[0])])


def test_db_migrate_command(database):
    from typer.testing import CliRunner

    from crystaloop.cli import app

    write_legacy_layout(database, n=20)
    result = CliRunner().invoke(app, ["db", "migrate"])
    assert result.exit_code == 0, result.output
    assert "candidates: 20; summaries written: 20" in result.output
    assert database[SUMMARY_COLLECTION].count_documents({}) == 20
    again = CliRunner().invoke(app, ["db", "migrate"])
    assert "layout is current" in again.output
    rebuilt = CliRunner().invoke(app, ["db", "migrate", "--rebuild"])
    assert "candidates: 20; summaries written: 20; orphan summaries removed: 0" in rebuilt.output


def test_rebuild_refuses_while_a_campaign_holds_a_live_lease(database):
    from typer.testing import CliRunner

    from crystaloop.cli import app
    from crystaloop.db.campaigns import CampaignStore
    from crystaloop.errors import UserError

    write_legacy_layout(database, n=5)
    store = CampaignStore(database)
    store.ensure("busy", {})
    lease = store.acquire_lease("busy", owner="another-host:1")  # a live process elsewhere
    assert store.running() == ["busy"]
    refused = CliRunner().invoke(app, ["db", "migrate", "--rebuild"])
    assert isinstance(refused.exception, UserError) and refused.exception.exit_code == 2
    assert "busy are running; stop them first" in str(refused.exception)
    store.release_lease("busy", lease.token)
    assert store.running() == []
    rebuilt = CliRunner().invoke(app, ["db", "migrate", "--rebuild"])
    assert rebuilt.exit_code == 0 and "candidates: 5" in rebuilt.output


def test_claim_skips_a_stale_summary_and_rebuild_repairs_it(database):
    store = CandidateStore(database)
    cell = Lattice.cubic(4.2)
    ids = []
    for i in range(3):
        structure = Structure.from_spacegroup(
            "Fm-3m", cell.scale(cell.volume * (1 + i / 10)), ["Mg", "O"], [[0, 0, 0], [0.5] * 3]
        )
        cid, _ = store.add(structure, campaign="s", round=0, dedup=False)
        store.transition(cid, "shortlisted", update={"acquisition_score": float(i)})
        ids.append(cid)
    # A process killed between its move and the summary: the full document moved on alone.
    database["candidates"].update_one({"candidate_id": ids[2]}, {"$set": {"state": "selected"}})
    claimed = store.claim("s", from_state="shortlisted", to="selected", limit=1)
    assert [d.candidate_id for d in claimed] == [ids[1]]
    migrate_candidates(database)  # crystaloop db migrate --rebuild
    assert database[SUMMARY_COLLECTION].find_one({"_id": ids[2]})["state"] == "selected"
    assert store.count_by_state("s") == {"selected": 2, "shortlisted": 1}
