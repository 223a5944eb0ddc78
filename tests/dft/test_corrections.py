"""Fitted anion corrections: the fit, where a constant applies, and the shipped-fit lookup."""

from __future__ import annotations

import pytest
import yaml

from crystaloop.dft.corrections import AnionCorrection, correction_for, fit_anion_corrections
from crystaloop.dft.hull import FormationHull, HullPhase
from crystaloop.errors import UserError


def test_the_fit_recovers_the_constants_that_made_the_data():
    truth = {"O": -0.70, "F": -0.45}
    experiment = {"MgO": -3.11, "Al2O3": -3.47, "NiO": -1.24, "LiF": -3.19, "NiF2": -2.25, "AgF": -1.06}
    made = AnionCorrection("truth", truth)
    # raw = experiment - shift, plus a residual that the fit must not absorb into the mean
    noise = {"MgO": 0.02, "Al2O3": -0.02, "NiO": 0.0, "LiF": 0.01, "NiF2": -0.01, "AgF": 0.0}
    rows = [(f, e - made.per_atom(f) + noise[f], e) for f, e in experiment.items()]
    fit = fit_anion_corrections(rows, metals=())
    assert fit.values["O"] == pytest.approx(-0.70, abs=0.02)
    assert fit.values["F"] == pytest.approx(-0.45, abs=0.02)
    assert fit.mae < 0.02
    assert fit.loo_mae is not None and fit.mae <= fit.loo_mae < 0.05
    by = {r["formula"]: r for r in fit.rows}
    assert by["NiO"]["corrected"] == pytest.approx(by["NiO"]["raw"] + fit.values["O"] / 2)


def test_leave_one_out_skips_a_compound_whose_anion_has_no_other_data():
    fit = fit_anion_corrections([("MgO", -2.7, -3.11), ("NiO", -0.9, -1.24), ("AgF", -0.8, -1.06)], metals=())
    by = {r["formula"]: r for r in fit.rows}
    assert by["AgF"]["loo_predicted"] is None
    assert by["MgO"]["loo_predicted"] is not None


def test_metal_constants_apply_in_oxides_and_fluorides_only():
    correction = AnionCorrection("test", {"O": -0.4, "N": -0.3}, metals={"Ni": -0.8})
    assert correction.per_atom("NiO") == pytest.approx((-0.4 - 0.8) / 2)
    assert correction.terms("NiO") == pytest.approx({"O": -0.2, "Ni": -0.4})
    assert correction.per_atom("Ni3N") == pytest.approx(-0.3 / 4)  # no O or F: no metal term
    assert correction.per_atom("NiAl") == 0.0
    assert correction.per_atom("Ni") == 0.0


def test_the_fit_separates_anion_and_metal_constants_and_refuses_what_it_cannot():
    made = AnionCorrection("truth", {"O": -0.4, "F": -0.3}, metals={"Ni": -0.8, "Fe": -0.6})
    experiment = {
        "MgO": -3.11, "SiO2": -3.15, "AgF": -1.06, "LiF": -3.19, "NiO": -1.24,
        "NiF2": -2.25, "FeO": -1.41, "Fe2O3": -1.71, "FeF2": -2.46,
    }  # fmt: skip
    rows = [(f, e - made.per_atom(f), e) for f, e in experiment.items()]
    fit = fit_anion_corrections(rows)
    assert fit.values == pytest.approx({"O": -0.4, "F": -0.3}, abs=1e-6)
    assert fit.metals == pytest.approx({"Fe": -0.6, "Ni": -0.8}, abs=1e-6)
    assert fit.mae < 1e-6 and fit.loo_mae < 1e-6
    # NiO alone cannot tell the O constant from the Ni one
    with pytest.raises(UserError, match="cannot separate"):
        fit_anion_corrections([("NiO", -0.65, -1.24)])


def test_the_constant_applies_to_the_anion_only():
    correction = AnionCorrection("test", {"O": -0.7, "F": -0.4})
    assert correction.per_atom("NiO") == pytest.approx(-0.35)
    assert correction.per_atom("Fe2O3") == pytest.approx(-0.7 * 3 / 5)
    assert correction.per_atom("O2") == 0.0  # elements and their references are never corrected
    assert correction.per_atom("CuPd") == 0.0
    assert correction.anions("OF2") == ["F"]  # O is the cation there
    assert correction.correct("AgF", -0.8) == pytest.approx(-1.0)


def test_a_corrected_hull_shifts_every_phase_alike():
    correction = AnionCorrection("test", {"O": -0.6})
    raw = [HullPhase("Ni3O4", -0.70, "b"), HullPhase("NiO2", -0.50, "c")]
    corrected = [
        HullPhase(p.formula, correction.correct(p.formula, p.formation_energy_per_atom), p.source)
        for p in raw
    ]
    stable = FormationHull("espresso/demo", corrected).stability("NiO", correction.correct("NiO", -0.80))
    before = FormationHull("espresso/demo", raw).stability("NiO", -0.80)
    # Every oxide moved by -0.6 x_O, linear in composition, so the energy above the hull and
    # the decomposition are those of the raw hull: no phase is corrected differently.
    assert stable.energy_above_hull == pytest.approx(before.energy_above_hull)
    assert stable.hull_energy_per_atom == pytest.approx(before.hull_energy_per_atom - 0.30)
    assert [p.formula for p in stable.decomposition] == [p.formula for p in before.decomposition]
    # Correcting only the candidate would have moved it 0.30 eV/atom below where it is.
    mixed = FormationHull("espresso/demo", raw).stability("NiO", correction.correct("NiO", -0.80))
    assert mixed.energy_above_hull == pytest.approx(before.energy_above_hull - 0.30)


def test_a_shipped_fit_applies_only_to_its_family_and_preset(tmp_path, dft_settings):
    from crystaloop.dft.pseudos import family_from_settings

    family = family_from_settings()
    path = tmp_path / "fits.yaml"
    fit = {
        "family": family.name,
        "preset": "demo@1",
        "values": {"O": -0.6},
        "md5": {"O": family.pseudopotentials["O"].md5},
    }
    path.write_text(yaml.safe_dump({"fits": [fit]}))
    found = correction_for(family, "demo@1", path)
    assert found is not None and found.values == {"O": -0.6} and "demo@1" in found.label
    assert correction_for(family, "standard@1", path) is None
    fit["md5"] = {"O": "0" * 32}
    path.write_text(yaml.safe_dump({"fits": [fit]}))
    assert correction_for(family, "demo@1", path) is None
