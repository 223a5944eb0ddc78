"""The candidate store against the real wire protocol."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from pymatgen.core import Lattice, Structure

from crystaloop.db.documents import CandidateState
from crystaloop.db.store import CandidateStore, StateError, Window


def rocksalt(a: float, species=("Na", "Cl")) -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(a), list(species), [[0, 0, 0], [0.5, 0.5, 0.5]])


def perovskite(a: float, a_site="Sr", b_site="Ti", x="O") -> Structure:
    return Structure(
        Lattice.cubic(a),
        [a_site, b_site, x, x, x],
        [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]],
    )


@pytest.fixture
def store(database):
    return CandidateStore(database)


def _pred(**values):
    return {k: {"mean": v, "std": 0.1, "model_version": "test"} for k, v in values.items()}


def test_document_fields(store):
    cid, inserted = store.add(perovskite(3.9), campaign="c", round=0, provenance={"mode": "random"})
    assert inserted
    doc = store.get(cid)
    assert doc.reduced_formula == "SrTiO3"
    assert doc.elements == ["O", "Sr", "Ti"]
    assert doc.chemsys == "O-Sr-Ti"
    assert doc.nsites == 5
    assert doc.spacegroup == "Pm-3m"
    assert doc.state == "generated"
    assert doc.provenance == {"mode": "random"}


def test_dedup_within_campaign_only(store):
    a, new_a = store.add(rocksalt(5.64), campaign="c1", round=0)
    # The same crystal as a supercell with a different lattice constant is equivalent.
    b, new_b = store.add(rocksalt(5.70).make_supercell([2, 1, 1], in_place=False), campaign="c1", round=1)
    c, new_c = store.add(rocksalt(5.64), campaign="c2", round=0)
    d, new_d = store.add(rocksalt(4.2, ("Mg", "O")), campaign="c1", round=0)
    assert new_a and not new_b and b == a
    assert new_c and c != a
    assert new_d
    # Same formula, different structure (CsCl type) is not a duplicate.
    cscl = Structure(Lattice.cubic(3.3), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    _, new_e = store.add(cscl, campaign="c1", round=0)
    assert new_e
    assert store.collection.count_documents({"campaign": "c1"}) == 3


def test_life_cycle_and_history(store):
    cid, _ = store.add(perovskite(3.9), campaign="c", round=0)
    for state in ("shortlisted", "selected", "submitted", "relaxed"):
        doc = store.transition(cid, state, owner="me")
        assert doc.state == state
    assert [h["state"] for h in doc.state_history] == [
        "generated",
        "shortlisted",
        "selected",
        "submitted",
        "relaxed",
    ]
    assert doc.owner == "me"


def test_rejection_records_stage_and_reason(store):
    cid, _ = store.add(perovskite(3.9), campaign="c", round=0)
    doc = store.transition(cid, CandidateState.REJECTED, stage="validity", reason="sites 0.3 Å apart")
    assert doc.rejected_stage == "validity" and "0.3" in doc.rejected_reason
    with pytest.raises(StateError, match="'rejected'"):
        store.transition(cid, "shortlisted")


@pytest.mark.parametrize(
    "path, illegal",
    [
        ([], "selected"),
        ([], "submitted"),
        ([], "relaxed"),
        (["shortlisted"], "relaxed"),
        (["shortlisted", "selected"], "failed"),
        (["shortlisted", "selected", "submitted", "failed"], "relaxed"),
    ],
)
def test_illegal_transitions(store, path, illegal):
    cid, _ = store.add(perovskite(3.9), campaign="c", round=0)
    for state in path:
        store.transition(cid, state)
    with pytest.raises(StateError, match="cannot become"):
        store.transition(cid, illegal)
    assert store.get(cid).state == (path[-1] if path else "generated")


def test_unknown_candidate(store):
    with pytest.raises(StateError, match="no candidate"):
        store.transition("nope", "shortlisted")


def test_claim_takes_best_score_first(store):
    ids = []
    for i, a in enumerate((3.8, 3.9, 4.0, 4.1)):
        cid, _ = store.add(perovskite(a, b_site=["Ti", "Zr", "Hf", "Sn"][i]), campaign="c", round=0)
        store.transition(cid, "shortlisted", update={"acquisition_score": float(i)})
        ids.append(cid)
    claimed = store.claim("c", from_state="shortlisted", to="selected", limit=2)
    assert [d.candidate_id for d in claimed] == [ids[3], ids[2]]
    assert store.count_by_state("c") == {"selected": 2, "shortlisted": 2}


def test_two_processes_never_claim_the_same_candidate(store, settings):
    n = 60
    docs = []
    for i in range(n):
        doc = store.new_document(rocksalt(4.0 + 0.01 * i), campaign="race", round=0)
        doc = doc.model_copy(update={"state": "shortlisted"})
        docs.append(doc)
    store.insert_many(docs)
    worker = textwrap.dedent(
        """
        import json, sys
        from crystaloop.db import get_database
        from crystaloop.db.store import CandidateStore
        store = CandidateStore(get_database())
        got = []
        while True:
            claimed = store.claim("race", from_state="shortlisted", to="selected", limit=1,
                                  owner=sys.argv[1])
            if not claimed:
                break
            cid = claimed[0].candidate_id
            store.transition(cid, "submitted", owner=sys.argv[1])
            got.append(cid)
        print(json.dumps(got))
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", worker, f"w{i}"], stdout=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    results = [json.loads(p.communicate(timeout=300)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    first, second = map(set, results)
    assert not first & second
    assert len(first | second) == n
    assert first and second, "both workers should have claimed some candidates"
    assert store.count_by_state("race") == {"submitted": n}


