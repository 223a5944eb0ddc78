"""The efficiency benchmark's arms and summary (the full run is `crystaloop bench campaign`)."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime

import pytest
from pymatgen.core import Lattice, Structure

from crystaloop.loop.bench.baselines import (
    CLASS_COUNTS,
    VOLUME_FACTOR,
    draw_rss,
    draw_substitution,
    substitution_pool,
)
from crystaloop.loop.bench.campaign import (
    ANCHORS,
    ARMS,
    CIRCULARITY,
    DEFAULT_ARMS,
    SUN_STEER_MAX,
    arm_configs,
    bootstrap_ratio,
    campaign_rows,
    draw_no_model,
    merge_runs,
    no_model_pool,
    no_model_round,
    no_model_rows,
    pool_seeds,
    prior_lookup,
    rediscovered,
    std_terciles,
    summarise,
    sun_classify,
    sun_rows,
    to_json,
    wilson_interval,
    with_rates,
)
from crystaloop.loop.bench.targets import SUN_CAMPAIGN
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
    rows = [
        {"round": i + 1, "hits": hits, "relaxed": relaxed, "mae_screening": maes[i] if maes else None}
        for i, (hits, relaxed) in enumerate(rates)
    ]
    return {"rows": with_rates(rows)}


def test_with_rates_adds_round_and_cumulative_rates():
    rows = with_rates(
        [
            {"hits": 2, "relaxed": 8, "new_hits": 1},
            {"hits": 0, "relaxed": 0, "new_hits": 0},  # every relaxation of the round failed
            {"hits": 3, "relaxed": 6},  # no rediscovery check: every hit is new
        ]
    )
    assert [r["hit_rate"] for r in rows] == [0.25, None, 0.5]
    assert [r["cumulative_hits"] for r in rows] == [2, 2, 5]
    assert [r["cumulative_new_hits"] for r in rows] == [1, 1, 4]
    assert [r["cumulative_relaxed"] for r in rows] == [8, 8, 14]
    assert [r["cumulative_hit_rate"] for r in rows] == [0.25, 0.25, pytest.approx(5 / 14)]
    assert [r["cumulative_new_hit_rate"] for r in rows] == [0.125, 0.125, pytest.approx(4 / 14)]
    assert with_rates([{"hits": 0, "relaxed": 0}])[0]["cumulative_hit_rate"] is None


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
    assert s["cumulative_hit_rate_intervals"]["loop"] == wilson_interval(12, 24)
    # 1 of 24: p = 0.0417, Wilson centre 0.1049 and half-width 0.0975 at z = 1.96.
    assert s["cumulative_hit_rate_intervals"]["no_model"] == (
        pytest.approx(0.0074, abs=1e-4),
        pytest.approx(0.2024, abs=1e-4),
    )
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
    results[0]["code_version"] = {"git_commit": "abc", "git_dirty": False, "package_version": "0.1"}
    results[0]["arms"]["no_model"]["rows"][0].update(failed=3, unphysical=2)
    results[1]["arms"]["loop"]["rows"][1].update(new_hits=0, rediscovered=1)
    pooled = pool_seeds(results)
    assert pooled["seeds"] == [0, 1] and pooled["round"] == 3  # round 4 is left out
    assert pooled["code_versions"] == {"0": results[0]["code_version"], "1": None}
    assert pooled["failed"]["no_model"] == 3 and pooled["unphysical"] == {
        "loop": 0,
        "random": 0,
        "no_model": 2,
    }
    # Per DFT run started, the three failures join the no-model arm's denominator: 4 of 192.
    assert pooled["hit_rates_per_run"]["no_model"] == pytest.approx(4 / 192)
    assert pooled["per_run_ratio_vs_no_model"] == pytest.approx((12 / 46) / (4 / 192))
    assert pooled["rediscovered"]["loop"] == 1 and pooled["new_hits"]["loop"] == 11
    assert pooled["new_hit_rates"]["loop"] == pytest.approx(11 / 46)
    assert pooled["new_hit_ratio_vs_random"] == pytest.approx((11 / 46) / (1 / 48))
    assert "Wilson" in pooled["intervals"] and "bootstrap over seeds" in pooled["intervals"]
    lo, hi = pooled["hit_rate_intervals"]["loop"]
    assert lo < 12 / 46 < hi
    # Seed 0 alone: loop 9/24 against random 1/24 (9x); seed 1: 3/22 against 0/24 (unbounded).
    assert pooled["ratio_vs_random_interval"] == (pytest.approx(9.0), math.inf)
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
        (["--target", "hull"], "--target sun or --target window"),
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
    from crystaloop.loop.bench.campaign import run_benchmark
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
    args += ["--no-model-per-round", "2", "--seeds", "0,1", "--output", str(out), "--target", "window"]
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
    assert written["complete"] is True
    # Two structures drawn per seed, so four outcomes in all: relaxed or failed.
    assert pooled["relaxed"]["no_model"] + pooled["failed"]["no_model"] == 4
    assert "ratio_vs_no_model" not in pooled  # no loop arm to compare
    assert set(pooled["code_versions"]) == {"0", "1"}
    assert all(
        len(v["git_commit"] or "") == 40 or v["package_version"] for v in pooled["code_versions"].values()
    )
    assert written["seeds"]["0"]["oracle"]["circularity"] == CIRCULARITY
    assert written["seeds"]["0"]["oracle"]["prior_labeller"] == "chgnet-0.3.0"
    assert CIRCULARITY in " ".join(result.stdout.split())
    assert "pooled over seeds 0, 1, through round 1, hits: no_model" in result.stdout

    # Run again with one more seed and the same --output: seeds 0 and 1 are not run again.
    args[args.index("0,1")] = "0,1,2"
    again = subprocess.run([str(exe), *args], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    flat = " ".join(again.stdout.split())
    assert "seed 0: finished in an earlier run" in flat and "seed 1: finished in an earlier run" in flat
    assert "seed 2: finished" not in flat
    resumed = json.loads(out.read_text())
    assert sorted(resumed["seeds"]) == ["0", "1", "2"] and resumed["complete"] is True
    for seed in ("0", "1"):
        assert resumed["seeds"][seed] == written["seeds"][seed]
    assert resumed["pooled"]["relaxed"]["no_model"] + resumed["pooled"]["failed"]["no_model"] == 6


def test_finished_seeds_are_those_of_the_same_question(repo_root):
    """Only a stored seed with the same target, rounds, arms, window, palette and budgets counts."""
    from crystaloop.loop.bench.campaign import finished_seeds

    base = load_campaign_config(repo_root / "configs" / "bench-campaign.yaml")
    question = {"rounds": 3, "no_model_per_round": None, "arms": ("no_model",), "target": "window"}
    result = {
        "seed": 4, "target": "window", "rounds": 3, "window": {"formation_energy_per_atom": [-1.6, -1.1]},
        "palette": base.elements.allow, "material_classes": list(base.material_classes),
        "dft_per_round": base.budget.dft_per_round, "candidates_per_round": base.budget.candidates_per_round,
        "no_model_per_round": base.budget.dft_per_round, "arms": {"no_model": {}},
    }  # fmt: skip
    assert [t.min for t in base.targets] == [-1.6] and [t.max for t in base.targets] == [-1.1]
    assert set(finished_seeds({"seeds": {"4": result}}, base, **question)) == {4}
    assert set(finished_seeds(result, base, **question)) == {4}  # a one-seed document is the result
    assert finished_seeds({"seeds": {"4": result}}, base, **{**question, "rounds": 5}) == {}
    assert finished_seeds({"seeds": {"4": result}}, base, **{**question, "arms": ("loop", "no_model")}) == {}
    assert finished_seeds({"seeds": {"4": {**result, "target": "sun"}}}, base, **question) == {}
    assert finished_seeds({"seeds": {"4": {**result, "palette": ["Na", "Cl"]}}}, base, **question) == {}
    older = {k: v for k, v in result.items() if k != "target"}  # files written before --target: window
    assert set(finished_seeds({"seeds": {"4": older}}, base, **question)) == {4}


def test_wilson_intervals_match_the_published_values():
    # 95 % Wilson score intervals: 0/10 -> [0, 0.2775] (upper = z^2 / (n + z^2)), 5/10 -> [0.2366, 0.7634].
    assert wilson_interval(0, 10) == (0.0, pytest.approx(0.27753, abs=1e-5))
    assert wilson_interval(5, 10) == (pytest.approx(0.23659, abs=1e-5), pytest.approx(0.76341, abs=1e-5))
    assert (
        wilson_interval(10, 10) == (pytest.approx(0.72247, abs=1e-5), 1.0) and wilson_interval(3, 0) is None
    )


def test_bootstrap_over_seeds_spans_the_seeds_ratios():
    # Seeds give ratios 1 (1/8 against 1/8) and 3 (3/8 against 1/8); a mixed resample gives 2.
    # Each of the pure resamples has probability 1/4, so the 95 % interval runs from 1 to 3.
    assert bootstrap_ratio([(1, 8), (3, 8)], [(1, 8), (1, 8)]) == (1.0, 3.0)
    # A resample made of the seed where the other arm has no hits is unbounded.
    assert bootstrap_ratio([(1, 8), (1, 8)], [(0, 8), (2, 8)]) == (0.5, math.inf)
    # Identical seeds: no spread at all.
    assert bootstrap_ratio([(2, 8), (2, 8), (2, 8)], [(1, 8), (1, 8), (1, 8)]) == (2.0, 2.0)
    assert bootstrap_ratio([(2, 8)], [(1, 8)]) is None  # one seed: nothing to resample
    with pytest.raises(ValueError, match="same seeds"):
        bootstrap_ratio([(2, 8)], [(1, 8), (1, 8)])


def _rock_salt(a: float, species=("Na", "Cl")) -> Structure:
    lattice = Lattice([[0, a / 2, a / 2], [a / 2, 0, a / 2], [a / 2, a / 2, 0]])
    return Structure(lattice, list(species), [[0, 0, 0], [0.5, 0.5, 0.5]])


def _cesium_chloride(a: float, species=("K", "Na")) -> Structure:
    return Structure(Lattice.cubic(a), list(species), [[0, 0, 0], [0.5, 0.5, 0.5]])


def _prior(formula: str) -> list[Structure]:
    """A hand-made prior set: rock-salt NaCl only."""
    return [_rock_salt(5.64)] if formula == "NaCl" else []


def test_a_hit_matching_the_prior_or_an_earlier_hit_is_rediscovered():
    hits = [
        _rock_salt(5.50),  # NaCl, squeezed: still the prior's rock salt
        _cesium_chloride(4.2),  # KNa, new
        _cesium_chloride(4.3),  # the same crystal again, strained: an earlier hit
        _rock_salt(5.9, ("K", "Na")),  # KNa, another structure: new
        _cesium_chloride(3.5, ("Na", "Cl")),  # NaCl in CsCl type: not the prior's rock salt
    ]
    assert rediscovered(hits, _prior) == [True, False, True, False, False]
    assert rediscovered([], _prior) == []


def _insert_arm(database, name: str) -> None:
    """Two hand-made rounds of a finished arm: candidates, their relaxations and the round records."""
    target = "formation_energy_per_atom"

    def candidate(cid, round_, state, dft=None, predicted=None, structure=None, reason=None):
        doc = {
            "campaign": name,
            "candidate_id": cid,
            "selected_round": round_,
            "state": state,
            "state_history": [
                {"state": "submitted"},
                {"state": state, **({"reason": reason} if reason else {})},
            ],
            # What the collection's summary needs of every candidate.
            "round": round_,
            "reduced_formula": "KNa",
            "chemsys": "K-Na",
            "elements": ["K", "Na"],
            "nsites": 2,
            "created_at": datetime.now(UTC),
        }
        if dft is not None:
            doc.update(dft={target: dft}, predicted={target: {"mean": predicted}}, dft_task_id=f"task-{cid}")
            database["dft_tasks"].insert_one(
                {"task_id": f"task-{cid}", "output": {"final_structure": structure}}
            )
        database["candidates"].insert_one(doc)

    # Round 1: a hit that is the prior's NaCl, a new hit (CsCl-type KNa), a miss, two failures.
    candidate("a", 0, "relaxed", -1.4, -1.3, _rock_salt(5.55).as_dict())
    candidate("b", 0, "relaxed", -1.2, -1.0, _cesium_chloride(4.2).as_dict())
    candidate("c", 0, "relaxed", -0.5, -0.8, _cesium_chloride(4.0, ("K", "Cl")).as_dict())
    candidate("d", 0, "failed", reason="relaxation failed; unphysical: Si-C at 0.80 Å, below 0.5 x ...")
    candidate("e", 0, "failed", reason="no result after 3 attempts")
    # Round 2: the CsCl-type KNa again (an earlier hit), and rock-salt KNa (new).
    candidate("f", 1, "relaxed", -1.5, -1.5, _cesium_chloride(4.35).as_dict())
    candidate("g", 1, "relaxed", -1.3, -1.6, _rock_salt(5.9, ("K", "Na")).as_dict())
    finetune = {"name": "cgcnn_finetune", "status": "done", "metrics": {"mae_before": {target: 0.25}}}
    rounds = [
        {"shortlisted": 10, "relaxed": 3, "failed": 2, "hits": 2},
        {"shortlisted": 5, "relaxed": 2, "failed": 0, "hits": 2},
    ]
    for number, metrics in enumerate(rounds):
        steps = (
            {"retrain": {"name": "retrain", "status": "done", "outputs": {"hooks": [finetune]}}}
            if number
            else {}
        )
        database["campaign_rounds"].insert_one(
            {"campaign": name, "round": number, "metrics": metrics, "steps": steps}
        )


def test_campaign_rows_of_hand_made_rounds(settings, database, repo_root):
    config = load_campaign_config(repo_root / "configs" / "bench-campaign.yaml").model_copy(
        update={"name": "arm"}
    )
    _insert_arm(database, "arm")
    first, second = campaign_rows(database, config, known=_prior)
    assert (first["round"], first["shortlisted"], first["relaxed"], first["hits"]) == (1, 10, 3, 2)
    assert (first["failed"], first["unphysical"]) == (2, 1)
    assert (first["rediscovered"], first["new_hits"]) == (1, 1)
    assert first["mae_screening"] == pytest.approx((0.1 + 0.2 + 0.3) / 3)
    assert first["mae_before_finetune"] is None and second["mae_before_finetune"] == 0.25
    assert (second["hits"], second["rediscovered"], second["new_hits"]) == (2, 1, 1)
    assert second["mae_screening"] == pytest.approx(0.15)
    assert sorted(first["std_and_hit"]) == [[None, False], [None, True], [None, True]]  # no std stored here
    assert (second["cumulative_hits"], second["cumulative_new_hits"], second["cumulative_relaxed"]) == (
        4,
        2,
        5,
    )
    assert second["cumulative_hit_rate"] == 0.8 and second["cumulative_new_hit_rate"] == 0.4
    # Without a prior to compare with, every hit counts as new.
    assert [r["new_hits"] for r in campaign_rows(database, config)] == [2, 2]


def _tiny_palette(repo_root):
    base = load_campaign_config(repo_root / "configs" / "bench-campaign.yaml")
    return base.model_copy(
        update={
            "elements": base.elements.model_copy(update={"allow": ["Na", "K", "Cl"]}),
            "material_classes": ["binary"],
        }
    )


#: Of the nine B1/B2/B3 crystals of Na, K and Cl, the prior set holds rock-salt, zinc-blende and
#: CsCl-type KCl and rock-salt and zinc-blende NaCl; these four are left.
NOVEL = {("B1", ("K", "Na")), ("B2", ("Cl", "Na")), ("B2", ("K", "Na")), ("B3", ("K", "Na"))}


def test_no_model_draws_follow_the_campaign_rules_and_never_repeat(settings, database, repo_root):
    import numpy as np

    config = _tiny_palette(repo_root)
    assert len(no_model_pool(config)) == 9  # species orders of one crystal count once
    known = prior_lookup(database, "efficiency-bench-no_model")
    drawn: set = set()
    first = draw_no_model(config, n=3, rng=np.random.default_rng(0), known=known, exclude=drawn)
    second = draw_no_model(config, n=3, rng=np.random.default_rng(1), known=known, exclude=drawn)
    keys = [(p.name, tuple(sorted(p.species))) for p, _ in first + second]
    assert len(first) == 3 and len(second) == 1  # only one novel crystal was left
    assert set(keys) == NOVEL and len(keys) == len(set(keys))
    assert draw_no_model(config, n=3, rng=np.random.default_rng(2), known=known, exclude=drawn) == []
    small = config.model_copy(update={"filters": config.filters.model_copy(update={"max_nsites": 1})})
    assert draw_no_model(small, n=3, rng=np.random.default_rng(0), known=known) == []  # the size rule


def test_no_model_round_relaxes_the_budget_and_flags_rediscoveries(settings, database, repo_root):
    config = _tiny_palette(repo_root)
    known = prior_lookup(database, "efficiency-bench-no_model")
    drawn: set = set()
    rounds = [no_model_round(config, n=2, seed=s, known=known, exclude=drawn) for s in (0, 1, 2)]
    assert [len(r) for r in rounds] == [2, 2, 0]  # the budget, then nothing novel left
    picked = [p for r in rounds for p in r]
    assert {(p["prototype"], tuple(sorted(p["species"]))) for p in picked} == NOVEL
    for p in picked:
        value = p["formation_energy_per_atom"]
        assert (value is None) == (p["failed_reason"] is not None) == (p["relaxed_structure"] is None)
        assert p["hit"] == (value is not None and -1.6 <= value <= -1.1)
    rows = no_model_rows(rounds, known)
    assert [r["drawn"] for r in rows] == [2, 2, 0]
    assert sum(r["relaxed"] + r["failed"] for r in rows) == 4
    assert sum(r["hits"] for r in rows) == sum(p["hit"] for p in picked)
    # A relaxed hit that turned into the prior's rock-salt NaCl counts as rediscovered.
    fake = [
        [
            {
                **picked[0],
                "hit": True,
                "formation_energy_per_atom": -1.4,
                "relaxed_structure": _rock_salt(5.6).as_dict(),
            }
        ]
    ]
    (row,) = no_model_rows(fake, known)
    assert (row["hits"], row["rediscovered"], row["new_hits"]) == (1, 1, 0)


def test_every_result_states_the_circularity():
    assert "CHGNet" in CIRCULARITY and "0.3.0" in CIRCULARITY and "prior" in CIRCULARITY


def test_std_terciles_split_the_hit_rate_by_the_ensembles_std():
    pairs = [(0.05, True), (0.08, True), (0.10, False), (0.15, True), (0.18, False), (0.20, False)]
    pairs += [(0.30, False), (0.35, False), (0.40, True), (None, True)]  # no std: left out
    out = std_terciles(pairs)
    assert out["edges_ev_per_atom"] == [pytest.approx(0.1333, abs=1e-4), pytest.approx(0.2333, abs=1e-4)]
    assert [(t["n"], t["hits"]) for t in out["terciles"]] == [(3, 2), (3, 1), (3, 1)]
    assert out["terciles"][0]["hit_rate"] == pytest.approx(2 / 3)
    assert std_terciles([(0.1, True), (None, False)]) is None


def _run(seed: int, hits: tuple[int, int, int], window=(-1.6, -1.1)) -> dict:
    """A one-seed result with three arms of one round each: (loop, random, no_model) hits of 8."""
    settings = {"window": {"formation_energy_per_atom": list(window)}, "palette": ["Na", "Cl"]}
    settings.update(
        material_classes=["binary"], dft_per_round=8, candidates_per_round=100, no_model_per_round=8
    )
    arms = {arm: _rows([(h, 8)]) for arm, h in zip(("loop", "random", "no_model"), hits, strict=True)}
    return {"seed": seed, "arms": arms, "code_version": {"git_commit": f"c{seed}"}, **settings}


def test_runs_of_parallel_processes_pool_as_one_run(tmp_path):
    from crystaloop.errors import UserError

    many = {"seeds": {"2": _run(2, (4, 1, 0)), "3": _run(3, (2, 1, 1))}, "pooled": {}, "complete": False}
    merged = merge_runs([("a.json", many), ("b.json", _run(4, (3, 0, 1)))])
    assert sorted(merged) == [2, 3, 4]
    pooled = pool_seeds(merged)
    assert pooled["hits"] == {"loop": 9, "random": 2, "no_model": 2} and pooled["relaxed"]["loop"] == 24
    assert pooled["code_versions"] == {
        "2": {"git_commit": "c2"},
        "3": {"git_commit": "c3"},
        "4": {"git_commit": "c4"},
    }
    # A seed on which only one arm ran counts in that arm's rate, not in the ratios.
    merged[5] = {**_run(5, (0, 0, 8)), "arms": {"no_model": _rows([(8, 8)])}}
    pooled = pool_seeds(merged)
    assert pooled["hits"]["no_model"] == 10 and pooled["relaxed"]["no_model"] == 32
    assert pooled["ratio_vs_no_model_seeds"] == [2, 3, 4]
    assert pooled["ratio_vs_no_model"] == pytest.approx((9 / 24) / (2 / 24))
    with pytest.raises(UserError, match="seed 4's loop arm is in both b.json and c.json"):
        merge_runs([("b.json", _run(4, (3, 0, 1))), ("c.json", _run(4, (3, 0, 1)))])
    # Arms of one seed run apart: the campaign arms of one file, the no-model arm of another.
    apart = merge_runs(
        [("b.json", _run(4, (3, 0, 1)), ["loop", "random"]), ("c.json", _run(4, (9, 9, 6)), ["no_model"])]
    )
    assert {arm: d["rows"][0]["hits"] for arm, d in apart[4]["arms"].items()} == {
        "loop": 3,
        "random": 0,
        "no_model": 6,
    }
    assert pool_seeds(apart)["code_versions"]["4"] == {"git_commit": "c4"}  # one code ran every arm
    other = {**_run(4, (9, 9, 6)), "code_version": {"git_commit": "d4"}}
    apart = merge_runs([("b.json", _run(4, (3, 0, 1)), ["loop", "random"]), ("c.json", other, ["no_model"])])
    assert pool_seeds(apart)["code_versions"]["4"] == {
        "loop": {"git_commit": "c4"},
        "random": {"git_commit": "c4"},
        "no_model": {"git_commit": "d4"},
    }
    with pytest.raises(UserError, match="another window"):
        merge_runs([("b.json", _run(4, (3, 0, 1))), ("c.json", _run(5, (3, 0, 1), window=(-2, -1)))])
    with pytest.raises(UserError, match="not a bench campaign result"):
        merge_runs([("d.json", {"rows": []})])


def test_bench_campaign_pools_files(settings, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    files = []
    for seed, hits in ((4, (3, 0, 1)), (5, (5, 2, 0))):
        files += ["--pool", str(tmp_path / f"s{seed}.json")]
        (tmp_path / f"s{seed}.json").write_text(to_json(_run(seed, hits)))
    exe = Path(sys.executable).parent / "crystaloop"
    out = tmp_path / "pooled.json"
    result = subprocess.run(
        [str(exe), "bench", "campaign", *files, "--output", str(out)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    written = json.loads(out.read_text())
    assert sorted(written["seeds"]) == ["4", "5"] and written["complete"]
    assert written["pooled"]["hits"] == {"loop": 8, "random": 2, "no_model": 1}
    assert written["pooled"]["ratio_vs_random"] == pytest.approx(4.0)
    assert "loop 8/16 (50 %" in result.stdout
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    result = subprocess.run(
        [str(exe), "bench", "campaign", "--pool", str(bad)], capture_output=True, text=True
    )
    assert result.returncode == 2 and "cannot read" in result.stderr and "Traceback" not in result.stderr


# -- the S.U.N. target and the model-free baselines (random structure search, substitution) ----


def _palette_config(repo_root, palette, classes=("binary",), max_nsites=5):
    base = load_campaign_config(repo_root / "configs" / "bench-campaign.yaml")
    return base.model_copy(
        update={
            "elements": base.elements.model_copy(update={"allow": list(palette)}),
            "material_classes": list(classes),
            "filters": base.filters.model_copy(update={"max_nsites": max_nsites}),
        }
    )


def test_sun_arms_steer_at_the_hull_and_keep_the_window_mode(repo_root):
    base = load_campaign_config(repo_root / "configs" / "bench-campaign.yaml")
    sun = arm_configs(base, rounds=5, target="sun")
    for config in sun.values():
        (window,) = config.targets
        assert (window.property, window.min, window.max) == ("energy_above_hull", None, SUN_STEER_MAX)
    assert [t.property for t in arm_configs(base, rounds=5)["loop"].targets] == ["formation_energy_per_atom"]
    assert DEFAULT_ARMS["sun"] == ("loop", "random", "rss", "substitution")
    assert "no_model" in ARMS and DEFAULT_ARMS["window"] == ("loop", "random", "no_model")


def test_random_structure_search_obeys_composition_size_and_validity_and_repeats_for_a_seed(repo_root):
    import numpy as np
    from pymatgen.analysis.structure_matcher import StructureMatcher

    from crystaloop.generative.measures import minimum_distance

    config = _palette_config(repo_root, ["Na", "K", "Mg", "O", "F"], classes=("binary", "perovskite"))
    drawn: dict = {}
    first = draw_rss(config, n=6, rng=np.random.default_rng(3), exclude=drawn)
    second = draw_rss(config, n=6, rng=np.random.default_rng(4), exclude=drawn)
    assert len(first) == len(second) == 6
    groups = set()
    for info, structure in first + second:
        composition = structure.composition
        assert {el.symbol for el in composition.elements} == set(info.species) <= set(config.elements.allow)
        # The class's stoichiometry in role order: AB or ABX3.
        amounts = tuple(int(composition[el] / min(composition.values())) for el in info.species)
        assert amounts == CLASS_COUNTS[info.material_class]
        assert composition.reduced_formula == info.formula
        assert len(structure) <= 5 and 1 <= info.spacegroup <= 230
        assert minimum_distance(structure) >= config.filters.min_distance
        groups.add(info.spacegroup)
    assert len(groups) > 3  # random space groups, not one favourite
    # Never the same crystal twice: no draw of the second round matches one of the first.
    matcher = StructureMatcher()
    for _, a in second:
        assert not any(
            a.composition.reduced_formula == b.composition.reduced_formula and matcher.fit(a, b)
            for _, b in first
        )
    assert sum(len(v) for v in drawn.values()) == 12
    again = draw_rss(config, n=6, rng=np.random.default_rng(3))
    assert [i for i, _ in again] == [i for i, _ in first]
    assert all(
        np.allclose(a.lattice.matrix, b.lattice.matrix) and a == b
        for (_, a), (_, b) in zip(again, first, strict=True)
    )
    assert [i for i, _ in draw_rss(config, n=6, rng=np.random.default_rng(5))] != [i for i, _ in first]
    # The size limit holds for every draw: one site per cell leaves nothing (no class fits).
    tiny = _palette_config(repo_root, ["Na", "K", "Mg", "O", "F"], max_nsites=1)
    assert draw_rss(tiny, n=2, rng=np.random.default_rng(0), max_draws=5) == []


def test_random_structure_search_draws_volumes_from_pyxtals_factor(repo_root):
    import numpy as np

    config = _palette_config(repo_root, ["Na", "Cl", "K", "F"])
    volumes = [s.volume / len(s) for _, s in draw_rss(config, n=8, rng=np.random.default_rng(0))]
    # Alkali halides at pyxtal's factor 1.1: tens of cubic Angstrom per atom, neither crushed nor empty.
    assert VOLUME_FACTOR == 1.1 and all(8 < v < 120 for v in volumes)


def test_substitution_draws_decorated_prototypes_by_probability_without_repeats(
    settings, database, repo_root
):
    import numpy as np
    from pymatgen.analysis.structure_matcher import StructureMatcher

    from crystaloop.generative.data import decorate

    config = _palette_config(repo_root, ["Na", "K", "Cl"])
    pool = substitution_pool(config)
    assert pool and all(d.kind != "identity" for d in pool)
    assert all(d.prototype in decorate.aflow_library() for d in pool)
    assert all({new for _, new in d.substitution} <= {"Na", "K", "Cl"} for d in pool)
    assert [d.probability for d in pool] == sorted((d.probability for d in pool), reverse=True)
    known = prior_lookup(database, "efficiency-bench-no_model")
    drawn: dict = {}
    rounds = [
        draw_substitution(config, n=2, rng=np.random.default_rng(s), known=known, exclude=drawn, pool=pool)
        for s in range(6)
    ]
    picked = [pair for r in rounds for pair in r]
    assert len(rounds[0]) == 2 and 2 < len(picked) < len(pool)  # the pool runs out; some were known
    matcher = StructureMatcher()
    for i, (decoration, structure) in enumerate(picked):
        assert decoration in pool
        formula = structure.composition.reduced_formula
        assert not any(matcher.fit(structure, p) for p in known(formula))  # not a prior compound
        assert not any(
            formula == other.composition.reduced_formula and matcher.fit(structure, other)
            for _, other in picked[:i]
        )  # never the same crystal twice, across rounds
    assert (
        draw_substitution(config, n=2, rng=np.random.default_rng(9), known=known, exclude=drawn, pool=pool)
        == []
    )
    # Drawn in proportion to the probability: of two decorations, the 10,000 times likelier comes first.
    likely = decorate.Decoration("AB_cF8_225_a_b", (("Cl", "Cl"), ("Na", "K")), 0.5, "ionic")
    rare = decorate.Decoration("AB_cP2_221_b_a", (("Cl", "Cl"), ("Cs", "Na")), 0.00005, "ionic")
    firsts = [
        draw_substitution(config, n=1, rng=np.random.default_rng(s), known=lambda f: [], pool=[rare, likely])[
            0
        ][0]
        for s in range(20)
    ]
    assert firsts.count(likely) >= 19


def _relaxed(structure, value, formula=None):
    return {
        "formula": formula or structure.composition.reduced_formula,
        "formation_energy_per_atom": value,
        "structure": structure,
    }


def _tungsten_carbide(species=("Na", "Cl")) -> Structure:
    """The WC type (hP2): not one of the prior's AB prototypes (B1, B2, B3)."""
    return Structure(Lattice.hexagonal(3.6, 3.4), list(species), [[0, 0, 0], [1 / 3, 2 / 3, 0.5]])


