"""Error handlers, one by one on real outputs, then the retry loop with the fake pw.x.

Every output here is a real pw.x 6.7 output, unedited. The crash references are one scf of two
Cu atoms 0.3 Å apart in a 5 Å cube (``fast`` preset), which stops in ``cdiaghg`` with exit
code 57:

- ``cu_overlap_crash_message``: run with ``GFORTRAN_UNBUFFERED_PRECONNECTED=y``, so pw.x's error
  block reaches ``pw.out`` before ``MPI_ABORT`` ends the process;
- ``cu_overlap_crash``: the same run without it. gfortran's buffered standard output is lost at
  ``MPI_ABORT``, so neither ``pw.out`` nor ``pw.err`` holds the message.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
from pymatgen.core import Lattice, Structure

from crystaloop.dft.espresso.handlers import (
    IonicStepsHandler,
    KnownCrashHandler,
    ScfConvergenceHandler,
    WalltimeHandler,
    run_with_handlers,
)
from crystaloop.dft.espresso.inputs import build_pw_input, load_preset
from crystaloop.dft.espresso.parse import parse_pw_output
from crystaloop.dft.espresso.run import PwRun
from crystaloop.dft.pseudos import load_family
from crystaloop.dft.references import bulk_structure

REFERENCE = Path(__file__).parent / "reference"
FAKE_FAMILY = Path(__file__).parent / "data" / "family.yaml"


def _run(tmp_path, **kwargs) -> PwRun:
    defaults = {"command": ["pw.x"], "returncode": 0, "wall_time_s": 1.0, "timed_out": False}
    return PwRun(directory=tmp_path, **{**defaults, **kwargs})


def _text(case: str, attempt: int = 0) -> str:
    with gzip.open(REFERENCE / case / f"attempt_{attempt}" / "pw.out.gz", "rt") as fh:
        return fh.read()


def _output(tmp_path, text: str, name: str = "pw.out"):
    path = tmp_path / name
    path.write_text(text)
    return parse_pw_output(path, strict=False)


@pytest.fixture
def si_input():
    si = bulk_structure("Si", "diamond", 5.10)
    return build_pw_input(si, load_preset("fast"), load_family(FAKE_FAMILY))


def test_scf_handler_lowers_beta_adds_steps_changes_diagonalisation(tmp_path, si_input):
    text = _text("si_scf_retry")
    output = _output(tmp_path, text)
    handler = ScfConvergenceHandler()
    assert handler.check(output, _run(tmp_path, returncode=2), text)
    fix = handler.correct(si_input, output)
    electrons = fix.pw_input.input_data["electrons"]
    assert electrons["mixing_beta"] == pytest.approx(0.35)
    assert electrons["electron_maxstep"] == 160
    assert electrons["diagonalization"] == "cg"
    assert si_input.input_data["electrons"]["mixing_beta"] == 0.7
    good = _output(tmp_path, _text("si_static"), "good.out")
    assert not handler.check(good, _run(tmp_path), "")


def test_ionic_handler_restarts_from_the_last_geometry(tmp_path, si_input):
    text = _text("si_ionic_retry")
    output = _output(tmp_path, text)
    handler = IonicStepsHandler()
    assert handler.check(output, _run(tmp_path, returncode=3), text)
    fix = handler.correct(si_input, output)
    assert fix.pw_input.structure.lattice.a == pytest.approx(output.final_structure.lattice.a)
    assert fix.pw_input.structure.lattice.a != pytest.approx(si_input.structure.lattice.a)
    assert any("last geometry" in a for a in fix.actions)


def test_walltime_handler_restarts_a_killed_run(tmp_path, si_input):
    full = _text("si_ionic_retry")
    cut = full[: full.index("enthalpy new", full.index("enthalpy new") + 1)]
    output = _output(tmp_path, cut)
    handler = WalltimeHandler()
    assert handler.check(output, _run(tmp_path, returncode=None, timed_out=True), cut)
    assert handler.check(output, _run(tmp_path, returncode=-9), cut)
    assert not handler.check(output, _run(tmp_path, returncode=57), cut)
    fix = handler.correct(si_input, output)
    assert fix.pw_input.structure.lattice.a == pytest.approx(output.final_structure.lattice.a)


def test_known_crash_handler_switches_diagonalisation_until_none_left(tmp_path, si_input):
    text = _text("cu_overlap_crash_message")
    output = _output(tmp_path, text)
    assert not output.job_done and output.energy is None
    assert output.errors == ["Error in routine cdiaghg (57): S matrix not positive definite"]
    handler = KnownCrashHandler()
    assert handler.check(output, _run(tmp_path, returncode=57), text)
    first = handler.correct(si_input, output)
    assert first.pw_input.input_data["electrons"]["diagonalization"] == "cg"
    second = handler.correct(first.pw_input, output)
    assert second.pw_input.input_data["electrons"]["diagonalization"] == "ppcg"
    assert handler.correct(second.pw_input, output) is None
    assert not handler.check(output, _run(tmp_path), _text("si_static"))


def test_a_crash_whose_message_was_lost_is_not_taken_for_a_known_one(tmp_path):
    with gzip.open(REFERENCE / "cu_overlap_crash" / "attempt_0" / "pw.err.gz", "rt") as fh:
        log = _text("cu_overlap_crash") + "\n" + fh.read()
    output = _output(tmp_path, _text("cu_overlap_crash"))
    assert output.errors == [] and "MPI_ABORT" in log and "errorcode 57" in log
    assert not KnownCrashHandler().check(output, _run(tmp_path, returncode=57), log)


def _case_input(case: str, family):
    from crystaloop.dft.espresso.jobs import QERelaxMaker, QEStaticMaker, _merged_preset

    makers = {
        "si_scf_retry": (
            QEStaticMaker(overrides={"input_data": {"electrons": {"electron_maxstep": 3}}}),
            bulk_structure("Si", "diamond", 5.431),
        ),
        "si_ionic_retry": (
            QERelaxMaker(overrides={"input_data": {"control": {"nstep": 3}}}),
            bulk_structure("Si", "diamond", 5.10),
        ),
    }
    maker, structure = makers[case]
    return build_pw_input(structure, _merged_preset(maker, maker.calculation), family)


def test_loop_recovers_scf_failures(tmp_path, fake_pw, fake_settings):
    fake = fake_pw({"direct": "si_scf_retry"})
    handled = run_with_handlers(_case_input("si_scf_retry", load_family(FAKE_FAMILY)), tmp_path)
    assert handled.state == "successful"
    assert [c["handler"] for c in handled.corrections] == ["scf_convergence", "scf_convergence"]
    assert len(fake.calls) == 3
    assert (tmp_path / "pw.out.0").exists() and (tmp_path / "pw.in.1").exists()


def test_loop_recovers_exhausted_ionic_steps(tmp_path, fake_pw, fake_settings):
    fake_pw({"direct": "si_ionic_retry"})
    handled = run_with_handlers(_case_input("si_ionic_retry", load_family(FAKE_FAMILY)), tmp_path)
    assert handled.state == "successful"
    assert [c["handler"] for c in handled.corrections] == ["ionic_steps"]
    assert handled.output.relax_converged


def test_loop_gives_up_with_reasons(tmp_path, fake_pw, fake_settings):
    fake_pw({"direct": "si_scf_retry"})
    handled = run_with_handlers(
        _case_input("si_scf_retry", load_family(FAKE_FAMILY)), tmp_path, max_retries=1
    )
    assert handled.state == "failed"
    assert "SCF not converged" in handled.reasons
    assert "gave up after 1 retries" in handled.reasons


def test_unknown_crash_fails_with_the_exit_code(tmp_path, fake_pw, fake_settings):
    fake_pw({"direct": "cu_overlap_crash"})
    cu = Structure(Lattice.cubic(5.0), ["Cu", "Cu"], [[0, 0, 0], [0.06, 0, 0]])
    preset = load_preset("fast", {"input_data": {"control": {"calculation": "scf"}}})
    handled = run_with_handlers(build_pw_input(cu, preset, load_family(FAKE_FAMILY)), tmp_path)
    assert handled.state == "failed"
    assert any("exit code 57" in r for r in handled.reasons)
