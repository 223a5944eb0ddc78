"""Pseudopotential families: headers, re-wrapping, cutoffs, missing elements, the local build."""

from __future__ import annotations

from pathlib import Path

import pytest
from pymatgen.core import Lattice, Structure

from crystaloop.dft.pseudos import (
    MAX_UPF_LINE,
    load_family,
    md5sum,
    read_upf_header,
    rewrap_long_lines,
    suggested_cutoffs,
)
from crystaloop.errors import UserError

V2_HEADER = """<UPF version="2.0.1">
  <PP_HEADER generated="x" element="Pd" pseudo_type="PAW" relativistic="scalar"
    has_so="false" functional=" SLA  PW   PBX  PBC" z_valence="10.0"
    wfc_cutoff="33.689107937216399" rho_cutoff="134.75643174886559"/>
</UPF>"""
V1_HEADER = """<PP_HEADER>
   0                   Version Number
  Rh                   Element
   US                  Ultrasoft pseudopotential
SLA  PW   PBE  PBE     PBE  Exchange-Correlation functional
  0.0000000  0.0000000 Suggested cutoff for wfc and rho
</PP_HEADER>"""
FAKE_FAMILY = Path(__file__).parent / "data" / "family.yaml"


def test_reads_v2_and_v1_headers():
    v2 = read_upf_header(V2_HEADER)
    assert (v2.element, v2.pseudo_type, v2.is_pbe, v2.has_so) == ("Pd", "PAW", True, False)
    assert v2.wfc_cutoff == pytest.approx(33.689107937216399)
    v1 = read_upf_header(V1_HEADER)
    assert (v1.element, v1.pseudo_type, v1.is_pbe, v1.wfc_cutoff) == ("Rh", "US", True, 0.0)


def test_cutoff_policy_rounds_up_and_applies_dual():
    assert suggested_cutoffs(read_upf_header(V2_HEADER)) == (35.0, 280.0)
    assert suggested_cutoffs(read_upf_header(V1_HEADER)) == (45.0, 360.0)


def test_rewrap_keeps_numbers_and_shortens_lines(tmp_path):
    numbers = [f"{i * 1.234567e-3:.15E}" for i in range(400)]
    long_line = "   " + "   ".join(numbers)
    assert len(long_line) > 4000
    path = tmp_path / "x.UPF"
    path.write_text(f'<PP_R type="real" size="400">\n{long_line}\n</PP_R>\n<PP_INFO> text </PP_INFO>\n')
    assert rewrap_long_lines(path) == 1
    text = path.read_text()
    assert max(len(line) for line in text.splitlines()) <= MAX_UPF_LINE
    body = text.split(">", 1)[1].split("</PP_R>")[0]
    assert body.split() == numbers
    assert "<PP_INFO> text </PP_INFO>" in text


def test_family_cutoffs_are_the_maximum_and_missing_elements_are_listed():
    family = load_family(FAKE_FAMILY)
    sic = Structure(Lattice.cubic(4.36), ["Si", "C"], [[0, 0, 0], [0.25, 0.25, 0.25]])
    assert family.cutoffs_for(sic) == (45.0, 360.0)
    assert family.pseudopotentials_for(sic) == {
        "Si": "Si.pbe-nl-rrkjus_psl.1.0.0.UPF",
        "C": "C.pbe-paw_kj.UPF",
    }
    bad = Structure(Lattice.cubic(4.0), ["Si", "Zr", "Xe"], [[0, 0, 0], [0.5, 0.5, 0.5], [0, 0.5, 0]])
    with pytest.raises(UserError, match="no file for Xe, Zr"):
        family.require(bad)


def test_missing_family_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="build-local"):
        load_family(tmp_path / "nope.yaml")
    broken = tmp_path / "family.yaml"
    broken.write_text("name: x\npseudopotentials: {Si: {filename: a}}\n")
    with pytest.raises(UserError, match="invalid"):
        load_family(broken)


