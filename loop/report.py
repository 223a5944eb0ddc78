"""Campaign reports: a Markdown page with PNG plots, rebuilt from the database alone.

Per round: candidates generated, the cascade counts, DFT submitted, relaxed and
failed, the hit rate (share of DFT-relaxed candidates whose DFT values lie in
every window), cumulative hits, the CGCNN MAE before and after the retrain, and
the mean displacement during the DFT relaxation. Plots: hit rate per round, a
parity plot of predicted against DFT values, a histogram of the target property
per round, and the cascade funnel.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from crystaloop.loop.steps import STEP_NAMES
from crystaloop.properties import PROPERTIES


def round_rows(database, name: str) -> list[dict[str, Any]]:
    """One row of numbers per round, from the round documents and the candidates.

    Raises
    ------
    UserError
        No campaign of that name.
    """
    from crystaloop.db.campaigns import CampaignStore
    from crystaloop.loop.config import parse_campaign_config
    from crystaloop.loop.generation import why_empty

    store = CampaignStore(database)
    doc = store.require(name)
    config = parse_campaign_config(doc.config, source=f"campaign {name}")
    rows, cumulative = [], 0
    for r in store.all_rounds(name):
        done = list(
            database["candidates"].find(
                {"campaign": name, "selected_round": r.round, "state": {"$in": ["relaxed", "failed"]}},
                {"_id": 0, "state": 1, "dft": 1, "dft_job": 1},
            )
        )
        relaxed = [d for d in done if d["state"] == "relaxed"]
        hits = sum(config.in_all_windows(d.get("dft") or {}) for d in relaxed)
        cumulative += hits
        displacement = [
            d["dft_job"]["mean_displacement_angstrom"]
            for d in relaxed
            if d.get("dft_job", {}).get("mean_displacement_angstrom") is not None
        ]
        # The cascade ran in the filter step (in the generate step of rounds recorded before it existed).
        cascade = r.steps.get("filter") or r.steps.get("generate")
        stages = (cascade.outputs.get("stages") if cascade else None) or []
        rejected = (cascade.outputs.get("rejected_reasons") if cascade else None) or {}
        rows.append(
            {
                "round": r.round,
                "generated": _count(r.metrics.get("generated")),
                "shortlisted": _count(r.metrics.get("shortlisted")),
                "cascade": [(s["stage"], s["n_in"], s["n_out"]) for s in stages],
                "submitted": _count(r.metrics.get("submitted")),
                "cache_hits": _count(r.metrics.get("cache_hits")),
                "relaxed": len(relaxed),
                "failed": len(done) - len(relaxed),
                "hits": hits,
                "hit_rate": hits / len(relaxed) if relaxed else None,
                "cumulative_hits": cumulative,
                "mae_before": r.metrics.get("mae_before"),
                "mae_after": r.metrics.get("mae_after"),
                "mean_displacement_angstrom": float(np.mean(displacement)) if displacement else None,
                "finished": r.finished_at is not None,
                "step_seconds": {step: _step_seconds(record) for step, record in r.steps.items()},
                "why_empty": why_empty(stages, rejected),
            }
        )
    return rows


def _step_seconds(record) -> float | None:
    """A finished step's wall time (s): recorded, else from its start and end (older records)."""
    if record.wall_s is not None:
        return record.wall_s
    if record.status == "done" and record.finished_at is not None:
        return (record.finished_at - record.started_at).total_seconds()
    return None


def dft_run_rows(database, name: str) -> list[dict[str, Any]]:
    """Every DFT task of a campaign's candidates with its engine's own wall time (s), by round.

    Element references are shared between campaigns and are not listed.
    """
    rows = []
    for task in database["dft_tasks"].find(
        {"campaign": name},
        {"_id": 0, "candidate_id": 1, "round": 1, "reduced_formula": 1, "state": 1, "output.wall_time_s": 1},
    ):
        rows.append(
            {
                "round": task.get("round"),
                "candidate_id": task.get("candidate_id"),
                "formula": task.get("reduced_formula"),
                "state": task.get("state"),
                "engine_seconds": (task.get("output") or {}).get("wall_time_s"),
            }
        )
    return sorted(rows, key=lambda row: (row["round"] is None, row["round"] or 0, row["candidate_id"] or ""))


