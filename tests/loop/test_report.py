"""Campaign reports from the database alone."""

from __future__ import annotations

import warnings

from crystaloop.db.campaigns import CampaignStore
from crystaloop.loop.config import parse_campaign_config
from crystaloop.loop.report import write_report


def test_a_round_without_dft_results_reports_cleanly(database, loop_config, tmp_path):
    config = parse_campaign_config(loop_config("empty"), source="empty")
    store = CampaignStore(database)
    store.ensure("empty", config.model_dump(mode="json"))
    store.start_round("empty", 0)
    store.finish_round("empty", 0, {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an empty plot used to warn about a legend with no artists
        paths = write_report(database, "empty", tmp_path)
    names = {p.name for p in paths}
    assert {"report.md", "hit_rate.png", "parity.png", "target_histogram.png", "cascade.png"} <= names
    assert all(p.stat().st_size > 0 for p in paths)
    assert "| 0 |" in (tmp_path / "report.md").read_text()


def test_the_report_says_where_the_time_went_and_why_a_round_found_nothing(database, loop_config, tmp_path):
    from datetime import timedelta

    from crystaloop.db.documents import StepRecord, utcnow

    config = parse_campaign_config(loop_config("timed"), source="timed")
    store = CampaignStore(database)
    store.ensure("timed", config.model_dump(mode="json"))
    store.start_round("timed", 0)
    start = utcnow()
    stages = [
        {"stage": "decoded", "n_in": 150, "n_out": 150, "seconds": 0.1},
        {"stage": "novel", "n_in": 27, "n_out": 0, "seconds": 1.0},
        {"stage": "window", "n_in": 0, "n_out": 0, "seconds": 0.0},
    ]
    reasons = {"novel": {"already known": 27}}
    generate = StepRecord(
        name="generate",
        status="done",
        outputs={"stages": stages, "rejected_reasons": reasons},
        started_at=start,
        finished_at=start + timedelta(seconds=12.5),
        wall_s=12.5,
    )
    # an older record without wall_s: the time comes from its start and end
    harvest = StepRecord(
        name="harvest", status="done", started_at=start, finished_at=start + timedelta(seconds=30)
    )
    store.record_step("timed", 0, generate)
    store.record_step("timed", 0, harvest)
    database["dft_tasks"].insert_one(
        {
            "task_id": "t1",
            "campaign": "timed",
            "round": 0,
            "candidate_id": "c1",
            "reduced_formula": "NaCl",
            "state": "successful",
            "output": {"wall_time_s": 41.0},
        }
    )
    store.finish_round("timed", 0, {})
    write_report(database, "timed", tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "| 0 | 12.5 | - | - | - | 30.0 | - | - | 42.5 |" in text  # generate, filter, ..., harvest
    assert "| 0 | c1 | NaCl | successful | 41.0 |" in text
    assert "1 DFT runs, 41 s of engine time in all." in text
    assert (
        "round 0: nothing shortlisted: the novel stage took 27 and kept none; "
        "most frequent rejection: 'already known' (27)" in text
    )
