"""Formation-energy hulls of one engine: pymatgen's arithmetic on hand-made binary systems."""

from __future__ import annotations

import pytest
from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram
from pymatgen.core import Composition

from crystaloop.dft.hull import FormationHull, HullPhase


def _hull() -> FormationHull:
    # Li-O with Li2O at -2.0 and Li2O2 at -1.6 eV/atom (made-up numbers), both on the hull
    return FormationHull(
        "test", [HullPhase("Li2O", -2.0, "t1"), HullPhase("Li2O2", -1.6, "t2"), HullPhase("Na2O", -1.4, "t3")]
    )


def test_a_point_above_the_hull_has_the_energy_above_hull_pymatgen_gives():
    hull = _hull()
    stability = hull.stability("LiO", -1.2)
    entries = [
        PDEntry(Composition("Li"), 0.0),
        PDEntry(Composition("O"), 0.0),
        PDEntry(Composition("Li2O"), -2.0 * 3),
        PDEntry(Composition("Li2O2"), -1.6 * 4),
    ]
    expected = PhaseDiagram(entries).get_e_above_hull(
        PDEntry(Composition("LiO"), -1.2 * 2), allow_negative=True
    )
    assert stability.energy_above_hull == pytest.approx(expected)
    assert stability.energy_above_hull == pytest.approx(0.4)  # LiO is Li2O2's composition: -1.2 against -1.6
    assert stability.chemical_system == "Li-O" and stability.n_phases == 2  # Na2O is another system
    assert [(p.formula, p.source) for p in stability.decomposition] == [("Li2O2", "t2")]
    assert not stability.against_elements_only and not stability.upper_bound


def test_a_new_phase_below_the_hull_makes_the_old_ones_unstable():
    hull = _hull()
    # Li3O2 (x_O = 0.4) lies between Li2O (x 1/3, -2.0) and Li2O2 (x 1/2, -1.6): the hull there is -1.84
    assert hull.hull_energy_per_atom("Li3O2") == pytest.approx(-1.84)
    below = hull.stability("Li3O2", -2.1)
    assert below.energy_above_hull == pytest.approx(-0.26)
    assert {p.formula for p in below.decomposition} == {"Li2O", "Li2O2"}
    hull.add(HullPhase("Li3O2", -2.1, "t4"))
    # now Li2O2's own energy sits above the new hull, and Li3O2 is on it
    assert hull.stability("Li2O2", -1.6).energy_above_hull > 0
    assert hull.stability("Li3O2", -2.1).energy_above_hull == pytest.approx(0.0, abs=1e-9)


def test_a_system_with_no_phases_is_against_the_elements_only():
    stability = _hull().stability("CuPd", -0.1)
    assert stability.against_elements_only and stability.n_phases == 0
    assert stability.energy_above_hull == pytest.approx(-0.1)  # equals E_f


def test_a_missing_competing_phase_makes_the_answer_an_upper_bound():
    hull = _hull()
    hull.mark_missing("LiO2")
    assert hull.stability("LiO", -1.2).upper_bound
    assert not hull.stability("Na2O", -1.4).upper_bound
