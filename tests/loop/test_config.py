"""Campaign configuration: every shipped YAML validates; bad files give one line per problem."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from crystaloop.cli import app
from crystaloop.errors import ConfigError
from crystaloop.loop.config import load_campaign_config, parse_campaign_config
from crystaloop.properties import PROPERTIES


def _campaign_files(root):
    return [p for p in sorted((root / "configs").glob("*.yaml"))]


def test_every_campaign_yaml_validates(repo_root):
    files = _campaign_files(repo_root)
    assert any(p.name == "demo.yaml" for p in files)
    for path in files:
        config = load_campaign_config(path)
        assert config.targets


def test_eight_learnt_properties_and_the_derived_hull_distance_with_units():
    from crystaloop.properties import LABEL_NAMES

    assert len(LABEL_NAMES) == 8 and "energy_above_hull" not in LABEL_NAMES
    assert PROPERTIES["energy_above_hull"].derived and PROPERTIES["energy_above_hull"].unit == "eV/atom"
    assert PROPERTIES["formation_energy_per_atom"].unit == "eV/atom"
    assert PROPERTIES["bulk_modulus"].unit == "GPa"
    assert PROPERTIES["poisson_ratio"].unit == ""


def test_perovskite_example_window(repo_root):
    config = load_campaign_config(repo_root / "configs" / "perovskite_oxides.yaml")
    window = next(t for t in config.targets if t.property == "formation_energy_per_atom")
    assert (window.min, window.max) == (-3.0, -2.0)
    assert window.contains(-2.5) and not window.contains(-1.9) and not window.contains(None)
    assert config.sampling.mode == "around_base" and config.sampling.std == 0.5


def _minimal(**extra):
    base = {"name": "t", "targets": [{"property": "band_gap", "min": 1.0}]}
    base.update(extra)
    return base


@pytest.mark.parametrize(
    "data, field, needle",
    [
        (_minimal(colour="blue"), "colour", "allowed keys: name"),
        (_minimal(targets=[{"property": "band_gap", "min": 3, "max": 1}]), "targets[0]", "below max"),
        (_minimal(targets=[{"property": "gap", "min": 1}]), "targets[0].property", "allowed: formation"),
        (_minimal(targets=[{"property": "band_gap"}]), "targets[0]", "empty window"),
        (_minimal(targets=[]), "targets", "at least 1"),
        (_minimal(targets=[{"property": "band_gap", "min": -1}]), "targets[0]", "physical range"),
        (_minimal(elements={"allow": ["Qq"]}), "elements.allow", "unknown element 'Qq'"),
        (_minimal(elements={"allow": ["O"], "deny": ["O"]}), "elements", "both allowed and denied"),
        (_minimal(sampling={"mode": "around_base"}), "sampling", "needs at least 1 base_formulas"),
        (_minimal(sampling={"variance": 0.5}), "sampling.variance", "allowed keys: mode"),
        (_minimal(sampling={"around_hits": 1.0}), "sampling.around_hits", "less than 1"),
        (_minimal(dft={"engine": "vasp"}), "dft.engine", "'espresso' or 'surrogate'"),
        (_minimal(execution={"backend": "slurm"}), "execution.backend", "jobflow-remote"),
        (_minimal(material_classes=["zeolite"]), "material_classes[0]", "perovskite"),
        (_minimal(name="has space"), "name", "no spaces"),
        (_minimal(seed=-1), "seed", "greater than or equal to 0"),
        (_minimal(sampling={"seed": -3}), "sampling.seed", "greater than or equal to 0"),
        (_minimal(retrain={"hooks": ["cgcnn_fintune"]}), "retrain.hooks", "registered: cgcnn_finetune"),
        (
            _minimal(filters={"allowed_formulas": ["foo"]}),
            "filters.allowed_formulas",
            "'foo' is not a formula",
        ),
        (
            _minimal(targets=[{"property": "bulk_modulus", "min": 150}]),
            "(top level)",
            "does not compute bulk_modulus",
        ),
        (_minimal(dft={"engine": "surrogate"}), "(top level)", "surrogate engine does not compute band_gap"),
    ],
)
def test_invalid_config_lines(data, field, needle):
    with pytest.raises(ConfigError) as info:
        parse_campaign_config(data)
    lines = info.value.lines
    assert any(line.startswith(f"{field}:") and needle in line for line in lines), lines


def test_several_problems_each_get_a_line():
    data = _minimal(colour="x", targets=[{"property": "nope", "min": 1}, {"property": "band_gap"}])
    with pytest.raises(ConfigError) as info:
        parse_campaign_config(data)
    assert len(info.value.lines) == 3


def test_validate_cli_exit_codes(tmp_path, repo_root):
    runner = CliRunner()
    ok = runner.invoke(app, ["campaign", "validate", str(repo_root / "configs" / "demo.yaml")])
    assert ok.exit_code == 0 and "demo" in ok.output

    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump(_minimal(colour="x", targets=[{"property": "band_gap", "min": 2, "max": 1}]))
    )
    import subprocess
    import sys
    from pathlib import Path

    from crystaloop.cli import main

    exe = Path(sys.executable).parent / "crystaloop"
    result = subprocess.run([str(exe), "campaign", "validate", str(bad)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "colour: unknown key" in result.stderr
    assert "targets[0]: min (2.0) must be below max (1.0)" in result.stderr
    assert callable(main)


@pytest.mark.parametrize(
    "content, needle", [("name: [unclosed", "invalid YAML at line"), ("- a\n- b\n", "mapping")]
)
def test_unreadable_yaml(tmp_path, content, needle):
    path = tmp_path / "c.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=needle):
        load_campaign_config(path)


def test_a_file_that_is_not_utf8_is_one_clear_error(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="save it as a UTF-8 text file"):
        load_campaign_config(path)


def test_training_and_settings_files_that_are_not_utf8_are_one_clear_error(tmp_path, monkeypatch):
    from crystaloop.generative.train.config import load_train_config
    from crystaloop.settings import CrystaloopSettings

    path = tmp_path / "latin1.yaml"
    path.write_bytes("kind: unet\nname: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="training config .* save it as a UTF-8 text file"):
        load_train_config(path, "unet")
    monkeypatch.setenv("CRYSTALOOP_SETTINGS_FILE", str(path))
    with pytest.raises(ConfigError, match="settings file .* save it as a UTF-8 text file"):
        CrystaloopSettings()


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_campaign_config(tmp_path / "none.yaml")


def test_reference_structures_in_the_campaign_file_are_checked(tmp_path, monkeypatch):
    from pymatgen.core import Lattice, Structure

    monkeypatch.chdir(tmp_path)
    Structure(Lattice.cubic(3.0), ["Mn"], [[0, 0, 0]]).to(filename="Mn.cif")
    Structure(Lattice.cubic(3.0), ["Fe", "Mn"], [[0, 0, 0], [0.5] * 3]).to(filename="FeMn.cif")
    base = {"name": "refs", "targets": [{"property": "formation_energy_per_atom", "max": 0.0}]}
    config = parse_campaign_config({**base, "dft": {"reference_structures": {"Mn": "Mn.cif"}}})
    assert config.dft.reference_structures == {"Mn": str(tmp_path / "Mn.cif")}
    assert len(config.dft.reference_structure_objects()["Mn"]) == 1
    for given, message in (
        ({"Mn": "missing.cif"}, "Mn: no file missing.cif"),
        ({"Mn": "FeMn.cif"}, "Mn: FeMn.cif holds Fe, Mn, not Mn alone"),
        ({"Xx": "Mn.cif"}, "'Xx' is not an element symbol"),
    ):
        with pytest.raises(ConfigError) as info:
            parse_campaign_config({**base, "dft": {"reference_structures": given}})
        assert any(
            line.startswith("dft.reference_structures:") and message in line for line in info.value.lines
        )


def test_one_probability_of_a_window_for_the_cascade_and_the_acquisition():
    from crystaloop.loop.config import TargetWindow

    two_sided = TargetWindow(property="band_gap", min=1.0, max=3.0)
    assert two_sided.probability(2.0, 1.0) == pytest.approx(0.682689, abs=1e-6)
    assert TargetWindow(property="energy_above_hull", max=0.0).probability(0.0, 0.2) == pytest.approx(0.5)
    assert two_sided.probability(2.0, 0.0) == 1.0 and two_sided.probability(4.0, 0.0) == 0.0
    assert two_sided.probability(float("nan"), 1.0) == 0.0 and two_sided.probability(None, 1.0) == 0.0
