"""The campaign loop: run (or resume) rounds of :data:`crystaloop.loop.steps.ROUND` until a stop rule fires.

Every step writes its record (inputs, outputs, counts, model versions) on the round's document
in ``campaign_rounds`` before the next step starts, and every candidate move is one conditional
update in ``candidates``. A campaign killed at any moment therefore resumes from its last
completed step; what each step does on a re-run is described in :mod:`crystaloop.loop.steps`.

One process acts on a campaign at a time: it holds a lease renewed by a heartbeat thread
(:class:`~crystaloop.db.lease.CampaignLease`); a stale lease is taken over.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crystaloop.db.campaigns import CampaignStore, LeaseLost
from crystaloop.db.documents import RoundDoc, StepRecord, utcnow
from crystaloop.db.lease import CampaignLease, rides_out_outages
from crystaloop.db.store import CandidateStore
from crystaloop.dft.backends import Backend
from crystaloop.errors import DatabaseUnavailable, UserError
from crystaloop.loop import preflight
from crystaloop.loop.adoption import adopt_retrained_models
from crystaloop.loop.config import CampaignConfig
from crystaloop.loop.dft_jobs import CampaignJobs, make_backend
from crystaloop.loop.steps import ROUND, Blocked, RoundContext, StepResult, fault_point, hit_documents


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

        self.config, self.name = config, config.name
        self.log = log or (lambda line: None)
        self.progress = progress
        self.lease = CampaignLease(
            self.name,
            config.model_dump(mode="json"),
            database if database is not None else get_database(),
            ttl_s=lease_ttl_s,
            heartbeat_s=heartbeat_s,
            retry_s=config.execution.db_retry_s,
            log=self.log,
        )
        self.models: dict[str, str] = {}
        self.model_names: dict[str, str] = {}
        self.until_blocked = False
        self._candidates: CandidateStore | None = None
        self._backend_instance: Backend | None = None

    # The lease reconnects after an outage: read the database through it each time.
    @property
    def database(self):
        return self.lease.database

    @property
    def campaigns(self) -> CampaignStore:
        return self.lease.campaigns

    @property
    def candidates(self) -> CandidateStore:
        if self._candidates is None or self._candidates.database is not self.database:
            self._candidates = CandidateStore(self.database)
        return self._candidates

    # -- running ---------------------------------------------------------------------------

    def run(self, *, max_rounds: int | None = None, until_blocked: bool = False) -> CampaignResult:
        """Run (or resume) the campaign until a stop rule fires or a stop is requested.

        With ``until_blocked`` it returns (status ``blocked``) as soon as the harvest has only
        DFT jobs left to wait on; a later call resumes there (for cron or scrontab).

        Raises
        ------
        UserError
            Another live process holds the campaign, or the database stayed unreachable.
        """
        existing = self.campaigns.get(self.name)
        self.campaigns.ensure(self.name, self.lease.config)
        if not self.lease.acquire():
            holder = self.campaigns.get(self.name).lease
            raise UserError(
                f"campaign {self.name!r} is being run by {holder.owner} (lease until "
                f"{holder.expires_at:%H:%M:%S} UTC); wait for it, or stop it with "
                f"`crystaloop campaign stop {self.name}`"
            )
        self.lease.start_heartbeat()
        try:
            preflight.check_execution(self.config)
            preflight.prepare(self.database, self.config, self.log)
            for line in preflight.check_dft(self.config):
                self.log(f"warning: {line}")
            if existing is not None:
                self.log(
                    f"resuming campaign {self.name} ({len(self.campaigns.all_rounds(self.name))} round(s) on record)"
                )
            self.campaigns.update(
                self.name, self.lease.token, config=self.lease.config, status="running",
                stop_requested=False, status_reason=None,
            )  # fmt: skip
            self.until_blocked = until_blocked
            return self._rounds(max_rounds or self.config.max_rounds)
        except Blocked as exc:
            reason = f"{exc}; run again to continue"
            self._set_status("waiting", reason)
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
            self.lease.release()

    def _rounds(self, max_rounds: int) -> CampaignResult:
        outcomes: list[RoundOutcome] = []
        self._adopt_models()
        self.log("models: " + ", ".join(f"{kind} {version}" for kind, version in self.model_names.items()))
        number = self._first_open_round()
        while True:
            done, reason = self._should_stop(number, max_rounds)
            if done:
                return self._end("finished", reason, outcomes)
            self._start_round(number)
            for step in ROUND:
                if self._stop_requested():
                    return self._end(
                        "stopped", f"stop requested; resumes at round {number} step {step.__name__}", outcomes
                    )
                self._run_step(number, step)
            record = self._round(number)
            outcomes.append(RoundOutcome(number, dict(record.metrics) if record else {}))
            number += 1

    def _end(self, status: str, reason: str, outcomes: list[RoundOutcome]) -> CampaignResult:
        self._set_status(status, reason)
        self.log(f"campaign {self.name} {status}: {reason}")
        return CampaignResult(self.name, status, reason, outcomes)

    def _run_step(self, number: int, step: Callable[[RoundContext], StepResult]) -> None:
        """Run one step unless its record says done, recording its start, failure or end."""
        name = step.__name__
        record = self._start_round(number)
        if name in record.steps and record.steps[name].status == "done":
            return
        retrying = name in record.steps  # an earlier attempt was interrupted (killed or failed)
        self.lease.check()
        self.log(f"round {number}: {name}")
        started = StepRecord(name=name, model_versions=dict(self.model_names))
        self._record_step(number, started)
        fault_point(name, "start")
        try:
            result = self.lease.call(
                lambda: step(self.context(number, retrying=retrying)), what=f"round {number} {name}"
            )
        except (LeaseLost, DatabaseUnavailable, Blocked):
            raise
        except Exception as exc:
            # The step's record and the campaign say what stopped them; a rerun retries the step.
            error = exc.message if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
            failed = started.model_copy(
                update={"status": "failed", "error": error[:2000], "finished_at": utcnow()}
            )
            self._record_step(number, failed)
            self._set_status("failed", f"round {number} {name}: {error[:300]}")
            raise
        fault_point(name, "end")
        now = utcnow()
        finished = started.model_copy(
            update={
                "status": "done",
                "outputs": result.outputs,
                "finished_at": now,
                "wall_s": (now - started.started_at).total_seconds(),
                "model_versions": dict(self.model_names),
            }
        )
        self._record_step(number, finished, metrics=result.metrics)
        if name == "retrain":
            self._adopt_models()

    def context(self, number: int, *, retrying: bool = False) -> RoundContext:
        """What the steps of round ``number`` work with, on the current database connection."""
        return RoundContext(
            config=self.config,
            number=number,
            database=self.database,
            campaigns=self.campaigns,
            candidates=self.candidates,
            jobs=self.jobs(),
            work_dir=self.work_dir(),
            models=self.models,
            model_versions=self.model_names,
            log=self.log,
            progress=self.progress,
            check_lease=self.lease.check,
            retrying=retrying,
            until_blocked=self.until_blocked,
        )

    def jobs(self) -> CampaignJobs:
        """The campaign's DFT jobs, through its execution backend."""
        return CampaignJobs(self.config, self.database, self.candidates, backend=self._backend, log=self.log)

    # -- stop rules ------------------------------------------------------------------------

    def _should_stop(self, number: int, max_rounds: int) -> tuple[bool, str]:
        stop = self.config.stop
        finished = [r for r in self.campaigns.all_rounds(self.name) if r.finished_at is not None]
        if number >= max_rounds:
            return True, f"reached max_rounds ({max_rounds})"
        hits = len(hit_documents(self.candidates, self.config))
        if stop.min_hits is not None and hits >= stop.min_hits:
            return True, f"{hits} DFT-verified hit(s) reached the target of {stop.min_hits}"
        if stop.max_dft is not None and self.candidates.dft_total(self.name) >= stop.max_dft:
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

    # -- step records, each riding out a lost database ---------------------------------------

    @rides_out_outages("a campaign status update")
    def _set_status(self, status: str, reason: str) -> None:
        self.campaigns.update(self.name, self.lease.token, status=status, status_reason=reason)

    @rides_out_outages("a stop check")
    def _stop_requested(self) -> bool:
        doc = self.campaigns.get(self.name)
        return bool(doc and doc.stop_requested)

    @rides_out_outages("a round record")
    def _start_round(self, number: int) -> RoundDoc:
        return self.campaigns.round(self.name, number) or self.campaigns.start_round(self.name, number)

    @rides_out_outages("a round record")
    def _round(self, number: int) -> RoundDoc | None:
        return self.campaigns.round(self.name, number)

    @rides_out_outages("a step record")
    def _record_step(self, number: int, record: StepRecord, *, metrics: dict | None = None) -> None:
        self.campaigns.record_step(self.name, number, record, metrics=metrics)

    @rides_out_outages("model adoption")
    def _adopt_models(self) -> None:
        adopted = adopt_retrained_models(self.database, self.campaigns, self.config, self.lease.token)
        self.models, self.model_names = adopted.paths, adopted.versions

    def _first_open_round(self) -> int:
        rounds = self.campaigns.all_rounds(self.name)
        for r in rounds:
            if r.finished_at is None:
                return r.round
        return rounds[-1].round + 1 if rounds else 0

    # -- retrying DFT jobs (``crystaloop campaign retry``) ------------------------------------

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
        jobs = self.jobs()
        retried = {"failed": [], "lost": []}
        if lost:
            retried["lost"] = jobs.requeue_lost()
        if failed:
            retried["failed"] = jobs.requeue_failed()
        todo = set(retried["failed"]) | set(retried["lost"])
        if wait and todo:
            self._harvest_retried(todo)
        return retried

    def _harvest_retried(self, todo: set[str]) -> None:
        if not self.lease.acquire():
            raise UserError(
                f"campaign {self.name!r} is being run by another process; its harvest collects the "
                "retried jobs (or pass --no-wait)"
            )
        try:
            self.jobs().collect_all(todo)
        finally:
            self._close_backend()
            self.lease.release()

    # -- the execution backend -------------------------------------------------------------

    def work_dir(self) -> Path:
        """The campaign's folder under the data directory (reports, job folders, models)."""
        from crystaloop.settings import get_settings

        path = get_settings().data_dir / "campaigns" / self.name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _backend(self) -> Backend:
        """The execution backend of this campaign (made once per run)."""
        if self._backend_instance is None:
            self._backend_instance = make_backend(self.config.execution, self.work_dir() / "jobs")
        return self._backend_instance

    def _close_backend(self) -> None:
        backend, self._backend_instance = self._backend_instance, None
        if backend is not None and hasattr(backend, "close"):
            backend.close()
