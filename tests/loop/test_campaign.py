"""The campaign loop on the real embedded DB with real CHGNet (surrogate engine).

- The steps after generation (acquire, submit, harvest, retrain, report) on hand-made
  shortlisted candidates: states, DFT values, model versions, the DFT cache.
- The lease: a live lease blocks a second process; a stale one is taken over.
- A stop request ends the run after the current step; the next run resumes.
"""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pytest
from pymatgen.core import Structure

from crystaloop.db.campaigns import CampaignStore
from crystaloop.db.documents import CandidateState, Lease, utcnow
from crystaloop.db.store import CandidateStore
from crystaloop.errors import UserError
from crystaloop.generative.models.checkpoint import load_model
from crystaloop.generative.train.finetune import predict_structures
from crystaloop.generative.train.run import resolve_checkpoint
from crystaloop.loop.accuracy import campaign_accuracy
from crystaloop.loop.acquire import fit_sigma_scale
from crystaloop.loop.campaign import Campaign
from crystaloop.loop.config import parse_campaign_config
from crystaloop.loop.steps import sigma_calibration

PROP = "formation_energy_per_atom"


def test_round_after_generation(
    settings, prior_subset, loop_config, make_shortlist, shortlist_items, tmp_path
):
    """One round from a stored shortlist: acquisition, surrogate DFT, harvest, retrain, report."""
    database = prior_subset
    name = "loop-steps"
    ids = make_shortlist(database, name)
    lines: list[str] = []
    config = loop_config(name, acquisition={"max_per_chemsys": 1, "calibrate": True})
    campaign = Campaign(parse_campaign_config(config), database=database, log=lines.append)
    result = campaign.run()
    assert result.status == "finished"
    assert "max_rounds" in result.reason

    record = CampaignStore(database).round(name, 0)
    assert [s for s in record.steps] == [
        "generate",
        "filter",
        "acquire",
        "submit",
        "harvest",
        "retrain",
        "report",
    ]
    assert record.counts["selected"] == 2 and record.counts["relaxed"] == int(record.metrics["relaxed"])
    assert all(step.status == "done" for step in record.steps.values())
    # The shortlist was found, not regenerated.
    assert record.steps["generate"].outputs["resumed"] is True and record.steps["filter"].outputs["resumed"]
    # Acquisition took the two most probable in-window candidates (Ni-Al, Fe-Al share no chemsys).
    picked = record.steps["acquire"].outputs["candidate_ids"]
    assert picked == [ids[0], ids[2]]
    store = CandidateStore(database)
    for cid in ids:
        doc = store.get(cid)
        states = [h["state"] for h in doc.state_history]
        if cid in picked:
            assert states[:4] == ["generated", "shortlisted", "selected", "submitted"]
            assert doc.state in (CandidateState.RELAXED.value, CandidateState.FAILED.value)
            assert states.count("submitted") == 1
            assert doc.selected_round == 0
        else:
            assert doc.state == CandidateState.SHORTLISTED.value
    relaxed = [store.get(c) for c in picked if store.get(c).state == "relaxed"]
    assert relaxed, "CHGNet relaxes simple B2 cells"
    for doc in relaxed:
        assert doc.dft_engine == "surrogate"
        assert np.isfinite(doc.dft["formation_energy_per_atom"])
        assert (
            database["dft_tasks"].find_one({"task_id": doc.dft_task_id})["candidate_id"] == doc.candidate_id
        )
    # NiAl B2 is strongly bound in CHGNet as in DFT: a hit in [-1.5, -0.05] eV/atom.
    assert record.metrics["hits"] >= 1
    assert record.metrics["relaxed"] == len(relaxed)
    # No DFT results before this round's acquisition: the ensemble's std was used as is.
    assert record.steps["acquire"].outputs["sigma_scale"] == {
        "formation_energy_per_atom": {"scale": None, "n": 0}
    }
    # The next round would rescale it from these results, once there are enough of them.
    assert sigma_calibration(campaign.context(1))[PROP] == {"scale": None, "n": len(relaxed)}
    campaign.config = campaign.config.model_copy(
        update={"acquisition": campaign.config.acquisition.model_copy(update={"calibrate_min": 1})}
    )
    pairs = [(d.predicted[PROP].mean, d.predicted[PROP].std, d.dft[PROP]) for d in relaxed]
    expected, _ = fit_sigma_scale(pairs, min_count=1)
    assert sigma_calibration(campaign.context(1))[PROP] == {
        "scale": pytest.approx(expected),
        "n": len(relaxed),
    }

    hooks = {h["name"]: h for h in record.steps["retrain"].outputs["hooks"]}
    assert hooks["cgcnn_finetune"]["status"] == "done", hooks["cgcnn_finetune"]["error"]
    version = hooks["cgcnn_finetune"]["new_models"]["cgcnn"]
    assert version == f"{name}-cgcnn-r0"
    assert record.metrics["mae_before"] is not None and record.metrics["mae_after"] is not None
    # The fine-tune also learns from the decoded structures it screened (initial -> relaxed value).
    finetune_metrics = hooks["cgcnn_finetune"]["metrics"]
    screened = finetune_metrics["mae_screened_before"]["formation_energy_per_atom"]
    assert (
        screened is not None
        and finetune_metrics["mae_screened_after"]["formation_energy_per_atom"] is not None
    )
    assert CampaignStore(database).get(name).model_versions["cgcnn"] == version
    registered = database["models"].find_one({"version": version})
    assert registered is not None and not registered["default"]
    conditioning = hooks["conditioning_update"]
    assert conditioning["status"] == "done"
    assert conditioning["metrics"]["added"] == len(relaxed)
    assert database["training_structures"].count_documents({"dataset": f"campaign:{name}"}) == len(relaxed)
    assert record.finished_at is not None
    report = record.steps["report"].outputs
    assert report["cumulative_hits"] == record.metrics["hits"]
    assert any(f.endswith("report.md") for f in report["files"])

    # The fine-tuned version scored on the decoded structures of the candidates it was trained on.
    accuracy = campaign_accuracy(database, name, model=version, plot=str(tmp_path / "parity.png"))
    assert accuracy["plot"] == str(tmp_path / "parity.png") and (tmp_path / "parity.png").stat().st_size > 0
    row = accuracy["properties"][PROP]
    tuned, _ = load_model(resolve_checkpoint(version, "cgcnn", database))
    mean, _ = predict_structures(tuned, [Structure.from_dict(d.structure) for d in relaxed])
    k = tuned.properties.index(PROP)
    assert accuracy["n_candidates"] == row["n"] == len(relaxed)
    assert row["mae"] == pytest.approx(
        np.mean([abs(m - d.dft[PROP]) for m, d in zip(mean[:, k], relaxed, strict=True)])
    )
    assert row["mae_screening"] == pytest.approx(
        np.mean([abs(d.predicted[PROP].mean - d.dft[PROP]) for d in relaxed])
    )
    assert accuracy["hits"] == record.metrics["hits"]
    with pytest.raises(UserError, match="from-round"):
        campaign_accuracy(database, name, from_round=1)
    from crystaloop.generative.models.shipped import CHECKPOINT_DIR, shipped_models

    unet = CHECKPOINT_DIR / next(e for e in shipped_models() if e["kind"] == "unet")["file"]
    with pytest.raises(UserError, match="not a CGCNN checkpoint"):
        campaign_accuracy(database, name, model=str(unet))


