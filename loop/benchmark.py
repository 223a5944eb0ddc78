"""Efficiency benchmark: does the loop find hits faster than chance?

Three arms with the same seeds, palette, window and DFT budget per round, all
judged by the same oracle (the surrogate engine, so that five or more rounds fit):

- ``loop``: the campaign as configured, with ``uncertainty`` acquisition and retraining;
- ``random``: the same generator and filters, ``random`` acquisition, no retraining and no
  sampling around hits (``sampling.around_hits``), so nothing the oracle says feeds back;
- ``no_model``: structures drawn from the prior data's distribution (random cubic
  prototypes of the palette's elements), no model and no filter.

The oracle is CHGNet, so the CHGNet screen is off in both campaign arms: it would
be the oracle itself. Reported per round: hit rate, cumulative hits and hit rate,
the MAE of the predictions that selected the round's structures against the oracle
(both campaign arms), and the fine-tuned ensemble's MAE on them before it saw them
(``loop``). :func:`summarise` compares the arms with the targets and the papers' anchors.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from crystaloop.loop.config import CampaignConfig

#: Targets of the benchmark and the papers' figures quoted next to them.
TARGETS = {
    "round": 3,
    "vs_random": 3.0,
    "vs_no_model": 10.0,
}
#: Prototypes per round of the no-model arm, by default.
NO_MODEL_PER_ROUND = 32
#: The arms, in the order they run.
ARMS = ("loop", "random", "no_model")
ANCHORS = {
    "ftcp": "FTCP (paper 004): 37.5 % DFT-verified success (6 of 16) against under 1 % by random sampling",
    "gnome": "GNoME: hit rate (precision of stable predictions) from under 6 % to over 80 % through active learning",
}


def arm_configs(base: CampaignConfig, rounds: int, *, suffix: str = "") -> dict[str, CampaignConfig]:
    """The ``loop`` and ``random`` arm configs derived from ``base`` (surrogate oracle, no UIP screen).

    Campaigns are named ``<base>-bench-<arm><suffix>``.
    """
    common = {
        "max_rounds": rounds,
        "stop": {},
        "dft": {**base.dft.model_dump(), "engine": "surrogate"},
        "execution": {**base.execution.model_dump(), "backend": "local"},
        # CHGNet is the oracle: a CHGNet screen before it would answer the question it asks.
        # The arms share a database; each takes only its own results as known, so that the
        # arm run second is not barred from what the first one relaxed.
        "filters": {**base.filters.model_dump(), "uip_screen": False, "novelty_scope": "own"},
    }
    loop = base.model_copy(deep=True).model_dump()
    loop.update(common, name=f"{base.name}-bench-loop{suffix}")
    loop["acquisition"] = {**loop["acquisition"], "strategy": "uncertainty"}
    loop["retrain"] = {**loop["retrain"], "cgcnn": True}
    rand = base.model_copy(deep=True).model_dump()
    rand.update(common, name=f"{base.name}-bench-random{suffix}")
    rand["acquisition"] = {**rand["acquisition"], "strategy": "random"}
    rand["retrain"] = {**rand["retrain"], "cgcnn": False, "generator_conditioning": False}
    # No feedback of DFT outcomes into generation either: no sampling around hits.
    rand["sampling"] = {**rand["sampling"], "around_hits": 0.0}
    return {"loop": CampaignConfig.model_validate(loop), "random": CampaignConfig.model_validate(rand)}


def no_model_round(config: CampaignConfig, *, n: int, seed: int) -> list[dict[str, Any]]:
    """Relax ``n`` random palette prototypes with the oracle; their E_f and whether they hit."""
    from crystaloop.dft.backends import run_local
    from crystaloop.dft.flows import FormationEnergyFlow
    from crystaloop.generative.data.prototypes import enumerate_all

    palette = set(config.elements.allow or [])
    classes = set(config.material_classes)
    pool = [
        p
        for p in enumerate_all()
        if set(p.species) <= palette and p.material_class in classes and len(set(p.species)) == len(p.species)
    ]
    if not pool:
        return []
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(pool), size=min(n, len(pool)), replace=False)
    out = []
    for i in picks:
        proto = pool[int(i)]
        structure = proto.primitive(proto.lattice_guess())
        flow = FormationEnergyFlow(structure, engine="surrogate", metadata={"role": "benchmark_no_model"})
        responses = run_local(flow)
        fe = responses[flow.output.uuid]
        doc = next(iter(fe.values())).output
        value = getattr(doc, "formation_energy_per_atom", None)
        out.append(
            {
                "formula": structure.composition.reduced_formula,
                "prototype": proto.name,
                "formation_energy_per_atom": value,
                "hit": value is not None and config.in_all_windows({"formation_energy_per_atom": value}),
            }
        )
    return out


def _mae(pairs: list[tuple[float, float]]) -> float | None:
    pairs = [(p, o) for p, o in pairs if p is not None and o is not None and math.isfinite(p)]
    return float(np.mean([abs(p - o) for p, o in pairs])) if pairs else None


def campaign_rows(database, config: CampaignConfig) -> list[dict[str, Any]]:
    """Per round of a finished arm (counted from 1): relaxed, hits, rates, MAEs against the oracle (eV/atom)."""
    from crystaloop.db.campaigns import CampaignStore
    from crystaloop.db.store import CandidateStore

    target = config.targets[0].property
    candidates = CandidateStore(database).collection
    rows = []
    for r in CampaignStore(database).all_rounds(config.name):
        retrain = r.steps.get("retrain")
        hooks = (retrain.outputs.get("hooks") if retrain else None) or []
        finetune = next((h for h in hooks if h["name"] == "cgcnn_finetune" and h["status"] == "done"), None)
        pairs = [
            ((d.get("predicted") or {}).get(target, {}).get("mean"), (d.get("dft") or {}).get(target))
            for d in candidates.find(
                {"campaign": config.name, "selected_round": r.round, "state": "relaxed"},
                {"predicted": 1, "dft": 1},
            )
        ]
        rows.append(
            {
                "round": r.round + 1,
                "shortlisted": int(r.metrics.get("shortlisted") or 0),
                "relaxed": int(r.metrics.get("relaxed") or 0),
                "hits": int(r.metrics.get("hits") or 0),
                "mae_screening": _mae(pairs),
                "mae_before_finetune": finetune["metrics"]["mae_before"].get(target) if finetune else None,
            }
        )
    return with_rates(rows)


def with_rates(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add each round's hit rate and the cumulative hits, relaxations and hit rate to ``rows``."""
    cumulative, relaxed_total = 0, 0
    for row in rows:
        hits, relaxed = row["hits"], row["relaxed"]
        cumulative += hits
        relaxed_total += relaxed
        row["hit_rate"] = hits / relaxed if relaxed else None
        row["cumulative_hits"] = cumulative
        row["cumulative_relaxed"] = relaxed_total
        row["cumulative_hit_rate"] = cumulative / relaxed_total if relaxed_total else None
    return rows


