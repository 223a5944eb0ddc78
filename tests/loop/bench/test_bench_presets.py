"""The binary test set and the summary of `crystaloop bench presets` (no pw.x)."""

from __future__ import annotations

import pytest

from crystaloop.dft.references import check_references
from crystaloop.loop.bench.presets import PresetResult, compound_structure, load_testset, summarise


def test_testset_has_the_required_compounds_with_sources():
    data = load_testset()
    compounds = data["compounds"]
    assert len(compounds) >= 8 and {"CuPd", "NiO", "SiC", "BeO"} <= set(compounds)
    assert "CRC" in data["source"]
    for name, spec in compounds.items():
        structure = compound_structure(spec)
        assert structure.composition.reduced_formula == name
        assert min(structure.distance_matrix[0][1:]) > 1.5  # no overlapping atoms
        check_references([el.symbol for el in structure.composition.elements])


def _result(compound, preset, ef, a):
    return PresetResult(compound, preset, "successful", ef, a, 50.0, 400.0, preset == "fast", 10.0, 12.0, [], [])


def test_summary_compares_with_experiment_and_standard():
    rows = summarise(
        [_result("CuPd", "standard", -0.10, 3.05), _result("CuPd", "fast", 0.45, 2.90)]
    )["rows"]
    standard, fast = rows
    assert standard["ef_minus_exp"] == pytest.approx(0.05) and not standard["sign_error"]
    assert fast["ef_minus_standard"] == pytest.approx(0.55) and fast["sign_error"]
    assert standard["a_error_pct"] == pytest.approx(100 * (3.05 - 2.988) / 2.988)
