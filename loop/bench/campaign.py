"""Efficiency benchmark: does the loop find hits faster than chance?

Two targets (``target``):

- ``sun`` (the default): a hit is stable, unique and novel (S.U.N.). Stable: E_hull <= 0 by the
  oracle on the CHGNet hull of the prior set plus everything the arm relaxed before it
  (:func:`sun_classify`; pymatgen's ``PhaseDiagram`` through :class:`~crystaloop.dft.hull.FormationHull`);
  unique: no earlier result of the arm matches it; novel: its structure type (species anonymised)
  is neither a prior prototype nor one of the arm's earlier results
  (:func:`crystaloop.loop.stability.sun_flags`). Counted per 100 oracle calls (relaxations
  started, failures included). The campaign arms steer at a predicted E_hull of at most
  :data:`SUN_STEER_MAX` eV/atom. Default arms: ``loop``, ``random``, ``rss`` and ``substitution``.
- ``window``: a hit lies in the campaign's formation-energy window (arms ``loop``, ``random``,
  ``no_model``), as described below.

The arms, with the same seeds, palette, filters and DFT budget per round, all judged by the
same oracle (the surrogate engine, so that five or more rounds fit):

- ``loop``: the campaign as configured, with ``uncertainty`` acquisition and retraining;
- ``random``: the same generator and filters, ``random`` acquisition, no retraining and no
  sampling around hits (``sampling.around_hits``), so nothing the oracle says feeds back;
- ``no_model``: cubic prototypes of the campaign's classes decorated with random palette
  elements, through the same validity, element, size and novelty rules as the campaign
  arms, never the same crystal twice, ``budget.dft_per_round`` of them a round; no model;
- ``rss``: random structure search, random symmetric crystals of the palette's compositions
  made with pyxtal (:mod:`crystaloop.loop.bench.baselines`); no model;
- ``substitution``: known prototypes decorated by ionic substitution probability
  (:mod:`crystaloop.loop.bench.baselines`); no model.

The model-free arms relax the same number a round, never the same crystal twice.

The oracle is CHGNet, so the CHGNet screen is off in both campaign arms: it would be the
oracle itself. It is also the labeller of the prior data that the ensemble learnt
(:data:`CIRCULARITY`). A hit whose relaxed structure matches a prior structure or an earlier
hit of its arm is counted as rediscovered, beside the new ones; a relaxation that ends
unphysical (``crystaloop.dft.sanity``) is a failure, counted per arm. Reported per round:
hit rate, cumulative hits and hit rate, the MAE of the predictions that selected the round's
structures against the oracle (both campaign arms), and the fine-tuned ensemble's MAE on
them before it saw them (``loop``). :func:`summarise` compares the arms with the targets and
the papers' anchors; :func:`pool_seeds` pools seeds with confidence intervals.
"""

from __future__ import annotations

import itertools
import math
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Composition, Structure

from crystaloop.generative.measures import matching_index
from crystaloop.loop.bench.targets import ANCHORS, CAMPAIGN, SUN_ANCHORS, SUN_CAMPAIGN
from crystaloop.loop.config import CampaignConfig

#: Why the oracle favours the model-guided arms; written into every result and printed with it.
CIRCULARITY = (
    "The oracle is CHGNet with its 0.3.0 weights, and the CGCNN ensemble that screens the loop and "
    "random arms was trained on the prior set's labels, which CHGNet 0.3.0 computed: the ensemble "
    "learnt to imitate the judge. A hit here is a structure CHGNet puts in the window or on its "
    "hull, not a DFT-verified one, and the agreement favours both campaign arms over the "
    "model-free arms (no model, random structure search, substitution)."
)
#: Confidence level of every interval the benchmark reports.
CONFIDENCE = 0.95
#: Bootstrap resamples of the seeds for the ratios' intervals.
BOOTSTRAP_RESAMPLES = 10_000
#: Species roles of each material class: AB, ABX3, X2YZ.
_ROLES = {"binary": 2, "perovskite": 3, "heusler": 3}
#: The arms, in the order they run.
ARMS = ("loop", "random", "no_model", "rss", "substitution")
#: The arms without a model: drawn, relaxed by the oracle, ``n`` a round.
MODEL_FREE = ("no_model", "rss", "substitution")
#: What counts as a hit: stable, unique and novel, or in the campaign's window.
TARGETS = ("sun", "window")
#: The arms each target runs unless ``arms`` says otherwise.
DEFAULT_ARMS = {"sun": ("loop", "random", "rss", "substitution"), "window": ("loop", "random", "no_model")}
#: The S.U.N. target's window for the campaign arms' screen and acquisition: predicted E_hull at
#: most this (eV/atom, the metastable bound; the filter widens it by ``filters.window_tolerance``).
SUN_STEER_MAX = 0.1


