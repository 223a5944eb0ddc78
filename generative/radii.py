"""The one ionic-radius table used by the voxel representation.

The radius of an element is pymatgen's ``Species(element, oxidation_state).ionic_radius`` for its
most common oxidation state, where "most common" is the non-zero oxidation state with the most
occurrences in the ICSD statistics pymatgen ships for bond-valence analysis
(``pymatgen.analysis.bond_valence.PRIOR_PROB``); elements absent from those statistics take the
first of ``Element.common_oxidation_states``. pymatgen tabulates Shannon's (1976) radii for
six-fold coordination, from the "crystal radius" column (O2- 1.26 Å, Na+ 1.16 Å). When that species
has no Shannon radius the fallbacks are, in order, ``Element.average_ionic_radius`` (the mean over
the element's tabulated oxidation states) and ``Element.atomic_radius``; an element with none of
these gets :data:`DEFAULT_RADIUS_ANGSTROM`.
"""

from __future__ import annotations

import warnings
from functools import cache

from pymatgen.core import Element, Species

DEFAULT_RADIUS_ANGSTROM = 1.0
"""Radius (Å) for an element with no Shannon, average ionic or atomic radius in pymatgen."""


@cache
def _icsd_most_common_oxidation_states() -> dict[str, int]:
    from pymatgen.analysis.bond_valence import PRIOR_PROB

    best: dict[str, tuple[int, float]] = {}
    for species, count in PRIOR_PROB.items():
        oxidation = species.oxi_state
        if not oxidation:
            continue
        symbol = species.symbol
        if symbol not in best or count > best[symbol][1]:
            best[symbol] = (int(oxidation), count)
    return {symbol: oxi for symbol, (oxi, _count) in best.items()}


def most_common_oxidation_state(element: Element | str | int) -> int | None:
    """The element's most common non-zero oxidation state (ICSD statistics), or None."""
    el = _as_element(element)
    oxidation = _icsd_most_common_oxidation_states().get(el.symbol)
    if oxidation is None:
        common = [o for o in el.common_oxidation_states if o != 0]
        oxidation = int(common[0]) if common else None
    return oxidation


@cache
def ionic_radius(element: Element | str | int) -> float:
    """Ionic radius (Å) of ``element`` as defined in this module's docstring."""
    el = _as_element(element)
    oxidation = most_common_oxidation_state(el)
    if oxidation is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            radius = Species(el.symbol, oxidation).ionic_radius
        if radius is not None and float(radius) > 0:
            return float(radius)
    average = float(el.average_ionic_radius)
    if average > 0:
        return average
    if el.atomic_radius is not None and float(el.atomic_radius) > 0:
        return float(el.atomic_radius)
    return DEFAULT_RADIUS_ANGSTROM


def _as_element(element: Element | str | int) -> Element:
    if isinstance(element, Element):
        return element
    if isinstance(element, int):
        return Element.from_Z(element)
    return Element(element)
