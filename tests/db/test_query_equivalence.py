"""Every query that ``crystaloop query`` accepts gives the same answer on summaries as on full documents."""

from __future__ import annotations

import itertools
import random

import pytest
from pymatgen.core import Lattice, Structure

from crystaloop.db import store as store_module
from crystaloop.db.store import SORTABLE_FIELDS, CandidateStore, Window, _datetime, _slices
from crystaloop.properties import PROPERTY_NAMES


def _structures() -> list[Structure]:
    perovskites = [
        Structure(
            Lattice.cubic(a),
            [sa, sb, "O", "O", "O"],
            [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]],
        )
        for a, sa, sb in ((3.9, "Sr", "Ti"), (4.2, "Ba", "Zr"), (4.0, "Ca", "Ti"), (4.1, "Sr", "Sn"))
    ]
    rocksalts = [
        Structure.from_spacegroup("Fm-3m", Lattice.cubic(a), list(pair), [[0, 0, 0], [0.5, 0.5, 0.5]])
        for a, pair in ((4.2, ("Mg", "O")), (5.64, ("Na", "Cl")), (6.3, ("K", "Cl")))
    ]
    return perovskites + rocksalts


@pytest.fixture
def filled(database):
    """About 200 candidates in two campaigns and three rounds, in every state, some with DFT values."""
    rng = random.Random(7)
    store = CandidateStore(database)
    structures = _structures()
    docs = []
    for i in range(210):
        names = rng.sample(PROPERTY_NAMES, k=rng.randint(0, len(PROPERTY_NAMES)))
        predicted = {
            name: {"mean": None if rng.random() < 0.05 else rng.uniform(-3.0, 6.0), "std": 0.1}
            for name in names
        }
        doc = store.new_document(
            structures[i % len(structures)],
            campaign="a" if i % 3 else "b",
            round=i % 3,
            predicted=predicted,
        )
        docs.append(doc)
    store.insert_many(docs)
    ids = [d.candidate_id for d in docs]
    rng.shuffle(ids)
    for cid in ids[:60]:
        store.transition(cid, "rejected", stage="validity", reason="too close")
    for cid in ids[60:150]:
        store.transition(cid, "shortlisted", update={"acquisition_score": rng.uniform(0, 1)})
    for cid in ids[100:150]:
        store.transition(cid, "selected")
    for j, cid in enumerate(ids[120:150]):
        store.transition(cid, "submitted")
        if j % 3:
            store.transition(
                cid,
                "relaxed",
                update={"dft": {name: rng.uniform(-3.0, 6.0) for name in PROPERTY_NAMES[: 2 + j % 4]}},
            )
        else:
            store.transition(cid, "failed")
    store.set_fields(ids[0], {"dft": {"band_gap": None}})
    return store


CRITERIA = {
    "campaign": [None, "a", "b"],
    "round": [None, 0, 2],
    "state": [None, ["generated"], ["shortlisted", "selected"], ["relaxed"]],
    "formula": [None, "SrTiO3", "MgO", "O3SrTi"],
    "elements": [None, ["O"], ["O", "Ti"], ["Ti", "O", "Sr"], ["Cl"], ["Cl", "O"]],
    "chemsys": [None, "O-Sr-Ti", "Mg-O", "Cl-K"],
    "windows": [
        [],
        [Window("formation_energy_per_atom", -2.0, 1.0)],
        [Window("formation_energy_per_atom", None, 0.0), Window("band_gap", 1.0, None)],
        [Window("band_gap", 1.0, 3.0), Window("bulk_modulus", 0.0, 4.0)],
        [Window("band_gap", 5.5, None)],
        [Window("poisson_ratio", -1.0, 0.5)],
        [Window("band_gap", 1.0, 3.0), Window("band_gap", 5.0, None)],
    ],
    "dft": [False, True],
    "sort": [None]
    + [f"{sign}{name}" for sign in ("", "-") for name in SORTABLE_FIELDS + tuple(PROPERTY_NAMES)],
    "limit": [0, 1, 5, 50],
}


