"""The campaign's material classes fix the stoichiometry of random samples."""

from __future__ import annotations

from pymatgen.core import Lattice, Structure

from crystaloop.loop.filters import Candidate, StoichiometryStage, material_class_formulas


def _candidate(species, coords) -> Candidate:
    return Candidate(index=0, structure=Structure(Lattice.cubic(4.0), species, coords), sample={})


def test_binary_campaign_keeps_ab_and_drops_ternaries():
    stage = StoichiometryStage(use_base=False, allowed_formulas=material_class_formulas(["binary"]))
    ab = _candidate(["Pd", "Si"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    abc3 = _candidate(
        ["Ag", "Pd", "I", "I", "I"], [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]
    )
    verdicts = stage.judge([ab, abc3])
    assert verdicts[0] == (True, None)
    assert verdicts[1][0] is False and "AgPdI3" in verdicts[1][1]


def test_perovskite_and_heusler_formulas_and_all_classes_unrestricted():
    assert material_class_formulas(["binary", "perovskite", "heusler"]) == []
    stage = StoichiometryStage(
        use_base=False, allowed_formulas=material_class_formulas(["perovskite", "heusler"])
    )
    abc3 = _candidate(
        ["Sr", "Ti", "O", "O", "O"], [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]
    )
    x2yz = _candidate(["Cu", "Cu", "Mn", "Al"], [[0.25] * 3, [0.75] * 3, [0, 0, 0], [0.5, 0.5, 0.5]])
    ab = _candidate(["Pd", "Si"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    assert [v[0] for v in stage.judge([abc3, x2yz, ab])] == [True, True, False]
