"""`crystaloop bench campaign`: the loop against random acquisition and against no model."""

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
        help="Random prototypes per round in the no-model arm (default 32).",
    ),
    arms: str = typer.Option(
        "loop,random,no_model", "--arms", help="Comma-separated subset of loop, random, no_model."
    ),
    seeds: str = typer.Option(
        None,
        "--seeds",
        help="Comma-separated seeds, run one after another and pooled (default: the config's seed).",
    ),
    fmt: str = typer.Option("table", "--format", help="table or json."),
    output: Path = output_option('Also write the numbers as JSON here (an unbounded ratio is "inf").'),
) -> None:
    """Hit rate per round and cumulative hits: loop (uncertainty + retraining), random acquisition, no model."""
    from crystaloop.cli._common import console
    from crystaloop.db import get_database
    from crystaloop.errors import UserError
    from crystaloop.loop.benchmark import ARMS, pool_seeds, run_benchmark, to_json
    from crystaloop.loop.config import load_campaign_config

    if fmt not in ("table", "json"):
        raise UserError(f"unknown format {fmt!r}; use --format table or --format json")
    chosen = tuple(a.strip() for a in arms.split(",") if a.strip())
    if not chosen or set(chosen) - set(ARMS):
        raise UserError(f"--arms takes a comma-separated subset of {','.join(ARMS)}, not {arms!r}")
    seed_list = _parse_seeds(seeds)
    base = load_campaign_config(config_path)
    database = get_database()
    results = {}
    for seed in seed_list or [base.seed]:
        config = base if seed_list is None else base.model_copy(update={"seed": seed})
        if seed_list is not None:
            console.print(f"seed {seed}", highlight=False)
        results[seed] = run_benchmark(
            config,
            database=database,
            rounds=rounds,
            no_model_per_round=no_model,
            log=lambda line: console.print(line, highlight=False),
            arms=chosen,
            suffix="" if seed_list is None or len(seed_list) == 1 else f"-s{seed}",
        )
    if seed_list is None or len(seed_list) == 1:
        out = next(iter(results.values()))
    else:
        out = {"seeds": {str(k): v for k, v in results.items()}, "pooled": pool_seeds(results)}
    if output:
        output.write_text(to_json(out, indent=1))
    if fmt == "json":
        console.print_json(to_json(out))
        return
    for seed, result in results.items():
        if len(results) > 1:
            console.print(f"seed {seed}", highlight=False)
        _print_result(console, result)
    if len(results) > 1:
        pooled = out["pooled"]
        rates = ", ".join(
            f"{arm} {pooled['hits'][arm]}/{pooled['relaxed'][arm]} ({_pct(rate)})"
            for arm, rate in pooled["hit_rates"].items()
        )
        ratios = "; ".join(
            f"loop/{other} {_num(pooled.get(f'ratio_vs_{other}'), '.1f')}x"
            for other in ("random", "no_model")
            if f"ratio_vs_{other}" in pooled
        )
        console.print(
            f"pooled over seeds {', '.join(map(str, pooled['seeds']))}, through round {pooled['round']}: "
            + "; ".join(part for part in (rates, ratios) if part),
            highlight=False,
        )


def _print_result(console, result: dict) -> None:
    """The per-round table and the summary lines of one seed."""
    from rich.table import Table

    table = Table(
        "arm",
        "round",
        "shortlisted",
        "relaxed",
        "hits",
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
                str(row["hits"]),
                _pct(row["hit_rate"]),
                str(row["cumulative_hits"]),
                _pct(row["cumulative_hit_rate"]),
                _num(row["mae_screening"]),
                _num(row["mae_before_finetune"]),
            )
    console.print(table)
    s = result["summary"]
    for scope in ("round", "cumulative"):
        rates = ", ".join(f"{arm} {_pct(v)}" for arm, v in s[f"{scope}_hit_rates"].items())
        console.print(
            f"{'round' if scope == 'round' else 'through round'} {s['round']}: {rates}; loop/random "
            f"{_num(s[f'{scope}_ratio_vs_random'], '.1f')}x (target 3x), loop/no model "
            f"{_num(s[f'{scope}_ratio_vs_no_model'], '.1f')}x (target 10x)",
            highlight=False,
        )
    console.print(
        f"loop screening MAE: first round {_num(s['mae_first_round'])}, last round "
        f"{_num(s['mae_last_round'])} eV/atom ({'falls' if s['mae_falls'] else 'does not fall'})",
        highlight=False,
    )
    for line in s["anchors"].values():
        console.print(f"anchor: {line}", highlight=False)
