"""Periodic watershed segmentation (Algorithm S1) and to_structure."""

from __future__ import annotations

import numpy as np
import pytest
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Lattice, Structure

from crystaloop.generative.data.prototypes import Prototype
from crystaloop.generative.decoders.base import Site, to_structure
from crystaloop.generative.decoders.watershed import periodic_label, segment
from crystaloop.generative.measures import matched_site_errors
from crystaloop.generative.radii import ionic_radius
from crystaloop.generative.representation import lattice_from_coordinates, voxelize


def _assert_exact_round_trip(structure: Structure, grid: int = 32, **kwargs) -> Structure:
    vc = voxelize(structure, grid=grid)
    sites = segment(vc.species, vc.mask, **kwargs)
    rebuilt = to_structure(sites, lattice_from_coordinates(vc.coords))
    assert len(rebuilt) == len(structure)
    assert rebuilt.composition == structure.composition
    distances, z_errors = matched_site_errors(
        structure.frac_coords,
        np.array([site.specie.Z for site in structure]),
        rebuilt.frac_coords,
        np.array([site.specie.Z for site in rebuilt]),
        structure.lattice,
    )
    assert distances.mean() < 0.05
    assert not z_errors.any()
    assert StructureMatcher().fit(structure, rebuilt)
    return rebuilt


def test_perovskite_with_b_cation_at_the_corner():
    structure = Prototype("perovskite", ("Sr", "Ti", "O")).conventional(3.905)
    structure.translate_sites(range(len(structure)), [0.5, 0.5, 0.5])  # Ti from the body centre to the corner
    vc = voxelize(structure)
    # The Ti density is cut into eight corner pieces of the grid; they must make one site.
    labels, _ = periodic_label(vc.species == 22)
    assert len(np.unique(labels[labels > 0])) == 1
    rebuilt = _assert_exact_round_trip(structure)
    ti = [site for site in rebuilt if site.specie.symbol == "Ti"]
    assert len(ti) == 1
    assert np.linalg.norm((ti[0].frac_coords + 0.5) % 1.0 - 0.5) < 1e-6


def test_heusler_with_ions_overlapping_within_their_radii():
    # Ag2YPb at 5.9 Å: Ag-Pb neighbours (2.55 Å) sit closer than r_Ag + r_Pb (2.62 Å).
    structure = Prototype("L21", ("Ag", "Y", "Pb")).conventional(5.9)
    nearest = 5.9 * np.sqrt(3) / 4
    assert ionic_radius("Ag") + ionic_radius("Pb") > nearest
    _assert_exact_round_trip(structure)


def test_two_species_with_radii_differing_by_more_than_two():
    assert ionic_radius("I") / ionic_radius("Li") > 2
    _assert_exact_round_trip(Prototype("B1", ("Li", "I")).conventional(6.0))
    assert ionic_radius("Cs") / ionic_radius("Al") > 2
    _assert_exact_round_trip(
        Structure(Lattice.cubic(4.6), ["Cs", "Al"], [[0.13, 0.21, 0.37], [0.63, 0.71, 0.87]])
    )


def test_non_orthogonal_rhombohedral_primitive_cell():
    primitive = Prototype("B1", ("Na", "Cl")).conventional(5.64).get_primitive_structure()
    assert np.allclose(primitive.lattice.angles, 60)
    vc = voxelize(primitive)
    recovered = lattice_from_coordinates(vc.coords)
    np.testing.assert_allclose(recovered.abc, primitive.lattice.abc, atol=1e-6)
    np.testing.assert_allclose(recovered.angles, primitive.lattice.angles, atol=1e-4)
    _assert_exact_round_trip(primitive)


def test_same_species_overlap_is_split_by_repeated_erosion():
    # Two Br- (r 1.82 Å) 3.4 Å apart: one dumbbell of convexity < 0.8, split by erosion.
    structure = Structure(Lattice.cubic(9.0), ["Br", "Br"], [[0.3, 0.5, 0.5], [0.3 + 3.4 / 9, 0.5, 0.5]])
    vc = voxelize(structure)
    assert periodic_label(vc.mask)[1] == 1
    _assert_exact_round_trip(structure)
    # 3.0 Å apart the dumbbell is convex enough (0.84) to pass as one atom at the paper's 0.8.
    closer = Structure(Lattice.cubic(9.0), ["Br", "Br"], [[0.3, 0.5, 0.5], [0.3 + 3.0 / 9, 0.5, 0.5]])
    vc = voxelize(closer)
    assert len(segment(vc.species, vc.mask)) == 1
    assert len(segment(vc.species, vc.mask, min_convexity=0.95)) == 2


def test_blob_cut_by_the_faces_is_rejoined_only_when_periodic():
    structure = Structure(Lattice.cubic(5.0), ["Cs"], [[0.0, 0.0, 0.0]])
    vc = voxelize(structure)
    periodic = segment(vc.species, vc.mask)
    assert len(periodic) == 1 and periodic[0].symbol == "Cs"
    assert np.linalg.norm((periodic[0].frac_coords + 0.5) % 1.0 - 0.5) < 1e-6
    assert len(segment(vc.species, vc.mask, periodic=False)) == 8


def test_inputs_probabilities_density_and_paper_erosion_agree():
    structure = Prototype("perovskite", ("Ba", "Zr", "O")).conventional(4.19)
    vc = voxelize(structure)
    reference = sorted((s.species, tuple(np.round(s.frac_coords, 4))) for s in segment(vc.species))
    classes = [0, 8, 40, 56]
    probabilities = np.stack([(vc.species == z).astype(np.float32) for z in classes])
    for sites in (
        segment(probabilities, vc.mask, classes=classes),
        segment(vc.species, vc.mask, density=vc.density),
    ):
        assert len(sites) == 5
        assert sorted(s.species for s in sites) == [8, 8, 8, 40, 56]
    # The paper's binary erosion separates ions that do not touch.
    cu2mnal = voxelize(Prototype("L21", ("Cu", "Mn", "Al")).conventional(5.95))
    assert len(segment(cu2mnal.species, cu2mnal.mask, split_species=False)) == 16
    got = sorted(
        (s.species, tuple(np.round(s.frac_coords, 4)))
        for s in segment(probabilities, vc.mask, classes=classes)
    )
    assert got == reference


def test_to_structure_accepts_pairs_and_lattice_parameters():
    structure = to_structure([("Na", [0, 0, 0]), (17, [0.5, 0.5, 1.5])], [5.6, 5.6, 5.6, 90, 90, 90])
    assert structure.composition.reduced_formula == "NaCl"
    np.testing.assert_allclose(structure.frac_coords[1], [0.5, 0.5, 0.5])
    site = Site(species=26, frac_coords=np.zeros(3), n_voxels=10)
    assert to_structure([site], Lattice.cubic(2.87).matrix)[0].specie.symbol == "Fe"
    with pytest.raises(ValueError, match="at least one site"):
        to_structure([], Lattice.cubic(3))
    with pytest.raises(ValueError, match="same 3-D shape"):
        segment(np.zeros((8, 8, 8), dtype=int), np.zeros((4, 4, 4), dtype=bool))
