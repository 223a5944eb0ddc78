"""The one place pw.x is started."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from crystaloop.dft.espresso.inputs import INPUT_FILE, OUTPUT_FILE
from crystaloop.errors import UserError

STDERR_FILE = "pw.err"
#: Seconds pw.x (and its MPI launcher) get to exit after SIGTERM before SIGKILL.
TERMINATE_GRACE_S = 5.0


@dataclass(frozen=True)
class PwRun:
    """How a pw.x run ended."""

    command: list[str]
    returncode: int | None
    wall_time_s: float
    timed_out: bool
    directory: Path

    @property
    def output(self) -> Path:
        """The captured standard output."""
        return self.directory / OUTPUT_FILE


def build_pw_command(pw_command: str, input_file: str = INPUT_FILE) -> list[str]:
    """``pw_command`` split like a shell would, plus ``-in <input_file>``.

    Raises
    ------
    UserError
        The command is empty.
    """
    argv = shlex.split(pw_command)
    if not argv:
        raise UserError("pw_command is empty; set CRYSTALOOP_PW_COMMAND, e.g. 'pw.x'")
    return [*argv, "-in", input_file]


def pw_environment(omp_num_threads: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for pw.x: ``OMP_NUM_THREADS``, Open MPI's run-as-root switches, unbuffered output."""
    env = dict(os.environ if base is None else base)
    env["OMP_NUM_THREADS"] = str(omp_num_threads)
    # Open MPI refuses to start as root (CI, containers) without both of these.
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    # gfortran buffers pw.x's output and an MPI abort throws the buffer away, taking the error
    # message the crash handlers read with it; unbuffered units keep it in pw.out.
    env.setdefault("GFORTRAN_UNBUFFERED_PRECONNECTED", "y")
    return env


def pw_available(pw_command: str | None = None) -> bool:
    """True when every executable of ``pw_command`` (launcher and pw.x) is on PATH."""
    from crystaloop.settings import get_settings

    return not missing_executables(pw_command or get_settings().pw_command)


def missing_executables(pw_command: str) -> list[str]:
    """The launcher (``mpirun``, ``srun``...) and pw.x of ``pw_command`` that are not on PATH."""
    argv = shlex.split(pw_command) or ["pw.x"]
    wanted = [argv[0]] + [a for a in argv[1:] if a.endswith("pw.x")]
    return [exe for exe in dict.fromkeys(wanted) if shutil.which(exe) is None]


def require_executables(pw_command: str, setting: str) -> None:
    """Refuse, in one line, a ``pw_command`` whose launcher or pw.x is not on PATH.

    ``setting`` names where the command was set (``dft.pw_command`` or ``CRYSTALOOP_PW_COMMAND``).

    Raises
    ------
    UserError
        Something ``pw_command`` starts is not on PATH.
    """
    missing = missing_executables(pw_command)
    if missing:
        raise UserError(
            f"{setting} '{pw_command}': {', '.join(missing)} not found on PATH; install it "
            "(pw.x: apt-get install -y quantum-espresso; mpirun: apt-get install -y openmpi-bin) "
            f"or set {setting} to pw.x"
        )


def pw_version(pw_command: str | None = None) -> str:
    """The version pw.x prints in its banner (``pw.x 6.7MaX``), or ``unknown``.

    The executable is started once with empty input, in a scratch folder (on empty input it
    leaves ``CRASH`` and ``input_tmp.in`` behind); ``unknown`` when it cannot be run.
    """
    from crystaloop.settings import get_settings

    argv = shlex.split(pw_command or get_settings().pw_command)
    exe = next((a for a in argv if a.endswith("pw.x")), argv[-1] if argv else "pw.x")
    if shutil.which(exe) is None:
        return "unknown"
    try:
        with tempfile.TemporaryDirectory(prefix="crystaloop-pwx-") as scratch:
            banner = subprocess.run(
                [exe], input="", capture_output=True, text=True, timeout=30, check=False, cwd=scratch
            ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    found = re.search(r"Program PWSCF v\.(\S+)", banner)
    return f"pw.x {found.group(1)}" if found else "unknown"


def run_pw(
    directory: Path | str,
    *,
    pw_command: str | None = None,
    omp_num_threads: int | None = None,
    timeout_s: float | None = None,
) -> PwRun:
    """Run pw.x on ``directory/pw.in``; stdout goes to ``pw.out``, stderr to ``pw.err``.

    Parameters
    ----------
    directory
        Job directory holding the input.
    pw_command, omp_num_threads
        Default: the settings' values.
    timeout_s
        Kill pw.x after this many seconds (a wall-time limit); ``timed_out`` is then True.

    pw.x runs in its own process group. If the wait is interrupted (Ctrl-C, SIGTERM made to
    raise, any exception), the group is terminated, then killed, before the exception goes on:
    no pw.x is left running.

    Raises
    ------
    UserError
        The pw.x executable cannot be started.
    """
    from crystaloop.settings import get_settings

    settings = get_settings()
    directory = Path(directory)
    command = build_pw_command(pw_command or settings.pw_command)
    env = pw_environment(omp_num_threads or settings.omp_num_threads)
    start = time.perf_counter()
    timed_out = False
    with (directory / OUTPUT_FILE).open("w") as out, (directory / STDERR_FILE).open("w") as err:
        try:
            proc = subprocess.Popen(
                command, cwd=directory, stdout=out, stderr=err, env=env, start_new_session=True
            )
        except OSError as exc:
            raise UserError(
                f"cannot start '{command[0]}' ({exc.strerror}); install Quantum ESPRESSO "
                "(apt-get install quantum-espresso) or set CRYSTALOOP_PW_COMMAND"
            ) from None
        try:
            returncode = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            stop_process_group(proc, grace_s=0.0)
            returncode, timed_out = None, True
        except BaseException:
            stop_process_group(proc)
            raise
    return PwRun(
        command=command,
        returncode=returncode,
        wall_time_s=time.perf_counter() - start,
        timed_out=timed_out,
        directory=directory,
    )


def stop_process_group(proc: subprocess.Popen, grace_s: float = TERMINATE_GRACE_S) -> None:
    """SIGTERM the process group of ``proc`` (started with its own session), SIGKILL it after
    ``grace_s`` seconds if ``proc`` is still running, and reap ``proc``."""
    if proc.poll() is None and grace_s > 0:
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    # Also when pw.x itself has exited: the MPI ranks or helpers of its group may remain.
    _signal_group(proc, signal.SIGKILL)
    proc.wait()


def _signal_group(proc: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(proc.pid, signum)
    except ProcessLookupError:  # the whole group has already exited
        pass
