"""Benchmarks of candidate generation: throughput per step, and the paper's Table 2.

Both run :func:`crystaloop.loop.generation.generate_candidates` with ``dry_run`` (nothing is
written) and read its per-stage counts and times.

- Throughput: candidates per second through sample -> decode -> segment -> structure ->
  validity, and through the whole cascade, against the paper's 12,000 candidates in 12 h on a
  one-GPU desktop and the target to validity on 2 CPU cores (:mod:`~crystaloop.loop.bench.targets`).
- Table 2 (paper 002): 12 base compounds, 4 per class, drawn with a fixed seed from the training
  data; samples around each at std sqrt(0.5) (the paper's variance 0.5) under the base's decile,
  the stoichiometry filter on and the window "E_f within 20 % of the base's".
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np

from crystaloop.loop.bench.targets import GENERATION_PER_S_TO_VALID, PAPER_CANDIDATES_PER_S, PAPER_TABLE2
from crystaloop.loop.config import CampaignConfig
from crystaloop.loop.generation import EF, GenerationReport, generate_candidates

TO_VALIDITY = ("sample", "decode", "decoded", "valid")


def rates(report: GenerationReport) -> dict[str, Any]:
    """Candidates per second to validity and through the cascade, and the share of time per step."""
    to_valid = sum(report.seconds.get(k, 0.0) for k in TO_VALIDITY)
    working = {k: v for k, v in report.seconds.items() if k != "load"}
    total = sum(working.values())
    counts = {s.stage: s.n_out for s in report.stages}
    return {
        "n": report.n_requested,
        "restrict_elements": report.restrict_elements,
        "decoder_method": report.decoder_method,
        "valid": counts.get("valid", 0),
        "validity_rate": counts.get("valid", 0) / report.n_requested,
        "shortlisted": report.n_shortlisted,
        "seconds_to_valid": to_valid,
        "seconds_total": total,
        "per_s_to_valid": report.n_requested / to_valid if to_valid else math.inf,
        "per_s_full_cascade": report.n_requested / total if total else math.inf,
        "seconds": dict(working),
        "time_share": {k: v / total for k, v in working.items()} if total else {},
        "stages": [s.model_dump() for s in report.stages],
        "rejected_reasons": report.rejected_reasons,
    }


def throughput(
    config: CampaignConfig,
    database,
    *,
    n: int,
    batch_size: int = 64,
    seed: int = 0,
    compare: bool = True,
    uip: bool | None = None,
    workers: int | None = None,
    decoder_method: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Throughput with the decoding-time element restriction, and (``compare``) without it."""
    out = {}
    variants = {"restricted": True, "unrestricted": False} if compare else {"restricted": True}
    for name, restrict in variants.items():
        report = generate_candidates(
            config,
            database=database,
            n=n,
            seed=seed,
            dry_run=True,
            restrict_elements=restrict,
            uip_screen=uip,
            batch_size=batch_size,
            workers=workers,
            decoder_method=decoder_method,
        )
        out[name] = rates(report)
    return out


def training_formulas_by_class(database) -> dict[str, list[str]]:
    """Reduced formulas with a formation-energy label per material class, sorted."""
    from crystaloop.db.training import COLLECTION
    from crystaloop.generative.data.dataset import prior_records

    by_class: dict[str, set[str]] = defaultdict(set)
    coll = database[COLLECTION]
    if coll.estimated_document_count():
        query = {f"labels.{EF}": {"$ne": None}}
        for doc in coll.find(query, {"reduced_formula": 1, "material_class": 1}):
            by_class[doc.get("material_class", "other")].add(doc["reduced_formula"])
    else:
        for record in prior_records():
            if record.labels.get(EF) is not None:
                by_class[record.material_class].add(record.structure.composition.reduced_formula)
    return {k: sorted(v) for k, v in by_class.items()}


