"""Collinear magnetic orderings: ferromagnetic and the simplest antiferromagnetic one.

``dft.magnetic_orderings: [fm, afm]`` relaxes a magnetic compound twice and keeps the lower
energy per atom. The antiferromagnetic trial is the simplest one with zero net moment:

- in the primitive cell when it holds an even number of magnetic sites; otherwise in a cell
  of twice its volume (one of the seven index-2 sublattices), as rock-salt NiO needs for its
  (111) layering;
- among the sign patterns of that cell, the one that puts the most antiparallel pairs across
  near-linear metal-anion-metal bridges (the Goodenough-Kanamori rule: superexchange through
  a 180° bridge is strongly antiferromagnetic, through a 90° one weak). Each bridge weighs
  ``-cos`` of its angle. A compound without anions weighs nearest metal-metal pairs instead.

The chosen pattern is the site property ``spin`` (+1, -1; 0 on non-magnetic sites), which
:func:`~crystaloop.dft.espresso.inputs.build_pw_input` turns into signed starting moments.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Literal

import numpy as np
from pymatgen.core import Structure

from crystaloop.dft.espresso.inputs import MAGNETIC_ELEMENTS

Ordering = Literal["fm", "afm"]
ORDERINGS: tuple[str, ...] = ("fm", "afm")
SPIN = "spin"
#: Elements that bridge two magnetic cations (superexchange): the anions of the local families.
ANIONS = frozenset({"O", "F", "N", "S", "Se", "Te", "Cl", "Br", "I", "P", "As", "C", "H"})
#: A neighbour is bonded when within this factor of the shortest cation-anion distance.
BOND_TOLERANCE = 1.15
#: The most magnetic sites whose sign patterns are enumerated (C(11, 5) = 462 patterns).
MAX_MAGNETIC_SITES = 12


def check_orderings(orderings: Iterable[str]) -> tuple[str, ...]:
    """The orderings, validated; ``fm`` is always run.

    Raises
    ------
    ValueError
        An unknown ordering (the config layer turns it into one line for the user).
    """
    chosen = tuple(dict.fromkeys(str(o).lower() for o in orderings))
    unknown = [o for o in chosen if o not in ORDERINGS]
    if unknown:
        raise ValueError(f"unknown magnetic ordering {', '.join(unknown)}; choose from fm, afm")
    return ("fm", *(o for o in chosen if o != "fm"))


def magnetic_sites(structure: Structure) -> list[int]:
    """Indices of the sites whose element starts with a moment (``MAGNETIC_ELEMENTS``)."""
    return [i for i, site in enumerate(structure) if site.specie.symbol in MAGNETIC_ELEMENTS]


def _shortest(structure: Structure, sites: list[int], others: list[int]) -> float | None:
    """The shortest distance (within 4 Å) from one of ``sites`` to one of ``others``."""
    distances = (
        n.nn_distance for i in sites for n in structure.get_neighbors(structure[i], 4.0) if n.index in others
    )
    return min(distances, default=None)


def _bridges(structure: Structure, sites: list[int]) -> list[tuple[int, int, tuple[int, ...], float]]:
    """``(i, j, image of j relative to i, weight)`` for every exchange path between magnetic sites."""
    anions = [i for i, s in enumerate(structure) if s.specie.symbol in ANIONS and i not in sites]
    paths: list[tuple[int, int, tuple[int, ...], float]] = []
    if anions:
        bond = _shortest(structure, sites, anions)
        if bond is None:
            return paths
        cutoff = bond * BOND_TOLERANCE
        for i in sites:
            centre = structure[i].coords
            for x in structure.get_neighbors(structure[i], cutoff):
                if x.index not in anions:
                    continue
                for j in structure.get_neighbors(x, cutoff):
                    if j.index not in sites:
                        continue
                    if j.index == i and np.allclose(j.coords, centre, atol=1e-6):
                        continue
                    u, v = centre - x.coords, j.coords - x.coords
                    cos = float(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v)))
                    # ``j.image`` is j's translation from its own site in the cell
                    paths.append((i, j.index, tuple(int(a) for a in j.image), -cos))
        return paths
    nearest = _shortest(structure, sites, sites)
    if nearest is None:
        return paths
    for i in sites:
        for j in structure.get_neighbors(structure[i], nearest * 1.05):
            if j.index in sites:
                paths.append((i, j.index, tuple(int(a) for a in j.image), 1.0))
    return paths


def _score(paths, signs: dict[int, int], v: tuple[int, int, int]) -> float:
    """Exchange weight on antiparallel paths minus that on parallel ones."""
    total = 0.0
    for i, j, image, weight in paths:
        parity = (-1) ** (sum(a * b for a, b in zip(v, image, strict=True)) % 2)
        total -= weight * signs[i] * signs[j] * parity
    return total


def _patterns(sites: list[int]):
    """Zero-net sign patterns of ``sites`` (the first fixed up), or none for an odd count."""
    n = len(sites)
    if n == 0 or n % 2 or n > MAX_MAGNETIC_SITES:
        return
    for down in itertools.combinations(sites[1:], n // 2):
        yield {i: (-1 if i in down else 1) for i in sites}


#: The seven index-2 sublattices of Z^3, as upper-triangular integer matrices (rows are the new
#: cell's vectors in the old basis).
_INDEX2 = [
    np.array(m)
    for m in (
        [[2, 0, 0], [0, 1, 0], [0, 0, 1]],
        [[1, 0, 0], [0, 2, 0], [0, 0, 1]],
        [[1, 1, 0], [0, 2, 0], [0, 0, 1]],
        [[1, 0, 0], [0, 1, 0], [0, 0, 2]],
        [[1, 0, 1], [0, 1, 0], [0, 0, 2]],
        [[1, 0, 0], [0, 1, 1], [0, 0, 2]],
        [[1, 0, 1], [0, 1, 1], [0, 0, 2]],
    )
]


def _parity_vector(matrix: np.ndarray) -> tuple[int, int, int]:
    """The v in {0,1}^3 whose even translations (v.n even) are the sublattice of ``matrix``."""
    for v in itertools.product((0, 1), repeat=3):
        if any(v) and all(int(np.dot(v, row)) % 2 == 0 for row in matrix):
            return v  # type: ignore[return-value]
    raise ValueError("not an index-2 sublattice")


def afm_ordering(structure: Structure) -> Structure | None:
    """The simplest antiferromagnetic ordering of ``structure``, or None when it has no moments.

    Returns a structure (the primitive cell, or a doubled one) with the site property ``spin``.
    """
    sites = magnetic_sites(structure)
    if not sites or len(sites) > MAX_MAGNETIC_SITES:
        return None
    paths = _bridges(structure, sites)
    best = None
    for signs in _patterns(sites):
        score = _score(paths, signs, (0, 0, 0))
        if best is None or score > best[0] + 1e-9:
            best = (score, signs, None)
    if best is None:
        # No zero-net pattern in this cell: double it, with alternate images opposite.
        for matrix in _INDEX2:
            v = _parity_vector(matrix)
            for signs in _patterns(sites) if len(sites) % 2 == 0 else [dict.fromkeys(sites, 1)]:
                score = _score(paths, signs, v)
                if best is None or score > best[0] + 1e-9:
                    best = (score, signs, matrix)
    if best is None:
        return None
    _, signs, matrix = best
    if matrix is None:
        spins = [signs.get(i, 0) for i in range(len(structure))]
        ordered = structure.copy(site_properties={SPIN: spins})
        return ordered
    v = _parity_vector(matrix)
    labelled = structure.copy(site_properties={"parent": list(range(len(structure)))})
    supercell = labelled.make_supercell(matrix, in_place=False)
    spins = []
    for site in supercell:
        parent = site.properties["parent"]
        if parent not in signs:
            spins.append(0)
            continue
        # The site's translation from its parent, in the primitive basis.
        shift = structure.lattice.get_fractional_coords(site.coords) - structure[parent].frac_coords
        n = np.round(shift).astype(int)
        spins.append(signs[parent] * (-1) ** (int(np.dot(v, n)) % 2))
    supercell.remove_site_property("parent")
    supercell.add_site_property(SPIN, spins)
    return supercell


def ordering_of(structure: Structure) -> str:
    """``afm`` when ``structure`` carries opposite spins, else ``fm``."""
    spins = structure.site_properties.get(SPIN)
    return "afm" if spins and min(spins) < 0 < max(spins) else "fm"
