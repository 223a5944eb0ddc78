"""``crystaloop campaign`` commands: validate, run, status, stop, retry, report."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from crystaloop.cli._common import console, group, progress_bar

app = group("Validate, run and report campaigns.")


def _check_format(fmt: str) -> str:
    from crystaloop.errors import UserError

    if fmt not in ("table", "json"):
        raise UserError(f"unknown format {fmt!r}; use --format table or --format json")
    return fmt


@app.command("validate")
def validate(path: Path = typer.Argument(..., help="Campaign YAML file.")) -> None:
    """Check a campaign file; print one line per problem (exit 2) or a summary."""
    from crystaloop.loop.config import load_campaign_config
    from crystaloop.properties import PROPERTIES

    config = load_campaign_config(path)
    windows = []
    for t in config.targets:
        unit = PROPERTIES[t.property].unit
        lo = "-inf" if t.min is None else f"{t.min:g}"
        hi = "+inf" if t.max is None else f"{t.max:g}"
        windows.append(f"{t.property} in [{lo}, {hi}]{' ' + unit if unit else ''}")
    console.print(f"[green]ok[/] {path}: campaign [bold]{config.name}[/]", highlight=False)
    console.print(f"  targets: {'; '.join(windows)}", highlight=False)
    console.print(
        f"  classes: {', '.join(config.material_classes)}; rounds: {config.max_rounds}; "
        f"per round: {config.budget.candidates_per_round} generated, {config.budget.dft_per_round} DFT; "
        f"dft: {config.dft.engine}/{config.dft.preset}; backend: {config.execution.backend}",
        highlight=False,
    )
    warnings = _dft_checks(config)
    for line in warnings:
        console.print(f"  [yellow]warning:[/] {line}", highlight=False, soft_wrap=True)


def _dft_checks(config) -> list[str]:
    """Warnings (cutoffs below the family's suggestion); raises on refused elements."""
    from crystaloop.dft.engines import get_engine
    from crystaloop.loop import preflight
    from crystaloop.settings import get_settings

    settings = get_settings()
    if (
        get_engine(config.dft.engine).dft
        and not settings.pseudo_family
        and not settings.resolved_pseudo_family().is_file()
    ):
        return [
            f"no pseudopotential family at {settings.resolved_pseudo_family()} yet; `campaign run` builds the "
            "local PBE family on first use, then checks the elements against its verdicts"
        ]
    preflight.check_execution(config)
    return preflight.check_dft(config)


@app.command("run")
def run(
    path: Path = typer.Argument(..., help="Campaign YAML file; a campaign of the same name resumes."),
    max_rounds: int = typer.Option(None, "--max-rounds", min=1, help="Override max_rounds."),
    fmt: str = typer.Option("table", "--format", help="table or json (the final summary)."),
    until_blocked: bool = typer.Option(
        False,
        "--until-blocked",
        help="Advance as far as possible, then exit 0 while only DFT jobs are left to wait on.",
    ),
) -> None:
    """Run a campaign (or resume it): generate, acquire, DFT, harvest, retrain, report."""
    from crystaloop.loop.campaign import Campaign
    from crystaloop.loop.config import load_campaign_config

    _check_format(fmt)
    import contextlib
    import sys

    config = load_campaign_config(path)
    # With JSON, stdout carries the summary alone: the log, the bar (the console writes to whatever
    # sys.stdout is) and what libraries print go to stderr.
    quiet = contextlib.redirect_stdout(sys.stderr) if fmt == "json" else contextlib.nullcontext()
    with quiet, progress_bar() as bar:
        tasks: dict[str, int] = {}

        def progress(step: str, done: int, total: int) -> None:
            if step not in tasks:
                tasks[step] = bar.add_task(step, total=total)
            bar.update(tasks[step], completed=done, total=total)
            if done >= total:
                bar.remove_task(tasks.pop(step))

        campaign = Campaign(
            config, log=lambda line: bar.console.print(line, highlight=False), progress=progress
        )
        result = campaign.run(max_rounds=max_rounds, until_blocked=until_blocked)
    _print_status(config.name, fmt, header=f"{result.status}: {result.reason}")


@app.command("status")
def status(
    name: str = typer.Argument(..., help="Campaign name."),
    fmt: str = typer.Option("table", "--format", help="table or json."),
    jobs: bool = typer.Option(
        False, "--jobs", help="List the DFT jobs: backend, ids, state, attempts, time in state."
    ),
) -> None:
    """Rounds, steps, counts, hit rates and running jobs of a campaign."""
    _check_format(fmt)
    if jobs:
        _print_jobs(name, fmt)
        return
    _print_status(name, fmt)


@app.command("retry")
def retry(
    name: str = typer.Argument(..., help="Campaign name."),
    failed: bool = typer.Option(False, "--failed", help="Rerun the DFT jobs of failed candidates."),
    lost: bool = typer.Option(False, "--lost", help="Requeue jobs the backend reports lost."),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Harvest the retried jobs until they end."),
) -> None:
    """Put failed and lost DFT jobs back in the queue (both when neither flag is given)."""
    from crystaloop.db import get_database
    from crystaloop.db.campaigns import CampaignStore
    from crystaloop.loop.campaign import Campaign
    from crystaloop.loop.config import parse_campaign_config

    database = get_database()
    doc = CampaignStore(database).require(name)
    config = parse_campaign_config(doc.config, source=f"campaign {name}")
    if not failed and not lost:
        failed = lost = True
    campaign = Campaign(config, database=database, log=lambda line: console.print(line, highlight=False))
    retried = campaign.retry(failed=failed, lost=lost, wait=wait)
    total = len(retried["failed"]) + len(retried["lost"])
    console.print(
        f"retried {len(retried['failed'])} failed and {len(retried['lost'])} lost job(s) of {name}"
        + ("" if wait or not total else "; the campaign's next harvest collects them"),
        highlight=False,
    )
    if wait and total:
        _print_jobs(name, "table", ids=retried["failed"] + retried["lost"])


@app.command("hull")
def hull(
    name: str = typer.Argument(..., help="Campaign name."),
    systems: str = typer.Option(
        None, "--systems", help="Chemical systems, comma-separated (e.g. Cu-Pd,Ni-Al); default: the hits'."
    ),
    all_relaxed: bool = typer.Option(
        False, "--all", help="The systems of every relaxed candidate, not only hits."
    ),
    within: float = typer.Option(
        0.1, "--within", min=0.0, help="Relax prior phases up to this far above the CHGNet hull (eV/atom)."
    ),
    fmt: str = typer.Option("table", "--format", help="table or json."),
) -> None:
    """Relax the competing phases of the campaign's chemical systems with its DFT settings (once,
    cached), then place its relaxed candidates against the DFT hull they complete."""
    import json

    from crystaloop.db import get_database
    from crystaloop.db.campaigns import CampaignStore
    from crystaloop.errors import UserError
    from crystaloop.loop.config import parse_campaign_config
    from crystaloop.loop.hull_phases import verify_against_hull

    _check_format(fmt)
    database = get_database()
    doc = CampaignStore(database).require(name)
    config = parse_campaign_config(doc.config, source=f"campaign {name}")
    chosen = None
    if systems:
        from pymatgen.core import Element

        chosen = []
        for text in systems.split(","):
            elements = [e for e in text.strip().split("-") if e]
            if len(elements) < 2 or not all(Element.is_valid_symbol(e) for e in elements):
                raise UserError(
                    f"--systems {text!r}: write a system as element symbols joined by '-', e.g. Cu-Pd"
                )
            chosen.append("-".join(sorted(elements)))
    log = (lambda line: None) if fmt == "json" else (lambda line: console.print(line, highlight=False))
    run, rows = verify_against_hull(
        database, config, systems=chosen, all_relaxed=all_relaxed, within=within, log=log
    )
    if fmt == "json":
        print(json.dumps({"systems": run.systems, "phases": run.phases, "reused": run.reused,
                          "from_cache": run.from_cache, "relaxed": run.relaxed, "failed": run.failed,
                          "candidates": rows}))  # fmt: skip
        return
    console.print(
        f"{name}: {run.phases} competing phase(s) in {', '.join(run.systems) or 'no system'}: "
        f"{run.reused} already relaxed, {run.from_cache} from the DFT cache, {run.relaxed} relaxed now, "
        f"{len(run.failed)} failed "
        f"({run.seconds:.0f} s)",
        highlight=False,
    )
    for line in run.failed:
        console.print(f"  failed: {line}", highlight=False)
    for row in rows:
        before = "-" if row["energy_above_hull_before"] is None else f"{row['energy_above_hull_before']:.3f}"
        bound = " (upper bound)" if row["upper_bound"] else ""
        console.print(
            f"  {row['candidate_id']} {row['formula']}: E_hull {before} -> {row['energy_above_hull']:.3f} eV/atom"
            f"{bound}, {row['n_phases']} phase(s) besides the elements; {row['decomposition']}",
            highlight=False,
        )


@app.command("stop")
def stop(name: str = typer.Argument(..., help="Campaign name.")) -> None:
    """Ask a running campaign to stop cleanly after its current step."""
    from crystaloop.db import get_database
    from crystaloop.db.campaigns import CampaignStore
    from crystaloop.errors import UserError

    if not CampaignStore(get_database()).request_stop(name):
        raise UserError(f"no campaign named {name!r}; list them with `crystaloop campaign status --help`")
    console.print(f"stop requested for {name}; it stops after its current step", highlight=False)


@app.command("report")
def report(
    name: str = typer.Argument(..., help="Campaign name."),
    out: Path = typer.Option(None, "--out", help="Folder for the report (default: the campaign folder)."),
    fmt: str = typer.Option("table", "--format", help="table or json (the summary)."),
) -> None:
    """Write the campaign report (Markdown and PNG plots) from the database and print its summary."""
    from crystaloop.db import get_database
    from crystaloop.loop.report import write_report
    from crystaloop.settings import get_settings

    _check_format(fmt)
    folder = out or get_settings().data_dir / "campaigns" / name
    paths = write_report(get_database(), name, folder)
    _print_status(name, fmt)
    if fmt == "table":
        for path in paths:
            console.print(f"wrote {path}", highlight=False)


def campaign_summary(database, name: str) -> dict:
    """Everything ``status`` shows, as plain data.

    Raises
    ------
    UserError
        No campaign of that name.
    """
    from crystaloop.db.campaigns import CampaignStore
    from crystaloop.db.documents import utcnow
    from crystaloop.db.store import CandidateStore

    store = CampaignStore(database)
    doc = store.require(name)
    rounds = []
    for r in store.all_rounds(name):
        rounds.append(
            {
                "round": r.round,
                "steps_done": [s for s, rec in r.steps.items() if rec.status == "done"],
                "finished": r.finished_at is not None,
                **{k: v for k, v in r.metrics.items()},
            }
        )
    running = list(
        database["candidates"].find(
            {"campaign": name, "state": "submitted"},
            {"_id": 0, "candidate_id": 1, "reduced_formula": 1, "dft_job": 1},
        )
    )
    return {
        "name": name,
        "status": doc.status,
        "reason": doc.status_reason,
        "lease": doc.lease.owner if doc.lease else None,
        "lease_stale": bool(doc.lease)
        and (store.dead_local_holder(name) is not None or doc.lease.expires_at < utcnow()),
        "model_versions": doc.model_versions,
        "states": CandidateStore(database).count_by_state(name),
        "rounds": rounds,
        "running_jobs": [
            {
                "candidate_id": j["candidate_id"],
                "formula": j["reduced_formula"],
                "backend": j.get("dft_job", {}).get("backend"),
            }
            for j in running
        ],
    }


def _print_status(name: str, fmt: str, header: str | None = None) -> None:
    from rich.table import Table

    from crystaloop.db import get_database
    from crystaloop.loop.steps import STEP_NAMES

    summary = campaign_summary(get_database(), name)
    if fmt == "json":
        console.print_json(json.dumps(summary, default=str))
        return
    if header:
        console.print(f"[bold]{name}[/] {header}", highlight=False)
    else:
        console.print(
            f"[bold]{name}[/]: {summary['status']}"
            + (f" ({summary['reason']})" if summary["reason"] else ""),
            highlight=False,
        )
    table = Table(
        "round",
        "steps",
        "generated",
        "shortlisted",
        "DFT",
        "relaxed",
        "failed",
        "hits",
        "hit rate",
        "cum. hits",
        "MAE before",
        "MAE after",
        "cache",
    )
    for r in summary["rounds"]:
        table.add_row(
            str(r["round"]),
            f"{len(r['steps_done'])}/{len(STEP_NAMES)}",
            _n(r.get("generated")),
            _n(r.get("shortlisted")),
            _n(r.get("submitted")),
            _n(r.get("relaxed")),
            _n(r.get("failed")),
            _n(r.get("hits")),
            _f(r.get("hit_rate"), ".0%"),
            _n(r.get("cumulative_hits")),
            _f(r.get("mae_before"), ".3f"),
            _f(r.get("mae_after"), ".3f"),
            _n(r.get("cache_hits")),
        )
    console.print(table)
    states = ", ".join(f"{k} {v}" for k, v in sorted(summary["states"].items()))
    console.print(f"candidates: {states or 'none'}", highlight=False)
    if summary["running_jobs"]:
        jobs = ", ".join(f"{j['formula']} ({j['backend']})" for j in summary["running_jobs"])
        console.print(f"running DFT jobs: {jobs}", highlight=False)
    if summary["lease"] and summary["lease_stale"]:
        console.print(
            f"held by: {summary['lease']}, which has stopped; the next `campaign run` takes over and resumes",
            highlight=False,
        )
    elif summary["lease"]:
        console.print(f"held by: {summary['lease']}", highlight=False)


def campaign_jobs(database, name: str, ids: list[str] | None = None) -> list[dict]:
    """The campaign's DFT jobs as the loop last saw them: one row per candidate sent to DFT.

    Raises
    ------
    UserError
        No campaign of that name.
    """
    from crystaloop.db.campaigns import CampaignStore
    from crystaloop.db.documents import utcnow

    CampaignStore(database).require(name)
    query: dict = {"campaign": name, "dft_job.backend": {"$exists": True}}
    if ids is not None:
        query["candidate_id"] = {"$in": ids}
    now = utcnow()
    rows = []
    for doc in database["candidates"].find(query, {"_id": 0, "candidate_id": 1, "reduced_formula": 1, "state": 1,
                                                   "dft_job": 1}).sort("candidate_id", 1):  # fmt: skip
        job = doc["dft_job"]
        since = job.get("state_since") or job.get("submitted_at")
        if since is not None and since.tzinfo is None:
            from datetime import UTC

            since = since.replace(tzinfo=UTC)
        ids_text = ", ".join(
            f"{key} {','.join(str(v) for v in value) if isinstance(value, list) else value}"
            for key, value in job.items()
            if key in ("fw_ids", "db_ids", "uuids", "pid", "task_id") and value
        )
        rows.append(
            {
                "candidate_id": doc["candidate_id"],
                "formula": doc.get("reduced_formula"),
                "candidate_state": doc["state"],
                "backend": job.get("backend"),
                "job_ids": ids_text,
                "job_state": job.get("state") or ("completed" if job.get("backend") == "cache" else None),
                "reason": job.get("state_reason"),
                "attempts": job.get("attempts"),
                "seconds_in_state": (now - since).total_seconds() if since is not None else None,
            }
        )
    return rows


def _print_jobs(name: str, fmt: str, ids: list[str] | None = None) -> None:
    from rich.table import Table

    from crystaloop.db import get_database

    rows = campaign_jobs(get_database(), name, ids)
    if fmt == "json":
        console.print_json(json.dumps(rows, default=str))
        return
    table = Table(
        "candidate", "formula", "backend", "job ids", "job state", "attempts", "in state", "candidate state"
    )
    for r in rows:
        table.add_row(
            r["candidate_id"],
            r["formula"] or "-",
            r["backend"] or "-",
            r["job_ids"] or "-",
            r["job_state"] or "-",
            _n(r["attempts"]),
            _duration(r["seconds_in_state"]),
            r["candidate_state"],
        )
    console.print(table)
    if not rows:
        console.print(f"{name}: no candidate sent to DFT yet", highlight=False)


def _duration(seconds) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds / 3600:.1f} h"


def _n(value) -> str:
    return "-" if value is None else str(int(round(value)))


def _f(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)
