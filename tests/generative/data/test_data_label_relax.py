"""Reject rules and strains of the general-cell CHGNet labeller (no model needed)."""

from __future__ import annotations

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

from crystaloop.generative.data.label_relax import MAX_NEIGHBOUR_ANGSTROM, broken_reason, voigt_strained


def test_real_crystals_are_not_broken():
    cs = Structure(Lattice.cubic(6.05), ["Cs", "Cs"], [[0, 0, 0], [0.5, 0.5, 0.5]])  # nn 5.24 A
    rutile = Structure.from_spacegroup("P4_2/mnm", Lattice.tetragonal(4.59, 2.96), ["Ti", "O"],
                                       [[0, 0, 0], [0.305, 0.305, 0]])  # fmt: skip
    assert broken_reason(cs) is None
    assert broken_reason(rutile) is None


def test_fused_and_isolated_atoms_are_broken():
    fused = Structure(Lattice.cubic(4.0), ["Na", "Cl"], [[0, 0, 0], [0.1, 0, 0]])
    assert "closer than" in broken_reason(fused)
    lone = Structure(Lattice.cubic(2 * MAX_NEIGHBOUR_ANGSTROM), ["Na", "Na"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    assert "no neighbour" in broken_reason(lone)


@pytest.mark.parametrize("index", range(6))
def test_voigt_strains_change_the_cell_as_named(index):
    s = Structure(Lattice.cubic(4.0), ["Na"], [[0, 0, 0]])
    out = voigt_strained(s, index, 0.01)
    strain = np.linalg.solve(s.lattice.matrix, out.lattice.matrix).T - np.eye(3)
    i, j = ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))[index]
    assert strain[i, j] == pytest.approx(0.01 if i == j else 0.005)
    assert strain[j, i] == pytest.approx(strain[i, j])
    assert np.allclose(out.frac_coords, s.frac_coords)