def test_query_filters(store):
    rows = [
        (
            perovskite(3.9),
            _pred(formation_energy_per_atom=-2.5, band_gap=1.8),
            {"formation_energy_per_atom": -2.4},
        ),
        (perovskite(4.2, "Ba", "Zr"), _pred(formation_energy_per_atom=-3.2, band_gap=3.0), {}),
        (rocksalt(4.2, ("Mg", "O")), _pred(formation_energy_per_atom=-2.9, band_gap=5.0), {}),
        (rocksalt(5.64), _pred(formation_energy_per_atom=-2.0, band_gap=5.0), {}),
    ]
    for i, (s, pred, dft) in enumerate(rows):
        cid, _ = store.add(s, campaign="q", round=i % 2, predicted=pred)
        if dft:
            store.set_fields(cid, {"dft": dft})
    formulas = lambda hits: sorted(d.reduced_formula for _, d in hits)  # noqa: E731
    assert formulas(store.query(campaign="q", formula="O3SrTi")) == ["SrTiO3"]
    assert formulas(store.query(elements=["O"])) == ["BaZrO3", "MgO", "SrTiO3"]
    assert formulas(store.query(elements=["O", "Ba"])) == ["BaZrO3"]
    assert formulas(store.query(chemsys="O-Mg")) == ["MgO"]
    assert formulas(store.query(round=1)) == ["BaZrO3", "NaCl"]
    win = Window("formation_energy_per_atom", -3.0, -2.2)
    assert formulas(store.query(windows=[win])) == ["MgO", "SrTiO3"]
    two = [win, Window("band_gap", None, 2.0)]
    assert formulas(store.query(windows=two)) == ["SrTiO3"]
    assert formulas(store.query(windows=[win], dft=True)) == ["SrTiO3"]
    hits = store.query(campaign="q", sort="formation_energy_per_atom", limit=2)
    assert [d.reduced_formula for _, d in hits] == ["BaZrO3", "MgO"]
    hits = store.query(campaign="q", sort="-band_gap", limit=1)
    assert hits[0][1].predicted["band_gap"].mean == 5.0
    assert isinstance(hits[0][0], Structure)
    assert formulas(store.query(state="generated")) == formulas(store.query())


