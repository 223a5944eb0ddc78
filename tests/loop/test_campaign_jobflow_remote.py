"""A campaign round through jobflow-remote: a real runner and a local ``shell`` worker.

The worker's environment has no MongoDB URI, no crystaloop database or data dir and a
fresh HOME, so a job that reached for the database (or started an embedded one) would
fail or leave a data folder behind. The runner stores the jobs' outputs; the loop
reads them through the backend. One candidate's flow fails (its element has no
reference structure) and the candidate ends failed with the job's error text. The first
`campaign run` is killed between a submit and its record; the rerun finds that flow.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pymatgen.core import Lattice, Structure

from crystaloop.db.store import CandidateStore
from crystaloop.dft.backends import default_pre_run, remote_project_config
from crystaloop.loop.campaign import Campaign
from crystaloop.loop.config import parse_campaign_config

pytest.importorskip("jobflow_remote")


@pytest.fixture
def jf_project(settings, tmp_path, monkeypatch, worker_bin):
    """A jobflow-remote project on the test database with a local shell worker; its runner runs."""
    projects = tmp_path / "projects"
    projects.mkdir()
    monkeypatch.setenv("JFREMOTE_PROJECTS_FOLDER", str(projects))  # for the processes started here
    import jobflow_remote

    monkeypatch.setattr(jobflow_remote.SETTINGS, "projects_folder", str(projects))  # read at import
    home = tmp_path / "worker-home"
    home.mkdir()
    pre_run = "\n".join(
        [
            default_pre_run(),
            f"export PATH={worker_bin}:$PATH",
            "unset CRYSTALOOP_MONGODB_URI CRYSTALOOP_DATABASE CRYSTALOOP_DATA_DIR JOBFLOW_CONFIG_FILE",
            f"export HOME={home}",
        ]
    )
    config = remote_project_config(
        "cl-test",
        scheduler="shell",
        worker="local_shell",
        work_dir=str(tmp_path / "work"),
        pre_run=pre_run,
        runner_delay_s=1,
        settings=settings,
    )
    config["base_dir"] = str(tmp_path / "jfbase")
    (projects / "cl-test.yaml").write_text(yaml.safe_dump(config))
    runner = subprocess.Popen(
        [sys.executable, "-c", "from jobflow_remote.jobs.runner import Runner; Runner('cl-test').run()"],
        env=dict(os.environ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    yield {"name": "cl-test", "home": home, "runner": runner}
    runner.terminate()
    try:
        runner.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        runner.kill()


def test_jobflow_remote_round_with_a_failed_job_and_a_killed_submit(
    settings, prior_subset, tmp_path, jf_project, loop_config, make_shortlist, shortlist_items
):
    from jobflow_remote.jobs.jobcontroller import JobController

    database = prior_subset
    name = "jfr-campaign"
    ual = Structure(Lattice.cubic(3.1), ["U", "Al"], [[0, 0, 0], [0.5, 0.5, 0.5]])  # U: no reference
    ids = make_shortlist(database, name, items=[*shortlist_items[:2], (ual, -0.4, 0.05)])
    raw = loop_config(
        name,
        budget={"candidates_per_round": 8, "dft_per_round": 3},
        execution={
            "backend": "jobflow-remote",
            "project": "cl-test",
            "worker": "local_shell",
            "max_attempts": 1,
            "poll_interval_s": 0.5,
            "harvest_timeout_s": 900,
        },
        retrain={"cgcnn": False, "generator_conditioning": False},
    )
    path = tmp_path / "campaign.yaml"
    path.write_text(yaml.safe_dump(raw))
    exe = str(Path(sys.executable).parent / "crystaloop")
    killed = subprocess.run(
        [exe, "campaign", "run", str(path)],
        env={**os.environ, "CRYSTALOOP_KILL_AT": "submit:queued"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    store = CandidateStore(database)
    assert all(store.get(i).state == "selected" for i in ids if store.get(i).selected_round == 0)

    result = Campaign(parse_campaign_config(raw), database=database).run()
    assert result.status == "finished", jf_project["runner"].poll()
    controller = JobController.from_project_name("cl-test")
    selected = [store.get(i) for i in ids if store.get(i).selected_round == 0]
    assert len(selected) == 3
    for doc in selected:
        relax_jobs = controller.get_jobs_info(metadata={"crystaloop_candidate": doc.candidate_id,
                                                        "crystaloop_role": "relax"})  # fmt: skip
        assert len(relax_jobs) == 1  # one flow per candidate, though the first submit was killed
        assert doc.dft_job["backend"] == "jobflow-remote" and doc.dft_job["db_ids"]
    by_formula = {d.reduced_formula: d for d in selected}
    failed = by_formula.pop("UAl")
    assert failed.state == "failed"
    assert "no built-in reference structure for U" in failed.state_history[-1]["reason"]
    for doc in by_formula.values():
        assert doc.state == "relaxed", doc.state_history[-1]
        assert doc.dft["formation_energy_per_atom"] is not None
        task = database["dft_tasks"].find_one({"candidate_id": doc.candidate_id})
        assert task["state"] == "successful" and task["output"]["final_structure"]
    # The worker never had a database: no crystaloop data dir (an embedded server's home) under HOME.
    assert not (jf_project["home"] / ".crystaloop").exists()
    assert any((tmp_path / "work").rglob("jfremote_out.json"))  # the jobs did run in that worker
