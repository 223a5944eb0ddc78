"""The realism check: experimental volumes, the start structures, and one CHGNet-relaxed compound."""

from __future__ import annotations

import math

import pytest
from pymatgen.core import Composition

from crystaloop.generative.data import decorate
from crystaloop.loop.bench import realism
from crystaloop.loop.bench.targets import REALISM_PERCENT


def test_experimental_table_matches_the_aflow_cells_it_cites():
    table = realism.load_experimental()["compounds"]
    assert set(table) == {"ZnO", "TiO2", "NiAs", "Al2O3", "CdI2", "MoS2", "BaFe2As2"}
    for name in ("TiO2", "NiAs", "Al2O3", "CdI2", "MoS2"):  # entries taken from the same compound
        cell = decorate.aflow_library()[table[name]["prototype"]].structure
        assert realism.experimental_volume_per_atom(table[name]) == pytest.approx(cell.volume / len(cell), rel=1e-3)
    assert all(spec["source"] for spec in table.values())


@pytest.mark.parametrize(
    ("name", "formula", "system"),
    [("ZnO", "ZnO", "hexagonal"), ("BaFe2As2", "BaFe2As2", "tetragonal"), ("Al2O3", "Al2O3", "trigonal")],
)
def test_start_structures_carry_the_compound(name, formula, system):
    spec = realism.load_experimental()["compounds"][name]
    s = realism.start_structure(spec)
    assert s.composition.reduced_composition == Composition(formula).reduced_composition
    assert decorate.crystal_system(s) == system


def test_one_compound_relaxed_against_experiment():
    (row,) = realism.measure(["CdI2"])
    v_exp = math.sqrt(3) / 2 * 4.24**2 * 6.84 / 3
    assert row.volume_experiment == pytest.approx(v_exp)
    assert row.relax_converged and row.crystal_system == "trigonal"
    assert row.error_percent == pytest.approx(100 * (row.volume_relaxed - v_exp) / v_exp)
    assert row.hit == (abs(row.error_percent) <= REALISM_PERCENT)
    # The volume error is the cell's: (1 + a err)^2 (1 + c err) - 1.
    assert (1 + row.a_error_percent / 100) ** 2 * (1 + row.c_error_percent / 100) == pytest.approx(
        1 + row.error_percent / 100, abs=1e-3
    )
    assert row.in_size_limits and row.in_decorations
    assert 0.7 * v_exp < row.volume_relaxed < 1.3 * v_exp
