"""`crystaloop dft` commands."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from crystaloop.cli import app
from crystaloop.dft.espresso.parse import parse_pw_output
from crystaloop.dft.references import bulk_structure

REFERENCE = Path(__file__).parent / "reference"

runner = CliRunner()


def test_relax_prints_the_result_table_and_status_lists_it(fake_pw, fake_settings, tmp_path):
    fake_pw(
        {"qe relax": "sic_relax", "qe element reference Si": "si_relax", "qe element reference C": "c_relax"}
    )
    poscar = tmp_path / "SiC.vasp"
    sic = bulk_structure("Si", "diamond", 4.36)
    sic.replace(1, "C")
    sic.to(filename=str(poscar))
    result = runner.invoke(app, ["dft", "relax", str(poscar), "--preset", "fast"])
    assert result.exit_code == 0, result.output
    assert "SiC: successful (engine: espresso)" in result.output
    # E_f = E(SiC)/2 - (E(Si)/2 + E(C)/2) / 2 from the three replayed pw.x runs (eV/atom):
    # -194.60684 - (-138.73323 - 249.79714) / 2 = -0.34166. PBE puts zinc-blende SiC a few
    # tenths of an eV/atom below Si + diamond.
    energies = {
        case: parse_pw_output(REFERENCE / case / "attempt_0" / "pw.out.gz").energy / 2
        for case in ("sic_relax", "si_relax", "c_relax")
    }
    expected = energies["sic_relax"] - (energies["si_relax"] + energies["c_relax"]) / 2
    assert expected == pytest.approx(-0.3417, abs=1e-4)
    row = re.search(r"formation energy \(eV/atom\)\s*\S\s*(-?\d+\.\d+)", result.output)
    assert row is not None, result.output
    assert float(row.group(1)) == pytest.approx(expected, abs=1e-4)
    assert f"{energies['sic_relax']:.4f}" in result.output
    status = runner.invoke(app, ["dft", "status"])
    assert status.exit_code == 0
    assert "successful: 3" in status.output


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
        app,
        ["dft", "remote-config", "--scheduler", "pbs", "--out", str(tmp_path), "--name", "cl",
         "--partition", "short", "--account", "mat1", "--walltime", "1-00:00:00", "--pre-run", "module load qe"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    config = yaml.safe_load((tmp_path / "cl.yaml").read_text())
    worker = config["workers"]["pbs"]
    assert worker["scheduler_type"] == "pbs" and worker["pre_run"] == "module load qe"
    assert worker["resources"] == {"queue": "short", "account": "mat1", "walltime": "1-00:00:00"}
    bad = runner.invoke(app, ["dft", "remote-config", "--out", str(tmp_path / "x"), "--walltime", "2 hours"])
    assert "walltime" in str(bad.exception)  # a UserError: one line, exit 2 under `crystaloop`
    # A second run keeps the user's file unless told to replace it; a name must be a file name.
    (tmp_path / "cl.yaml").write_text("# hand edits\n")
    again = runner.invoke(app, ["dft", "remote-config", "--out", str(tmp_path), "--name", "cl"])
    assert "--force" in str(again.exception) and (tmp_path / "cl.yaml").read_text() == "# hand edits\n"
    forced = runner.invoke(app, ["dft", "remote-config", "--out", str(tmp_path), "--name", "cl", "--force"])
    assert forced.exit_code == 0 and "workers" in yaml.safe_load((tmp_path / "cl.yaml").read_text())
    nameless = runner.invoke(app, ["dft", "remote-config", "--out", str(tmp_path), "--name", "a/b"])
    assert "--name" in str(nameless.exception)


def test_relax_refuses_a_folder_a_disordered_cif_and_a_missing_pwx(fake_settings, tmp_path, monkeypatch):
    from pymatgen.core import Lattice, Structure

    from crystaloop.dft.records import tasks_by_state
    from crystaloop.errors import UserError
    from crystaloop.settings import get_settings

    folder = runner.invoke(app, ["dft", "relax", str(tmp_path)])
    # crystaloop's main() turns a UserError into one line and exit code 2.
    assert isinstance(folder.exception, UserError) and folder.exception.exit_code == 2
    assert "is a folder" in str(folder.exception)
    cif = tmp_path / "sic_disordered.cif"
    Structure(Lattice.cubic(4.36), [{"Si": 0.5, "C": 0.5}], [[0, 0, 0]]).to(filename=str(cif))
    disordered = runner.invoke(app, ["dft", "relax", str(cif)])
    assert isinstance(disordered.exception, UserError) and "partially occupied" in str(disordered.exception)
    poscar = tmp_path / "Si.vasp"
    bulk_structure("Si", "diamond", 5.43).to(filename=str(poscar))
    monkeypatch.setenv("CRYSTALOOP_PW_COMMAND", str(tmp_path / "no-such" / "pw.x"))
    get_settings.cache_clear()
    no_pwx = runner.invoke(app, ["dft", "relax", str(poscar), "--no-formation-energy"])
    assert isinstance(no_pwx.exception, UserError) and "not found on PATH" in str(no_pwx.exception)
    assert "CRYSTALOOP_PW_COMMAND" in str(no_pwx.exception)
    assert tasks_by_state() == {}  # nothing was run or stored


def test_sigterm_raises_inside_the_cli_guard():
    import os
    import signal
    import time

    from crystaloop.cli._common import sigterm_raises

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exc, sigterm_raises():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts this
    assert exc.value.code == 143
    assert signal.getsignal(signal.SIGTERM) is before


def test_output_folders_under_a_file_are_one_line_errors(fake_settings, tmp_path):
    from crystaloop.errors import UserError

    blocker = tmp_path / "a-file"
    blocker.write_text("keep me\n")
    remote = runner.invoke(app, ["dft", "remote-config", "--out", str(blocker / "projects")])
    assert isinstance(remote.exception, UserError) and remote.exception.exit_code == 2
    assert f"cannot write {blocker / 'projects' / 'crystaloop.yaml'}" in str(remote.exception)
    local = runner.invoke(app, ["dft", "pseudos", "build-local", "--no-ld1", "--dest", str(blocker / "pseudo")])
    assert isinstance(local.exception, UserError) and local.exception.exit_code == 2
    assert f"cannot create the family folder {blocker / 'pseudo'}" in str(local.exception)
    assert blocker.read_text() == "keep me\n"


def test_fireworks_config_writes_the_worker_files(fake_settings, tmp_path):
    result = runner.invoke(app, ["dft", "fireworks-config", "--out", str(tmp_path), "--ping-s", "30"])
    assert result.exit_code == 0, result.output
    launchpad_file = yaml.safe_load((tmp_path / "my_launchpad.yaml").read_text())
    assert launchpad_file["name"] == fake_settings.database and launchpad_file["uri_mode"] is True
    store = yaml.safe_load((tmp_path / "jobflow.yaml").read_text())["JOB_STORE"]
    assert store["docs_store"]["collection_name"] == "jobflow_outputs"
    assert yaml.safe_load((tmp_path / "FW_config.yaml").read_text()) == {"PING_TIME_SECS": 30}
    again = runner.invoke(app, ["dft", "fireworks-config", "--out", str(tmp_path)])
    assert "--force" in str(again.exception)
