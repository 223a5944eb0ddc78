"""Execution backends: FireWorks rapidfire on the embedded server, jobflow-remote config."""

from __future__ import annotations

import importlib.util

import pytest
import yaml
from jobflow import Flow, JobStore
from maggma.stores import MemoryStore

from crystaloop.dft.backends import (
    job_store,
    launch_rapidfire,
    launchpad,
    remote_project_config,
    run_local,
    submit_fireworks,
    submit_remote,
    write_remote_project,
)
from crystaloop.dft.espresso.jobs import QERelaxMaker
from crystaloop.dft.references import bulk_structure
from crystaloop.errors import UserError


def test_job_store_lives_in_the_crystaloop_database(fake_settings):
    store = job_store()
    assert isinstance(store, JobStore)
    assert store.docs_store.database == fake_settings.database
    assert set(store.additional_stores) == {"data"}


def test_fireworks_rapidfire_runs_the_flow(fake_pw, fake_settings, database, tmp_path):
    fake = fake_pw({"qe relax": "si_relax"})
    relax = QERelaxMaker().make(bulk_structure("Si", "diamond", 5.431))
    lpad = launchpad()
    lpad.reset("", require_password=False)
    ids = submit_fireworks(Flow([relax]), lpad=lpad)
    assert len(ids) == 1
    launch_rapidfire(lpad=lpad, launch_dir=tmp_path)
    assert lpad.get_fw_by_id(ids[0]).state == "COMPLETED"
    assert len(fake.calls) == 1
    store = job_store()
    store.connect()
    output = store.query_one({"uuid": relax.uuid}, load=True)["output"]
    assert output["state"] == "successful" and output["engine"] == "espresso"
    assert len(output["forces"]) == 2
    assert database["dft_tasks"].find_one({"task_id": relax.uuid})["state"] == "successful"


@pytest.mark.parametrize("scheduler", ["slurm", "pbs"])
def test_remote_project_config_points_at_the_same_database(fake_settings, tmp_path, scheduler):
    config = remote_project_config(
        "cl",
        scheduler=scheduler,
        host="login.cluster",
        partition="short",
        account="mat123",
        walltime="02:00:00",
        resources={"nodes": 1},
    )
    worker = config["workers"][scheduler]  # the name configs/heusler_magnets.yaml uses
    assert worker["scheduler_type"] == scheduler and worker["type"] == "remote"
    assert worker["host"] == "login.cluster"
    assert worker["resources"]["partition" if scheduler == "slurm" else "queue"] == "short"
    assert worker["resources"]["account"] == "mat123"
    assert worker["resources"]["time" if scheduler == "slurm" else "walltime"] == "02:00:00"
    assert worker["pre_run"].startswith("source ") and worker["pre_run"].endswith("/bin/activate")
    assert config["queue"]["store"]["database"] == fake_settings.database
    assert config["jobstore"]["docs_store"]["collection_name"] == "jobflow_outputs"
    assert config["jobstore"]["additional_stores"]["data"]["collection_name"] == "jobflow_data"
    path = write_remote_project(config, tmp_path)
    assert yaml.safe_load(path.read_text()) == config


@pytest.mark.skipif(importlib.util.find_spec("jobflow_remote") is None, reason="needs jobflow-remote")
def test_remote_project_config_validates_with_jobflow_remote(fake_settings):
    from jobflow_remote.config.base import Project

    project = Project.model_validate(remote_project_config("cl", scheduler="slurm"))
    assert "slurm" in project.workers


@pytest.mark.skipif(importlib.util.find_spec("jobflow_remote") is not None, reason="installed")
def test_submit_remote_without_jobflow_remote_is_a_user_error(fake_settings):
    with pytest.raises(UserError, match="jobflow-remote is not installed"):
        submit_remote(Flow([]), project="cl", worker="slurm_worker")


def _in_job_folder() -> str:
    import os

    return os.getcwd()