def arm_configs(
    base: CampaignConfig, rounds: int, *, suffix: str = "", target: str = "window"
) -> dict[str, CampaignConfig]:
    """The ``loop`` and ``random`` arm configs derived from ``base`` (surrogate oracle, no UIP screen).

    Campaigns are named ``<base>-bench-<arm><suffix>``. With ``target="sun"`` both aim at an
    energy above the CHGNet hull of at most :data:`SUN_STEER_MAX` instead of ``base``'s window.
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
    if target == "sun":
        common["targets"] = [{"property": "energy_above_hull", "min": None, "max": SUN_STEER_MAX}]
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


def no_model_pool(config: CampaignConfig) -> list:
    """Every cubic prototype of ``config``'s material classes decorated with distinct allowed elements.

    One entry per crystal (species orders that give the same crystal count once), in a fixed
    order. The prior set holds the charge-balanced subset of these; the novelty rule removes it.
    """
    from crystaloop.generative.data.prototypes import MATERIAL_CLASS, PROTOTYPES, Prototype

    palette = sorted(config.elements.allow or [])
    seen: set = set()
    pool = []
    for name in PROTOTYPES:
        cls = MATERIAL_CLASS[name]
        if cls not in config.material_classes:
            continue
        for species in itertools.permutations(palette, _ROLES[cls]):
            proto = Prototype(name, species)
            if proto.crystal_key in seen or not config.elements.permits(species):
                continue
            seen.add(proto.crystal_key)
            pool.append(proto)
    return pool


def draw_no_model(
    config: CampaignConfig,
    *,
    n: int,
    rng: np.random.Generator,
    known: Callable[[str], Sequence[Structure]],
    exclude: set | None = None,
    pool: Sequence | None = None,
) -> list[tuple[Any, Structure]]:
    """Up to ``n`` prototypes from :func:`no_model_pool`, in random order, that pass the campaign's rules.

    The rules are the campaign arms' model-free stages: validity (``filters.min_distance``),
    elements, size (``filters.max_nsites``) and novelty against ``known(reduced_formula)``.
    Crystals in ``exclude`` (their ``crystal_key``; earlier rounds' draws) are skipped; the
    drawn keys are added to it. Returns (prototype, structure at the radius-based lattice guess).
    """
    from crystaloop.loop.filters import (
        Candidate,
        ElementStage,
        FilterCascade,
        NoveltyStage,
        SizeStage,
        ValidityStage,
    )

    f = config.filters
    stages: list[Any] = [ValidityStage(f.min_distance), ElementStage(config.elements)]
    if f.max_nsites is not None:
        stages.append(SizeStage(f.max_nsites, f.size_symprec))
    if f.novelty:
        stages.append(NoveltyStage(known))
    cascade = FilterCascade(stages)
    exclude = exclude if exclude is not None else set()
    pool = list(pool) if pool is not None else no_model_pool(config)
    order = [pool[int(i)] for i in rng.permutation(len(pool))]
    order = [p for p in order if p.crystal_key not in exclude]
    out: list[tuple[Any, Structure]] = []
    batch = max(4 * n, 16)
    for start in range(0, len(order), batch):
        protos = order[start : start + batch]
        candidates = [Candidate(i, p.primitive(p.lattice_guess())) for i, p in enumerate(protos)]
        survivors, _ = cascade.run(candidates)
        for c in survivors[: n - len(out)]:
            exclude.add(protos[c.index].crystal_key)
            out.append((protos[c.index], c.structure))
        if len(out) >= n:
            break
    return out


def no_model_round(
    config: CampaignConfig,
    *,
    n: int,
    seed: int,
    known: Callable[[str], Sequence[Structure]],
    exclude: set | None = None,
) -> list[dict[str, Any]]:
    """Draw ``n`` structures (:func:`draw_no_model`) and relax them with the oracle.

    Per structure: formula, prototype, E_f (None for a failed relaxation, with its reason),
    whether the failure was unphysical (``crystaloop.dft.sanity``), whether it hit, and the
    relaxed structure as a dict (for the rediscovery check).
    """
    rng = np.random.default_rng(seed)
    out = []
    for proto, structure in draw_no_model(config, n=n, rng=rng, known=known, exclude=exclude):
        fields = {"prototype": proto.name, "species": list(proto.species)}
        out.append(oracle_relax(config, structure, "benchmark_no_model", fields))
    return out


def oracle_relax(
    config: CampaignConfig, structure: Structure, role: str, fields: dict[str, Any]
) -> dict[str, Any]:
    """Relax ``structure`` with the oracle (the surrogate engine) and describe the outcome.

    ``fields`` (what was drawn) come first; then formula, E_f (None for a failed relaxation, with
    its reason), whether the failure was unphysical (``crystaloop.dft.sanity``), whether it lies in
    ``config``'s windows, and the relaxed structure as a dict.
    """
    from crystaloop.dft.backends import run_local
    from crystaloop.dft.flows import FormationEnergyMaker
    from crystaloop.dft.sanity import PREFIX
    from crystaloop.dft.schemas import FormationEnergyDocument, QETaskDocument

    flow = FormationEnergyMaker(engine="surrogate", metadata={"role": role}).make(structure)
    responses = run_local(flow)
    docs = [r.output for response in responses.values() for r in response.values()]
    fe = next(d for d in docs if isinstance(d, FormationEnergyDocument))
    relaxed = next(
        (d.final_structure for d in docs if isinstance(d, QETaskDocument) and d.task_id == fe.task_id),
        None,
    )
    value = fe.formation_energy_per_atom if fe.state == "successful" else None
    return {
        **fields,
        "formula": structure.composition.reduced_formula,
        "formation_energy_per_atom": value,
        "failed_reason": None if value is not None else "; ".join(fe.reasons)[:300],
        "unphysical": value is None and any(r.startswith(PREFIX) for r in fe.reasons),
        "hit": value is not None and config.in_all_windows({"formation_energy_per_atom": value}),
        "relaxed_structure": relaxed.as_dict() if relaxed is not None and value is not None else None,
    }


def model_free_round(
    arm: str,
    config: CampaignConfig,
    *,
    n: int,
    seed: int,
    known: Callable[[str], Sequence[Structure]],
    state: dict[str, Any],
) -> list[dict[str, Any]]:
    """One round of a model-free arm: draw ``n`` structures and relax them with the oracle.

    ``state`` carries what the arm drew in earlier rounds (never drawn twice) and its pools;
    pass the same dict every round. Returns :func:`oracle_relax`'s records.
    """
    from crystaloop.loop.bench.baselines import draw_rss, draw_substitution, substitution_pool

    if arm == "no_model":
        return no_model_round(config, n=n, seed=seed, known=known, exclude=state.setdefault("drawn", set()))
    rng = np.random.default_rng(seed)
    out = []
    if arm == "rss":
        for info, structure in draw_rss(config, n=n, rng=rng, exclude=state.setdefault("drawn", {})):
            fields = {
                "prototype": f"random {info.material_class}",
                "species": list(info.species),
                "spacegroup": info.spacegroup,
                "formula_units": info.formula_units,
            }
            out.append(oracle_relax(config, structure, "benchmark_rss", fields))
        return out
    if arm == "substitution":
        if "pool" not in state:
            state["pool"] = substitution_pool(config)
        draws = draw_substitution(
            config, n=n, rng=rng, known=known, exclude=state.setdefault("drawn", {}), pool=state["pool"]
        )
        for decoration, structure in draws:
            fields = {
                "prototype": decoration.prototype,
                "species": [new for _, new in decoration.substitution],
                "substitution": [list(pair) for pair in decoration.substitution],
                "probability": decoration.probability,
            }
            out.append(oracle_relax(config, structure, "benchmark_substitution", fields))
        return out
    raise ValueError(f"{arm} is not a model-free arm ({', '.join(MODEL_FREE)})")


def prior_lookup(database, arm_campaign: str) -> Callable[[str], list[Structure]]:
    """Prior structures of a reduced formula: the training data without any campaign's DFT results.

    ``arm_campaign`` names a campaign that has fed nothing back (the no-model arm's name), so that
    only the prior set is returned.
    """
    from crystaloop.loop.generation import training_structures

    cache: dict[str, list[Structure]] = {}

    def lookup(formula: str) -> list[Structure]:
        if formula not in cache:
            cache[formula] = [
                s for s, _ in training_structures(database, formula, only_campaign=arm_campaign)
            ]
        return cache[formula]

    return lookup


def rediscovered(
    hits: Iterable[Structure],
    known: Callable[[str], Sequence[Structure]],
    matcher: StructureMatcher | None = None,
) -> list[bool]:
    """For each relaxed hit, in order: does it match a known structure or an earlier hit of the list?

    ``known(reduced_formula)`` gives the prior structures; equivalence is pymatgen's
    ``StructureMatcher`` (default tolerances, volumes scaled).
    """
    matcher = matcher or StructureMatcher()
    earlier: dict[str, list[Structure]] = {}
    flags = []
    for structure in hits:
        formula = structure.composition.reduced_formula
        seen = [*known(formula), *earlier.get(formula, [])]
        flags.append(matching_index(structure, seen, matcher) is not None)
        earlier.setdefault(formula, []).append(structure)
    return flags


def _relaxed_structure(database, candidate: dict[str, Any]) -> Structure | None:
    """The oracle-relaxed structure of a relaxed candidate (its task, else the cache entry)."""
    task_id = candidate.get("dft_task_id")
    if task_id is None:
        return None
    task = database["dft_tasks"].find_one({"task_id": task_id}, {"output.final_structure": 1})
    final = ((task or {}).get("output") or {}).get("final_structure")
    if final is None:
        hit = database["dft_cache"].find_one({"task_id": task_id}, {"final_structure": 1})
        final = (hit or {}).get("final_structure")
    return Structure.from_dict(final) if final else None


def _mae(pairs: list[tuple[float, float]]) -> float | None:
    pairs = [(p, o) for p, o in pairs if p is not None and o is not None and math.isfinite(p)]
    return float(np.mean([abs(p - o) for p, o in pairs])) if pairs else None


def campaign_rows(
    database, config: CampaignConfig, *, known: Callable[[str], Sequence[Structure]] | None = None
) -> list[dict[str, Any]]:
    """Per round of a finished arm (counted from 1): relaxed, failed, hits, rates, MAEs (eV/atom).

    ``failed`` counts the round's failed relaxations and ``unphysical`` those among them that
    ``crystaloop.dft.sanity`` rejected. With ``known`` (prior structures by reduced formula) the
    hits are split into ``new_hits`` and ``rediscovered`` (:func:`rediscovered`, in round then
    candidate order); without it every hit counts as new.
    """
    from crystaloop.db.campaigns import CampaignStore
    from crystaloop.db.store import CandidateStore
    from crystaloop.dft.sanity import PREFIX

    target = config.targets[0].property
    candidates = CandidateStore(database).collection
    rounds = CampaignStore(database).all_rounds(config.name)
    hit_docs: list[tuple[int, Structure]] = []
    for r in rounds:
        for d in candidates.find(
            {"campaign": config.name, "selected_round": r.round, "state": "relaxed"},
            {"candidate_id": 1, "dft": 1, "dft_task_id": 1},
            sort=[("candidate_id", 1)],
        ):
            structure = _relaxed_structure(database, d) if known is not None else None
            if config.in_all_windows(d.get("dft") or {}) and (known is None or structure is not None):
                hit_docs.append((r.round, structure))
    flags = rediscovered([s for _, s in hit_docs], known) if known is not None else [False] * len(hit_docs)
    rows = []
    for r in rounds:
        retrain = r.steps.get("retrain")
        hooks = (retrain.outputs.get("hooks") if retrain else None) or []
        finetune = next((h for h in hooks if h["name"] == "cgcnn_finetune" and h["status"] == "done"), None)
        relaxed = list(
            candidates.find(
                {"campaign": config.name, "selected_round": r.round, "state": "relaxed"},
                {"predicted": 1, "dft": 1},
            )
        )
        pairs = [
            ((d.get("predicted") or {}).get(target, {}).get("mean"), (d.get("dft") or {}).get(target))
            for d in relaxed
        ]
        failures = [
            ((d.get("state_history") or [{}])[-1].get("reason") or "")
            for d in candidates.find(
                {"campaign": config.name, "selected_round": r.round, "state": "failed"}, {"state_history": 1}
            )
        ]
        mine = [flag for (number, _), flag in zip(hit_docs, flags, strict=True) if number == r.round]
        hits = int(r.metrics.get("hits") or 0)
        rows.append(
            {
                "round": r.round + 1,
                "shortlisted": int(r.metrics.get("shortlisted") or 0),
                "relaxed": int(r.metrics.get("relaxed") or 0),
                "failed": len(failures),
                "unphysical": sum(f"{PREFIX}:" in reason for reason in failures),
                "hits": hits,
                "rediscovered": sum(mine),
                "new_hits": hits - sum(mine),
                "mae_screening": _mae(pairs),
                "mae_before_finetune": finetune["metrics"]["mae_before"].get(target) if finetune else None,
                # The ensemble's std (eV/atom) at selection and the outcome, for std_terciles.
                "std_and_hit": [
                    [
                        (d.get("predicted") or {}).get(target, {}).get("std"),
                        config.in_all_windows(d.get("dft") or {}),
                    ]
                    for d in relaxed
                ],
            }
        )
    return with_rates(rows)


def std_terciles(pairs: Sequence[tuple[float | None, bool]]) -> dict[str, Any] | None:
    """Hit rate in each tercile of the ensemble's std at selection; None under three pairs with a std.

    ``pairs`` are (std in eV/atom, hit) of relaxed candidates. Terciles split at the 1/3 and
    2/3 quantiles of the std (numpy's default interpolation); a std on an edge goes to the lower one.
    """
    known = [(float(std), bool(hit)) for std, hit in pairs if std is not None and math.isfinite(std)]
    if len(known) < 3:
        return None
    stds = np.array([std for std, _ in known])
    edges = [float(np.quantile(stds, 1 / 3)), float(np.quantile(stds, 2 / 3))]
    bins = np.digitize(stds, edges, right=True)
    out = []
    for b in range(3):
        hits = [hit for (_, hit), k in zip(known, bins, strict=True) if k == b]
        out.append({"n": len(hits), "hits": sum(hits), "hit_rate": sum(hits) / len(hits) if hits else None})
    return {"edges_ev_per_atom": edges, "terciles": out}


def no_model_rows(rounds: Sequence[list[dict[str, Any]]], known: Callable[[str], Sequence[Structure]]):
    """Per-round rows of the no-model arm from :func:`no_model_round`'s lists, rediscoveries included."""
    hits = [
        (number, Structure.from_dict(p["relaxed_structure"]))
        for number, picked in enumerate(rounds)
        for p in picked
        if p["hit"] and p.get("relaxed_structure")
    ]
    flags = rediscovered([s for _, s in hits], known)
    rows = []
    for number, picked in enumerate(rounds):
        again = sum(flag for (k, _), flag in zip(hits, flags, strict=True) if k == number)
        n_hits = sum(p["hit"] for p in picked)
        rows.append(
            {
                "round": number + 1,
                "shortlisted": None,
                "drawn": len(picked),
                "relaxed": sum(p["formation_energy_per_atom"] is not None for p in picked),
                "failed": sum(p["formation_energy_per_atom"] is None for p in picked),
                "unphysical": sum(bool(p.get("unphysical")) for p in picked),
                "hits": n_hits,
                "rediscovered": again,
                "new_hits": n_hits - again,
                "mae_screening": None,
                "mae_before_finetune": None,
                "structures": picked,
            }
        )
    return with_rates(rows)


def with_rates(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add each round's hit rate and the cumulative hits, new hits, relaxations and rates to ``rows``.

    Rates are per relaxation that returned a result (failed relaxations are not in the
    denominator); a row without ``new_hits`` counts every hit as new.
    """
    cumulative = new_total = relaxed_total = 0
    for row in rows:
        hits, relaxed = row["hits"], row["relaxed"]
        cumulative += hits
        new_total += row.get("new_hits", hits)
        relaxed_total += relaxed
        row["hit_rate"] = hits / relaxed if relaxed else None
        row["cumulative_hits"] = cumulative
        row["cumulative_new_hits"] = new_total
        row["cumulative_relaxed"] = relaxed_total
        row["cumulative_hit_rate"] = cumulative / relaxed_total if relaxed_total else None
        row["cumulative_new_hit_rate"] = new_total / relaxed_total if relaxed_total else None
    return rows


def sun_classify(records: Sequence[dict[str, Any]], hull: Any = None) -> list[dict[str, Any] | None]:
    """The S.U.N. verdict of each of an arm's relaxations, in the order the arm ran them.

    ``records`` give ``formula``, ``formation_energy_per_atom`` (eV/atom; None for a failed
    relaxation) and ``structure`` (the relaxed :class:`Structure`). Each result is placed on
    ``hull`` (a :class:`~crystaloop.dft.hull.FormationHull`; default: the CHGNet hull of the prior
    set) as it stands before it, then joins it, so that the hull holds the prior set plus
    everything the arm relaxed so far; the hull is pymatgen's (:func:`crystaloop.loop.stability.stability_of`).
    Uniqueness and prototype novelty are :func:`crystaloop.loop.stability.sun_flags`'s. Returns,
    per record, None for a failed relaxation, else ``energy_above_hull`` and the flags
    ``stable`` (E_hull <= 0), ``metastable``, ``unique``, ``novel`` and ``sun``.
    """
    from crystaloop.dft.hull import FormationHull, HullPhase
    from crystaloop.loop.stability import FORMATION_ENERGY, prior_phases, stability_of, sun_flags

    if hull is None:
        labeller, phases = prior_phases()
        hull = FormationHull(labeller, phases)
    placed: list[tuple[int, float | None]] = []
    for i, record in enumerate(records):
        value = record.get(FORMATION_ENERGY)
        if value is None:
            continue
        formula = Composition(record["formula"]).reduced_formula
        stability = stability_of(hull, formula, {FORMATION_ENERGY: value})
        if stability is not None:
            hull.add(HullPhase(formula, float(value), str(record.get("id", f"relaxation {i}"))))
        if record.get("structure") is not None:
            placed.append((i, None if stability is None else stability.energy_above_hull))
    flags = sun_flags([records[i]["structure"] for i, _ in placed], [e for _, e in placed])
    out: list[dict[str, Any] | None] = [None] * len(records)
    for (i, e_hull), flag in zip(placed, flags, strict=True):
        out[i] = {
            "energy_above_hull": e_hull,
            "stable": flag.stable,
            "metastable": flag.metastable,
            "unique": flag.unique,
            "novel": flag.novel,
            "sun": flag.sun,
        }
    return out


def sun_rows(rounds: Sequence[Sequence[dict[str, Any]]], hull: Any = None) -> list[dict[str, Any]]:
    """Per-round S.U.N. counts of one arm from its records per round (as :func:`sun_classify` takes them,
    plus ``unphysical`` for a failed one), in the order the arm ran them.

    An oracle call is a relaxation started, failed ones included. ``hits`` are the S.U.N. hits
    (all new: novelty is part of the target); ``sun_per_100_calls`` and its cumulative twin are
    the benchmark's rates. Each record gets its verdict as ``sun`` (None if it failed).
    """
    verdicts = iter(sun_classify([r for records in rounds for r in records], hull))
    rows = []
    calls_total = hits_total = 0
    for number, records in enumerate(rounds):
        counts = dict.fromkeys(("stable", "metastable", "unique", "novel", "sun"), 0)
        hits = []
        for record in records:
            verdict = record["sun"] = next(verdicts)
            for key in counts:
                counts[key] += bool(verdict and verdict[key])
            if verdict and verdict["sun"]:
                hits.append(record["formula"])
        failed = sum(r.get("formation_energy_per_atom") is None for r in records)
        calls_total += len(records)
        hits_total += counts["sun"]
        rows.append(
            {
                "round": number + 1,
                "oracle_calls": len(records),
                "relaxed": len(records) - failed,
                "failed": failed,
                "unphysical": sum(bool(r.get("unphysical")) for r in records),
                **{key: counts[key] for key in ("stable", "metastable", "unique", "novel")},
                "hits": counts["sun"],
                "new_hits": counts["sun"],
                "rediscovered": 0,
                "sun_formulas": hits,
                "sun_per_100_calls": 100 * counts["sun"] / len(records) if records else None,
                "cumulative_oracle_calls": calls_total,
                "cumulative_sun_per_100_calls": 100 * hits_total / calls_total if calls_total else None,
            }
        )
    return with_rates(rows)


def campaign_sun_rows(database, config: CampaignConfig) -> list[dict[str, Any]]:
    """:func:`campaign_rows` of a finished campaign arm with the S.U.N. counts (:func:`sun_rows`).

    Its relaxed and failed candidates per round, in candidate order, are the records; the
    campaign's own window hits (its steering window) stay as ``window_hits``.
    """
    from crystaloop.db.campaigns import CampaignStore
    from crystaloop.db.store import CandidateStore
    from crystaloop.dft.sanity import PREFIX

    rows = campaign_rows(database, config)
    candidates = CandidateStore(database).collection
    per_round = []
    for r in CampaignStore(database).all_rounds(config.name):
        records = []
        for d in candidates.find(
            {"campaign": config.name, "selected_round": r.round, "state": {"$in": ["relaxed", "failed"]}},
            {
                "candidate_id": 1,
                "reduced_formula": 1,
                "state": 1,
                "dft": 1,
                "dft_task_id": 1,
                "state_history": 1,
            },
            sort=[("candidate_id", 1)],
        ):
            value = (d.get("dft") or {}).get("formation_energy_per_atom") if d["state"] == "relaxed" else None
            reason = (
                ((d.get("state_history") or [{}])[-1].get("reason") or "") if d["state"] == "failed" else ""
            )
            records.append(
                {
                    "id": d["candidate_id"],
                    "formula": d["reduced_formula"],
                    "formation_energy_per_atom": value,
                    "structure": _relaxed_structure(database, d) if value is not None else None,
                    "unphysical": f"{PREFIX}:" in reason,
                }
            )
        per_round.append(records)
    out = []
    for row, sun in zip(rows, sun_rows(per_round), strict=True):
        out.append({**row, "window_hits": row["hits"], **sun})
    return out


def model_free_sun_rows(rounds: Sequence[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """:func:`sun_rows` of a model-free arm from :func:`model_free_round`'s lists; each round's
    records (with their verdicts) stay in the row as ``structures``."""
    records = [
        [
            {
                **p,
                "structure": Structure.from_dict(p["relaxed_structure"])
                if p.get("relaxed_structure")
                else None,
            }
            for p in picked
        ]
        for picked in rounds
    ]
    rows = sun_rows(records)
    for row, picked, done in zip(rows, rounds, records, strict=True):
        for p, record in zip(picked, done, strict=True):
            p["sun"] = record["sun"]
        row["drawn"] = len(picked)
        row["shortlisted"] = None
        row["mae_screening"] = row["mae_before_finetune"] = None
        row["structures"] = picked
    return rows


@cache
def code_version() -> dict[str, Any]:
    """The code that ran: git commit (and whether tracked files differed from it), else the package version.

    Read once per process, when the first run starts: edits made while it runs do not change it.
    """
    from importlib.metadata import PackageNotFoundError, version

    root = Path(__file__).resolve().parents[2]
    out: dict[str, Any] = {"git_commit": None, "git_dirty": None}
    try:
        out["package_version"] = version("crystaloop")
    except PackageNotFoundError:
        out["package_version"] = None
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):  # not a checkout: the package version stands
        return out
    out["git_commit"], out["git_dirty"] = commit, bool(status.strip())
    return out


def oracle_description() -> dict[str, Any]:
    """The oracle, the prior labels' labeller, and :data:`CIRCULARITY`."""
    import chgnet

    from crystaloop.generative.data.dataset import SHIPPED_PATH, read_prior

    return {
        "engine": "surrogate",
        "oracle": f"CHGNet 0.3.0 weights (chgnet package {chgnet.__version__})",
        "prior_labeller": read_prior(SHIPPED_PATH).get("labeller"),
        "circularity": CIRCULARITY,
    }


def run_benchmark(
    base: CampaignConfig,
    *,
    database,
    rounds: int = 5,
    no_model_per_round: int | None = None,
    log: Callable[[str], None] | None = None,
    arms: Sequence[str] | None = None,
    suffix: str = "",
    target: str = "window",
) -> dict[str, Any]:
    """Run the arms (by default :data:`DEFAULT_ARMS` of ``target``) and return per-round rows and a summary.

    ``target`` is ``window`` (hits in the campaign's window) or ``sun`` (stable, unique and novel
    hits per 100 oracle calls; module docstring). The model-free arms relax
    ``no_model_per_round`` structures a round, by default the campaign arms' DFT budget
    (``budget.dft_per_round``); with another number their rates carry Wilson intervals in
    :func:`pool_seeds` and :func:`summarise` as every rate does. ``suffix`` is appended to the
    arms' campaign names (several seeds in one database).
    """
    from crystaloop.errors import UserError
    from crystaloop.loop.campaign import Campaign

    if target not in TARGETS:
        raise UserError(f"unknown benchmark target {target!r}; choose from {', '.join(TARGETS)}")
    arms = tuple(arms) if arms is not None else DEFAULT_ARMS[target]
    log = log or (lambda line: None)
    n_model_free = no_model_per_round or base.budget.dft_per_round
    configs = arm_configs(base, rounds, suffix=suffix, target=target)
    window = {t.property: [t.min, t.max] for t in next(iter(configs.values())).targets}
    result: dict[str, Any] = {
        "target": target,
        "rounds": rounds,
        "seed": base.seed,
        "code_version": code_version(),
        "oracle": oracle_description(),
        "dft_per_round": base.budget.dft_per_round,
        "candidates_per_round": base.budget.candidates_per_round,
        "no_model_per_round": n_model_free,
        "window": window,
        "palette": base.elements.allow,
        "material_classes": list(base.material_classes),
        "arms": {},
    }
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise UserError(f"unknown benchmark arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    free = [a for a in MODEL_FREE if a in arms]
    if free and not base.elements.allow:
        # The model-free arms draw from the palette: without one they would relax nothing.
        raise UserError(
            f"the {'no-model arm' if free == ['no_model'] else 'model-free arms'} draws from elements.allow, "
            "which this config leaves open; list the palette's elements (as configs/bench-campaign.yaml "
            f"does) or leave {', '.join(free)} out of --arms"
        )
    # Prior structures only: the no-model arm's campaign name has no DFT results in the training data.
    known = prior_lookup(database, f"{base.name}-bench-no_model{suffix}")
    for arm, config in configs.items():
        if arm not in arms:
            continue
        start = time.perf_counter()
        log(f"arm {arm}: campaign {config.name}")
        Campaign(config, database=database, log=lambda line, a=arm: log(f"  [{a}] {line}")).run()
        if target == "sun":
            rows = campaign_sun_rows(database, config)
        else:
            rows = campaign_rows(database, config, known=known)
        result["arms"][arm] = {
            "campaign": config.name,
            "acquisition": config.acquisition.strategy,
            "retrain": config.retrain.cgcnn,
            "rows": rows,
            "seconds": time.perf_counter() - start,
        }
    for arm in free:
        start = time.perf_counter()
        state: dict[str, Any] = {}  # what the arm drew before: never drawn twice
        picked = []
        for r in range(rounds):
            log(f"arm {arm}: round {r}")
            picked.append(
                model_free_round(
                    arm, base, n=n_model_free, seed=base.seed * 1000 + r, known=known, state=state
                )
            )
            last = picked[-1]
            failed = sum(p["formation_energy_per_atom"] is None for p in last)
            log(f"  [{arm}] drew {len(last)}, failed {failed}, window hits {sum(p['hit'] for p in last)}")
        rows = model_free_sun_rows(picked) if target == "sun" else no_model_rows(picked, known)
        result["arms"][arm] = {"campaign": None, "rows": rows, "seconds": time.perf_counter() - start}
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
    """Hit-rate ratios at the target round (that round's, cumulative, cumulative new hits), MAE trend, targets met.

    Rounds are counted from 1 here (round 3 is the third round, index 2). A ratio against an
    arm with no hits is infinite and counts as met only when the loop has hits. A target
    against an arm that did not run (``--arms``) is not measured: its ``_met`` is None.
    Cumulative rates carry Wilson intervals (:func:`wilson_interval`). A S.U.N. result is
    summarised by :func:`summarise_sun`.
    """
    if result.get("target") == "sun":
        return summarise_sun(result)
    k = CAMPAIGN["round"] - 1

    def at(arm: str, key: str, index: int) -> float | None:
        rows = result["arms"].get(arm, {}).get("rows", [])
        return rows[index][key] if index < len(rows) else None

    out: dict[str, Any] = {"round": CAMPAIGN["round"], "anchors": ANCHORS}
    scopes = (
        ("round", "hit_rate"),
        ("cumulative", "cumulative_hit_rate"),
        ("cumulative_new", "cumulative_new_hit_rate"),
    )
    for scope, key in scopes:
        loop = at("loop", key, k)
        for other, goal in (("random", CAMPAIGN["vs_random"]), ("no_model", CAMPAIGN["vs_no_model"])):
            ratio = _ratio(loop, at(other, key, k))
            out[f"{scope}_ratio_vs_{other}"] = ratio
            ran = "loop" in result["arms"] and other in result["arms"]
            out[f"{scope}_target_vs_{other}_met"] = (ratio is not None and ratio >= goal) if ran else None
        out[f"{scope}_hit_rates"] = {arm: at(arm, key, k) for arm in ("loop", "random", "no_model")}
    # One seed has no spread over seeds to bootstrap: its rates carry Wilson intervals.
    for scope, hits_key in (("cumulative", "cumulative_hits"), ("cumulative_new", "cumulative_new_hits")):
        out[f"{scope}_hit_rate_intervals"] = {
            arm: wilson_interval(hits, n)
            if (hits := at(arm, hits_key, k)) is not None and n is not None
            else None
            for arm in ("loop", "random", "no_model")
            for n in [at(arm, "cumulative_relaxed", k)]
        }
    maes = [row["mae_screening"] for row in result["arms"].get("loop", {}).get("rows", [])]
    first, last = (maes[0], maes[-1]) if len(maes) >= 2 else (None, None)
    out["mae_first_round"], out["mae_last_round"] = first, last
    out["mae_falls"] = first is not None and last is not None and last < first
    return out


def goals(target: str) -> tuple[int, dict[str, float]]:
    """The round a target is judged at (counted from 1) and the loop's ratio target against each arm."""
    if target == "sun":
        return SUN_CAMPAIGN["round"], {
            arm: SUN_CAMPAIGN[f"vs_{arm}"] for arm in ("rss", "substitution", "random")
        }
    return CAMPAIGN["round"], {"random": CAMPAIGN["vs_random"], "no_model": CAMPAIGN["vs_no_model"]}


def _per_100(hits: int, calls: int) -> tuple[float | None, tuple[float, float] | None]:
    """Hits per 100 oracle calls and its Wilson interval (both per 100)."""
    bounds = wilson_interval(hits, calls)
    return (100 * hits / calls if calls else None), (
        None if bounds is None else (100 * bounds[0], 100 * bounds[1])
    )


def summarise_sun(result: dict[str, Any]) -> dict[str, Any]:
    """One seed's S.U.N. hits per 100 oracle calls through the target round, with Wilson intervals,
    and the loop's ratio to every other arm against :data:`SUN_CAMPAIGN`.

    A run shorter than the target round is summarised through its last round and its targets
    are not measured (``_met`` None), as is a target against an arm that did not run.
    """
    goal_round, goal = goals("sun")
    ran = max((len(d["rows"]) for d in result["arms"].values()), default=0)
    k = min(goal_round, ran)
    out: dict[str, Any] = {
        "target": "sun",
        "round": k,
        "goal_round": goal_round,
        "anchors": SUN_ANCHORS,
        "sun_hits": {},
        "oracle_calls": {},
        "sun_per_100_calls": {},
        "sun_per_100_calls_intervals": {},
    }
    for arm, data in result["arms"].items():
        rows = data["rows"][:k]
        hits, calls = sum(r["hits"] for r in rows), sum(r["oracle_calls"] for r in rows)
        out["sun_hits"][arm], out["oracle_calls"][arm] = hits, calls
        out["sun_per_100_calls"][arm], out["sun_per_100_calls_intervals"][arm] = _per_100(hits, calls)
    for other, target in goal.items():
        ran_both = "loop" in result["arms"] and other in result["arms"]
        ratio = _ratio(out["sun_per_100_calls"].get("loop"), out["sun_per_100_calls"].get(other))
        out[f"ratio_vs_{other}"] = ratio if ran_both else None
        out[f"target_vs_{other}_met"] = (
            (ratio is not None and ratio >= target) if ran_both and k >= goal_round else None
        )
    return out


def _code_version_of(result: dict[str, Any]) -> Any:
    """A seed's code version, or one per arm where its arms were run by different code."""
    per_arm = result.get("arm_code_versions") or {}
    distinct = {repr(v) for v in per_arm.values()}
    return per_arm if len(distinct) > 1 else result.get("code_version")


def _pooled_rate(counts: Sequence[tuple[int, int]]) -> float | None:
    hits, n = sum(h for h, _ in counts), sum(n for _, n in counts)
    return hits / n if n else None


def wilson_interval(hits: int, n: int, level: float = CONFIDENCE) -> tuple[float, float] | None:
    """The Wilson score interval of the rate ``hits / n`` at ``level``; None when ``n`` is 0."""
    from scipy.stats import norm

    if n == 0:
        return None
    z = float(norm.ppf(0.5 + level / 2))
    p = hits / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # At 0 or n hits a bound is exactly 0 or 1; computed, it would carry rounding noise.
    return (0.0 if hits == 0 else centre - half), (1.0 if hits == n else centre + half)


def bootstrap_ratio(
    a: Sequence[tuple[int, int]],
    b: Sequence[tuple[int, int]],
    *,
    level: float = CONFIDENCE,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval over seeds of the pooled rate ratio of arm ``a`` to arm ``b``.

    ``a[i]`` and ``b[i]`` are seed i's (hits, relaxed) of the two arms. Each resample draws the
    seeds with replacement and pools them as :func:`pool_seeds` does; a resample in which ``b``
    has no hits gives an infinite ratio (``a`` has hits) or is dropped (neither has).
    None with fewer than two seeds.
    """
    if len(a) != len(b):
        raise ValueError("both arms need the same seeds")
    if len(a) < 2:
        return None
    ha, na = (np.array(col, dtype=float) for col in zip(*a, strict=True))
    hb, nb = (np.array(col, dtype=float) for col in zip(*b, strict=True))
    idx = np.random.default_rng(seed).integers(0, len(a), size=(resamples, len(a)))
    with np.errstate(divide="ignore", invalid="ignore"):
        rate_a = ha[idx].sum(1) / na[idx].sum(1)
        rate_b = hb[idx].sum(1) / nb[idx].sum(1)
        ratios = rate_a / rate_b
    ratios = np.sort(ratios[~np.isnan(ratios)])
    if len(ratios) == 0:
        return None
    tail = (1 - level) / 2
    lo = ratios[int(math.floor(tail * (len(ratios) - 1)))]
    hi = ratios[int(math.ceil((1 - tail) * (len(ratios) - 1)))]
    return float(lo), float(hi)


#: Settings every pooled run must share (a run of another window or budget measures something else).
SHARED_SETTINGS = (
    "window",
    "palette",
    "material_classes",
    "dft_per_round",
    "candidates_per_round",
    "no_model_per_round",
)


def merge_runs(
    documents: Sequence[tuple[str, dict[str, Any]] | tuple[str, dict[str, Any], Sequence[str] | None]],
) -> dict[int, dict[str, Any]]:
    """Per-seed results of several ``bench campaign --output`` files, for :func:`pool_seeds`.

    ``documents`` are (name, parsed JSON) pairs, or (name, JSON, arms) to take only those arms
    of it: a multi-seed output (``seeds``) or a one-seed result (``seed``). Seeds (or arms of
    one seed) run in parallel processes pool exactly as one ``--seeds`` run does; each arm
    keeps the code version of the run it came from (``arm_code_versions``).

    Raises
    ------
    UserError
        If a document is neither, gives an arm of a seed twice, or differs from the first in
        :data:`SHARED_SETTINGS`.
    """
    from crystaloop.errors import UserError

    merged: dict[int, dict[str, Any]] = {}
    sources: dict[tuple[int, str], str] = {}
    first_name = None
    for entry in documents:
        name, doc, wanted = (*entry, None)[:3]
        if isinstance(doc.get("seeds"), dict):
            runs = {int(seed): result for seed, result in doc["seeds"].items()}
        elif isinstance(doc.get("seed"), int) and isinstance(doc.get("arms"), dict):
            runs = {doc["seed"]: doc}
        else:
            raise UserError(
                f"{name} is not a bench campaign result with its seed (written by --output since "
                "this option exists); rerun the benchmark to pool it"
            )
        for seed, result in runs.items():
            first = next(iter(merged.values()), result)
            differ = [key for key in SHARED_SETTINGS if result.get(key) != first.get(key)]
            if differ:
                raise UserError(
                    f"{name} (seed {seed}) ran with another {', '.join(differ)} than {first_name}; "
                    "pool only runs of one benchmark config"
                )
            first_name = first_name or name
            arms = {a: d for a, d in result["arms"].items() if wanted is None or a in wanted}
            target = merged.setdefault(seed, {**result, "arms": {}, "arm_code_versions": {}})
            for arm, data in arms.items():
                if (seed, arm) in sources:
                    raise UserError(
                        f"seed {seed}'s {arm} arm is in both {sources[seed, arm]} and {name}; pool each once"
                    )
                sources[seed, arm] = name
                target["arms"][arm] = data
                target["arm_code_versions"][arm] = result.get("code_version")
    return merged


#: How :func:`pool_seeds` computes its intervals (written into the pooled result).
INTERVALS = (
    f"rates: {CONFIDENCE:.0%} Wilson score intervals on the pooled counts (relaxations as independent "
    f"trials); ratios: {CONFIDENCE:.0%} percentile bootstrap over seeds ({BOOTSTRAP_RESAMPLES} resamples "
    "of the seeds with replacement, each pooled by relaxation; with few seeds it is too narrow)"
)


def pool_seeds(results: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Hits and relaxations through the target round summed over seeds, per arm; ratios with intervals.

    ``results`` maps a seed to its :func:`run_benchmark` result. Rates pooled this way weigh
    every relaxation alike; ``per_seed_hit_rates`` keeps each seed's cumulative rates for the
    spread. Every pooled rate has a Wilson interval and every ratio between the loop and another
    arm a bootstrap interval over seeds (:data:`INTERVALS`), for all hits and for new hits
    (not rediscovered), and per DFT run started (``per_run``: failed relaxations in the
    denominator, the rate of an equal DFT budget). An arm's rate pools every seed it ran on; a ratio pools only the seeds
    both arms ran on (``ratio_vs_<arm>_seeds``). ``code_versions`` records each seed's code.
    The target round and the arms compared are the result's target's (:func:`goals`); a S.U.N.
    result's hits are S.U.N. hits, its oracle calls are relaxed plus failed, and
    :func:`pool_sun` adds the per-round rates, ratios and ``sun_targets``.
    """
    target = next((r.get("target") for r in results.values() if r.get("target")), "window")
    goal_round, goal = goals(target)
    ran = max((len(d["rows"]) for r in results.values() for d in r["arms"].values()), default=0)
    k = min(goal_round, ran)  # a shorter run is pooled through its last round
    keys = ("hits", "new_hits", "rediscovered", "relaxed", "failed", "unphysical")
    totals: dict[str, dict[str, int]] = {key: {} for key in keys}
    per_seed_counts: dict[str, dict[int, dict[str, int]]] = {}
    per_seed: dict[str, dict[str, float | None]] = {}
    for seed, result in sorted(results.items()):
        per_seed[str(seed)] = {}
        for arm, data in result["arms"].items():
            rows = data["rows"][:k]
            counts = {
                key: sum(r.get(key, r["hits"] if key == "new_hits" else 0) for r in rows) for key in keys
            }
            per_seed_counts.setdefault(arm, {})[seed] = counts
            for key in keys:
                totals[key][arm] = totals[key].get(arm, 0) + counts[key]
            n = counts["relaxed"]
            per_seed[str(seed)][arm] = counts["hits"] / n if n else None
    relaxed = totals["relaxed"]
    out: dict[str, Any] = {
        "target": target,
        "round": k,
        "seeds": sorted(results),
        "code_versions": {str(seed): _code_version_of(r) for seed, r in sorted(results.items())},
        "oracle": next((r["oracle"] for r in results.values() if r.get("oracle")), None),
        **totals,
        "hit_rates": {arm: h / relaxed[arm] if relaxed[arm] else None for arm, h in totals["hits"].items()},
        "hit_rate_intervals": {arm: wilson_interval(h, relaxed[arm]) for arm, h in totals["hits"].items()},
        "new_hit_rates": {
            arm: h / relaxed[arm] if relaxed[arm] else None for arm, h in totals["new_hits"].items()
        },
        "new_hit_rate_intervals": {
            arm: wilson_interval(h, relaxed[arm]) for arm, h in totals["new_hits"].items()
        },
        # Per DFT run started, failures included: the rate of an equal DFT budget.
        "hit_rates_per_run": {
            arm: _pooled_rate([(h, relaxed[arm] + totals["failed"][arm])])
            for arm, h in totals["hits"].items()
        },
        "hit_rate_per_run_intervals": {
            arm: wilson_interval(h, relaxed[arm] + totals["failed"][arm]) for arm, h in totals["hits"].items()
        },
        "per_seed_hit_rates": per_seed,
        "intervals": INTERVALS,
    }
    # Both campaign arms' relaxations through the target round, as the docs quote them.
    out["hit_rate_by_std_tercile"] = std_terciles(
        [
            pair
            for result in results.values()
            for arm in ("loop", "random")
            for row in result["arms"].get(arm, {}).get("rows", [])[:k]
            for pair in row.get("std_and_hit", [])
        ]
    )
    for other, factor in goal.items():
        if "loop" not in relaxed or other not in relaxed:
            continue
        # A ratio compares the arms on the seeds both ran (an arm may have run on more seeds).
        seeds = sorted(set(per_seed_counts["loop"]) & set(per_seed_counts[other]))
        out[f"ratio_vs_{other}_seeds"] = seeds
        for prefix, key, runs in (
            ("", "hits", False),
            ("new_hit_", "new_hits", False),
            ("per_run_", "hits", True),
        ):
            a, b = (
                [(c[s][key], c[s]["relaxed"] + (c[s]["failed"] if runs else 0)) for s in seeds]
                for c in (per_seed_counts["loop"], per_seed_counts[other])
            )
            rate_a, rate_b = (_pooled_rate(counts) for counts in (a, b))
            out[f"{prefix}ratio_vs_{other}"] = _ratio(rate_a, rate_b)
            out[f"{prefix}ratio_vs_{other}_interval"] = bootstrap_ratio(a, b)
        if target != "sun":  # S.U.N. targets are per oracle call: pool_sun's sun_targets
            out[f"target_vs_{other}_met"] = (
                out[f"ratio_vs_{other}"] is not None and out[f"ratio_vs_{other}"] >= factor
            )
    if target == "sun":
        out.update(pool_sun(results, k, goal_round))
    return out


def pool_sun(results: dict[int, dict[str, Any]], k: int, goal_round: int) -> dict[str, Any]:
    """The S.U.N. block of :func:`pool_seeds`: per arm and round, hits per 100 oracle calls pooled
    over seeds with Wilson intervals, that round's and cumulative; the loop's cumulative ratio
    to each other arm after every round, with a bootstrap interval over the seeds both ran; and
    whether each target of :data:`SUN_CAMPAIGN` is met (measured only through the target round).
    """
    _, goal = goals("sun")
    arms = sorted({arm for r in results.values() for arm in r["arms"]}, key=ARMS.index)
    # counts[arm][seed] = [(hits, oracle calls) per round]
    counts = {
        arm: {
            seed: [(row["hits"], row["oracle_calls"]) for row in r["arms"][arm]["rows"][:k]]
            for seed, r in sorted(results.items())
            if arm in r["arms"]
        }
        for arm in arms
    }
    per_round = []
    for number in range(1, k + 1):
        entry: dict[str, Any] = {"round": number, "arms": {}, "cumulative": {}, "ratios": {}}
        for arm in arms:
            rows = [c[:number] for c in counts[arm].values() if len(c) >= number]
            for scope, picked in (("arms", [c[-1:] for c in rows]), ("cumulative", rows)):
                hits = sum(h for c in picked for h, _ in c)
                calls = sum(n for c in picked for _, n in c)
                rate, bounds = _per_100(hits, calls)
                entry[scope][arm] = {
                    "sun_hits": hits,
                    "oracle_calls": calls,
                    "per_100": rate,
                    "interval": bounds,
                }
        for other in goal:
            if "loop" not in counts or other not in counts:
                continue
            seeds = sorted(
                s
                for s in set(counts["loop"]) & set(counts[other])
                if len(counts["loop"][s]) >= number and len(counts[other][s]) >= number
            )
            a, b = (
                [
                    (sum(h for h, _ in counts[arm][s][:number]), sum(n for _, n in counts[arm][s][:number]))
                    for s in seeds
                ]
                for arm in ("loop", other)
            )
            entry["ratios"][other] = {
                "ratio": _ratio(_pooled_rate(a), _pooled_rate(b)),
                "interval": bootstrap_ratio(a, b),
                "seeds": seeds,
            }
        per_round.append(entry)
    last = per_round[-1] if per_round else {"cumulative": {}, "ratios": {}}
    out: dict[str, Any] = {
        "goal_round": goal_round,
        "per_round": per_round,
        "sun_per_100_calls": {arm: v["per_100"] for arm, v in last["cumulative"].items()},
        "sun_per_100_calls_intervals": {arm: v["interval"] for arm, v in last["cumulative"].items()},
        "sun_targets": {},
    }
    for other, factor in goal.items():
        ratio = last["ratios"].get(other)
        measured = ratio is not None and k >= goal_round
        out["sun_targets"][other] = {
            "goal": factor,
            "ratio": None if ratio is None else ratio["ratio"],
            "interval": None if ratio is None else ratio["interval"],
            "met": (ratio["ratio"] is not None and ratio["ratio"] >= factor) if measured else None,
        }
    return out


def finished_seeds(
    document: dict[str, Any],
    base: CampaignConfig,
    *,
    rounds: int,
    no_model_per_round: int | None,
    arms: Sequence[str] | None,
    target: str = "window",
) -> dict[int, dict[str, Any]]:
    """The seeds of an earlier ``--output`` document that asked the same question as this run.

    A seed counts when its result has the same target, rounds, arms, window, palette, material
    classes and budgets; a document from other settings gives none. :func:`run_seeds` takes
    these as done, so a benchmark stopped after some seeds resumes at the next one (the arms'
    campaigns themselves resume from their last step, as every campaign does).
    """
    stored = document.get("seeds") if isinstance(document.get("seeds"), dict) else None
    results = stored.values() if stored is not None else [document]
    arms = tuple(arms) if arms is not None else DEFAULT_ARMS.get(target, ())
    configs = arm_configs(base, rounds, target=target)
    expected = {
        "target": target,
        "rounds": rounds,
        "window": {t.property: [t.min, t.max] for t in next(iter(configs.values())).targets},
        "palette": base.elements.allow,
        "material_classes": list(base.material_classes),
        "dft_per_round": base.budget.dft_per_round,
        "candidates_per_round": base.budget.candidates_per_round,
        "no_model_per_round": no_model_per_round or base.budget.dft_per_round,
    }
    done = {}
    for result in results:
        if not isinstance(result, dict) or not isinstance(result.get("seed"), int):
            continue
        same = all(result.get(key, "window" if key == "target" else None) == value for key, value in expected.items())
        if same and set(result.get("arms", {})) == set(arms):
            done[result["seed"]] = result
    return done


def run_seeds(
    base: CampaignConfig,
    *,
    database,
    seeds: Sequence[int] | None,
    rounds: int,
    no_model_per_round: int | None,
    arms: Sequence[str] | None,
    log: Callable[[str], None],
    write: Callable[[dict[str, Any]], None] | None = None,
    target: str = "window",
    finished: dict[int, dict[str, Any]] | None = None,
) -> tuple[dict[int, dict[str, Any]], dict[str, Any]]:
    """:func:`run_benchmark` for each seed (``None``: the config's), one after another.

    Returns the per-seed results and the document of ``bench campaign --output``: one seed's
    result, or with several seeds ``seeds``, ``pooled`` (:func:`pool_seeds`) and ``complete``.
    ``write(document)`` is called after every seed of several (so that a run stopped early
    leaves the seeds it finished pooled), else once at the end. Seeds in ``finished``
    (:func:`finished_seeds`) are taken from there and not run again.
    """
    several = seeds is not None and len(seeds) > 1
    results: dict[int, dict[str, Any]] = {}
    out: dict[str, Any] = {}
    for seed in seeds or [base.seed]:
        config = base if seeds is None else base.model_copy(update={"seed": seed})
        if finished and seed in finished:
            log(f"seed {seed}: finished in an earlier run, taken from its output")
            results[seed] = finished[seed]
            continue
        if seeds is not None:
            log(f"seed {seed}")
        results[seed] = run_benchmark(
            config,
            database=database,
            rounds=rounds,
            no_model_per_round=no_model_per_round,
            log=log,
            arms=arms,
            suffix=f"-s{seed}" if several else "",
            target=target,
        )
        if several:
            out = {"seeds": {str(k): v for k, v in results.items()}, "pooled": pool_seeds(results)}
            out["complete"] = len(results) == len(seeds)
            if write:
                write(out)
    if not several:
        out = next(iter(results.values()))
        if write and not (finished and out is finished.get(out["seed"])):
            write(out)
    return results, out


def pool_files(specs: Sequence[str]) -> dict[str, Any]:
    """Pool the seeds of earlier ``bench campaign --output`` files (``FILE`` or ``FILE:arm,arm``).

    Raises
    ------
    UserError
        If a file cannot be read as JSON, or :func:`merge_runs` refuses the files.
    """
    import json

    from crystaloop.errors import UserError

    documents = []
    for spec in specs:
        # FILE or FILE:arm,arm (take only those arms of that file).
        name, _, picked = str(spec).partition(":")
        wanted = [a.strip() for a in picked.split(",") if a.strip()] or None
        path = Path(name)
        try:
            documents.append((str(path), json.loads(path.read_text()), wanted))
        except (OSError, ValueError) as exc:
            raise UserError(
                f"cannot read {path} as a bench campaign JSON ({type(exc).__name__}); check the path"
            ) from None
    results = merge_runs(documents)
    return {
        "seeds": {str(k): v for k, v in sorted(results.items())},
        "pooled": pool_seeds(results),
        "complete": True,
        "pooled_from": [str(p) for p in specs],
    }
