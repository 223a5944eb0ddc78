"""Periodic watershed segmentation (Algorithm S1), to_structure and the round-trip benchmark."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Lattice, Structure

from crystaloop.errors import UserError
from crystaloop.generative.decoders.base import Site, to_structure
from crystaloop.generative.decoders.watershed import periodic_label, segment
from crystaloop.generative.radii import ionic_radius
from crystaloop.generative.representation import lattice_from_coordinates, voxelize
from crystaloop.generative.roundtrip import (
    benchmark_structures,
    heusler,
    match_sites,
    perovskite,
    rocksalt,
    round_trip,
    run_round_trip,
    summarize,
)


def _assert_exact_round_trip(structure: Structure, grid: int = 32, **kwargs) -> Structure:
    vc = voxelize(structure, grid=grid)
    sites = segment(vc.species, vc.mask, **kwargs)
    rebuilt = to_structure(sites, lattice_from_coordinates(vc.coords))
    assert len(rebuilt) == len(structure)
    assert rebuilt.composition == structure.composition
    rows, cols = match_sites(structure, rebuilt)
    distances = structure.lattice.get_all_distances(
        structure.frac_coords[rows], rebuilt.frac_coords[cols]
    ).diagonal()
    assert distances.mean() < 0.05
    assert all(structure[i].specie == rebuilt[j].specie for i, j in zip(rows, cols, strict=True))
    assert StructureMatcher().fit(structure, rebuilt)
    return rebuilt


def test_perovskite_with_b_cation_at_the_corner():
    structure = perovskite("Sr", "Ti", "O", 3.905)
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
    structure = heusler("Ag", "Y", "Pb", 5.9)
    nearest = 5.9 * np.sqrt(3) / 4
    assert ionic_radius("Ag") + ionic_radius("Pb") > nearest
    _assert_exact_round_trip(structure)


def test_two_species_with_radii_differing_by_more_than_two():
    assert ionic_radius("I") / ionic_radius("Li") > 2
    _assert_exact_round_trip(rocksalt("Li", "I", 6.0))
    assert ionic_radius("Cs") / ionic_radius("Al") > 2
    _assert_exact_round_trip(
        Structure(Lattice.cubic(4.6), ["Cs", "Al"], [[0.13, 0.21, 0.37], [0.63, 0.71, 0.87]])
    )


def test_non_orthogonal_rhombohedral_primitive_cell():
    primitive = rocksalt("Na", "Cl", 5.64).get_primitive_structure()
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
    structure = perovskite("Ba", "Zr", "O", 4.19)
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
    cu2mnal = voxelize(heusler("Cu", "Mn", "Al", 5.95))
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


def test_benchmark_set_covers_the_three_classes():
    items = benchmark_structures(2100)
    assert len(items) >= 2000
    prototypes = {item.prototype for item in items}
    assert prototypes == {"rocksalt", "cscl", "zincblende", "perovskite", "heusler"}
    assert {len(i.structure) for i in items if i.prototype == "heusler"} == {16}
    assert all(np.allclose(i.structure.lattice.angles, 90) for i in items)
    lengths = [i.structure.lattice.a for i in items]
    assert 2.5 < min(lengths) and max(lengths) < 8.5
    standard = [i for i in items if not i.shifted]
    assert len(standard) >= 100
    on_corner = [i for i in standard if np.any(np.all(i.structure.frac_coords % 1 == 0, axis=1))]
    assert len(on_corner) == len(standard)


def test_round_trip_on_a_small_benchmark_meets_the_targets():
    items = benchmark_structures(51, seed=3)
    periodic = summarize(run_round_trip(items))
    assert periodic.failed_targets() == []
    assert periodic.exact_site_count_share >= 0.99
    assert periodic.mean_displacement_angstrom <= 0.05
    flat = summarize(run_round_trip(items, periodic=False))
    # The paper's non-periodic variant shifts every atom near a face.
    assert flat.mean_displacement_angstrom > 2 * periodic.mean_displacement_angstrom
    assert flat.structure_match_share < periodic.structure_match_share


def test_bench_representation_command(tmp_path):
    from typer.testing import CliRunner

    from crystaloop.cli import app

    output = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "representation", "--n", "6", "--output", str(output)])
    assert result.exit_code == 0, result.output
    payload = json.loads(output.read_text())
    assert set(payload["summaries"]) == {"periodic", "periodic=False"}
    assert payload["summaries"]["periodic"]["n_structures"] == 6
    assert "median segment (ms)" in result.output
    bad = CliRunner().invoke(app, ["bench", "representation", "--n", "0"])
    assert isinstance(bad.exception, UserError)


def test_round_trip_of_a_plain_structure():
    result = round_trip(rocksalt("Mg", "O", 4.21))
    assert result.n_true == result.n_predicted == 8
    assert result.structure_match


@pytest.mark.slow
def test_full_round_trip_benchmark_meets_the_targets():
    summary = summarize(run_round_trip(benchmark_structures(2100)))
    assert summary.n_structures >= 2000
    assert summary.failed_targets() == []
