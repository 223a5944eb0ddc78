"""The filter cascade, stage by stage, on hand-built structures."""

from __future__ import annotations

import numpy as np
import pytest
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Lattice, Structure
from pymatgen.core.operations import SymmOp

from crystaloop.loop.config import ElementRules, TargetWindow
from crystaloop.loop.filters import (
    Candidate,
    DecodedStage,
    ElementStage,
    FilterCascade,
    NoveltyStage,
    SizeStage,
    StoichiometryStage,
    UIPStage,
    UniqueStage,
    ValidityStage,
    WindowStage,
    relative_window,
    widen,
)

EF = "formation_energy_per_atom"


def rocksalt(a: float = 5.64, species=("Na", "Cl")) -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(a), list(species), [[0, 0, 0], [0.5, 0.5, 0.5]])


def perovskite(a: float = 3.9, species=("Sr", "Ti", "O")) -> Structure:
    return Structure(
        Lattice.cubic(a),
        list(species[:2]) + [species[2]] * 3,
        [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]],
    )


def silicon() -> Structure:
    return Structure(
        Lattice.from_parameters(3.87, 3.87, 3.87, 60, 60, 60), ["Si", "Si"], [[0, 0, 0], [0.25, 0.25, 0.25]]
    )


def cand(structure, index=0, **kw) -> Candidate:
    return Candidate(index=index, structure=structure, **kw)


def verdicts(stage, candidates):
    return [passed for passed, _ in stage.judge(candidates)]


def test_decoded_needs_sites_and_a_physical_lattice():
    empty = Structure(Lattice.cubic(4.0), [], [])
    flat = Structure(Lattice.orthorhombic(0.8, 4.0, 4.0), ["Cu"], [[0, 0, 0]])
    failed = cand(None, decode_reason="unphysical lattice")
    out = DecodedStage().judge([cand(rocksalt()), cand(empty), cand(flat), failed])
    assert [p for p, _ in out] == [True, False, False, False]
    assert out[1][1] == "no sites" and "below 1" in out[2][1] and out[3][1] == "unphysical lattice"


def test_valid_rejects_a_too_close_pair_and_a_tiny_cell():
    close = Structure(Lattice.cubic(5.0), ["Cu", "Cu"], [[0, 0, 0], [0.06, 0, 0]])  # 0.3 Å apart
    across = Structure(
        Lattice.cubic(5.0), ["Cu", "Cu"], [[0.01, 0.5, 0.5], [0.97, 0.5, 0.5]]
    )  # 0.2 Å via image
    tiny = Structure(Lattice.cubic(0.45), ["H"], [[0, 0, 0]])  # its own image 0.45 Å away
    out = ValidityStage(0.5).judge([cand(rocksalt()), cand(close), cand(across), cand(tiny)])
    assert [p for p, _ in out] == [True, False, False, False]
    assert "0.30 Å apart" in out[1][1] and "0.20 Å apart" in out[2][1]
    assert verdicts(ValidityStage(0.25), [cand(close)]) == [True]


def test_stoichiometry_against_base_and_anonymous_formulas():
    base = {"base_formula": "SrTiO3"}
    right = cand(perovskite(), sample=base)
    wrong = cand(
        Structure(Lattice.cubic(4.0), ["Sr", "Sr", "Ti", "O"], np.random.default_rng(0).random((4, 3))),
        sample=base,
    )
    other_abx3 = cand(perovskite(species=("Ba", "Zr", "O")), sample=base)
    out = StoichiometryStage(use_base=True).judge([right, wrong, other_abx3])
    assert [p for p, _ in out] == [True, False, False]
    assert "Sr2TiO" in out[1][1] and "SrTiO3" in out[1][1]
    assert verdicts(
        StoichiometryStage(use_base=True, allowed_formulas=["ABC3"]), [right, wrong, other_abx3]
    ) == [
        True,
        False,
        True,
    ]
    # without a base, only the anonymous list decides
    assert verdicts(
        StoichiometryStage(use_base=False, allowed_formulas=["AB"]), [cand(rocksalt()), right]
    ) == [
        True,
        False,
    ]


def test_elements_allow_deny_and_pseudopotential_coverage():
    nacl, sto = cand(rocksalt()), cand(perovskite())
    assert verdicts(ElementStage(ElementRules(allow=["Na", "Cl"])), [nacl, sto]) == [True, False]
    assert verdicts(ElementStage(ElementRules(deny=["Sr"])), [nacl, sto]) == [True, False]
    stage = ElementStage(ElementRules(), frozenset({"Sr", "Ti", "O"}), "tiny-family")
    out = stage.judge([nacl, sto])
    assert [p for p, _ in out] == [False, True]
    assert out[0][1] == "no pseudopotential for Cl, Na in tiny-family"


