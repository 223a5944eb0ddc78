"""Where flows run: locally, on a FireWorks LaunchPad, or through jobflow-remote.

A campaign talks to all three through one :class:`Backend` protocol (submit, state,
output, retry, cancel), keyed by the candidate:

- :class:`LocalBackend`: worker processes on this machine, ``parallel_jobs`` at a time,
  each running ``jobflow.run_locally`` into crystaloop's ``JobStore``.
- :class:`FireWorksBackend`: ``flow_to_workflow`` onto a LaunchPad in crystaloop's MongoDB;
  ``rlaunch``/``qlaunch`` workers write to the job store of their own jobflow settings.
- :class:`JobflowRemoteBackend`: ``submit_flow`` to a jobflow-remote project; its runner
  stores the outputs, and workers never reach the database.

Jobs only return results; the campaign writes ``dft_tasks``, the caches and the
candidate's state from :meth:`Backend.output`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import yaml
from pydantic import BaseModel, Field

from crystaloop.dft.schemas import ElementReference, FormationEnergyDocument, QETaskDocument
from crystaloop.errors import UserError

BackendName = Literal["local", "fireworks", "jobflow-remote"]
BACKENDS: tuple[str, ...] = ("local", "fireworks", "jobflow-remote")
OUTPUTS_COLLECTION = "jobflow_outputs"
DATA_COLLECTION = "jobflow_data"


def _uri_and_database(settings=None) -> tuple[str, str]:
    from crystaloop.db.connection import resolve_uri
    from crystaloop.settings import get_settings

    settings = settings or get_settings()
    return resolve_uri(settings), settings.database


def job_store(settings=None):
    """A jobflow ``JobStore`` on crystaloop's MongoDB: docs plus a ``data`` store for arrays."""
    from jobflow import JobStore
    from maggma.stores import MongoStore

    uri, database = _uri_and_database(settings)
    docs = MongoStore(database=database, collection_name=OUTPUTS_COLLECTION, uri=uri)
    data = MongoStore(database=database, collection_name=DATA_COLLECTION, uri=uri)
    return JobStore(docs, additional_stores={"data": data})


def run_local(
    flow, *, store=None, root_dir: Path | str | None = None, log: bool = False
) -> dict[str, Any]:
    """Run ``flow`` now with ``jobflow.run_locally`` and the MongoDB ``JobStore``.

    Returns jobflow's responses: ``{job_uuid: {index: Response}}``.
    """
    import warnings

    from jobflow import run_locally

    store = store or job_store()
    with warnings.catch_warnings():
        # jobflow enters each job's folder with monty's deprecated ``cd``: one warning per job
        warnings.filterwarnings("ignore", message="cd is deprecated", category=FutureWarning)
        return run_locally(flow, store=store, log=log, root_dir=root_dir, ensure_success=False)


def launchpad(settings=None):
    """A FireWorks LaunchPad stored in crystaloop's MongoDB database."""
    from fireworks import LaunchPad

    uri, database = _uri_and_database(settings)
    return LaunchPad(host=uri, name=database, uri_mode=True, strm_lvl="WARNING")


def submit_fireworks(flow, *, lpad=None, spec: dict[str, Any] | None = None) -> list[int]:
    """Add ``flow`` to the LaunchPad as a workflow; returns the new Firework ids.

    No job store goes into the Fireworks: workers use the ``JOB_STORE`` of their own
    jobflow settings (``~/.jobflow.yaml`` or ``$JOBFLOW_CONFIG_FILE``, see
    :func:`worker_jobflow_config`), so no database URI or password is written into a spec.
    ``spec`` is added to every Firework's spec.
    """
    from jobflow.managers.fireworks import flow_to_workflow

    lpad = lpad or launchpad()
    ensure_launchpad(lpad)
    workflow = flow_to_workflow(flow, store=None)
    for fw in workflow.fws:
        fw.spec.update(spec or {})
    mapping = lpad.add_wf(workflow)
    return sorted(mapping.values())


def ensure_launchpad(lpad) -> None:
    """Initialise an empty LaunchPad (as ``lpad reset`` would); refuse a half-initialised one.

    Raises
    ------
    UserError
        The LaunchPad holds Fireworks but has lost its id counter.
    """
    if lpad.fw_id_assigner.count_documents({}, limit=1):
        return
    if lpad.fireworks.count_documents({}, limit=1) or lpad.workflows.count_documents({}, limit=1):
        raise UserError(
            "the FireWorks LaunchPad holds Fireworks but has no id counter; back it up and run "
            "'lpad reset', or point crystaloop at another database"
        )
    lpad.reset("", require_password=False, max_reset_wo_password=0)


def worker_jobflow_config(settings=None) -> dict[str, Any]:
    """The jobflow settings (``JOB_STORE``) a FireWorks worker needs, for ``~/.jobflow.yaml``."""
    return {"JOB_STORE": job_store(settings).as_dict()}


def launch_rapidfire(*, lpad=None, launch_dir: Path | str | None = None, nlaunches: int = 0) -> None:
    """Run every ready Firework in this process (``rlaunch rapidfire``); for tests and one node.

    The jobs write to crystaloop's job store, as a worker configured by
    :func:`worker_jobflow_config` does.
    """
    import jobflow
    from fireworks.core.fworker import FWorker
    from fireworks.core.rocket_launcher import rapidfire

    lpad = lpad or launchpad()
    launch_dir = Path(launch_dir or ".")
    launch_dir.mkdir(parents=True, exist_ok=True)
    previous = jobflow.SETTINGS.JOB_STORE
    jobflow.SETTINGS.JOB_STORE = job_store()
    try:
        rapidfire(lpad, FWorker(), m_dir=str(launch_dir), nlaunches=nlaunches, strm_lvl="WARNING")
    finally:
        jobflow.SETTINGS.JOB_STORE = previous


def default_pre_run() -> str:
    """The shell line that activates this Python environment on a worker (same path assumed)."""
    activate = Path(sys.prefix) / "bin" / "activate"
    if activate.is_file():
        return f"source {activate}"
    return f"export PATH={Path(sys.executable).parent}:$PATH"


