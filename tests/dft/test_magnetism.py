"""The simplest antiferromagnetic ordering, and how it reaches the pw.x input."""

from __future__ import annotations

import collections

import pytest
from pymatgen.core import Lattice, Structure

from crystaloop.dft.espresso.inputs import build_pw_input, load_preset
from crystaloop.dft.magnetism import SPIN, afm_ordering, check_orderings, ordering_of
from crystaloop.dft.references import bulk_structure


def _pairs(structure: Structure, cutoff: float) -> dict[tuple[float, str], int]:
    """Magnetic pairs by distance (Å, 2 decimals) and alignment."""
    spins = structure.site_properties[SPIN]
    counts: dict[tuple[float, str], int] = collections.Counter()
    for i, s in enumerate(spins):
        if not s:
            continue
        for n in structure.get_neighbors(structure[i], cutoff):
            if spins[n.index]:
                counts[(round(n.nn_distance, 2), "anti" if s * spins[n.index] < 0 else "par")] += 1
    return dict(counts)


def _rocksalt(a: float = 4.177) -> Structure:
    h = a / 2
    return Structure(Lattice([[0, h, h], [h, 0, h], [h, h, 0]]), ["Ni", "O"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def test_rock_salt_nio_gets_the_111_layering():
    ordered = afm_ordering(_rocksalt())
    assert len(ordered) == 4 and ordered.composition.reduced_formula == "NiO"
    assert sorted(ordered.site_properties[SPIN]) == [-1, 0, 0, 1]
    pairs = _pairs(ordered, 4.3)
    # AFM-II: every 180° Ni-O-Ni neighbour (at a) antiparallel, the 90° ones (a/√2) half and half.
    assert pairs[(4.18, "anti")] == 12 and (4.18, "par") not in pairs
    assert pairs[(2.95, "anti")] == pairs[(2.95, "par")] == 12
    assert ordering_of(ordered) == "afm"


def test_rutile_nif2_orders_corner_against_centre_in_its_own_cell():
    rutile = Structure.from_spacegroup(
        "P4_2/mnm", Lattice.tetragonal(4.651, 3.084), ["Ni", "F"], [[0, 0, 0], [0.302, 0.302, 0]]
    )
    ordered = afm_ordering(rutile)
    assert len(ordered) == 6  # two Ni in the cell already: no supercell
    pairs = _pairs(ordered, 3.7)
    assert pairs[(3.63, "anti")] == 16 and pairs[(3.08, "par")] == 4


def test_a_metal_without_anions_orders_its_nearest_neighbours_antiparallel():
    ordered = afm_ordering(bulk_structure("Cr", "bcc", 2.91))
    assert len(ordered) == 2
    pairs = _pairs(ordered, 2.6)
    assert pairs == {(2.52, "anti"): 16}


def test_non_magnetic_compounds_have_no_afm_trial():
    sic = bulk_structure("Si", "diamond", 4.36)
    sic.replace(1, "C")
    assert afm_ordering(sic) is None
    assert ordering_of(sic) == "fm"


def test_orderings_are_checked_and_fm_always_runs():
    assert check_orderings(["AFM"]) == ("fm", "afm")
    assert check_orderings(["fm"]) == ("fm",)
    with pytest.raises(ValueError, match="unknown magnetic ordering ferri"):
        check_orderings(["fm", "ferri"])


def test_the_pw_input_gets_opposite_moments_on_the_two_sublattices(dft_settings):
    from crystaloop.dft.pseudos import family_from_settings

    family = family_from_settings()
    preset = load_preset("demo", {"magnetic_orderings": ["fm", "afm"]})
    ordered = afm_ordering(_rocksalt())
    pw_input = build_pw_input(ordered, preset, family)
    assert pw_input.input_data["system"]["nspin"] == 2
    by_spin = {s: m for s, m in zip(ordered.site_properties[SPIN], pw_input.magmoms, strict=True)}
    assert by_spin == {1: 0.4, -1: -0.4, 0: 0.0}
    text = pw_input.write(dft_settings.data_dir / "afm").read_text()
    assert "starting_magnetization(1) = 0.4" in text and "starting_magnetization(2) = -0.4" in text
    # The ferromagnetic input of the same preset has one Ni species.
    ferro = build_pw_input(_rocksalt(), preset, family)
    assert ferro.magmoms == [0.4, 0.0]
