"""Decoration of AFLOW prototypes by ICSD substitution probabilities, and crystal-system tags."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from pymatgen.core import Composition, Element, Lattice, Structure

from crystaloop.generative.data import decorate
from crystaloop.generative.data.elements import palette

RUTILE = "A2B_tP6_136_f_a"
WURTZITE = "AB_hP4_186_b_b"
MAGNESIUM = "A_hP2_194_c"
CORUNDUM = "A2B3_hR10_167_c_e"


@pytest.fixture(scope="module")
def rutile_decorations():
    return decorate.substitutions(decorate.aflow_library()[RUTILE], palette())


def test_rutile_by_substitution_gives_sno2_and_never_nacl2(rutile_decorations):
    formulas = [d.formula for d in rutile_decorations]
    assert {"TiO2", "SnO2", "VO2", "RuO2", "GeO2"} <= set(formulas)
    assert "NaCl2" not in formulas
    assert len(formulas) == len(set(formulas))
    # The original compound first, then by falling probability.
    assert rutile_decorations[0].kind == "identity" and rutile_decorations[0].formula == "TiO2"
    probs = [d.probability for d in rutile_decorations[1:]]
    assert probs == sorted(probs, reverse=True) and min(probs) >= decorate.DEFAULT_THRESHOLD


def test_ionic_decorations_are_charge_balanced_and_on_the_palette(rutile_decorations):
    allowed = set(palette())
    for d in rutile_decorations:
        assert d.kind in ("identity", "ionic")
        # Balanced over the states of the substitution table (Fe4+ in FeO2), not only the commonest ones.
        assert Composition(d.formula).oxi_state_guesses(all_oxi_states=True), d.formula
        assert {new for _, new in d.substitution} <= allowed


def test_decorated_structure_keeps_the_sites_and_scales_the_volume(rutile_decorations):
    sno2 = next(d for d in rutile_decorations if d.formula == "SnO2")
    assert sno2.structure_id == f"prior2:{RUTILE}:O-Sn"
    s = sno2.structure()
    ti = decorate.aflow_library()[RUTILE].structure
    assert s.composition.reduced_formula == "SnO2" and len(s) == len(ti)
    assert s.volume > ti.volume  # Sn is larger than Ti
    assert decorate.Decoration.from_dict(sno2.as_dict()) == sno2


def test_intermetallic_prototypes_are_decorated_with_metals_only():
    decs = decorate.substitutions(decorate.aflow_library()[MAGNESIUM], palette())
    assert len(decs) > 3
    assert {d.kind for d in decs} == {"identity", "intermetallic"}
    assert all(Element(d.formula).is_metal for d in decs)


def test_prototype_limits_and_all_seven_crystal_systems():
    protos = decorate.load_prototypes()
    assert 200 <= len(protos) < len(decorate.aflow_library()) == 288
    assert all(len(p.structure) <= 20 and max(p.structure.lattice.abc) < 10 for p in protos)
    systems = {decorate.crystal_system(p.structure) for p in protos}
    assert systems == set(decorate.CRYSTAL_SYSTEMS)
    # Repeated AFLOW labels get unique keys.
    assert len({p.key for p in protos}) == len(protos)


@pytest.mark.parametrize(
    ("key", "system"),
    [(RUTILE, "tetragonal"), (WURTZITE, "hexagonal"), (CORUNDUM, "trigonal"), (MAGNESIUM, "hexagonal")],
)
def test_crystal_system_of_known_prototypes(key, system):
    assert decorate.crystal_system(decorate.aflow_library()[key].structure) == system


def test_crystal_system_of_hand_built_cells():
    nacl = Structure(Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    assert decorate.crystal_system(nacl) == "cubic"
    tri = Structure(Lattice.from_parameters(4.1, 5.3, 6.2, 81, 95, 103), ["Si", "O"], [[0, 0, 0], [0.31, 0.17, 0.42]])
    assert decorate.crystal_system(tri) == "triclinic"


def test_choice_is_deterministic_given_the_seed_and_capped():
    keys = [RUTILE, WURTZITE, MAGNESIUM]
    a = decorate.decorate_all(palette(), seed=3, per_prototype=5, prototypes=keys)
    b = decorate.decorate_all(palette(), seed=3, per_prototype=5, prototypes=keys)
    c = decorate.decorate_all(palette(), seed=4, per_prototype=5, prototypes=keys)
    assert a == b
    assert a != c
    assert len(a) == 15
    for key in keys:
        mine = [d for d in a if d.prototype == key]
        assert len(mine) == 5 and sum(d.kind == "identity" for d in mine) == 1


@pytest.mark.parametrize(("key", "element"), [("A_hP4_194_bc", "C"), ("A_hR2_166_c.As", "As")])
def test_covalent_frameworks_keep_only_their_own_element(key, element):
    decs = decorate.substitutions(decorate.aflow_library()[key], palette())
    assert [d.formula for d in decs] == [element]


def test_metalloid_sites_of_intermetallics_take_metals_or_metalloids():
    decs = decorate.substitutions(decorate.aflow_library()["AB_cP8_198_a_a.FeSi"], palette())
    formulas = {d.formula for d in decs}
    assert {"FeSi", "CoSi", "MnSi"} <= formulas
    for d in decs:
        new = dict(d.substitution)
        assert Element(new["Fe"]).is_metal
        assert Element(new["Si"]).is_metal or Element(new["Si"]).is_metalloid


def test_the_draw_does_not_follow_the_processs_hash_seed():
    # the predictor iterates sets: duplicates and last digits once depended on PYTHONHASHSEED
    code = (
        "from crystaloop.generative.data import decorate; from crystaloop.generative.data.elements import palette;"
        "print(sorted(d.structure_id for d in decorate.decorate_all(palette(), per_prototype=20, "
        "prototypes=['A3B_cP8_223_c_a', 'AB_cP2_221_b_a'])))"
    )
    env = {**os.environ}
    runs = []
    for hash_seed in ("1", "2"):
        env["PYTHONHASHSEED"] = hash_seed
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        runs.append(out.stdout)
    assert runs[0] == runs[1] and runs[0].count("prior2:") == 40
