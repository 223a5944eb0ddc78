"""Voxel representation: eq. 1-3, periodicity, coordinate channels, lattice recovery, rotations."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

from crystaloop.generative.data.prototypes import Prototype
from crystaloop.generative.radii import ionic_radius, most_common_oxidation_state
from crystaloop.generative.representation import (
    VoxelCrystal,
    coordinate_channels,
    cube_rotations,
    lattice_from_coordinates,
    rotate90,
    rotate_structure,
    voxel_centres,
    voxelize,
)


def _reference_voxelize(structure: Structure, grid: int, periodic: bool):
    """Brute force eq. 1-2 over explicit periodic images (slow; small grids only)."""
    t = voxel_centres(grid)
    frac = np.stack(np.meshgrid(t, t, t, indexing="ij"), axis=-1).reshape(-1, 3)
    cart = frac @ structure.lattice.matrix
    images = list(itertools.product(range(-2, 3), repeat=3)) if periodic else [(0, 0, 0)]
    offsets = np.array(images) @ structure.lattice.matrix
    density = np.zeros(len(cart))
    best = np.full(len(cart), np.inf)
    species = np.zeros(len(cart), dtype=int)
    for site in structure:
        z, r = site.specie.Z, ionic_radius(site.specie.Z)
        position = (site.frac_coords % 1.0) @ structure.lattice.matrix
        d = np.linalg.norm(cart[:, None, :] - (position + offsets)[None], axis=-1).min(axis=1)
        density += z / r**3 * np.exp(-(d**2) / (2 * r**2)) / (2 * np.pi) ** 1.5
        closer = (d <= r) & (d < best)
        best[closer] = d[closer]
        species[closer] = z
    shape = (grid, grid, grid)
    return density.reshape(shape), species.reshape(shape)


def test_radius_table_is_shannon_for_the_most_common_oxidation_state():
    assert most_common_oxidation_state("O") == -2
    assert ionic_radius("O") == pytest.approx(1.26)
    assert ionic_radius("Na") == pytest.approx(1.16)
    assert ionic_radius(13) == pytest.approx(0.675)
    # No Shannon radius for H+: falls back to a positive radius.
    assert ionic_radius("H") > 0


def test_density_matches_eq1_at_a_voxel_centre():
    grid, a = 32, 10.0
    frac = (np.array([3, 5, 7]) + 0.5) / grid
    structure = Structure(Lattice.cubic(a), ["Na"], [frac])
    vc = voxelize(structure, grid=grid)
    r, z = ionic_radius("Na"), 11
    peak = z / r**3 / (2 * np.pi) ** 1.5
    assert vc.density[3, 5, 7] == pytest.approx(peak, rel=1e-5)
    d = a / grid
    assert vc.density[4, 5, 7] == pytest.approx(peak * np.exp(-(d**2) / (2 * r**2)), rel=1e-5)
    assert vc.species[3, 5, 7] == 11
    assert vc.density.dtype == np.float32 and vc.coords.dtype == np.float32
    assert np.array_equal(vc.mask, vc.species > 0)


@pytest.mark.parametrize("periodic", [True, False])
def test_matches_brute_force_over_images(periodic):
    structure = Structure(
        Lattice.from_parameters(4.2, 4.6, 5.0, 75, 85, 100),
        ["Na", "Cl", "O"],
        [[0.0, 0.0, 0.0], [0.45, 0.5, 0.55], [0.9, 0.2, 0.4]],
    )
    vc = voxelize(structure, grid=12, periodic=periodic)
    density, species = _reference_voxelize(structure, 12, periodic)
    np.testing.assert_allclose(vc.density, density, rtol=1e-5, atol=1e-6)
    assert np.array_equal(vc.species, species)


def test_orthogonal_fast_path_matches_brute_force():
    structure = Prototype("perovskite", ("Sr", "Ti", "O")).conventional(3.905)
    vc = voxelize(structure, grid=16)
    density, species = _reference_voxelize(structure, 16, periodic=True)
    np.testing.assert_allclose(vc.density, density, rtol=1e-5, atol=1e-6)
    assert np.array_equal(vc.species, species)


def test_corner_atom_is_split_evenly_over_the_eight_corners():
    vc = voxelize(Prototype("perovskite", ("Sr", "Ti", "O")).conventional(3.905), grid=32)
    corners = [vc.density[i, j, k] for i in (0, -1) for j in (0, -1) for k in (0, -1)]
    np.testing.assert_allclose(corners, corners[0], rtol=1e-6)
    assert {int(vc.species[i, j, k]) for i in (0, -1) for j in (0, -1) for k in (0, -1)} == {38}  # Sr
    # Periodic images make the maps symmetric under inversion through the cell centre.
    np.testing.assert_allclose(vc.density, vc.density[::-1, ::-1, ::-1], rtol=1e-5)
    flat = voxelize(Prototype("perovskite", ("Sr", "Ti", "O")).conventional(3.905), grid=32, periodic=False)
    assert flat.species[-1, -1, -1] != 38


def test_nearest_ion_wins_where_radii_overlap():
    # Voxels are 0.25 Å; Na (r 1.16 Å) and Cl (r 1.67 Å) sit 1.375 Å apart on one voxel row.
    c = 15.5 / 32
    structure = Structure(Lattice.cubic(8.0), ["Na", "Cl"], [[c, c, c], [21.0 / 32, c, c]])
    row = voxelize(structure, grid=32).species[:, 15, 15]
    assert row[17] == 11  # 0.50 Å from Na, 0.875 Å from Cl: inside both, Na nearer
    assert row[18] == 17  # 0.75 Å from Na, 0.625 Å from Cl: inside both, Cl nearer
    assert row[11] == 11 and row[10] == 0  # 1.00 Å and 1.25 Å from Na
    assert row[27] == 17 and row[28] == 0  # 1.625 Å and 1.875 Å from Cl


def test_coordinate_channels_are_voxel_centres_through_the_lattice_matrix():
    lattice = Lattice.from_parameters(4.0, 5.0, 6.0, 70, 80, 95)
    coords = coordinate_channels(lattice, 8)
    frac = (np.array([2, 5, 7]) + 0.5) / 8
    np.testing.assert_allclose(coords[:, 2, 5, 7], frac @ lattice.matrix, atol=1e-5)
    vc = voxelize(Structure(lattice, ["Si"], [[0, 0, 0]]), grid=8)
    channels = vc.channels()
    assert channels.shape == (4, 8, 8, 8) and channels.dtype == np.float32
    np.testing.assert_array_equal(channels[0], vc.density)
    np.testing.assert_array_equal(channels[1:], vc.coords)


@pytest.mark.parametrize("grid", [32, 48, 64])
@pytest.mark.parametrize(
    "parameters",
    [
        (5.64, 5.64, 5.64, 90, 90, 90),
        (3.99, 3.99, 3.99, 60, 60, 60),  # rhombohedral primitive cell of rock salt
        (4.1, 5.3, 9.7, 71.5, 83.2, 104.9),  # triclinic
    ],
)
def test_lattice_recovery_is_exact(grid, parameters):
    lattice = Lattice.from_parameters(*parameters)
    vc = voxelize(Structure(lattice, ["Mg", "O"], [[0, 0, 0], [0.5, 0.5, 0.5]]), grid=grid)
    assert vc.grid == grid and vc.density.shape == (grid, grid, grid)
    recovered = lattice_from_coordinates(vc.coords)
    np.testing.assert_allclose(recovered.abc, parameters[:3], atol=1e-6)
    np.testing.assert_allclose(recovered.angles, parameters[3:], atol=1e-4)


def test_cube_rotations_are_the_24_proper_rotations():
    rotations = cube_rotations()
    assert len(rotations) == 24 and len(set(rotations)) == 24
    assert rotations[0] == ((0, 1, 2), (1, 1, 1))
    for perm, signs in rotations:
        q = np.zeros((3, 3))
        q[range(3), perm] = signs
        assert np.linalg.det(q) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "structure",
    [
        Structure(
            Lattice.cubic(3.905),
            ["Sr", "Ti", "O", "O", "O"],
            [
                [0.61, 0.52, 0.47],
                [0.11, 0.02, 0.97],
                [0.61, 0.02, 0.97],
                [0.11, 0.52, 0.97],
                [0.11, 0.02, 0.47],
            ],
        ),  # fmt: skip
        Structure(
            Lattice.from_parameters(4.0, 4.4, 4.8, 62, 71, 80),
            ["Na", "Cl"],
            [[0.1, 0.2, 0.3], [0.55, 0.6, 0.8]],
        ),
    ],
)
def test_rotate90_equals_voxelizing_the_rotated_crystal(structure):
    vc = voxelize(structure, grid=16)
    densities = []
    for k in range(24):
        rotated = rotate90(vc, k)
        expected = voxelize(rotate_structure(structure, k), grid=16)
        np.testing.assert_allclose(rotated.density, expected.density, rtol=1e-5, atol=1e-6)
        assert np.array_equal(rotated.species, expected.species)
        assert np.array_equal(rotated.mask, expected.mask)
        np.testing.assert_allclose(rotated.coords, expected.coords, atol=1e-4)
        np.testing.assert_allclose(
            lattice_from_coordinates(rotated.coords).abc, expected.lattice.abc, atol=1e-5
        )
        densities.append(rotated.density.tobytes())
    assert len(set(densities)) == 24
    if np.allclose(structure.lattice.angles, 90):
        # A cubic cell keeps its coordinate channels under every rotation.
        np.testing.assert_allclose(rotate90(vc, 7).coords, vc.coords)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="rotation index"):
        rotate90(voxelize(Structure(Lattice.cubic(4), ["Si"], [[0, 0, 0]]), grid=8), 24)
    with pytest.raises(ValueError, match="grid"):
        voxelize(Structure(Lattice.cubic(4), ["Si"], [[0, 0, 0]]), grid=1)
    with pytest.raises(ValueError, match="ordered"):
        voxelize(Structure(Lattice.cubic(4), [{"Si": 0.5, "Ge": 0.5}], [[0, 0, 0]]))
    with pytest.raises(ValueError, match="coordinate channels"):
        lattice_from_coordinates(np.zeros((4, 8, 8, 8)))
    assert isinstance(voxelize(Structure(Lattice.cubic(4), ["Si"], [[0, 0, 0]]), 8), VoxelCrystal)


GENERAL_CELLS = {
    "hexagonal (wurtzite ZnO)": Structure.from_spacegroup(
        "P6_3mc", Lattice.hexagonal(3.25, 5.21), ["Zn", "O"], [[1 / 3, 2 / 3, 0], [1 / 3, 2 / 3, 0.382]]
    ),
    "tetragonal (rutile TiO2)": Structure.from_spacegroup(
        "P4_2/mnm", Lattice.tetragonal(4.59, 2.96), ["Ti", "O"], [[0, 0, 0], [0.305, 0.305, 0]]
    ),
    "orthorhombic (marcasite FeS2)": Structure.from_spacegroup(
        "Pnnm", Lattice.orthorhombic(4.44, 5.41, 3.38), ["Fe", "S"], [[0, 0, 0], [0.20, 0.378, 0]]
    ),
    "monoclinic (baddeleyite ZrO2)": Structure.from_spacegroup(
        "P2_1/c", Lattice.monoclinic(5.15, 5.21, 5.31, 99.2), ["Zr", "O", "O"],
        [[0.276, 0.040, 0.208], [0.070, 0.332, 0.345], [0.450, 0.757, 0.479]],
    ),
    "triclinic": Structure(
        Lattice.from_parameters(4.1, 5.3, 6.7, 81.5, 97.2, 104.9), ["Cu", "Cu", "Se", "Se"],
        [[0.0, 0.0, 0.0], [0.5, 0.4, 0.45], [0.25, 0.7, 0.2], [0.75, 0.2, 0.7]],
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(GENERAL_CELLS))
def test_site_channels_round_trip_general_cells(name):
    """True site channels at grid 16 read back to the same crystal, whatever the crystal system."""
    from pymatgen.analysis.structure_matcher import StructureMatcher

    from crystaloop.generative.data.decorate import crystal_system
    from crystaloop.generative.representation import site_channels, sites_from_channels

    structure = GENERAL_CELLS[name]
    assert crystal_system(structure) == name.split(" ")[0]
    elements = sorted({site.specie.Z for site in structure})
    sites = sites_from_channels(site_channels(structure, grid=16), structure.lattice, elements)
    decoded = Structure(structure.lattice, [z for z, _ in sites], [frac for _, frac in sites])
    assert len(decoded) == len(structure)
    assert StructureMatcher(ltol=0.3, stol=0.5, angle_tol=10).fit(structure, decoded)
    assert StructureMatcher(stol=0.1).fit(structure, decoded), "sites within a tenth of the matcher's scale"