def test_sun_classification_of_hand_made_results_on_a_hand_made_hull():
    from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram
    from pymatgen.core import Composition

    from crystaloop.dft.hull import FormationHull, HullPhase

    hull = FormationHull("test", [HullPhase("NaCl", -2.0, "prior")])
    records = [
        _relaxed(_rock_salt(5.6), -2.1),  # below the prior's NaCl, but rock salt is a prior prototype
        _relaxed(_tungsten_carbide(), -2.15),  # below the hull that now holds the first: S.U.N.
        _relaxed(_tungsten_carbide(), -2.3),  # the same crystal again: stable, not unique, not novel
        {"formula": "NaCl", "formation_energy_per_atom": None, "structure": None},  # a failed relaxation
        _relaxed(_tungsten_carbide(("K", "Cl")), 0.2),  # above the elements: not stable
    ]
    verdicts = sun_classify(records, hull)
    assert verdicts[3] is None
    flags = [(v["stable"], v["unique"], v["novel"], v["sun"]) for v in verdicts if v is not None]
    assert flags == [
        (True, True, False, False),
        (True, True, True, True),
        (True, False, False, False),
        (False, True, False, False),  # a new formula, but the arm's WC type is no longer new
    ]
    # The E_hull is pymatgen's, on the hull of the prior plus the arm's earlier results.
    na, cl = (PDEntry(Composition(el), 0.0) for el in ("Na", "Cl"))
    nacl = Composition("NaCl")
    diagram = PhaseDiagram([na, cl, PDEntry(nacl, -2.0 * 2), PDEntry(nacl, -2.1 * 2)])
    expected = diagram.get_e_above_hull(PDEntry(nacl, -2.15 * 2), allow_negative=True)
    assert verdicts[1]["energy_above_hull"] == pytest.approx(expected) == pytest.approx(-0.05)
    assert verdicts[0]["energy_above_hull"] == pytest.approx(-0.1)
    assert verdicts[2]["energy_above_hull"] == pytest.approx(-0.15)
    assert verdicts[4]["energy_above_hull"] == pytest.approx(0.2)  # K-Cl has no phase: against the elements
    assert [p.formation_energy_per_atom for p in hull.phases_in(["Na", "Cl"])] == [-2.0, -2.1, -2.15, -2.3]
    # Per round: the rows count S.U.N. hits per 100 oracle calls, failures included.
    rows = sun_rows([records[:2], records[2:]], FormationHull("test", [HullPhase("NaCl", -2.0, "prior")]))
    assert [(r["oracle_calls"], r["relaxed"], r["failed"], r["hits"]) for r in rows] == [
        (2, 2, 0, 1),
        (3, 2, 1, 0),
    ]
    assert [r["stable"] for r in rows] == [2, 1] and [r["novel"] for r in rows] == [1, 0]
    assert rows[0]["sun_per_100_calls"] == 50.0 and rows[1]["sun_per_100_calls"] == 0.0
    assert rows[1]["cumulative_sun_per_100_calls"] == 20.0 and rows[0]["sun_formulas"] == ["NaCl"]