def remote_project_config(
    name: str,
    *,
    scheduler: Literal["slurm", "pbs", "shell"] = "slurm",
    host: str = "localhost",
    worker: str | None = None,
    work_dir: str = "/scratch/crystaloop/jobs",
    pre_run: str | None = None,
    partition: str | None = None,
    account: str | None = None,
    walltime: str | None = None,
    resources: dict[str, Any] | None = None,
    runner_delay_s: int | None = None,
    settings=None,
) -> dict[str, Any]:
    """A jobflow-remote project configuration for SLURM, PBS (or local ``shell``) workers.

    The runner's queue and job store are crystaloop's MongoDB, so the loop reads the
    outputs the runner stores. Workers need no database: nothing in the worker's
    settings names it. The worker is named after the scheduler unless ``worker`` is given.

    Parameters
    ----------
    pre_run
        Shell lines run before each job; default: activate this Python environment.
    partition, account, walltime
        Queue defaults of every job (SLURM partition / PBS queue, account, [D-]HH:MM:SS).
    runner_delay_s
        Seconds between the runner's checks (jobflow-remote's defaults when None).
    """
    uri, database = _uri_and_database(settings)
    defaults: dict[str, Any] = dict(resources or {})
    if partition and scheduler != "shell":
        defaults.setdefault("partition" if scheduler == "slurm" else "queue", partition)
    if account and scheduler != "shell":
        defaults.setdefault("account", account)
    if walltime and scheduler != "shell":
        walltime_seconds(walltime)  # a bad wall time is one line now, not a refused job later
        defaults.setdefault("time" if scheduler == "slurm" else "walltime", walltime)
    entry: dict[str, Any] = {
        "type": "local" if host == "localhost" else "remote",
        "scheduler_type": scheduler,
        "work_dir": work_dir,
        "pre_run": pre_run if pre_run is not None else default_pre_run(),
        "timeout_execute": 60,
        "resources": defaults,
    }
    if host != "localhost":
        entry["host"] = host
    store = {"type": "MongoStore", "database": database, "host": uri}
    config: dict[str, Any] = {
        "name": name,
        "workers": {worker or scheduler: entry},
        "queue": {
            "store": {**store, "collection_name": "jf_jobs"},
            "flows_collection": "jf_flows",
            "auxiliary_collection": "jf_auxiliary",
        },
        "exec_config": {"crystaloop": {"export": {"OMP_NUM_THREADS": "1"}}},
        "jobstore": {
            "docs_store": {**store, "collection_name": OUTPUTS_COLLECTION},
            "additional_stores": {"data": {**store, "collection_name": DATA_COLLECTION}},
        },
    }
    if runner_delay_s is not None:
        config["runner"] = {
            key: runner_delay_s
            for key in ("delay_checkout", "delay_check_run_status", "delay_advance_status", "delay_refresh_limited")
        }
    return config


def write_remote_project(config: dict[str, Any], directory: Path | str) -> Path:
    """Write a project YAML where ``jf`` finds it (``~/.jfremote/<name>.yaml`` by default).

    Raises
    ------
    UserError
        The folder cannot be created or the file written (a file in the path, no permission).
    """
    directory = Path(directory).expanduser()
    path = directory / f"{config['name']}.yaml"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
    except OSError as exc:
        raise UserError(
            f"cannot write {path} ({exc.strerror or exc}); pass --out a folder you can write to"
        ) from None
    return path


def submit_remote(flow, *, project: str, worker: str, resources: dict[str, Any] | None = None):
    """Submit ``flow`` through jobflow-remote (needs ``pip install crystaloop[remote]``).

    Raises
    ------
    UserError
        jobflow-remote is not installed.
    """
    try:
        from jobflow_remote import submit_flow
    except ImportError:
        raise UserError(
            "jobflow-remote is not installed; run 'pip install \"crystaloop[remote]\"' or use "
            "--backend local/fireworks"
        ) from None
    return submit_flow(flow, worker=worker, project=project, resources=resources)


def run_flow(flow, backend: BackendName = "local", **kwargs) -> Any:
    """Run or submit ``flow`` on ``backend``.

    Raises
    ------
    UserError
        Unknown backend.
    """
    if backend == "local":
        return run_local(flow, **kwargs)
    if backend == "fireworks":
        return submit_fireworks(flow, **kwargs)
    if backend == "jobflow-remote":
        return submit_remote(flow, **kwargs)
    raise UserError(f"unknown backend '{backend}'; choose one of {', '.join(BACKENDS)}")


# -- one interface for the campaign ---------------------------------------------------------------

JobStateName = Literal["queued", "running", "completed", "failed", "lost"]
CANDIDATE_KEY = "crystaloop_candidate"
"""Job metadata (and Firework spec) key that ties every job of a flow to its candidate."""
ROLE_KEY = "crystaloop_role"
"""Job metadata key naming a job's part in a formation-energy flow: relax, reference, formation_energy."""


class BackendBusy(Exception):
    """The job manager cannot act on a job right now (a locked workflow); try again at the next poll."""


@dataclass(frozen=True)
class JobStatus:
    """Where a candidate's flow stands with its job manager.

    Parameters
    ----------
    state
        ``queued``, ``running``, ``completed``, ``failed`` or ``lost``.
    reason
        Why it failed or was lost (the job manager's error text where it gives one).
    ids
        The job manager's ids (``fw_ids``; ``db_ids`` and ``uuids``; ``pid``).
    since
        When the state began, where the job manager records it (UTC).
    detail
        The job manager's own state names, e.g. ``{"12": "RUNNING"}``.
    """

    state: JobStateName
    reason: str | None = None
    ids: dict[str, Any] = field(default_factory=dict)
    since: datetime | None = None
    detail: dict[str, str] = field(default_factory=dict)


class FlowOutput(BaseModel):
    """What a formation-energy flow returned, read from its job manager's outputs."""

    task: QETaskDocument | None = None
    formation_energy: FormationEnergyDocument | None = None
    references: list[ElementReference] = Field(default_factory=list)


