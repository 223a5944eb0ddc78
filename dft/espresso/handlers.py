"""Error recovery for pw.x, in the style of custodian: a chain of handlers.

Each handler ``check``s a finished attempt and, when it recognises the
problem, ``correct``s a copy of the input. ``run_with_handlers`` retries until
the run succeeds, no handler can fix it, or ``max_retries`` is reached; the
result always carries a state (``successful`` or ``failed``) and the reasons.
"""

from __future__ import annotations

import copy
import shutil
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from pathlib import Path

from crystaloop.dft.espresso import run as pw_run
from crystaloop.dft.espresso.inputs import INPUT_FILE, OUTPUT_FILE, PwInput
from crystaloop.dft.espresso.parse import PwOutput, PwOutputError, parse_pw_output
from crystaloop.dft.espresso.run import STDERR_FILE, PwRun

DIAGONALIZATIONS = ("david", "cg", "ppcg")
MIN_MIXING_BETA = 0.1
MAX_ELECTRON_STEPS = 400


@dataclass
class Fix:
    """A corrected input and what was changed."""

    pw_input: PwInput
    actions: list[str]


class ErrorHandler(ABC):
    """Recognises one kind of failure and fixes the input for a retry."""

    name: str = "handler"

    @abstractmethod
    def check(self, output: PwOutput | None, run: PwRun, log: str) -> bool:
        """True when this handler recognises the problem in the attempt."""

    @abstractmethod
    def correct(self, pw_input: PwInput, output: PwOutput | None) -> Fix | None:
        """A fixed copy of ``pw_input``, or None when nothing more can be tried."""


def _copy(pw_input: PwInput) -> PwInput:
    return replace(pw_input, input_data=copy.deepcopy(pw_input.input_data))


def _next_diagonalization(current: str) -> str | None:
    order = list(DIAGONALIZATIONS)
    index = order.index(current) if current in order else 0
    return order[index + 1] if index + 1 < len(order) else None


def _restart_geometry(fixed: PwInput, output: PwOutput | None, actions: list[str]) -> None:
    """Start from the last geometry in ``output`` (vc-relax/relax only)."""
    if output is None or output.final_structure is None or output.n_ionic_steps < 1:
        return
    if fixed.input_data.get("control", {}).get("calculation") not in {"relax", "vc-relax"}:
        return
    structure = output.final_structure.copy()
    if fixed.magmoms is not None and len(fixed.magmoms) != len(structure):
        return
    fixed.structure = structure
    actions.append(f"restart from the last geometry (step {output.n_ionic_steps})")


class ScfConvergenceHandler(ErrorHandler):
    """SCF not converged: lower ``mixing_beta``, more iterations, another diagonalisation."""

    name = "scf_convergence"

    def check(self, output: PwOutput | None, run: PwRun, log: str) -> bool:
        return output is not None and not output.scf_converged

    def correct(self, pw_input: PwInput, output: PwOutput | None) -> Fix | None:
        fixed = _copy(pw_input)
        electrons = fixed.input_data.setdefault("electrons", {})
        actions = []
        beta = float(electrons.get("mixing_beta", 0.7))
        if beta > MIN_MIXING_BETA + 1e-9:
            electrons["mixing_beta"] = round(max(MIN_MIXING_BETA, beta / 2), 4)
            actions.append(f"mixing_beta {beta:g} -> {electrons['mixing_beta']:g}")
        steps = int(electrons.get("electron_maxstep", 100))
        if steps < MAX_ELECTRON_STEPS:
            electrons["electron_maxstep"] = min(MAX_ELECTRON_STEPS, steps * 2)
            actions.append(f"electron_maxstep {steps} -> {electrons['electron_maxstep']}")
        diag = electrons.get("diagonalization", "david")
        new_diag = _next_diagonalization(diag)
        if new_diag:
            electrons["diagonalization"] = new_diag
            actions.append(f"diagonalization {diag} -> {new_diag}")
        if not actions:
            return None
        _restart_geometry(fixed, output, actions)
        return Fix(fixed, actions)


class IonicStepsHandler(ErrorHandler):
    """Ionic steps exhausted (or BFGS gave up): restart from the last geometry."""

    name = "ionic_steps"

    def check(self, output: PwOutput | None, run: PwRun, log: str) -> bool:
        return (
            output is not None
            and output.scf_converged
            and (output.max_steps_reached or output.relax_converged is False)
        )

    def correct(self, pw_input: PwInput, output: PwOutput | None) -> Fix | None:
        fixed = _copy(pw_input)
        actions: list[str] = []
        _restart_geometry(fixed, output, actions)
        if not actions:
            return None
        if output is not None and not output.max_steps_reached:
            ions = fixed.input_data.setdefault("ions", {})
            trust = float(ions.get("trust_radius_ini", 0.5))
            ions["trust_radius_ini"] = round(trust / 2, 4)
            actions.append(f"trust_radius_ini {trust:g} -> {ions['trust_radius_ini']:g}")
        return Fix(fixed, actions)


class WalltimeHandler(ErrorHandler):
    """Killed at the wall-time limit (timeout or a signal): restart from the last geometry."""

    name = "walltime"

    def check(self, output: PwOutput | None, run: PwRun, log: str) -> bool:
        # Killed from outside: our own timeout, or a signal from the batch scheduler.
        return run.timed_out or (run.returncode is not None and run.returncode < 0)

    def correct(self, pw_input: PwInput, output: PwOutput | None) -> Fix | None:
        fixed = _copy(pw_input)
        actions: list[str] = []
        _restart_geometry(fixed, output, actions)
        if not actions:
            actions.append("rerun (no complete ionic step to restart from)")
        return Fix(fixed, actions)