def _sun_rows(counts):
    """Rows of one arm from (S.U.N. hits, oracle calls) per round, every call relaxed."""
    rows = [
        {"round": i + 1, "hits": h, "new_hits": h, "relaxed": n, "failed": 0, "oracle_calls": n}
        for i, (h, n) in enumerate(counts)
    ]
    return {"rows": with_rates(rows)}


def _sun_run(seed, arms):
    return {"seed": seed, "target": "sun", "arms": {arm: _sun_rows(c) for arm, c in arms.items()}}


def test_pooled_sun_rates_per_round_and_ratios_against_the_targets():
    results = {
        0: _sun_run(0, {"loop": [(2, 8), (3, 8)], "rss": [(0, 8), (1, 8)], "random": [(1, 8), (1, 8)]}),
        1: _sun_run(1, {"loop": [(4, 8), (1, 8)], "rss": [(1, 8), (0, 8)], "random": [(0, 8), (2, 8)]}),
    }
    pooled = pool_seeds(results)
    assert pooled["target"] == "sun" and pooled["round"] == 2 and pooled["goal_round"] == 5
    first, second = pooled["per_round"]
    assert first["arms"]["loop"] == {
        "sun_hits": 6,
        "oracle_calls": 16,
        "per_100": 37.5,
        "interval": pytest.approx(tuple(100 * b for b in wilson_interval(6, 16))),
    }
    assert second["arms"]["loop"]["per_100"] == 25.0 and second["cumulative"]["loop"]["per_100"] == 31.25
    assert (
        second["cumulative"]["rss"]["per_100"] == 6.25 and second["cumulative"]["random"]["per_100"] == 12.5
    )
    assert first["ratios"]["rss"]["ratio"] == pytest.approx(6.0)
    assert second["ratios"]["rss"]["ratio"] == pytest.approx(5.0)
    assert second["ratios"]["random"]["ratio"] == pytest.approx(2.5)
    low, high = second["ratios"]["rss"]["interval"]
    assert low <= 5.0 <= high  # the bootstrap over the two seeds spans the pooled ratio
    # Two rounds of five: the ratios are reported, the targets are not measured.
    target = pooled["sun_targets"]["rss"]
    assert target["goal"] == 5.0 and target["ratio"] == pytest.approx(5.0) and target["met"] is None
    assert target["interval"] == (low, high)
    assert pooled["sun_targets"]["substitution"]["ratio"] is None  # the arm did not run
    # Through round 5: loop 20/80 against rss 4/80 (5x, met) and random 5/80 (4x, met).
    none = (0, 8)
    five = {
        0: _sun_run(
            0, {"loop": [(2, 8)] * 5, "rss": [(1, 8), (1, 8), none, none, none], "random": [(1, 8)] * 5}
        ),
        1: _sun_run(
            1, {"loop": [(2, 8)] * 5, "rss": [none, none, (1, 8), (1, 8), none], "random": [none] * 5}
        ),
    }
    targets = pool_seeds(five)["sun_targets"]
    assert targets["rss"]["ratio"] == pytest.approx(5.0) and targets["rss"]["met"] is True
    assert targets["random"]["ratio"] == pytest.approx(4.0) and targets["random"]["met"] is True
    five[1]["arms"]["random"] = _sun_rows([(3, 8)] * 5)
    assert pool_seeds(five)["sun_targets"]["random"]["met"] is False  # 20/80 against 20/80: 1x
    assert SUN_CAMPAIGN == {"round": 5, "vs_rss": 5.0, "vs_substitution": 2.0, "vs_random": 2.0}
    summary = summarise(five[0])
    assert summary["sun_per_100_calls"]["loop"] == 25.0 and summary["ratio_vs_rss"] == pytest.approx(5.0)
    assert summary["target_vs_rss_met"] is True and summary["target_vs_substitution_met"] is None
    assert "GNoME" in summary["anchors"]["gnome"] and "37.5 %" in summary["anchors"]["ftcp"]


