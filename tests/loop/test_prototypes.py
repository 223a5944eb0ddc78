"""Decorated prototypes as a campaign's candidates: any crystal system, judged by the cascade."""

from __future__ import annotations

import pytest
from pymatgen.core import Lattice, Structure
from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

from crystaloop.errors import UserError
from crystaloop.loop.config import parse_campaign_config
from crystaloop.loop.filters import Candidate, CrystalSystemStage
from crystaloop.loop.prototypes import prototype_batch, substitution_pool

PALETTE = ["Zn", "Cd", "Ga", "Al", "In", "O", "S", "Se", "N", "Ni", "As", "Sb"]


def _config(loop_config, name="hex", **changes):
    raw = loop_config(
        name,
        targets=[{"property": "formation_energy_per_atom", "min": -2.0, "max": -0.2}],
        elements={"allow": PALETTE},
        sampling={"mode": "prototypes"},
        filters={"crystal_systems": ["hexagonal"], "max_nsites": 8, "uip_max_relaxations": 4},
        budget={"candidates_per_round": 40, "dft_per_round": 2},
    )
    raw.update(changes)
    return parse_campaign_config(raw)


def _wurtzite(a=3.25, c=5.21) -> Structure:
    return Structure(
        Lattice.hexagonal(a, c), ["Zn", "Zn", "O", "O"],
        [[1 / 3, 2 / 3, 0], [2 / 3, 1 / 3, 0.5], [1 / 3, 2 / 3, 0.382], [2 / 3, 1 / 3, 0.882]],
    )  # fmt: skip


def test_the_crystal_system_stage_keeps_only_the_systems_asked_for():
    rock_salt = Structure(Lattice.cubic(4.2), ["Mg"] * 4 + ["O"] * 4,
                          [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5],
                           [0.5, 0, 0], [0, 0.5, 0], [0, 0, 0.5], [0.5, 0.5, 0.5]])  # fmt: skip
    verdicts = CrystalSystemStage(["hexagonal"]).judge([Candidate(0, _wurtzite()), Candidate(1, rock_salt)])
    assert verdicts[0] == (True, None)
    assert verdicts[1] == (False, "cubic, not one of crystal_systems hexagonal")


def test_a_misspelt_crystal_system_is_refused_by_the_config(loop_config):
    with pytest.raises(UserError, match="1 problem") as raised:
        parse_campaign_config(loop_config("x", filters={"crystal_systems": ["hexagnal"]}))
    (line,) = raised.value.lines
    assert "filters.crystal_systems" in line and "hexagonal" in line


def test_the_pool_holds_only_hexagonal_prototypes_of_the_palette(loop_config):
    from crystaloop.generative.data.decorate import crystal_system

    config = _config(loop_config)
    pool = substitution_pool(config, crystal_systems=["hexagonal"])
    assert len(pool) >= 10
    prototypes = {d.prototype for d in pool}
    assert "AB_hP4_186_b_b" in prototypes  # wurtzite
    for decoration in pool:
        structure = decoration.structure()
        assert crystal_system(structure) == "hexagonal"
        assert {el.symbol for el in structure.composition} <= set(PALETTE)
        assert structure.composition.anonymized_formula == "AB"


def test_prototype_batches_are_drawn_by_probability_and_reproducible(loop_config, settings, database):
    config = _config(loop_config)
    first = prototype_batch(config, database=database, n=12, seed=3)
    again = prototype_batch(config, database=database, n=12, seed=3)
    other = prototype_batch(config, database=database, n=12, seed=4)
    ids = [c.sample["structure_id"] for c in first.candidates]
    assert ids == [c.sample["structure_id"] for c in again.candidates]
    assert ids != [c.sample["structure_id"] for c in other.candidates]
    assert len(set(ids)) == 12  # without replacement
    assert first.strategy == "prototypes" and first.parameters["crystal_systems"] == ["hexagonal"]
    assert all(c.sample["probability"] > 0 and c.structure is not None for c in first.candidates)
    assert "cgcnn" in first.model_paths
    # More than the pool asks for: the whole pool, once.
    everything = prototype_batch(config, database=database, n=10_000, seed=3)
    assert len(everything.candidates) == first.parameters["pool"]
    pool = first.parameters["pool"]
    assert everything.summary() == f"drew {pool} of {pool} prototype decorations (asked for 10000)"


def test_no_prototype_for_the_settings_is_one_clear_line(loop_config, settings, database):
    config = _config(loop_config, elements={"allow": ["Na", "K"]})
    with pytest.raises(UserError, match="no known prototype .* crystal systems hexagonal"):
        prototype_batch(config, database=database, n=5, seed=0)


def test_a_surrogate_round_relaxes_non_cubic_prototypes(loop_config, settings, prior_subset):
    """One round of a hexagonal campaign: its DFT-stage (surrogate) candidates are hexagonal cells."""
    from crystaloop.db.store import CandidateStore
    from crystaloop.loop.campaign import Campaign

    config = _config(loop_config, name="hex-round")
    result = Campaign(config, database=prior_subset).run()
    assert result.status == "finished"
    docs = list(CandidateStore(prior_subset).collection.find({"campaign": "hex-round"}))
    relaxed = [d for d in docs if d["state"] in ("relaxed", "failed")]
    assert relaxed, [d["state"] for d in docs]
    for doc in docs:
        assert doc["provenance"]["strategy"] == "prototypes"
        structure = Structure.from_dict(doc["structure"])
        assert SpacegroupAnalyzer(structure, symprec=0.1).get_crystal_system() == "hexagonal"
    assert any(d["state"] == "relaxed" and d["dft"]["formation_energy_per_atom"] is not None for d in relaxed)