def _count(value: float | None) -> int | None:
    """Round metrics are stored as floats; counts print as integers."""
    return None if value is None else int(round(value))


def _fmt(value, spec: str = ".3f") -> str:
    if value is None:
        return "-"
    return format(value, spec) if isinstance(value, float) else str(value)


def write_report(database, name: str, folder: Path | str) -> list[Path]:
    """Write ``report.md`` and its PNG plots into ``folder``; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from crystaloop.db.campaigns import CampaignStore
    from crystaloop.loop.config import parse_campaign_config

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = round_rows(database, name)
    config = parse_campaign_config(CampaignStore(database).get(name).config, source=name)
    target = config.targets[0]
    spec = PROPERTIES[target.property]
    paths: list[Path] = []

    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    xs = [r["round"] for r in rows]
    ax.plot(xs, [100 * (r["hit_rate"] or 0) for r in rows], "o-", label="hit rate (%)")
    ax.set_xlabel("round")
    ax.set_ylabel("DFT hit rate (%)")
    ax2 = ax.twinx()
    ax2.step(
        xs, [r["cumulative_hits"] for r in rows], where="mid", color="tab:orange", label="cumulative hits"
    )
    ax2.set_ylabel("cumulative hits")
    ax.set_title(f"{name}: hits per round")
    fig.tight_layout()
    paths.append(_save(fig, folder / "hit_rate.png"))

    relaxed = list(
        database["candidates"].find(
            {"campaign": name, "state": "relaxed"}, {"_id": 0, "predicted": 1, "dft": 1, "selected_round": 1}
        )
    )
    pairs = [
        (d["predicted"][target.property]["mean"], d["dft"][target.property], d.get("selected_round"))
        for d in relaxed
        if d.get("predicted", {}).get(target.property, {}).get("mean") is not None
        and d.get("dft", {}).get(target.property) is not None
    ]
    fig, ax = plt.subplots(figsize=(4, 4))
    if pairs:
        p, t, rnd = (np.array(v, dtype=float) for v in zip(*pairs, strict=True))
        scatter = ax.scatter(t, p, c=rnd, cmap="viridis", s=25)
        lo, hi = float(min(p.min(), t.min())), float(max(p.max(), t.max()))
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        fig.colorbar(scatter, ax=ax, label="round")
    for bound in (target.min, target.max):
        if bound is not None:
            ax.axvline(bound, color="grey", lw=0.6)
    ax.set_xlabel(f"DFT {spec.label}")
    ax.set_ylabel(f"predicted {spec.label}")
    ax.set_title("screening parity")
    fig.tight_layout()
    paths.append(_save(fig, folder / "parity.png"))

    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for r in rows:
        values = [
            d["dft"][target.property]
            for d in relaxed
            if d.get("selected_round") == r["round"] and d.get("dft", {}).get(target.property) is not None
        ]
        if values:
            ax.hist(values, bins=10, alpha=0.5, label=f"round {r['round']}")
    for bound in (target.min, target.max):
        if bound is not None:
            ax.axvline(bound, color="k", lw=0.8)
    ax.set_xlabel(f"DFT {spec.label}")
    ax.set_ylabel("candidates")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no DFT results yet", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    paths.append(_save(fig, folder / "target_histogram.png"))

    fig, ax = plt.subplots(figsize=(5, 3.2))
    last = next((r for r in reversed(rows) if r["cascade"]), None)
    if last:
        names = [s for s, _, _ in last["cascade"]]
        outs = [n_out for _, _, n_out in last["cascade"]]
        ax.barh(names[::-1], outs[::-1])
        ax.set_xscale("symlog")
        ax.set_title(f"filter cascade, round {last['round']}")
        ax.set_xlabel("candidates passing")
    fig.tight_layout()
    paths.append(_save(fig, folder / "cascade.png"))

    lines = [
        f"# Campaign {name}",
        "",
        f"Target: {', '.join(_window(t) for t in config.targets)}; DFT: {config.dft.engine}/{config.dft.preset}; "
        f"acquisition: {config.acquisition.strategy}.",
        "",
        "| round | generated | shortlisted | DFT | relaxed | failed | hits | hit rate | cumulative hits "
        "| MAE before | MAE after | mean displacement (Å) | cache hits |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rate = "-" if r["hit_rate"] is None else f"{100 * r['hit_rate']:.0f} %"
        lines.append(
            f"| {r['round']} | {_fmt(r['generated'])} | {_fmt(r['shortlisted'])} | {_fmt(r['submitted'])} "
            f"| {r['relaxed']} | {r['failed']} | {r['hits']} | {rate} | {r['cumulative_hits']} "
            f"| {_fmt(r['mae_before'])} | {_fmt(r['mae_after'])} | {_fmt(r['mean_displacement_angstrom'])} "
            f"| {_fmt(r['cache_hits'])} |"
        )
    lines += [
        "",
        f"MAE: CGCNN ensemble on that round's DFT results, {spec.unit}, before and after its fine-tune.",
        "",
    ]
    for r in rows:
        if r["cascade"]:
            funnel = " → ".join(f"{s} {n_out}" for s, _, n_out in r["cascade"])
            lines.append(f"- round {r['round']} cascade: {funnel}")
        if r["why_empty"]:
            lines.append(f"- round {r['round']}: {r['why_empty']}")
    lines += ["", *_relaxed_lines(database, name, config, folder, paths)]
    lines += ["", *_time_lines(rows, dft_run_rows(database, name))]
    lines += ["", *(f"![{p.stem}]({p.name})" for p in paths), ""]
    report = folder / "report.md"
    report.write_text("\n".join(lines))
    return [report, *paths]


def relaxed_candidates(database, name: str, config) -> list[dict[str, Any]]:
    """Every DFT-relaxed candidate of a campaign with its final structure, values, E_hull and
    S.U.N. flags, hits first, then by round."""
    from pymatgen.core import Structure

    from crystaloop.dft.records import final_structure
    from crystaloop.loop.stability import sun_flags

    docs = sorted(
        database["candidates"].find({"campaign": name, "state": "relaxed"}, {"_id": 0}),
        key=lambda d: (d.get("selected_round") or 0, d["candidate_id"]),
    )
    rows = []
    for doc in docs:
        final = final_structure(doc["dft_task_id"], database) if doc.get("dft_task_id") else None
        structure = Structure.from_dict(final or doc["structure"])
        rows.append({"doc": doc, "structure": structure, "hit": config.in_all_windows(doc.get("dft") or {})})
    flags = sun_flags(
        [r["structure"] for r in rows],
        [(r["doc"].get("stability") or {}).get("energy_above_hull") for r in rows],
    )
    for row, flag in zip(rows, flags, strict=True):
        row["sun"] = flag
    return sorted(rows, key=lambda r: not r["hit"])


def _space_group(structure) -> str:
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    try:
        return SpacegroupAnalyzer(structure, symprec=0.1).get_space_group_symbol()
    except Exception:  # noqa: BLE001 -- spglib gives up on some distorted cells
        return "-"


def _relaxed_lines(database, name: str, config, folder: Path, paths: list[Path]) -> list[str]:
    """The report's list of relaxed candidates (CIFs beside the report), S.U.N. counts and hulls."""
    rows = relaxed_candidates(database, name, config)
    lines = ["## Relaxed candidates", ""]
    if not rows:
        return [*lines, "No candidate relaxed yet."]
    hits = [r for r in rows if r["hit"]]

    def counts(group) -> str:
        n = len(group)
        return (
            f"{n} | {sum(r['sun'].stable for r in group)} | {sum(r['sun'].metastable for r in group)} "
            f"| {sum(r['sun'].unique for r in group)} | {sum(r['sun'].novel for r in group)} "
            f"| {sum(r['sun'].sun for r in group)}"
        )

    lines += [
        "Stable: E_hull ≤ 0 against the engine's hull; metastable: ≤ 0.1 eV/atom; unique: no earlier "
        "relaxed candidate matches it; novel: no structure type of the prior set or of an earlier result "
        "matches it with species anonymised.",
        "",
        "| | relaxed | stable | metastable | unique | novel | S.U.N. |",
        "|---|---|---|---|---|---|---|",
        f"| all | {counts(rows)} |",
        f"| hits | {counts(hits)} |",
        "",
    ]
    cif_dir = folder / "cif"
    cif_dir.mkdir(exist_ok=True)
    names = [t.property for t in config.targets]
    header = " | ".join(f"{PROPERTIES[p].label} predicted / DFT" for p in names)
    lines += [
        f"| candidate | round | formula | space group | hit | {header} | E_hull (eV/atom) | decomposition | CIF |",
        "|---" * (9 + len(names) - 1) + "|",
    ]
    for row in rows:
        doc, structure = row["doc"], row["structure"]
        cif = cif_dir / f"{doc['candidate_id']}.cif"
        structure.to(filename=str(cif))
        values = []
        for prop in names:
            predicted = (doc.get("predicted") or {}).get(prop) or {}
            values.append(f"{_fmt(predicted.get('mean'))} / {_fmt((doc.get('dft') or {}).get(prop))}")
        stability = doc.get("stability") or {}
        parts = " + ".join(
            f"{p['fraction']:.2f} {p['formula']}" for p in stability.get("decomposition") or []
        )
        if stability.get("against_elements_only"):
            parts += " (against the elements only)"
        if stability.get("upper_bound"):
            parts += " (upper bound)"
        lines.append(
            f"| {doc['candidate_id']} | {_fmt(doc.get('selected_round'))} | {structure.composition.reduced_formula} "
            f"| {_space_group(structure)} | {'yes' if row['hit'] else 'no'} | {' | '.join(values)} "
            f"| {_fmt(stability.get('energy_above_hull'))} | {parts or '-'} | [cif](cif/{cif.name}) |"
        )
    paths.extend(_hull_plots(database, name, config, hits, folder))
    return lines


