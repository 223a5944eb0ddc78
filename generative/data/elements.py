"""The element palette of the prior training set, defined once.

Every site list below is a chemically motivated choice (see ``docs/data.md``).
Actinides, noble gases and radioactive elements (Tc, Pm, Po, At, Rn, Fr, Ra)
never appear. The palette contains every element for which this machine has a
local PBE pseudopotential (:data:`LOCAL_PBE_ELEMENTS`), so campaigns started
from the prior set can reach DFT here.
"""

from __future__ import annotations

from functools import cache

from pymatgen.core import Element

LOCAL_PBE_ELEMENTS: tuple[str, ...] = (
    "B", "C", "N", "O", "H", "Si", "Ge", "I", "Cr", "Fe", "Ni", "Cu", "Rh", "Pt",
    "Be", "F", "Pd", "Ag", "As", "Ga",
)  # fmt: skip
"""Elements with PBE pseudopotentials in Debian's QE packages (see DESIGN.md)."""

EXCLUDED: frozenset[str] = frozenset(
    ["Tc", "Pm", "Po", "At", "Rn", "Fr", "Ra", "He", "Ne", "Ar", "Kr", "Xe"]
    + [Element.from_Z(z).symbol for z in range(89, 104)]
)
"""Radioactive elements, noble gases and actinides: never enumerated."""

ALKALI = ("Li", "Na", "K", "Rb", "Cs")
ALKALINE_EARTH = ("Be", "Mg", "Ca", "Sr", "Ba")
RARE_EARTH = (
    "Sc", "Y", "La", "Ce", "Pr", "Nd", "Sm", "Eu", "Gd", "Tb", "Dy", "Ho", "Er", "Tm", "Yb", "Lu",
)  # fmt: skip
TRANSITION_METALS = (
    "Ti", "V", "Cr", "Mn", "Fe", "Co", "Ni", "Cu", "Zn",
    "Zr", "Nb", "Mo", "Ru", "Rh", "Pd", "Ag", "Cd",
    "Hf", "Ta", "W", "Re", "Os", "Ir", "Pt", "Au", "Hg",
)  # fmt: skip
P_BLOCK_METALS = ("Al", "Ga", "In", "Tl", "Ge", "Sn", "Pb", "Sb", "Bi")

# Perovskites ABX3 (Pm-3m).
PEROVSKITE_A = ALKALI + ("Ca", "Sr", "Ba") + RARE_EARTH[1:]
PEROVSKITE_B = TRANSITION_METALS + P_BLOCK_METALS + RARE_EARTH + ("Li", "Mg", "Ca", "Sr")
"""B-site: d- and f-block transition metals, p-block metals, and the small s-block cations of
real cubic perovskites (BaLiF3, KMgF3, CsCaCl3, CsSrBr3, BaCeO3, CsEuCl3)."""
PEROVSKITE_X = ("O", "F", "Cl", "Br", "I", "S", "Se", "N")

# Heuslers X2YZ (L2_1): X a late transition metal, Y a transition or rare-earth metal
# (Pd2ErSn, Au2YIn type), Z a main-group element.
HEUSLER_X = ("V", "Cr", "Mn", "Fe", "Co", "Ni", "Cu", "Ru", "Rh", "Pd", "Ag", "Os", "Ir", "Pt", "Au")
HEUSLER_Y = RARE_EARTH + (
    "Ti", "V", "Cr", "Mn", "Fe", "Co", "Ni", "Cu", "Zn", "Zr", "Nb", "Mo", "Hf", "Ta", "W",
)  # fmt: skip
HEUSLER_Z = ("B", "Al", "Ga", "In", "Tl", "Si", "Ge", "Sn", "Pb", "As", "Sb", "Bi", "Mg", "Zn")

# Binaries AB.
B2_METALS = (
    ("Li", "Be", "Mg", "Ca", "Sr", "Ba")
    + RARE_EARTH
    + TRANSITION_METALS
    + ("Al", "Ga", "In", "Tl", "Sn", "Pb", "Bi")
)
"""B2 metal-metal pairs; pairs of two s-block or two rare-earth metals are skipped."""
B2_IONIC = (("Cs", "Tl", "Rb", "K"), ("F", "Cl", "Br", "I"))
"""CsCl-type halides (cation, anion): B2 halides of large monovalent cations."""

IONIC_CATIONS = (
    ALKALI + ALKALINE_EARTH + RARE_EARTH + TRANSITION_METALS
    + ("B", "Al", "Ga", "In", "Tl", "Si", "Ge", "Sn", "Pb", "Bi", "Sb")
)  # fmt: skip
IONIC_ANIONS = ("H", "F", "Cl", "Br", "I", "O", "S", "Se", "Te", "N", "P", "As", "Sb", "C")
"""B1 and B3 ionic pairs: a cation and an anion whose charges balance."""
COVALENT_IV = ("C", "Si", "Ge", "Sn")
"""Group-IV pairs (SiC, GeC, SiGe, ...) in zinc blende."""

GASES: tuple[str, ...] = ("H", "N", "O", "F", "Cl")
"""Elements referenced to a molecule in a large box (formation energies)."""


@cache
def cation_states(symbol: str) -> tuple[int, ...]:
    """Positive oxidation states of ``symbol`` seen in the ICSD (pymatgen), or common ones."""
    el = Element(symbol)
    states = set(el.icsd_oxidation_states or ()) | set(el.common_oxidation_states or ())
    return tuple(sorted(s for s in states if s > 0))


@cache
def anion_state(symbol: str) -> int:
    """The most negative oxidation state of ``symbol`` (O -2, N -3, C -4, Cl -1)."""
    return min(Element(symbol).oxidation_states)


def palette() -> tuple[str, ...]:
    """Every element that any prototype may use, sorted by atomic number."""
    from crystaloop.generative.data.prototypes import enumerate_all  # noqa: PLC0415 (cycle)

    symbols = {el for proto in enumerate_all() for el in proto.species}
    return tuple(sorted(symbols, key=lambda s: Element(s).Z))