def test_a_sun_benchmark_of_the_model_free_arms_with_a_stand_in_oracle(
    settings, database, repo_root, monkeypatch
):
    """The wiring of run_benchmark's S.U.N. mode; the oracle is replaced so that nothing is relaxed."""
    import crystaloop.loop.bench.campaign as campaign

    config = _palette_config(repo_root, ["Na", "K", "Cl"])

    def oracle(config, structure, role, fields):
        return {
            **fields,
            "formula": structure.composition.reduced_formula,
            "formation_energy_per_atom": -5.0,  # far below every prior phase: stable
            "failed_reason": None,
            "unphysical": False,
            "hit": False,
            "relaxed_structure": structure.as_dict(),
        }

    monkeypatch.setattr(campaign, "oracle_relax", oracle)
    result = campaign.run_benchmark(
        config, database=database, rounds=2, no_model_per_round=2, arms=("rss", "substitution"), target="sun"
    )
    assert result["target"] == "sun" and result["window"] == {"energy_above_hull": [None, SUN_STEER_MAX]}
    rss = result["arms"]["rss"]["rows"]
    assert [r["oracle_calls"] for r in rss] == [2, 2] and all(r["stable"] == 2 for r in rss)
    # Every random crystal is stable here; S.U.N. needs it unique and of a new structure type too.
    assert all(r["hits"] == sum(p["sun"]["sun"] for p in r["structures"]) for r in rss)
    assert all(p["sun"]["novel"] or not p["sun"]["sun"] for r in rss for p in r["structures"])
    sub = result["arms"]["substitution"]["rows"]
    assert sum(r["oracle_calls"] for r in sub) >= 2
    assert result["summary"]["target_vs_rss_met"] is None  # no loop arm ran
    assert CIRCULARITY == result["oracle"]["circularity"]