@runtime_checkable
class Backend(Protocol):
    """A job manager that runs one flow per candidate.

    ``submit`` is idempotent: a second call for the same candidate returns the ids of the
    flow already there. The caller (the campaign) counts attempts and decides on retries.
    """

    name: str

    def submit(self, flow, candidate_id: str, *, resources: dict[str, Any] | None = None) -> dict[str, Any]:
        """Queue ``flow`` for ``candidate_id`` (once); returns the job manager's ids."""

    def state(self, candidate_id: str) -> JobStatus:
        """The state of the candidate's flow."""

    def output(self, candidate_id: str) -> FlowOutput:
        """The outputs of the candidate's flow (empty fields for jobs that gave none)."""

    def retry(self, candidate_id: str) -> None:
        """Put the failed or lost jobs of the candidate's flow back in the queue."""

    def cancel(self, candidate_id: str) -> None:
        """Stop the candidate's flow; it will not run again unless retried."""


def tag_flow(flow, candidate_id: str) -> None:
    """Mark every job of ``flow`` with the candidate it belongs to (job metadata)."""
    flow.update_metadata({CANDIDATE_KEY: candidate_id})


def read_flow_output(store, candidate_id: str) -> FlowOutput:
    """The latest output of each job of the candidate's flow in a jobflow ``JobStore``."""
    store.connect()
    docs = sorted(
        store.query({f"metadata.{CANDIDATE_KEY}": candidate_id}, load=True),
        key=lambda d: str(d.get("completed_at") or ""),
    )
    task, fe, references = None, None, {}
    for doc in docs:
        role, output = (doc.get("metadata") or {}).get(ROLE_KEY), doc.get("output")
        if output is None:
            continue
        if role == "relax":
            task = QETaskDocument.model_validate(_plain(output))
        elif role == "formation_energy":
            fe = FormationEnergyDocument.model_validate(_plain(output))
        elif role == "reference":
            ref = ElementReference.model_validate(_plain(output))
            references[ref.element] = ref
    return FlowOutput(task=task, formation_energy=fe, references=list(references.values()))


def _plain(output: dict[str, Any]) -> dict[str, Any]:
    """A stored pydantic output without monty's ``@module``/``@class`` keys."""
    return {k: v for k, v in output.items() if not k.startswith("@")}