def test_novel_rejects_a_rotated_translated_copy_and_a_slightly_strained_one():
    known = rocksalt()
    copy = known.copy()
    copy.apply_operation(SymmOp.from_axis_angle_and_translation([1, 1, 0], 37.0))
    copy.translate_sites(list(range(len(copy))), [0.13, 0.21, 0.05])
    asked = []

    def lookup(formula):
        asked.append(formula)
        return [known] if formula == "NaCl" else []

    # Same formula, c stretched: 5 % lies inside StructureMatcher's length tolerance (ltol 0.2),
    # 50 % far outside it. A uniform scaling is matched whatever its size (scale=True).
    near, far, swollen = known.copy(), known.copy(), known.copy()
    near.apply_strain([0.0, 0.0, 0.05])
    far.apply_strain([0.0, 0.0, 0.50])
    swollen.scale_lattice(1.5 * known.volume)
    other = rocksalt(species=("K", "Br"))  # same prototype, another formula: never compared
    stage = NoveltyStage(lookup)
    out = stage.judge([cand(copy), cand(near), cand(far), cand(swollen), cand(other), cand(copy.copy())])
    assert [p for p, _ in out] == [False, False, True, False, True, False]
    assert out[1][1] == "NaCl is already known (training data or campaign)"
    assert sorted(asked) == ["KBr", "NaCl"]  # one lookup per formula
    # and the tolerance is the matcher's: a strict one tells the 5 % strain apart
    strict = NoveltyStage(lookup, matcher=StructureMatcher(ltol=0.01, stol=0.01, angle_tol=0.1))
    assert verdicts(strict, [cand(copy), cand(near)]) == [False, True]


class FixedPredictor:
    """Predictions chosen by hand, so the window rule is checked in isolation."""

    properties = [EF, "band_gap"]
    version = "hand-made"

    def __init__(self, means, stds):
        self.means, self.stds = np.asarray(means, float), np.asarray(stds, float)

    def predict(self, structures):
        return self.means[: len(structures)], self.stds[: len(structures)]


def test_window_mean_rule_with_tolerance_and_probability_rule():
    window = TargetWindow(property=EF, min=-2.0, max=-1.0)
    means = [[-1.5, 1.0], [-0.9, 1.0], [-0.5, 1.0], [float("nan"), 0.0]]
    stds = [[0.1, 0.1], [0.5, 0.1], [0.1, 0.1], [0.1, 0.1]]
    cands = [cand(rocksalt(), index=i) for i in range(4)]
    out = WindowStage(FixedPredictor(means, stds), [window], tolerance=0.2).judge(cands)
    # widened window: [-2.4, -0.8]
    assert [p for p, _ in out] == [True, True, False, False]
    assert "outside [-2.4, -0.8]" in out[2][1]
    assert cands[0].predicted[EF] == {"mean": -1.5, "std": pytest.approx(0.1), "model_version": "hand-made"}
    assert set(cands[0].predicted) == {EF, "band_gap"}
    assert cands[0].score == pytest.approx(window.probability(-1.5, 0.1))
    assert cands[3].predicted[EF]["mean"] is None
    # probability rule: -0.9 +- 0.5 has P(in [-2, -1]) = 0.4207 - 0.0139 = 0.41
    rule = WindowStage(FixedPredictor(means, stds), [window], tolerance=0.2, min_probability=0.4)
    assert verdicts(rule, cands) == [True, True, False, False]
    strict = WindowStage(FixedPredictor(means, stds), [window], min_probability=0.5)
    out = strict.judge(cands)
    assert [p for p, _ in out] == [True, False, False, False]
    assert "P(formation_energy_per_atom in window) 0.41 < 0.5" in out[1][1]


def test_window_per_candidate_relative_to_base():
    # the paper's preset: within 20 % of the base's E_f (-2.0 -> [-2.4, -1.6])
    near = cand(rocksalt(), windows={EF: relative_window(EF, -2.0, 0.2)})
    far = cand(rocksalt(), index=1, windows={EF: relative_window(EF, -1.0, 0.2)})
    target = TargetWindow(property=EF, min=-10.0, max=5.0)
    stage = WindowStage(FixedPredictor([[-2.2, 0], [-2.2, 0]], [[0, 0], [0, 0]]), [target], tolerance=0.0)
    assert verdicts(stage, [near, far]) == [True, False]
    assert widen(relative_window(EF, -2.0, 0.2), 0.0) == pytest.approx((-2.4, -1.6))
    # A base at 0 eV/atom, or a wide fraction, gives a window no user could enter; it is still built.
    assert widen(relative_window(EF, 0.0, 0.2), 0.0) == (0.0, 0.0)
    assert widen(relative_window(EF, -3.0, 3.0), 0.0) == pytest.approx((-12.0, 6.0))
    empty = cand(rocksalt(), windows={EF: relative_window(EF, 0.0, 0.2)})
    assert verdicts(stage, [empty]) == [False]


