"""A campaign's DFT jobs: the structure they start from (bare of site properties, optionally symmetrised)."""

from __future__ import annotations

import pytest
from pymatgen.core import Lattice, Structure
from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

from crystaloop.loop.config import parse_campaign_config
from crystaloop.loop.dft_jobs import starting_structure


def distorted_b2() -> Structure:
    """B2 PdSi as a CHGNet relaxation leaves it: slightly off cubic, with magnetic moments."""
    lattice = Lattice.from_parameters(3.01, 3.02, 3.00, 90.3, 89.8, 90.1)
    structure = Structure(lattice, ["Pd", "Si"], [[0.0, 0.005, 0.0], [0.5, 0.495, 0.505]])
    structure.add_site_property("magmom", [0.03, 0.09])
    return structure


def test_start_drops_site_properties_and_keeps_the_cell_without_symprec():
    start = starting_structure(distorted_b2())
    assert "magmom" not in start.site_properties
    assert start.lattice.abc == pytest.approx(distorted_b2().lattice.abc)
    assert SpacegroupAnalyzer(start, symprec=1e-3).get_space_group_symbol() != "Pm-3m"


def test_start_is_refined_to_the_symmetry_found_at_symprec():
    start = starting_structure(distorted_b2(), 0.1)
    assert SpacegroupAnalyzer(start, symprec=1e-3).get_space_group_symbol() == "Pm-3m"
    assert len(start) == 2 and start.composition.reduced_formula == "SiPd"
    assert "magmom" not in start.site_properties
    assert start.volume == pytest.approx(distorted_b2().volume, rel=0.02)


def test_symmetrize_start_and_max_nsites_are_validated():
    base = {"name": "x", "targets": [{"property": "formation_energy_per_atom", "max": 0.0}]}
    config = parse_campaign_config(
        {**base, "filters": {"max_nsites": 2}, "dft": {"engine": "surrogate", "symmetrize_start": 0.1}}
    )
    assert config.filters.max_nsites == 2 and config.dft.symmetrize_start == 0.1
    assert parse_campaign_config(base).filters.max_nsites is None
    from crystaloop.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        parse_campaign_config({**base, "filters": {"max_nsites": 0}, "dft": {"symmetrize_start": -1}})
    assert any(line.startswith("filters.max_nsites") for line in info.value.lines)
    assert any(line.startswith("dft.symmetrize_start") for line in info.value.lines)
