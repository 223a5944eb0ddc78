"""A campaign round on the FireWorks backend with two `rlaunch` workers, one SIGKILLed mid-job.

The loop initialises the LaunchPad itself (the database is fresh), queues each selected
candidate's flow, and harvests through the backend. One worker is killed while its
Firework runs, leaving it RUNNING without pings; the loop finds it lost after
``execution.lost_after_s``, reruns it, and a replacement worker (as a cluster queue would
start) finishes it. Relaxations use the surrogate engine to stay fast.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import yaml

from crystaloop.db.campaigns import CampaignStore
from crystaloop.db.store import CandidateStore
from crystaloop.dft.backends import launchpad, worker_jobflow_config
from crystaloop.loop.campaign import Campaign
from crystaloop.loop.config import parse_campaign_config


def _worker(tmp_path: Path, name: str, lp_file: Path, env: dict[str, str], bin_dir: Path) -> subprocess.Popen:
    fworker = tmp_path / f"{name}.yaml"
    # Both workers are the same fworker (one cluster) in the category the campaign sets.
    fworker.write_text(yaml.safe_dump({"name": "cluster-a", "category": "dft", "query": "{}"}))
    folder = tmp_path / name
    folder.mkdir()
    rlaunch = str(bin_dir / "rlaunch")
    command = [rlaunch, "-l", str(lp_file), "-w", str(fworker), "rapidfire", "--nlaunches", "infinite",
               "--sleep", "1"]  # fmt: skip
    return subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_fireworks_round_survives_a_killed_worker(
    settings, database, tmp_path, loop_config, make_shortlist, shortlist_items, worker_bin
):
    from crystaloop.db.connection import resolve_uri

    uri = resolve_uri(settings)
    lp_file = tmp_path / "my_launchpad.yaml"
    lp_file.write_text(yaml.safe_dump({"host": uri, "name": settings.database, "uri_mode": True}))
    # What a cluster's workers are given: their own jobflow job store and a short ping interval.
    jobflow_file = tmp_path / "jobflow.yaml"
    jobflow_file.write_text(yaml.safe_dump(worker_jobflow_config(settings)))
    fw_config = tmp_path / "FW_config.yaml"
    fw_config.write_text(yaml.safe_dump({"PING_TIME_SECS": 1}))
    env = {**os.environ, "JOBFLOW_CONFIG_FILE": str(jobflow_file), "FW_CONFIG_FILE": str(fw_config)}
    name = "fw-campaign"
    ids = make_shortlist(database, name, items=shortlist_items[:4])
    config = parse_campaign_config(
        loop_config(
            name,
            budget={"candidates_per_round": 8, "dft_per_round": 3},
            execution={
                "backend": "fireworks",
                "worker": "cluster-a",
                "category": "dft",
                "lost_after_s": 15,
                "max_attempts": 3,
                "poll_interval_s": 0.5,
                "harvest_timeout_s": 600,
                "resources": {"cores": 4, "walltime": "01:00:00", "by_sites": [{"max_sites": 2, "cores": 2}]},
            },
            acquisition={"max_per_chemsys": 1},
            retrain={"cgcnn": False, "generator_conditioning": False},
        )
    )
    workers = [_worker(tmp_path, f"w{i}", lp_file, env, worker_bin) for i in range(2)]
    lpad = launchpad()
    killed: list[int] = []

    def kill_one_mid_job() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            for launch in lpad.launches.find({"state": "RUNNING"}, {"fw_id": 1, "launch_dir": 1}):
                if launch.get("launch_dir", "").startswith(str(tmp_path / "w0")):
                    workers[0].send_signal(signal.SIGKILL)
                    workers[0].wait()
                    killed.append(launch["fw_id"])
                    workers.append(_worker(tmp_path, "w2", lp_file, env, worker_bin))  # the queue starts another
                    return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_one_mid_job, daemon=True)
    killer.start()
    try:
        result = Campaign(config, database=database).run()
    finally:
        killer.join(timeout=5)
        for worker in workers:
            if worker.poll() is None:
                worker.terminate()
        errors = [w.communicate(timeout=60)[1] for w in workers]
    assert result.status == "finished", errors
    assert killed, "no Firework of worker w0 was seen running"
    record = CampaignStore(database).round(name, 0)
    assert record.steps["submit"].outputs["queued"] == 3
    store = CandidateStore(database)
    selected = [store.get(i) for i in ids if store.get(i).selected_round == 0]
    assert len(selected) == 3
    for doc in selected:
        assert doc.dft_job["backend"] == "fireworks" and doc.dft_job["fw_ids"]
        assert doc.state == "relaxed", doc.state_history[-1]
        assert doc.dft["formation_energy_per_atom"] is not None
        assert database["dft_tasks"].count_documents({"candidate_id": doc.candidate_id}) == 1
    retried = [d for d in selected if killed[0] in d.dft_job["fw_ids"]]
    assert len(retried) == 1 and retried[0].dft_job["attempts"] == 2
    assert "lost" in retried[0].dft_job["errors"][0]
    fireworks = list(lpad.fireworks.find({}, {"_id": 0}))
    assert fireworks and all(fw["state"] == "COMPLETED" for fw in fireworks)
    assert {fw["spec"]["crystaloop_candidate"] for fw in fireworks} == {d.candidate_id for d in selected}
    assert all(fw["spec"]["_fworker"] == "cluster-a" and fw["spec"]["_category"] == "dft" for fw in fireworks)
    # Two-site B2 cells take the rule's 2 cores; the formation-energy arithmetic asks for no queue.
    relax = [fw for fw in fireworks if fw["spec"]["crystaloop_role"] == "relax"]
    assert relax and all(fw["spec"]["_queueadapter"] == {"ntasks": 2, "walltime": "01:00:00"} for fw in relax)
    assert all("_queueadapter" not in fw["spec"] for fw in fireworks if fw["spec"]["crystaloop_role"] == "formation_energy")
    # No job store, URI or password in any spec: workers bring their own.
    specs = json.dumps([fw["spec"] for fw in fireworks], default=str)
    assert uri.split("//")[1] not in specs and "JobStore" not in specs
