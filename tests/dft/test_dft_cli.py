"""`crystaloop dft` commands."""

from __future__ import annotations

import yaml
from typer.testing import CliRunner

from crystaloop.cli import app
from crystaloop.dft.references import bulk_structure

runner = CliRunner()


def test_relax_prints_the_result_table_and_status_lists_it(fake_pw, fake_settings, tmp_path):
    fake_pw({"qe relax": "si_relax", "qe element reference Si": "si_relax"})
    poscar = tmp_path / "Si.vasp"
    bulk_structure("Si", "diamond", 5.431).to(filename=str(poscar))
    result = runner.invoke(app, ["dft", "relax", str(poscar), "--preset", "fast"])
    assert result.exit_code == 0, result.output
    assert "Si: successful (engine: espresso)" in result.output
    assert "-138.73" in result.output and "0.0000" in result.output
    status = runner.invoke(app, ["dft", "status"])
    assert status.exit_code == 0
    assert "successful: 2" in status.output


def test_relax_rejects_bad_input_with_one_line(fake_settings, tmp_path):
    missing = runner.invoke(app, ["dft", "relax", str(tmp_path / "none.cif")])
    assert missing.exit_code != 0 and "does not exist" in str(missing.exception)
    cif = tmp_path / "zr.cif"
    bulk_structure("Zr", "fcc", 4.5).to(filename=str(cif))
    lacking = runner.invoke(app, ["dft", "relax", str(cif)])
    assert "no file for Zr" in str(lacking.exception)
    backend = runner.invoke(app, ["dft", "relax", str(cif), "--backend", "slurm"])
    assert "unknown backend" in str(backend.exception)


def test_remote_config_writes_a_project(fake_settings, tmp_path):
    result = runner.invoke(
        app, ["dft", "remote-config", "--scheduler", "pbs", "--out", str(tmp_path), "--name", "cl"]
    )
    assert result.exit_code == 0, result.output
    config = yaml.safe_load((tmp_path / "cl.yaml").read_text())
    assert config["workers"]["pbs_worker"]["scheduler_type"] == "pbs"