def _queries() -> list[dict]:
    """Each option alone, then a seeded sample of combinations."""
    out = [{}]
    for key, values in CRITERIA.items():
        out += [{key: v} for v in values if v not in (None, [], False)]
    windowed = [w for w in CRITERIA["windows"] if w]
    for windows, sort, dft, limit in itertools.product(
        windowed, ("formation_energy_per_atom", "-band_gap"), (False, True), (1, 5, 50)
    ):
        out.append({"windows": windows, "sort": sort, "dft": dft, "limit": limit})
    rng = random.Random(11)
    for _ in range(80):
        out.append({key: rng.choice(values) for key, values in CRITERIA.items()})
    return out


def _sort_value(doc, sort: str | None, dft: bool):
    name = (sort or "created_at").lstrip("-+")
    if name in PROPERTY_NAMES:
        if dft:
            return doc.dft.get(name)
        pred = doc.predicted.get(name)
        return pred.mean if pred else None
    return getattr(doc, name)


def assert_same_answer(store: CandidateStore, query: dict) -> None:
    """Same hits in the same order; within a run of equal sort values the order is free,
    and a run cut by the limit may hold any of the tied candidates."""
    query = {"limit": 50, **query}
    new = [doc for _, doc in store.query(**query)]
    old = [doc for _, doc in store.query_full_documents(**query)]
    everything = [doc for _, doc in store.query_full_documents(**{**query, "limit": 0})]
    sort, dft = query.get("sort"), query.get("dft", False)
    key = lambda d: _sort_value(d, sort, dft)  # noqa: E731
    assert [key(d) for d in new] == [key(d) for d in old], query
    runs = [list(g) for _, g in itertools.groupby(range(len(new)), key=lambda i: key(new[i]))]
    for n, run in enumerate(runs):
        got = {new[i].candidate_id for i in run}
        expected = {old[i].candidate_id for i in run}
        cut = n == len(runs) - 1 and query["limit"] and len(new) == query["limit"]
        if cut:
            tied = {d.candidate_id for d in everything if key(d) == key(new[run[0]])}
            assert got <= tied, query
        else:
            assert got == expected, query


@pytest.mark.parametrize("time_slices", ["default", "always"])
def test_every_query_matches_the_full_document_answer(filled, time_slices, monkeypatch):
    if time_slices == "always":
        # Slice by created_at whenever only campaign, state and round filter, however few match.
        monkeypatch.setattr(store_module, "TIME_SLICE_MIN_MATCHES", -1)
    queries = _queries()
    assert len(queries) > 150
    hits = sliced = 0
    for query in queries:
        assert_same_answer(filled, query)
        stats: dict = {}
        hits += len(filled.matching_ids(stats=stats, **{"limit": 50, **query}))
        sliced += stats["slices"] > 1
    assert hits > 1000, "the query set should exercise real hits, not only empty answers"
    assert sliced > 20, "window (and time) slices should be exercised"


def test_slices_cover_the_range_once():
    slices = _slices({"$gte": -2.0, "$lte": 1.0}, -10.0, 5.0, descending=False)
    assert slices[0] == {"$gte": -2.0, "$lt": pytest.approx(-2.0 + 3 / 64)}
    assert slices[-1]["$lte"] == 1.0 and "$lt" not in slices[-1]
    for before, after in itertools.pairwise(slices):
        assert before["$lt"] == after["$gte"]
    down = _slices({"$lte": 3.0}, 0.0, 20.0, descending=True)
    assert down[0] == {"$gte": pytest.approx(3.0 - 3 / 64), "$lte": 3.0}
    assert down[-1].keys() == {"$lt"}, "the open lower end stays open"
    for before, after in itertools.pairwise(down):
        assert before["$gte"] == after["$lt"]
    times = _slices({}, 0.0, 640.0, descending=True, value=_datetime)
    assert times[0] == {"$gte": _datetime(630.0)} and times[-1].keys() == {"$lt"}
