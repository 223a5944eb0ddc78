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
