"""A scheduling benchmark of the execution backends: sleeping jobs, killed workers, retries.

Its jobs sleep a set time and return a marked synthetic result (``synthetic: True``),
so many workers fit on one machine: it measures the orchestration (submit, state,
retry, output, record), never DFT. A given share of the jobs has its worker SIGKILLed
mid-job; a killed FireWorks worker is replaced by a fresh one, as a cluster's queue
would, the local backend starts a new process for the retried job, and jobflow-remote's
runner submits the rerun job to its ``shell`` worker again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from jobflow import Flow, job

from crystaloop.loop.bench.targets import CLUSTER


@job
def sleep_job(seconds: float, runs_dir: str) -> dict[str, Any]:
    """Sleep ``seconds`` and return a synthetic result; each finished run leaves a marker file."""
    time.sleep(seconds)
    ended = time.time()
    Path(runs_dir, f"{uuid.uuid4().hex}.run").write_text(str(ended))
    return {"synthetic": True, "slept_s": seconds, "ended_at": ended}


@dataclass
class ClusterBenchRow:
    """One backend at one worker count."""

    backend: str
    workers: int
    jobs: int
    job_s: float
    killed: int
    completed: int
    lost: int
    duplicated: int
    retried: int
    wall_s: float
    throughput_per_min: float
    loop_cpu_ms_per_job: float
    harvest_latency_mean_s: float
    harvest_latency_max_s: float
    poll_interval_s: float
    parallel_efficiency: float | None = None
    setup_cpu_s: float = 0.0
    notes: list[str] = field(default_factory=list)


def _flow(i: int, job_s: float, runs_dir: Path) -> Flow:
    step = sleep_job(job_s, str(runs_dir))
    step.name = f"sleep {i}"
    step.update_metadata({"crystaloop_role": "synthetic"})
    return Flow([step], name=f"bench {i}")


def _output(store, candidate_id: str) -> dict[str, Any] | None:
    store.connect()
    doc = store.query_one({"metadata.crystaloop_candidate": candidate_id}, load=True)
    return (doc or {}).get("output")


class _Workers:
    """FireWorks ``rlaunch`` processes; a killed one is replaced by a fresh one."""

    def __init__(self, folder: Path, count: int, env: dict[str, str], lp_file: Path) -> None:
        self.folder, self.env, self.lp_file = folder, env, lp_file
        self.procs: dict[str, subprocess.Popen] = {}
        self.n = 0
        for _ in range(count):
            self.start()

    def start(self) -> None:
        name = f"w{self.n}"
        self.n += 1
        work = self.folder / name
        work.mkdir(parents=True)
        code = "import sys; from fireworks.scripts.rlaunch_run import rlaunch; sys.exit(rlaunch())"
        command = [sys.executable, "-c", code, "-l", str(self.lp_file), "rapidfire", "--nlaunches", "infinite",
                   "--sleep", "1"]  # fmt: skip
        with open(work / "rlaunch.log", "wb") as log:
            self.procs[str(work)] = subprocess.Popen(command, cwd=work, env=self.env, stdout=log, stderr=log)

    def kill_running(self, lpad, fw_ids: list[int], within_s: float) -> bool:
        """SIGKILL the worker whose launch of ``fw_ids`` has run for under ``within_s`` (mid-job).

        A worker killed at its job's end may hold the workflow's lock, which FireWorks keeps
        until it expires; that is another fault than a worker lost mid-job, so it is not injected.
        """
        from datetime import timedelta

        since = (datetime.now(UTC) - timedelta(seconds=within_s)).isoformat()
        launch = lpad.launches.find_one(
            {"fw_id": {"$in": fw_ids}, "state": "RUNNING",
             "state_history": {"$elemMatch": {"state": "RUNNING", "created_on": {"$gte": since}}}},
            {"launch_dir": 1},
        )  # fmt: skip
        if not launch:
            return False
        for folder, proc in list(self.procs.items()):
            if launch["launch_dir"].startswith(folder) and proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                del self.procs[folder]
                self.start()
                return True
        return False

    def alive(self) -> bool:
        """True while at least one worker runs."""
        return any(proc.poll() is None for proc in self.procs.values())

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def run_case(
    backend_name: str,
    workers: int,
    *,
    jobs: int,
    job_s: float,
    kill_share: float,
    poll_s: float,
    folder: Path,
    database,
    settings,
) -> ClusterBenchRow:
    """Run ``jobs`` sleeping flows through one backend with ``workers`` workers; measure."""
    from crystaloop.dft import backends

    folder.mkdir(parents=True, exist_ok=True)
    runs_dir = folder / "runs"
    runs_dir.mkdir()
    to_kill = set(range(0, jobs, max(1, round(1 / kill_share)))) if kill_share > 0 else set()
    to_kill = set(sorted(to_kill)[: round(jobs * kill_share)])
    fw_workers = None
    runner = None
    if backend_name == "local":
        backend = backends.LocalBackend(folder / "jobs", parallel_jobs=workers, cores=workers)
    elif backend_name == "jobflow-remote":
        backend, runner = _remote_backend(folder, workers, poll_s, settings)
    else:
        lpad = backends.launchpad(settings)
        backend = backends.FireWorksBackend(lpad, lost_after_s=3.0)
        lp_file = folder / "my_launchpad.yaml"
        jf_file = folder / "jobflow.yaml"
        fw_file = folder / "FW_config.yaml"
        import yaml

        from crystaloop.db.connection import resolve_uri

        lp_file.write_text(
            yaml.safe_dump({"host": resolve_uri(settings), "name": settings.database, "uri_mode": True})
        )
        jf_file.write_text(yaml.safe_dump(backends.worker_jobflow_config(settings)))
        fw_file.write_text(yaml.safe_dump({"PING_TIME_SECS": 1}))
        env = {**os.environ, "JOBFLOW_CONFIG_FILE": str(jf_file), "FW_CONFIG_FILE": str(fw_file)}
        fw_workers = _Workers(folder / "workers", workers, env, lp_file)
    store = backends.job_store(settings)
    setup_cpu_s = _warm_up(backend_name, runs_dir)
    records = database["bench_cluster_tasks"]
    ids = [f"bench-{backend_name}-{workers}-{i:04d}" for i in range(jobs)]
    attempts = dict.fromkeys(ids, 1)
    pending = set(ids)
    killed: set[str] = set()
    lost_final = 0
    latencies: list[float] = []
    cpu = 0.0
    start = time.monotonic()
    try:
        c0 = time.process_time()
        submitted = {cid: backend.submit(_flow(i, job_s, runs_dir), cid) for i, cid in enumerate(ids)}
        cpu += time.process_time() - c0
        deadline = start + max(600.0, 20 * jobs * job_s / workers)
        while pending and time.monotonic() < deadline:
            c0 = time.process_time()
            for i, cid in enumerate(ids):
                if cid not in pending:
                    continue
                status = backend.state(cid)
                if i in to_kill and cid not in killed and status.state == "running":
                    cpu += time.process_time() - c0
                    hit = _kill(backend_name, backend, fw_workers, cid, submitted[cid], job_s / 2)
                    c0 = time.process_time()
                    if hit:
                        killed.add(cid)
                    continue
                if status.state == "completed":
                    output = _output(store, cid)
                    now = time.time()
                    records.replace_one({"candidate_id": cid}, {"candidate_id": cid, "output": output,
                                        "harvested_at": now}, upsert=True)  # fmt: skip
                    latencies.append(now - output["ended_at"])
                    pending.discard(cid)
                elif status.state in ("failed", "lost"):
                    if attempts[cid] >= 3:
                        lost_final += 1
                        pending.discard(cid)
                    else:
                        try:
                            backend.retry(cid)
                        except backends.BackendBusy:
                            continue  # a worker holds the workflow: next poll, as a campaign does
                        attempts[cid] += 1
            cpu += time.process_time() - c0
            if fw_workers is not None and not fw_workers.alive():
                raise RuntimeError(f"every rlaunch worker exited; see {folder / 'workers'}/*/rlaunch.log")
            if runner is not None and runner.poll() is not None:
                raise RuntimeError(f"the jobflow-remote runner exited; see {folder / 'runner.log'}")
            if pending:
                time.sleep(poll_s)
        wall = time.monotonic() - start
    finally:
        if fw_workers is not None:
            fw_workers.stop()
        if runner is not None:
            _stop(runner)
        if hasattr(backend, "close"):
            backend.close()
    runs = len(list(runs_dir.glob("*.run")))
    completed = records.count_documents({"candidate_id": {"$in": ids}})
    notes = [] if not pending else [f"{len(pending)} job(s) unfinished at the deadline"]
    return ClusterBenchRow(
        backend=backend_name,
        workers=workers,
        jobs=jobs,
        job_s=job_s,
        killed=len(killed),
        completed=completed,
        lost=lost_final + len(pending),
        duplicated=max(0, runs - completed),
        retried=sum(a - 1 for a in attempts.values()),
        wall_s=wall,
        throughput_per_min=60 * completed / wall if wall else 0.0,
        loop_cpu_ms_per_job=1000 * cpu / jobs,
        harvest_latency_mean_s=sum(latencies) / len(latencies) if latencies else float("nan"),
        harvest_latency_max_s=max(latencies) if latencies else float("nan"),
        poll_interval_s=poll_s,
        setup_cpu_s=setup_cpu_s,
        notes=notes,
    )


def _remote_backend(folder: Path, workers: int, poll_s: float, settings):
    """A jobflow-remote project with one local ``shell`` worker of ``workers`` slots, and its runner.

    The project lives in ``folder`` (``JFREMOTE_PROJECTS_FOLDER`` points there, for this
    process and the runner); the runner checks its queue every ``poll_s`` seconds (at least 1,
    jobflow-remote's unit), and retries a failed step after 1 s rather than its default minutes.
    Returns the backend and the runner's process.
    """
    import yaml

    from crystaloop.dft import backends

    projects = folder / "projects"
    projects.mkdir()
    os.environ["JFREMOTE_PROJECTS_FOLDER"] = str(projects)
    import jobflow_remote

    jobflow_remote.SETTINGS.projects_folder = str(projects)
    name = f"bench-{folder.name}"
    config = backends.remote_project_config(
        name, scheduler="shell", worker="bench_shell", work_dir=str(folder / "work"),
        runner_delay_s=max(1, round(poll_s)), settings=settings,
    )  # fmt: skip
    config["workers"]["bench_shell"]["max_jobs"] = workers
    config["runner"].update({"delta_retry": [1], "max_step_attempts": 3})
    config["base_dir"] = str(folder / "jfbase")
    (projects / f"{name}.yaml").write_text(yaml.safe_dump(config))
    backend = backends.JobflowRemoteBackend(name, "bench_shell")
    with open(folder / "runner.log", "w") as log:
        runner = subprocess.Popen(
            [sys.executable, "-c", f"from jobflow_remote.jobs.runner import Runner; Runner({name!r}).run()"],
            env=dict(os.environ), stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    return backend, runner


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()


def _kill_tree(pid: int) -> bool:
    """SIGKILL a process and everything under it; False when it had already ended."""
    import psutil

    try:
        root = psutil.Process(pid)
        family = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return False
    for proc in family:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=10)
    return True


def _warm_up(backend_name: str, runs_dir: Path) -> float:
    """Serialise one flow as the backend's submit does, untimed; returns the CPU seconds it took.

    The first serialisation in a process imports what jobflow and FireWorks load lazily
    (networkx, matplotlib, jinja2: about a second of CPU; jobflow-remote's submit walks the
    job graph with networkx). A loop process pays that once,
    not per job, so it is kept out of the per-job loop CPU and reported as ``setup_cpu_s``;
    it lands on the first case of each run.
    """
    c0 = time.process_time()
    flow = _flow(-1, 0.0, runs_dir)
    if backend_name == "fireworks":
        from jobflow.managers.fireworks import flow_to_workflow

        flow_to_workflow(flow, store=None).to_dict()
    elif backend_name == "jobflow-remote":
        from jobflow.core.flow import get_flow

        flow = get_flow(flow)
        [(job.as_dict(), parents) for job, parents in flow.iterflow()]  # the job graph (networkx), as add_flow
    else:
        from monty.json import jsanitize

        json.dumps(jsanitize({"jobs": list(flow.jobs), "output": flow.output}, strict=True, enum_values=True))
    return time.process_time() - c0


def _kill(
    backend_name: str, backend, fw_workers: _Workers | None, cid: str, ids: dict[str, Any], within_s: float
) -> bool:
    """SIGKILL the worker running ``cid`` (a FireWorks one only in its job's first ``within_s``)."""
    if backend_name == "jobflow-remote":
        running = backend.running_process_ids(cid)
        return bool(running) and _kill_tree(running[0])
    if backend_name == "local":
        status = json.loads((Path(ids["job_dir"]) / "status.json").read_text())
        try:
            os.kill(int(status["pid"]), signal.SIGKILL)
        except ProcessLookupError:
            return False
        return True
    return fw_workers is not None and fw_workers.kill_running(backend.lpad, ids["fw_ids"], within_s)


def efficiency(rows: list[ClusterBenchRow]) -> None:
    """Fill ``parallel_efficiency``: throughput / (workers x the one-worker throughput), per backend."""
    for row in rows:
        one = next((r for r in rows if r.backend == row.backend and r.workers == 1), None)
        if one is not None and one.throughput_per_min:
            row.parallel_efficiency = row.throughput_per_min / (row.workers * one.throughput_per_min)


def scale_note(rows: list[ClusterBenchRow], per_day: int = 10_000) -> dict[str, float]:
    """What the measured loop cost means for ``per_day`` relaxations a day."""
    cpu = max(r.loop_cpu_ms_per_job for r in rows) / 1000
    # Per job the loop writes: the submit transition, one state note per change (about 3),
    # the dft_tasks record, the DFT cache entry and the final transition.
    writes_per_job = 7
    return {
        "relaxations_per_day": per_day,
        "loop_cpu_s_per_day": cpu * per_day,
        "db_writes_per_s": writes_per_job * per_day / 86400,
    }


def write_result(rows: list[ClusterBenchRow], path: Path, parameters: dict[str, Any]) -> Path:
    """The benchmark's JSON: parameters, rows, targets and the 10,000-a-day note."""
    doc = {
        "benchmark": "cluster scheduling (sleeping synthetic jobs; not DFT)",
        "measured_at": datetime.now(UTC).isoformat(),
        "parameters": parameters,
        "targets": CLUSTER,
        "rows": [asdict(r) for r in rows],
        "scale": scale_note(rows),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))
    return path


def run_cases(
    backends: Sequence[str],
    workers: Sequence[int],
    *,
    jobs: int,
    job_s: float,
    kill_share: float,
    poll_s: float,
    log: Callable[[str], None],
    on_row: Callable[[list[ClusterBenchRow]], None] | None = None,
) -> list[ClusterBenchRow]:
    """:func:`run_case` for every backend and worker count, each in a fresh database that is dropped
    after it; the rows carry their parallel efficiency (:func:`efficiency`).

    The database name is set in ``CRYSTALOOP_DATABASE``, so the worker processes inherit it.
    ``on_row(rows)`` is called after each case with the rows so far (their efficiency filled),
    so that a run stopped part-way keeps what it measured.
    """
    import tempfile

    from crystaloop.db import get_database
    from crystaloop.db.connection import _client, resolve_uri
    from crystaloop.settings import get_settings

    rows = []
    scratch = Path(tempfile.mkdtemp(prefix="crystaloop-bench-cluster-"))
    for backend in backends:
        for count in workers:
            os.environ["CRYSTALOOP_DATABASE"] = f"bench_cluster_{uuid.uuid4().hex[:8]}"
            get_settings.cache_clear()
            settings = get_settings()
            database = get_database(settings)
            log(f"{backend}, {count} worker(s): {jobs} jobs of {job_s:g} s")
            try:
                rows.append(
                    run_case(
                        backend,
                        count,
                        jobs=jobs,
                        job_s=job_s,
                        kill_share=kill_share,
                        poll_s=poll_s,
                        folder=scratch / f"{backend}-{count}",
                        database=database,
                        settings=settings,
                    )  # fmt: skip
                )
            finally:
                _client(resolve_uri(settings)).drop_database(settings.database)
            last = rows[-1]
            log(
                f"  {last.completed} completed, {last.lost} lost, {last.duplicated} duplicated, "
                f"{last.killed} killed, {last.retried} retried in {last.wall_s:.1f} s"
            )
            if on_row is not None:
                efficiency(rows)
                on_row(rows)
    efficiency(rows)
    return rows
