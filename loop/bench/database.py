"""Insert and query benchmark for the candidate store."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pymatgen.core import Lattice, Structure
from pymongo.database import Database

from crystaloop.db.documents import CandidateDoc, CandidateState, PredictedValue, StructureFields
from crystaloop.db.store import CandidateStore, Window, property_field
from crystaloop.db.summaries import COUNTER_COLLECTION
from crystaloop.properties import PROPERTIES

_A_SITE = ("Sr", "Ba", "Ca", "K", "Na", "La")
_B_SITE = ("Ti", "Zr", "Hf", "Nb", "Ta", "Sn", "Al", "Ga")
_X_SITE = ("O", "F", "Cl", "S")


def _templates(rng: random.Random, n: int = 64) -> list[dict[str, Any]]:
    """Derived fields of ``n`` small perovskite and rock-salt cells (spacegroups skipped)."""
    out = []
    for _ in range(n):
        if rng.random() < 0.5:
            a, b, x = rng.choice(_A_SITE), rng.choice(_B_SITE), rng.choice(_X_SITE)
            s = Structure(
                Lattice.cubic(rng.uniform(3.7, 4.3)),
                [a, b, x, x, x],
                [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]],
            )
        else:
            s = Structure.from_spacegroup(
                "Fm-3m",
                Lattice.cubic(rng.uniform(4.0, 6.0)),
                [rng.choice(_A_SITE), rng.choice(_X_SITE)],
                [[0, 0, 0], [0.5, 0.5, 0.5]],
            )
        out.append(StructureFields.fields_from(s, spacegroup=False))
    return out


def synthetic_candidates(n: int, campaign: str, seed: int = 0) -> list[CandidateDoc]:
    """``n`` candidate documents with random predictions for all eight properties."""
    rng = random.Random(seed)
    templates = _templates(rng)
    states = [s for s in CandidateState]
    docs = []
    for i in range(n):
        predicted = {
            name: PredictedValue(
                mean=rng.uniform(max(spec.lower, -4.0), min(spec.upper, 10.0)),
                std=rng.uniform(0.01, 0.3),
                model_version="bench",
            )
            for name, spec in PROPERTIES.items()
            if not spec.derived  # the eight learnt ones, as in the measured store benchmarks
        }
        docs.append(
            CandidateDoc(
                candidate_id=f"{campaign}-{i:08d}",
                campaign=campaign,
                round=i % 5,
                state=rng.choice(states),
                predicted=predicted,
                **rng.choice(templates),
            )
        )
    return docs


@dataclass
class DBBenchmarkResult:
    """What :func:`run_db_benchmark` measured (times in ms are medians)."""

    n: int
    insert_seconds: float
    inserts_per_second: float
    query_ms: dict[str, float] = field(default_factory=dict)
    plans: dict[str, str] = field(default_factory=dict)
    legacy_query_ms: dict[str, float] = field(default_factory=dict)
    legacy_inserts_per_second: float | None = None
    #: Seconds per phase of :meth:`CandidateStore.insert_many`, summed over the batches.
    insert_phase_seconds: dict[str, float] = field(default_factory=dict)


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _stages(plan: dict[str, Any]) -> str:
    names = []
    node = plan
    while isinstance(node, dict):
        if "stage" in node:
            stage = node["stage"]
            names.append(f"{stage}({node['indexName']})" if stage == "IXSCAN" else stage)
        node = node.get("inputStage") or (node.get("inputStages") or [None])[0]
    return " <- ".join(names) or "?"


def _winning_plan(explained: dict[str, Any]) -> dict[str, Any]:
    if "queryPlanner" in explained:
        return explained["queryPlanner"].get("winningPlan", {})
    for stage in explained.get("stages", []):
        if "$cursor" in stage:
            return _winning_plan(stage["$cursor"])
    return {}


def describe_plan(store: CandidateStore, **query: Any) -> str:
    """How :meth:`CandidateStore.matching_ids` answers ``query``, with the server's own plans.

    The plan is the server's ``explain`` of the first filter sent (the first
    slice, when sliced). Where that reports COLLSCAN for a filter of several
    clauses, the server in fact serves the first clause that an index can
    serve and checks the others on each fetched summary (its ``explain`` does
    not model that fallback), so the explain of that leading clause alone is
    shown as what runs.
    """
    stats: dict[str, Any] = {}
    store.matching_ids(stats=stats, **query)
    filter_ = stats["filter"]
    whole = _stages(_winning_plan(store.summaries.find(filter_).sort(stats["sort"]).explain()))
    parts = [f"summaries: {whole}"]
    if "IXSCAN" not in whole and len(filter_) > 1:
        lead, clause = next(iter(filter_.items()))
        lead_plan = _stages(_winning_plan(store.summaries.find({lead: clause}).explain()))
        residual = ", ".join(k for k in filter_ if k != lead)
        parts = [f"summaries: lead {lead}: {lead_plan}, then filter {residual} (server explain: {whole})"]
    parts.append(f"sort {stats['sort'][0][0]}")
    parts.append(f"{stats['slices']} slice(s) read")
    parts.append("full documents by candidate_id")
    return "; ".join(parts)


def legacy_insert_rate(database: Database, docs: list[CandidateDoc], batch: int) -> float:
    """Inserts/s of ``docs`` into a scratch collection with the indexes of the layout before summaries."""
    scratch = database["bench_previous_layout"]
    scratch.drop()
    scratch.create_index("candidate_id", unique=True)
    scratch.create_index([("campaign", 1), ("round", 1), ("state", 1)])
    scratch.create_index([("campaign", 1), ("reduced_formula", 1)])
    for name in ("reduced_formula", "elements", "chemsys"):
        scratch.create_index(name)
    for name in PROPERTIES:
        scratch.create_index(property_field(name))
        scratch.create_index(property_field(name, dft=True), sparse=True)
    start = time.perf_counter()
    for i in range(0, len(docs), batch):
        scratch.insert_many([d.model_dump() for d in docs[i : i + batch]], ordered=False)
    rate = len(docs) / (time.perf_counter() - start)
    scratch.drop()
    return rate


def run_db_benchmark(
    database: Database,
    *,
    n: int = 100_000,
    batch: int = 2_000,
    repeats: int = 20,
    legacy: bool = False,
    progress: Callable[[int], None] | None = None,
) -> DBBenchmarkResult:
    """Insert ``n`` candidates in batches, then time what ``crystaloop query`` and status run.

    Each query is :meth:`CandidateStore.query` (summaries, then the full
    documents and their structures) or :meth:`CandidateStore.count_by_state`.
    With ``legacy``, the same queries are also timed on the full documents alone
    (:meth:`CandidateStore.query_full_documents` and the aggregation), as before
    summaries existed (a few repeats, since each takes seconds at scale), and the
    same documents are inserted into a collection with the previous layout's indexes.
    """
    campaign = "bench"
    store = CandidateStore(database)
    _drop_campaign(store, campaign)
    docs = synthetic_candidates(n, campaign)
    phases: dict[str, float] = {}
    start = time.perf_counter()
    for i in range(0, n, batch):
        store.insert_many(docs[i : i + batch], timings=phases)
        if progress:
            progress(min(batch, n - i))
    elapsed = time.perf_counter() - start

    windows = [Window("formation_energy_per_atom", -2.0, -1.0), Window("band_gap", 1.0, 3.0)]
    window_query = {
        "campaign": campaign,
        "windows": windows,
        "sort": "formation_energy_per_atom",
        "limit": 50,
    }
    elements_query = {"campaign": campaign, "elements": ["O", "Ti"], "limit": 50}
    queries: dict[str, Callable[[], Any]] = {
        "two_property_window_sort_limit50": lambda: store.query(**window_query),
        "by_elements_limit50": lambda: store.query(**elements_query),
        "status_counts": lambda: store.count_by_state(campaign),
    }
    result = DBBenchmarkResult(
        n=n, insert_seconds=elapsed, inserts_per_second=n / elapsed, insert_phase_seconds=phases
    )
    for name, fn in queries.items():
        result.query_ms[name] = _median_ms(fn, repeats)
    result.plans["two_property_window_sort_limit50"] = describe_plan(store, **window_query)
    result.plans["by_elements_limit50"] = describe_plan(store, **elements_query)
    result.plans["status_counts"] = (
        f"{COUNTER_COLLECTION}: find campaign ({store.counters.count_documents({'campaign': campaign})} "
        "counter documents, one per round), summed per state"
    )
    if legacy:
        legacy_queries: dict[str, Callable[[], Any]] = {
            "two_property_window_sort_limit50": lambda: store.query_full_documents(**window_query),
            "by_elements_limit50": lambda: store.query_full_documents(**elements_query),
            "status_counts": lambda: list(store.collection.aggregate(store.count_pipeline(campaign))),
        }
        for name, fn in legacy_queries.items():
            result.legacy_query_ms[name] = _median_ms(fn, max(1, min(repeats, 3)))
        result.legacy_inserts_per_second = legacy_insert_rate(database, docs, batch)
    _drop_campaign(store, campaign)
    return result


def _drop_campaign(store: CandidateStore, campaign: str) -> None:
    store.collection.delete_many({"campaign": campaign})
    store.summaries.delete_many({"campaign": campaign})
    store.counters.delete_many({"campaign": campaign})


def run_on_server(
    uri: str | None,
    *,
    n: int,
    batch: int,
    repeats: int,
    legacy: bool,
    progress: Callable[[int], None] | None = None,
) -> tuple[str, DBBenchmarkResult]:
    """:func:`run_db_benchmark` in the ``crystaloop_bench`` database of ``uri``, or of a fresh
    embedded server (started and stopped here) when ``uri`` is None; returns the server's
    description (the URI without its password) and the result."""
    import tempfile

    from crystaloop.db.connection import get_client
    from crystaloop.db.server import EmbeddedServer
    from crystaloop.settings import CrystaloopSettings, redact_uri

    tmp = None
    server = None
    if not uri:
        tmp = tempfile.TemporaryDirectory(prefix="crystaloop-bench-")
        server = EmbeddedServer(tmp.name)
        uri = server.start().uri
        target = "embedded server (fresh)"
    else:
        target = redact_uri(uri)
    try:
        settings = CrystaloopSettings(mongodb_uri=uri, database="crystaloop_bench")
        database = get_client(settings)[settings.database]
        result = run_db_benchmark(
            database, n=n, batch=batch, repeats=repeats, legacy=legacy, progress=progress
        )
    finally:
        if server:
            server.stop()
        if tmp:
            tmp.cleanup()
    return target, result