def _first_line(text: str | None, limit: int = 300) -> str | None:
    """The last non-empty line of an error text (the exception), shortened."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1][:limit] if lines else None


# -- local ------------------------------------------------------------------------------------------


class LocalBackend:
    """Flows run by worker processes on this machine, ``parallel_jobs`` at a time.

    Each candidate has a folder under ``root_dir`` with its ``flow.json`` and the
    ``status.json`` its worker (``python -m crystaloop.dft.local_worker``) keeps. Workers
    write their outputs to crystaloop's job store. A worker whose process is gone before it
    recorded an end is reported ``lost``; one started by an earlier loop process that is
    still alive is ``running``. :meth:`close` stops every worker this object started.

    Each worker is a process of its own, in a session of its own. With ``fork_server``
    (the default) it is forked by one ``local_worker --serve`` process that has imported
    jobflow, the job store and the flows' job modules once, so a flow does not pay a fresh
    Python start and those imports; without it (or when that server fails) each worker is
    a fresh ``python -m crystaloop.dft.local_worker DIR``.

    Parameters
    ----------
    root_dir
        Where the job folders live (``<data_dir>/campaigns/<name>/jobs`` for a campaign).
    parallel_jobs
        How many flows run at once.
    cores
        Cores shared among them (default: all of this machine's).
    fork_server
        Fork workers from a server that has the imports done (see above).
    """

    name = "local"
    #: Seconds to wait for the fork server's answer (its first answer includes the imports).
    fork_timeout_s = 300.0

    def __init__(
        self,
        root_dir: Path | str,
        *,
        parallel_jobs: int = 1,
        cores: int | None = None,
        fork_server: bool = True,
    ) -> None:
        self.root = Path(root_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        self.parallel_jobs = max(1, parallel_jobs)
        self.cores = cores or os.cpu_count() or 1
        self.fork_server = fork_server
        self._server: subprocess.Popen | None = None
        self._store = None
        self._queued = True  # flows may wait in root_dir (an earlier loop process's, too)
        self._children: dict[str, subprocess.Popen | _Forked] = {}
        self._settled: set[str] = set()

    @property
    def cores_per_job(self) -> int:
        """Each flow's share of the cores (the ``{np}`` of ``pw_command``)."""
        return max(1, self.cores // self.parallel_jobs)

    def _dir(self, candidate_id: str) -> Path:
        return self.root / candidate_id

    def _status(self, candidate_id: str) -> dict[str, Any] | None:
        path = self._dir(candidate_id) / "status.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def submit(self, flow, candidate_id: str, *, resources: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write the flow's folder (once); a worker starts it when a slot is free."""
        from monty.json import jsanitize

        folder = self._dir(candidate_id)
        path = folder / "flow.json"
        if not path.exists():
            tag_flow(flow, candidate_id)
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / "flow.json.tmp"
            # A Flow subclass (FormationEnergyFlow) does not serialise itself; its jobs do.
            doc = {"name": flow.name, "uuid": flow.uuid, "output": flow.output, "jobs": list(flow.jobs)}
            tmp.write_text(json.dumps(jsanitize(doc, strict=True, enum_values=True)))
            os.replace(tmp, path)
            self._queued = True
        self._schedule()
        return {"job_dir": str(folder)}

    def _alive(self, status: dict[str, Any]) -> bool:
        child = self._children.get(status.get("candidate_id", ""))
        if child is not None:
            return child.poll() is None
        pid = status.get("pid")
        if not pid or status.get("host") != socket.gethostname():
            return False
        return _worker_alive(int(pid))

    def _schedule(self) -> None:
        """Start queued flows while fewer than ``parallel_jobs`` run."""
        for cid, child in list(self._children.items()):
            if child.poll() is not None:
                del self._children[cid]
        running = len(self._children)
        if running >= self.parallel_jobs or not self._queued:
            return  # no free slot, or nothing queued since the last full look: no need to look
        for folder in sorted(self.root.iterdir()):
            if running >= self.parallel_jobs:
                return
            cid = folder.name
            if cid in self._children or cid in self._settled or not (folder / "flow.json").exists():
                continue
            status = self._status(cid)
            if status is not None:
                if status["state"] == "running" and self._alive(status):
                    running += 1  # an earlier loop process's worker, still at work
                elif status["state"] != "running":
                    self._settled.add(cid)  # ended; only a retry queues it again
                continue
            self._start(cid)
            running += 1
        self._queued = False  # every flow is started, running or ended; a submit or retry queues again

    def _start(self, candidate_id: str) -> None:
        folder = self._dir(candidate_id)
        if self.fork_server:
            pid = self._fork(folder)
            if pid is not None:
                self._children[candidate_id] = _Forked(pid, self._server)
                return
        env = {**os.environ, "OMP_NUM_THREADS": str(self.cores_per_job)}
        log = open(folder / "worker.log", "ab")  # noqa: SIM115 - the child owns it
        try:
            self._children[candidate_id] = subprocess.Popen(
                [sys.executable, "-m", "crystaloop.dft.local_worker", str(folder)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its pw.x (or mpirun) is stopped with it, as a group
            )
        finally:
            log.close()

    def _fork(self, folder: Path) -> int | None:
        """A worker for ``folder`` forked by the fork server (started if needed); None if it fails."""
        import selectors

        server = self._server
        if server is None or server.poll() is not None:
            log = open(self.root / "fork_server.log", "ab")  # noqa: SIM115 - the server owns it
            try:
                server = self._server = subprocess.Popen(
                    [sys.executable, "-m", "crystaloop.dft.local_worker", "--serve"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=log,
                    env={**os.environ, "OMP_NUM_THREADS": str(self.cores_per_job)},
                    start_new_session=True,  # no terminal signal of the loop's reaches it
                )
            except OSError:
                return None
            finally:
                log.close()
        request = {"folder": str(folder), "env": {"OMP_NUM_THREADS": str(self.cores_per_job)}}
        try:
            server.stdin.write(json.dumps(request).encode() + b"\n")
            server.stdin.flush()
            with selectors.DefaultSelector() as selector:
                selector.register(server.stdout, selectors.EVENT_READ)
                if not selector.select(self.fork_timeout_s):
                    raise TimeoutError
            return int(server.stdout.readline())
        except (OSError, ValueError, TimeoutError):  # a dead or stuck server: fresh processes from now on
            self._stop_server()
            self.fork_server = False
            return None

    def _stop_server(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        for stream in (server.stdin, server.stdout):
            try:
                stream.close()
            except OSError:
                pass
        try:
            server.wait(timeout=5)  # it ends when its stdin closes
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()

    def state(self, candidate_id: str) -> JobStatus:
        """Start queued flows where slots are free, then report this one."""
        self._schedule()
        folder = self._dir(candidate_id)
        if not (folder / "flow.json").exists():
            return JobStatus("lost", reason="no local job folder")
        status = self._status(candidate_id)
        if status is None:
            return JobStatus("queued", ids={"job_dir": str(folder)})
        since = datetime.fromisoformat(status["since"]) if status.get("since") else None
        ids = {"pid": status.get("pid"), "job_dir": str(folder)}
        if status["state"] == "running":
            if self._alive(status):
                return JobStatus("running", ids=ids, since=since)
            return JobStatus("lost", reason="its worker process ended without a result", ids=ids, since=since)
        return JobStatus(status["state"], reason=status.get("reason"), ids=ids, since=since)

    def output(self, candidate_id: str) -> FlowOutput:
        """The flow's outputs in crystaloop's job store."""
        if self._store is None:
            self._store = job_store()
        return read_flow_output(self._store, candidate_id)

    def retry(self, candidate_id: str) -> None:
        """Queue the flow again (the last status is kept as ``status.<n>.json``)."""
        folder = self._dir(candidate_id)
        self._stop(candidate_id)
        self._settled.discard(candidate_id)
        path = folder / "status.json"
        if path.exists():
            n = len(list(folder.glob("status.*.json")))
            os.replace(path, folder / f"status.{n}.json")
        self._queued = True
        self._schedule()

    def cancel(self, candidate_id: str) -> None:
        """Stop the flow's worker and record it failed (cancelled)."""
        self._stop(candidate_id)
        _write_status(self._dir(candidate_id), state="failed", reason="cancelled")

    def _stop(self, candidate_id: str, grace_s: float = 10.0) -> None:
        child = self._children.pop(candidate_id, None)
        if child is None:
            status = self._status(candidate_id)
            if not status or status.get("state") != "running" or not self._alive(status):
                return
            pid = int(status["pid"])
        else:
            pid = child.pid
        _stop_group(pid, grace_s, child)

    def close(self, grace_s: float = 10.0) -> None:
        """Stop every worker this object started (SIGTERM, then SIGKILL after ``grace_s``).

        Their flows go back to the queue, so a resumed campaign runs them without counting
        an attempt.
        """
        for cid in list(self._children):
            child = self._children.pop(cid)
            if child.poll() is None:
                _stop_group(child.pid, grace_s, child)
                status = self._status(cid)
                if status is not None and status.get("state") == "running":  # not one that just ended
                    (self._dir(cid) / "status.json").unlink(missing_ok=True)
        self._stop_server()


class _Forked:
    """A worker forked by the fork server: not this process's child, so watched by its pid.

    While the server runs, the kernel reaps its ended workers at once, so a pid that still
    answers signal 0 is the running worker. A worker orphaned by the server's end may stay a
    zombie under an init that does not reap; then /proc is read, and a zombie counts as ended.
    """

    def __init__(self, pid: int, server: subprocess.Popen | None = None) -> None:
        self.pid, self.server = pid, server
        self.returncode: int | None = None

    def poll(self) -> int | None:
        """None while the worker runs; then -1 (its exit status is its server's to see)."""
        if self.returncode is None:
            if self.server is not None and self.server.poll() is None:
                try:
                    os.kill(self.pid, 0)
                    return None
                except ProcessLookupError:
                    alive = False
            else:
                alive = _worker_alive(self.pid)
            if not alive:
                self.returncode = -1
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
            time.sleep(0.05)
        return self.returncode


def _worker_alive(pid: int) -> bool:
    """True while ``pid`` is a running (not zombie) local worker process."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):  # PermissionError: another user's process
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # gone since, or no /proc here
        return not Path("/proc/self").exists()
    return stat.rsplit(")", 1)[-1].split()[0] != "Z" and b"local_worker" in cmdline


def _stop_group(pid: int, grace_s: float, child: subprocess.Popen | None = None) -> None:
    """SIGTERM a worker's process group, then SIGKILL it if still there after ``grace_s``."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if child is not None and child.poll() is not None:
            break
        if child is None:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
        time.sleep(0.1)
    else:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if child is not None:
        child.wait()


def _write_status(folder: Path, **fields: Any) -> None:
    """Replace ``status.json`` atomically (``since`` is now)."""
    doc = {"since": datetime.now(UTC).isoformat(), **fields}
    tmp = folder / "status.json.tmp"
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, folder / "status.json")


# -- FireWorks ------------------------------------------------------------------------------------


class BatchedStates:
    """``state(candidate_id)`` answered from batches of ``states(ids)``: one query a poll, not one a candidate.

    A campaign's harvest (and the cluster benchmark) asks for the state of each pending
    candidate in turn. A call answers from the last batch read when that batch is under
    ``batch_max_age_s`` old and this candidate has not been answered from it yet; otherwise
    it reads a new batch, of every candidate asked about in the last three batches or
    submitted since (those reported completed leave it). Subclasses give :meth:`states`
    and call :meth:`_watch_candidate` on submit and :meth:`_forget_batch` on any change
    they make themselves.
    """

    #: A batch of states older than this is read again (s).
    batch_max_age_s = 1.0

    def _init_batches(self) -> None:
        self._batch: dict[str, JobStatus] = {}
        self._batch_at = 0.0
        self._answered: set[str] = set()
        self._watch: dict[str, int] = {}  # candidate -> number of the batch it was last asked about in
        self._batches = 0

    def states(self, candidate_ids) -> dict[str, JobStatus]:  # pragma: no cover - each backend's own
        raise NotImplementedError

    def _watch_candidate(self, candidate_id: str) -> None:
        self._watch[candidate_id] = self._batches

    def _forget_batch(self) -> None:
        self._batch, self._answered = {}, set()

    def state(self, candidate_id: str) -> JobStatus:
        """The candidate's state, from the current batch or a new one (see the class)."""
        fresh = time.monotonic() - self._batch_at < self.batch_max_age_s
        if not fresh or candidate_id not in self._batch or candidate_id in self._answered:
            self._batches += 1
            self._watch[candidate_id] = self._batches
            recent = [cid for cid, n in self._watch.items() if n >= self._batches - 3]
            self._batch, self._answered = self.states(recent), set()
            self._batch_at = time.monotonic()
        self._watch[candidate_id] = self._batches
        self._answered.add(candidate_id)
        status = self._batch[candidate_id]
        if status.state == "completed":
            self._watch.pop(candidate_id, None)
        return status


class FireWorksBackend(BatchedStates):
    """Flows as FireWorks workflows on crystaloop's LaunchPad.

    Every Firework carries the candidate id in ``spec.crystaloop_candidate``, the worker
    (``_fworker``) and category (``_category``) it must run on, and the queue resources
    (``_queueadapter``) of its cell. A RUNNING Firework whose launch has not pinged for
    ``lost_after_s`` is lost, as ``lpad detect_lostruns`` finds it (workers ping every
    ``PING_TIME_SECS`` of their FireWorks settings, which must be shorter).

    A poll that asks :meth:`state` for many candidates costs one query for all their
    Fireworks (and one for the pings of those running), not one per candidate
    (:class:`BatchedStates`).

    Parameters
    ----------
    lpad
        The LaunchPad (default: crystaloop's); an empty one is initialised.
    worker, category
        ``_fworker`` and ``_category`` of every Firework (None: any worker).
    lost_after_s
        Seconds without a ping after which a running job is lost.
    """

    name = "fireworks"
    _PROJECTION = {"fw_id": 1, "state": 1, "updated_on": 1, "name": 1, "launches": 1, "_id": 0,
                   f"spec.{CANDIDATE_KEY}": 1}  # fmt: skip

    def __init__(
        self, lpad=None, *, worker: str | None = None, category: str | None = None, lost_after_s: float = 14400.0
    ) -> None:
        self.lpad = lpad or launchpad()
        ensure_launchpad(self.lpad)
        self.worker, self.category, self.lost_after_s = worker, category, lost_after_s
        self._store = None
        self._init_batches()
        self._locked_since: dict[Any, float] = {}  # workflow -> when retry first found it locked

    def _fireworks(self, candidate_id: str) -> list[dict[str, Any]]:
        return list(
            self.lpad.fireworks.find({f"spec.{CANDIDATE_KEY}": candidate_id}, self._PROJECTION).sort("fw_id", 1)
        )

    def submit(self, flow, candidate_id: str, *, resources: dict[str, Any] | None = None) -> dict[str, Any]:
        """Add the flow's workflow unless the candidate already has one; returns ``fw_ids``."""
        self._watch_candidate(candidate_id)
        known = self._fireworks(candidate_id)
        if known:
            return {"fw_ids": [fw["fw_id"] for fw in known]}
        self._forget_batch()
        tag_flow(flow, candidate_id)
        spec: dict[str, Any] = {}
        if self.worker:
            spec["_fworker"] = self.worker
        if self.category:
            spec["_category"] = self.category
        from jobflow.managers.fireworks import flow_to_workflow

        workflow = flow_to_workflow(flow, store=None)
        for fw in workflow.fws:
            fw.spec.update(spec)
            if resources and fw.spec.get(ROLE_KEY) in ("relax", "reference"):
                fw.spec["_queueadapter"] = fireworks_queueadapter(resources)
        mapping = self.lpad.add_wf(workflow)
        return {"fw_ids": sorted(mapping.values())}

    def _error(self, fw: dict[str, Any]) -> str | None:
        launch = self.lpad.launches.find_one(
            {"fw_id": fw["fw_id"]}, {"action.stored_data": 1}, sort=[("launch_id", -1)]
        )
        data = ((launch or {}).get("action") or {}).get("stored_data") or {}
        exc = data.get("_exception") or {}
        return _first_line(exc.get("_stacktrace") if isinstance(exc, dict) else str(exc))

    def _lost_among(self, fws: list[dict[str, Any]]) -> set[int]:
        """The RUNNING ones of ``fws`` that are lost, found as ``lpad detect_lostruns`` finds them.

        A launch is stale when it is RUNNING and its RUNNING entry was last updated (pinged)
        over ``lost_after_s`` ago; a Firework is lost when each of its launches is stale or
        ended no better than FIZZLED. Two queries at most, whatever the number of Fireworks.
        """
        from datetime import timedelta

        from fireworks import Firework

        running = {fw["fw_id"]: fw for fw in fws if fw["state"] == "RUNNING"}
        if not running:
            return set()
        cutoff = (datetime.now(UTC) - timedelta(seconds=self.lost_after_s)).isoformat()
        stale = self.lpad.launches.find(
            {"fw_id": {"$in": list(running)}, "state": "RUNNING",
             "state_history": {"$elemMatch": {"state": "RUNNING", "updated_on": {"$lte": cutoff}}}},
            {"launch_id": 1, "fw_id": 1, "_id": 0},
        )  # fmt: skip
        stale_launches: dict[int, set[int]] = {}
        for launch in stale:
            stale_launches.setdefault(launch["fw_id"], set()).add(launch["launch_id"])
        if not stale_launches:
            return set()
        others = {lid for fw_id, ids in stale_launches.items() for lid in running[fw_id].get("launches", [])
                  if lid not in ids}  # fmt: skip
        states = (
            {d["launch_id"]: d["state"] for d in self.lpad.launches.find(
                {"launch_id": {"$in": list(others)}}, {"launch_id": 1, "state": 1, "_id": 0})}
            if others
            else {}
        )  # fmt: skip
        fizzled = Firework.STATE_RANKS["FIZZLED"]
        return {
            fw_id
            for fw_id, ids in stale_launches.items()
            if all(
                Firework.STATE_RANKS.get(states.get(lid, "UNKNOWN"), 0) <= fizzled
                for lid in running[fw_id].get("launches", [])
                if lid not in ids
            )
        }

    def states(self, candidate_ids) -> dict[str, JobStatus]:
        """The state of each candidate's flow, read in one batch.

        COMPLETED everywhere: completed; FIZZLED, DEFUSED or PAUSED: failed; a stale RUNNING
        Firework or an abandoned checkout (see :meth:`_abandoned_checkout`): lost.
        """
        ids = list(dict.fromkeys(candidate_ids))
        by_candidate: dict[str, list[dict[str, Any]]] = {cid: [] for cid in ids}
        for fw in self.lpad.fireworks.find({f"spec.{CANDIDATE_KEY}": {"$in": ids}}, self._PROJECTION).sort(
            "fw_id", 1
        ):
            by_candidate[fw["spec"][CANDIDATE_KEY]].append(fw)
        lost = self._lost_among([fw for fws in by_candidate.values() for fw in fws])
        return {cid: self._status(fws, lost) for cid, fws in by_candidate.items()}

    def _status(self, fws: list[dict[str, Any]], lost_fw_ids: set[int]) -> JobStatus:
        if not fws:
            return JobStatus("lost", reason="no Firework of its flow is on the LaunchPad")
        ids = {"fw_ids": [fw["fw_id"] for fw in fws]}
        detail = {str(fw["fw_id"]): fw["state"] for fw in fws}
        since = max((_parse_time(fw.get("updated_on")) for fw in fws), default=None, key=lambda t: t or _EPOCH)
        states = {fw["state"] for fw in fws}
        if states == {"COMPLETED"}:
            return JobStatus("completed", ids=ids, since=since, detail=detail)
        for fw in fws:
            if fw["state"] == "FIZZLED":
                reason = f"Firework {fw['fw_id']} ({fw['name']}) fizzled: {self._error(fw) or 'no error text'}"
                return JobStatus("failed", reason=reason, ids=ids, since=since, detail=detail)
        for name, how in (("DEFUSED", "lpad reignite_fws"), ("PAUSED", "lpad resume_fws")):
            for fw in fws:
                if fw["state"] == name:
                    reason = f"Firework {fw['fw_id']} is {name} (retry, or '{how} -i {fw['fw_id']}')"
                    return JobStatus("failed", reason=reason, ids=ids, since=since, detail=detail)
        if "RUNNING" in states:
            lost = [fw["fw_id"] for fw in fws if fw["fw_id"] in lost_fw_ids]
            if lost:
                reason = f"Firework {lost[0]} RUNNING without a ping for over {self.lost_after_s:g} s"
                return JobStatus("lost", reason=reason, ids=ids, since=since, detail=detail)
            return JobStatus("running", ids=ids, since=since, detail=detail)
        if "RESERVED" in states:
            abandoned = [fw["fw_id"] for fw in fws if self._abandoned_checkout(fw)]
            if abandoned:
                reason = (
                    f"Firework {abandoned[0]} RESERVED by a worker that never started it "
                    f"(killed at checkout) for over {self.lost_after_s:g} s"
                )
                return JobStatus("lost", reason=reason, ids=ids, since=since, detail=detail)
            return JobStatus("running", ids=ids, since=since, detail=detail)
        return JobStatus("queued", ids=ids, since=since, detail=detail)

    def _abandoned_checkout(self, fw: dict[str, Any]) -> bool:
        """A RESERVED Firework with no launch of its own, untouched for ``lost_after_s``.

        A worker checks a Firework out in two writes: the Firework becomes RESERVED, then its
        launch is recorded and it becomes RUNNING. A worker killed between the two leaves it
        RESERVED with no launch, which ``lpad detect_lostruns`` never reports (it looks only at
        RUNNING Fireworks). A Firework reserved in a queue (``qlaunch`` with reservations)
        carries its RESERVED launch, and is not taken for one of these.
        """
        if fw["state"] != "RESERVED" or fw.get("launches"):
            return False
        updated = _parse_time(fw.get("updated_on"))
        return updated is not None and (datetime.now(UTC) - updated).total_seconds() > self.lost_after_s

    def output(self, candidate_id: str) -> FlowOutput:
        """The outputs the workers wrote to their job store (crystaloop's)."""
        if self._store is None:
            self._store = job_store()
        return read_flow_output(self._store, candidate_id)

    def retry(self, candidate_id: str) -> None:
        """Rerun lost, abandoned and fizzled Fireworks, reignite defused ones, resume paused ones.

        Raises
        ------
        BackendBusy
            A worker holds the workflow's lock; nothing was changed by this call's failure.
        """
        from fireworks.core.launchpad import LockedWorkflowError

        self._forget_batch()
        self._unlock_or_wait(candidate_id)
        try:
            self.lpad.detect_lostruns(
                expiration_secs=self.lost_after_s, rerun=True, query={f"spec.{CANDIDATE_KEY}": candidate_id}
            )
            for fw in self._fireworks(candidate_id):
                if fw["state"] == "FIZZLED":
                    self.lpad.rerun_fw(fw["fw_id"])
                elif fw["state"] == "DEFUSED":
                    self.lpad.reignite_fw(fw["fw_id"])
                elif fw["state"] == "PAUSED":
                    self.lpad.resume_fw(fw["fw_id"])
                elif self._abandoned_checkout(fw):
                    self.lpad.rerun_fw(fw["fw_id"])
        except LockedWorkflowError as exc:
            raise BackendBusy(str(exc)) from None

    def _unlock_or_wait(self, candidate_id: str) -> None:
        """Raise BackendBusy while the candidate's workflow is locked, without waiting on the lock.

        FireWorks' own lock waits up to ``WFLOCK_EXPIRATION_SECS`` (300 s) inside the call,
        which would hold the whole loop; and a worker SIGKILLed while it held the lock (at a
        job's checkout or end) never releases it. A lock this backend has seen held for
        ``lost_after_s`` is taken as such a dead worker's and removed, as ``lpad admin unlock``
        (or FireWorks' ``WFLOCK_EXPIRATION_KILL``) would.

        Raises
        ------
        BackendBusy
            The workflow is locked, and has not been for ``lost_after_s`` yet.
        """
        fw_ids = [fw["fw_id"] for fw in self._fireworks(candidate_id)]
        locked = (
            self.lpad.workflows.find_one({"nodes": {"$in": fw_ids}, "locked": True}, {"_id": 1})
            if fw_ids
            else None
        )
        if locked is None:
            return
        first = self._locked_since.setdefault(locked["_id"], time.monotonic())
        if time.monotonic() - first < self.lost_after_s:
            raise BackendBusy(
                f"the workflow of Fireworks {fw_ids} is locked by a worker; retried at a later poll"
            )
        self.lpad.workflows.update_one({"_id": locked["_id"], "locked": True}, {"$unset": {"locked": True}})
        self._locked_since.pop(locked["_id"], None)

    def cancel(self, candidate_id: str) -> None:
        """Defuse the candidate's Fireworks that have not completed."""
        self._forget_batch()
        for fw in self._fireworks(candidate_id):
            if fw["state"] not in ("COMPLETED", "DEFUSED"):
                self.lpad.defuse_fw(fw["fw_id"])


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _parse_time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None


def fireworks_queueadapter(resources: dict[str, Any]) -> dict[str, Any]:
    """crystaloop resources as the keys of FireWorks' SLURM/PBS queue-adapter templates."""
    keys = {"nodes": "nodes", "cores": "ntasks", "walltime": "walltime", "partition": "queue",
            "account": "account", "qos": "qos"}  # fmt: skip
    return {keys[k]: v for k, v in resources.items() if k in keys and v is not None}


def remote_resources(resources: dict[str, Any]):
    """crystaloop resources as a jobflow-remote (qtoolkit) ``QResources``."""
    from qtoolkit.core.data_objects import QResources

    values = {k: v for k, v in resources.items() if v is not None}
    nodes, cores = values.get("nodes"), values.get("cores")
    # qtoolkit takes either processes alone or nodes with processes per node.
    placement = (
        {"nodes": nodes, "processes_per_node": -(-(cores or nodes) // nodes)} if nodes else {"processes": cores}
    )
    return QResources(
        **placement,
        time_limit=walltime_seconds(values["walltime"]) if "walltime" in values else None,
        queue_name=values.get("partition"),
        account=values.get("account"),
        qos=values.get("qos"),
    )


def walltime_seconds(walltime: str | int) -> int:
    """``[D-]HH:MM:SS`` (or seconds) as seconds.

    Raises
    ------
    UserError
        Not a wall time.
    """
    if isinstance(walltime, int):
        return walltime
    days, _, clock = walltime.rpartition("-")
    try:
        numbers = [int(p) for p in clock.split(":")]
        day_seconds = int(days or 0) * 86400
    except ValueError:
        numbers = []
    if not 1 <= len(numbers) <= 3:
        raise UserError(f"walltime {walltime!r} is not [D-]HH:MM:SS; write e.g. '02:00:00'")
    seconds = 0
    for n in numbers:
        seconds = seconds * 60 + n
    return day_seconds + seconds


# -- jobflow-remote -------------------------------------------------------------------------------

#: jobflow-remote states, as the campaign sees them.
REMOTE_STATES: dict[str, JobStateName] = {
    "WAITING": "queued",
    "READY": "queued",
    "PAUSED": "queued",
    "CHECKED_OUT": "running",
    "UPLOADED": "running",
    "SUBMITTED": "running",
    "RUNNING": "running",
    "RUN_FINISHED": "running",
    "DOWNLOADED": "running",
    "BATCH_SUBMITTED": "running",
    "BATCH_RUNNING": "running",
    "COMPLETED": "completed",
    "FAILED": "failed",
    "REMOTE_ERROR": "failed",
    "STOPPED": "failed",
    "USER_STOPPED": "failed",
}


def ensure_remote_queue(controller) -> None:
    """Initialise an empty jobflow-remote queue database (as ``jf admin reset`` would).

    Raises
    ------
    UserError
        The queue holds jobs but has lost its id counter.
    """
    if controller.auxiliary.count_documents({"next_id": {"$exists": True}}, limit=1):
        return
    if controller.jobs.count_documents({}, limit=1) or controller.flows.count_documents({}, limit=1):
        raise UserError(
            "the jobflow-remote queue holds jobs but no id counter; back it up and run 'jf admin reset'"
        )
    controller.reset(max_limit=1)


class JobflowRemoteBackend(BatchedStates):
    """Flows submitted to a jobflow-remote project; its runner moves them and stores their outputs.

    Workers need no database: the runner uploads inputs, and inserts the outputs into the
    project's job store, where :meth:`output` reads them. A poll over many candidates reads
    their jobs in one query (:class:`BatchedStates`).

    Parameters
    ----------
    project, worker
        The jobflow-remote project and worker names.
    exec_config
        A named execution config of the project (modules, ``pre_run``), or None.
    """

    name = "jobflow-remote"

    def __init__(self, project: str | None, worker: str | None, *, exec_config: str | None = None) -> None:
        try:
            from jobflow_remote.jobs.jobcontroller import JobController
        except ImportError:
            raise UserError(
                "jobflow-remote is not installed; run 'pip install \"crystaloop[remote]\"' or use "
                "execution.backend local or fireworks"
            ) from None
        self.project, self.worker, self.exec_config = project, worker, exec_config
        try:
            from jobflow_remote.config.manager import ConfigManager

            # What jobflow-remote's submit_flow checks at every call, checked once: the
            # project, its worker and the execution config (submit then costs one insert).
            manager = ConfigManager()
            project_obj = manager.get_project(project)
            if self.worker is None:
                self.worker = next(iter(project_obj.workers), None)
            manager.get_worker(worker_name=self.worker, project_name=project_obj.name)
            if exec_config:
                manager.get_exec_config(exec_config_name=exec_config, project_name=project_obj.name)
            self.controller = JobController.from_project(project_obj)
        except Exception as exc:  # jobflow-remote's own ConfigError and friends
            raise UserError(
                f"jobflow-remote project {project or '(default)'}: {str(exc).splitlines()[0][:200]}; "
                "write one with 'crystaloop dft remote-config' and check it with 'jf project check'"
            ) from None
        ensure_remote_queue(self.controller)
        self._init_batches()

    def _jobs(self, candidate_id: str):
        return sorted(
            self.controller.get_jobs_info(metadata={CANDIDATE_KEY: candidate_id}), key=lambda j: int(j.db_id)
        )

    def running_process_ids(self, candidate_id: str) -> list[int]:
        """Process ids of the candidate's running jobs on their workers, as the runner recorded them."""
        return [
            int(j.remote.process_id)
            for j in self._jobs(candidate_id)
            if j.state.value == "RUNNING" and j.remote is not None and j.remote.process_id
        ]

    def submit(self, flow, candidate_id: str, *, resources: dict[str, Any] | None = None) -> dict[str, Any]:
        """Submit the flow unless the candidate already has jobs; returns ``db_ids`` and ``uuids``."""
        self._watch_candidate(candidate_id)
        jobs = self._jobs(candidate_id)
        if not jobs:
            self._forget_batch()
            tag_flow(flow, candidate_id)
            self.controller.add_flow(
                flow=flow,
                worker=self.worker,
                exec_config=self.exec_config,
                resources=remote_resources(resources) if resources else None,
            )
            jobs = self._jobs(candidate_id)
        return {"db_ids": [j.db_id for j in jobs], "uuids": [j.uuid for j in jobs]}

    def states(self, candidate_ids) -> dict[str, JobStatus]:
        """The state of each candidate's flow, from one query of the queue.

        FAILED, REMOTE_ERROR and STOPPED are failures, with jobflow-remote's error text.
        """
        ids = list(dict.fromkeys(candidate_ids))
        by_candidate: dict[str, list] = {cid: [] for cid in ids}
        key = f"job.metadata.{CANDIDATE_KEY}"
        for info in self.controller.get_jobs_info_query({key: {"$in": ids}}):
            by_candidate[info.metadata[CANDIDATE_KEY]].append(info)
        return {cid: self._status(sorted(jobs, key=lambda j: int(j.db_id))) for cid, jobs in by_candidate.items()}

    def _status(self, jobs) -> JobStatus:
        if not jobs:
            return JobStatus("lost", reason="no job of its flow in the jobflow-remote queue")
        ids = {"db_ids": [j.db_id for j in jobs], "uuids": [j.uuid for j in jobs]}
        detail = {j.db_id: j.state.value for j in jobs}
        since = max(_parse_time(j.updated_on) or _EPOCH for j in jobs)
        mapped = [REMOTE_STATES.get(j.state.value, "running") for j in jobs]
        for job, state in zip(jobs, mapped, strict=True):
            if state == "failed":
                text = job.error or job.remote.error or job.state.value
                reason = f"job {job.db_id} ({job.name}) {job.state.value}: {_first_line(text)}"
                return JobStatus("failed", reason=reason, ids=ids, since=since, detail=detail)
        if all(s == "completed" for s in mapped):
            return JobStatus("completed", ids=ids, since=since, detail=detail)
        if "running" in mapped:
            return JobStatus("running", ids=ids, since=since, detail=detail)
        return JobStatus("queued", ids=ids, since=since, detail=detail)

    def output(self, candidate_id: str) -> FlowOutput:
        """The outputs the runner inserted into the project's job store."""
        return read_flow_output(self.controller.jobstore, candidate_id)

    def retry(self, candidate_id: str) -> None:
        """Retry REMOTE_ERROR jobs and rerun FAILED or STOPPED ones.

        Raises
        ------
        BackendBusy
            The runner holds a job's lock at this moment (it is moving the job); the jobs
            handled before it stay handled, and the next poll tries again.
        """
        from jobflow_remote.utils.db import JobLockedError

        self._forget_batch()
        for job in self._jobs(candidate_id):
            try:
                if job.state.value == "REMOTE_ERROR":
                    self.controller.retry_job(db_id=job.db_id)
                elif job.state.value in ("FAILED", "STOPPED", "USER_STOPPED"):
                    self.controller.rerun_job(db_id=job.db_id, force=True)
            except JobLockedError as exc:
                raise BackendBusy(f"job {job.db_id} is locked by the runner; retried at a later poll ({exc})") from None

    def cancel(self, candidate_id: str) -> None:
        """Stop the candidate's jobs that have not completed."""
        self._forget_batch()
        for job in self._jobs(candidate_id):
            if REMOTE_STATES.get(job.state.value) in ("queued", "running"):
                self.controller.stop_job(db_id=job.db_id)