def test_run_local_keeps_jobflow_folder_warnings_out_of_the_log(settings, tmp_path):
    import warnings

    from jobflow import job

    from crystaloop.dft.backends import run_local

    step = job(_in_job_folder)()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the deprecated folder change of each job used to warn
        responses = run_local(Flow([step]), root_dir=tmp_path)
    folder = responses[step.uuid][1].output
    assert folder == str(tmp_path)


def test_a_job_never_starts_an_embedded_server(tmp_path, monkeypatch):
    """With no URI and no server running, a recording job fails with one line instead of starting one."""
    from jobflow import job

    from crystaloop.dft import records
    from crystaloop.settings import get_settings

    monkeypatch.delenv("CRYSTALOOP_MONGODB_URI", raising=False)
    monkeypatch.setenv("CRYSTALOOP_DATA_DIR", str(tmp_path / "worker"))
    get_settings.cache_clear()
    try:
        step = job(records.tasks_by_state)()
        responses = run_local(Flow([step]), store=JobStore(MemoryStore()), root_dir=tmp_path)
    finally:
        get_settings.cache_clear()
    assert step.uuid not in responses  # the job raised
    assert not (tmp_path / "worker" / "db").exists()


def test_backend_protocol_and_resources():
    from crystaloop.dft.backends import (
        Backend,
        FireWorksBackend,
        JobflowRemoteBackend,
        LocalBackend,
        fireworks_queueadapter,
        remote_resources,
        walltime_seconds,
    )

    for cls in (LocalBackend, FireWorksBackend, JobflowRemoteBackend):
        assert all(callable(getattr(cls, verb)) for verb in ("submit", "state", "output", "retry", "cancel"))
    assert isinstance(LocalBackend("/tmp/crystaloop-protocol-check"), Backend)
    resources = {"nodes": 1, "cores": 32, "walltime": "1-02:00:00", "partition": "short", "account": "a", "qos": "q"}
    assert fireworks_queueadapter(resources) == {
        "nodes": 1, "ntasks": 32, "walltime": "1-02:00:00", "queue": "short", "account": "a", "qos": "q"
    }  # fmt: skip
    q = remote_resources(resources)
    assert (q.nodes, q.processes_per_node, q.time_limit, q.queue_name, q.account, q.qos) == (
        1, 32, 93600, "short", "a", "q"
    )  # fmt: skip
    assert remote_resources({"cores": 8}).processes == 8
    assert walltime_seconds("02:00:00") == 7200 and walltime_seconds("45") == 45
    with pytest.raises(UserError, match="walltime"):
        walltime_seconds("two hours")


def test_resource_rules_scale_with_the_cell(fake_settings):
    from crystaloop.loop.config import ResourceRules

    rules = ResourceRules.model_validate(
        {"cores": 16, "walltime": "02:00:00", "partition": "short",
         "by_sites": [{"max_sites": 40, "nodes": 2, "cores": 64, "walltime": "12:00:00"},
                      {"max_sites": 8, "cores": 8}]}
    )  # fmt: skip
    assert rules.for_sites(4) == {"cores": 8, "walltime": "02:00:00", "partition": "short"}
    assert rules.for_sites(20) == {"cores": 64, "nodes": 2, "walltime": "12:00:00", "partition": "short"}
    assert rules.for_sites(100) == {"cores": 16, "walltime": "02:00:00", "partition": "short"}


