"""Timing of relaxations run through crystaloop: framework overhead and time per relaxation.

Overhead is the wall time of ``run_local`` on a one-job flow (input writing, jobflow,
parsing, the task document, the ``dft_tasks`` record and the MongoDB ``JobStore``)
minus the wall time of the pw.x processes themselves. Against pw.x's own reported
WALL time the difference also holds pw.x's start-up (MPI, reading pseudopotentials);
both are reported.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

from pymatgen.core import Lattice, Structure

from crystaloop.dft.references import bulk_structure


def si_cell() -> Structure:
    """Diamond Si, 2 atoms (primitive cell)."""
    return bulk_structure("Si", "diamond", 5.431)


def demo_cell() -> Structure:
    """2H (wurtzite) SiC, 4 atoms: the size of a typical loop candidate."""
    lattice = Lattice.hexagonal(3.08, 5.05)
    u = 0.375
    return Structure(
        lattice,
        ["Si", "Si", "C", "C"],
        [[1 / 3, 2 / 3, 0], [2 / 3, 1 / 3, 0.5], [1 / 3, 2 / 3, u], [2 / 3, 1 / 3, 0.5 + u]],
    )


CELLS = {"si": si_cell, "demo": demo_cell}


@dataclass
class RelaxTiming:
    """One timed relaxation. Times in s."""

    cell: str
    formula: str
    nsites: int
    preset: str
    state: str
    total_s: float
    pw_wall_s: float
    pw_reported_s: float | None
    overhead_s: float
    overhead_pct: float
    ionic_steps: int
    pw_output: str = ""


def time_relaxation(cell: str, preset: str) -> RelaxTiming:
    """Relax one cell through ``run_local`` with the MongoDB JobStore and time it."""
    from jobflow import Flow

    from crystaloop.dft.backends import job_store, run_local
    from crystaloop.dft.espresso.jobs import QERelaxMaker
    from crystaloop.dft.espresso.parse import parse_pw_output

    structure = CELLS[cell]()
    store = job_store()
    job = QERelaxMaker(preset=preset, metadata={"benchmark": "bench dft"}).make(structure)
    flow = Flow([job])
    start = time.perf_counter()
    responses = run_local(flow, store=store)
    total = time.perf_counter() - start
    doc = responses[job.uuid][1].output
    pw_wall = doc.wall_time_s or 0.0
    reported = None
    if doc.dir_name:
        try:
            reported = parse_pw_output(f"{doc.dir_name}/pw.out").wall_time_s
        except (OSError, ValueError):
            reported = None
    overhead = total - pw_wall
    return RelaxTiming(
        cell=cell,
        formula=structure.composition.reduced_formula,
        nsites=len(structure),
        preset=preset,
        state=doc.state,
        total_s=total,
        pw_wall_s=pw_wall,
        pw_reported_s=reported,
        overhead_s=overhead,
        overhead_pct=100.0 * overhead / pw_wall if pw_wall else float("nan"),
        ionic_steps=doc.n_ionic_steps,
        pw_output=Path(doc.dir_name, "pw.out").read_text() if doc.dir_name else "",
    )


def summarise(timings: list[RelaxTiming]) -> dict:
    """Median per (cell, preset) of the timed runs."""
    groups: dict[tuple[str, str], list[RelaxTiming]] = {}
    for t in timings:
        groups.setdefault((t.cell, t.preset), []).append(t)
    rows = []
    for (cell, preset), runs in groups.items():
        rows.append(
            {
                "cell": cell,
                "formula": runs[0].formula,
                "nsites": runs[0].nsites,
                "preset": preset,
                "runs": len(runs),
                "states": sorted({r.state for r in runs}),
                "total_s": statistics.median(r.total_s for r in runs),
                "pw_wall_s": statistics.median(r.pw_wall_s for r in runs),
                "overhead_s": statistics.median(r.overhead_s for r in runs),
                "overhead_pct": statistics.median(r.overhead_pct for r in runs),
                "pw_reported_s": statistics.median(r.pw_reported_s or 0.0 for r in runs),
                "overhead_vs_reported_s": statistics.median(
                    r.total_s - (r.pw_reported_s or r.pw_wall_s) for r in runs
                ),
            }
        )
    runs = [{k: v for k, v in asdict(t).items() if k != "pw_output"} for t in timings]
    return {"rows": rows, "runs": runs}


def time_framework_only(cell: str, preset: str, pw_output: str, repeats: int = 10) -> list[float]:
    """Wall time (s) of relaxations whose pw.x is replaced by a replay of ``pw_output``.

    Everything else is real (input writing, parsing, documents, records, JobStore), so
    this is the framework's cost without pw.x's run-to-run noise.
    """
    from jobflow import Flow

    from crystaloop.dft.backends import job_store, run_local
    from crystaloop.dft.espresso import run as pw_run
    from crystaloop.dft.espresso.jobs import QERelaxMaker

    def replay(directory, **kwargs):
        directory = Path(directory)
        (directory / "pw.out").write_text(pw_output)
        (directory / "pw.err").write_text("")
        return pw_run.PwRun(["replay"], 0, 0.0, False, directory)

    real = pw_run.run_pw
    pw_run.run_pw = replay
    try:
        store = job_store()
        times = []
        for _ in range(repeats):
            job = QERelaxMaker(preset=preset, metadata={"benchmark": "replay"}).make(CELLS[cell]())
            start = time.perf_counter()
            run_local(Flow([job]), store=store)
            times.append(time.perf_counter() - start)
        return times
    finally:
        pw_run.run_pw = real


def time_relaxations(
    cells: list[str],
    presets: list[str],
    *,
    repeats: int,
    standard_repeats: int,
    step: Callable[[str], AbstractContextManager] = lambda _: nullcontext(),
) -> list[RelaxTiming]:
    """One warm-up relaxation, then ``repeats`` timed runs per cell with ``fast`` (``standard_repeats``
    with any other preset); ``step(description)`` wraps each run (a progress display)."""
    timings = []
    with step("warming up (imports, DB, first job)"):
        time_relaxation(cells[0], presets[0])
    for preset in presets:
        count = repeats if preset == "fast" else standard_repeats
        for cell in cells:
            for i in range(count):
                with step(f"{cell} / {preset} / run {i + 1} of {count}"):
                    timings.append(time_relaxation(cell, preset))
    return timings


def framework_only(timings: list[RelaxTiming]) -> dict[str, dict[str, float]]:
    """Median and max wall time (s) of :func:`time_framework_only` per ``cell/preset``, replaying the
    last pw.x output timed for it."""
    replayed = {(t.cell, t.preset): t.pw_output for t in timings}
    out = {}
    for (cell, preset), text in replayed.items():
        times = sorted(time_framework_only(cell, preset, text))
        out[f"{cell}/{preset}"] = {"median_s": times[len(times) // 2], "max_s": times[-1]}
    return out
