"""Competing phases of a DFT hull: the prior's phases near the CHGNet hull, relaxed once with
real pw.x through the campaign's backend, reused, and placed under a candidate's E_hull."""

from __future__ import annotations

import pytest
from pymatgen.core import Structure

from crystaloop.db.documents import CandidateState
from crystaloop.db.store import CandidateStore
from crystaloop.dft.references import bulk_structure
from crystaloop.loop.config import parse_campaign_config
from crystaloop.loop.hull_phases import (
    COLLECTION,
    add_hull_phases,
    competing_phases,
    relax_competing_phases,
    verify_against_hull,
)
from crystaloop.loop.stability import dft_hull


def _config(name: str):
    return parse_campaign_config(
        {
            "name": name,
            "targets": [{"property": "formation_energy_per_atom", "max": 0.0}],
            "elements": {"allow": ["Si", "C"]},
            "dft": {"engine": "espresso", "preset": "fast"},
            "execution": {"poll_interval_s": 0.5},
        }
    )


def test_competing_phases_are_the_prior_phases_near_the_chgnet_hull():
    phases = competing_phases(["Si", "C"])
    assert [(p.formula, p.structure_id) for p in phases] == [("SiC", "prior:B3:Si-C")]
    assert phases[0].chgnet_energy_above_hull == pytest.approx(0.0, abs=1e-9)
    assert len(phases[0].structure) == 2  # the primitive zincblende cell
    assert competing_phases(["Sr", "Ti", "O"], within=0.0)  # binary and ternary phases of a ternary system


@pytest.mark.pwx
def test_competing_phases_relax_once_and_complete_the_dft_hull(dft_settings, database, tmp_path):
    config = _config("hull")
    first = relax_competing_phases(database, config, [["Si", "C"]], work_dir=tmp_path / "jobs", poll_s=0.5)
    assert (first.phases, first.reused, first.relaxed, first.failed) == (1, 0, 1, [])
    [doc] = database[COLLECTION].find({})
    assert doc["state"] == "relaxed" and doc["structure_id"] == "prior:B3:Si-C"
    # PBE zincblende SiC lies a few tenths of an eV/atom below Si + diamond
    assert -0.5 < doc["formation_energy_per_atom"] < -0.15
    tasks = database["dft_tasks"].count_documents({})
    # a second campaign with the same settings reuses the phase: no new relaxation
    again = relax_competing_phases(database, _config("hull-2"), [["C", "Si"]], work_dir=tmp_path / "jobs2")
    assert (again.phases, again.reused, again.relaxed) == (1, 1, 0)
    assert database["dft_tasks"].count_documents({}) == tasks

    # a candidate of the system is placed against the hull the phase completes
    store = CandidateStore(database)
    wurtzite_like = bulk_structure("Si", "diamond", 4.4)
    wurtzite_like.replace(1, "C")
    cid, _ = store.add(wurtzite_like, campaign="hull", round=0)
    for state in (CandidateState.SHORTLISTED, CandidateState.SELECTED, CandidateState.SUBMITTED):
        store.transition(cid, state)
    ef = doc["formation_energy_per_atom"] + 0.2
    store.transition(
        cid,
        CandidateState.RELAXED,
        update={"dft": {"formation_energy_per_atom": ef}, "dft_engine": "espresso"},
    )
    run, rows = verify_against_hull(database, config, systems=["C-Si"])
    assert run.reused == 1 and run.relaxed == 0
    [row] = rows
    assert row["energy_above_hull"] == pytest.approx(0.2) and row["n_phases"] == 1 and not row["upper_bound"]
    stored = store.get(cid)
    assert stored.dft["energy_above_hull"] == pytest.approx(0.2)
    assert stored.stability["decomposition"][0]["formula"] == "SiC"
    assert stored.stability["engine"] == "espresso/fast"


def test_a_failed_competing_phase_makes_the_energy_above_hull_an_upper_bound(settings, database):
    config = parse_campaign_config(
        {
            "name": "bound",
            "targets": [{"property": "formation_energy_per_atom", "max": 0.0}],
            "dft": {"engine": "surrogate"},
        }  # fmt: skip
    )
    from crystaloop.dft.cache import relaxation_settings
    from crystaloop.dft.hull import FormationHull

    phase = competing_phases(["Si", "C"])[0]
    settings_ = relaxation_settings(
        phase.structure, engine="surrogate", preset=config.dft.preset, overrides={}
    )
    database[COLLECTION].insert_one(
        {"_id": "x", "structure_id": phase.structure_id, "formula": "SiC", "chemsys": "C-Si", "engine": "surrogate",
         "settings_key": settings_["key"], "structure": phase.structure.as_dict(), "state": "failed",
         "reason": "pw.x crashed", "formation_energy_per_atom": None, "task_id": None}
    )  # fmt: skip
    hull = add_hull_phases(FormationHull("test"), database, config, ["Si", "C"])
    stability = hull.stability("SiC", -0.3)
    assert stability.upper_bound and stability.against_elements_only
    # the surrogate's own hull is the CHGNet hull, which holds the prior's SiC already
    assert dft_hull(database, config, elements=["Si", "C"]).stability("SiC", -0.3).n_phases >= 1
    assert isinstance(Structure.from_dict(phase.structure.as_dict()), Structure)


def test_a_competing_phase_already_in_the_dft_cache_is_not_relaxed_again(settings, database, tmp_path):
    config = parse_campaign_config(
        {
            "name": "cached",
            "targets": [{"property": "formation_energy_per_atom", "max": 0.0}],
            "dft": {"engine": "surrogate"},
            "execution": {"poll_interval_s": 0.5},
        }  # fmt: skip
    )
    first = relax_competing_phases(database, config, [["Si", "C"]], work_dir=tmp_path / "a", poll_s=0.5)
    assert (first.relaxed, first.from_cache, first.failed) == (1, 0, [])
    [doc] = database[COLLECTION].find({})
    assert doc["state"] == "relaxed" and doc["formation_energy_per_atom"] < 0
    # the same structure under the same settings, as a candidate's relaxation would leave it
    database[COLLECTION].delete_many({})
    tasks = database["dft_tasks"].count_documents({})
    again = relax_competing_phases(database, config, [["Si", "C"]], work_dir=tmp_path / "b", poll_s=0.5)
    assert (again.relaxed, again.from_cache, again.reused) == (0, 1, 0)
    assert database["dft_tasks"].count_documents({}) == tasks
    [cached] = database[COLLECTION].find({})
    assert cached["formation_energy_per_atom"] == doc["formation_energy_per_atom"]
    assert cached["task_id"] == doc["task_id"]
