"""When a finished relaxation is unphysical: one rule for every engine (pw.x and the surrogate).

A relaxation that ends with atoms crushed together, a cell blown up or collapsed, or an energy
far above every element it is made of has not found a crystal; its energy is not a result.
CHGNet far from its training data has crushed rock-salt SiC to a = 1.1 Å at +12.9 eV/atom. Such
runs are failed relaxations with their reason, never formation energies: they would enter the
MAE, the hit count and the fine-tune. Every reason starts with :data:`PREFIX`, so that callers
can count these failures apart from the others.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from pymatgen.core import Structure

#: Every reason this module gives starts with this word.
PREFIX = "unphysical"
#: A pair closer than this fraction of the sum of its two covalent radii has collapsed.
MIN_DISTANCE_FRACTION = 0.5
#: A relaxed volume per atom outside this range of the starting one (ratio) has blown up or
#: collapsed. Wide on purpose: radius-guessed prototypes start crushed and relax to ordinary
#: densities 3-6x larger (NaGa3As perovskite: 4.6 -> 26.9 A^3/atom), which is not a failure.
VOLUME_RATIO_RANGE = (1 / 8, 8.0)
#: An energy (eV/atom) this far above the highest element reference of the compound is unphysical:
#: real compounds lie within about 1 eV/atom of their elements.
MAX_ENERGY_ABOVE_REFERENCES = 2.0


def covalent_radius(symbol: str) -> float:
    """Cordero's covalent radius (Å), as pymatgen tabulates it; 1.5 Å for an element it lacks."""
    from pymatgen.analysis.molecule_structure_comparator import CovalentRadius

    return float(CovalentRadius.radius.get(symbol, 1.5))


def close_pair(structure: Structure, fraction: float = MIN_DISTANCE_FRACTION) -> str | None:
    """The closest pair below ``fraction`` of its covalent-radius sum, described; None if none."""
    if len(structure) < 2:
        return None
    radii = np.array([covalent_radius(site.specie.symbol) for site in structure])
    sums = radii[:, None] + radii[None, :]
    dist = structure.distance_matrix + np.eye(len(structure)) * 1e6
    ratio = dist / sums
    i, j = np.unravel_index(np.argmin(ratio), ratio.shape)
    if ratio[i, j] >= fraction:
        return None
    return (
        f"{PREFIX}: {structure[i].specie}-{structure[j].specie} at {dist[i, j]:.2f} Å, below "
        f"{fraction:g} x the covalent radii sum {sums[i, j]:.2f} Å"
    )


def volume_change(
    initial: Structure, final: Structure, allowed: tuple[float, float] = VOLUME_RATIO_RANGE
) -> str | None:
    """A description when the volume per atom of ``final`` left ``allowed`` times ``initial``'s."""
    ratio = (final.volume / len(final)) / (initial.volume / len(initial))
    if allowed[0] <= ratio <= allowed[1]:
        return None
    return f"{PREFIX}: volume {ratio:.2f} x the starting one (allowed {allowed[0]:.2f}-{allowed[1]:.2f})"


def unphysical_geometry(initial: Structure, final: Structure | None) -> list[str]:
    """Why the relaxation of ``initial`` into ``final`` is unphysical (empty when it is not)."""
    if final is None:
        return []
    reasons = [close_pair(final), volume_change(initial, final)]
    return [r for r in reasons if r is not None]


def unphysical_energy(
    energy_per_atom: float,
    references: Mapping[str, float],
    margin: float = MAX_ENERGY_ABOVE_REFERENCES,
) -> str | None:
    """A description when ``energy_per_atom`` lies over ``margin`` above every reference (eV/atom)."""
    highest = max(references.values())
    if energy_per_atom - highest <= margin:
        return None
    return (
        f"{PREFIX}: energy {energy_per_atom - highest:.2f} eV/atom above the highest element "
        f"reference (allowed {margin:g})"
    )