def test_window_rejects_inverted_bounds():
    with pytest.raises(ValueError):
        Window("band_gap", 3.0, 1.0)
    with pytest.raises(KeyError, match="allowed"):
        Window("colour", 1.0, 2.0)


def test_explain_uses_index(store):
    for i in range(20):
        store.add(
            rocksalt(4 + i * 0.05, ("Mg", "O")),
            campaign="x",
            round=0,
            predicted=_pred(formation_energy_per_atom=-i / 10),
            dedup=False,
        )
    # The embedded server serves the first clause from an index and filters the rest,
    # so the window must lead and its clause alone must be an index scan.
    query = store.summary_filter(windows=[Window("formation_energy_per_atom", -1.0, -0.5)], campaign="x")
    lead, clause = next(iter(query.items()))
    assert lead == "property_keys"
    plan = json.dumps(store.summaries.find({lead: clause}).explain(), default=str)
    assert "IXSCAN" in plan
    assert len(store.query(windows=[Window("formation_energy_per_atom", -1.0, -0.5)], campaign="x")) == 6


def test_a_campaigns_named_queries(store):
    """States, a round's selection (and every round's up to it), a generation's count, the DFT total."""
    ids = [
        store.add(rocksalt(a, pair), campaign="named", round=0, provenance={"generation_id": "named-r0"})[0]
        for a, pair in ((5.6, ("Na", "Cl")), (6.3, ("K", "Cl")), (4.0, ("Li", "F")), (4.2, ("Mg", "O")))
    ]
    store.add(rocksalt(5.0, ("K", "Br")), campaign="other", round=0, provenance={"generation_id": "named-r0"})
    for cid in ids:
        store.transition(cid, CandidateState.SHORTLISTED)
    for cid, round in zip(ids[:3], (0, 0, 1), strict=True):
        store.transition(cid, CandidateState.SELECTED, update={"selected_round": round})
    store.transition(ids[1], CandidateState.SUBMITTED)
    store.transition(ids[2], CandidateState.SUBMITTED)
    store.transition(ids[2], CandidateState.RELAXED)

    assert [c.candidate_id for c in store.in_state("named", CandidateState.SHORTLISTED)] == [ids[3]]
    assert [c.candidate_id for c in store.in_state("named", "relaxed")] == [ids[2]]
    assert [c.candidate_id for c in store.selected_in_round("named", 0)] == sorted(ids[:2])
    assert [c.candidate_id for c in store.selected_in_round("named", 0, state="submitted")] == [ids[1]]
    assert [c.candidate_id for c in store.selected_in_round("named", 1, up_to=True)] == sorted(ids[:3])
    assert store.count_selected("named", 0) == 2
    assert store.count_selected("named", 1, states=["relaxed", "failed"]) == 1
    assert store.count_selected("named", 0, states=["relaxed", "failed"]) == 0
    assert store.count_generated("named", 0, "named-r0") == 4
    assert store.count_generated("named", 0, "preview") == 0
    assert store.dft_total("named") == 2 and store.dft_total("other") == 0


def test_order_key_does_not_depend_on_the_random_candidate_id():
    """The same generation sorts the same way whatever ids the documents drew."""

    def batch():
        docs = []
        for index, a in [(2, 4.1), (0, 5.6), (1, 3.9)]:
            doc = CandidateStore.new_document(
                rocksalt(a), campaign="c", round=1, provenance={"sample_index": index}
            )
            docs.append(doc)
        docs.append(CandidateStore.new_document(perovskite(3.9), campaign="c", round=0))
        return docs

    first = [
        (d.round, d.provenance.get("sample_index")) for d in sorted(batch(), key=lambda d: d.order_key())
    ]
    second = [
        (d.round, d.provenance.get("sample_index")) for d in sorted(batch(), key=lambda d: d.order_key())
    ]
    assert first == second == [(0, None), (1, 0), (1, 1), (1, 2)]