def choose_bases(database, *, per_class: int = 4, seed: int = 0) -> list[str]:
    """``per_class`` formulas from each of binary, perovskite, heusler, drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    by_class = training_formulas_by_class(database)
    chosen = []
    for cls in ("binary", "perovskite", "heusler"):
        formulas = by_class.get(cls, [])
        picks = rng.choice(len(formulas), size=min(per_class, len(formulas)), replace=False)
        chosen += [formulas[i] for i in sorted(picks)]
    return chosen


def table2_config(
    base: str, *, restrict_to_base: bool = False, uip: bool = False, vae: str | None = None
) -> CampaignConfig:
    """The Table 2 preset for one base compound (std sqrt(0.5), base decile, E_f within 20 %)."""
    from pymatgen.core import Composition

    elements = {"allow": sorted(el.symbol for el in Composition(base).elements)} if restrict_to_base else {}
    return CampaignConfig.model_validate(
        {
            "name": f"table2-{Composition(base).reduced_formula}",
            "targets": [{"property": EF, "min": -10.0, "max": 5.0}],
            "elements": elements,
            "sampling": {
                "mode": "around_base",
                "base_formulas": [base],
                "std": math.sqrt(0.5),
                "condition_on": "base",
                "restrict_elements": restrict_to_base,
            },
            "filters": {
                "same_stoichiometry_as_base": True,
                "novelty": True,
                "window_tolerance": 0.0,
                "window_relative_to_base": 0.2,
                "uip_screen": uip,
            },
            "dft": {"engine": "surrogate"},
            "models": {"vae": vae},
        }
    )


def table2(
    database,
    *,
    per_base: int = 1000,
    per_class: int = 4,
    seed: int = 0,
    restrict_to_base: bool = False,
    uip: bool = False,
    batch_size: int = 64,
    decoder_method: str | None = None,
    vae: str | None = None,
    progress=None,
) -> dict[str, Any]:
    """Mean count per stage over the bases, scaled to 1000 samples, next to the paper's.

    ``progress`` is called with one line per finished base.
    """
    bases = choose_bases(database, per_class=per_class, seed=seed)
    per_stage: dict[str, list[int]] = defaultdict(list)
    rows = []
    for k, base in enumerate(bases):
        report = generate_candidates(
            table2_config(base, restrict_to_base=restrict_to_base, uip=uip, vae=vae),
            database=database,
            n=per_base,
            seed=seed + k,
            dry_run=True,
            batch_size=batch_size,
            decoder_method=decoder_method,
        )
        counts = {"initial": per_base} | {s.stage: s.n_out for s in report.stages}
        for stage, value in counts.items():
            per_stage[stage].append(value)
        rows.append({"base": base, "counts": counts, "seconds": report.seconds})
        if progress is not None:
            progress(f"{base}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    scale = 1000 / per_base
    mean = {stage: float(np.mean(v)) * scale for stage, v in per_stage.items()}
    return {
        "bases": bases,
        "per_base": per_base,
        "restrict_to_base": restrict_to_base,
        "uip": uip,
        "mean_per_1000": mean,
        "paper": PAPER_TABLE2,
        "rows": rows,
    }


def measure(
    campaign: CampaignConfig,
    database,
    *,
    n: int,
    batch_size: int,
    seed: int,
    compare: bool,
    uip: bool | None,
    workers: int | None,
    method: str | None,
    vae: str | None,
    table2_per_base: int | None,
    header: dict[str, Any],
    step: Callable[[str], AbstractContextManager] = lambda _: nullcontext(),
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The result of ``bench generate``: ``header``, the paper's and the target rates, :func:`throughput`
    (``n`` 0 skips it) and, with ``table2_per_base``, :func:`table2` without and with the restriction
    to the base's elements. ``step(description)`` wraps each run (a progress display)."""
    result: dict[str, Any] = {
        **header,
        "paper_per_s": PAPER_CANDIDATES_PER_S,
        "target_per_s_to_valid": GENERATION_PER_S_TO_VALID,
    }
    with step("throughput runs ..."):
        result["throughput"] = (
            {}
            if n == 0
            else throughput(
                campaign,
                database,
                n=n,
                batch_size=batch_size,
                seed=seed,
                compare=compare,
                uip=uip,
                workers=workers,
                decoder_method=method,
            )
        )
    if table2_per_base is not None:
        for name, restrict in (("unrestricted", False), ("restricted_to_base", True)):
            with step(f"Table 2 ({name}) ..."):
                result.setdefault("table2", {})[name] = table2(
                    database,
                    per_base=table2_per_base,
                    seed=seed,
                    restrict_to_base=restrict,
                    batch_size=batch_size,
                    decoder_method=method,
                    vae=vae,
                    progress=log,
                )
    return result