@pytest.mark.parametrize("fork_server", [True, False])
def test_local_workers_are_forked_by_one_server_and_a_killed_one_is_lost(
    settings, database, tmp_path, fork_server
):
    """Workers come from the fork server (or fresh processes); SIGKILL: lost; retry: running again."""
    import json
    import os
    import signal
    import time

    from crystaloop.dft.backends import LocalBackend
    from crystaloop.loop.bench.cluster import _flow

    runs = tmp_path / "runs"
    runs.mkdir()
    backend = LocalBackend(tmp_path / "jobs", parallel_jobs=2, cores=2, fork_server=fork_server)

    def wait_for(cid: str, states: tuple[str, ...], timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = backend.state(cid).state
            if state in states:
                return state
            time.sleep(0.05)
        raise AssertionError(f"{cid} never reached {states}")

    try:
        backend.submit(_flow(0, 0.0, runs), "quick")
        backend.submit(_flow(1, 60.0, runs), "slow")
        assert wait_for("quick", ("completed", "failed", "lost")) == "completed"
        assert backend.output("quick").task is None  # a synthetic job: no relax role
        assert wait_for("slow", ("running",)) == "running"
        server = backend._server
        assert (server is not None and server.poll() is None) if fork_server else server is None
        status = json.loads((tmp_path / "jobs" / "slow" / "status.json").read_text())
        assert os.getpgid(status["pid"]) == status["pid"]  # a session of its own
        os.kill(status["pid"], signal.SIGKILL)
        assert wait_for("slow", ("lost",)) == "lost"
        backend.retry("slow")
        assert wait_for("slow", ("running",)) == "running"
        again = json.loads((tmp_path / "jobs" / "slow" / "status.json").read_text())["pid"]
        assert again != status["pid"]
    finally:
        backend.close(grace_s=5)
    assert not os.path.exists(f"/proc/{again}")
    assert server is None or server.poll() is not None  # the fork server ended with close()
    assert not (tmp_path / "jobs" / "slow" / "status.json").exists()  # back in the queue
    assert len(list(runs.glob("*.run"))) == 1


def test_fireworks_states_are_read_in_one_batch_per_sweep(settings, database, tmp_path):
    """A sweep of state() over the pending candidates reads their Fireworks in one query."""
    from crystaloop.dft.backends import FireWorksBackend, launch_rapidfire, launchpad
    from crystaloop.loop.bench.cluster import _flow

    runs = tmp_path / "runs"
    runs.mkdir()
    lpad = launchpad()
    backend = FireWorksBackend(lpad, lost_after_s=3600)
    ids = [f"c{i}" for i in range(4)]
    for i, cid in enumerate(ids):
        backend.submit(_flow(i, 0.0, runs), cid)

    finds = []
    collection = type(lpad.fireworks)

    class Counting(collection):
        def find(self, *args, **kwargs):
            finds.append(args[0] if args else kwargs.get("filter"))
            return super().find(*args, **kwargs)

    lpad.fireworks.__class__ = Counting
    try:
        assert [backend.state(cid).state for cid in ids] == ["queued"] * 4
        assert len(finds) == 1  # one query for the four
        assert backend.states(ids) == {cid: backend.state(cid) for cid in ids}
        launch_rapidfire(lpad=lpad, launch_dir=tmp_path / "launches")
        finds.clear()
        assert [backend.state(cid).state for cid in ids] == ["completed"] * 4  # a new sweep: a fresh batch
        assert len(finds) == 1
    finally:
        lpad.fireworks.__class__ = collection
    assert backend.output("c0").task is None


def test_fireworks_retry_never_waits_on_a_dead_workers_lock(settings, database, tmp_path):
    """A locked workflow: retry is busy at once (not after FireWorks' 300 s); after lost_after_s it is unlocked."""
    import time

    from crystaloop.dft.backends import BackendBusy, FireWorksBackend, launchpad
    from crystaloop.loop.bench.cluster import _flow

    runs = tmp_path / "runs"
    runs.mkdir()
    lpad = launchpad()
    backend = FireWorksBackend(lpad, lost_after_s=1.0)
    (fw_id,) = backend.submit(_flow(0, 0.0, runs), "c0")["fw_ids"]
    lpad.workflows.update_one({"nodes": fw_id}, {"$set": {"locked": True}})  # as a killed worker leaves it
    start = time.monotonic()
    with pytest.raises(BackendBusy, match="locked"):
        backend.retry("c0")
    assert time.monotonic() - start < 5
    time.sleep(1.1)
    backend.retry("c0")  # held past lost_after_s: removed
    assert lpad.workflows.find_one({"nodes": fw_id}).get("locked") is None


def test_fireworks_checkout_abandoned_by_a_killed_worker_is_lost_and_rerun(settings, database, tmp_path):
    """A worker killed between reserving a Firework and recording its launch leaves it RESERVED
    with no launch: lost once untouched for lost_after_s, and retry puts it back to run."""
    import datetime

    from fireworks import FWorker

    from crystaloop.dft.backends import FireWorksBackend, launch_rapidfire, launchpad
    from crystaloop.loop.bench.cluster import _flow

    runs = tmp_path / "runs"
    runs.mkdir()
    lpad = launchpad()
    backend = FireWorksBackend(lpad, lost_after_s=60)
    (fw_id,) = backend.submit(_flow(0, 0.0, runs), "c0")["fw_ids"]
    # The first of checkout's two writes, as the killed worker made it; then its launch, never attached.
    lpad._get_a_fw_to_run(FWorker().query, fw_id=fw_id, checkout=True)
    assert lpad.fireworks.find_one({"fw_id": fw_id})["state"] == "RESERVED"
    assert backend.states(["c0"])["c0"].state == "running"  # fresh: a worker may still be starting it

    old = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=120)
    lpad.fireworks.update_one({"fw_id": fw_id}, {"$set": {"updated_on": old}})
    status = backend.states(["c0"])["c0"]
    assert status.state == "lost"
    assert f"Firework {fw_id} RESERVED" in status.reason and "killed at checkout" in status.reason

    backend.retry("c0")
    assert lpad.fireworks.find_one({"fw_id": fw_id})["state"] == "READY"
    launch_rapidfire(lpad=lpad, launch_dir=tmp_path / "launches")
    assert backend.states(["c0"])["c0"].state == "completed"
    assert len(list(runs.glob("*.run"))) == 1  # ran once


