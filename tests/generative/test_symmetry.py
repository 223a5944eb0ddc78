"""Symmetrising decoded crystals: spglib's space group at a loose tolerance, made exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure
from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

from crystaloop.generative.symmetry import symmetrize


def _rock_salt() -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def _decoded_like(structure: Structure, shift: float, seed: int = 0) -> Structure:
    """``structure`` with a strained cell (0.5 %) and every site moved by up to ``shift`` angstrom."""
    rng = np.random.default_rng(seed)
    strained = Lattice(structure.lattice.matrix @ (np.eye(3) + rng.uniform(-0.005, 0.005, (3, 3))))
    moved = structure.cart_coords + rng.uniform(-shift, shift, structure.cart_coords.shape)
    return Structure(strained, structure.species, moved, coords_are_cartesian=True)


def test_a_rock_salt_read_off_a_grid_is_cubic_again():
    noisy = _decoded_like(_rock_salt(), 0.05)
    assert SpacegroupAnalyzer(noisy, symprec=0.01).get_crystal_system() != "cubic"
    out = symmetrize(noisy, 0.3)
    assert out.changed and out.reason is None and out.spacegroup == "Fm-3m"
    assert len(out.structure) == len(noisy) and out.structure.composition == noisy.composition
    assert SpacegroupAnalyzer(out.structure, symprec=1e-3).get_space_group_symbol() == "Fm-3m"
    assert out.structure.volume == pytest.approx(noisy.volume, rel=0.02)


def test_a_centred_cell_stays_primitive_and_a_loose_tolerance_is_not_invented():
    primitive = _rock_salt().get_primitive_structure()  # 2 sites; the conventional cell has 8
    out = symmetrize(_decoded_like(primitive, 0.05, seed=1), 0.3)
    assert out.changed and len(out.structure) == 2 and out.spacegroup == "Fm-3m"
    # sites displaced far beyond the tolerance keep their low symmetry
    wrecked = _decoded_like(_rock_salt(), 0.6, seed=2)
    out = symmetrize(wrecked, 0.05)
    assert SpacegroupAnalyzer(out.structure, symprec=0.01).get_crystal_system() in ("triclinic", "monoclinic")


def test_the_decoder_symmetrises_what_it_reads():
    from tests.generative.test_decode import _maps, _sites_decoder

    wurtzite = Structure.from_spacegroup(
        "P6_3mc", Lattice.hexagonal(3.25, 5.21), ["Zn", "O"], [[1 / 3, 2 / 3, 0], [1 / 3, 2 / 3, 0.382]]
    )
    skewed = Lattice.from_parameters(3.32, 3.18, 5.26, 91.5, 89, 121.5)  # a lattice head's error
    plain = _sites_decoder()
    [row] = plain.structures_from_maps(*_maps(wurtzite), lattices=[skewed])
    assert SpacegroupAnalyzer(row.structure, symprec=0.1).get_crystal_system() != "hexagonal"
    plain.symprec = 0.3
    [sym] = plain.structures_from_maps(*_maps(wurtzite), lattices=[skewed])
    assert SpacegroupAnalyzer(sym.structure, symprec=0.01).get_crystal_system() == "hexagonal"
    assert sym.raw_min_distance == row.raw_min_distance  # measured on the sites as first read
    assert sym.structure.composition == row.structure.composition
    with pytest.raises(ValueError, match="symprec must be positive"):
        type(plain)(plain.vae, plain.unet, device="cpu", workers=1, symprec=0.0)
    assert torch.is_tensor(_maps(wurtzite)[0])


def test_symmetrised_evaluations_are_their_own_blocks():
    from crystaloop.generative.models.shipped import split_metrics

    validation, _, blocks = split_metrics(
        {
            "held_out_match_rate": 0.48,
            "held_out_symmetrized_match_rate": 0.5,
            "sampling_random_symmetrized_valid_share": 1.0,
            "loss": 2.0,
        }
    )
    assert blocks == {
        "held_out": {"match_rate": 0.48},
        "held_out_symmetrized": {"match_rate": 0.5},
        "sampling_random_symmetrized": {"valid_share": 1.0},
    }
    assert validation == {"loss": 2.0}


@pytest.mark.parametrize("command", ["sampling", "reconstruction"])
def test_a_symprec_out_of_range_is_one_line(command):
    from typer.testing import CliRunner

    from crystaloop.cli import app
    from crystaloop.errors import UserError

    result = CliRunner().invoke(app, ["evaluate", command, "--symprec", "0"])
    assert isinstance(result.exception, UserError) and "--symprec must be in (0, 1]" in str(result.exception)
