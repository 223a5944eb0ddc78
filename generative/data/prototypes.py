"""Cubic prototypes of the prior set and their enumeration.

Every structure is fixed by its prototype, its species and one lattice
constant: all sites sit on fixed Wyckoff positions.

=========== ========== ======= ============================================
prototype   class      group   sites (conventional cubic cell)
=========== ========== ======= ============================================
B1          binary     Fm-3m   A 4a (0,0,0); B 4b (1/2,1/2,1/2)
B2          binary     Pm-3m   A 1a (0,0,0); B 1b (1/2,1/2,1/2)
B3          binary     F-43m   A 4a (0,0,0); B 4c (1/4,1/4,1/4)
perovskite  perovskite Pm-3m   A 1a (0,0,0); B 1b (1/2,1/2,1/2); X 3c
L21         heusler    Fm-3m   X 8c (1/4,1/4,1/4); Y 4b (1/2,1/2,1/2); Z 4a
=========== ========== ======= ============================================
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache

import numpy as np
from pymatgen.core import Element, Lattice, Structure

from crystaloop.generative.data import elements as pal

FCC_TRANSLATIONS = np.array([[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]])

# Fractional basis in the conventional cubic cell, per prototype: (role index, position).
_BASES: dict[str, tuple[tuple[int, tuple[float, float, float]], ...]] = {
    "B1": ((0, (0, 0, 0)), (1, (0.5, 0.5, 0.5))),
    "B2": ((0, (0, 0, 0)), (1, (0.5, 0.5, 0.5))),
    "B3": ((0, (0, 0, 0)), (1, (0.25, 0.25, 0.25))),
    "perovskite": ((0, (0, 0, 0)), (1, (0.5, 0.5, 0.5)), (2, (0.5, 0.5, 0)), (2, (0.5, 0, 0.5)),
                   (2, (0, 0.5, 0.5))),
    "L21": ((0, (0.25, 0.25, 0.25)), (0, (0.75, 0.75, 0.75)), (1, (0.5, 0.5, 0.5)), (2, (0, 0, 0))),
}  # fmt: skip
_FCC = {"B1", "B3", "L21"}
SPACEGROUPS = {"B1": "Fm-3m", "B2": "Pm-3m", "B3": "F-43m", "perovskite": "Pm-3m", "L21": "Fm-3m"}
MATERIAL_CLASS = {
    "B1": "binary",
    "B2": "binary",
    "B3": "binary",
    "perovskite": "perovskite",
    "L21": "heusler",
}
PROTOTYPES = tuple(_BASES)
# Role permutations that give the same crystal, because a symmetry of the empty prototype swaps
# the sublattices: B1, B2 and L21 by the translation (1/2, 1/2, 1/2) (4a <-> 4b, 1a <-> 1b; 8c onto
# itself), B3 by inversion then the translation (1/4, 1/4, 1/4) (4a <-> 4c). Perovskite A and B
# sites differ (12- against 6-fold coordinated), so ABX3 and BAX3 are distinct crystals.
EQUIVALENT_ROLE_SWAPS: dict[str, tuple[tuple[int, ...], ...]] = {
    "B1": ((1, 0),),
    "B2": ((1, 0),),
    "B3": ((1, 0),),
    "perovskite": (),
    "L21": ((0, 2, 1),),
}


@dataclass(frozen=True)
class Prototype:
    """One enumerated cubic structure, before its lattice constant is known.

    Attributes
    ----------
    name
        ``B1``, ``B2``, ``B3``, ``perovskite`` or ``L21``.
    species
        One symbol per role: (A, B) for binaries, (A, B, X) for ABX3, (X, Y, Z) for X2YZ.
    """

    name: str
    species: tuple[str, ...]

    @property
    def material_class(self) -> str:
        """``binary``, ``perovskite`` or ``heusler``."""
        return MATERIAL_CLASS[self.name]

    @property
    def spacegroup(self) -> str:
        """International symbol of the ideal structure."""
        return SPACEGROUPS[self.name]

    @property
    def formula(self) -> str:
        """Reduced formula, e.g. ``SrTiO3``."""
        return self.primitive(4.0).composition.reduced_formula

    @property
    def crystal_key(self) -> tuple[str, tuple[str, ...]]:
        """The same for every species order that gives the same crystal (e.g. B3 SiC and CSi)."""
        orders = [self.species] + [
            tuple(self.species[i] for i in swap) for swap in EQUIVALENT_ROLE_SWAPS[self.name]
        ]
        return self.name, min(orders)

    @property
    def structure_id(self) -> str:
        """Stable id, e.g. ``prior:perovskite:Sr-Ti-O``."""
        return f"prior:{self.name}:{'-'.join(self.species)}"

    def conventional(self, a: float) -> Structure:
        """The conventional cubic cell with lattice constant ``a`` (Å)."""
        species, coords = [], []
        shifts = FCC_TRANSLATIONS if self.name in _FCC else FCC_TRANSLATIONS[:1]
        for role, pos in _BASES[self.name]:
            for shift in shifts:
                species.append(self.species[role])
                coords.append(np.mod(np.add(pos, shift), 1.0))
        return Structure(Lattice.cubic(a), species, coords)

    def primitive(self, a: float) -> Structure:
        """The primitive cell (same Cartesian frame as the cubic cell) for lattice constant ``a`` (Å)."""
        if self.name not in _FCC:
            return self.conventional(a)
        lattice = Lattice(0.5 * a * np.array([[0, 1, 1], [1, 0, 1], [1, 1, 0]]))
        species = [self.species[role] for role, _ in _BASES[self.name]]
        cart = [np.asarray(pos) * a for _, pos in _BASES[self.name]]
        return Structure(lattice, species, cart, coords_are_cartesian=True)

    @property
    def atoms_per_primitive(self) -> int:
        """Number of sites in the primitive cell."""
        return len(_BASES[self.name])

    @property
    def atoms_per_conventional(self) -> int:
        """Number of sites in the conventional cubic cell."""
        return len(_BASES[self.name]) * (4 if self.name in _FCC else 1)

    def nearest_neighbour_ratio(self) -> float:
        """Shortest interatomic distance divided by the lattice constant (dimensionless)."""
        return _nn_ratio(self.name)

    def lattice_guess(self) -> float:
        """A radius-based first guess of the cubic lattice constant (Å)."""
        r = [_radius(s, ionic=self.name in {"B1", "perovskite"} or (self.name == "B2" and _is_halide(self)))
             for s in self.species]  # fmt: skip
        if self.name == "B1":
            return 2 * (r[0] + r[1])
        if self.name == "B2":
            return 2 * (r[0] + r[1]) / math.sqrt(3)
        if self.name == "B3":
            return 4 * (r[0] + r[1]) / math.sqrt(3)
        if self.name == "perovskite":
            return max(2 * (r[1] + r[2]), math.sqrt(2) * (r[0] + r[2]))
        return 4 * (r[0] + 0.5 * (r[1] + r[2])) / math.sqrt(3)


@cache
def _nn_ratio(name: str) -> float:
    species = ("H", "He", "Li")[: len({r for r, _ in _BASES[name]})]
    structure = Prototype(name, species).primitive(1.0)
    dist = structure.distance_matrix + np.eye(len(structure)) * 10
    return float(min(dist.min(), min(structure.lattice.abc)))


def _is_halide(proto: Prototype) -> bool:
    return proto.species[1] in pal.B2_IONIC[1]


@cache
def _radius(symbol: str, ionic: bool) -> float:
    el = Element(symbol)
    if ionic and el.average_ionic_radius:
        return float(el.average_ionic_radius)
    return float(el.atomic_radius or 1.5)


def _balanced(cation: str, anion: str) -> bool:
    return -pal.anion_state(anion) in pal.cation_states(cation)


def enumerate_binaries() -> Iterator[Prototype]:
    """B2 metal-metal pairs and CsCl-type halides; B1 and B3 charge-balanced ionic pairs."""
    s_block = set(pal.ALKALI) | set(pal.ALKALINE_EARTH)
    rare = set(pal.RARE_EARTH)
    for a, b in itertools.combinations(pal.B2_METALS, 2):
        if {a, b} <= s_block or {a, b} <= rare:
            continue
        yield Prototype("B2", (a, b))
    for a, b in itertools.product(*pal.B2_IONIC):
        yield Prototype("B2", (a, b))
    for cation, anion in itertools.product(pal.IONIC_CATIONS, pal.IONIC_ANIONS):
        if cation != anion and _balanced(cation, anion):
            yield Prototype("B1", (cation, anion))
            yield Prototype("B3", (cation, anion))
    for a, b in itertools.combinations(pal.COVALENT_IV, 2):
        yield Prototype("B3", (a, b))


def enumerate_perovskites() -> Iterator[Prototype]:
    """ABX3 with q(A) + q(B) + 3 q(X) = 0 for ICSD oxidation states of A and B."""
    for a, b, x in itertools.product(pal.PEROVSKITE_A, pal.PEROVSKITE_B, pal.PEROVSKITE_X):
        if a == b:
            continue
        need = -3 * pal.anion_state(x)
        if any(qa + qb == need for qa in pal.cation_states(a) for qb in pal.cation_states(b)):
            yield Prototype("perovskite", (a, b, x))


def _group(symbol: str) -> int:
    return Element(symbol).group


def enumerate_heuslers() -> Iterator[Prototype]:
    """X2YZ with X at least as late in the d series (group) as Y, X != Y."""
    for x, y, z in itertools.product(pal.HEUSLER_X, pal.HEUSLER_Y, pal.HEUSLER_Z):
        if x != y and _group(x) >= _group(y):
            yield Prototype("L21", (x, y, z))


def enumerate_all(*, one_per_crystal: bool = True) -> list[Prototype]:
    """Every prototype of the prior set, one entry per crystal, in a fixed order.

    Species orders that give the same crystal (:attr:`Prototype.crystal_key`) keep the first one
    enumerated: the ionic B3 carbides come before the group-IV pairs, so SiC is ``prior:B3:Si-C``
    (cation first) and ``prior:B3:C-Si`` is not enumerated. ``one_per_crystal=False`` gives the
    enumeration of ``prior-v1`` before those duplicates were dropped (one entry per id); the
    build order is shuffled from it so that every structure keeps its place.
    """
    seen: set = set()
    out = []
    for proto in itertools.chain(enumerate_binaries(), enumerate_perovskites(), enumerate_heuslers()):
        key = proto.crystal_key if one_per_crystal else proto.structure_id
        if key in seen or set(proto.species) & pal.EXCLUDED:
            continue
        seen.add(key)
        out.append(proto)
    return out


def prototype_from_id(structure_id: str) -> Prototype:
    """Inverse of :attr:`Prototype.structure_id`."""
    _, name, species = structure_id.split(":")
    return Prototype(name, tuple(species.split("-")))