def run_benchmark(
    base: CampaignConfig,
    *,
    database,
    rounds: int = 5,
    no_model_per_round: int | None = None,
    log: Callable[[str], None] | None = None,
    arms: Sequence[str] = ARMS,
    suffix: str = "",
) -> dict[str, Any]:
    """Run the arms (all three by default) and return per-round hit rates, cumulative hits, MAEs and a summary.

    ``no_model_per_round`` prototypes are drawn per round for the no-model arm (default
    :data:`NO_MODEL_PER_ROUND`, or the DFT budget if larger): its hit rate is a base rate, and
    a budget of a few structures per round would measure it to no better than one in eight.
    ``suffix`` is appended to the arms' campaign names (several seeds in one database).
    """
    from crystaloop.loop.campaign import Campaign

    log = log or (lambda line: None)
    n_no_model = max(no_model_per_round or NO_MODEL_PER_ROUND, base.budget.dft_per_round)
    window = {t.property: [t.min, t.max] for t in base.targets}
    result: dict[str, Any] = {
        "rounds": rounds,
        "dft_per_round": base.budget.dft_per_round,
        "candidates_per_round": base.budget.candidates_per_round,
        "no_model_per_round": n_no_model,
        "window": window,
        "palette": base.elements.allow,
        "material_classes": list(base.material_classes),
        "arms": {},
    }
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        from crystaloop.errors import UserError

        raise UserError(f"unknown benchmark arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    if "no_model" in arms and not base.elements.allow:
        from crystaloop.errors import UserError

        # The no-model arm draws prototypes of the palette: without one it would relax nothing.
        raise UserError(
            "the no-model arm draws from elements.allow, which this config leaves open; list the "
            "palette's elements (as configs/bench-campaign.yaml does) or leave no_model out of --arms"
        )
    for arm, config in arm_configs(base, rounds, suffix=suffix).items():
        if arm not in arms:
            continue
        start = time.perf_counter()
        log(f"arm {arm}: campaign {config.name}")
        Campaign(config, database=database, log=lambda line, a=arm: log(f"  [{a}] {line}")).run()
        result["arms"][arm] = {
            "campaign": config.name,
            "acquisition": config.acquisition.strategy,
            "retrain": config.retrain.cgcnn,
            "rows": campaign_rows(database, config),
            "seconds": time.perf_counter() - start,
        }
    if "no_model" not in arms:
        result["summary"] = summarise(result)
        return result
    start = time.perf_counter()
    rows = []
    for r in range(rounds):
        log(f"arm no_model: round {r}")
        picked = no_model_round(base, n=n_no_model, seed=base.seed * 1000 + r)
        rows.append(
            {
                "round": r + 1,
                "shortlisted": None,
                "relaxed": sum(p["formation_energy_per_atom"] is not None for p in picked),
                "hits": sum(p["hit"] for p in picked),
                "mae_screening": None,
                "mae_before_finetune": None,
                "structures": picked,
            }
        )
    rows = with_rates(rows)
    result["arms"]["no_model"] = {"campaign": None, "rows": rows, "seconds": time.perf_counter() - start}
    result["summary"] = summarise(result)
    return result


def to_json(result: dict[str, Any], **kwargs: Any) -> str:
    """``result`` as strict JSON: an unbounded ratio (the other arm had no hits) is the string ``"inf"``."""
    import json

    def strict(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return "inf" if value > 0 else None
        if isinstance(value, dict):
            return {k: strict(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [strict(v) for v in value]
        return value

    return json.dumps(strict(result), allow_nan=False, default=str, **kwargs)


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    if b == 0:
        return math.inf if a > 0 else None
    return a / b


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    """Hit-rate ratios at the target round (that round's and cumulative), MAE trend, targets met.

    Rounds are counted from 1 here (round 3 is the third round, index 2). A ratio against an
    arm with no hits is infinite and counts as met only when the loop has hits. A target
    against an arm that did not run (``--arms``) is not measured: its ``_met`` is None.
    """
    k = TARGETS["round"] - 1

    def at(arm: str, key: str, index: int) -> float | None:
        rows = result["arms"].get(arm, {}).get("rows", [])
        return rows[index][key] if index < len(rows) else None

    out: dict[str, Any] = {"round": TARGETS["round"], "anchors": ANCHORS}
    for scope, key in (("round", "hit_rate"), ("cumulative", "cumulative_hit_rate")):
        loop = at("loop", key, k)
        for other, goal in (("random", TARGETS["vs_random"]), ("no_model", TARGETS["vs_no_model"])):
            ratio = _ratio(loop, at(other, key, k))
            out[f"{scope}_ratio_vs_{other}"] = ratio
            ran = "loop" in result["arms"] and other in result["arms"]
            out[f"{scope}_target_vs_{other}_met"] = (ratio is not None and ratio >= goal) if ran else None
        out[f"{scope}_hit_rates"] = {arm: at(arm, key, k) for arm in ("loop", "random", "no_model")}
    maes = [row["mae_screening"] for row in result["arms"].get("loop", {}).get("rows", [])]
    first, last = (maes[0], maes[-1]) if len(maes) >= 2 else (None, None)
    out["mae_first_round"], out["mae_last_round"] = first, last
    out["mae_falls"] = first is not None and last is not None and last < first
    return out


def pool_seeds(results: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Hits and relaxations through the target round summed over seeds, per arm, and the ratios.

    ``results`` maps a seed to its :func:`run_benchmark` result. Rates pooled this way weigh
    every relaxation alike; ``per_seed_hit_rates`` keeps each seed's cumulative rates for the spread.
    """
    ran = max((len(d["rows"]) for r in results.values() for d in r["arms"].values()), default=0)
    k = min(TARGETS["round"], ran)  # a shorter run is pooled through its last round
    hits: dict[str, int] = {}
    relaxed: dict[str, int] = {}
    per_seed: dict[str, dict[str, float | None]] = {}
    for seed, result in sorted(results.items()):
        per_seed[str(seed)] = {}
        for arm, data in result["arms"].items():
            rows = data["rows"][:k]
            hits[arm] = hits.get(arm, 0) + sum(r["hits"] for r in rows)
            relaxed[arm] = relaxed.get(arm, 0) + sum(r["relaxed"] for r in rows)
            n = sum(r["relaxed"] for r in rows)
            per_seed[str(seed)][arm] = sum(r["hits"] for r in rows) / n if n else None
    rates = {arm: hits[arm] / relaxed[arm] if relaxed[arm] else None for arm in hits}
    out: dict[str, Any] = {
        "round": k,
        "seeds": sorted(results),
        "hits": hits,
        "relaxed": relaxed,
        "hit_rates": rates,
        "per_seed_hit_rates": per_seed,
    }
    for other, goal in (("random", TARGETS["vs_random"]), ("no_model", TARGETS["vs_no_model"])):
        if "loop" in rates and other in rates:
            ratio = _ratio(rates["loop"], rates[other])
            out[f"ratio_vs_{other}"] = ratio
            out[f"target_vs_{other}_met"] = ratio is not None and ratio >= goal
    return out
