"""`crystaloop bench oracle`: DFT formation energies against experiment, raw and corrected."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from crystaloop.cli._common import output_option


def register(app: typer.Typer) -> None:
    """Add the oracle benchmark command to ``app``."""
    app.command("oracle")(bench_oracle)


def bench_oracle(
    presets: str = typer.Option("demo,standard", "--presets", help="Comma-separated presets."),
    compounds: str = typer.Option(
        None, "--compounds", help="Comma-separated test-set compounds (default: all)."
    ),
    orderings: str = typer.Option(
        "fm,afm", "--magnetic-orderings", help="fm, or fm,afm: also relax the simplest AFM ordering."
    ),
    out_dir: Path = typer.Option(
        None, "--out-dir", help="Per-run JSON results; reruns skip what is there (default: data_dir)."
    ),
    fit: Path = typer.Option(
        None,
        "--fit",
        help="Write the fitted constants to this YAML (the shipped file: dft/data/anion_corrections.yaml).",
    ),
    output: Path = output_option("Write the summary as JSON here."),
    fmt: str = typer.Option("table", "--format", help="table or json."),
) -> None:
    """Formation energies of the binary test set per preset: raw, anion-corrected and experiment."""
    from rich.table import Table

    from crystaloop.cli._common import console
    from crystaloop.dft.magnetism import check_orderings
    from crystaloop.errors import UserError
    from crystaloop.loop.bench.oracle import fit_document, run_oracle, summarise_oracle, write_fits
    from crystaloop.loop.bench.presets import select_runs
    from crystaloop.settings import get_settings

    if fmt not in ("table", "json"):
        raise UserError(f"unknown format '{fmt}'; choose table or json")
    try:
        chosen = check_orderings(o.strip() for o in orderings.split(",") if o.strip())
    except ValueError as exc:
        raise UserError(f"{exc} (--magnetic-orderings)") from None
    names, preset_names, family = select_runs(compounds, presets)
    folder = out_dir or get_settings().data_dir / "bench" / "oracle"
    results = run_oracle(
        names, preset_names, folder, orderings=chosen, log=lambda m: console.print(m, highlight=False)
    )
    summary = summarise_oracle(results)
    if fit:
        write_fits(fit_document(summary, family), fit)
    if output:
        output.write_text(json.dumps(summary, indent=2))
    if fmt == "json":
        print(json.dumps(summary, indent=2))
        return
    for preset, block in summary["presets"].items():
        values = ", ".join(f"{x} {v:+.3f}" for x, v in block["fit"]["values"].items()) or "none"
        metals = ", ".join(f"{m} {v:+.3f}" for m, v in block["fit"]["metals"].items()) or "none"
        table = Table(
            title=f"{preset}, family {family.name}: E_f in eV/atom (experiment: {summary['source']}); "
            f"constants per anion atom: {values}; per metal atom in oxides and fluorides: {metals}"
        )
        for column in (
            "compound",
            "class",
            "state",
            "ordering",
            "gap (eV)",
            "raw",
            "corrected",
            "LOO",
            "exp",
            "raw - exp",
            "corr - exp",
            "pw.x (s)",
        ):
            table.add_column(column)
        for row in block["rows"]:
            table.add_row(
                row["compound"],
                row["class"],
                row["state"],
                row["magnetic_ordering"] or "-",
                _f(row["band_gap"], ".2f"),
                _f(row["raw"]),
                _f(row["corrected"]),
                _f(row["loo_corrected"]),
                _f(row["experiment"]),
                _f(row["raw_error"]),
                _f(row["error"]),
                _f(row["pw_time_s"], ".0f"),
            )
        console.print(table)
        mae = block["mae"]
        console.print(
            f"MAE over {mae['all']['n']} compounds: raw {_f(mae['all']['raw'])}, corrected "
            f"{_f(mae['all']['corrected'])}, out of sample {_f(mae['all']['out_of_sample'])} eV/atom; "
            f"fit MAE {_f(block['fit']['mae'])}, leave-one-out {_f(block['fit']['loo_mae'])}",
            highlight=False,
        )
        for cls, m in mae["by_class"].items():
            console.print(
                f"  {cls} ({m['n']}): raw {_f(m['raw'])}, corrected {_f(m['corrected'])}", highlight=False
            )
        t = block["targets"]
        console.print(
            f"targets: corrected MAE <= 0.10: {_f(t['corrected_mae']['value'])} "
            f"({'met' if t['corrected_mae']['met'] else 'missed'}); no sign error: "
            f"{'met' if t['sign_errors']['met'] else 'missed ' + ', '.join(t['sign_errors']['value'])}; "
            f"NiO within 0.15 of -1.24 as an AFM insulator: {_f(t['nio']['corrected'])}, "
            f"{t['nio']['ordering'] or '-'}, gap {_f(t['nio']['band_gap'], '.2f')} eV "
            f"({'met' if t['nio']['met'] else 'missed'})",
            highlight=False,
        )


def _f(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)
