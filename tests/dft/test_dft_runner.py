"""The one pw.x runner: command, environment, capture, timeout."""

from __future__ import annotations

import shutil
import sys

import pytest

from crystaloop.dft.espresso.run import build_pw_command, pw_environment, run_pw
from crystaloop.errors import UserError


def test_command_is_split_and_gets_the_input():
    assert build_pw_command("mpirun -np 4 pw.x") == ["mpirun", "-np", "4", "pw.x", "-in", "pw.in"]
    with pytest.raises(UserError):
        build_pw_command("  ")


def test_environment_sets_threads_and_root_switches():
    env = pw_environment(3, base={"PATH": "/usr/bin"})
    assert env["OMP_NUM_THREADS"] == "3"
    assert env["OMPI_ALLOW_RUN_AS_ROOT"] == "1"
    assert env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] == "1"
    assert env["GFORTRAN_UNBUFFERED_PRECONNECTED"] == "y"
    assert env["PATH"] == "/usr/bin"


def _script(tmp_path, body: str) -> str:
    path = tmp_path / "fake_pw.py"
    path.write_text(body)
    return f"{sys.executable} {path}"


def test_runs_in_the_directory_and_captures_output(tmp_path, settings):
    job = tmp_path / "job"
    job.mkdir()
    (job / "pw.in").write_text("input")
    command = _script(
        tmp_path,
        "import os, sys\n"
        "print(os.getcwd(), os.environ['OMP_NUM_THREADS'], sys.argv[1:], open(sys.argv[2]).read())\n"
        "print('oops', file=sys.stderr)\n",
    )
    result = run_pw(job, pw_command=command, omp_num_threads=2)
    assert result.returncode == 0 and not result.timed_out
    out = (job / "pw.out").read_text()
    assert str(job) in out and " 2 " in out and "['-in', 'pw.in'] input" in out
    assert (job / "pw.err").read_text().strip() == "oops"


def test_timeout_kills_and_says_so(tmp_path, settings):
    job = tmp_path / "job"
    job.mkdir()
    command = _script(tmp_path, "import time\nprint('started', flush=True)\ntime.sleep(30)\n")
    result = run_pw(job, pw_command=command, timeout_s=0.5)
    assert result.timed_out and result.returncode is None
    assert result.wall_time_s < 10
    assert "started" in (job / "pw.out").read_text()


def test_missing_executable_is_a_user_error(tmp_path, settings):
    with pytest.raises(UserError, match="cannot start"):
        run_pw(tmp_path, pw_command="/nonexistent/pw.x")


def test_missing_launcher_is_named_before_a_campaign_starts(monkeypatch):
    from crystaloop.dft.espresso.run import missing_executables
    from crystaloop.errors import UserError
    from crystaloop.loop import preflight
    from crystaloop.loop.config import parse_campaign_config

    monkeypatch.setenv("PATH", "/nonexistent")
    assert missing_executables("mpirun -np 2 pw.x") == ["mpirun", "pw.x"]
    assert missing_executables("pw.x -nk 2") == ["pw.x"]
    config = parse_campaign_config(
        {
            "name": "launcher",
            "targets": [{"property": "formation_energy_per_atom", "min": -1.0, "max": 0.0}],
            "elements": {"allow": ["Si", "C"]},
            "dft": {"engine": "espresso", "pw_command": "mpirun -np 2 pw.x"},
        }
    )
    with pytest.raises(UserError, match="mpirun, pw.x not found on PATH"):
        preflight.check_dft(config)
    # Also with no element list, and an unknown preset is caught before any work too.
    open_palette = config.model_copy(update={"elements": config.elements.model_copy(update={"allow": None})})
    with pytest.raises(UserError, match="mpirun, pw.x not found on PATH"):
        preflight.check_dft(open_palette)
    unknown = open_palette.model_copy(update={"dft": open_palette.dft.model_copy(update={"preset": "nope"})})
    with pytest.raises(UserError, match="nope"):
        preflight.check_dft(unknown)


@pytest.mark.skipif(shutil.which("pw.x") is None, reason="pw.x is not installed")
def test_engine_version_reads_the_banner_without_littering_the_working_directory(tmp_path, monkeypatch):
    from crystaloop.dft.cache import engine_version

    monkeypatch.chdir(tmp_path)
    version = engine_version("espresso", "pw.x")
    assert version.startswith("pw.x 6.")  # Debian's Quantum ESPRESSO 6.x
    assert list(tmp_path.iterdir()) == []  # no CRASH, no input_tmp.in


def _running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    from pathlib import Path

    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_interrupted_wait_stops_pwx_and_its_children(tmp_path, settings):
    import signal
    import time

    job = tmp_path / "job"
    job.mkdir()
    # A stand-in for mpirun + pw.x: a launcher that starts a worker and waits on it.
    command = _script(
        tmp_path,
        "import os, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "open('pids', 'w').write(f'{os.getpid()} {child.pid}')\n"
        "time.sleep(60)\n",
    )

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 1.5)
        with pytest.raises(KeyboardInterrupt):
            run_pw(job, pw_command=command)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    pids = [int(p) for p in (job / "pids").read_text().split()]
    deadline = time.monotonic() + 5
    while any(_running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_running(p) for p in pids)
