"""Enumeration of the prior set: size, uniqueness, chemistry, symmetry."""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict

import pytest
from pymatgen.core import Element

from crystaloop.generative.data import elements as pal
from crystaloop.generative.data.prototypes import (
    EQUIVALENT_ROLE_SWAPS,
    Prototype,
    enumerate_all,
    prototype_from_id,
)


@pytest.fixture(scope="module")
def prototypes():
    return enumerate_all()


def _same_crystal_key(p: Prototype) -> tuple:
    # Swapping the two sites of a binary, or Y and Z of a Heusler X2YZ, gives the same crystal.
    if p.name in {"B1", "B2", "B3"}:
        return p.name, tuple(sorted(p.species))
    if p.name == "L21":
        return p.name, p.species[0], tuple(sorted(p.species[1:]))
    return p.name, p.species


def test_at_least_ten_thousand_unique_structures(prototypes):
    ids = [p.structure_id for p in prototypes]
    assert len(ids) >= 10_000
    assert len(set(ids)) == len(ids)
    # No two entries describe the same crystal (B3 SiC once, not as Si-C and C-Si).
    keys = Counter(_same_crystal_key(p) for p in prototypes)
    assert max(keys.values()) == 1, [k for k, n in keys.items() if n > 1]
    assert {"prior:B3:Si-C", "prior:B3:Ge-C", "prior:B3:Sn-C"} <= set(ids)
    assert not {"prior:B3:C-Si", "prior:B3:C-Ge", "prior:B3:C-Sn"} & set(ids)


def test_no_two_entries_match_with_structure_matcher(prototypes):
    from pymatgen.analysis.structure_matcher import StructureMatcher

    groups = defaultdict(list)
    for p in prototypes:
        groups[(p.name, p.formula)].append(p)
    matcher = StructureMatcher()
    pairs = [pair for group in groups.values() for pair in itertools.combinations(group, 2)]
    assert len(pairs) > 100  # perovskite ABX3/BAX3 and Heusler pairs of one formula
    same = [(a, b) for a, b in pairs if matcher.fit(a.primitive(5.0), b.primitive(5.0))]
    assert same == []


@pytest.mark.parametrize(
    ("name", "species"),
    [
        ("B1", ("Na", "Cl")),
        ("B2", ("Cs", "Cl")),
        ("B3", ("Si", "C")),
        ("perovskite", ("Sr", "Ti", "O")),
        ("L21", ("Cu", "Mn", "Al")),
    ],
)
def test_declared_role_swaps_are_exactly_the_symmetric_ones(name, species):
    from pymatgen.analysis.structure_matcher import StructureMatcher

    proto = Prototype(name, species)
    matcher = StructureMatcher()
    for perm in itertools.permutations(range(len(species))):
        other = Prototype(name, tuple(species[i] for i in perm))
        same = matcher.fit(proto.conventional(5.0), other.conventional(5.0))
        assert same == (other.crystal_key == proto.crystal_key), (perm, same)
        assert same == (perm == tuple(range(len(species))) or perm in EQUIVALENT_ROLE_SWAPS[name])


def test_every_class_is_present(prototypes):
    counts = Counter(p.name for p in prototypes)
    assert set(counts) == {"B1", "B2", "B3", "perovskite", "L21"}
    assert counts["perovskite"] > 1000 and counts["L21"] > 1000 and counts["B2"] > 500


def test_palette_excludes_radioactive_noble_and_actinides_and_covers_local_pseudos(prototypes):
    used = {el for p in prototypes for el in p.species}
    assert not used & pal.EXCLUDED
    assert not any(89 <= Element(el).Z <= 103 or Element(el).is_noble_gas for el in used)
    assert set(pal.LOCAL_PBE_ELEMENTS) <= used


def test_perovskites_are_charge_balanced(prototypes):
    for p in prototypes:
        if p.name == "perovskite":
            a, b, x = p.species
            need = -3 * pal.anion_state(x)
            assert any(qa + qb == need for qa in pal.cation_states(a) for qb in pal.cation_states(b)), p


@pytest.mark.parametrize(
    ("proto", "spacegroup", "nsites"),
    [
        (Prototype("B1", ("Na", "Cl")), "Fm-3m", 8),
        (Prototype("B2", ("Cs", "Cl")), "Pm-3m", 2),
        (Prototype("B3", ("Ga", "As")), "F-43m", 8),
        (Prototype("perovskite", ("Sr", "Ti", "O")), "Pm-3m", 5),
        (Prototype("L21", ("Cu", "Mn", "Al")), "Fm-3m", 16),
    ],
)
def test_prototype_symmetry_and_primitive_cell(proto, spacegroup, nsites):
    conv = proto.conventional(5.0)
    assert len(conv) == nsites == proto.atoms_per_conventional
    assert conv.get_space_group_info(symprec=1e-3)[0] == spacegroup == proto.spacegroup
    prim = proto.primitive(5.0)
    assert prim.composition.reduced_formula == conv.composition.reduced_formula
    assert prim.volume == pytest.approx(conv.volume * len(prim) / len(conv))
    assert prim.get_space_group_info(symprec=1e-3)[0] == spacegroup
    assert prototype_from_id(proto.structure_id) == proto


def test_heusler_formula_and_guess():
    proto = Prototype("L21", ("Co", "Mn", "Si"))
    assert proto.conventional(5.6).composition.reduced_formula == proto.formula
    assert proto.conventional(5.6).composition["Co"] == 8
    assert 4.5 < proto.lattice_guess() < 7.0
