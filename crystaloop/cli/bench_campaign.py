"""`crystaloop bench campaign`: the loop against random acquisition and the model-free baselines,
on stable, unique and novel hits (``--target sun``) or on a formation-energy window (``--target window``)."""

from __future__ import annotations

from pathlib import Path

import typer

from crystaloop.cli._common import output_option


def register(app: typer.Typer) -> None:
    """Add the campaign benchmark command to ``app``."""
    app.command("campaign")(bench_campaign)


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.0f} %"


def _num(value, spec: str = ".3f") -> str:
    """``-`` for None, ``∞`` for a ratio against an arm without hits."""
    if value is None:
        return "-"
    return "∞" if value == float("inf") else format(value, spec)


def _parse_seeds(text: str | None) -> list[int] | None:
    from crystaloop.errors import UserError

    if text is None:
        return None
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--seeds takes comma-separated integers such as 0,1,2, not {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise UserError(f"--seeds needs distinct integers >= 0 such as 0,1,2, not {text!r}")
    return seeds


def bench_campaign(
    config_path: Path = typer.Option(
        Path("configs/bench-campaign.yaml"), "--config", help="Base campaign file."
    ),
    rounds: int = typer.Option(5, "--rounds", min=1, help="Rounds per arm."),
    no_model: int = typer.Option(
        None,
        "--no-model-per-round",
        min=1,
        help="Structures relaxed per round in each model-free arm (no_model, rss, substitution; default: "
        "the config's budget.dft_per_round).",
    ),
    target: str = typer.Option(
        "sun",
        "--target",
        help="sun: stable (E_hull <= 0 on the CHGNet hull), unique and novel hits per 100 oracle calls; "
        "window: hits in the config's formation-energy window.",
    ),
    arms: str = typer.Option(
        None,
        "--arms",
        help="Comma-separated subset of loop, random, no_model, rss, substitution (default: "
        "loop,random,rss,substitution for --target sun, loop,random,no_model for --target window).",
    ),
    seeds: str = typer.Option(
        None,
        "--seeds",
        help="Comma-separated seeds, run one after another and pooled (default: the config's seed).",
    ),
    pool: list[Path] = typer.Option(
        None,
        "--pool",
        help="Run nothing: pool the seeds of earlier --output files (repeat the option; e.g. seeds run "
        "in parallel processes; FILE:arm,arm takes only those arms) and write the pooled JSON to --output.",
    ),
    fmt: str = typer.Option("table", "--format", help="table or json."),
    output: Path = output_option(
        'Also write the numbers as JSON here (an unbounded ratio is "inf"); with several seeds, '
        "rewritten after each one with the seeds done so far pooled. Run again with the same file, "
        "the seeds it holds for the same settings are not run again."
    ),
) -> None:
    """Hits per round and cumulative: loop (uncertainty + retraining), random acquisition, and the
    model-free arms (random structure search, prototype substitution, decorated cubic prototypes)."""
    from crystaloop.cli._common import console
    from crystaloop.db import get_database
    from crystaloop.errors import UserError
    from crystaloop.loop.bench.campaign import ARMS, CIRCULARITY, DEFAULT_ARMS, TARGETS, run_seeds, to_json
    from crystaloop.loop.config import load_campaign_config

    if fmt not in ("table", "json"):
        raise UserError(f"unknown format {fmt!r}; use --format table or --format json")
    if target not in TARGETS:
        raise UserError(f"unknown --target {target!r}; use --target sun or --target window")
    arms = arms if arms is not None else ",".join(DEFAULT_ARMS[target])
    chosen = tuple(a.strip() for a in arms.split(",") if a.strip())
    if not chosen or set(chosen) - set(ARMS):
        raise UserError(f"--arms takes a comma-separated subset of {','.join(ARMS)}, not {arms!r}")
    if pool:
        _pool_files(console, pool, output, fmt)
        return
    seed_list = _parse_seeds(seeds)
    base = load_campaign_config(config_path)
    finished = _finished(output, base, rounds=rounds, no_model_per_round=no_model, arms=chosen, target=target)
    database = get_database()
    results, out = run_seeds(
        base,
        database=database,
        seeds=seed_list,
        rounds=rounds,
        no_model_per_round=no_model,
        arms=chosen,
        log=lambda line: console.print(line, highlight=False),
        write=(lambda document: output.write_text(to_json(document, indent=1))) if output else None,
        target=target,
        finished=finished,
    )
    if fmt == "json":
        console.print_json(to_json(out))
        return
    for seed, result in results.items():
        if len(results) > 1:
            console.print(f"seed {seed}", highlight=False)
        (_print_sun_result if target == "sun" else _print_result)(console, result)
    if len(results) > 1:
        _print_pooled(console, out["pooled"])
    console.print(f"oracle: {CIRCULARITY}", highlight=False)


def _finished(output: Path | None, base, **question) -> dict:
    """The seeds an earlier run with this ``--output`` finished for the same question (see
    :func:`crystaloop.loop.bench.campaign.finished_seeds`); none when there is no such file."""
    import json

    from crystaloop.errors import UserError
    from crystaloop.loop.bench.campaign import finished_seeds

    if output is None or not output.is_file():
        return {}
    try:
        document = json.loads(output.read_text())
    except ValueError:
        raise UserError(
            f"--output {output} exists and is not a bench campaign JSON; move it away or name another file"
        ) from None
    return finished_seeds(document, base, **question) if isinstance(document, dict) else {}


def _pool_files(console, paths: list[Path], output: Path | None, fmt: str) -> None:
    """Pool the seeds of earlier ``--output`` files into one result, written and printed like a run's."""
    from crystaloop.loop.bench.campaign import CIRCULARITY, pool_files, to_json

    out = pool_files([str(p) for p in paths])
    if output:
        output.write_text(to_json(out, indent=1))
    if fmt == "json":
        console.print_json(to_json(out))
        return
    _print_pooled(console, out["pooled"])
    console.print(f"oracle: {CIRCULARITY}", highlight=False)


def _interval(bounds, fmt) -> str:
    return "" if bounds is None else f" [{fmt(bounds[0])}, {fmt(bounds[1])}]"


def _print_pooled(console, pooled: dict) -> None:
    """The pooled counts, rates and ratios with their intervals."""
    if pooled.get("target") == "sun":
        _print_sun_pooled(console, pooled)
        return
    for label, key in (("hits", "hits"), ("new hits (not rediscovered)", "new_hits")):
        rates = ", ".join(
            f"{arm} {count}/{pooled['relaxed'][arm]} ({_pct(pooled[f'{key[:-1]}_rates'][arm])}"
            f"{_interval(pooled[f'{key[:-1]}_rate_intervals'][arm], _pct)})"
            for arm, count in pooled[key].items()
        )
        prefix = "" if key == "hits" else "new_hit_"
        ratios = "; ".join(
            f"loop/{other} {_num(pooled.get(f'{prefix}ratio_vs_{other}'), '.1f')}x"
            + _interval(pooled.get(f"{prefix}ratio_vs_{other}_interval"), lambda v: f"{_num(v, '.1f')}x")
            for other in ("random", "no_model")
            if f"{prefix}ratio_vs_{other}" in pooled
        )
        console.print(
            f"pooled over seeds {', '.join(map(str, pooled['seeds']))}, through round {pooled['round']}, "
            f"{label}: " + "; ".join(part for part in (rates, ratios) if part),
            highlight=False,
        )
    per_run = ", ".join(
        f"{arm} {pooled['hits'][arm]}/{pooled['relaxed'][arm] + pooled['failed'][arm]} "
        f"({_pct(rate)}{_interval(pooled['hit_rate_per_run_intervals'][arm], _pct)})"
        for arm, rate in pooled.get("hit_rates_per_run", {}).items()
    )
    ratios = "; ".join(
        f"loop/{other} {_num(pooled.get(f'per_run_ratio_vs_{other}'), '.1f')}x"
        + _interval(pooled.get(f"per_run_ratio_vs_{other}_interval"), lambda v: f"{_num(v, '.1f')}x")
        for other in ("random", "no_model")
        if f"per_run_ratio_vs_{other}" in pooled
    )
    if per_run:
        console.print(f"hits per DFT run started (failures included): {per_run}; {ratios}", highlight=False)
    failures = ", ".join(
        f"{arm} {pooled['failed'][arm]} ({pooled['unphysical'][arm]} unphysical)" for arm in pooled["failed"]
    )
    console.print(f"failed relaxations: {failures}", highlight=False)
    console.print(f"intervals: {pooled['intervals']}", highlight=False)


_SCOPES = {"round": "round", "cumulative": "through round", "cumulative_new": "new hits through round"}


def _print_result(console, result: dict) -> None:
    """The per-round table and the summary lines of one seed."""
    from rich.table import Table

    from crystaloop.loop.bench.targets import CAMPAIGN

    table = Table(
        "arm",
        "round",
        "shortlisted",
        "relaxed",
        "failed (unphysical)",
        "hits",
        "rediscovered",
        "hit rate",
        "cumulative hits",
        "cumulative hit rate",
        "screening MAE (eV/atom)",
        "MAE before fine-tune (eV/atom)",
    )
    for arm, data in result["arms"].items():
        for row in data["rows"]:
            table.add_row(
                arm,
                str(row["round"]),
                "-" if row["shortlisted"] is None else str(row["shortlisted"]),
                str(row["relaxed"]),
                f"{row.get('failed', 0)} ({row.get('unphysical', 0)})",
                str(row["hits"]),
                str(row.get("rediscovered", 0)),
                _pct(row["hit_rate"]),
                str(row["cumulative_hits"]),
                _pct(row["cumulative_hit_rate"]),
                _num(row["mae_screening"]),
                _num(row["mae_before_finetune"]),
            )
    console.print(table)
    s = result["summary"]
    for scope in ("round", "cumulative", "cumulative_new"):
        bounds = s.get(f"{scope}_hit_rate_intervals") or {}
        rates = ", ".join(
            f"{arm} {_pct(v)}{_interval(bounds.get(arm), _pct)}" for arm, v in s[f"{scope}_hit_rates"].items()
        )
        console.print(
            f"{_SCOPES[scope]} {s['round']}: {rates}; loop/random "
            f"{_num(s[f'{scope}_ratio_vs_random'], '.1f')}x (target {CAMPAIGN['vs_random']:g}x), loop/no model "
            f"{_num(s[f'{scope}_ratio_vs_no_model'], '.1f')}x (target {CAMPAIGN['vs_no_model']:g}x)",
            highlight=False,
        )
    console.print(
        f"loop screening MAE: first round {_num(s['mae_first_round'])}, last round "
        f"{_num(s['mae_last_round'])} eV/atom ({'falls' if s['mae_falls'] else 'does not fall'})",
        highlight=False,
    )
    for line in s["anchors"].values():
        console.print(f"anchor: {line}", highlight=False)


def _per_100(value, bounds) -> str:
    text = "-" if value is None else f"{value:.1f}"
    return text + _interval(bounds, lambda v: f"{v:.1f}")


def _print_sun_result(console, result: dict) -> None:
    """One seed's S.U.N. table (per arm and round) and the summary against the targets."""
    from rich.table import Table

    table = Table(
        "arm",
        "round",
        "oracle calls",
        "failed (unphysical)",
        "stable",
        "unique",
        "novel",
        "S.U.N.",
        "S.U.N. per 100 calls",
        "cumulative per 100 calls",
        "S.U.N. hits",
    )
    for arm, data in result["arms"].items():
        for row in data["rows"]:
            table.add_row(
                arm,
                str(row["round"]),
                str(row["oracle_calls"]),
                f"{row['failed']} ({row['unphysical']})",
                str(row["stable"]),
                str(row["unique"]),
                str(row["novel"]),
                str(row["hits"]),
                _num(row["sun_per_100_calls"], ".1f"),
                _num(row["cumulative_sun_per_100_calls"], ".1f"),
                ", ".join(row.get("sun_formulas") or []) or "-",
            )
    console.print(table)
    s = result["summary"]
    rates = ", ".join(
        f"{arm} {s['sun_hits'][arm]}/{s['oracle_calls'][arm]} = "
        f"{_per_100(s['sun_per_100_calls'][arm], s['sun_per_100_calls_intervals'][arm])}"
        for arm in s["sun_hits"]
    )
    console.print(f"S.U.N. hits per 100 oracle calls through round {s['round']}: {rates}", highlight=False)
    _print_sun_targets(
        console, {o: (s.get(f"ratio_vs_{o}"), None, s.get(f"target_vs_{o}_met")) for o in _goal()}
    )
    if s["round"] < s["goal_round"]:
        console.print(
            f"the targets are judged through round {s['goal_round']}; this run stopped at round {s['round']}, "
            "so they are not measured",
            highlight=False,
        )
    for line in s["anchors"].values():
        console.print(f"anchor: {line}", highlight=False)


def _goal() -> dict:
    from crystaloop.loop.bench.campaign import goals

    return goals("sun")[1]


def _print_sun_targets(console, ratios: dict) -> None:
    """``ratios``: other arm -> (ratio, interval, met)."""
    goal = _goal()
    parts = []
    for other, (ratio, bounds, met) in ratios.items():
        verdict = "not measured" if met is None else ("met" if met else "missed")
        parts.append(
            f"loop/{other} {_num(ratio, '.1f')}x"
            + _interval(bounds, lambda v: f"{_num(v, '.1f')}x")
            + f" (target {goal[other]:g}x: {verdict})"
        )
    console.print("ratios: " + "; ".join(parts), highlight=False)


def _print_sun_pooled(console, pooled: dict) -> None:
    """Pooled S.U.N. hits per 100 oracle calls per round and arm, and the ratios against the targets."""
    from crystaloop.loop.bench.targets import SUN_ANCHORS

    seeds = ", ".join(map(str, pooled["seeds"]))
    for entry in pooled["per_round"]:
        rates = "; ".join(
            f"{arm} {v['sun_hits']}/{v['oracle_calls']} = {_per_100(v['per_100'], v['interval'])}"
            f" (cumulative {_per_100(entry['cumulative'][arm]['per_100'], entry['cumulative'][arm]['interval'])})"
            for arm, v in entry["arms"].items()
        )
        console.print(
            f"pooled over seeds {seeds}, round {entry['round']}, S.U.N. per 100 oracle calls: {rates}",
            highlight=False,
        )
    console.print(
        f"through round {pooled['round']} (targets judged through round {pooled['goal_round']}):",
        highlight=False,
    )
    _print_sun_targets(
        console, {o: (t["ratio"], t["interval"], t["met"]) for o, t in pooled["sun_targets"].items()}
    )
    failures = ", ".join(
        f"{arm} {pooled['failed'][arm]} ({pooled['unphysical'][arm]} unphysical)" for arm in pooled["failed"]
    )
    console.print(f"failed relaxations: {failures}", highlight=False)
    console.print(f"intervals: {pooled['intervals']}", highlight=False)
    for line in SUN_ANCHORS.values():
        console.print(f"anchor: {line}", highlight=False)