#: Known pw.x crash messages and the diagonalisation change that usually cures them.
KNOWN_CRASHES = (
    "S matrix not positive definite",
    "too many bands are not converged",
    "problems computing cholesky",
    "eigenvectors failed to converge",
)


class KnownCrashHandler(ErrorHandler):
    """A crash with a known message: switch the diagonalisation (david -> cg -> ppcg)."""

    name = "known_crash"

    def check(self, output: PwOutput | None, run: PwRun, log: str) -> bool:
        return any(message in log for message in KNOWN_CRASHES)

    def correct(self, pw_input: PwInput, output: PwOutput | None) -> Fix | None:
        fixed = _copy(pw_input)
        electrons = fixed.input_data.setdefault("electrons", {})
        diag = electrons.get("diagonalization", "david")
        new_diag = _next_diagonalization(diag)
        if new_diag is None:
            return None
        electrons["diagonalization"] = new_diag
        actions = [f"diagonalization {diag} -> {new_diag}"]
        beta = float(electrons.get("mixing_beta", 0.7))
        if beta > 0.3:
            electrons["mixing_beta"] = 0.3
            actions.append(f"mixing_beta {beta:g} -> 0.3")
        _restart_geometry(fixed, output, actions)
        return Fix(fixed, actions)


def default_handlers() -> list[ErrorHandler]:
    """The standard chain, most specific first."""
    return [WalltimeHandler(), KnownCrashHandler(), ScfConvergenceHandler(), IonicStepsHandler()]


@dataclass
class HandledRun:
    """The outcome of a run with retries."""

    state: str
    output: PwOutput | None
    pw_input: PwInput
    runs: list[PwRun]
    corrections: list[dict] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    @property
    def engine_wall_time_s(self) -> float:
        """pw.x wall time summed over attempts, s."""
        return sum(r.wall_time_s for r in self.runs)


def _archive(directory: Path, attempt: int) -> None:
    for name in (INPUT_FILE, OUTPUT_FILE, STDERR_FILE):
        path = directory / name
        if path.exists():
            shutil.move(path, directory / f"{name}.{attempt}")


def _log_text(directory: Path) -> str:
    parts = []
    for name in (OUTPUT_FILE, STDERR_FILE):
        path = directory / name
        if path.exists():
            parts.append(path.read_text(errors="replace"))
    return "\n".join(parts)


def run_with_handlers(
    pw_input: PwInput,
    directory: Path | str,
    *,
    handlers: list[ErrorHandler] | None = None,
    max_retries: int = 3,
    pw_command: str | None = None,
    timeout_s: float | None = None,
) -> HandledRun:
    """Write, run and parse pw.x; on failure apply the first matching handler and retry.

    Never raises for a failed calculation: the result has ``state="failed"`` and reasons.
    """
    directory = Path(directory)
    handlers = default_handlers() if handlers is None else handlers
    runs: list[PwRun] = []
    corrections: list[dict] = []
    current = pw_input
    output: PwOutput | None = None
    for attempt in range(max_retries + 1):
        if attempt:
            _archive(directory, attempt - 1)
        current.write(directory)
        run = pw_run.run_pw(directory, pw_command=pw_command, timeout_s=timeout_s)
        runs.append(run)
        log = _log_text(directory)
        try:
            output = parse_pw_output(directory / OUTPUT_FILE, strict=False)
        except PwOutputError:
            output = None
        # pw.x 6.7 may exit non-zero after a converged vc-relax; the output is the judge.
        if output is not None and output.successful and not run.timed_out:
            return HandledRun("successful", output, current, runs, corrections)
        errors = _describe(output, run, log)
        handler = next((h for h in handlers if h.check(output, run, log)), None)
        if handler is None:
            return HandledRun(
                "failed", output, current, runs, corrections, [*errors, "no handler recognised it"]
            )
        if attempt == max_retries:
            return HandledRun(
                "failed",
                output,
                current,
                runs,
                corrections,
                [*errors, f"gave up after {max_retries} retries"],
            )
        fix = handler.correct(current, output)
        if fix is None:
            return HandledRun(
                "failed",
                output,
                current,
                runs,
                corrections,
                [*errors, f"handler {handler.name} has no further fix"],
            )
        corrections.append(
            {"attempt": attempt, "handler": handler.name, "errors": errors, "actions": fix.actions}
        )
        current = fix.pw_input
    raise AssertionError("unreachable")  # pragma: no cover


def _describe(output: PwOutput | None, run: PwRun, log: str) -> list[str]:
    reasons = []
    if run.timed_out:
        reasons.append(f"killed at the wall-time limit after {run.wall_time_s:.0f} s")
    if output is None:
        reasons.append("no readable pw.x output")
        tail = [ln.strip() for ln in log.splitlines() if ln.strip()][-1:]
        reasons.extend(f"last line: {ln[:200]}" for ln in tail)
        return reasons
    reasons.extend(output.errors)
    if not output.scf_converged:
        reasons.append("SCF not converged")
    if output.max_steps_reached:
        reasons.append("maximum number of ionic steps reached")
    elif output.relax_converged is False and output.job_done:
        reasons.append("geometry optimisation did not converge")
    if not output.job_done and not run.timed_out:
        reasons.append(f"pw.x stopped before JOB DONE (exit code {run.returncode})")
    return reasons
