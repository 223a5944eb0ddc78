"""``crystaloop query``: filter candidates and write a table, JSON, CSV or CIFs."""

from __future__ import annotations

import csv
import json
import math
import re
import sys
from enum import StrEnum
from pathlib import Path

import typer

from crystaloop.cli._common import console, err_console
from crystaloop.errors import UserError


class OutputFormat(StrEnum):
    table = "table"
    json = "json"
    csv = "csv"


def parse_window(text: str):
    """``PROPERTY:MIN:MAX`` (either bound may be empty) -> Window.

    Raises
    ------
    UserError
        Malformed text, unknown property, non-numeric or inverted bounds.
    """
    from crystaloop.db.store import Window
    from crystaloop.properties import PROPERTY_NAMES

    parts = text.split(":")
    if len(parts) != 3:
        raise UserError(f"--window {text!r}: use PROPERTY:MIN:MAX, e.g. band_gap:1.0:3.0 or band_gap:1.0:")
    name, lo, hi = parts
    if name not in PROPERTY_NAMES:
        raise UserError(f"--window {text!r}: unknown property {name!r}; allowed: {', '.join(PROPERTY_NAMES)}")
    try:
        bounds = [float(b) if b.strip() else None for b in (lo, hi)]
    except ValueError:
        raise UserError(f"--window {text!r}: bounds must be numbers (or empty for an open bound)") from None
    if any(b is not None and not math.isfinite(b) for b in bounds):
        raise UserError(
            f"--window {text!r}: bounds must be finite numbers; leave one empty for an open bound"
        )
    if bounds == [None, None]:
        raise UserError(f"--window {text!r}: give at least one bound")
    try:
        return Window(name, *bounds)
    except ValueError as exc:
        raise UserError(f"--window {text!r}: {exc}; swap the bounds") from None


def _row(doc, dft: bool, properties: list[str]) -> dict:
    row = {
        "candidate_id": doc.candidate_id,
        "campaign": doc.campaign,
        "round": doc.round,
        "state": doc.state,
        "formula": doc.reduced_formula,
        "spacegroup": doc.spacegroup,
        "nsites": doc.nsites,
    }
    for name in properties:
        pred = doc.predicted.get(name)
        row[f"pred_{name}"] = pred.mean if pred else None
        row[f"pred_{name}_std"] = pred.std if pred else None
        row[f"dft_{name}"] = doc.dft.get(name)
    return row


