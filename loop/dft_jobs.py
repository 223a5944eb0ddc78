"""A campaign's DFT jobs: what each candidate's relaxation starts from, its flow, its submission
through the execution :class:`~crystaloop.dft.backends.Backend`, and the harvest of its result.

Jobs only return results; :meth:`CampaignJobs.collect` writes ``dft_tasks``, the reference and
DFT caches and the candidate's state from :meth:`Backend.output <crystaloop.dft.backends.Backend.output>`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from pymatgen.core import Structure

from crystaloop.db.documents import CandidateDoc, CandidateState, utcnow
from crystaloop.db.store import CandidateStore
from crystaloop.dft.backends import Backend, BackendBusy, FlowOutput, JobStatus
from crystaloop.loop.config import CampaignConfig
from crystaloop.loop.stability import corrected_values


def make_backend(execution, root_dir: Path) -> Backend:
    """The :class:`~crystaloop.dft.backends.Backend` that ``execution`` (the campaign's) names."""
    from crystaloop.dft import backends

    if execution.backend == "fireworks":
        return backends.FireWorksBackend(
            worker=execution.worker, category=execution.category, lost_after_s=execution.lost_after_s
        )
    if execution.backend == "jobflow-remote":
        return backends.JobflowRemoteBackend(
            execution.project, execution.worker, exec_config=execution.exec_config
        )
    return backends.LocalBackend(root_dir, parallel_jobs=execution.parallel_jobs, cores=execution.cores)


def starting_structure(structure: Structure, symprec: float | None = None) -> Structure:
    """A DFT starting structure: ``structure`` without site properties, optionally symmetrised.

    Site properties (CHGNet leaves ``magmom``) are dropped. With ``symprec`` (Å) the structure is
    refined to the symmetry spglib finds at that tolerance and reduced to its primitive standard
    cell (:func:`~crystaloop.loop.filters.primitive_cell`), so that the relaxation keeps that
    symmetry and needs fewer k-points; a structure whose refinement fails or changes its formula
    is returned unrefined.
    """
    from crystaloop.loop.filters import primitive_cell

    bare = Structure(structure.lattice, structure.species, structure.frac_coords)
    return bare if symprec is None else primitive_cell(bare, symprec)


class CampaignJobs:
    """The DFT jobs of one campaign.

    Parameters
    ----------
    config
        The campaign.
    database, candidates
        The crystaloop database and its candidate store.
    backend
        Returns the campaign's execution backend (made once per run by the caller).
    log
        Called with one line per event.
    """

    def __init__(
        self,
        config: CampaignConfig,
        database,
        candidates: CandidateStore,
        *,
        backend: Callable[[], Backend],
        log: Callable[[str], None],
    ) -> None:
        self.config, self.name = config, config.name
        self.database, self.candidates = database, candidates
        self.backend, self.log = backend, log

    # -- what a job runs -------------------------------------------------------------------

    def start(self, candidate: CandidateDoc) -> Structure:
        """The structure DFT starts from: the UIP-relaxed one when the screen ran (see :func:`starting_structure`)."""
        relaxed = (candidate.uip or {}).get("structure")
        raw = Structure.from_dict(relaxed) if relaxed else Structure.from_dict(candidate.structure)
        return starting_structure(raw, self.config.dft.symmetrize_start)

    def settings(self, structure: Structure) -> dict[str, Any]:
        """The DFT cache's settings (and key) for relaxing ``structure`` in this campaign."""
        from crystaloop.dft.cache import relaxation_settings

        dft = self.config.dft
        return relaxation_settings(structure, engine=dft.engine, preset=dft.preset, overrides=dft.overrides)

    def flow(self, candidate: CandidateDoc, number: int):
        """The candidate's formation-energy flow; its jobs return results and never touch the database.

        The element references already cached are looked up here, where the database is, so that
        the flow runs jobs for the missing ones only.
        """
        from crystaloop.dft.flows import FormationEnergyMaker

        structure = self.start(candidate)
        maker = FormationEnergyMaker(
            name=f"formation energy {candidate.reduced_formula}",
            engine=self.config.dft.engine,
            preset=self.config.dft.preset,
            overrides=dict(self.config.dft.overrides),
            pw_command=self._pw_command(),
            metadata={"candidate_id": candidate.candidate_id, "campaign": self.name, "round": number},
            reference_structures=self.config.dft.reference_structure_objects(),
            record=False,
        )
        return replace(maker, references=maker.cached_references(structure)).make(structure)

    def _pw_command(self) -> str | None:
        """``dft.pw_command`` with ``{np}`` set to each local job's share of the cores."""
        command = self.config.dft.pw_command
        if not command or "{np}" not in command:
            return command
        cores = getattr(self.backend(), "cores_per_job", None) or (
            (self.config.execution.resources.cores if self.config.execution.resources else None) or 1
        )
        return command.replace("{np}", str(cores))

    def _resources(self, structure: Structure) -> dict[str, Any] | None:
        """The queue resources of a job relaxing ``structure`` (by its number of sites)."""
        rules = self.config.execution.resources
        return rules.for_sites(len(structure)) if rules is not None else None

    def submit(self, candidate: CandidateDoc, number: int) -> dict[str, Any]:
        """Hand the candidate's flow to the backend (keyed by the candidate); the job's ids."""
        return self.backend().submit(
            self.flow(candidate, number),
            candidate.candidate_id,
            resources=self._resources(self.start(candidate)),
        )

    # -- collecting results ----------------------------------------------------------------

    def collect(self, candidate: CandidateDoc) -> str | None:
        """Collect one candidate's result through the backend, or retry its job; its new state
        (None while the job runs)."""
        job = dict(candidate.dft_job)
        if job.get("backend") == "cache":
            from crystaloop.dft.cache import DFTCache

            hit = DFTCache(self.database).by_task_id(job["task_id"])
            if hit is None:
                return self._finish(candidate, "failed", reason="cached result disappeared", job=job)
            return self._finish(
                candidate,
                "relaxed",
                values=hit["values"],
                task_id=hit["task_id"],
                job={**job, "from_cache": True},
            )
        backend = self.backend()
        status = backend.state(candidate.candidate_id)
        job = self._note_state(candidate, job, status)
        if status.state in ("queued", "running"):
            return None
        if status.state == "completed":
            return self._record_output(candidate, backend.output(candidate.candidate_id), job)
        attempts = int(job.get("attempts", 1))
        if attempts < self.config.execution.max_attempts:
            try:
                backend.retry(candidate.candidate_id)
            except BackendBusy as exc:  # a worker holds the job's lock: the next poll tries again
                self.log(f"  {candidate.candidate_id}: retry deferred ({exc})")
                return None
            self.log(f"  {candidate.candidate_id}: {status.state} ({status.reason}); attempt {attempts + 1}")
            # A job that never reached the job manager is submitted (again); a known one is kept.
            ids = self.submit(candidate, candidate.selected_round or 0)
            history = [*job.get("errors", []), f"{status.state}: {status.reason}"[:300]]
            self.candidates.set_fields(
                candidate.candidate_id,
                {
                    "dft_job.attempts": attempts + 1,
                    "dft_job.errors": history,
                    "dft_job.state": "queued",
                    "dft_job.state_since": utcnow(),
                    **{f"dft_job.{k}": v for k, v in ids.items()},
                },
            )
            return None
        reason = f"{status.state} after {attempts} attempt(s): {status.reason}"
        return self._finish(candidate, "failed", reason=reason[:300], job=job)

    def collect_all(self, candidate_ids: set[str]) -> None:
        """Collect these candidates' results until each has ended or ``execution.harvest_timeout_s`` passed."""
        execution, todo = self.config.execution, set(candidate_ids)
        deadline = time.monotonic() + execution.harvest_timeout_s
        while todo and time.monotonic() < deadline:
            for cid in sorted(todo):
                candidate = self.candidates.get(cid)
                if candidate is None or candidate.state != CandidateState.SUBMITTED.value:
                    todo.discard(cid)
                elif self.collect(candidate) is not None:
                    todo.discard(cid)
            if todo:
                # Local workers are this machine's processes: their state is cheap to read.
                interval = execution.poll_interval_s
                time.sleep(min(interval, 0.5) if execution.backend == "local" else interval)

    def _note_state(self, candidate: CandidateDoc, job: dict[str, Any], status: JobStatus) -> dict[str, Any]:
        """Record the job manager's state on the candidate when it changed; the updated job."""
        if job.get("state") == status.state and job.get("state_reason") == status.reason:
            return job
        fields = {
            "state": status.state,
            "state_reason": status.reason,
            "state_since": status.since or utcnow(),
        }
        fields.update({k: v for k, v in status.ids.items() if v is not None})
        self.candidates.set_fields(candidate.candidate_id, {f"dft_job.{k}": v for k, v in fields.items()})
        return {**job, **fields}

    def _record_output(self, candidate: CandidateDoc, output: FlowOutput, job: dict[str, Any]) -> str:
        """Write a finished flow's outputs: ``dft_tasks``, the reference and DFT caches, the candidate."""
        from crystaloop.dft import records
        from crystaloop.dft.cache import DFTCache

        task, fe = output.task, output.formation_energy
        if task is None:
            return self._finish(
                candidate, "failed", reason="its flow completed without a relaxation output", job=job
            )
        value = fe.formation_energy_per_atom if fe is not None and fe.state == "successful" else None
        task = task.model_copy(update={"formation_energy_per_atom": value})
        records.save_task(task, database=self.database)
        # The element references the flow computed, cached as the jobs do when they reach the database.
        records.cache_references(output.references, database=self.database)
        if not task.successful or value is None:
            reasons = (fe.reasons if fe is not None else []) or task.reasons or ["no formation energy"]
            return self._finish(
                candidate, "failed", reason="; ".join(reasons)[:300], task_id=task.task_id, job=job
            )
        values = {"formation_energy_per_atom": value, "energy_per_atom": task.energy_per_atom}
        if task.band_gap is not None:
            values["band_gap"] = task.band_gap
        job.update(relaxation_change(task.model_dump(mode="json")))
        structure = self.start(candidate)
        DFTCache(self.database).put(
            structure,
            self.settings(structure),
            task,
            values,
            source={"campaign": self.name, "candidate_id": candidate.candidate_id},
        )
        return self._finish(candidate, "relaxed", values=values, task_id=task.task_id, job=job)

    def _finish(
        self, candidate: CandidateDoc, state: str, *, values=None, task_id=None, reason=None, job=None
    ) -> str:
        update: dict[str, Any] = {"dft_engine": self.config.dft.engine, "dft_job": job or candidate.dft_job}
        if values is not None:
            values, correction = corrected_values(self.config, candidate.reduced_formula, values)
            update["dft_job"] = {**(update["dft_job"] or {}), "anion_correction": correction}
            stability = self._stability(candidate, values)
            if stability is not None:
                values = {**values, "energy_above_hull": stability.energy_above_hull}
                update["stability"] = stability.model_dump()
            update["dft"] = values
        if task_id is not None:
            update["dft_task_id"] = task_id
        self.candidates.transition(
            candidate.candidate_id, state, reason=reason, stage="dft" if reason else None, update=update
        )
        return state

    def _stability(self, candidate: CandidateDoc, values: dict[str, Any]):
        """The candidate's DFT result against its engine's hull (everything relaxed before it)."""
        from crystaloop.loop.stability import dft_hull, stability_of

        hull = dft_hull(
            self.database, self.config, exclude=candidate.candidate_id, elements=candidate.elements
        )
        return stability_of(hull, candidate.reduced_formula, values)

    # -- requeueing (``crystaloop campaign retry``) -----------------------------------------

    def requeue_lost(self) -> list[str]:
        """Retry the submitted candidates whose job the backend reports lost; their ids."""
        backend, done = self.backend(), []
        for candidate in self.candidates.in_state(self.name, CandidateState.SUBMITTED):
            if candidate.dft_job.get("backend") in (None, "cache"):
                continue
            if backend.state(candidate.candidate_id).state == "lost" and self._retry(candidate):
                done.append(candidate.candidate_id)
        return done

    def requeue_failed(self) -> list[str]:
        """Put the candidates that failed at the DFT stage back to ``submitted`` with a fresh
        ``execution.max_attempts``; their ids."""
        done = []
        for candidate in self.candidates.in_state(self.name, CandidateState.FAILED):
            job = dict(candidate.dft_job)
            if job.get("backend") in (None, "cache"):
                continue  # rejected before DFT, or a cached failure: nothing to rerun
            if not self._retry(candidate):
                continue
            ids = self.submit(candidate, candidate.selected_round or 0)
            errors = [*job.get("errors", []), (candidate.state_history[-1].get("reason") or "failed")[:300]]
            self.candidates.transition(
                candidate.candidate_id,
                CandidateState.SUBMITTED,
                update={"dft_job": {**job, **ids, "attempts": 1, "errors": errors, "state": "queued",
                                    "state_since": utcnow()}},
            )  # fmt: skip
            done.append(candidate.candidate_id)
        return done

    def _retry(self, candidate: CandidateDoc) -> bool:
        try:
            self.backend().retry(candidate.candidate_id)
        except BackendBusy as exc:
            self.log(f"  {candidate.candidate_id}: not retried now ({exc}); run retry again")
            return False
        return True


def relaxation_change(output: dict[str, Any]) -> dict[str, float]:
    """Mean site displacement (Å) and energy change (eV/atom) of a relaxation, where known."""
    out: dict[str, float] = {}
    initial, final = output.get("initial_structure"), output.get("final_structure")
    if initial and final:
        a, b = Structure.from_dict(initial), Structure.from_dict(final)
        if len(a) == len(b):
            frac = b.frac_coords - a.frac_coords
            frac -= np.round(frac)
            out["mean_displacement_angstrom"] = float(
                np.linalg.norm(b.lattice.get_cartesian_coords(frac), axis=1).mean()
            )
    steps = output.get("ionic_steps") or []
    energies = [s.get("energy") for s in steps if isinstance(s, dict) and s.get("energy") is not None]
    if len(energies) >= 2 and final:
        out["energy_change_per_atom"] = float((energies[-1] - energies[0]) / len(Structure.from_dict(final)))
    return out
