"""The steps of a campaign round, in order: :data:`ROUND`.

Each step is a function of a :class:`RoundContext` that returns a :class:`StepResult`: what the
step did (``outputs``, recorded on the round's step record) and the round metrics it measured.
Every step can be run again after a kill at any point and picks up where it stopped:

- ``generate`` samples and decodes the round's batch and saves it in the campaign's folder;
- ``filter`` runs the cascade over that batch and stores its survivors in one insert tagged with
  the round's generation id; a re-run finds them (rebuilding their summaries and counts when the
  kill fell inside the insert) and neither step runs again;
- ``acquire`` counts what this round already selected and tops up only;
- ``submit`` hands each candidate's flow to the execution backend (keyed by the candidate, so a
  second submit finds the first) and only then moves the candidate to ``submitted``: nothing is
  submitted twice and no candidate waits on a job that does not exist;
- ``harvest`` reads every ``submitted`` candidate's job state through the backend, retries failed
  and lost jobs up to ``execution.max_attempts``, and writes ``dft_tasks``, the caches and the
  candidate's state from the jobs' outputs (jobs never write the database); it also takes any of
  earlier rounds still running when their round's harvest timed out;
- ``retrain`` fine-tunes from the models the round started with: the campaign takes the new
  versions only once the step is recorded done, so a re-run gives the same versions;
- ``report`` closes the round's counts and writes the campaign report.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pymatgen.core import Structure

from crystaloop.db.campaigns import CampaignStore
from crystaloop.db.documents import CandidateDoc, CandidateState
from crystaloop.db.store import CandidateStore
from crystaloop.loop.acquire import AcquisitionContext, fit_sigma_scale, get_acquisition, select_batch
from crystaloop.loop.adoption import last_retrained_round
from crystaloop.loop.config import CampaignConfig
from crystaloop.loop.dft_jobs import CampaignJobs
from crystaloop.loop.retrain import DFTResult, HookContext, enabled_hooks, run_hooks

if TYPE_CHECKING:  # generation imports torch; a round loads it only when generating
    from crystaloop.loop.generation import BaseCompound, DecodedBatch

KILL_ENV = "CRYSTALOOP_KILL_AT"
"""Fault injection for the resume tests: ``step:point[,step:point]`` makes the process SIGKILL itself."""

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


class Blocked(Exception):
    """Raised by the harvest of a ``run(until_blocked=True)`` when only DFT jobs are left to wait on."""


def fault_point(step: str, point: str) -> None:
    """SIGKILL this process when ``step:point`` is listed in ``$CRYSTALOOP_KILL_AT`` (tests only)."""
    wanted = os.environ.get(KILL_ENV, "")
    if wanted and f"{step}:{point}" in {w.strip() for w in wanted.split(",")}:
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class RoundContext:
    """What a step of round ``number`` works with.

    ``models`` are the checkpoint paths the round started with, ``model_versions`` their
    registry versions; ``retrying`` says that an earlier attempt of the running step was
    interrupted.
    """

    config: CampaignConfig
    number: int
    database: Any
    campaigns: CampaignStore
    candidates: CandidateStore
    jobs: CampaignJobs
    work_dir: Path
    models: dict[str, str] = field(default_factory=dict)
    model_versions: dict[str, str] = field(default_factory=dict)
    log: Callable[[str], None] = lambda line: None
    progress: Callable[[str, int, int], None] | None = None
    check_lease: Callable[[], None] = lambda: None
    retrying: bool = False
    until_blocked: bool = False

    @property
    def name(self) -> str:
        """The campaign's name."""
        return self.config.name

    @property
    def generation_id(self) -> str:
        """The tag of the candidates this round's generation stores."""
        return f"{self.name}-r{self.number}"


@dataclass
class StepResult:
    """What a step did (recorded on its step record) and the round metrics it measured."""

    outputs: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


# -- the steps -------------------------------------------------------------------------------


