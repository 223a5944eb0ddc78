"""Competing phases of a DFT hull: the prior set's phases near the CHGNet hull of a chemical
system, relaxed once with a campaign's engine and preset, through its backend.

A candidate's DFT energy above the hull is only as good as the phases its hull holds. For each
chemical system asked for, the prior set's phases that lie within ``within`` eV/atom of the
CHGNet hull are relaxed with the campaign's DFT settings (the same formation-energy flow as a
candidate, element references at the phase's cutoffs). Each result is kept in the
``hull_phases`` collection, keyed by the phase and the relaxation settings, so a phase is relaxed
once for every campaign that shares those settings, and in the DFT cache, so that a candidate
equivalent to a phase is answered without a relaxation. A phase that fails is kept as failed:
the energies above a hull that lacks it are upper bounds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from itertools import combinations
from pathlib import Path
from typing import Any

from pymatgen.core import Composition, Structure

from crystaloop.dft.corrections import NO_CORRECTION, AnionCorrection
from crystaloop.dft.engines import get_engine
from crystaloop.dft.hull import FormationHull, HullPhase
from crystaloop.loop.stability import FORMATION_ENERGY, prior_phases

COLLECTION = "hull_phases"
DEFAULT_WITHIN_EV_PER_ATOM = 0.1


@dataclass(frozen=True)
class CompetingPhase:
    """A prior-set phase to relax for a DFT hull, and its CHGNet energy above the CHGNet hull."""

    structure_id: str
    structure: Structure
    chgnet_energy_above_hull: float

    @property
    def formula(self) -> str:
        return self.structure.composition.reduced_formula


def competing_phases(
    elements: Iterable[str], *, within: float = DEFAULT_WITHIN_EV_PER_ATOM
) -> list[CompetingPhase]:
    """The prior set's phases of the chemical system ``elements`` (and of its subsystems, the
    elements themselves excluded) within ``within`` eV/atom of the CHGNet hull."""
    from crystaloop.generative.data.prior import read_prior
    from crystaloop.generative.data.prototypes import Prototype

    system = sorted(set(elements))
    labeller, phases = prior_phases()
    hull = FormationHull(labeller, phases)
    wanted = {frozenset(s) for n in range(2, len(system) + 1) for s in combinations(system, n)}
    out = []
    for record in read_prior()["records"]:
        value = (record.get("labels") or {}).get(FORMATION_ENERGY)
        if not record.get("converged") or record.get("reject_reason") or value is None:
            continue
        if frozenset(Composition(record["formula"]).chemical_system.split("-")) not in wanted:
            continue
        above = hull.stability(record["formula"], float(value)).energy_above_hull
        if above <= within:
            # the prior's CHGNet-relaxed cubic cell, as a primitive cell (fewer atoms to relax)
            structure = Prototype(record["prototype"], tuple(record["species"])).primitive(record["a0"])
            out.append(CompetingPhase(record["structure_id"], structure, float(above)))
    return sorted(out, key=lambda p: (p.formula, p.chgnet_energy_above_hull))


def phase_key(structure_id: str, settings: dict[str, Any]) -> str:
    """The ``hull_phases`` id of a prior phase relaxed with these settings."""
    return f"{structure_id}@{settings['key']}"


@dataclass
class HullPhaseRun:
    """What :func:`relax_competing_phases` did."""

    systems: list[str]
    phases: int = 0
    reused: int = 0
    from_cache: int = 0
    relaxed: int = 0
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0


def relax_competing_phases(
    database,
    config,
    systems: Sequence[Sequence[str]],
    *,
    work_dir: Path,
    within: float = DEFAULT_WITHIN_EV_PER_ATOM,
    poll_s: float = 2.0,
    log: Callable[[str], None] = lambda line: None,
) -> HullPhaseRun:
    """Relax the competing phases of ``systems`` with ``config``'s DFT settings, once each.

    Phases already relaxed (or failed) with the same settings are reused; a phase equivalent to
    a structure in the DFT cache under these settings (a candidate, often) takes that result
    (``from_cache``). The rest run as
    formation-energy flows through the campaign's backend; their outputs are written to
    ``dft_tasks``, the element-reference cache, the DFT cache and ``hull_phases``.
    """
    from crystaloop.dft.backends import tag_flow
    from crystaloop.dft.cache import DFTCache, relaxation_settings
    from crystaloop.dft.flows import FormationEnergyMaker
    from crystaloop.loop.dft_jobs import make_backend

    start = time.perf_counter()
    dft = config.dft
    run = HullPhaseRun(systems=["-".join(sorted(s)) for s in systems])
    collection = database[COLLECTION]
    cache = DFTCache(database)
    todo: dict[str, tuple[CompetingPhase, dict[str, Any]]] = {}
    for system in systems:
        for phase in competing_phases(system, within=within):
            settings = relaxation_settings(
                phase.structure, engine=dft.engine, preset=dft.preset, overrides=dft.overrides
            )
            key = phase_key(phase.structure_id, settings)
            if key in todo:
                continue
            run.phases += 1
            if collection.find_one({"_id": key}, {"_id": 1}) is not None:
                run.reused += 1
                continue
            cached = cache.lookup(phase.structure, settings)
            if cached is not None and (cached.get("values") or {}).get(FORMATION_ENERGY) is not None:
                # an equivalent structure was relaxed with these settings already (often a candidate)
                _write(
                    database,
                    key,
                    phase,
                    settings,
                    cached["values"][FORMATION_ENERGY],
                    cached["task_id"],
                    None,
                )
                run.from_cache += 1
                continue
            todo[key] = (phase, settings)
    if not todo:
        run.seconds = time.perf_counter() - start
        return run
    backend = make_backend(config.execution, work_dir)
    for key, (phase, _) in todo.items():
        maker = FormationEnergyMaker(
            name=f"hull phase {phase.formula}",
            engine=dft.engine,
            preset=dft.preset,
            overrides=dict(dft.overrides),
            pw_command=dft.pw_command,
            reference_structures=dft.reference_structure_objects(),
            metadata={"hull_phase": phase.structure_id, "campaign": config.name},
            record=False,
        )
        # the jobs never read the database: the references already cached are resolved here
        flow = replace(maker, references=maker.cached_references(phase.structure)).make(phase.structure)
        job_id = _job_id(key)
        tag_flow(flow, job_id)
        backend.submit(flow, job_id)
        log(f"  submitted {phase.formula} ({phase.structure_id})")
    pending = dict(todo)
    try:
        while pending:
            for key in list(pending):
                status = backend.state(_job_id(key))
                if status.state in ("queued", "running"):
                    continue
                phase, settings = pending.pop(key)
                output = backend.output(_job_id(key)) if status.state == "completed" else None
                reason = _record(database, key, phase, settings, output, status.reason)
                if reason is None:
                    run.relaxed += 1
                    log(f"  relaxed {phase.formula}")
                else:
                    run.failed.append(f"{phase.formula} ({phase.structure_id}): {reason}")
                    log(f"  {phase.formula} failed: {reason}")
            if pending:
                time.sleep(poll_s)
    finally:
        close = getattr(backend, "close", None)
        if close is not None:
            close()
    run.seconds = time.perf_counter() - start
    return run


def _job_id(key: str) -> str:
    # job managers key their jobs by a plain name; the settings hash is long, so shorten it
    structure_id, settings_key = key.split("@")
    return f"hull-{structure_id.replace(':', '-')}-{settings_key[:12]}"


def _record(database, key, phase: CompetingPhase, settings, output, failure: str | None) -> str | None:
    """Write a phase's outcome; the reason it failed, or None."""
    from crystaloop.dft import records
    from crystaloop.dft.cache import DFTCache

    task = output.task if output is not None else None
    fe = output.formation_energy if output is not None else None
    value = fe.formation_energy_per_atom if fe is not None and fe.state == "successful" else None
    reason = None
    if task is None:
        reason = failure or "its flow gave no relaxation"
    else:
        task = task.model_copy(update={"formation_energy_per_atom": value})
        records.save_task(task, database=database)
        records.cache_references(output.references, database=database)
        if not task.successful or value is None:
            reasons = (fe.reasons if fe is not None else []) or task.reasons or ["no formation energy"]
            reason = "; ".join(reasons)[:300]
        else:
            values = {FORMATION_ENERGY: value, "energy_per_atom": task.energy_per_atom}
            DFTCache(database).put(
                phase.structure,
                settings,
                task,
                values,
                source={"role": "hull_phase", "structure_id": phase.structure_id},
            )
    _write(
        database,
        key,
        phase,
        settings,
        value if reason is None else None,
        task.task_id if task else None,
        reason,
    )
    return reason


