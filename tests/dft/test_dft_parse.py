"""pw.x output parsing: reference runs, failure flags, and QE's example corpus."""

from __future__ import annotations

from pathlib import Path

import pytest

from crystaloop.dft.espresso.parse import PwOutputError, parse_pw_output

REFERENCE = Path(__file__).parent / "reference"
EXAMPLES = Path("/usr/share/doc/quantum-espresso/examples")


def test_converged_vc_relax():
    out = parse_pw_output(REFERENCE / "si_relax" / "attempt_0" / "pw.out.gz")
    assert out.successful and out.job_done and out.relax_converged
    assert out.version == "6.7MaX"
    assert out.energy / 2 == pytest.approx(-138.7332, abs=1e-3)
    assert out.n_ionic_steps >= 2 and len(out.energies) > out.n_ionic_steps - 1
    assert out.forces.shape == (2, 3) and out.stress.shape == (3, 3)
    assert 0.3 < out.band_gap < 1.5 and out.is_metal is False
    assert out.wall_time_s > 0
    assert out.final_structure.lattice.a == pytest.approx(3.888, abs=0.01)


def test_failure_flags():
    scf = parse_pw_output(REFERENCE / "si_scf_retry" / "attempt_0" / "pw.out.gz")
    assert not scf.scf_converged and not scf.successful
    ionic = parse_pw_output(REFERENCE / "si_ionic_retry" / "attempt_0" / "pw.out.gz")
    assert ionic.max_steps_reached and ionic.relax_converged is False and not ionic.successful
    crash = parse_pw_output(REFERENCE / "cu_overlap_crash" / "attempt_0" / "pw.out.gz", strict=False)
    assert not crash.job_done and crash.energy is None


def test_non_pw_output_is_rejected(tmp_path):
    path = tmp_path / "ph.out"
    path.write_text("Program PHONON v.6.7 starts\n")
    with pytest.raises(PwOutputError, match="not a pw.x output"):
        parse_pw_output(path)


@pytest.mark.skipif(not EXAMPLES.is_dir(), reason="QE examples are not installed")
def test_every_example_output_is_parsed_or_cleanly_rejected():
    files = sorted(EXAMPLES.glob("**/reference/*.out*"))
    parsed = rejected = 0
    for path in files:
        try:
            out = parse_pw_output(path)
        except PwOutputError as exc:
            assert str(path) in str(exc)
            rejected += 1
            continue
        assert out.initial_structure is not None
        parsed += 1
    assert parsed + rejected == len(files) > 500
    assert parsed > 250


def test_bfgs_curvature_warning_is_not_a_failure():
    # Real pw.x 6.7 output: "WARNING: bfgs curvature condition failed, Theta= 0.912" on the
    # second step, then "bfgs converged in 7 scf cycles and 6 bfgs steps" and JOB DONE.
    path = REFERENCE / "si_bfgs_curvature_warning" / "attempt_0" / "pw.out.gz"
    out = parse_pw_output(path)
    assert out.version == "6.7MaX"
    assert out.relax_converged is True and out.successful
    assert out.n_ionic_steps == 7 and out.energy == pytest.approx(-20.41917044 * 13.605693, abs=1e-3)  # eV, from Ry


def test_bfgs_history_reset_is_a_failure_even_after_bfgs_converged(tmp_path):
    import gzip

    from crystaloop.dft.espresso.handlers import IonicStepsHandler
    from crystaloop.dft.espresso.run import PwRun

    real = gzip.decompress((REFERENCE / "si_bfgs_curvature_warning" / "attempt_0" / "pw.out.gz").read_bytes())
    # pw.x 6.7 stops a relaxation whose history was reset twice with this infomsg, then still
    # prints "bfgs converged" (bfgs_module: conv_bfgs = conv_bfgs .OR. tr_min_hit > 1).
    text = real.decode().replace(
        "     bfgs converged in",
        "     Message from routine bfgs:\n     history already reset at previous step: stopping\n\n"
        "     bfgs converged in",
    )
    path = tmp_path / "pw.out"
    path.write_text(text)
    out = parse_pw_output(path)
    assert out.relax_converged is False and not out.successful
    run = PwRun(command=["pw.x"], returncode=0, wall_time_s=1.0, timed_out=False, directory=tmp_path)
    assert IonicStepsHandler().check(out, run, "")
    warned = parse_pw_output(REFERENCE / "si_bfgs_curvature_warning" / "attempt_0" / "pw.out.gz")
    assert not IonicStepsHandler().check(warned, run, "")


def test_ionic_steps_leave_out_the_final_scf_of_pw67():
    # pw.x 6.7 prints "Final scf calculation at the relaxed structure." (older: "A final scf ...").
    out = parse_pw_output(REFERENCE / "si_relax" / "attempt_0" / "pw.out.gz")
    assert len(out.energies) == 4  # three BFGS scf cycles + the final scf
    assert out.n_ionic_steps == 3  # "bfgs converged in 3 scf cycles"


@pytest.mark.skipif(not EXAMPLES.is_dir(), reason="QE examples are not installed")
def test_older_pw_outputs_with_curvature_warnings_converge():
    for rel in ("PW/example02/reference/al001.rx.out.gz", "PW/VCSexample/reference/As.bfgs500.out.gz"):
        out = parse_pw_output(EXAMPLES / rel)
        assert out.relax_converged is True, rel
