"""The efficiency benchmark's arms and summary (the full run is `crystaloop bench campaign`)."""

from __future__ import annotations

import json
import math

import pytest

from crystaloop.loop.benchmark import ANCHORS, arm_configs, summarise, to_json
from crystaloop.loop.config import load_campaign_config


def test_arms_share_the_oracle_and_differ_in_acquisition_and_retraining(repo_root):
    base = load_campaign_config(repo_root / "configs" / "bench-campaign.yaml")
    arms = arm_configs(base, rounds=5)
    loop, rand = arms["loop"], arms["random"]
    assert loop.dft.engine == rand.dft.engine == "surrogate"
    assert not loop.filters.uip_screen and not rand.filters.uip_screen  # CHGNet is the oracle
    assert loop.filters.novelty_scope == rand.filters.novelty_scope == "own"  # independent arms
    assert (loop.acquisition.strategy, rand.acquisition.strategy) == ("uncertainty", "random")
    assert loop.retrain.cgcnn and not rand.retrain.cgcnn and not rand.retrain.generator_conditioning
    assert loop.max_rounds == rand.max_rounds == 5
    around = arm_configs(
        base.model_copy(update={"sampling": base.sampling.model_copy(update={"around_hits": 0.5})}), 5
    )
    assert around["loop"].sampling.around_hits == 0.5  # the loop may sample around its hits
    assert around["random"].sampling.around_hits == 0  # nothing the oracle says feeds the random arm
    assert loop.budget == rand.budget and loop.seed == rand.seed and loop.name != rand.name


def _rows(rates, maes=None):
    rows, hits_total, relaxed_total = [], 0, 0
    for i, (hits, relaxed) in enumerate(rates):
        hits_total += hits
        relaxed_total += relaxed
        rows.append(
            {
                "round": i + 1,
                "hit_rate": hits / relaxed if relaxed else None,
                "cumulative_hit_rate": hits_total / relaxed_total if relaxed_total else None,
                "mae_screening": maes[i] if maes else None,
            }
        )
    return {"rows": rows}


def test_summary_ratios_at_round_three_and_mae_trend():
    result = {
        "arms": {
            "loop": _rows([(2, 8), (4, 8), (6, 8), (6, 8), (7, 8)], [0.30, 0.25, 0.2, 0.18, 0.12]),
            "random": _rows([(1, 8), (1, 8), (2, 8), (1, 8), (1, 8)]),
            "no_model": _rows([(0, 8), (1, 8), (0, 8), (0, 8), (0, 8)]),
        }
    }
    s = summarise(result)
    assert s["round_ratio_vs_random"] == pytest.approx(3.0) and s["round_target_vs_random_met"]
    assert math.isinf(s["round_ratio_vs_no_model"]) and s["round_target_vs_no_model_met"]
    assert s["cumulative_ratio_vs_random"] == pytest.approx(12 / 4)
    assert s["cumulative_ratio_vs_no_model"] == pytest.approx(12.0) and s["cumulative_target_vs_no_model_met"]
    assert s["mae_first_round"] == 0.30 and s["mae_last_round"] == 0.12 and s["mae_falls"]
    assert s["anchors"] == ANCHORS and "37.5 %" in ANCHORS["ftcp"]
    # Written out, the unbounded ratio stays readable by strict JSON parsers.
    written = json.loads(to_json({**result, "summary": s}), parse_constant=_reject)
    assert written["summary"]["round_ratio_vs_no_model"] == "inf"
    assert written["summary"]["cumulative_ratio_vs_no_model"] == pytest.approx(12.0)


def _reject(token: str):
    raise AssertionError(f"non-standard JSON constant {token}")


def test_summary_reports_a_missed_target_and_no_ratio_without_hits():
    result = {
        "arms": {
            "loop": _rows([(1, 8), (1, 8), (0, 8)], [0.1, 0.2, 0.3]),
            "random": _rows([(1, 8), (1, 8), (0, 8)]),
            "no_model": _rows([(0, 8), (0, 8), (0, 8)]),
        }
    }
    s = summarise(result)
    assert s["round_ratio_vs_random"] is None and not s["round_target_vs_random_met"]
    assert s["round_ratio_vs_no_model"] is None and not s["round_target_vs_no_model_met"]
    assert s["cumulative_ratio_vs_random"] == pytest.approx(1.0) and not s["cumulative_target_vs_random_met"]
    assert not s["mae_falls"]
