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