def test_a_skipped_retrain_leaves_its_results_to_the_next_one(
    settings, prior_subset, loop_config, make_shortlist, shortlist_items
):
    """With ``retrain.every: 2`` round 0 is not trained on alone; round 1 trains on both rounds."""
    from pymatgen.core import Lattice

    from crystaloop.db.training import campaign_dataset

    database = prior_subset
    name = "every-two"
    nga = Structure(Lattice.cubic(2.85), ["Ni", "Ga"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    make_shortlist(database, name, items=shortlist_items)
    make_shortlist(database, name, round=1, items=[(nga, -0.4, 0.05)])
    config = loop_config(name, max_rounds=2, retrain={"every": 2, "epochs": 1, "replay": 8})
    assert Campaign(parse_campaign_config(config), database=database).run().status == "finished"
    store = CampaignStore(database)
    assert "skipped" in store.round(name, 0).steps["retrain"].outputs
    hooks = {h["name"]: h for h in store.round(name, 1).steps["retrain"].outputs["hooks"]}
    relaxed = database["candidates"].count_documents({"campaign": name, "state": "relaxed"})
    by_round = {
        r: database["candidates"].count_documents({"campaign": name, "state": "relaxed", "selected_round": r})
        for r in (0, 1)
    }
    assert by_round[0] > 0 and by_round[1] > 0
    assert hooks["cgcnn_finetune"]["metrics"]["n_new_dft"] == relaxed
    assert hooks["conditioning_update"]["metrics"]["added"] == relaxed
    assert database["training_structures"].count_documents({"dataset": campaign_dataset(name)}) == relaxed


def test_filter_killed_inside_its_insert_resumes_with_the_stored_candidates(
    settings, prior_subset, loop_config, make_shortlist, shortlist_items
):
    """Candidates stored but not their summaries or counter: the rerun repairs them, generates nothing."""
    from crystaloop.db.documents import StepRecord
    from crystaloop.db.summaries import COUNTER_COLLECTION, SUMMARY_COLLECTION

    database = prior_subset
    name = "killed-insert"
    ids = make_shortlist(database, name, items=shortlist_items[:3])
    database[SUMMARY_COLLECTION].delete_many({"campaign": name})
    database[COUNTER_COLLECTION].delete_many({"campaign": name})
    store = CampaignStore(database)
    store.start_round(name, 0)
    store.record_step(name, 0, StepRecord(name="generate", status="done"))
    store.record_step(name, 0, StepRecord(name="filter"))  # the attempt that was killed
    config = loop_config(name, retrain={"cgcnn": False, "generator_conditioning": False})
    assert Campaign(parse_campaign_config(config), database=database).run().status == "finished"
    record = store.round(name, 0)
    assert record.steps["filter"].outputs["resumed"] is True
    assert record.steps["filter"].outputs["n_shortlisted"] == 3
    assert set(record.steps["acquire"].outputs["candidate_ids"]) <= set(ids)
    assert record.steps["acquire"].outputs["selected"] == 2


def test_candidates_of_another_generation_do_not_stand_for_the_rounds_own(
    settings, prior_subset, loop_config, make_shortlist, shortlist_items, monkeypatch
):
    """`crystaloop generate` stored round-0 candidates first: the campaign still generates its own."""
    from crystaloop.loop import generation

    database = prior_subset
    name = "pregenerated"
    ids = make_shortlist(database, name, items=shortlist_items[:2])
    database["candidates"].update_many({"campaign": name}, {"$set": {"provenance.generation_id": "preview"}})
    calls = []

    def generated(config, **kwargs):
        calls.append(kwargs["round"])
        raise RuntimeError("stop after the call")  # the call is what this test is about

    monkeypatch.setattr(generation, "decode_batch", generated)
    config = loop_config(name, retrain={"cgcnn": False, "generator_conditioning": False})
    with pytest.raises(RuntimeError, match="stop after the call"):
        Campaign(parse_campaign_config(config), database=database).run()
    assert calls == [0] and len(ids) == 2


def test_dft_cache_answers_an_equivalent_structure(
    settings, prior_subset, loop_config, make_shortlist, shortlist_items
):
    """A second campaign asking for a relaxed crystal (rotated, translated) gets the cached result."""
    database = prior_subset
    make_shortlist(database, "cache-a", items=[shortlist_items[0]])
    Campaign(
        parse_campaign_config(
            loop_config("cache-a", retrain={"cgcnn": False, "generator_conditioning": False})
        ),
        database=database,
    ).run()
    moved = shortlist_items[0][0].copy()
    moved.translate_sites(range(len(moved)), [0.13, 0.2, 0.05])
    make_shortlist(database, "cache-b", items=[(moved, -0.6, 0.05)])
    Campaign(
        parse_campaign_config(
            loop_config("cache-b", retrain={"cgcnn": False, "generator_conditioning": False})
        ),
        database=database,
    ).run()
    first = CandidateStore(database).query(campaign="cache-a")[0][1]
    second = CandidateStore(database).query(campaign="cache-b")[0][1]
    record = CampaignStore(database).round("cache-b", 0)
    assert record.metrics["cache_hits"] == 1
    assert second.state == "relaxed" and second.dft_job["from_cache"] is True
    assert second.dft == first.dft
    assert database["dft_tasks"].count_documents({"candidate_id": second.candidate_id}) == 0


def test_live_lease_blocks_and_stale_lease_is_taken_over(
    settings, database, loop_config, make_shortlist, shortlist_items
):
    store = CampaignStore(database)
    config = parse_campaign_config(loop_config("leased"))
    store.ensure("leased", config.model_dump(mode="json"))
    assert store.acquire_lease("leased", owner="other-host:1") is not None
    with pytest.raises(UserError, match="other-host:1"):
        Campaign(config, database=database).run()
    stale = Lease(owner="other-host:1", token="t", expires_at=utcnow() - timedelta(seconds=5))
    database["campaigns"].update_one({"name": "leased"}, {"$set": {"lease": stale.model_dump()}})
    mine = store.acquire_lease("leased", owner="me:2")
    assert mine is not None
    assert store.get("leased").lease.owner == "me:2"
    assert not store.renew_lease("leased", "t")


def test_stop_request_ends_after_the_current_step_and_run_resumes(
    settings, prior_subset, loop_config, make_shortlist, shortlist_items
):
    database = prior_subset
    name = "stoppable"
    make_shortlist(database, name, items=shortlist_items[:2])
    config = parse_campaign_config(
        loop_config(name, retrain={"cgcnn": False, "generator_conditioning": False})
    )
    store = CampaignStore(database)

    def log(line: str) -> None:
        if line.endswith(": acquire"):
            store.request_stop(name)

    stopped = Campaign(config, database=database, log=log).run()
    assert stopped.status == "stopped"
    assert "round 0 step submit" in stopped.reason
    steps = store.round(name, 0).steps
    assert steps["acquire"].status == "done" and "submit" not in steps
    resumed = Campaign(config, database=database).run()
    assert resumed.status == "finished"
    assert all(s.status == "done" for s in store.round(name, 0).steps.values())
    assert store.get(name).lease is None


KILL_POINTS = ["acquire:mid", "submit:end", "harvest:start", "retrain:start", "report:end"]


@pytest.mark.parametrize(
    "kill_at",
    [
        "submit:mid",
        "harvest:mid",
        "retrain:end",
        KILL_POINTS[np.random.default_rng(20261127).integers(len(KILL_POINTS))],
    ],
)
def test_sigkill_and_resume(
    settings, prior_subset, tmp_path, kill_at, loop_config, make_shortlist, shortlist_items
):
    """SIGKILL `campaign run` inside a step; the rerun submits nothing twice and harvests every job."""
    import os
    import subprocess
    import sys

    import yaml

    database = prior_subset
    name = f"kill-{kill_at.replace(':', '-')}"
    ids = make_shortlist(database, name, items=shortlist_items[:3])
    path = tmp_path / "campaign.yaml"
    path.write_text(
        yaml.safe_dump(loop_config(name, retrain={"epochs": 1, "replay": 8, "generator_conditioning": False}))
    )
    from pathlib import Path

    command = [str(Path(sys.executable).parent / "crystaloop"), "campaign", "run", str(path)]
    killed = subprocess.run(
        command,
        env={**os.environ, "CRYSTALOOP_KILL_AT": kill_at},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    store = CampaignStore(database)
    step = kill_at.split(":")[0]
    assert store.round(name, 0).steps[step].status == "running"
    from crystaloop.cli.campaign import campaign_summary

    assert campaign_summary(database, name)["lease_stale"] is True  # status says the holder has stopped

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert all(s.status == "done" for s in store.round(name, 0).steps.values())
    candidates = CandidateStore(database)
    submitted = [c for c in (candidates.get(i) for i in ids) if c.selected_round is not None]
    assert len(submitted) == 2
    for doc in submitted:
        states = [h["state"] for h in doc.state_history]
        assert states.count("submitted") == 1, states
        assert states.count("selected") == 1, states
        assert doc.state in ("relaxed", "failed")
        relaxations = database["dft_tasks"].count_documents(
            {"candidate_id": doc.candidate_id, "output.metadata.role": {"$ne": "element_reference"}}
        )
        # A flow runs again only when the kill interrupted it (harvest:mid kills after a finished one).
        assert relaxations == 1
    assert store.get(name).lease is None
    # Killed after the fine-tune but before its step was recorded done, the rerun fine-tunes again
    # from the model the round started with, not from its own output.
    version = f"{name}-cgcnn-r0"
    finetuned = database["models"].find_one({"kind": "cgcnn-ensemble", "version": version})
    assert finetuned is not None and version not in finetuned["config"]["finetuned_from"]
    assert store.get(name).model_versions["cgcnn"] == version


def test_campaign_rides_out_a_killed_embedded_server(
    tmp_path, monkeypatch, loop_config, make_shortlist, shortlist_items
):
    """SIGKILL the campaign's own embedded server mid-round: it restarts it and carries on."""
    import os
    import signal

    from crystaloop.db import get_database
    from crystaloop.db.connection import _client
    from crystaloop.db.server import EmbeddedServer
    from crystaloop.settings import get_settings

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    monkeypatch.delenv("CRYSTALOOP_MONGODB_URI", raising=False)
    monkeypatch.setenv("CRYSTALOOP_DATA_DIR", str(data_dir))
    monkeypatch.setenv("CRYSTALOOP_DATABASE", "outage")
    get_settings.cache_clear()
    _client.cache_clear()
    server = EmbeddedServer(data_dir)
    try:
        database = get_database()
        name = "outage"
        make_shortlist(database, name, items=shortlist_items[:2])
        config = parse_campaign_config(
            loop_config(
                name,
                retrain={"cgcnn": False, "generator_conditioning": False},
                execution={"poll_interval_s": 0.2, "db_retry_s": 60},
            )
        )
        killed = []

        def log(line: str) -> None:
            if line.endswith(": submit") and not killed:
                killed.append(server.read_record().pid)
                os.kill(killed[0], signal.SIGKILL)

        lines: list[str] = []
        result = Campaign(config, database=database, log=lambda line: (lines.append(line), log(line))).run()
        assert killed, "the server was killed"
        assert any("database unreachable" in line for line in lines)
        assert result.status == "finished"
        assert server.read_record().pid != killed[0]
        fresh = get_database()
        record = CampaignStore(fresh).round(name, 0)
        assert all(s.status == "done" for s in record.steps.values()), (
            lines,
            {k: v.status for k, v in record.steps.items()},
        )
        states = [d["state"] for d in fresh["candidates"].find({"campaign": name, "selected_round": 0})]
        assert len(states) == 2 and set(states) <= {"relaxed", "failed"}
    finally:
        server.stop()
        _client.cache_clear()
        get_settings.cache_clear()


def test_a_failing_step_is_recorded_and_rerun(
    settings, prior_subset, loop_config, make_shortlist, shortlist_items, monkeypatch
):
    """A step that raises leaves a `failed` record and a `failed` campaign; the next run redoes it."""
    database = prior_subset
    name = "failing"
    make_shortlist(database, name, items=shortlist_items[:2])
    config = parse_campaign_config(
        loop_config(name, retrain={"cgcnn": False, "generator_conditioning": False})
    )

    from crystaloop.loop import campaign as campaign_module

    def acquire(ctx):
        raise RuntimeError("acquisition exploded")

    broken_round = tuple(acquire if step.__name__ == "acquire" else step for step in campaign_module.ROUND)
    with monkeypatch.context() as patch:
        patch.setattr(campaign_module, "ROUND", broken_round)
        with pytest.raises(RuntimeError, match="exploded"):
            Campaign(config, database=database).run()
    store = CampaignStore(database)
    step = store.round(name, 0).steps["acquire"]
    assert step.status == "failed" and "acquisition exploded" in step.error
    doc = store.get(name)
    assert doc.status == "failed" and "round 0 acquire" in doc.status_reason
    assert doc.lease is None
    assert Campaign(config, database=database).run().status == "finished"
    assert store.round(name, 0).steps["acquire"].status == "done"


def test_evaluate_candidates_of_an_unknown_campaign_exits_2(settings):
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).parent / "crystaloop"
    result = subprocess.run([str(exe), "evaluate", "candidates", "nosuch"], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert "nosuch" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
