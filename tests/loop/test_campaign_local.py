"""The local backend in a campaign: parallel relaxations, a lost worker, retry, SIGTERM, --until-blocked.

Relaxations use the surrogate engine; each runs in its own worker process, as pw.x jobs would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import yaml
from typer.testing import CliRunner

from crystaloop.cli import app
from crystaloop.db.store import CandidateStore
from crystaloop.dft.backends import LocalBackend
from crystaloop.loop.campaign import Campaign
from crystaloop.loop.config import parse_campaign_config

NO_RETRAIN = {"cgcnn": False, "generator_conditioning": False}


def _statuses(jobs_dir: Path) -> dict[str, dict]:
    found = {}
    for path in jobs_dir.glob("*/status.json"):
        try:
            found[path.parent.name] = json.loads(path.read_text())
        except ValueError:  # being replaced
            continue
    return found


def test_parallel_jobs_overlap_in_time(settings, prior_subset, loop_config, make_shortlist, shortlist_items):
    """With ``parallel_jobs: 2`` the round's two relaxations run at the same time."""
    database = prior_subset
    name = "parallel"
    ids = make_shortlist(database, name, items=shortlist_items[:3])
    config = parse_campaign_config(
        loop_config(name, execution={"parallel_jobs": 2, "cores": 2, "poll_interval_s": 0.2}, retrain=NO_RETRAIN)
    )
    campaign = Campaign(config, database=database)
    assert campaign.run().status == "finished"
    store = CandidateStore(database)
    relaxed = [store.get(i) for i in ids if store.get(i).state == "relaxed"]
    assert len(relaxed) == 2
    spans = []
    for doc in relaxed:
        status = json.loads((Path(doc.dft_job["job_dir"]) / "status.json").read_text())
        assert status["state"] == "completed"
        spans.append((datetime.fromisoformat(status["started_at"]), datetime.fromisoformat(status["ended_at"])))
        assert database["dft_tasks"].count_documents({"candidate_id": doc.candidate_id}) == 1
    (a_start, a_end), (b_start, b_end) = spans
    assert max(a_start, b_start) < min(a_end, b_end), spans  # they overlap
    assert LocalBackend(campaign.work_dir() / "jobs", parallel_jobs=2, cores=2).cores_per_job == 1


def test_a_lost_local_job_fails_its_candidate_and_retry_relaxes_it(
    settings, prior_subset, loop_config, make_shortlist, shortlist_items
):
    """A worker SIGKILLed mid-job is lost; with max_attempts 1 the candidate fails; `campaign retry` reruns it."""
    database = prior_subset
    name = "retry-local"
    ids = make_shortlist(database, name, items=shortlist_items[:2])
    config = parse_campaign_config(
        loop_config(
            name,
            budget={"candidates_per_round": 8, "dft_per_round": 1},
            execution={"max_attempts": 1, "poll_interval_s": 0.2},
            retrain=NO_RETRAIN,
        )
    )
    campaign = Campaign(config, database=database)
    jobs_dir = campaign.work_dir() / "jobs"
    killed: list[int] = []

    def kill_the_worker() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            for status in _statuses(jobs_dir).values():
                if status["state"] == "running":
                    os.kill(status["pid"], signal.SIGKILL)
                    killed.append(status["pid"])
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_the_worker, daemon=True)
    killer.start()
    assert campaign.run().status == "finished"
    killer.join(timeout=5)
    assert killed
    store = CandidateStore(database)
    (failed,) = [store.get(i) for i in ids if store.get(i).selected_round == 0]
    assert failed.state == "failed"
    assert "lost after 1 attempt" in failed.state_history[-1]["reason"]

    result = CliRunner().invoke(app, ["campaign", "retry", name, "--failed"])
    assert result.exit_code == 0, result.output
    assert "retried 1 failed" in result.output
    again = store.get(failed.candidate_id)
    assert again.state == "relaxed", again.state_history[-1]
    assert again.dft["formation_energy_per_atom"] is not None
    assert database["dft_tasks"].count_documents({"candidate_id": again.candidate_id}) == 1
    assert "lost" in again.dft_job["errors"][-1]
    jobs = CliRunner().invoke(app, ["campaign", "status", name, "--jobs", "--format", "json"])
    (row,) = json.loads(jobs.output)
    assert row["backend"] == "local" and row["job_state"] == "completed" and row["attempts"] == 1
    assert row["candidate_state"] == "relaxed" and row["seconds_in_state"] >= 0


def test_sigterm_stops_every_worker_and_until_blocked_resumes(
    settings, prior_subset, loop_config, make_shortlist, shortlist_items, tmp_path
):
    """SIGTERM to `campaign run` stops its workers; `--until-blocked` then exits 0 while jobs run."""
    database = prior_subset
    name = "sigterm-local"
    ids = make_shortlist(database, name, items=shortlist_items[:3])
    path = tmp_path / "campaign.yaml"
    path.write_text(
        yaml.safe_dump(loop_config(name, execution={"parallel_jobs": 2, "poll_interval_s": 0.2}, retrain=NO_RETRAIN))
    )
    exe = str(Path(sys.executable).parent / "crystaloop")
    loop = subprocess.Popen([exe, "campaign", "run", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    jobs_dir = Path(settings.data_dir) / "campaigns" / name / "jobs"
    deadline = time.monotonic() + 300
    pids: list[int] = []
    while time.monotonic() < deadline and len(pids) < 2:
        pids = [s["pid"] for s in _statuses(jobs_dir).values() if s["state"] == "running"]
        time.sleep(0.05)
    assert len(pids) == 2, loop.stderr.read() if loop.poll() is not None else "workers did not start"
    loop.send_signal(signal.SIGTERM)
    _, err = loop.communicate(timeout=120)
    assert loop.returncode == 143, err[-2000:]
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    assert not _statuses(jobs_dir)  # stopped flows went back to the queue, no attempt counted

    first = subprocess.run([exe, "campaign", "run", str(path), "--until-blocked"], capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    assert first.returncode == 0, first.stderr[-2000:]
    assert "blocked" in first.stdout + first.stderr
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        states = [s["state"] for s in _statuses(jobs_dir).values()]
        if len(states) == 2 and all(s == "completed" for s in states):
            break
        time.sleep(0.2)
    second = subprocess.run([exe, "campaign", "run", str(path), "--until-blocked"], capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert second.returncode == 0, second.stderr[-2000:]
    store = CandidateStore(database)
    selected = [store.get(i) for i in ids if store.get(i).selected_round == 0]
    assert len(selected) == 2 and all(d.state == "relaxed" for d in selected)
    assert all(d.dft_job["attempts"] == 1 for d in selected)


def test_a_remote_backend_without_a_mongodb_uri_is_refused(tmp_path, monkeypatch, loop_config):
    import pytest

    from crystaloop.errors import UserError
    from crystaloop.loop import preflight
    from crystaloop.settings import get_settings

    monkeypatch.delenv("CRYSTALOOP_MONGODB_URI", raising=False)
    monkeypatch.setenv("CRYSTALOOP_DATA_DIR", str(tmp_path))
    get_settings.cache_clear()
    try:
        for backend in ("fireworks", "jobflow-remote"):
            config = parse_campaign_config(loop_config("remote", execution={"backend": backend}))
            with pytest.raises(UserError, match="needs a MongoDB its workers") as info:
                preflight.check_execution(config)
            assert "\n" not in info.value.message
        preflight.check_execution(parse_campaign_config(loop_config("here")))  # local: the embedded server
    finally:
        get_settings.cache_clear()