def generate(ctx: RoundContext) -> StepResult:
    """Sample and decode the round's batch, and save it for :func:`filter`."""
    from crystaloop.loop.generation import decode_batch

    if _stored_generation(ctx):
        return StepResult({"generation_id": ctx.generation_id, "resumed": True})
    path = _batch_path(ctx)
    if ctx.retrying and path.is_file():
        ctx.log(f"  decoded batch {path.name} already saved; not generating again")
        return StepResult({"generation_id": ctx.generation_id, "batch": str(path), "resumed": True})
    hits = hit_compounds(ctx) if ctx.config.sampling.around_hits else []
    batch = decode_batch(
        ctx.config,
        database=ctx.database,
        n=ctx.config.budget.candidates_per_round,
        round=ctx.number,
        seed=ctx.config.seed * 1000 + ctx.number,
        models=ctx.models,
        progress=ctx.progress,
        hits=hits,
    )
    batch.save(path)
    around = batch.parameters.get("around_hits")
    if around:
        ctx.log(f"  {around} of the samples drawn around {len(hits)} hit(s)")
    decoded = batch.n_decoded
    ctx.log(f"  {batch.summary()}")
    outputs = {
        "generation_id": ctx.generation_id,
        "batch": str(path),
        "strategy": batch.strategy,
        "parameters": batch.parameters,
        "seed": batch.seed,
        "n_requested": batch.n_requested,
        "n_decoded": decoded,
        "seconds": batch.seconds,
    }
    return StepResult(outputs, {"generated": batch.n_requested})


def filter(ctx: RoundContext) -> StepResult:
    """Run the filter cascade over the round's decoded batch and store the shortlist."""
    from crystaloop.loop.generation import filter_batch, why_empty

    stored = _stored_generation(ctx)
    if stored:
        ctx.log(f"  {stored} candidates of {ctx.generation_id} already stored; not filtering again")
        return StepResult({"generation_id": ctx.generation_id, "n_shortlisted": stored, "resumed": True})
    report = filter_batch(
        ctx.config,
        _decoded_batch(ctx),
        database=ctx.database,
        round=ctx.number,
        generation_id=ctx.generation_id,
        progress=ctx.progress,
    )
    _batch_path(ctx).unlink(missing_ok=True)  # its survivors are stored; a re-run finds them
    out = report.model_dump(mode="json")
    ctx.log(f"  generated {out['n_requested']}, shortlisted {out['n_shortlisted']}")
    empty = why_empty(out["stages"], out["rejected_reasons"])
    if empty:
        ctx.log(f"  {empty}")
    return StepResult(out, {"shortlisted": out["n_shortlisted"]})


