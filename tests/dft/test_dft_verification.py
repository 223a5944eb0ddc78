"""Verification against all-electron PBE: EOS fit, ACWF metrics, verdicts, campaign refusals.

The verify command is replayed from real pw.x outputs for Be (``be_verify``, recorded by
``make_references.py be_verify``): the structural check (bcc - fcc) and a 7-point EOS.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from crystaloop.cli import app
from crystaloop.dft.pseudos import PseudoEntry, PseudoFamily, load_family
from crystaloop.dft.verification import (
    acwf_references,
    birch_murnaghan,
    campaign_dft_problems,
    eos_volumes,
    epsilon_metric,
    fit_birch_murnaghan,
    nu_metric,
    prototype_structure,
)
from crystaloop.errors import UserError
from crystaloop.settings import get_settings

HERE = Path(__file__).resolve().parent


def test_birch_murnaghan_fit_recovers_its_parameters():
    volumes = eos_volumes(16.0)
    assert len(volumes) == 7 and volumes[0] == pytest.approx(16.0 * 0.94)
    energies = birch_murnaghan(volumes, -3.0, 16.2, 0.8, 4.6)
    e0, v0, b0, b1 = fit_birch_murnaghan(volumes, energies)
    assert (e0, v0, b0, b1) == pytest.approx((-3.0, 16.2, 0.8, 4.6), rel=1e-6)


def test_acwf_metrics():
    ref = (16.0, 0.8, 4.6)
    assert nu_metric(ref, ref) == 0.0 and epsilon_metric(ref, ref) == pytest.approx(0.0, abs=1e-9)
    # ν is 100 x the relative V0 error when B0 and B1 agree.
    assert nu_metric((16.16, 0.8, 4.6), ref) == pytest.approx(100 * 0.16 / 16.08, rel=1e-6)
    assert epsilon_metric((16.16, 0.8, 4.6), ref) > epsilon_metric((16.05, 0.8, 4.6), ref) > 0


def test_shipped_all_electron_data():
    refs = acwf_references()
    pd = refs["Pd"]
    assert (pd.verify.prototype, pd.polymorph.prototype) == ("FCC", "BCC")
    assert pd.structural_energy == pytest.approx(0.0512, abs=1e-4)  # FLEUR bcc - fcc, eV/atom
    assert refs["Cu"].structural_energy == pytest.approx(0.0366, abs=1e-4)
    diamond = prototype_structure("Si", "Diamond", refs["Si"].verify.v0)
    assert len(diamond) == 2 and diamond.volume == pytest.approx(refs["Si"].verify.v0)


def _family(tmp_path, verdicts: dict[str, str]) -> PseudoFamily:
    base = load_family(HERE / "data" / "family.yaml")
    entries = {
        el: entry.model_copy(update={"verdict": verdicts.get(el, "unverified")})
        for el, entry in base.pseudopotentials.items()
    }
    entries["Pd"] = PseudoEntry(
        filename="Pd.pbe-paw_kj.UPF", md5="0" * 32, ecutwfc=35.0, ecutrho=280.0, verdict="failed"
    )
    return base.model_copy(update={"pseudopotentials": entries, "pseudo_dir": tmp_path})


def test_campaign_refuses_unverified_elements_and_warns_on_low_cutoffs(tmp_path):
    family = _family(tmp_path, {"Cu": "verified", "C": "verified"})
    warnings, refusals = campaign_dft_problems(["Cu", "Pd", "Si", "C"], preset="fast", family=family)
    assert len(refusals) == 1
    assert "Pd (failed), Si (unverified)" in refusals[0] and "--allow-unverified" in refusals[0]
    assert len(warnings) == 1 and "below the family's suggestion for C (40/320), Cu (50/400)" in warnings[0]
    warnings, refusals = campaign_dft_problems(
        ["Cu", "Pd"], preset="standard", family=family, allow_unverified=True
    )
    assert refusals == [] and len(warnings) == 1 and "Pd (failed)" in warnings[0]
    _, refusals = campaign_dft_problems(["Cu", "Zr"], preset="demo", family=family)
    assert refusals and "no pseudopotential for Zr" in refusals[0]
    assert campaign_dft_problems(["Cu", "C"], preset="demo", family=family) == ([], [])


@pytest.fixture
def be_settings(settings, monkeypatch, tmp_path):
    """A family holding the Be file of the recorded run (the fake pw.x needs no UPF)."""
    pw_in = (HERE / "reference" / "be_verify" / "attempt_0" / "pw.in").read_text()
    ecutwfc = float(next(ln for ln in pw_in.splitlines() if "ecutwfc" in ln).split("=")[1])
    ecutrho = float(next(ln for ln in pw_in.splitlines() if "ecutrho" in ln).split("=")[1])
    pseudo_dir = tmp_path / "pseudo"
    pseudo_dir.mkdir()
    family = {
        "name": "be-only",
        "pseudopotentials": {
            "Be": {"filename": "Be.pbe-paw_kj.UPF", "md5": "0" * 32, "ecutwfc": ecutwfc, "ecutrho": ecutrho}
        },
    }
    (pseudo_dir / "family.yaml").write_text(yaml.safe_dump(family))
    monkeypatch.setenv("CRYSTALOOP_PSEUDO_DIR", str(pseudo_dir))
    get_settings.cache_clear()
    yield pseudo_dir
    get_settings.cache_clear()


@pytest.mark.skipif(not (HERE / "reference" / "be_verify").is_dir(), reason="no recorded Be runs")
def test_verify_command_replays_real_be_runs(fake_pw, be_settings, tmp_path):
    runs = sorted((HERE / "reference" / "be_verify").iterdir())
    fake = fake_pw({"direct": "be_verify"})
    out = tmp_path / "be.json"
    result = CliRunner().invoke(
        app, ["dft", "pseudos", "verify", "--elements", "Be", "--output", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert len(fake.calls) == len(runs) == 9  # bcc + fcc, then 7 volumes
    row = json.loads(out.read_text())["elements"][0]
    assert row["check"] == "BCC-FCC" and len(row["volumes_a3"]) == 7
    assert row["dE_ae_ev"] == pytest.approx(0.0192, abs=1e-4)
    assert np.ptp(row["volumes_a3"]) == pytest.approx(0.12 * 7.8705, rel=1e-3)
    assert row["nu"] is not None and row["epsilon"] is not None
    stored = load_family(be_settings / "family.yaml").pseudopotentials["Be"]
    assert stored.verdict == row["verdict"] and stored.verification["nu"] == pytest.approx(row["nu"], abs=1e-3)
    assert "Be" in result.output and row["verdict"] in result.output


def test_verify_refuses_a_short_eos(be_settings):
    result = CliRunner().invoke(app, ["dft", "pseudos", "verify", "--elements", "Be", "--points", "5"])
    # crystaloop's main() turns a UserError into one line and exit code 2.
    assert isinstance(result.exception, UserError) and "at least 7 volumes" in str(result.exception)


@pytest.mark.skipif(not (HERE / "reference" / "be_verify").is_dir(), reason="no recorded Be runs")
def test_no_eos_verify_keeps_a_failed_eos_verdict_and_its_numbers(fake_pw, be_settings):
    family_path = be_settings / "family.yaml"
    data = yaml.safe_load(family_path.read_text())
    data["pseudopotentials"]["Be"]["verdict"] = "failed"
    data["pseudopotentials"]["Be"]["verification"] = {
        "verdict": "failed", "nu": 1.733, "epsilon": 0.9, "v0_a3": 8.1, "reasons": ["EOS fit: stale"],
    }
    family_path.write_text(yaml.safe_dump(data))
    fake = fake_pw({"direct": "be_verify"})
    result = CliRunner().invoke(
        app, ["dft", "pseudos", "verify", "--elements", "Be", "--no-eos", "--format", "json"]
    )
    assert result.exit_code == 0, result.output
    assert len(fake.calls) == 2  # bcc + fcc only
    assert json.loads(result.output)["elements"][0]["verdict"] == "failed"
    stored = load_family(family_path).pseudopotentials["Be"]
    assert stored.verdict == "failed"
    numbers = stored.verification
    assert numbers["nu"] == 1.733 and numbers["epsilon"] == 0.9 and numbers["v0_a3"] == 8.1
    assert numbers["structural_energy_ae_ev"] == pytest.approx(0.0192, abs=1e-4)
    assert numbers["reasons"] == ["EOS fit: stale"] and numbers["verdict"] == "failed"


def test_structural_check_alone_weighs_the_stored_eos_numbers():
    from crystaloop.dft.verification import ElementVerification, merged_verification

    good = ElementVerification("Cu", "FCC", "BCC", structural_energy=0.04, structural_energy_ae=0.0366)
    assert good.verdict == "verified"
    # Stored ν 1.5 (marginal): the merged verdict is marginal even though the stored one was verified.
    verdict, block = merged_verification(good, "verified", {"nu": 1.5, "epsilon": 0.1})
    assert verdict == "marginal" and block["nu"] == 1.5 and block["structural_energy_ev"] == 0.04
    # Nothing stored: the structural verdict stands.
    assert merged_verification(good)[0] == "verified"
    # A full run replaces the stored numbers.
    full = ElementVerification("Cu", "FCC", "BCC", structural_energy=0.04, structural_energy_ae=0.0366,
                               nu=0.2, epsilon=0.1, eos_checked=True)
    verdict, block = merged_verification(full, "failed", {"nu": 1.733, "v0_a3": 12.0})
    assert verdict == "verified" and block["nu"] == 0.2 and "v0_a3" not in block
