"""``crystaloop query`` output formats, CIF export and malformed filters."""

from __future__ import annotations

import csv
import io
import json

import pytest
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Lattice, Structure
from typer.testing import CliRunner

from crystaloop.cli import app
from crystaloop.db.store import CandidateStore


@pytest.fixture
def filled(database):
    store = CandidateStore(database)
    s1 = Structure(
        Lattice.cubic(3.905),
        ["Sr", "Ti", "O", "O", "O"],
        [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]],
    )
    s2 = Structure.from_spacegroup("Fm-3m", Lattice.cubic(4.212), ["Mg", "O"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    for s, ef in ((s1, -3.4), (s2, -3.0)):
        store.add(
            s,
            campaign="demo",
            round=0,
            predicted={"formation_energy_per_atom": {"mean": ef, "std": 0.05, "model_version": "t"}},
        )
    return store, {"SrTiO3": s1, "MgO": s2}


def run(*args):
    return CliRunner().invoke(app, ["query", *args])


def test_json_and_csv(filled):
    result = run("--campaign", "demo", "--format", "json", "--sort", "formation_energy_per_atom")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["formula"] for r in rows] == ["SrTiO3", "MgO"]
    assert rows[0]["pred_formation_energy_per_atom"] == -3.4
    result = run("--window", "formation_energy_per_atom:-3.2:", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [r["formula"] for r in rows] == ["MgO"]


def test_table(filled):
    result = run("--elements", "Sr,O")
    assert result.exit_code == 0
    assert "SrTiO3" in result.stdout and "MgO" not in result.stdout


def test_a_wide_table_is_not_cut_in_a_pipe(database):
    from pymatgen.core import Lattice, Structure

    campaign = "a_campaign_name_long_enough_to_widen_the_identifier_column_well_past_the_usual_width"
    structure = Structure(Lattice.cubic(3.0), ["Cu", "Pd"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    values = {p: {"mean": 1.0, "std": 0.1} for p in ("band_gap", "bulk_modulus", "shear_modulus")}
    cid, _ = CandidateStore(database).add(structure, campaign=campaign, round=0, predicted=values)
    windows = [a for p in values for a in ("--window", f"{p}:0:")]
    result = run("--campaign", campaign, *windows)
    assert result.exit_code == 0, result.output
    assert "…" not in result.stdout and cid in result.stdout


def test_cif_export_into_a_folder_that_cannot_be_written_is_one_line(filled):
    from crystaloop.errors import UserError

    result = run("--campaign", "demo", "--export-cif", "/proc", "--format", "json")
    assert isinstance(result.exception, UserError) and result.exception.exit_code == 2
    assert "--export-cif /proc: cannot write" in str(result.exception)


def test_cif_export_round_trip(filled, tmp_path):
    _, originals = filled
    out = tmp_path / "cifs"
    result = run("--campaign", "demo", "--export-cif", str(out), "--format", "json")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)) == 2  # the "wrote ... CIF" note goes to stderr
    assert "wrote 2 CIF file(s)" in result.stderr
    files = sorted(out.glob("*.cif"))
    assert len(files) == 2
    matcher = StructureMatcher()
    for path in files:
        read = Structure.from_file(path)
        formula = read.composition.reduced_formula
        assert matcher.fit(read, originals[formula])
        assert read.lattice.a == pytest.approx(originals[formula].lattice.a, abs=1e-4)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--window", "band_gap:1"], "PROPERTY:MIN:MAX"),
        (["--window", "gap:1:2"], "unknown property"),
        (["--window", "band_gap:a:2"], "must be numbers"),
        (["--window", "band_gap:3:1"], "swap the bounds"),
        (["--window", "band_gap::"], "at least one bound"),
        (["--elements", "Sr,Qq"], "unknown element"),
        (["--status", "done"], "not a state"),
        (["--sort", "colour"], "cannot sort"),
        (["--formula", "123"], "not a chemical formula"),
        (["--window", "band_gap:nan:"], "finite numbers"),
        (["--campaign", "no-such-campaign"], "no campaign named 'no-such-campaign'"),
        (["--window", "band_gap:[/]:1"], "'band_gap:[/]:1': bounds must be numbers"),
        (["--window", "band_gap:2:", "--window", "band_gap::3"], "--window given twice for band_gap"),
        (["--formula", "SRTIO3"], "R is not an element"),
    ],
)
def test_malformed_filters_exit_2(settings, args, needle):
    import subprocess
    import sys
    from pathlib import Path

    from crystaloop.cli import main  # noqa: F401  (main is what turns UserError into exit 2)

    exe = Path(sys.executable).parent / "crystaloop"
    result = subprocess.run([str(exe), "query", *args], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr
    assert "Traceback" not in result.stderr