def acquire(ctx: RoundContext) -> StepResult:
    """Score the shortlist and select the round's DFT batch (topping up an interrupted one)."""
    config, acq = ctx.config, ctx.config.acquisition
    picked = ctx.candidates.selected_in_round(ctx.name, ctx.number)
    already = len(picked)
    budget = config.budget.dft_per_round
    if config.stop.max_dft is not None:
        budget = min(budget, config.stop.max_dft - ctx.candidates.dft_total(ctx.name) + already)
    need = max(budget - already, 0)
    pool = sorted(ctx.candidates.in_state(ctx.name, CandidateState.SHORTLISTED), key=CandidateDoc.order_key)
    rng = np.random.default_rng(config.seed * 7919 + ctx.number)
    calibration = sigma_calibration(ctx) if acq.calibrate else {}
    context = AcquisitionContext(
        windows=tuple((t.property, t.min, t.max) for t in config.targets),
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
        ctx.candidates.transition(
            candidate.candidate_id,
            CandidateState.SELECTED,
            update={"acquisition_score": score, "selected_round": ctx.number},
        )
        if i == 0:
            fault_point("acquire", "mid")
    selected = already + len(batch)
    ctx.log(f"  selected {selected} of {len(pool) + already} shortlisted ({acq.strategy})")
    for prop, c in calibration.items():
        if c["scale"] is not None:
            ctx.log(f"  {prop}: ensemble std x{c['scale']:.2f}, fitted on {c['n']} DFT results")
    outputs = {
        "strategy": acq.strategy,
        "sigma_scale": calibration,
        "pool": len(pool),
        "selected": selected,
        "candidate_ids": [c.candidate_id for c, _ in batch],
        "scores": [s for _, s in batch],
    }
    return StepResult(outputs, {"selected": selected})


def submit(ctx: RoundContext) -> StepResult:
    """Submit each selected candidate's DFT flow, or answer it from the DFT cache."""
    from crystaloop.db.documents import utcnow
    from crystaloop.dft.cache import DFTCache

    cache = DFTCache(ctx.database)
    backend = ctx.jobs.backend()
    submitted = cached = 0
    selected = ctx.candidates.selected_in_round(ctx.name, ctx.number, state=CandidateState.SELECTED)
    for i, candidate in enumerate(selected):
        structure = ctx.jobs.start(candidate)
        settings = ctx.jobs.settings(structure)
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
            ids = ctx.jobs.submit(candidate, ctx.number)
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
        ctx.candidates.transition(candidate.candidate_id, CandidateState.SUBMITTED, update={"dft_job": job})
        if i == 0:
            fault_point("submit", "mid")
    ctx.log(f"  submitted {submitted} to {backend.name}, {cached} answered by the DFT cache")
    outputs = {"submitted": submitted, "cache_hits": cached, "queued": submitted, "backend": backend.name}
    return StepResult(outputs, {"submitted": submitted + cached, "cache_hits": cached})


def harvest(ctx: RoundContext) -> StepResult:
    """Collect the round's DFT results (and earlier rounds' stragglers) until none is left running.

    Raises
    ------
    Blocked
        ``until_blocked`` and only DFT jobs are left to wait on.
    """
    execution = ctx.config.execution
    deadline = time.monotonic() + execution.harvest_timeout_s
    relaxed = failed = 0
    total = ctx.candidates.count_selected(ctx.name, ctx.number)
    ended = (CandidateState.RELAXED, CandidateState.FAILED)
    while True:
        # Earlier rounds' jobs still running when their harvest timed out are collected here.
        pending = ctx.candidates.selected_in_round(
            ctx.name, ctx.number, state=CandidateState.SUBMITTED, up_to=True
        )
        for candidate in pending:
            ctx.check_lease()
            outcome = ctx.jobs.collect(candidate)
            relaxed += outcome == "relaxed"
            failed += outcome == "failed"
            if ctx.progress:
                ctx.progress(
                    "harvest", ctx.candidates.count_selected(ctx.name, ctx.number, states=ended), total
                )
            if outcome is not None:
                fault_point("harvest", "mid")
        # Waits for this round's jobs only: an earlier straggler is taken when it ends.
        still = ctx.candidates.count_selected(ctx.name, ctx.number, states=[CandidateState.SUBMITTED])
        if still == 0:
            break
        if time.monotonic() > deadline:
            ctx.log(f"  harvest timed out with {still} job(s) still running; they are collected next round")
            break
        if ctx.until_blocked:
            raise Blocked(f"round {ctx.number} waits on {still} DFT job(s)")
        # Local workers are this machine's processes: their state is cheap to read.
        interval = execution.poll_interval_s
        time.sleep(min(interval, 0.5) if execution.backend == "local" else interval)
    hits = [c.candidate_id for c in hit_documents(ctx.candidates, ctx.config, selected_round=ctx.number)]
    n_done = ctx.candidates.count_selected(ctx.name, ctx.number, states=[CandidateState.RELAXED])
    n_failed = ctx.candidates.count_selected(ctx.name, ctx.number, states=[CandidateState.FAILED])
    ctx.log(f"  relaxed {n_done}, failed {n_failed}, hits {len(hits)}")
    outputs = {"relaxed": n_done, "failed": n_failed, "hits": hits, "harvested_now": relaxed + failed}
    rate = len(hits) / n_done if n_done else None
    return StepResult(outputs, {"relaxed": n_done, "failed": n_failed, "hits": len(hits), "hit_rate": rate})


def retrain(ctx: RoundContext) -> StepResult:
    """Run the retraining hooks on the campaign's DFT results, when enough are new."""
    settings = ctx.config.retrain
    results = dft_results(ctx)
    # New: relaxed since the last retrain that ran (skipped rounds' results wait for the next one).
    last = last_retrained_round(ctx.campaigns, ctx.name, ctx.number)
    new = [r for r in results if r.round > last]
    if (ctx.number + 1) % settings.every != 0 or len(new) < settings.min_new_results:
        reason = (
            f"{len(new)} new DFT result(s); retraining needs {settings.min_new_results}"
            if len(new) < settings.min_new_results
            else f"retraining runs every {settings.every} round(s)"
        )
        ctx.log(f"  retrain skipped: {reason}")
        return StepResult({"skipped": reason})
    work_dir = ctx.work_dir / "models"
    work_dir.mkdir(parents=True, exist_ok=True)
    context = HookContext(
        campaign=ctx.name,
        round=ctx.number,
        config=ctx.config,
        database=ctx.database,
        models=dict(ctx.models),
        results=results,
        new_results=new,
        work_dir=work_dir,
    )
    outcomes = run_hooks(enabled_hooks(settings), context)
    versions = dict(ctx.campaigns.get(ctx.name).model_versions)
    metrics: dict[str, Any] = {}
    for outcome in outcomes:
        if outcome.status == "done":
            versions.update(outcome.new_models)
        ctx.log(
            f"  {outcome.name}: {outcome.status}"
            + (f" ({outcome.error})" if outcome.error else "")
            + (f" -> {', '.join(outcome.new_models.values())}" if outcome.new_models else "")
        )
    cg = next((o for o in outcomes if o.name == "cgcnn_finetune" and o.status == "done"), None)
    if cg is not None:
        target = ctx.config.targets[0].property
        metrics = {
            "mae_before": cg.metrics["mae_before"].get(target),
            "mae_after": cg.metrics["mae_after"].get(target),
            "mae_screening": cg.metrics["mae_screening"].get(target),
        }
    # The campaign adopts ``versions`` once this step is recorded done (adopt_retrained_models):
    # a kill before that reruns the hooks from the models the round started with.
    hooks = [
        {
            "name": o.name,
            "status": o.status,
            "metrics": o.metrics,
            "new_models": o.new_models,
            "error": o.error,
        }
        for o in outcomes
    ]
    return StepResult({"model_versions": versions, "hooks": hooks}, metrics)


def report(ctx: RoundContext) -> StepResult:
    """Close the round's counts and write the campaign report."""
    cumulative = len(hit_documents(ctx.candidates, ctx.config))
    current = ctx.campaigns.round(ctx.name, ctx.number)
    # Metrics are stored as floats; the counts among them go on the round as integers.
    counts = {k: int(current.metrics[k]) for k in ROUND_COUNTS if current.metrics.get(k) is not None}
    ctx.campaigns.finish_round(ctx.name, ctx.number, counts)
    outputs: dict[str, Any] = {"cumulative_hits": cumulative}
    try:
        from crystaloop.loop.report import write_report

        paths = write_report(ctx.database, ctx.name, ctx.work_dir)
        outputs["files"] = [str(p) for p in paths]
    except ImportError:
        pass
    ctx.log(f"  cumulative hits: {cumulative}")
    return StepResult(outputs, {"cumulative_hits": cumulative})


ROUND: tuple[Callable[[RoundContext], StepResult], ...] = (
    generate,
    filter,
    acquire,
    submit,
    harvest,
    retrain,
    report,
)
"""The steps of a round, in order; each is recorded under its function's name."""

STEP_NAMES: tuple[str, ...] = tuple(step.__name__ for step in ROUND)


# -- what the steps share --------------------------------------------------------------------


def hit_documents(
    candidates: CandidateStore, config: CampaignConfig, *, selected_round: int | None = None
) -> list[CandidateDoc]:
    """Relaxed candidates whose DFT values lie in every window (of one round's selection, if
    ``selected_round``), by candidate id."""
    return sorted(
        (
            c
            for c in candidates.in_state(config.name, CandidateState.RELAXED)
            if (selected_round is None or c.selected_round == selected_round)
            and config.in_all_windows(c.dft or {})
        ),
        key=lambda c: c.candidate_id,
    )


def hit_compounds(ctx: RoundContext) -> list[BaseCompound]:
    """The hits as base compounds to sample around: the screened structure and its DFT E_f."""
    from crystaloop.loop.generation import EF, BaseCompound

    return [
        BaseCompound(c.reduced_formula, Structure.from_dict(c.structure), (c.dft or {}).get(EF))
        for c in hit_documents(ctx.candidates, ctx.config)
    ]


def sigma_calibration(ctx: RoundContext) -> dict[str, dict[str, float | int | None]]:
    """Per target: the std factor fitted on the campaign's relaxed candidates, and their count."""
    relaxed = ctx.candidates.in_state(ctx.name, CandidateState.RELAXED)
    out: dict[str, dict[str, float | int | None]] = {}
    for target in ctx.config.targets:
        pairs = []
        for c in relaxed:
            predicted = c.predicted.get(target.property)
            if predicted is not None:
                pairs.append((predicted.mean, predicted.std, (c.dft or {}).get(target.property)))
        scale, n = fit_sigma_scale(pairs, min_count=ctx.config.acquisition.calibrate_min)
        out[target.property] = {"scale": scale, "n": n}
    return out


def dft_results(ctx: RoundContext) -> list[DFTResult]:
    """Every relaxed candidate of the campaign with its relaxed structure and values."""
    from crystaloop.dft import records

    results = []
    for c in sorted(ctx.candidates.in_state(ctx.name, CandidateState.RELAXED), key=CandidateDoc.order_key):
        final = records.final_structure(c.dft_task_id, database=ctx.database) if c.dft_task_id else None
        results.append(
            DFTResult(
                candidate_id=c.candidate_id,
                round=c.selected_round if c.selected_round is not None else c.round,
                structure=Structure.from_dict(final) if final else ctx.jobs.start(c),
                values=dict(c.dft),
                engine=c.dft_engine or ctx.config.dft.engine,
                predicted={k: v.mean for k, v in c.predicted.items()},
                screened=Structure.from_dict(c.structure),
            )
        )
    return results


def _stored_generation(ctx: RoundContext) -> int:
    """How many candidates this round's generation already stored (0: not yet)."""
    stored = sum(ctx.candidates.count_by_state(ctx.name, round=ctx.number).values())
    if not stored and ctx.retrying:
        # Killed inside the filter's insert: candidates stored, their summaries or counter not yet.
        stored = ctx.candidates.repair_round(ctx.name, ctx.number)
    if stored:
        # Candidates of the round may come from `crystaloop generate`; only the step's own count.
        stored = ctx.candidates.count_generated(ctx.name, ctx.number, ctx.generation_id)
    return stored


def _batch_path(ctx: RoundContext) -> Path:
    return ctx.work_dir / "generated" / f"{ctx.generation_id}.pkl"


def _decoded_batch(ctx: RoundContext) -> DecodedBatch:
    """The batch :func:`generate` saved; decoded again (same seed) if its file is gone."""
    from crystaloop.loop.generation import DecodedBatch

    path = _batch_path(ctx)
    if path.is_file():
        return DecodedBatch.load(path)
    ctx.log(f"  decoded batch {path.name} is missing; decoding it again")
    generate(ctx)
    return DecodedBatch.load(path)
