"""Bulk inserts: one write per collection, summaries and counters equal to the full documents, duplicates refused."""

from __future__ import annotations

import random

import pydantic
import pymongo
import pytest
from pymatgen.core import Lattice, Structure

from crystaloop.db.migrate import layout_version
from crystaloop.db.store import CandidateStore, Window
from crystaloop.db.summaries import (
    COUNTER_COLLECTION,
    LAYOUT_VERSION,
    META_COLLECTION,
    PROPERTY_KEY_CLAMP,
    SUMMARY_COLLECTION,
    SUMMARY_SOURCE_FIELDS,
    CandidateSummaryDoc,
    property_key,
    property_key_range,
)
from crystaloop.loop.bench.database import synthetic_candidates
from crystaloop.properties import PROPERTY_NAMES


def aggregated_counts(database, campaign: str, round: int | None = None) -> dict[str, int]:
    """Candidates per state, counted over the full documents."""
    match = {"campaign": campaign, **({"round": round} if round is not None else {})}
    pipeline = [{"$match": match}, {"$group": {"_id": "$state", "n": {"$sum": 1}}}]
    return {row["_id"]: row["n"] for row in database["candidates"].aggregate(pipeline)}


def assert_derived_data_matches(database, store: CandidateStore) -> None:
    """Every summary is the one derived from its full document, and every counter is a recount."""
    expected = {
        raw["candidate_id"]: CandidateSummaryDoc.document_from(raw)
        for raw in database["candidates"].find({}, SUMMARY_SOURCE_FIELDS)
    }
    stored = {s["_id"]: s for s in database[SUMMARY_COLLECTION].find({})}
    assert stored == expected
    for campaign in database["candidates"].distinct("campaign"):
        assert store.count_by_state(campaign) == aggregated_counts(database, campaign)
        for round_ in database["candidates"].distinct("round", {"campaign": campaign}):
            assert store.count_by_state(campaign, round=round_) == aggregated_counts(
                database, campaign, round_
            )


def test_bulk_insert_keeps_summaries_and_counts_equal_to_full_documents(database):
    store = CandidateStore(database)
    timings: dict[str, float] = {}
    inserted = 0
    for campaign, seed in (("a", 0), ("b", 1)):
        docs = synthetic_candidates(250, campaign, seed=seed)
        for i in range(0, len(docs), 100):
            inserted += store.insert_many(docs[i : i + 100], timings=timings)

    assert inserted == 500
    assert database["candidates"].count_documents({}) == 500
    assert_derived_data_matches(database, store)
    assert sum(store.count_by_state("a").values()) == 250
    assert set(timings) == {"dump", "candidates", "build_summaries", "summaries", "counters"}
    assert all(seconds > 0 for seconds in timings.values())
    # The counters carry each round's created_at span, which default-sorted queries slice.
    for counter in database[COUNTER_COLLECTION].find({"campaign": "a"}):
        created = [
            d["created_at"] for d in database["candidates"].find({"campaign": "a", "round": counter["round"]})
        ]
        assert (counter["first_created_at"], counter["last_created_at"]) == (min(created), max(created))
    # A window query over the bulk-inserted summaries answers as the full documents do.
    query = {"campaign": "a", "windows": [Window("band_gap", 1.0, 3.0)], "sort": "-band_gap", "limit": 0}
    new = [d.candidate_id for _, d in store.query(**query)]
    assert new and new == [d.candidate_id for _, d in store.query_full_documents(**query)]


def test_a_round_killed_inside_its_insert_is_repaired_from_the_candidates(database):
    """Candidates written, then the process killed before their summaries and counter."""
    from crystaloop.db.store import _stored

    store = CandidateStore(database)
    docs = [d for d in synthetic_candidates(60, "k", seed=3) if d.round == 0]
    assert len(docs) > 10
    store.insert_many(docs[:5])  # an earlier, complete insert of the same round
    database["candidates"].insert_many([_stored(d) for d in docs[5:]])
    assert sum(store.count_by_state("k", round=0).values()) == 5
    assert store.repair_round("k", 0) == len(docs)
    assert sum(store.count_by_state("k", round=0).values()) == len(docs)
    assert_derived_data_matches(database, store)
    assert store.repair_round("k", 0) == len(docs)  # idempotent
    assert_derived_data_matches(database, store)


def test_duplicate_ids_are_refused_in_one_batch_and_across_batches(database):
    store = CandidateStore(database)
    docs = synthetic_candidates(30, "dup")
    repeated = docs[3].model_copy(update={"state": "relaxed"})

    with pytest.raises(pymongo.errors.BulkWriteError) as refused:
        store.insert_many([*docs[:20], repeated])
    assert [e["index"] for e in refused.value.details["writeErrors"]] == [20]
    assert database["candidates"].count_documents({"candidate_id": docs[3].candidate_id}) == 1
    assert database["candidates"].find_one({"candidate_id": docs[3].candidate_id})["state"] == docs[3].state
    assert database[SUMMARY_COLLECTION].count_documents({}) == 20
    assert_derived_data_matches(database, store)

    # The next batch repeats two stored ids; its new candidates still land, with summaries and counts.
    with pytest.raises(pymongo.errors.BulkWriteError) as refused:
        store.insert_many([docs[0], *docs[20:], docs[19]])
    assert sorted(e["index"] for e in refused.value.details["writeErrors"]) == [0, 11]
    assert database["candidates"].count_documents({}) == 30
    assert database[SUMMARY_COLLECTION].count_documents({}) == 30
    assert sum(store.count_by_state("dup").values()) == 30
    assert_derived_data_matches(database, store)
    assert store.insert_many([]) == 0