def test_local_family_is_real_pbe_and_readable(local_family):
    family = load_family(local_family / "family.yaml")
    assert {"H", "C", "N", "O", "Si", "Fe", "Cu", "Pd", "Ag", "As", "Ga"} <= set(family.elements)
    assert family.functional == "PBE"
    for element, entry in family.pseudopotentials.items():
        path = local_family / entry.filename
        assert md5sum(path) == entry.md5, element
        assert read_upf_header(path.read_text()).is_pbe, element
        assert max(len(line) for line in path.read_text().splitlines()) <= MAX_UPF_LINE
        assert entry.ecutrho >= 4 * entry.ecutwfc
    # Pd and Cu come from crystaloop's own ld1.x inputs (pslibrary), not QE's stock ones, and
    # carry the shipped verdicts.
    pd, cu = family.pseudopotentials["Pd"], family.pseudopotentials["Cu"]
    assert (pd.source, pd.filename) == ("ld1.x (crystaloop input)", "Pd.pbe-n-kjpaw_psl.0.3.0.UPF")
    assert cu.filename == "Cu.pbe-dn-kjpaw_psl.0.2.UPF"
    assert pd.verdict == "verified" and pd.verification["structural_energy_ev"] == pytest.approx(0.057, abs=0.01)
    assert (cu.verdict, family.pseudopotentials["Si"].verdict) == ("failed", "verified")


def test_a_file_failing_the_structural_check_is_left_out():
    from crystaloop.dft.pseudos import _fails_structural_check

    stock_pd = {"verification": {"structural_energy_ev": 0.578, "structural_energy_ae_ev": 0.051}}
    cu = {"verification": {"structural_energy_ev": 0.044, "structural_energy_ae_ev": 0.0366}}
    assert _fails_structural_check(stock_pd) and not _fails_structural_check(cu)


def test_unreadable_cutoff_raises_naming_file_and_field():
    broken = V2_HEADER.replace('wfc_cutoff="33.689107937216399"', 'wfc_cutoff="3x.6"')
    with pytest.raises(UserError, match=r"Pd\.broken\.UPF: UPF header field wfc_cutoff = '3x\.6'"):
        read_upf_header(broken, "Pd.broken.UPF")
    broken_v1 = V1_HEADER.replace("0.0000000  0.0000000 Suggested", "abc  0.0000000 Suggested")
    with pytest.raises(UserError, match=r"Rh\.UPF: .*Suggested cutoff \(wfc\)"):
        read_upf_header(broken_v1, "Rh.UPF")


def test_absent_cutoff_means_no_suggestion():
    header = read_upf_header(V2_HEADER.replace('rho_cutoff="134.75643174886559"', ""))
    assert header.rho_cutoff == 0.0 and header.wfc_cutoff > 0


def test_relative_pseudo_dirs_become_absolute(tmp_path, monkeypatch, settings):
    import yaml

    from crystaloop.dft.espresso.inputs import build_pw_input, load_preset
    from crystaloop.dft.pseudos import family_from_settings
    from crystaloop.dft.references import bulk_structure
    from crystaloop.settings import get_settings

    # A YAML's relative pseudo_dir is read against the YAML's folder, not the working directory.
    folder = tmp_path / "families"
    folder.mkdir()
    data = yaml.safe_load(FAKE_FAMILY.read_text())
    (folder / "family.yaml").write_text(yaml.safe_dump({**data, "pseudo_dir": "upf"}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert load_family(folder / "family.yaml").pseudo_dir == folder / "upf"
    # A relative CRYSTALOOP_PSEUDO_DIR is read against the working directory, once, here.
    (elsewhere / "pseudo").mkdir()
    (elsewhere / "pseudo" / "family.yaml").write_text(FAKE_FAMILY.read_text())
    monkeypatch.setenv("CRYSTALOOP_PSEUDO_DIR", "pseudo")
    get_settings.cache_clear()
    family = family_from_settings()
    assert family.pseudo_dir == elsewhere / "pseudo" and family.pseudo_dir.is_absolute()
    pw_input = build_pw_input(bulk_structure("Si", "diamond", 5.431), load_preset("fast"), family)
    assert pw_input.input_data["control"]["pseudo_dir"] == str(elsewhere / "pseudo")
    get_settings.cache_clear()
