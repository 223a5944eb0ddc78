"""Structure measures on hand-built crystals whose answers are known: minimum distance with
periodic images, validity, charge balance (pymatgen and SMACT), novelty by composition, structure
and prototype, uniqueness, the shortest distance below a cutoff, and site matching across the
periodic boundary."""

from __future__ import annotations

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

from crystaloop.generative.measures import (
    charge_balanced,
    composition_novel_flags,
    is_valid,
    matched_site_errors,
    matching_index,
    minimum_distance,
    novelty_flags,
    prototype_novel_flags,
    reference_prototypes,
    shortest_distance_below,
    smact_valid,
    unique_flags,
)
from crystaloop.generative.train.data import LabelledStructure


def rock_salt(a: float, cation: str = "Na", anion: str = "Cl") -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(a), [cation, anion], [[0, 0, 0], [0.5, 0.5, 0.5]])


def cscl(a: float, first: str = "Cs", second: str = "Cl") -> Structure:
    return Structure(Lattice.cubic(a), [first, second], [[0, 0, 0], [0.5, 0.5, 0.5]])


KBR2 = Structure(Lattice.cubic(5.0), ["K", "Br", "Br"], [[0, 0, 0], [0.5, 0.5, 0.5], [0, 0.5, 0.5]])


def record(structure: Structure, name: str = "r") -> LabelledStructure:
    return LabelledStructure(name, structure, {})


def test_minimum_distance_counts_periodic_images_and_own_images():
    # two sites 0.4 A apart across the cell face: minimum image, not the 3.6 A in the cell
    across = Structure(Lattice.cubic(4.0), ["Na", "Cl"], [[0.02, 0, 0], [0.92, 0, 0]])
    assert minimum_distance(across) == pytest.approx(0.4)
    assert not is_valid(across)
    # one site in a cell with a 0.45 A edge: its own image is 0.45 A away
    thin = Structure(Lattice.orthorhombic(0.45, 5, 5), ["Na"], [[0, 0, 0]])
    assert minimum_distance(thin) == pytest.approx(0.45)
    assert not is_valid(thin)
    assert minimum_distance(cscl(4.0)) == pytest.approx(4.0 * np.sqrt(3) / 2)
    assert is_valid(cscl(4.0)) and not is_valid(None)


@pytest.mark.parametrize(
    ("formula_structure", "pymatgen_balanced", "smact"),
    [
        (rock_salt(5.6), True, True),
        (KBR2, False, False),  # K+ and two Br-: no neutral assignment for either
        (cscl(3.0, "Cu", "Pd"), False, True),  # an alloy: SMACT counts all-metal compositions valid
        (cscl(3.0, "Ba", "O"), True, True),
    ],
)
def test_charge_balance_by_pymatgen_and_smact(formula_structure, pymatgen_balanced, smact):
    assert charge_balanced(formula_structure) is pymatgen_balanced
    assert smact_valid(formula_structure) is smact


def test_novelty_by_composition_structure_and_prototype():
    references = [record(rock_salt(5.64)), record(cscl(4.1, "Cs", "Br"))]
    prototypes = reference_prototypes(references)
    samples = [
        rock_salt(5.70),  # NaCl in rock salt, scaled: a known structure
        cscl(3.4, "Na", "Cl"),  # NaCl in CsCl: known formula and prototype, new structure
        rock_salt(4.2, "Mg", "O"),  # new formula, known prototype
        Structure(
            Lattice.hexagonal(3.2, 5.2),
            ["Zn", "Zn", "O", "O"],  # wurtzite: a new type
            [[1 / 3, 2 / 3, 0], [2 / 3, 1 / 3, 0.5], [1 / 3, 2 / 3, 0.38], [2 / 3, 1 / 3, 0.88]],
        ),
    ]
    assert composition_novel_flags(samples, references) == [False, False, True, True]
    assert novelty_flags(samples, references) == [False, True, True, True]
    assert prototype_novel_flags(samples, prototypes) == [False, False, False, True]


def test_reference_prototypes_keep_one_structure_per_type():
    references = [
        record(rock_salt(a, c, x)) for a, c, x in [(5.6, "Na", "Cl"), (4.2, "Mg", "O"), (6.6, "K", "Br")]
    ]
    references.append(record(cscl(4.1)))
    groups = reference_prototypes(references)
    assert list(groups) == ["AB"] and len(groups["AB"]) == 2
    # labelled records of one label are taken as one type without matching
    labelled = reference_prototypes(references, ["B1", "B1", "B1", "B2"])
    assert len(labelled["AB"]) == 2


def test_unique_flags_keep_the_first_of_each_equivalence_class():
    batch = [rock_salt(5.6), rock_salt(5.65), cscl(3.4, "Na", "Cl"), rock_salt(4.2, "Mg", "O")]
    assert unique_flags(batch) == [True, False, True, True]


def test_site_matching_uses_minimum_image_and_optimal_pairs():
    lattice = Lattice.cubic(4.0)
    true = np.array([[0.0, 0.0, 0.0], [0.5, 0.5, 0.5]])
    pred = np.array([[0.49, 0.5, 0.5], [0.99, 0.0, 0.0]])  # swapped order, one across the face
    distances, z_errors = matched_site_errors(true, np.array([8, 22]), pred, np.array([23, 8]), lattice)
    assert np.allclose(sorted(distances), [0.04, 0.04])
    assert sorted(z_errors.tolist()) == [0, 1]
    distances, _ = matched_site_errors(true, np.array([8, 22]), pred[:1], np.array([22]), lattice)
    assert len(distances) == 1 and np.isclose(distances[0], 0.04)


def test_site_matching_in_the_decoded_lattice_carries_the_lattice_error():
    true = np.array([[0.0, 0.0, 0.0], [0.5, 0.5, 0.5]])
    # exact fractional sites in a cell decoded 0.2 A too long: in the true cell nothing moved,
    # in its own cell the body-centre site sits 0.2 * sqrt(3) / 2 A away from the truth
    same, _ = matched_site_errors(true, np.array([8, 8]), true, np.array([8, 8]), Lattice.cubic(4.0))
    own, _ = matched_site_errors(
        true, np.array([8, 8]), true, np.array([8, 8]), Lattice.cubic(4.0), Lattice.cubic(4.2)
    )
    assert np.allclose(same, 0.0)
    assert np.allclose(sorted(own), [0.0, 0.1 * np.sqrt(3)])


def test_shortest_distance_below_counts_periodic_images_and_coincident_sites():
    single = Structure(Lattice.cubic(2.0), ["Fe"], [[0, 0, 0]])
    assert shortest_distance_below(single, 2.5) == pytest.approx(2.0)  # its own image
    assert shortest_distance_below(single, 1.5) is None
    twin = Structure(Lattice.cubic(4.0), ["Fe", "Fe"], [[0, 0, 0], [0, 0, 0]])
    assert shortest_distance_below(twin, 0.5) == pytest.approx(0.0)


def test_matching_index_names_the_first_equivalent_structure():
    nacl = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5] * 3])
    cscl_type = Structure(Lattice.cubic(3.4), ["Na", "Cl"], [[0, 0, 0], [0.5] * 3])
    # the same rock salt as a primitive cell at another volume matches (StructureMatcher scales)
    others = [cscl_type, nacl.get_primitive_structure().scale_lattice(nacl.volume / 4 * 1.1), nacl]
    assert matching_index(nacl, others) == 1
    assert matching_index(nacl, [cscl_type]) is None
    assert matching_index(nacl, []) is None
