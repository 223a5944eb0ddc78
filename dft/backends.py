"""Where flows run: locally, on a FireWorks LaunchPad, or through jobflow-remote.

All three keep their state in the same MongoDB as crystaloop (the configured
URI or the embedded server).

- ``local``: ``jobflow.run_locally`` with a ``JobStore`` of maggma ``MongoStore``s.
- ``fireworks``: ``flow_to_workflow`` onto a LaunchPad; workers run ``rlaunch``/``qlaunch``.
- ``jobflow-remote``: ``remote_project_config`` writes a project for SLURM or PBS workers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml

from crystaloop.errors import UserError

Backend = Literal["local", "fireworks", "jobflow-remote"]
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


def submit_fireworks(flow, *, lpad=None, store=None) -> list[int]:
    """Add ``flow`` to the LaunchPad as a workflow; returns the new Firework ids.

    Workers pick the Fireworks up with ``rlaunch rapidfire`` (or ``qlaunch``) and write
    outputs to the same ``JobStore`` as the local backend.
    """
    from jobflow.managers.fireworks import flow_to_workflow

    lpad = lpad or launchpad()
    workflow = flow_to_workflow(flow, store=store or job_store())
    mapping = lpad.add_wf(workflow)
    return sorted(mapping.values())


def launch_rapidfire(*, lpad=None, launch_dir: Path | str | None = None, nlaunches: int = 0) -> None:
    """Run every ready Firework in this process (``rlaunch rapidfire``); for tests and one node."""
    from fireworks.core.fworker import FWorker
    from fireworks.core.rocket_launcher import rapidfire

    lpad = lpad or launchpad()
    launch_dir = Path(launch_dir or ".")
    launch_dir.mkdir(parents=True, exist_ok=True)
    rapidfire(lpad, FWorker(), m_dir=str(launch_dir), nlaunches=nlaunches, strm_lvl="WARNING")


def remote_project_config(
    name: str,
    *,
    scheduler: Literal["slurm", "pbs", "shell"] = "slurm",
    host: str = "localhost",
    work_dir: str = "/scratch/crystaloop/jobs",
    pre_run: str = "module load quantum-espresso",
    queue: str | None = None,
    resources: dict[str, Any] | None = None,
    settings=None,
) -> dict[str, Any]:
    """A jobflow-remote project configuration for SLURM, PBS (or local ``shell``) workers.

    The queue and the job store are crystaloop's MongoDB, so the loop sees results as
    soon as workers write them.
    """
    uri, database = _uri_and_database(settings)
    worker: dict[str, Any] = {
        "type": "local" if host == "localhost" else "remote",
        "scheduler_type": scheduler,
        "work_dir": work_dir,
        "pre_run": pre_run,
        "timeout_execute": 60,
        "resources": dict(resources or {}),
    }
    if host != "localhost":
        worker["host"] = host
    if queue and scheduler != "shell":
        worker["resources"].setdefault("partition" if scheduler == "slurm" else "queue", queue)
    store = {"type": "MongoStore", "database": database, "host": uri}
    return {
        "name": name,
        "workers": {f"{scheduler}_worker": worker},
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


def run_flow(flow, backend: Backend = "local", **kwargs) -> Any:
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