def test_fireworks_reserved_in_a_queue_is_not_lost(settings, database, tmp_path):
    """A Firework reserved for a queue job (qlaunch's reservation) carries its RESERVED launch:
    however long it waits in the queue, it is not an abandoned checkout."""
    import datetime

    from fireworks import FWorker

    from crystaloop.dft.backends import FireWorksBackend, launchpad
    from crystaloop.loop.bench.cluster import _flow

    runs = tmp_path / "runs"
    runs.mkdir()
    lpad = launchpad()
    backend = FireWorksBackend(lpad, lost_after_s=60)
    (fw_id,) = backend.submit(_flow(0, 0.0, runs), "c0")["fw_ids"]
    lpad.checkout_fw(FWorker(), str(tmp_path), fw_id=fw_id, state="RESERVED")
    old = datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=5)
    lpad.fireworks.update_one({"fw_id": fw_id}, {"$set": {"updated_on": old}})
    assert lpad.fireworks.find_one({"fw_id": fw_id})["launches"]
    assert backend.states(["c0"])["c0"].state == "running"


def test_jobflow_remote_retry_of_a_job_the_runner_holds_is_busy_not_an_error():
    """The runner locks a job while it moves it; a retry at that moment waits for the next poll."""
    pytest.importorskip("jobflow_remote")
    from types import SimpleNamespace

    from jobflow_remote.utils.db import JobLockedError

    from crystaloop.dft.backends import BackendBusy, JobflowRemoteBackend

    calls = []

    class Controller:
        def get_jobs_info(self, **query):
            state = SimpleNamespace(value="FAILED")
            return [SimpleNamespace(db_id="7", state=state), SimpleNamespace(db_id="8", state=state)]

        def rerun_job(self, db_id, force):
            calls.append(db_id)
            if db_id == "8":
                raise JobLockedError("Job with db_id 8 is locked")

    backend = JobflowRemoteBackend.__new__(JobflowRemoteBackend)
    backend.controller = Controller()
    backend._init_batches()
    with pytest.raises(BackendBusy, match="job 8 is locked by the runner"):
        backend.retry("c0")
    assert calls == ["7", "8"]  # the first was rerun; the locked one is left for the next poll
