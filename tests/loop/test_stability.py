"""Energy above the hull in a campaign: the predicted E_hull, the cascade's hull stages, and a
surrogate round whose target is a stability window."""

from __future__ import annotations

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

from crystaloop.db.campaigns import CampaignStore
from crystaloop.db.store import CandidateStore
from crystaloop.dft.hull import FormationHull, HullPhase
from crystaloop.loop.campaign import Campaign
from crystaloop.loop.config import parse_campaign_config
from crystaloop.loop.filters import Candidate, HullPhasesStage
from crystaloop.loop.stability import HullPredictor, chgnet_hull, prior_phases


class FixedPredictor:
    """Formation energies (eV/atom) by reduced formula, std 0.1."""

    properties = ["formation_energy_per_atom", "band_gap"]
    version = "fixed"

    def __init__(self, values: dict[str, float]) -> None:
        self.values = values

    def predict(self, structures):
        mean = np.array([[self.values[s.composition.reduced_formula], 0.0] for s in structures])
        return mean, np.full_like(mean, 0.1)


def _b2(a: str, b: str) -> Structure:
    return Structure(Lattice.cubic(3.0), [a, b], [[0, 0, 0], [0.5, 0.5, 0.5]])


def test_the_predicted_energy_above_hull_is_the_predicted_formation_energy_minus_the_hull():
    hull = FormationHull("test", [HullPhase("NiAl3", -0.4, "p1"), HullPhase("Ni3Al", -0.5, "p2")])
    predictor = HullPredictor(FixedPredictor({"AlNi": -0.6, "CuPd": -0.1}), hull)
    mean, std = predictor.predict([_b2("Ni", "Al"), _b2("Cu", "Pd")])
    assert predictor.properties == ["formation_energy_per_atom", "band_gap", "energy_above_hull"]
    # at x_Al = 0.5 the hull runs between Ni3Al (0.25, -0.5) and NiAl3 (0.75, -0.4): -0.45
    assert mean[0, 2] == pytest.approx(-0.6 + 0.45)
    assert mean[1, 2] == pytest.approx(-0.1)  # Cu-Pd holds no phase: against the elements, E_f itself
    assert std[:, 2] == pytest.approx(std[:, 0])


def test_a_predictor_without_a_formation_energy_cannot_give_an_energy_above_hull():
    predictor = FixedPredictor({})
    predictor.properties = ["band_gap"]
    with pytest.raises(ValueError, match="no formation energy"):
        HullPredictor(predictor, FormationHull("test"))


def test_the_hull_phases_stage_rejects_systems_too_thin_to_judge():
    hull = FormationHull("test", [HullPhase("NiAl3", -0.4, "p1")])
    stage = HullPhasesStage(hull, min_phases=1)
    verdicts = stage.judge([Candidate(0, _b2("Ni", "Al")), Candidate(1, _b2("Cu", "Pd"))])
    assert verdicts[0] == (True, None)
    assert verdicts[1] == (False, "the Cu-Pd hull holds 0 phases besides the elements (< 1)")


def test_the_chgnet_hull_holds_the_prior_set():
    labeller, phases = prior_phases()
    assert labeller.startswith("chgnet") and len(phases) > 1000
    ni_al = [p for p in phases if p.formula in ("NiAl", "AlNi")]
    assert ni_al, "the prior set has B1/B2/B3 NiAl"


