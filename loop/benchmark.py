"""Efficiency benchmark: does the loop find hits faster than chance?

Three arms with the same seeds, palette, window and DFT budget per round, all
judged by the same oracle (the surrogate engine, so that five or more rounds fit):

- ``loop``: the campaign as configured, with ``uncertainty`` acquisition and retraining;
- ``random``: the same generator and filters, ``random`` acquisition, no retraining;
- ``no_model``: structures drawn from the prior data's distribution (random cubic
  prototypes of the palette's elements), no model and no filter.

Reported per round: hit rate, cumulative hits, and (for the arms with a model) the
CGCNN screening MAE against the oracle on that round's new results.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from crystaloop.loop.config import CampaignConfig


def arm_configs(base: CampaignConfig, rounds: int) -> dict[str, CampaignConfig]:
    """The ``loop`` and ``random`` arm configs derived from ``base`` (surrogate oracle)."""
    common = {
        "max_rounds": rounds,
        "stop": {},
        "dft": {**base.dft.model_dump(), "engine": "surrogate"},
        "execution": {**base.execution.model_dump(), "backend": "local"},
    }
    loop = base.model_copy(deep=True).model_dump()
    loop.update(common, name=f"{base.name}-bench-loop")
    loop["acquisition"] = {**loop["acquisition"], "strategy": "uncertainty"}
    loop["retrain"] = {**loop["retrain"], "cgcnn": True}
    rand = base.model_copy(deep=True).model_dump()
    rand.update(common, name=f"{base.name}-bench-random")
    rand["acquisition"] = {**rand["acquisition"], "strategy": "random"}
    rand["retrain"] = {**rand["retrain"], "cgcnn": False, "generator_conditioning": False}
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


def run_benchmark(
    base: CampaignConfig,
    *,
    database,
    rounds: int = 5,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the three arms and return per-round hit rates, cumulative hits and MAEs."""
    from crystaloop.db.campaigns import CampaignStore
    from crystaloop.loop.campaign import Campaign

    log = log or (lambda line: None)
    result: dict[str, Any] = {"rounds": rounds, "dft_per_round": base.budget.dft_per_round, "arms": {}}
    store = CampaignStore(database)
    for arm, config in arm_configs(base, rounds).items():
        start = time.perf_counter()
        log(f"arm {arm}: campaign {config.name}")
        Campaign(config, database=database, log=lambda line, a=arm: log(f"  [{a}] {line}")).run()
        rows, cumulative = [], 0
        for r in store.all_rounds(config.name):
            hits = int(r.metrics.get("hits") or 0)
            cumulative += hits
            retrain = r.steps.get("retrain")
            hooks = (retrain.outputs.get("hooks") if retrain else None) or []
            finetune = next(
                (h for h in hooks if h["name"] == "cgcnn_finetune" and h["status"] == "done"), None
            )
            target = config.targets[0].property
            rows.append(
                {
                    "round": r.round,
                    "relaxed": int(r.metrics.get("relaxed") or 0),
                    "hits": hits,
                    "hit_rate": r.metrics.get("hit_rate"),
                    "cumulative_hits": cumulative,
                    "mae_screening": finetune["metrics"]["mae_screening"].get(target) if finetune else None,
                }
            )
        result["arms"][arm] = {"campaign": config.name, "rows": rows, "seconds": time.perf_counter() - start}
    start = time.perf_counter()
    rows, cumulative = [], 0
    for r in range(rounds):
        log(f"arm no_model: round {r}")
        picked = no_model_round(base, n=base.budget.dft_per_round, seed=base.seed * 1000 + r)
        hits = sum(p["hit"] for p in picked)
        cumulative += hits
        rows.append(
            {
                "round": r,
                "relaxed": sum(p["formation_energy_per_atom"] is not None for p in picked),
                "hits": hits,
                "hit_rate": hits / len(picked) if picked else None,
                "cumulative_hits": cumulative,
                "mae_screening": None,
                "structures": picked,
            }
        )
    result["arms"]["no_model"] = {"campaign": None, "rows": rows, "seconds": time.perf_counter() - start}
    return result
