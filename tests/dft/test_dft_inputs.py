"""Presets, overrides, spin and the written pw.x input."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest
import yaml
from ase.io.espresso import read_fortran_namelist
from pymatgen.core import Lattice, Structure

from crystaloop.dft.espresso.inputs import available_presets, build_pw_input, load_preset
from crystaloop.dft.pseudos import load_family
from crystaloop.dft.references import bulk_structure
from crystaloop.errors import UserError

FAKE_FAMILY = Path(__file__).parent / "data" / "family.yaml"
PRESETS = Path(str(resources.files("crystaloop.dft.espresso") / "presets"))


@pytest.fixture
def family():
    return load_family(FAKE_FAMILY)


def test_standard_preset_follows_the_paper():
    preset = load_preset("standard")
    control = preset.input_data["control"]
    assert control["calculation"] == "vc-relax"
    assert control["etot_conv_thr"] == 1e-4
    assert control["forc_conv_thr"] == 1e-3
    assert preset.input_data["system"]["smearing"] == "gaussian"
    assert preset.ecutwfc is None and preset.label == "standard@1"
    assert {"fast", "standard"} <= set(available_presets())


def test_overrides_merge_into_a_copy():
    preset = load_preset("fast")
    before = preset.model_dump()
    changed = preset.with_overrides(
        {"input_data": {"system": {"vdw_corr": "grimme-d2"}}, "kpoint_density": 50}
    )
    assert changed.input_data["system"]["vdw_corr"] == "grimme-d2"
    assert changed.input_data["system"]["smearing"] == "gaussian"
    assert changed.kpoint_density == 50
    assert preset.model_dump() == before
    assert load_preset("fast").model_dump() == before


def test_bad_override_and_unknown_preset_are_user_errors():
    with pytest.raises(UserError, match="kpoint_density"):
        load_preset("fast", {"kpoint_density": -1})
    with pytest.raises(UserError, match="unknown preset"):
        load_preset("ultra")


def test_input_uses_family_cutoffs_kgrid_and_pseudos(family, tmp_path):
    sic = bulk_structure("Si", "diamond", 4.36)
    sic.replace(1, "C")
    pw_input = build_pw_input(sic, load_preset("standard"), family)
    assert pw_input.input_data["system"]["ecutwfc"] == 45.0
    assert pw_input.input_data["system"]["ecutrho"] == 360.0
    path = pw_input.write(tmp_path)
    with path.open() as fh:
        namelist, cards = read_fortran_namelist(fh)
    assert namelist["control"]["calculation"] == "vc-relax"
    assert namelist["system"]["nat"] == 2
    assert "nspin" not in namelist["system"]
    species = " ".join(cards)
    assert "Si.pbe-nl-rrkjus_psl.1.0.0.UPF" in species and "C.pbe-paw_kj.UPF" in species
    assert pw_input.kpts[0] >= 7
    fast = build_pw_input(sic, load_preset("fast"), family)
    assert fast.input_data["system"]["ecutwfc"] == 25.0
    assert fast.kpts[0] < pw_input.kpts[0]


def test_magnetic_elements_switch_spin_on(tmp_path):
    fe = bulk_structure("Fe", "bcc", 2.87)
    family = load_family(FAKE_FAMILY).model_copy(deep=True)
    family.pseudopotentials["Fe"] = family.pseudopotentials["Cu"].model_copy(
        update={"filename": "Fe.pbe-paw_kj.UPF"}
    )
    pw_input = build_pw_input(fe, load_preset("fast"), family)
    with pw_input.write(tmp_path).open() as fh:
        namelist, _ = read_fortran_namelist(fh)
    assert namelist["system"]["nspin"] == 2
    assert namelist["system"]["starting_magnetization(1)"] == pytest.approx(0.4)
    off = build_pw_input(fe, load_preset("fast", {"spin_polarization": "off"}), family)
    assert "nspin" not in off.input_data["system"]
    si = Structure(Lattice.cubic(5.43), ["Si"], [[0, 0, 0]])
    assert "nspin" not in build_pw_input(si, load_preset("fast"), load_family(FAKE_FAMILY)).input_data["system"]


def test_magmom_site_property_does_not_switch_spin_on(family, tmp_path):
    """A CHGNet-relaxed structure carries ``magmom``; the preset, not that property, sets nspin."""
    sic = bulk_structure("Si", "diamond", 4.36)
    sic.replace(1, "C")
    sic.add_site_property("magmom", [0.03, 0.09])
    with build_pw_input(sic, load_preset("demo"), family).write(tmp_path).open() as fh:
        namelist, cards = read_fortran_namelist(fh)
    assert "nspin" not in namelist["system"]
    assert namelist["system"]["ntyp"] == 2
    assert not any(line.split()[0] in {"Si1", "C1"} for line in cards if line.split())


def test_static_input_drops_relaxation_namelists(family):
    si = bulk_structure("Si", "diamond", 5.43)
    preset = load_preset("fast", {"input_data": {"control": {"calculation": "scf"}}})
    data = build_pw_input(si, preset, family).input_data
    assert "ions" not in data and "cell" not in data


def test_namelist_cutoff_overrides_are_refused_with_the_supported_one(family, tmp_path):
    with pytest.raises(UserError, match=r"input_data.system.ecutwfc.*top-level 'ecutwfc'"):
        load_preset("fast", {"input_data": {"system": {"ecutwfc": 60}}})
    with pytest.raises(UserError, match=r"input_data.system.ecutrho.*top-level 'ecutrho'"):
        load_preset("demo", {"input_data": {"system": {"ecutrho": 600}}})
    custom = tmp_path / "mine.yaml"
    data = yaml.safe_load((PRESETS / "fast.yaml").read_text())
    data["input_data"].setdefault("system", {})["ecutwfc"] = 60
    custom.write_text(yaml.safe_dump(data))
    with pytest.raises(UserError, match="in the preset YAML"):
        load_preset(custom)
    # The supported override reaches pw.x.
    preset = load_preset("fast", {"ecutwfc": 60, "ecutrho": 480})
    pw_input = build_pw_input(bulk_structure("Si", "diamond", 5.431), preset, family)
    assert pw_input.cutoffs == (60.0, 480.0)


def test_a_custom_preset_reusing_a_shipped_label_gets_its_own_key(tmp_path):
    from crystaloop.dft.espresso.jobs import preset_key

    data = yaml.safe_load((PRESETS / "fast.yaml").read_text())
    same = tmp_path / "same.yaml"
    same.write_text(yaml.safe_dump({**data, "description": "my copy"}))
    denser = tmp_path / "denser.yaml"
    denser.write_text(yaml.safe_dump({**data, "kpoint_density": 2 * data["kpoint_density"]}))
    assert load_preset(denser).label == "fast@1"
    # Shipped presets keep their bare labels, so existing caches stay valid.
    assert preset_key("fast", {}) == "fast@1" and preset_key(str(same), {}) == "fast@1"
    key = preset_key(str(denser), {})
    assert key.startswith("fast@1~") and key != preset_key("fast", {})
    assert preset_key(str(denser), {"kpoint_density": 3}).startswith(f"{key}+")
