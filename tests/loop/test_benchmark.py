"""The efficiency benchmark's arms and summary (the full run is `crystaloop bench campaign`)."""

from __future__ import annotations

import json
import math

import pytest

from crystaloop.loop.benchmark import ANCHORS, arm_configs, pool_seeds, summarise, to_json
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
                "hits": hits,
                "relaxed": relaxed,
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


def test_summary_leaves_a_target_against_an_arm_not_run_unmeasured():
    loop, no_model = _rows([(1, 8), (2, 8), (3, 8)]), _rows([(0, 30), (1, 30), (0, 30)])
    result = {"arms": {"loop": loop, "no_model": no_model}}
    s = summarise(result)
    assert s["cumulative_ratio_vs_random"] is None and s["cumulative_target_vs_random_met"] is None
    assert s["cumulative_ratio_vs_no_model"] == pytest.approx((6 / 24) / (1 / 90))
    assert s["cumulative_target_vs_no_model_met"] is True


def test_seeds_pool_by_relaxation_through_round_three():
    def result(loop, rand, none):
        return {"arms": {"loop": _rows(loop), "random": _rows(rand), "no_model": _rows(none)}}

    results = {
        0: result(
            [(2, 8), (3, 8), (4, 8), (8, 8)],
            [(1, 8), (0, 8), (0, 8), (8, 8)],
            [(1, 32), (2, 32), (1, 31), (9, 9)],
        ),
        1: result([(1, 8), (1, 8), (1, 6)], [(0, 8), (0, 8), (0, 8)], [(0, 30), (0, 32), (0, 32)]),
    }
    pooled = pool_seeds(results)
    assert pooled["seeds"] == [0, 1] and pooled["round"] == 3  # round 4 is left out
    assert pooled["hits"] == {"loop": 12, "random": 1, "no_model": 4}
    assert pooled["relaxed"] == {"loop": 46, "random": 48, "no_model": 189}
    assert pooled["ratio_vs_random"] == pytest.approx((12 / 46) / (1 / 48)) and pooled["target_vs_random_met"]
    assert pooled["ratio_vs_no_model"] == pytest.approx((12 / 46) / (4 / 189))
    assert pooled["target_vs_no_model_met"]
    assert pooled["per_seed_hit_rates"]["1"] == {
        "loop": pytest.approx(3 / 22),
        "random": 0.0,
        "no_model": 0.0,
    }


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--arms", "loop,bogus"], "--arms"),
        (["--seeds", "0,x"], "--seeds"),
        (["--seeds", "1,1"], "distinct"),
        (["--seeds=-1,2"], ">= 0"),
    ],
)
def test_bench_campaign_rejects_bad_arms_and_seeds(settings, args, needle):
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).parent / "crystaloop"
    result = subprocess.run([str(exe), "bench", "campaign", *args], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr and "Traceback" not in result.stderr


def test_the_no_model_arm_needs_a_palette(settings, repo_root):
    from crystaloop.db import get_database
    from crystaloop.errors import UserError
    from crystaloop.loop.benchmark import run_benchmark
    from crystaloop.loop.config import load_campaign_config

    base = load_campaign_config(repo_root / "configs" / "bench-campaign.yaml")
    open_palette = base.model_copy(update={"elements": base.elements.model_copy(update={"allow": None})})
    with pytest.raises(UserError, match="no-model arm draws from elements.allow"):
        run_benchmark(open_palette, database=get_database(), rounds=1, arms=("no_model",))


def test_no_model_arm_alone_over_two_seeds(settings, repo_root, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    raw = yaml.safe_load((repo_root / "configs" / "bench-campaign.yaml").read_text())
    raw["budget"]["dft_per_round"] = 2
    config = tmp_path / "bench.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "bench.json"
    exe = Path(sys.executable).parent / "crystaloop"
    args = ["bench", "campaign", "--config", str(config), "--arms", "no_model", "--rounds", "1"]
    args += ["--no-model-per-round", "2", "--seeds", "0,1", "--output", str(out)]
    result = subprocess.run([str(exe), *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    written = json.loads(out.read_text())
    assert sorted(written["seeds"]) == ["0", "1"]
    for seed in ("0", "1"):
        arms = written["seeds"][seed]["arms"]
        assert list(arms) == ["no_model"]  # no campaign arm ran
        (row,) = arms["no_model"]["rows"]
        assert len(row["structures"]) == 2
    draws = [
        [s["formula"] for s in written["seeds"][k]["arms"]["no_model"]["rows"][0]["structures"]] for k in "01"
    ]
    assert draws[0] != draws[1]  # each seed draws its own prototypes
    pooled = written["pooled"]
    assert pooled["relaxed"]["no_model"] == sum(
        written["seeds"][k]["arms"]["no_model"]["rows"][0]["relaxed"] for k in "01"
    )
    assert "ratio_vs_no_model" not in pooled  # no loop arm to compare
    assert "pooled over seeds 0, 1, through round 1: no_model" in result.stdout