def test_structure_dedup_finds_bulk_inserted_candidates(database):
    store = CandidateStore(database)

    def rocksalt(a: float, species=("Na", "Cl")) -> Structure:
        return Structure.from_spacegroup("Fm-3m", Lattice.cubic(a), list(species), [[0, 0, 0], [0.5] * 3])

    bulk = [store.new_document(rocksalt(5.64), campaign="d", round=0)]
    assert store.insert_many(bulk) == 1
    same, inserted = store.add(
        rocksalt(5.64).make_supercell([1, 1, 2], in_place=False), campaign="d", round=1
    )
    assert (same, inserted) == (bulk[0].candidate_id, False)
    other, inserted = store.add(rocksalt(4.2, ("Mg", "O")), campaign="d", round=1)
    assert inserted and other != bulk[0].candidate_id
    again, inserted = store.add(rocksalt(4.2, ("Mg", "O")), campaign="d", round=2)
    assert (again, inserted) == (other, False)
    # Another campaign keeps its own copy.
    assert store.add(rocksalt(5.64), campaign="e", round=0)[1]
    assert store.count_by_state("d") == {"generated": 2}


def test_property_keys_sort_as_values_and_contain_windows():
    rng = random.Random(7)
    values = sorted(
        [rng.uniform(-50, 1200) for _ in range(400)]
        + [
            0.0,
            -0.0,
            1e-9,
            -1e-9,
            2 * PROPERTY_KEY_CLAMP,
            -2 * PROPERTY_KEY_CLAMP,
            float("inf"),
            float("-inf"),
        ]
    )
    for name in PROPERTY_NAMES:
        for dft in (False, True):
            keys = [property_key(name, v, dft=dft) for v in values]
            assert keys == sorted(keys)
            assert all(isinstance(k, str) and len(k) == len(keys[0]) for k in keys)
            for _ in range(50):
                lo, hi = sorted(rng.sample(values[1:-1], 2))
                bounds = property_key_range(name, {"$gte": lo, "$lt": hi}, dft=dft)
                inside = [property_key(name, v, dft=dft) for v in values if lo <= v < hi]
                assert all(bounds["$gte"] <= k <= bounds["$lte"] for k in inside)
    # Each property, predicted or DFT, owns its own stretch of keys: no two stretches overlap.
    stretches = sorted(
        (property_key(n, -PROPERTY_KEY_CLAMP, dft=d), property_key(n, PROPERTY_KEY_CLAMP, dft=d))
        for d in (False, True)
        for n in PROPERTY_NAMES
    )
    assert len(stretches) == 2 * len(PROPERTY_NAMES)
    assert all(a[1] < b[0] for a, b in zip(stretches, stretches[1:], strict=False))


def test_summary_is_a_valid_model_document():
    doc = synthetic_candidates(1, "m")[0]
    raw = doc.model_dump()
    summary = CandidateSummaryDoc.document_from(raw)
    assert CandidateSummaryDoc.model_validate(summary).model_dump(by_alias=True) == summary
    assert all(isinstance(k, str) for k in summary["property_keys"]) and len(summary["property_keys"]) == 8
    # Values that are not plain floats are coerced by the model as before, or refused.
    odd = {**raw, "round": 2, "dft": {"band_gap": 2, "bulk_modulus": None}, "acquisition_score": "0.5"}
    coerced = CandidateSummaryDoc.document_from(odd)
    assert coerced["dft"] == {"band_gap": 2.0, "bulk_modulus": None}
    assert coerced["acquisition_score"] == 0.5 and isinstance(coerced["acquisition_score"], float)
    assert property_key("band_gap", 2.0, dft=True) in coerced["property_keys"]
    with pytest.raises(pydantic.ValidationError):
        CandidateSummaryDoc.document_from({**raw, "dft": {"band_gap": "not a number"}})


def test_numeric_property_keys_of_layout_2_are_migrated(database):
    store = CandidateStore(database)
    store.insert_many(synthetic_candidates(60, "v2"))
    # As layout 2 wrote them: property keys were numbers.
    for summary in database[SUMMARY_COLLECTION].find({}, {"property_keys": 1}):
        floats = [float(i) for i, _ in enumerate(summary["property_keys"])]
        database[SUMMARY_COLLECTION].update_one({"_id": summary["_id"]}, {"$set": {"property_keys": floats}})
    database[META_COLLECTION].update_one({"_id": "candidate_layout"}, {"$set": {"version": 2}})

    store = CandidateStore(database)

    assert layout_version(database) == LAYOUT_VERSION
    assert database[SUMMARY_COLLECTION].count_documents({"property_keys": {"$type": "double"}}) == 0
    assert_derived_data_matches(database, store)
    query = {
        "campaign": "v2",
        "windows": [Window("formation_energy_per_atom", -2.0, 0.0)],
        "sort": "formation_energy_per_atom",
    }
    new = [d.candidate_id for _, d in store.query(**query)]
    assert new and new == [d.candidate_id for _, d in store.query_full_documents(**query)]


def test_the_derived_property_keys_never_move_the_learnt_ones():
    from crystaloop.db.summaries import property_key

    # the layout's first keys: E_f at 0 (predicted) and 8 (DFT); E_hull after all sixteen
    assert property_key("formation_energy_per_atom", 0.0).startswith("00:")
    assert property_key("formation_energy_per_atom", 0.0, dft=True).startswith("08:")
    assert property_key("dielectric_constant", 1.0, dft=True).startswith("15:")
    assert property_key("energy_above_hull", 0.0).startswith("16:")
    assert property_key("energy_above_hull", 0.0, dft=True).startswith("17:")
