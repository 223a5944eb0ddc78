"""The round's steps one at a time, on the real embedded DB with real models (surrogate engine)."""

from __future__ import annotations

import time
from pathlib import Path

from crystaloop.db.campaigns import CampaignStore
from crystaloop.db.documents import CandidateState
from crystaloop.db.store import CandidateStore
from crystaloop.loop import steps
from crystaloop.loop.campaign import Campaign
from crystaloop.loop.config import parse_campaign_config
from crystaloop.loop.generation import DecodedBatch, generate_candidates


def test_the_round_is_declared_in_order():
    assert steps.STEP_NAMES == ("generate", "filter", "acquire", "submit", "harvest", "retrain", "report")
    assert all(step.__doc__ for step in steps.ROUND)


def test_generate_saves_a_batch_that_filter_stores_as_the_one_call_would(settings, prior_subset, loop_config):
    """generate then filter give the cascade counts of one ``generate_candidates`` call with the same seed."""
    database = prior_subset
    config = parse_campaign_config(loop_config("split"))
    ctx = Campaign(config, database=database).context(0)
    seed = config.seed * 1000
    dry = generate_candidates(config, database=database, n=16, round=0, seed=seed, dry_run=True)

    generated = steps.generate(ctx)
    path = Path(generated.outputs["batch"])
    assert generated.metrics == {"generated": 16} and path.is_file()
    batch = DecodedBatch.load(path)
    assert batch.seed == seed and generated.outputs["n_decoded"] == sum(
        c.structure is not None for c in batch.candidates
    )

    filtered = steps.filter(ctx)
    counts = [(s["stage"], s["n_in"], s["n_out"]) for s in filtered.outputs["stages"]]
    assert counts == [(s.stage, s.n_in, s.n_out) for s in dry.stages]
    stored = CandidateStore(database).count_generated("split", 0, "split-r0")
    assert stored == filtered.outputs["n_shortlisted"] == filtered.metrics["shortlisted"] == dry.n_shortlisted
    assert not path.exists()  # the survivors are stored; the batch is no longer needed
    if stored:
        assert steps.generate(ctx).outputs["resumed"] and steps.filter(ctx).outputs["resumed"]


def test_filter_decodes_again_when_the_saved_batch_is_gone(settings, prior_subset, loop_config):
    database = prior_subset
    config = parse_campaign_config(
        loop_config("lost-batch", budget={"candidates_per_round": 8, "dft_per_round": 1})
    )
    ctx = Campaign(config, database=database).context(0)
    lines: list[str] = []
    ctx.log = lines.append
    first = steps.generate(ctx)
    Path(first.outputs["batch"]).unlink()
    filtered = steps.filter(ctx)
    assert filtered.outputs["stages"][0]["n_in"] == 8
    assert any("is missing; decoding it again" in line for line in lines)


def test_harvest_collects_jobs_an_earlier_round_left_running(
    settings, prior_subset, loop_config, make_shortlist, shortlist_items
):
    """A job still running when its round's harvest timed out is collected by the next harvest."""
    database = prior_subset
    name = "straggler"
    config = parse_campaign_config(
        loop_config(name, retrain={"cgcnn": False, "generator_conditioning": False})
    )
    make_shortlist(database, name, items=shortlist_items[:2])
    campaign = Campaign(config, database=database)
    assert campaign.run().status == "finished"
    (cid,) = make_shortlist(database, name, items=[shortlist_items[3]])
    store = CandidateStore(database)
    doc = store.transition(cid, CandidateState.SELECTED, update={"selected_round": 0})
    jobs = campaign.jobs()
    ids = jobs.submit(doc, 0)
    backend = jobs.backend()
    store.transition(
        cid, CandidateState.SUBMITTED, update={"dft_job": {"backend": "local", "attempts": 1, **ids}}
    )
    deadline = time.monotonic() + 300
    while backend.state(cid).state in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(0.2)
    result = steps.harvest(campaign.context(1))
    assert result.outputs["harvested_now"] == 1 and result.metrics["relaxed"] == 0  # counted in its own round
    assert store.get(cid).state in (CandidateState.RELAXED.value, CandidateState.FAILED.value)
    assert CampaignStore(database).round(name, 0).metrics["relaxed"] >= 1