def _hull_plots(database, name: str, config, hits, folder: Path, limit: int = 6) -> list[Path]:
    """The hull of each binary or ternary chemical system with a hit, hits marked (PNG)."""
    import matplotlib.pyplot as plt
    from pymatgen.analysis.phase_diagram import PDPlotter

    from crystaloop.loop.stability import dft_hull

    systems: dict[str, list[str]] = {}
    for row in hits:
        doc = row["doc"]
        if 2 <= len(doc["elements"]) <= 3:
            systems.setdefault(doc["chemsys"], []).append(doc["candidate_id"])
    if not systems:
        return []
    out = []
    for chemsys, ids in list(systems.items())[:limit]:
        hull = dft_hull(database, config, elements=chemsys.split("-"))
        diagram = hull.phase_diagram(chemsys.split("-"))
        marked = [e for e in diagram.all_entries if e.attribute in ids]
        fig, ax = plt.subplots(figsize=(8, 6.5))
        PDPlotter(diagram, backend="matplotlib", show_unstable=0.5).get_plot(ax=ax, highlight_entries=marked)
        ax.set_title(f"{chemsys} hull ({hull.engine}); hits marked")
        fig.tight_layout()
        out.append(_save(fig, folder / f"hull-{chemsys}.png"))
    return out


def _time_lines(rows: list[dict[str, Any]], runs: list[dict[str, Any]]) -> list[str]:
    """The report's "where the time goes" section: wall time per step and round, and each DFT run."""
    steps = list(STEP_NAMES)
    lines = [
        "## Where the time goes",
        "",
        "Wall time of each step (s), and of each DFT run as the engine reports it (s).",
        "",
        "| round | " + " | ".join(steps) + " | total |",
        "|---" * (len(steps) + 2) + "|",
    ]
    for r in rows:
        seconds = [r["step_seconds"].get(step) for step in steps]
        total = sum(v for v in seconds if v is not None)
        lines.append(f"| {r['round']} | " + " | ".join(_fmt(v, ".1f") for v in seconds) + f" | {total:.1f} |")
    if runs:
        lines += ["", "| round | candidate | formula | state | engine s |", "|---|---|---|---|---|"]
        for run in runs:
            who = run["candidate_id"] or "-"
            lines.append(
                f"| {_fmt(run['round'])} | {who} | {run['formula']} | {run['state']} "
                f"| {_fmt(run['engine_seconds'], '.1f')} |"
            )
        timed = [run["engine_seconds"] for run in runs if run["engine_seconds"] is not None]
        lines += ["", f"{len(runs)} DFT runs, {sum(timed):.0f} s of engine time in all."]
    return lines


def _window(t) -> str:
    lo = "-inf" if t.min is None else f"{t.min:g}"
    hi = "+inf" if t.max is None else f"{t.max:g}"
    unit = PROPERTIES[t.property].unit
    return f"{t.property} in [{lo}, {hi}] {unit}".strip()


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
