"""The campaign loop: rounds of generate → acquire → submit → harvest → retrain → report.

Every step writes its record (inputs, outputs, counts, model versions) on the
round's document in ``campaign_rounds`` before the next step starts, and every
candidate move is one conditional update in ``candidates``. A campaign killed at
any moment therefore resumes from its last completed step:

- ``generate`` stores its survivors in one insert tagged with the round's
  generation id; a re-run finds them (rebuilding their summaries and counts
  when the kill fell inside the insert) and does not generate again;
- ``acquire`` counts what this round already selected and tops up only;
- ``submit`` hands each candidate's flow to the execution backend (keyed by the
  candidate, so a second submit finds the first) and only then moves the candidate to
  ``submitted``: nothing is submitted twice and no candidate waits on a job that does not exist;
- ``harvest`` reads every ``submitted`` candidate's job state through the backend
  (:class:`~crystaloop.dft.backends.Backend`), retries failed and lost jobs up to
  ``execution.max_attempts``, and writes ``dft_tasks``, the caches and the candidate's state
  from the jobs' outputs (jobs never write the database); it also takes any of earlier
  rounds still running when their round's harvest timed out;
- ``retrain`` fine-tunes from the models the round started with: the campaign
  takes the new versions only once the step is recorded done, so a re-run
  gives the same versions.

One process acts on a campaign at a time: it holds a lease renewed by a
heartbeat thread; a stale lease is taken over.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pymatgen.core import Structure
from pymongo.errors import AutoReconnect, ConnectionFailure, ServerSelectionTimeoutError

from crystaloop.db.campaigns import CampaignStore, LeaseLost
from crystaloop.db.documents import ROUND_STEPS, CandidateDoc, CandidateState, StepRecord, utcnow
from crystaloop.db.store import CandidateStore
from crystaloop.dft.backends import Backend, BackendBusy, FlowOutput, JobStatus
from crystaloop.errors import DatabaseUnavailable, UserError
from crystaloop.loop.acquire import AcquisitionContext, get_acquisition, select_batch
from crystaloop.loop.config import CampaignConfig
from crystaloop.loop.retrain import DFTResult, HookContext, enabled_hooks, run_hooks
from crystaloop.loop.stability import corrected_values

if TYPE_CHECKING:  # generation imports torch; the campaign loads it only when generating
    from crystaloop.loop.generation import BaseCompound

KILL_ENV = "CRYSTALOOP_KILL_AT"
"""Fault injection for the resume tests: ``step:point[,step:point]`` makes the process SIGKILL itself."""

DB_ERRORS = (AutoReconnect, ConnectionFailure, ServerSelectionTimeoutError)


class Blocked(Exception):
    """Raised by the harvest of a ``run(until_blocked=True)`` when only DFT jobs are left to wait on."""


def fault_point(step: str, point: str) -> None:
    """SIGKILL this process when ``step:point`` is listed in ``$CRYSTALOOP_KILL_AT`` (tests only)."""
    wanted = os.environ.get(KILL_ENV, "")
    if wanted and f"{step}:{point}" in {w.strip() for w in wanted.split(",")}:
        os.kill(os.getpid(), signal.SIGKILL)


#: The round metrics that count things (the rest are rates and errors).
ROUND_COUNTS = (
    "generated",
    "shortlisted",
    "selected",
    "submitted",
    "cache_hits",
    "relaxed",
    "failed",
    "hits",
)


@dataclass
class RoundOutcome:
    """Summary of one finished round (counts and rates are also on the round document)."""

    round: int
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class CampaignResult:
    """How a ``run`` ended."""

    name: str
    status: str
    reason: str
    rounds: list[RoundOutcome] = field(default_factory=list)


class _Heartbeat(threading.Thread):
    """Renews the lease every ``interval`` seconds; notes when it was lost."""

    def __init__(self, campaign: Campaign, token: str, *, interval: float, ttl: float) -> None:
        super().__init__(daemon=True, name=f"lease-{campaign.name}")
        self.campaign, self.token, self.interval, self.ttl = campaign, token, interval, ttl
        self.stop_event = threading.Event()
        self.lost = False

    def run(self) -> None:
        while not self.stop_event.wait(self.interval):
            try:
                if not self.campaign.campaigns.renew_lease(self.campaign.name, self.token, ttl_s=self.ttl):
                    self.lost = True
                    return
            except DB_ERRORS:  # the main thread rides out the outage; keep trying
                continue


class Campaign:
    """An active-learning campaign built from a validated config.

    Parameters
    ----------
    config
        The campaign configuration.
    database
        The crystaloop database (default: the configured one).
    log
        Called with one human-readable line per event (default: silent).
    progress
        Called as ``progress(step, done, total)`` during long steps.
    lease_ttl_s, heartbeat_s
        A lease not renewed within ``lease_ttl_s`` may be taken over; it is renewed every
        ``heartbeat_s``.
    """

    def __init__(
        self,
        config: CampaignConfig,
        *,
        database=None,
        log: Callable[[str], None] | None = None,
        progress: Callable[[str, int, int], None] | None = None,
        lease_ttl_s: float = 120.0,
        heartbeat_s: float = 20.0,
    ) -> None:
        from crystaloop.db import get_database

        self.config = config
        self.name = config.name
        self.log = log or (lambda line: None)
        self.progress = progress
        self.lease_ttl_s, self.heartbeat_s = lease_ttl_s, heartbeat_s
        self._connect(database if database is not None else get_database())
        self.token: str | None = None
        self._heartbeat: _Heartbeat | None = None
        self.models: dict[str, str] = {}
        self.model_names: dict[str, str] = {}
        self._retrying = False  # the running step had an interrupted earlier attempt
        self._backend_instance: Backend | None = None
        self.until_blocked = False

    def _connect(self, database) -> None:
        self.database = database
        self.campaigns = CampaignStore(database)
        self.candidates = CandidateStore(database)

    def _reconnect(self) -> None:
        """Connect again after an outage; with no URI configured this restarts the embedded server."""
        from crystaloop.db import get_database
        from crystaloop.db.connection import _client

        _client.cache_clear()
        try:
            self._connect(get_database())
            # A server killed hard may come back without its last writes, the lease among them.
            self.campaigns.ensure(self.name, self.config.model_dump(mode="json"))
            lease = self.campaigns.acquire_lease(self.name, ttl_s=self.lease_ttl_s, replace_token=self.token)
        except (UserError, *DB_ERRORS):  # not back yet; the caller retries
            return
        if lease is None:
            raise LeaseLost(self.name)
        self.token = lease.token
        if self._heartbeat is not None:
            self._heartbeat.token = lease.token

    # -- running ---------------------------------------------------------------------------

    def prepare(self) -> None:
        """First run on a fresh install: load the shipped prior data, build the local PBE family.

        Both are what ``crystaloop data load-prior`` and ``crystaloop dft pseudos build-local`` do;
        they run only when missing, so a campaign needs no other set-up command.
        """
        if self.database["training_structures"].count_documents({"source": "prior"}, limit=1) == 0:
            from crystaloop.db.training import replace_dataset
            from crystaloop.generative.data import prior

            self.log("loading the shipped prior training data (first run)")
            doc = prior.read_prior(prior.SHIPPED_PATH)
            replace_dataset(self.database, doc["dataset"], prior.to_documents(doc))
        if self.config.dft.engine == "espresso":
            from crystaloop.settings import get_settings

            settings = get_settings()
            if not settings.pseudo_family and not settings.resolved_pseudo_family().is_file():
                from crystaloop.dft.pseudos import build_local_family

                self.log(f"building the local PBE family in {settings.resolved_pseudo_dir()} (first run)")
                build_local_family(settings.resolved_pseudo_dir())

    @staticmethod
    def check_dft(config: CampaignConfig) -> list[str]:
        """Check what must hold before any work: element references and DFT trust.

        Returns
        -------
        list of str
            Warnings, one line each (e.g. cutoffs below the family's suggestion).

        Raises
        ------
        UserError
            An allowed element without a reference structure, or refused by the verification.
        """
        if config.dft.engine == "espresso":
            from crystaloop.dft.espresso.inputs import load_preset

            load_preset(config.dft.preset)  # an unknown or invalid preset is one line now, not at submit
            if config.dft.pw_command:
                from crystaloop.dft.espresso.run import require_executables

                require_executables(config.dft.pw_command, "dft.pw_command")
        elements = [e for e in (config.elements.allow or []) if e not in set(config.elements.deny)]
        if not elements:
            return []
        from crystaloop.dft.references import check_references

        check_references(elements, supplied=config.dft.reference_structures)
        if config.dft.engine != "espresso":
            return []
        from crystaloop.dft.verification import campaign_dft_problems

        warnings, refusals = campaign_dft_problems(
            elements,
            preset=config.dft.preset,
            allow_unverified=config.dft.allow_unverified,
            override_hint="dft.allow_unverified: true in the campaign file",
        )
        if refusals:
            raise UserError(refusals[0], refusals[1:])
        return warnings

    @staticmethod
    def check_execution(config: CampaignConfig) -> None:
        """Refuse an execution backend that cannot work as configured.

        Raises
        ------
        UserError
            A remote backend (FireWorks, jobflow-remote) with no MongoDB URI: the embedded
            server serves this workstation only, and its workers could not deliver results.
        """
        from crystaloop.settings import get_settings

        backend = config.execution.backend
        if backend != "local" and not get_settings().mongodb_uri:
            raise UserError(
                f"execution.backend {backend} needs a MongoDB its workers and runner can reach; set "
                "CRYSTALOOP_MONGODB_URI (the embedded server serves this workstation only) or use backend local"
            )

    def run(self, *, max_rounds: int | None = None, until_blocked: bool = False) -> CampaignResult:
        """Run (or resume) the campaign until a stop rule fires or a stop is requested.

        With ``until_blocked`` it returns (status ``blocked``) as soon as the harvest has only
        DFT jobs left to wait on; a later call resumes there (for cron or scrontab).

        Raises
        ------
        UserError
            Another live process holds the campaign, or the database stayed unreachable.
        """
        config_doc = self.config.model_dump(mode="json")
        existing = self.campaigns.get(self.name)
        self.campaigns.ensure(self.name, config_doc)
        lease = self.campaigns.acquire_lease(
            self.name, ttl_s=self.lease_ttl_s, replace_token=self.campaigns.dead_local_holder(self.name)
        )
        if lease is None:
            holder = self.campaigns.get(self.name).lease
            raise UserError(
                f"campaign {self.name!r} is being run by {holder.owner} (lease until "
                f"{holder.expires_at:%H:%M:%S} UTC); wait for it, or stop it with "
                f"`crystaloop campaign stop {self.name}`"
            )
        self.token = lease.token
        self._heartbeat = _Heartbeat(self, self.token, interval=self.heartbeat_s, ttl=self.lease_ttl_s)
        self._heartbeat.start()
        try:
            self.check_execution(self.config)
            self.prepare()
            for line in self.check_dft(self.config):
                self.log(f"warning: {line}")
            if existing is not None:
                self.log(
                    f"resuming campaign {self.name} ({len(self.campaigns.all_rounds(self.name))} round(s) on record)"
                )
            self.campaigns.update(
                self.name,
                self.token,
                config=config_doc,
                status="running",
                stop_requested=False,
                status_reason=None,
            )
            self.until_blocked = until_blocked
            return self._rounds(max_rounds or self.config.max_rounds)
        except Blocked as exc:
            reason = f"{exc}; run again to continue"
            self._guard(
                lambda: self.campaigns.update(self.name, self.token, status="waiting", status_reason=reason)
            )
            self.log(f"campaign {self.name} blocked: {reason}")
            return CampaignResult(self.name, "blocked", reason)
        except LeaseLost:
            raise UserError(
                f"campaign {self.name!r}: another process took the lease over; this one stopped "
                "without acting further"
            ) from None
        finally:
            if not self.until_blocked:  # workers of a blocked run go on and record their own end
                self._close_backend()
            self._heartbeat.stop_event.set()
            try:
                self.campaigns.release_lease(self.name, self.token)
            except DB_ERRORS:
                pass

    def retry(self, *, failed: bool = True, lost: bool = True, wait: bool = True) -> dict[str, list[str]]:
        """Put the campaign's failed DFT jobs and its lost ones back in the queue.

        ``failed``: candidates that ended ``failed`` at the DFT stage go back to ``submitted``
        with a fresh ``execution.max_attempts``. ``lost``: submitted candidates whose job the
        backend reports lost are requeued now. With ``wait`` this process then harvests them
        (holding the campaign's lease) until each is relaxed or failed again.

        Raises
        ------
        UserError
            ``wait`` while another live process holds the campaign.
        """
        retried: dict[str, list[str]] = {"failed": [], "lost": []}
        backend = self._backend()
        if lost:
            for candidate in self._in_state(CandidateState.SUBMITTED):
                if candidate.dft_job.get("backend") in (None, "cache"):
                    continue
                if backend.state(candidate.candidate_id).state == "lost":
                    try:
                        backend.retry(candidate.candidate_id)
                    except BackendBusy as exc:
                        self.log(f"  {candidate.candidate_id}: not retried now ({exc}); run retry again")
                        continue
                    retried["lost"].append(candidate.candidate_id)
        if failed:
            for candidate in self._in_state(CandidateState.FAILED):
                job = dict(candidate.dft_job)
                if job.get("backend") in (None, "cache"):
                    continue  # rejected before DFT, or a cached failure: nothing to rerun
                try:
                    backend.retry(candidate.candidate_id)
                except BackendBusy as exc:
                    self.log(f"  {candidate.candidate_id}: not retried now ({exc}); run retry again")
                    continue
                ids = backend.submit(
                    self._flow(candidate, candidate.selected_round or 0),
                    candidate.candidate_id,
                    resources=self._resources(self._dft_start(candidate)),
                )
                errors = [
                    *job.get("errors", []),
                    (candidate.state_history[-1].get("reason") or "failed")[:300],
                ]
                self.candidates.transition(
                    candidate.candidate_id,
                    CandidateState.SUBMITTED,
                    update={"dft_job": {**job, **ids, "attempts": 1, "errors": errors, "state": "queued",
                                        "state_since": utcnow()}},
                )  # fmt: skip
                retried["failed"].append(candidate.candidate_id)
        todo = set(retried["failed"]) | set(retried["lost"])
        if wait and todo:
            self._harvest_retried(todo)
        return retried

    def _harvest_retried(self, todo: set[str]) -> None:
        lease = self.campaigns.acquire_lease(
            self.name, ttl_s=self.lease_ttl_s, replace_token=self.campaigns.dead_local_holder(self.name)
        )
        if lease is None:
            raise UserError(
                f"campaign {self.name!r} is being run by another process; its harvest collects the "
                "retried jobs (or pass --no-wait)"
            )
        self.token = lease.token
        try:
            deadline = time.monotonic() + self.config.execution.harvest_timeout_s
            while todo and time.monotonic() < deadline:
                for cid in sorted(todo):
                    candidate = self.candidates.get(cid)
                    if candidate is None or candidate.state != CandidateState.SUBMITTED.value:
                        todo.discard(cid)
                    elif self._harvest_one(candidate) is not None:
                        todo.discard(cid)
                if todo:
                    time.sleep(min(self.config.execution.poll_interval_s, 0.5)
                               if self.config.execution.backend == "local"
                               else self.config.execution.poll_interval_s)  # fmt: skip
        finally:
            self._close_backend()
            self.campaigns.release_lease(self.name, self.token)

    def _rounds(self, max_rounds: int) -> CampaignResult:
        outcomes: list[RoundOutcome] = []
        self._adopt_retrained_models()
        self.log("models: " + ", ".join(f"{kind} {version}" for kind, version in self._versions().items()))
        number = self._first_open_round()
        while True:
            done, reason = self._should_stop(number, max_rounds)
            if done:
                self._guard(
                    lambda r=reason: self.campaigns.update(
                        self.name, self.token, status="finished", status_reason=r
                    )
                )
                self.log(f"campaign {self.name} finished: {reason}")
                return CampaignResult(self.name, "finished", reason, outcomes)
            self._guard(lambda n=number: self.campaigns.start_round(self.name, n))
            for step in ROUND_STEPS:
                if self._stop_requested():
                    reason = f"stop requested; resumes at round {number} step {step}"
                    self._guard(
                        lambda r=reason: self.campaigns.update(
                            self.name, self.token, status="stopped", status_reason=r
                        )
                    )
                    self.log(f"campaign {self.name} stopped: {reason}")
                    return CampaignResult(self.name, "stopped", reason, outcomes)
                self._run_step(number, step)
            record = self._guard(lambda n=number: self.campaigns.round(self.name, n))
            outcomes.append(RoundOutcome(number, dict(record.metrics) if record else {}))
            number += 1

    def _run_step(self, number: int, step: str) -> None:
        record = self._guard(
            lambda: self.campaigns.round(self.name, number) or self.campaigns.start_round(self.name, number)
        )
        if step in record.steps and record.steps[step].status == "done":
            return
        # An earlier attempt of this step was interrupted (killed or failed).
        self._retrying = step in record.steps
        self._check_lease()
        self.log(f"round {number}: {step}")
        started = StepRecord(name=step, model_versions=self._versions())
        self._guard(lambda: self.campaigns.record_step(self.name, number, started))
        fault_point(step, "start")
        try:
            outputs, metrics = self._guard(
                lambda: getattr(self, f"_step_{step}")(number), what=f"round {number} {step}"
            )
        except (LeaseLost, DatabaseUnavailable, Blocked):
            raise
        except Exception as exc:
            # The step's record and the campaign say what stopped them; a rerun retries the step.
            error = exc.message if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
            failed = started.model_copy(
                update={"status": "failed", "error": error[:2000], "finished_at": utcnow()}
            )
            self._guard(lambda: self.campaigns.record_step(self.name, number, failed))
            self._guard(
                lambda: self.campaigns.update(
                    self.name,
                    self.token,
                    status="failed",
                    status_reason=f"round {number} {step}: {error[:300]}",
                )
            )
            raise
        fault_point(step, "end")
        now = utcnow()
        finished = started.model_copy(
            update={
                "status": "done",
                "outputs": outputs,
                "finished_at": now,
                "wall_s": (now - started.started_at).total_seconds(),
                "model_versions": self._versions(),
            }
        )
        self._guard(lambda: self.campaigns.record_step(self.name, number, finished, metrics=metrics))
        if step == "retrain":
            self._guard(self._adopt_retrained_models)

    # -- steps -------------------------------------------------------------------------------

    def _step_generate(self, number: int) -> tuple[dict, dict]:
        from crystaloop.loop.generation import generate_candidates, why_empty

        generation_id = f"{self.name}-r{number}"
        # This step stores its candidates of the round in one insert: any of them means done.
        stored = sum(self.candidates.count_by_state(self.name, round=number).values())
        if not stored and self._retrying:
            # Killed inside that insert: candidates stored, their summaries or counter not yet.
            stored = self.candidates.repair_round(self.name, number)
        if stored:
            # Candidates of the round may come from `crystaloop generate`; only the step's own count.
            stored = self.database["candidates"].count_documents(
                {"campaign": self.name, "round": number, "provenance.generation_id": generation_id}
            )
        if stored:
            self.log(f"  {stored} candidates of {generation_id} already stored; not generating again")
            return {"generation_id": generation_id, "n_shortlisted": stored, "resumed": True}, {}
        hits = self._hit_compounds() if self.config.sampling.around_hits else []
        report = generate_candidates(
            self.config,
            database=self.database,
            n=self.config.budget.candidates_per_round,
            round=number,
            generation_id=generation_id,
            seed=self.config.seed * 1000 + number,
            models=self.models,
            progress=self.progress,
            hits=hits,
        )
        out = report.model_dump(mode="json")
        around = out["parameters"].get("around_hits")
        if around:
            self.log(f"  {around} of the samples drawn around {len(hits)} hit(s)")
        self.log(f"  generated {out['n_requested']}, shortlisted {out['n_shortlisted']}")
        empty = why_empty(out["stages"], out["rejected_reasons"])
        if empty:
            self.log(f"  {empty}")
        return out, {"generated": out["n_requested"], "shortlisted": out["n_shortlisted"]}

    def _step_acquire(self, number: int) -> tuple[dict, dict]:
        acq = self.config.acquisition
        picked = [
            CandidateDoc.model_validate(d)
            for d in self.candidates.collection.find(
                {"campaign": self.name, "selected_round": number}, {"_id": 0}
            )
        ]
        already = len(picked)
        budget = self.config.budget.dft_per_round
        if self.config.stop.max_dft is not None:
            budget = min(budget, self.config.stop.max_dft - self._dft_total() + already)
        need = max(budget - already, 0)
        pool = sorted(self._in_state(CandidateState.SHORTLISTED), key=lambda c: c.candidate_id)
        rng = np.random.default_rng(self.config.seed * 7919 + number)
        calibration = self._sigma_calibration() if acq.calibrate else {}
        context = AcquisitionContext(
            windows=tuple((t.property, t.min, t.max) for t in self.config.targets),
            kappa=acq.kappa,
            uip_sigma=acq.uip_sigma,
            rng=rng,
            sigma_scale={p: c["scale"] for p, c in calibration.items() if c["scale"] is not None},
        )
        scores = get_acquisition(acq.strategy)(pool, context) if pool else np.zeros(0)
        batch = select_batch(
            pool,
            scores,
            budget=need,
            max_per_formula=acq.max_per_formula,
            max_per_chemsys=acq.max_per_chemsys,
            epsilon=acq.epsilon,
            rng=rng,
            preselected=picked,
        )
        for i, (candidate, score) in enumerate(batch):
            self.candidates.transition(
                candidate.candidate_id,
                CandidateState.SELECTED,
                update={"acquisition_score": score, "selected_round": number},
            )
            if i == 0:
                fault_point("acquire", "mid")
        selected = already + len(batch)
        self.log(f"  selected {selected} of {len(pool) + already} shortlisted ({acq.strategy})")
        for prop, c in calibration.items():
            if c["scale"] is not None:
                self.log(f"  {prop}: ensemble std x{c['scale']:.2f}, fitted on {c['n']} DFT results")
        return {
            "strategy": acq.strategy,
            "sigma_scale": calibration,
            "pool": len(pool),
            "selected": selected,
            "candidate_ids": [c.candidate_id for c, _ in batch],
            "scores": [s for _, s in batch],
        }, {"selected": selected}

    def _step_submit(self, number: int) -> tuple[dict, dict]:
        from crystaloop.dft.cache import DFTCache

        cache = DFTCache(self.database)
        backend = self._backend()
        submitted, cached = 0, 0
        docs = list(
            self.candidates.collection.find(
                {"campaign": self.name, "selected_round": number, "state": CandidateState.SELECTED.value},
                {"_id": 0},
            ).sort("candidate_id", 1)
        )
        for i, raw in enumerate(docs):
            candidate = CandidateDoc.model_validate(raw)
            structure = self._dft_start(candidate)
            settings = self._relaxation_settings(structure)
            hit = cache.lookup(structure, settings)
            if hit is not None:
                job = {
                    "backend": "cache",
                    "task_id": hit["task_id"],
                    "settings_key": settings["key"],
                    "attempts": 0,
                }
                cached += 1
            else:
                # The job exists before the candidate says so; a kill in between leaves it
                # selected, and the rerun's submit finds the same job (keyed by the candidate).
                ids = backend.submit(
                    self._flow(candidate, number),
                    candidate.candidate_id,
                    resources=self._resources(structure),
                )
                fault_point("submit", "queued")
                now = utcnow()
                job = {
                    "backend": backend.name,
                    "settings_key": settings["key"],
                    "attempts": 1,
                    "submitted_at": now,
                    "state": "queued",
                    "state_since": now,
                    **ids,
                }
                submitted += 1
            self.candidates.transition(
                candidate.candidate_id, CandidateState.SUBMITTED, update={"dft_job": job}
            )
            if i == 0:
                fault_point("submit", "mid")
        self.log(f"  submitted {submitted} to {backend.name}, {cached} answered by the DFT cache")
        return {"submitted": submitted, "cache_hits": cached, "queued": submitted, "backend": backend.name}, {
            "submitted": submitted + cached,
            "cache_hits": cached,
        }

    def _step_harvest(self, number: int) -> tuple[dict, dict]:
        backend = self.config.execution.backend
        deadline = time.monotonic() + self.config.execution.harvest_timeout_s
        relaxed = failed = 0
        total = self.candidates.collection.count_documents({"campaign": self.name, "selected_round": number})
        while True:
            # Earlier rounds' jobs still running when their harvest timed out are collected here.
            pending = [
                CandidateDoc.model_validate(d)
                for d in self.candidates.collection.find(
                    {
                        "campaign": self.name,
                        "selected_round": {"$lte": number},
                        "state": CandidateState.SUBMITTED.value,
                    },
                    {"_id": 0},
                ).sort("candidate_id", 1)
            ]
            for candidate in pending:
                self._check_lease()
                outcome = self._harvest_one(candidate)
                relaxed += outcome == "relaxed"
                failed += outcome == "failed"
                if self.progress:
                    done = self.candidates.collection.count_documents(
                        {
                            "campaign": self.name,
                            "selected_round": number,
                            "state": {"$in": ["relaxed", "failed"]},
                        }
                    )
                    self.progress("harvest", done, total)
                if outcome is not None:
                    fault_point("harvest", "mid")
            # Waits for this round's jobs only: an earlier straggler is taken when it ends.
            still = self.candidates.collection.count_documents(
                {"campaign": self.name, "selected_round": number, "state": CandidateState.SUBMITTED.value}
            )
            if still == 0:
                break
            if time.monotonic() > deadline:
                self.log(
                    f"  harvest timed out with {still} job(s) still running; they are collected next round"
                )
                break
            if self.until_blocked:
                raise Blocked(f"round {number} waits on {still} DFT job(s)")
            # Local workers are this machine's processes: their state is cheap to read.
            interval = self.config.execution.poll_interval_s
            time.sleep(min(interval, 0.5) if backend == "local" else interval)
        hits = self._hits(selected_round=number)
        n_done = self.candidates.collection.count_documents(
            {"campaign": self.name, "selected_round": number, "state": "relaxed"}
        )
        n_failed = self.candidates.collection.count_documents(
            {"campaign": self.name, "selected_round": number, "state": "failed"}
        )
        rate = len(hits) / n_done if n_done else None
        self.log(f"  relaxed {n_done}, failed {n_failed}, hits {len(hits)}")
        return {"relaxed": n_done, "failed": n_failed, "hits": hits, "harvested_now": relaxed + failed}, {
            "relaxed": n_done,
            "failed": n_failed,
            "hits": len(hits),
            "hit_rate": rate,
        }

    def _step_retrain(self, number: int) -> tuple[dict, dict]:
        settings = self.config.retrain
        results = self._dft_results()
        # New: relaxed since the last retrain that ran (skipped rounds' results wait for the next one).
        last = self._last_retrained_round(number)
        new = [r for r in results if r.round > last]
        if (number + 1) % settings.every != 0 or len(new) < settings.min_new_results:
            reason = (
                f"{len(new)} new DFT result(s); retraining needs {settings.min_new_results}"
                if len(new) < settings.min_new_results
                else f"retraining runs every {settings.every} round(s)"
            )
            self.log(f"  retrain skipped: {reason}")
            return {"skipped": reason}, {}
        work_dir = self._work_dir() / "models"
        work_dir.mkdir(parents=True, exist_ok=True)
        context = HookContext(
            campaign=self.name,
            round=number,
            config=self.config,
            database=self.database,
            models=dict(self.models),
            results=results,
            new_results=new,
            work_dir=work_dir,
        )
        outcomes = run_hooks(enabled_hooks(settings), context)
        versions = dict(self.campaigns.get(self.name).model_versions)
        metrics: dict[str, Any] = {}
        for outcome in outcomes:
            if outcome.status == "done":
                versions.update(outcome.new_models)
            self.log(
                f"  {outcome.name}: {outcome.status}"
                + (f" ({outcome.error})" if outcome.error else "")
                + (f" -> {', '.join(outcome.new_models.values())}" if outcome.new_models else "")
            )
        cg = next((o for o in outcomes if o.name == "cgcnn_finetune" and o.status == "done"), None)
        if cg is not None:
            target = self.config.targets[0].property
            metrics = {
                "mae_before": cg.metrics["mae_before"].get(target),
                "mae_after": cg.metrics["mae_after"].get(target),
                "mae_screening": cg.metrics["mae_screening"].get(target),
            }
        # The campaign adopts ``versions`` once this step is recorded done (_adopt_retrained_models):
        # a kill before that reruns the hooks from the models the round started with.
        return {
            "model_versions": versions,
            "hooks": [
                {
                    "name": o.name,
                    "status": o.status,
                    "metrics": o.metrics,
                    "new_models": o.new_models,
                    "error": o.error,
                }
                for o in outcomes
            ],
        }, metrics

    def _step_report(self, number: int) -> tuple[dict, dict]:
        rounds = self.campaigns.all_rounds(self.name)
        cumulative = len(self._hits())
        current = next(r for r in rounds if r.round == number)
        # Metrics are stored as floats; the counts among them go on the round as integers.
        counts = {k: int(current.metrics[k]) for k in ROUND_COUNTS if current.metrics.get(k) is not None}
        self.campaigns.finish_round(self.name, number, counts)
        outputs: dict[str, Any] = {"cumulative_hits": cumulative}
        try:
            from crystaloop.loop.report import write_report

            paths = write_report(self.database, self.name, self._work_dir())
            outputs["files"] = [str(p) for p in paths]
        except ImportError:
            pass
        self.log(f"  cumulative hits: {cumulative}")
        return outputs, {"cumulative_hits": cumulative}

    # -- DFT helpers -------------------------------------------------------------------------

    def _dft_start(self, candidate: CandidateDoc) -> Structure:
        """The structure DFT starts from: the UIP-relaxed one when the screen ran (see :func:`starting_structure`)."""
        relaxed = (candidate.uip or {}).get("structure")
        raw = Structure.from_dict(relaxed) if relaxed else Structure.from_dict(candidate.structure)
        return starting_structure(raw, self.config.dft.symmetrize_start)

    def _relaxation_settings(self, structure: Structure) -> dict[str, Any]:
        """The DFT cache's settings (and key) for relaxing ``structure`` in this campaign."""
        from crystaloop.dft.cache import relaxation_settings

        dft = self.config.dft
        return relaxation_settings(structure, engine=dft.engine, preset=dft.preset, overrides=dft.overrides)

    def _flow(self, candidate: CandidateDoc, number: int):
        """The candidate's formation-energy flow; its jobs return results and never write the database."""
        from crystaloop.dft.flows import FormationEnergyFlow

        return FormationEnergyFlow(
            self._dft_start(candidate),
            engine=self.config.dft.engine,
            preset=self.config.dft.preset,
            overrides=dict(self.config.dft.overrides),
            pw_command=self._pw_command(),
            metadata={"candidate_id": candidate.candidate_id, "campaign": self.name, "round": number},
            name=f"formation energy {candidate.reduced_formula}",
            reference_structures=self.config.dft.reference_structure_objects(),
            record=False,
        )

    def _pw_command(self) -> str | None:
        """``dft.pw_command`` with ``{np}`` set to each local job's share of the cores."""
        command = self.config.dft.pw_command
        if not command or "{np}" not in command:
            return command
        backend = self._backend()
        cores = getattr(backend, "cores_per_job", None) or (
            (self.config.execution.resources.cores if self.config.execution.resources else None) or 1
        )
        return command.replace("{np}", str(cores))

    def _resources(self, structure: Structure) -> dict[str, Any] | None:
        """The queue resources of a job relaxing ``structure`` (by its number of sites)."""
        rules = self.config.execution.resources
        return rules.for_sites(len(structure)) if rules is not None else None

    def _backend(self) -> Backend:
        """The execution backend of this campaign (made once per run)."""
        if self._backend_instance is None:
            self._backend_instance = make_backend(self.config.execution, self._work_dir() / "jobs")
        return self._backend_instance

    def _close_backend(self) -> None:
        backend, self._backend_instance = self._backend_instance, None
        if backend is not None and hasattr(backend, "close"):
            backend.close()

    def _harvest_one(self, candidate: CandidateDoc) -> str | None:
        """Collect one candidate's result through the backend, or retry its job; its new state."""
        job = dict(candidate.dft_job)
        if job.get("backend") == "cache":
            hit = self.database["dft_cache"].find_one({"task_id": job["task_id"]}, {"_id": 0})
            if hit is None:
                return self._finish(candidate, "failed", reason="cached result disappeared", job=job)
            return self._finish(
                candidate,
                "relaxed",
                values=hit["values"],
                task_id=hit["task_id"],
                job={**job, "from_cache": True},
            )
        backend = self._backend()
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
            ids = backend.submit(
                self._flow(candidate, candidate.selected_round or 0),
                candidate.candidate_id,
                resources=self._resources(self._dft_start(candidate)),
            )
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
        from crystaloop.dft import store
        from crystaloop.dft.cache import DFTCache

        task, fe = output.task, output.formation_energy
        if task is None:
            return self._finish(
                candidate, "failed", reason="its flow completed without a relaxation output", job=job
            )
        value = fe.formation_energy_per_atom if fe is not None and fe.state == "successful" else None
        task = task.model_copy(update={"formation_energy_per_atom": value})
        store.save_task(task, database=self.database)
        self._cache_references(output)
        if not task.successful or value is None:
            reasons = (fe.reasons if fe is not None else []) or task.reasons or ["no formation energy"]
            return self._finish(
                candidate, "failed", reason="; ".join(reasons)[:300], task_id=task.task_id, job=job
            )
        values = {"formation_energy_per_atom": value, "energy_per_atom": task.energy_per_atom}
        if task.band_gap is not None:
            values["band_gap"] = task.band_gap
        dumped = task.model_dump(mode="json")
        job.update(_relaxation_change(dumped))
        structure = self._dft_start(candidate)
        DFTCache(self.database).put(
            structure,
            self._relaxation_settings(structure),
            task,
            values,
            source={"campaign": self.name, "candidate_id": candidate.candidate_id},
        )
        return self._finish(candidate, "relaxed", values=values, task_id=task.task_id, job=job)

    def _cache_references(self, output: FlowOutput) -> None:
        """Cache the element references a flow computed, as the jobs do when they reach the database."""
        from crystaloop.dft import store

        store.cache_references(output.references, database=self.database)

    def _finish(
        self, candidate: CandidateDoc, state: str, *, values=None, task_id=None, reason=None, job=None
    ) -> str:
        update: dict[str, Any] = {"dft_engine": self.config.dft.engine, "dft_job": job or candidate.dft_job}
        if values is not None:
            values, correction = corrected_values(self.config, candidate.reduced_formula, values)
            update["dft_job"] = {**update["dft_job"], "anion_correction": correction}
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

    def _dft_results(self) -> list[DFTResult]:
        """Every relaxed candidate of the campaign with its relaxed structure and values."""
        results = []
        for c in sorted(self._in_state(CandidateState.RELAXED), key=lambda c: c.candidate_id):
            structure = None
            if c.dft_task_id:
                task = self.database["dft_tasks"].find_one(
                    {"task_id": c.dft_task_id}, {"output.final_structure": 1}
                )
                final = (task or {}).get("output", {}).get("final_structure")
                structure = Structure.from_dict(final) if final else None
            if structure is None:
                hit = self.database["dft_cache"].find_one({"task_id": c.dft_task_id}, {"final_structure": 1})
                structure = (
                    Structure.from_dict(hit["final_structure"])
                    if hit and hit.get("final_structure")
                    else None
                )
            results.append(
                DFTResult(
                    candidate_id=c.candidate_id,
                    round=c.selected_round if c.selected_round is not None else c.round,
                    structure=structure or self._dft_start(c),
                    values=dict(c.dft),
                    engine=c.dft_engine or self.config.dft.engine,
                    predicted={k: v.mean for k, v in c.predicted.items()},
                    screened=Structure.from_dict(c.structure),
                )
            )
        return results

    def _hits(self, selected_round: int | None = None) -> list[str]:
        """Ids of relaxed candidates whose DFT values lie in every window."""
        return [c.candidate_id for c in self._hit_docs(selected_round)]

    def _sigma_calibration(self) -> dict[str, dict[str, float | int | None]]:
        """Per target: the std factor fitted on the campaign's relaxed candidates, and their count."""
        from crystaloop.loop.acquire import fit_sigma_scale

        relaxed = self._in_state(CandidateState.RELAXED)
        out: dict[str, dict[str, float | int | None]] = {}
        for target in self.config.targets:
            pairs = []
            for c in relaxed:
                predicted = c.predicted.get(target.property)
                if predicted is not None:
                    pairs.append((predicted.mean, predicted.std, (c.dft or {}).get(target.property)))
            scale, n = fit_sigma_scale(pairs, min_count=self.config.acquisition.calibrate_min)
            out[target.property] = {"scale": scale, "n": n}
        return out

    def _hit_docs(self, selected_round: int | None = None) -> list[CandidateDoc]:
        return sorted(
            (
                c
                for c in self._in_state(CandidateState.RELAXED)
                if (selected_round is None or c.selected_round == selected_round)
                and self.config.in_all_windows(c.dft or {})
            ),
            key=lambda c: c.candidate_id,
        )

    def _hit_compounds(self) -> list[BaseCompound]:
        """The hits as base compounds to sample around: the screened structure and its DFT E_f."""
        from crystaloop.loop.generation import EF, BaseCompound

        return [
            BaseCompound(c.reduced_formula, Structure.from_dict(c.structure), (c.dft or {}).get(EF))
            for c in self._hit_docs()
        ]

    def _in_state(self, state: CandidateState) -> list[CandidateDoc]:
        """The campaign's candidates in ``state``, found through the store's query summaries."""
        return self.candidates.get_many(
            self.candidates.matching_ids(campaign=self.name, state=state.value, limit=0)
        )

    def _dft_total(self) -> int:
        counts = self.candidates.count_by_state(self.name)
        return sum(counts.get(s, 0) for s in ("submitted", "relaxed", "failed"))

    # -- bookkeeping -------------------------------------------------------------------------

    def _last_retrained_round(self, number: int) -> int:
        """The last round before ``number`` whose retrain step ran its hooks, or -1."""
        last = -1
        for r in self.campaigns.all_rounds(self.name):
            step = r.steps.get("retrain")
            if r.round < number and step is not None and step.status == "done" and "hooks" in step.outputs:
                last = r.round
        return last

    def _adopt_retrained_models(self) -> None:
        """Point the campaign at the models of its last finished retrain step, then resolve them.

        The retrain step is recorded done before the campaign's versions change, so a kill in
        between never makes a rerun fine-tune an already fine-tuned model; this catches up.
        """
        latest: dict[str, str] | None = None
        for r in self.campaigns.all_rounds(self.name):
            step = r.steps.get("retrain")
            if step is not None and step.status == "done" and step.outputs.get("model_versions"):
                latest = dict(step.outputs["model_versions"])
        if latest and latest != dict(self.campaigns.get(self.name).model_versions):
            self.campaigns.update(self.name, self.token, model_versions=latest)
        self.models = self._resolve_models()
        from crystaloop.loop.generation import model_versions

        # Looked up once here, not per step: a step must start without the database answering.
        self.model_names = model_versions(self.database, self.models)

    def _resolve_models(self) -> dict[str, str]:
        from crystaloop.generative.models.shipped import resolve_models

        chosen = dict(self.config.models.model_dump())
        chosen.update(self.campaigns.get(self.name).model_versions)
        return {k: str(v) for k, v in resolve_models(self.database, **chosen).items()}

    def _versions(self) -> dict[str, str]:
        """Registry versions of the models in use (a checkpoint's file stem when unregistered)."""
        return dict(self.model_names)

    def _work_dir(self) -> Path:
        from crystaloop.settings import get_settings

        path = get_settings().data_dir / "campaigns" / self.name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _first_open_round(self) -> int:
        rounds = self.campaigns.all_rounds(self.name)
        for r in rounds:
            if r.finished_at is None:
                return r.round
        return rounds[-1].round + 1 if rounds else 0

    def _should_stop(self, number: int, max_rounds: int) -> tuple[bool, str]:
        stop = self.config.stop
        finished = [r for r in self.campaigns.all_rounds(self.name) if r.finished_at is not None]
        if number >= max_rounds:
            return True, f"reached max_rounds ({max_rounds})"
        hits = len(self._hits())
        if stop.min_hits is not None and hits >= stop.min_hits:
            return True, f"{hits} DFT-verified hit(s) reached the target of {stop.min_hits}"
        if stop.max_dft is not None and self._dft_total() >= stop.max_dft:
            return True, f"DFT budget of {stop.max_dft} relaxations used"
        if finished and stop.hit_rate is not None:
            rate = finished[-1].metrics.get("hit_rate")
            if rate is not None and rate >= stop.hit_rate:
                return True, f"round {finished[-1].round} hit rate {rate:.2f} reached {stop.hit_rate}"
        if stop.patience is not None and len(finished) >= stop.patience:
            recent = finished[-stop.patience :]
            if all(not r.metrics.get("hits") for r in recent):
                return True, f"no new hit in {stop.patience} round(s)"
        return False, ""

    def _stop_requested(self) -> bool:
        doc = self._guard(lambda: self.campaigns.get(self.name))
        return bool(doc and doc.stop_requested)

    def _check_lease(self) -> None:
        if self._heartbeat is not None and self._heartbeat.lost:
            raise LeaseLost(self.name)

    def _guard(self, action: Callable[[], Any], *, what: str = "a database update") -> Any:
        """Run ``action``, riding out a lost database for ``execution.db_retry_s`` seconds.

        The embedded server is restarted when it is this installation's own. Every step is
        idempotent, so an interrupted one is simply run again.

        Raises
        ------
        DatabaseUnavailable
            The database did not come back in time.
        """
        deadline = time.monotonic() + self.config.execution.db_retry_s
        delay = 1.0
        while True:
            try:
                return action()
            except DB_ERRORS as exc:
                if time.monotonic() > deadline:
                    from crystaloop.settings import get_settings, redact_uri

                    settings = get_settings()
                    uri = settings.mongodb_uri or "the embedded server"
                    raise DatabaseUnavailable(
                        f"lost MongoDB ({redact_uri(uri) if settings.mongodb_uri else uri}, "
                        f"{type(exc).__name__}) during {what}; nothing done is lost: start the "
                        f"database and run `crystaloop campaign run` again to resume"
                    ) from None
                self.log(f"  database unreachable ({type(exc).__name__}); retrying in {delay:.0f} s")
                time.sleep(delay)
                delay = min(delay * 2, 30.0)
                self._reconnect()


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


def _relaxation_change(output: dict[str, Any]) -> dict[str, float]:
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