def test_unique_keeps_the_best_scored_of_equivalent_structures():
    a = rocksalt()
    b = a.copy()
    b.apply_operation(SymmOp.from_axis_angle_and_translation([0, 0, 1], 90.0))
    b.translate_sites(list(range(len(b))), [0.25, 0.1, 0.3])
    cands = [cand(a, index=0, score=0.2), cand(b, index=1, score=0.9), cand(perovskite(), index=2, score=0.1)]
    out = UniqueStage().judge(cands)
    assert [p for p, _ in out] == [False, True, True]
    assert out[0][1] == "equivalent to sample 1"


def test_cascade_counts_add_up_and_trails_record_every_verdict():
    close = Structure(Lattice.cubic(5.0), ["Na", "Cl"], [[0, 0, 0], [0.02, 0, 0]])
    batch = [
        cand(None, index=0, decode_reason="no sites"),
        cand(close, index=1),
        cand(rocksalt(), index=2),
        cand(rocksalt(), index=3),
        cand(perovskite(), index=4),
    ]
    cascade = FilterCascade(
        [DecodedStage(), ValidityStage(0.5), ElementStage(ElementRules(deny=["Ti"])), UniqueStage()]
    )
    seen = []
    survivors, counts = cascade.run(
        batch, progress=lambda stage, done, total: seen.append((stage, done, total))
    )
    assert [(c.stage, c.n_in, c.n_out) for c in counts] == [
        ("decoded", 5, 4),
        ("valid", 4, 3),
        ("elements", 3, 2),
        ("unique", 2, 1),
    ]
    for before, after in zip(counts, counts[1:], strict=False):
        assert before.n_out == after.n_in
    rejected = [c for c in batch if c.rejected_stage]
    assert len(rejected) + len(survivors) == len(batch)
    assert {c.rejected_stage for c in rejected} == {"decoded", "valid", "elements", "unique"}
    assert [s.stage for s in survivors[0].trail] == ["decoded", "valid", "elements", "unique"]
    assert all(s.passed for s in survivors[0].trail)
    assert [(s.stage, s.passed) for s in batch[1].trail] == [("decoded", True), ("valid", False)]
    assert seen[-1] == ("unique", 4, 4)


def test_uip_screen_relaxes_with_chgnet_and_rechecks_the_window():
    from crystaloop.loop.generation import CHGNetRelaxer, chgnet_references

    relaxer = CHGNetRelaxer(fmax=0.1, steps=60)
    squeezed = silicon()
    squeezed.scale_lattice(squeezed.volume * 0.9)
    inside = cand(squeezed, index=0)
    outside = cand(squeezed.copy(), index=1, windows={EF: TargetWindow(property=EF, min=-3.0, max=-2.0)})
    stage = UIPStage(
        relaxer, chgnet_references(relaxer.version), [TargetWindow(property=EF, min=-0.5, max=0.5)]
    )
    out = stage.judge([inside, outside])
    assert [p for p, _ in out] == [True, False]
    assert "CHGNet E_f" in out[1][1]
    uip = inside.uip
    # elemental Si against CHGNet's own Si reference: E_f near zero, volume back up after the squeeze
    assert abs(uip["formation_energy_per_atom"]) < 0.05
    assert uip["volume_change"] > 0.03
    relaxed = Structure.from_dict(uip["structure"])
    assert relaxed.volume > squeezed.volume
    assert uip["energy_per_atom"] < uip["initial_energy_per_atom"]
    assert uip["max_displacement_angstrom"] >= uip["mean_displacement_angstrom"] >= 0
    assert uip["model"].startswith("chgnet-") and uip["seconds"] > 0


def test_uip_screen_rejects_cells_too_dense_to_relax_without_relaxing():
    fcc = [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]
    dense = Structure(Lattice.cubic(2.0), ["Cu"] * 4, fcc)  # 2 Å^3/atom, nearest pair 1.41 Å
    assert verdicts(ValidityStage(0.5), [cand(dense)]) == [True]
    stage = UIPStage(relaxer=None, references=None, targets=[])  # neither is reached
    assert stage.judge([cand(dense)]) == [(False, "2.0 Å^3/atom is too dense to relax")]