def _write(database, key, phase: CompetingPhase, settings, value, task_id, reason) -> None:
    database[COLLECTION].replace_one(
        {"_id": key},
        {
            "_id": key,
            "structure_id": phase.structure_id,
            "formula": phase.formula,
            "chemsys": phase.structure.composition.chemical_system,
            "engine": settings["engine"],
            "preset": settings["preset"],
            "settings_key": settings["key"],
            "structure": phase.structure.as_dict(),
            "state": "failed" if reason else "relaxed",
            "reason": reason,
            FORMATION_ENERGY: value,
            "task_id": task_id,
            "chgnet_energy_above_hull": phase.chgnet_energy_above_hull,
        },
        upsert=True,
    )


def add_hull_phases(
    hull: FormationHull,
    database,
    config,
    elements: Iterable[str],
    correction: AnionCorrection = NO_CORRECTION,
) -> FormationHull:
    """Add to ``hull`` the competing phases of ``elements``' system relaxed with ``config``'s DFT
    settings (failed ones marked missing, so answers in their systems are upper bounds), their
    raw formation energies shifted by ``correction`` as the campaign's own results are."""
    from crystaloop.dft.cache import relaxation_settings

    dft = config.dft
    system = sorted(set(elements))
    subsystems = ["-".join(s) for n in range(2, len(system) + 1) for s in combinations(system, n)]
    for doc in database[COLLECTION].find({"chemsys": {"$in": subsystems}, "engine": dft.engine}):
        structure = Structure.from_dict(doc["structure"])
        settings = relaxation_settings(
            structure, engine=dft.engine, preset=dft.preset, overrides=dft.overrides
        )
        if settings["key"] != doc["settings_key"]:
            continue  # relaxed with other settings: another hull
        if doc["state"] == "relaxed":
            value = correction.correct(doc["formula"], float(doc[FORMATION_ENERGY]))
            hull.add(HullPhase(doc["formula"], value, doc["task_id"] or doc["_id"]))
        else:
            hull.mark_missing(doc["formula"])
    return hull