def test_a_surrogate_round_with_a_stability_window(settings, prior_subset, loop_config, make_shortlist):
    database = prior_subset
    name = "stability"
    ids = make_shortlist(database, name)
    config = loop_config(
        name,
        targets=[{"property": "energy_above_hull", "max": 0.1}],
        retrain={"cgcnn": False, "generator_conditioning": False, "hooks": ["dft_hull"]},
    )
    campaign = Campaign(parse_campaign_config(config), database=database, log=lambda line: None)
    assert campaign.run().status == "finished"
    store = CandidateStore(database)
    relaxed = [store.get(c) for c in ids if store.get(c).state == "relaxed"]
    assert relaxed
    for doc in relaxed:
        stability = doc.stability
        assert stability["engine"].startswith("chgnet")
        hull = chgnet_hull(database, name, exclude=doc.candidate_id)
        expected = doc.dft["formation_energy_per_atom"] - hull.hull_energy_per_atom(doc.reduced_formula)
        assert doc.dft["energy_above_hull"] == pytest.approx(expected)
        assert stability["energy_above_hull"] == doc.dft["energy_above_hull"]
        assert stability["n_phases"] == len(hull.phases_in(doc.elements)) > 0
        assert stability["decomposition"]
    record = CampaignStore(database).round(name, 0)
    assert record.metrics["hits"] == sum(d.dft["energy_above_hull"] <= 0.1 for d in relaxed)
    # the dft_hull hook re-placed the hits' systems (the surrogate's hull already holds the prior)
    [hook] = [h for h in record.steps["retrain"].outputs["hooks"] if h["name"] == "dft_hull"]
    hit_systems = {d.chemsys for d in relaxed if d.dft["energy_above_hull"] <= 0.1}
    assert hook["status"] == "done", hook["error"]
    assert sorted(hook["metrics"]["systems"]) == sorted(hit_systems) and hook["metrics"]["relaxed"] == 0
    assert hook["metrics"]["placed"] == sum(d.chemsys in hit_systems for d in relaxed)
    # `crystaloop query` windows the DFT E_hull like any property
    import json

    from typer.testing import CliRunner

    from crystaloop.cli import app

    below = max(d.dft["energy_above_hull"] for d in relaxed) + 1e-6
    args = [
        "query",
        "--campaign",
        name,
        "--dft",
        "--window",
        f"energy_above_hull::{below}",
        "--format",
        "json",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert {r["candidate_id"] for r in json.loads(result.stdout)} == {d.candidate_id for d in relaxed}
    args[5] = f"energy_above_hull:{below}:"
    above = CliRunner().invoke(app, args)
    assert above.exit_code == 0 and json.loads(above.stdout) == [], above.output
    # the report lists every relaxed candidate with its E_hull and a CIF, and counts S.U.N.
    from pathlib import Path

    files = [Path(f) for f in record.steps["report"].outputs["files"]]
    report = next(f for f in files if f.name == "report.md")
    text = report.read_text()
    assert "## Relaxed candidates" in text and "| all | " in text
    for doc in relaxed:
        assert doc.candidate_id in text
        cif = report.parent / "cif" / f"{doc.candidate_id}.cif"
        assert Structure.from_file(cif).composition.reduced_formula == doc.reduced_formula
    hits = [d for d in relaxed if d.dft["energy_above_hull"] <= 0.1]
    assert len([f for f in files if f.name.startswith("hull-")]) == len({d.chemsys for d in hits})


def test_sun_flags_on_known_structures():
    from crystaloop.loop.stability import sun_flags

    rock_salt = Structure.from_spacegroup("Fm-3m", Lattice.cubic(4.2), ["Mg", "O"], [[0, 0, 0], [0.5] * 3])
    wurtzite = Structure(
        Lattice.hexagonal(3.2, 5.2),
        ["Zn", "Zn", "O", "O"],
        [[1 / 3, 2 / 3, 0], [2 / 3, 1 / 3, 0.5], [1 / 3, 2 / 3, 0.38], [2 / 3, 1 / 3, 0.88]],
    )
    flags = sun_flags([rock_salt, wurtzite, wurtzite.copy()], [-0.05, 0.0, 0.05])
    assert [f.stable for f in flags] == [True, True, False]
    assert [f.metastable for f in flags] == [True, True, True]
    assert [f.unique for f in flags] == [True, True, False]
    # rock salt is a prior prototype; wurtzite is new, once: the second one matches the first
    assert [f.novel for f in flags] == [False, True, False]
    assert [f.sun for f in flags] == [False, True, False]


def _corrected_config(name: str, correct: bool = True):
    from crystaloop.loop.config import parse_campaign_config

    return parse_campaign_config(
        {
            "name": name,
            "targets": [{"property": "formation_energy_per_atom", "max": 0.0}],
            "elements": {"allow": ["Ni", "O"]},
            "dft": {"engine": "espresso", "preset": "demo", "anion_correction": correct,
                    "magnetic_orderings": ["fm", "afm"]},
        }  # fmt: skip
    )


def test_a_corrected_campaign_shifts_its_results_and_its_competing_phases_alike(
    dft_settings, database, monkeypatch
):
    from crystaloop.db.documents import CandidateState
    from crystaloop.db.store import CandidateStore
    from crystaloop.dft import corrections
    from crystaloop.dft.cache import relaxation_settings
    from crystaloop.dft.pseudos import family_from_settings
    from crystaloop.loop.hull_phases import COLLECTION
    from crystaloop.loop.stability import campaign_correction, corrected_values, dft_hull

    family = family_from_settings()
    fit = {"family": family.name, "preset": "demo@1", "values": {"O": -0.6},
           "md5": {"O": family.pseudopotentials["O"].md5}}  # fmt: skip
    monkeypatch.setattr(corrections, "load_fits", lambda path=None: [fit])
    config = _corrected_config("corrected")
    assert config.dft.overrides["magnetic_orderings"] == ["fm", "afm"]  # reaches the preset and cache key
    assert campaign_correction(config).values == {"O": -0.6}
    assert campaign_correction(_corrected_config("raw", correct=False)).values == {}

    values, label = corrected_values(config, "NiO", {"formation_energy_per_atom": -0.9, "band_gap": 1.0})
    assert values["formation_energy_per_atom"] == pytest.approx(-1.2)
    assert values["formation_energy_per_atom_raw"] == -0.9 and label.startswith("anion-fit:")
    # applied twice (a cached result passes through again) it still starts from the raw value
    assert corrected_values(config, "NiO", values)[0]["formation_energy_per_atom"] == pytest.approx(-1.2)
    assert corrected_values(config, "Ni", {"formation_energy_per_atom": 0.0})[1] == "none"

    # A competing phase (raw, as relaxed) and a relaxed candidate (raw kept beside the corrected
    # value) enter the hull through the same correction.
    ni3o4 = Structure(Lattice.cubic(5.0), ["Ni"] * 3 + ["O"] * 4,
                      [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0.25, 0.25, 0.25], [0.75, 0.75, 0.25],
                       [0.75, 0.25, 0.75], [0.25, 0.75, 0.75]])  # fmt: skip
    key = relaxation_settings(ni3o4, engine="espresso", preset="demo", overrides=config.dft.overrides)["key"]
    database[COLLECTION].insert_one(
        {"_id": "p", "structure_id": "prior:x", "formula": "Ni3O4", "chemsys": "Ni-O", "engine": "espresso",
         "settings_key": key, "structure": ni3o4.as_dict(), "state": "relaxed",
         "formation_energy_per_atom": -0.8, "task_id": "t-ni3o4"}
    )  # fmt: skip
    store = CandidateStore(database)
    rock_salt = Structure(Lattice.cubic(4.18), ["Ni", "O"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    cid, _ = store.add(rock_salt, campaign="corrected", round=0)
    for state in (CandidateState.SHORTLISTED, CandidateState.SELECTED, CandidateState.SUBMITTED):
        store.transition(cid, state)
    store.transition(cid, CandidateState.RELAXED, update={"dft": values, "dft_engine": "espresso"})
    hull = dft_hull(database, config, elements=["Ni", "O"])
    energies = {p.formula: p.formation_energy_per_atom for p in hull.phases_in(["Ni", "O"])}
    assert energies["Ni3O4"] == pytest.approx(-0.8 - 0.6 * 4 / 7)
    assert energies["NiO"] == pytest.approx(-1.2)
