"""A campaign round on the FireWorks backend with two concurrent `rlaunch` workers.

The loop queues each selected candidate's flow on the LaunchPad (in the same
embedded MongoDB), two worker processes run them, and the harvest step collects
the results asynchronously. Relaxations use the surrogate engine to stay fast.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from crystaloop.db.campaigns import CampaignStore
from crystaloop.db.store import CandidateStore
from crystaloop.loop.campaign import Campaign
from crystaloop.loop.config import parse_campaign_config


def test_fireworks_round_with_two_workers(
    settings, database, tmp_path, loop_config, make_shortlist, shortlist_items
):
    from crystaloop.db.connection import resolve_uri
    from crystaloop.dft.backends import launchpad

    lpad = launchpad()
    lpad.reset("", require_password=False)
    lp_file = tmp_path / "my_launchpad.yaml"
    lp_file.write_text(
        yaml.safe_dump({"host": resolve_uri(settings), "name": settings.database, "uri_mode": True})
    )
    name = "fw-campaign"
    ids = make_shortlist(database, name, items=shortlist_items[:3])
    config = parse_campaign_config(
        loop_config(
            name,
            budget={"candidates_per_round": 8, "dft_per_round": 2},
            execution={"backend": "fireworks", "poll_interval_s": 0.5, "harvest_timeout_s": 600},
            retrain={"cgcnn": False, "generator_conditioning": False},
        )
    )
    rlaunch = str(Path(sys.executable).parent / "rlaunch")
    workers = []
    for i in range(2):
        fworker = tmp_path / f"fworker{i}.yaml"
        fworker.write_text(yaml.safe_dump({"name": f"worker-{i}", "category": "", "query": "{}"}))
        folder = tmp_path / f"w{i}"
        folder.mkdir()
        workers.append(
            subprocess.Popen(
                [
                    rlaunch,
                    "-l",
                    str(lp_file),
                    "-w",
                    str(fworker),
                    "rapidfire",
                    "--nlaunches",
                    "infinite",
                    "--sleep",
                    "1",
                ],
                cwd=folder,
                env=dict(os.environ),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    try:
        result = Campaign(config, database=database).run()
    finally:
        for worker in workers:
            worker.terminate()
        errors = [w.communicate(timeout=60)[1] for w in workers]
    assert result.status == "finished", errors
    record = CampaignStore(database).round(name, 0)
    assert record.steps["submit"].outputs["queued"] == 2
    store = CandidateStore(database)
    selected = [store.get(i) for i in ids if store.get(i).selected_round == 0]
    assert len(selected) == 2
    for doc in selected:
        assert doc.dft_job["backend"] == "fireworks" and doc.dft_job["fw_ids"]
        assert doc.state == "relaxed", doc.state_history[-1]
        assert doc.dft["formation_energy_per_atom"] is not None
    fireworks = list(lpad.fireworks.find({}, {"state": 1, "spec._crystaloop_candidate": 1}))
    assert fireworks and all(fw["state"] == "COMPLETED" for fw in fireworks)
    assert {fw["spec"]["_crystaloop_candidate"] for fw in fireworks} == {d.candidate_id for d in selected}
    launched_by = {launch["fworker"]["name"] for launch in lpad.launches.find({}, {"fworker.name": 1})}
    assert launched_by <= {"worker-0", "worker-1"} and launched_by