def test_size_stage_rejects_a_five_atom_cell_with_its_count():
    stage = SizeStage(max_nsites=2)
    out = stage.judge([cand(silicon()), cand(perovskite())])
    assert out[0] == (True, None)
    assert out[1] == (False, "5 sites in the cell, above max_nsites 2")


def test_size_stage_counts_the_primitive_cell_of_a_noisy_rock_salt():
    """The decoder draws rock salt as its 8-site cubic cell, a few hundredths of an Å off."""
    import numpy as np
    from pymatgen.core import Lattice, Structure

    rock_salt = Structure.from_spacegroup("Fm-3m", Lattice.cubic(4.6), ["Ag", "F"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    noisy = rock_salt.copy()
    for i, shift in enumerate(np.random.default_rng(0).normal(0, 0.03, (len(noisy), 3))):
        noisy.translate_sites([i], shift, frac_coords=False)
    assert len(noisy) == 8
    assert SizeStage(max_nsites=2).judge([cand(noisy)]) == [(False, "8 sites in the cell, above max_nsites 2")]
    kept = cand(noisy)
    assert SizeStage(max_nsites=2, symprec=0.2).judge([kept, cand(perovskite())]) == [
        (True, None),
        (False, "5 sites in the cell, above max_nsites 2"),
    ]
    # It goes on as the 2-site primitive cell, so the CHGNet screen and DFT run 2 sites.
    assert len(kept.structure) == 2 and kept.structure.composition.reduced_formula == "AgF"
    assert kept.structure.lattice.a == pytest.approx(4.6 / 2**0.5, abs=0.05)


def test_cascade_has_the_size_stage_only_when_max_nsites_is_set():
    from crystaloop.loop.config import parse_campaign_config
    from crystaloop.loop.generation import build_cascade

    def names(**filters):
        config = parse_campaign_config(
            {
                "name": "size-test",
                "targets": [{"property": EF, "min": -1.0, "max": 0.0}],
                "material_classes": ["binary"],
                "filters": {"uip_screen": False, "novelty": False, **filters},
                "dft": {"engine": "surrogate"},
            }
        )
        cascade = build_cascade(
            config, strategy="random", database=None, family=None, predictor=None, uip=False
        )
        return [stage.name for stage in cascade.stages]

    assert names(max_nsites=2) == [
        "decoded",
        "valid",
        "stoichiometry",
        "elements",
        "size",
        "window",
        "unique",
    ]
    assert "size" not in names()


class CountingRelaxer:
    """Returns the structure unchanged at a fixed energy, counting its calls."""

    version = "counting"

    def __init__(self) -> None:
        self.calls = 0

    def relax(self, structure):
        self.calls += 1
        return {
            "structure": structure.copy(),
            "initial_energy_per_atom": -1.0,
            "energy_per_atom": -1.0,
            "steps": 1,
            "converged": True,
        }


def test_uip_screen_relaxes_equivalent_candidates_once():
    relaxer = CountingRelaxer()
    shifted = silicon()
    shifted.translate_sites(range(len(shifted)), [0.1, 0.2, 0.3])
    batch = [cand(silicon(), index=0), cand(shifted, index=1), cand(rocksalt(), index=2)]
    stage = UIPStage(
        relaxer, lambda symbols: {s: -0.5 for s in symbols}, [TargetWindow(property=EF, max=0.0)]
    )
    out = stage.judge(batch)
    assert relaxer.calls == 2
    assert [p for p, _ in out] == [True, True, True]
    assert [c.uip["shared"] for c in batch] == [False, True, False]
    assert batch[1].uip["formation_energy_per_atom"] == pytest.approx(-0.5)
    assert batch[1].uip["volume_change"] == pytest.approx(0.0)


def test_uip_screen_spends_a_relaxation_budget_on_the_best_scored_first():
    relaxer = CountingRelaxer()
    batch = [
        cand(silicon(), index=0, score=0.2),
        cand(rocksalt(), index=1, score=0.9),
        cand(perovskite(), index=2, score=0.5),
    ]
    stage = UIPStage(
        relaxer,
        lambda symbols: {s: -0.5 for s in symbols},
        [TargetWindow(property=EF, max=0.0)],
        max_relaxations=2,
    )
    out = stage.judge(batch)
    assert relaxer.calls == 2
    assert [p for p, _ in out] == [False, True, True]
    assert out[0][1] == "not screened: 2 relaxations went to better-scored ones"
    assert batch[0].uip == {} and batch[1].uip and batch[2].uip
