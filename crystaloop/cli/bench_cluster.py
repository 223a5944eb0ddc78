"""``crystaloop bench cluster``: the scheduling benchmark of the execution backends (sleeping jobs)."""

from __future__ import annotations

from pathlib import Path

import typer

from crystaloop.cli._common import console


def register(app: typer.Typer) -> None:
    """Add ``bench cluster`` to ``app``."""
    app.command("cluster")(cluster)


def cluster(
    backends: str = typer.Option("local,fireworks", "--backends", help="Comma-separated: local, fireworks, jobflow-remote."),
    workers: str = typer.Option("1,4,8", "--workers", help="Worker counts, comma-separated."),
    jobs: int = typer.Option(100, "--jobs", min=1, help="Jobs per campaign."),
    job_s: float = typer.Option(5.0, "--job-s", min=0.0, help="Seconds each job sleeps."),
    kill: float = typer.Option(0.05, "--kill", min=0.0, max=0.5, help="Share of jobs whose worker is SIGKILLed."),
    poll_s: float = typer.Option(1.0, "--poll-s", min=0.05, help="The loop's poll interval, s."),
    output: Path = typer.Option(Path("docs/bench/cluster.json"), "--output", help="JSON result file."),
    fmt: str = typer.Option("table", "--format", help="table or json."),
) -> None:
    """Scheduling benchmark (not DFT): sleeping jobs through each backend, workers killed mid-job."""
    import json
    import os

    from rich.table import Table

    from crystaloop.errors import UserError
    from crystaloop.loop.bench import cluster as bench_cluster

    names = [b.strip() for b in backends.split(",") if b.strip()]
    unknown = [b for b in names if b not in ("local", "fireworks", "jobflow-remote")]
    if unknown:
        raise UserError(f"--backends {unknown[0]}: this benchmark runs local, fireworks and jobflow-remote")
    try:
        counts = sorted({int(w) for w in workers.split(",")})
    except ValueError:
        raise UserError(f"--workers {workers!r}: give worker counts such as 1,4,8") from None
    if fmt not in ("table", "json"):
        raise UserError(f"unknown format {fmt!r}; use --format table or --format json")
    parameters = {"jobs": jobs, "job_s": job_s, "kill_share": kill, "poll_s": poll_s, "cpus": os.cpu_count()}
    rows = bench_cluster.run_cases(
        names, counts, jobs=jobs, job_s=job_s, kill_share=kill, poll_s=poll_s,
        log=lambda line: console.print(line, highlight=False),
        on_row=lambda done: bench_cluster.write_result(done, output, parameters),  # kept if stopped part-way
    )  # fmt: skip
    path = bench_cluster.write_result(rows, output, parameters)
    if fmt == "json":
        console.print_json(path.read_text())
        return
    table = Table("backend", "workers", "completed", "lost", "dup.", "killed", "retried", "wall s", "jobs/min",
                  "par. eff.", "loop CPU ms/job", "latency mean s", "latency max s", title="scheduling benchmark "
                  "(sleeping synthetic jobs, not DFT)")  # fmt: skip
    for r in rows:
        table.add_row(r.backend, str(r.workers), str(r.completed), str(r.lost), str(r.duplicated), str(r.killed),
                      str(r.retried), f"{r.wall_s:.1f}", f"{r.throughput_per_min:.1f}",
                      "-" if r.parallel_efficiency is None else f"{r.parallel_efficiency:.2f}",
                      f"{r.loop_cpu_ms_per_job:.1f}", f"{r.harvest_latency_mean_s:.2f}",
                      f"{r.harvest_latency_max_s:.2f}")  # fmt: skip
    console.print(table)
    scale = json.loads(path.read_text())["scale"]
    console.print(
        f"10,000 relaxations a day: loop CPU {scale['loop_cpu_s_per_day'] / 60:.1f} min/day, "
        f"about {scale['db_writes_per_s']:.2f} loop writes/s; wrote {path}",
        highlight=False,
    )