def verify_against_hull(
    database,
    config,
    *,
    systems: Sequence[str] | None = None,
    all_relaxed: bool = False,
    within: float = DEFAULT_WITHIN_EV_PER_ATOM,
    log: Callable[[str], None] = lambda line: None,
) -> tuple[HullPhaseRun, list[dict[str, Any]]]:
    """Relax the competing phases of a campaign's systems, then place each relaxed candidate of
    those systems against the hull they complete; its stored E_hull and stability are updated.

    ``systems`` (``"A-B"``) default to the chemical systems of the campaign's hits, or of every
    relaxed candidate with ``all_relaxed``. Returns the run and one row per candidate re-placed
    (its E_hull before and after, the hull's phases besides the elements, upper bound or not).
    """
    from crystaloop.db.store import CandidateStore
    from crystaloop.loop.stability import dft_hull, stability_of
    from crystaloop.settings import get_settings

    store = CandidateStore(database)
    relaxed = [
        store.get(doc["candidate_id"])
        for doc in database["candidates"].find(
            {"campaign": config.name, "state": "relaxed"}, {"candidate_id": 1}
        )
    ]
    if systems is None:
        chosen = [c for c in relaxed if all_relaxed or config.in_all_windows(c.dft)]
        systems = sorted({c.chemsys for c in chosen})
    wanted = set(systems)
    if not get_engine(config.dft.engine).dft:
        # the surrogate's hull (the CHGNet hull) already holds every prior phase: nothing to relax
        run = HullPhaseRun(systems=sorted(wanted))
    else:
        work_dir = get_settings().data_dir / "campaigns" / config.name / "hull-phases"
        run = relax_competing_phases(
            database,
            config,
            [s.split("-") for s in sorted(wanted)],
            work_dir=work_dir,
            within=within,
            log=log,
        )
    rows = []
    for candidate in relaxed:
        if candidate.chemsys not in wanted or candidate.dft.get(FORMATION_ENERGY) is None:
            continue
        hull = dft_hull(database, config, exclude=candidate.candidate_id, elements=candidate.elements)
        stability = stability_of(hull, candidate.reduced_formula, candidate.dft)
        before = candidate.dft.get("energy_above_hull")
        store.set_fields(
            candidate.candidate_id,
            {"stability": stability.model_dump(), "dft.energy_above_hull": stability.energy_above_hull},
        )
        rows.append(
            {
                "candidate_id": candidate.candidate_id,
                "formula": candidate.reduced_formula,
                "energy_above_hull_before": before,
                "energy_above_hull": stability.energy_above_hull,
                "n_phases": stability.n_phases,
                "upper_bound": stability.upper_bound,
                "decomposition": " + ".join(f"{p.fraction:.2f} {p.formula}" for p in stability.decomposition),
            }
        )
    return run, rows
