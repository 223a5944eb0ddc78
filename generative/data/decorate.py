"""Real prototypes of any crystal system, decorated with plausible elements.

The prototypes are pymatgen's AFLOW prototype library (Mehl et al. 2017):
real structures over all seven crystal systems, each with its AFLOW label and
the experimental reference it was taken from. A prototype's own species get
oxidation states from pymatgen's guess; new element choices then come from
pymatgen's ionic substitution probabilities, data-mined from the ICSD
(Hautier et al., *Inorg. Chem.* 50, 656 (2011)):

- **ionic** prototypes (a guess with cations and anions): charge-balanced
  substitutions starting from the prototype's composition
  (``SubstitutionPredictor.composition_prediction``), so rutile TiO2 gives
  SnO2, VO2, ... and never NaCl2;
- **intermetallic** and elemental metal prototypes (no guess with an anion;
  metals and metalloids only, at least one metal): each element stands in as
  its most common cation, and the same table picks similar elements, a metal
  for a metal site and a metal or metalloid for a metalloid site. Metals need
  no charge balance, so none is imposed; the share of unbalanced compositions
  is measured by :mod:`shares` instead. Covalent and molecular frameworks
  (graphite, A7 arsenic, S8) keep only their own element: a metal in a carbon
  net is no plausible crystal.

Every choice is restricted to prior-v1's element palette. The prototype's own
compound is kept too when its elements are in the palette (probability 1).
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Literal

import numpy as np
from pymatgen.core import Composition, Element, Species, Structure

DEFAULT_MAX_SITES = 20
DEFAULT_MAX_EDGE_ANGSTROM = 10.0
DEFAULT_THRESHOLD = 1e-3
"""Smallest substitution probability kept (the predictor's own default)."""
DEFAULT_PER_PROTOTYPE = 60
"""Most decorations per prototype; more are subsampled, weighted by probability."""
PROBABILITY_DIGITS = 12
"""Decimals kept of a substitution probability (the predictor's sums differ in the last digits)."""
SYMPREC = 0.1
"""spglib tolerance (Å) for crystal-system tags; loose enough for relaxed cells."""
CRYSTAL_SYSTEMS = ("triclinic", "monoclinic", "orthorhombic", "tetragonal", "trigonal", "hexagonal", "cubic")

Kind = Literal["identity", "ionic", "intermetallic"]


@dataclass(frozen=True)
class AflowPrototype:
    """One entry of the AFLOW prototype library.

    Attributes
    ----------
    key
        The AFLOW label, made unique by the original formula where the library repeats a label.
    structure
        The library's structure (experimental lattice and positions, Å).
    """

    key: str
    aflow: str
    mineral: str | None
    strukturbericht: str | None
    structure: Structure

    @property
    def formula(self) -> str:
        """Reduced formula of the original compound."""
        return self.structure.composition.reduced_formula


@cache
def aflow_library() -> dict[str, AflowPrototype]:
    """Every AFLOW library entry by key, in library order."""
    from pymatgen.analysis.prototypes import AFLOW_PROTOTYPE_LIBRARY

    labels = [e["tags"]["aflow"] for e in AFLOW_PROTOTYPE_LIBRARY]
    out: dict[str, AflowPrototype] = {}
    for entry, label in zip(AFLOW_PROTOTYPE_LIBRARY, labels, strict=True):
        structure = entry["snl"].structure
        key = label if labels.count(label) == 1 else f"{label}.{structure.composition.reduced_formula}"
        n = 2
        while key in out:  # the same label and formula twice: number the repeats
            key, n = f"{key}.{n}", n + 1
        tags = entry["tags"]
        out[key] = AflowPrototype(key, label, tags.get("mineral"), tags.get("strukturbericht"), structure)
    return out


def load_prototypes(
    *, max_sites: int = DEFAULT_MAX_SITES, max_edge: float = DEFAULT_MAX_EDGE_ANGSTROM
) -> list[AflowPrototype]:
    """Library entries with at most ``max_sites`` sites and every cell edge under ``max_edge`` (Å)."""
    return [
        p
        for p in aflow_library().values()
        if len(p.structure) <= max_sites and max(p.structure.lattice.abc) < max_edge
    ]


def crystal_system(structure: Structure, symprec: float = SYMPREC) -> str:
    """The crystal system spglib finds for ``structure`` (``hexagonal``, ``trigonal``, ...)."""
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    return SpacegroupAnalyzer(structure, symprec=symprec).get_crystal_system()


def spacegroup_symbol(structure: Structure, symprec: float = SYMPREC) -> str:
    """International space-group symbol spglib finds for ``structure``."""
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    return SpacegroupAnalyzer(structure, symprec=symprec).get_space_group_symbol()


@dataclass(frozen=True)
class Decoration:
    """A prototype with every element replaced by another (or itself).

    Attributes
    ----------
    substitution
        ``(original element, new element)`` pairs, sorted by the original element.
    probability
        The substitution probability of the ICSD-mined model (1 for the original compound).
    """

    prototype: str
    substitution: tuple[tuple[str, str], ...]
    probability: float
    kind: Kind

    @property
    def structure_id(self) -> str:
        """Stable id, e.g. ``prior2:A2B_tP6_136_f_a:O-Sn`` (new elements in original-element order)."""
        return f"prior2:{self.prototype}:{'-'.join(new for _, new in self.substitution)}"

    def structure(self) -> Structure:
        """The decorated cell, its volume scaled from the prototype's by the species' radii (Å³)."""
        proto = aflow_library()[self.prototype].structure
        mapping = dict(self.substitution)
        return radius_scaled(proto, [mapping[site.specie.symbol] for site in proto])

    @property
    def formula(self) -> str:
        """Reduced formula of the decorated compound."""
        mapping = dict(self.substitution)
        comp = aflow_library()[self.prototype].structure.composition
        return Composition({mapping[el.symbol]: n for el, n in comp.items()}).reduced_formula

    def as_dict(self) -> dict:
        """JSON-ready fields (the structure is rebuilt from the prototype)."""
        return {
            "structure_id": self.structure_id,
            "prototype": self.prototype,
            "substitution": [list(pair) for pair in self.substitution],
            "probability": self.probability,
            "kind": self.kind,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Decoration:
        """Inverse of :meth:`as_dict`."""
        return cls(d["prototype"], tuple(tuple(p) for p in d["substitution"]), d["probability"], d["kind"])


def radius_scaled(template: Structure, species: Sequence[str]) -> Structure:
    """``template`` with ``species`` on its sites, its volume scaled by the sum of atomic radii cubed."""
    old_r = sum(_radius(site.specie.symbol) ** 3 for site in template)
    new_r = sum(_radius(s) ** 3 for s in species)
    out = Structure(template.lattice, list(species), template.frac_coords)
    out.scale_lattice(template.volume * new_r / old_r)
    return out


@cache
def _radius(symbol: str) -> float:
    """Atomic radius (Å) for volume scaling; its cube stands for the volume an atom needs."""
    el = Element(symbol)
    return float(el.atomic_radius or el.atomic_radius_calculated or 1.5)


def prototype_oxidation_states(prototype: AflowPrototype) -> dict[str, int] | None:
    """Integer oxidation states of the original compound with cations and anions, else None."""
    return oxidation_states(prototype.structure.composition)


def oxidation_states(comp: Composition) -> dict[str, int] | None:
    """Integer oxidation states of a compound with cations and anions (pymatgen's guess), else None."""
    if len(comp) < 2:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        guesses = comp.oxi_state_guesses(max_sites=-50)
    for guess in guesses:
        if all(float(v).is_integer() for v in guess.values()) and min(guess.values()) < 0 < max(
            guess.values()
        ):
            return {el: int(v) for el, v in guess.items()}
    return None


@cache
def _predictor(threshold: float):
    from pymatgen.analysis.structure_prediction.substitution_probability import SubstitutionPredictor

    return SubstitutionPredictor(threshold=threshold)


def _cation_state(symbol: str) -> int | None:
    el = Element(symbol)
    states = [s for s in (el.common_oxidation_states or ()) if s > 0] or [
        s for s in (el.icsd_oxidation_states or ()) if s > 0
    ]
    return min(states) if states else None


def substitutions(
    prototype: AflowPrototype, palette: Sequence[str], *, threshold: float = DEFAULT_THRESHOLD
) -> list[Decoration]:
    """Every decoration of ``prototype`` above ``threshold`` within ``palette``, most probable first."""
    return list(_substitutions(prototype.key, tuple(sorted(set(palette))), threshold))


@cache
def _substitutions(key: str, palette: tuple[str, ...], threshold: float) -> tuple[Decoration, ...]:
    prototype = aflow_library()[key]
    choices = substitution_choices(prototype.structure.composition, palette, threshold=threshold)
    out = [Decoration(prototype.key, subs, probability, kind) for subs, probability, kind in choices]
    return tuple(sorted(out, key=lambda d: (-d.probability, d.structure_id)))


def substitution_choices(
    composition: Composition, palette: Sequence[str], *, threshold: float = DEFAULT_THRESHOLD
) -> list[tuple[tuple[tuple[str, str], ...], float, Kind]]:
    """Every element substitution of a compound above ``threshold`` within ``palette``.

    The rules of the module docstring (ionic, intermetallic, the original kept when its
    elements are in the palette): (``(original, new)`` pairs sorted by the original element,
    probability, kind), in the predictor's order, the original first.
    """
    allowed = set(palette)
    elements = sorted(el.symbol for el in composition)
    out: dict[tuple, tuple[tuple[tuple[str, str], ...], float, Kind]] = {}
    if set(elements) <= allowed:
        ident = tuple((e, e) for e in elements)
        out[ident] = (ident, 1.0, "identity")
    states = oxidation_states(composition)
    kind: Kind = "ionic"
    if states is None:
        cations = {e: _cation_state(e) for e in elements}
        if not _metallic(elements) or any(v is None for v in cations.values()):
            return list(out.values())  # a covalent or molecular framework (C, As, S8 ...): the original only
        states, kind = cations, "intermetallic"
    species = {e: Species(e, states[e]) for e in elements}
    predictor = _predictor(threshold)
    reduced = {el.symbol: n for el, n in composition.reduced_composition.items()}
    try:
        if kind == "ionic":
            comp = Composition({species[e]: n for e, n in reduced.items()})
            preds = predictor.composition_prediction(comp, to_this_composition=False)
        else:
            preds = predictor.list_prediction([str(species[e]) for e in elements], to_this_composition=False)
    except (KeyError, ValueError):  # a species missing from the ICSD table
        return list(out.values())
    for pred in preds:
        subs = {_symbol(k): _symbol(v) for k, v in pred["substitutions"].items()}
        new = [subs[e] for e in elements]
        if not set(new) <= allowed or len(set(new)) < len(new):
            continue  # off the palette, or two sublattices merged into one element
        if kind == "intermetallic" and not all(
            _same_character(o, n) for o, n in zip(elements, new, strict=True)
        ):
            continue
        key = tuple(zip(elements, new, strict=True))
        # Several predictions (other oxidation states) can name one substitution, and the
        # predictor's order and last float digits follow set iteration: keep the largest,
        # rounded, so that the same seed draws the same decorations in every process.
        probability = round(float(pred["probability"]), PROBABILITY_DIGITS)
        if key not in out or probability > out[key][1]:
            out[key] = (key, probability, kind)
    return list(out.values())


def _metallic(elements: Sequence[str]) -> bool:
    """A prototype an intermetallic decoration fits: metals and metalloids, at least one metal (FeSi, not C)."""
    return any(Element(e).is_metal for e in elements) and all(
        Element(e).is_metal or Element(e).is_metalloid for e in elements
    )


def _same_character(old: str, new: str) -> bool:
    """A metal site takes a metal; a metalloid site a metal or a metalloid (FeSi -> CoGe)."""
    el = Element(new)
    return el.is_metal if Element(old).is_metal else el.is_metal or el.is_metalloid


def _symbol(species) -> str:
    return Species.from_str(species).symbol if isinstance(species, str) else species.symbol


def _seed_for(seed: int, key: str) -> int:
    """A per-prototype seed that does not depend on which other prototypes are decorated."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little")


def choose(decorations: Sequence[Decoration], per_prototype: int, seed: int) -> list[Decoration]:
    """At most ``per_prototype`` decorations: the original always, the rest drawn by probability."""
    keep = [d for d in decorations if d.kind == "identity"]
    rest = [d for d in decorations if d.kind != "identity"]
    room = max(per_prototype - len(keep), 0)
    if len(rest) > room and rest:
        rng = np.random.default_rng(_seed_for(seed, rest[0].prototype))
        p = np.array([d.probability for d in rest])
        picked = rng.choice(len(rest), size=room, replace=False, p=p / p.sum())
        rest = [rest[i] for i in sorted(picked)]
    return keep + rest


def decorate_all(
    palette: Sequence[str],
    *,
    seed: int = 0,
    max_sites: int = DEFAULT_MAX_SITES,
    max_edge: float = DEFAULT_MAX_EDGE_ANGSTROM,
    threshold: float = DEFAULT_THRESHOLD,
    per_prototype: int = DEFAULT_PER_PROTOTYPE,
    prototypes: Sequence[str] | None = None,
) -> list[Decoration]:
    """Decorations of every kept prototype, shuffled by ``seed`` so that any prefix spans prototypes.

    Parameters
    ----------
    prototypes
        Only these library keys (default: every entry within the size limits).
    """
    protos = load_prototypes(max_sites=max_sites, max_edge=max_edge)
    if prototypes is not None:
        wanted = set(prototypes)
        protos = [p for p in protos if p.key in wanted]
    out: list[Decoration] = []
    for proto in protos:
        out += choose(substitutions(proto, palette, threshold=threshold), per_prototype, seed)
    order = np.random.default_rng(seed).permutation(len(out))
    return [out[i] for i in order]