def query(
    campaign: str = typer.Option(None, help="Campaign name."),
    round: int = typer.Option(None, "--round", help="Round number."),
    status: list[str] = typer.Option(None, "--status", help="Candidate state (repeatable)."),
    formula: str = typer.Option(None, help="Reduced formula, e.g. SrTiO3."),
    elements: str = typer.Option(None, help="Comma-separated elements that must all be present."),
    chemsys: str = typer.Option(None, help="Exact chemical system, e.g. O-Sr-Ti."),
    window: list[str] = typer.Option(None, "--window", help="PROPERTY:MIN:MAX, repeatable."),
    dft: bool = typer.Option(False, "--dft", help="Apply windows and sort to DFT values, not predictions."),
    sort: str = typer.Option(None, help="Field or property to sort by; prefix '-' for descending."),
    limit: int = typer.Option(50, min=0, help="Maximum hits (0: all)."),
    fmt: OutputFormat = typer.Option(OutputFormat.table, "--format", help="table, json or csv."),
    export_cif: Path = typer.Option(None, "--export-cif", help="Write one CIF per hit into this folder."),
) -> None:
    """Query candidates; prints a table, JSON or CSV, and optionally writes CIFs."""
    from pymatgen.core import Composition, Element
    from pymatgen.io.cif import CifWriter

    from crystaloop.db import CandidateState, get_database
    from crystaloop.db.store import CandidateStore
    from crystaloop.properties import PROPERTY_NAMES

    windows = [parse_window(w) for w in window or []]
    named = [w.property for w in windows]
    repeated = sorted({name for name in named if named.count(name) > 1})
    if repeated:
        raise UserError(
            f"--window given twice for {', '.join(repeated)}; give one window per property "
            "with both bounds, e.g. band_gap:2:3"
        )
    element_list = [e.strip() for e in elements.split(",") if e.strip()] if elements else None
    for symbol in (element_list or []) + (chemsys.split("-") if chemsys else []):
        if not Element.is_valid_symbol(symbol):
            raise UserError(f"unknown element {symbol!r} in --elements/--chemsys; use symbols like Sr,Ti,O")
    if formula:
        try:
            species = Composition(formula).elements
        except Exception:
            raise UserError(f"--formula {formula!r} is not a chemical formula; e.g. SrTiO3") from None
        # pymatgen reads "SRTIO3" as S, a dummy R, T (as H), I and O: accept real element symbols only
        unknown = [sym for sym in re.findall(r"[A-Z][a-z]*", formula) if not Element.is_valid_symbol(sym)]
        if unknown or not species:
            raise UserError(
                f"--formula {formula!r}: {', '.join(unknown) or 'no element'} is not an element; "
                "use symbols like SrTiO3"
            )
    allowed_states = [s.value for s in CandidateState]
    for state in status or []:
        if state not in allowed_states:
            raise UserError(f"--status {state!r} is not a state; allowed: {', '.join(allowed_states)}")
    if export_cif is not None and export_cif.exists() and not export_cif.is_dir():
        raise UserError(f"--export-cif {export_cif} is a file; pass a folder (it is created if missing)")
    store = CandidateStore(get_database())
    try:
        store.sort_key(sort, dft=dft)
    except ValueError as exc:
        raise UserError(f"--sort: {exc}") from None
    hits = store.query(
        campaign=campaign,
        round=round,
        state=status or None,
        formula=formula,
        elements=element_list,
        chemsys=chemsys,
        windows=windows,
        dft=dft,
        sort=sort,
        limit=limit,
    )
    if not hits and campaign and not _campaign_exists(store, campaign):
        known = sorted(store.collection.database["campaigns"].distinct("name"))[:10]
        raise UserError(
            f"no campaign named {campaign!r} has candidates (campaigns: {', '.join(known) or 'none yet'}); "
            "check the name"
        )
    shown = [w.property for w in windows] or ["formation_energy_per_atom"]
    if sort and sort.lstrip("-+") in PROPERTY_NAMES and sort.lstrip("-+") not in shown:
        shown.append(sort.lstrip("-+"))
    rows = [_row(doc, dft, shown) for _, doc in hits]

    if export_cif:
        try:
            export_cif.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(
                f"--export-cif {export_cif}: cannot create it ({exc.strerror}); pick another folder"
            ) from None
        for structure, doc in hits:
            target = export_cif / f"{doc.candidate_id}_{doc.reduced_formula}.cif"
            try:
                CifWriter(structure).write_file(target)
            except OSError as exc:
                raise UserError(
                    f"--export-cif {export_cif}: cannot write {target.name} ({exc.strerror}); "
                    "pick a folder you can write to"
                ) from None

    if fmt is OutputFormat.json:
        sys.stdout.write(json.dumps(rows, indent=2, default=str) + "\n")
    elif fmt is OutputFormat.csv:
        writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]) if rows else ["candidate_id"])
        writer.writeheader()
        writer.writerows(rows)
    else:
        _print_table(rows, shown)
    if export_cif:
        # JSON and CSV on stdout stay machine-readable: the note goes to stderr.
        note = console if fmt is OutputFormat.table else err_console
        note.print(f"wrote {len(hits)} CIF file(s) to {export_cif}", highlight=False)


def _campaign_exists(store, campaign: str) -> bool:
    """A campaign document or any candidate (through the indexed summaries) carries the name."""
    database = store.collection.database
    return (
        database["campaigns"].find_one({"name": campaign}, {"_id": 1}) is not None
        or store.summaries.find_one({"campaign": campaign}, {"_id": 1}) is not None
    )


def _print_table(rows: list[dict], properties: list[str]) -> None:
    from rich.table import Table

    from crystaloop.properties import PROPERTIES

    table = Table(title=f"{len(rows)} candidate(s)")
    for col in ("candidate_id", "round", "state", "formula", "spacegroup", "nsites"):
        table.add_column(col)
    for name in properties:
        unit = PROPERTIES[name].unit
        table.add_column(f"{name} pred{f' ({unit})' if unit else ''}", justify="right")
        table.add_column(f"{name} DFT", justify="right")

    def fmt(value, std=None):
        if value is None:
            return "-"
        return f"{value:.3f}" + (f" ± {std:.3f}" if std is not None else "")

    for row in rows:
        cells = [str(row[c]) for c in ("candidate_id", "round", "state", "formula", "spacegroup", "nsites")]
        for name in properties:
            cells += [fmt(row[f"pred_{name}"], row[f"pred_{name}_std"]), fmt(row[f"dft_{name}"])]
        table.add_row(*cells)
    console.print(table)
