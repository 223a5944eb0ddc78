"""Realism of CHGNet-relaxed decorated prototypes: volume per atom against experiment.

Each compound of ``data/realism_experimental.yaml`` is built from its AFLOW library
entry with the compound's species on the entry's sites (the volume scaled by
atomic radii, as decorations are), relaxed by CHGNet (cell and positions) and
its volume per atom compared with the experimental one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any

import yaml
from pymatgen.core import Structure

from crystaloop.generative.data import decorate
from crystaloop.loop.bench.targets import REALISM_PERCENT


def load_experimental() -> dict[str, Any]:
    """The shipped table: ``{"compounds": {formula: spec}}``."""
    text = (resources.files("crystaloop.loop.bench") / "data" / "realism_experimental.yaml").read_text()
    return yaml.safe_load(text)


def experimental_volume_per_atom(spec: dict[str, Any]) -> float:
    """Volume per atom (Å³) of a table entry's conventional cell."""
    lat = spec["lattice"]
    a, c = lat["a"], lat["c"]
    if lat["system"] == "hexagonal":
        volume = math.sqrt(3) / 2 * a * a * c
    elif lat["system"] == "tetragonal":
        volume = a * a * c
    else:
        raise ValueError(f"lattice system {lat['system']!r} is not handled")
    return volume / spec["cell_atoms"]


def start_structure(spec: dict[str, Any]) -> Structure:
    """The AFLOW entry with the compound's species, volume scaled by atomic radii."""
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    template = decorate.aflow_library()[spec["prototype"]].structure
    if "wyckoff" in spec:
        letters = SpacegroupAnalyzer(template).get_symmetry_dataset().wyckoffs
        species = [spec["wyckoff"][w] for w in letters]
    else:
        species = [spec["species"][site.specie.symbol] for site in template]
    return decorate.radius_scaled(template, species)


def in_decorations(spec: dict[str, Any], formula: str, palette) -> bool | None:
    """Whether the decoration rules produce ``formula`` on this prototype (None for Wyckoff splits)."""
    if "wyckoff" in spec:
        return None
    proto = decorate.aflow_library()[spec["prototype"]]
    return formula in {d.formula for d in decorate.substitutions(proto, palette)}


def conventional_a_c(structure: Structure) -> tuple[float, float]:
    """a and c (Å) of the conventional standard cell (hexagonal axes for trigonal cells)."""
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    lattice = (
        SpacegroupAnalyzer(structure, symprec=decorate.SYMPREC).get_conventional_standard_structure().lattice
    )
    return lattice.a, lattice.c


@dataclass
class RealismRow:
    """One compound: relaxed and experimental volume per atom (Å³/atom) and the error (%)."""

    compound: str
    name: str
    prototype: str
    in_size_limits: bool
    in_decorations: bool | None
    volume_start: float
    volume_relaxed: float | None
    volume_experiment: float
    error_percent: float | None
    a_error_percent: float | None
    c_error_percent: float | None
    hit: bool
    relax_converged: bool
    crystal_system: str | None
    source: str

    def as_dict(self) -> dict:
        """Plain dict (JSON-ready)."""
        return asdict(self)


def measure(compounds: list[str] | None = None, *, labeller=None, palette=None) -> list[RealismRow]:
    """Relax each compound and compare its volume per atom with experiment.

    Parameters
    ----------
    labeller
        A :class:`~crystaloop.generative.data.label_relax.CHGNetRelaxLabeller` (loaded if None).
    """
    from crystaloop.generative.data.elements import palette as prior_palette
    from crystaloop.generative.data.label_relax import CHGNetRelaxLabeller

    table = load_experimental()["compounds"]
    names = compounds or list(table)
    labeller = labeller or CHGNetRelaxLabeller()
    palette = palette or prior_palette()
    kept = {p.key for p in decorate.load_prototypes()}
    rows = []
    for name in names:
        spec = table[name]
        start = start_structure(spec)
        final, _, reached = labeller.relax(start)
        v_exp = experimental_volume_per_atom(spec)
        v = final.volume / len(final)
        err = 100 * (v - v_exp) / v_exp
        a, c = conventional_a_c(final)
        rows.append(
            RealismRow(
                compound=name,
                name=spec["name"],
                prototype=spec["prototype"],
                in_size_limits=spec["prototype"] in kept,
                in_decorations=in_decorations(spec, start.composition.reduced_formula, palette),
                volume_start=start.volume / len(start),
                volume_relaxed=v,
                volume_experiment=v_exp,
                error_percent=err,
                a_error_percent=100 * (a / spec["lattice"]["a"] - 1),
                c_error_percent=100 * (c / spec["lattice"]["c"] - 1),
                hit=abs(err) <= REALISM_PERCENT,
                relax_converged=reached,
                crystal_system=decorate.crystal_system(final),
                source=spec["source"],
            )
        )
    return rows


def summarise(rows: list[RealismRow]) -> dict[str, Any]:
    """The target, the hits among ``rows`` and the rows as dicts (the JSON of ``bench realism``)."""
    return {
        "target_percent": REALISM_PERCENT,
        "hits": sum(r.hit for r in rows),
        "compounds": len(rows),
        "rows": [r.as_dict() for r in rows],
    }
