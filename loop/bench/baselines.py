"""The field's two model-free baselines of ``bench campaign``: random structure search and
prototype substitution.

- **Random structure search** (``rss``, AIRSS-style): random symmetric crystals of the palette's
  compositions, made with pyxtal. A draw picks a material class of the campaign, distinct palette
  elements for its roles (the campaign's element rules apply), a space group at random among
  those whose Wyckoff positions fit the composition, a number of formula units that keeps the
  primitive cell within ``filters.max_nsites``, and pyxtal's volume estimate
  (:data:`VOLUME_FACTOR`). Only validity (``filters.min_distance``) and size are checked; no
  model, no novelty or stoichiometry filter.
- **Prototype substitution** (``substitution``): known prototypes, the AFLOW library entries that
  prior-v2 is built from, of the campaign's stoichiometries and size limit, decorated with palette
  elements by pymatgen's ionic substitution probabilities (Hautier et al. 2011), exactly as the
  prior-v2 builder decorates them (:mod:`crystaloop.loop.prototypes`, which a campaign's
  ``sampling.mode: prototypes`` draws from as well).
  The prototype's own compound and decorations equivalent to a prior compound are known, not
  predictions, and are left out; the rest are drawn in proportion to their probability, without
  replacement, through the same validity and size checks. (The prior-v1 set already holds the
  charge-balanced decorations of its own cubic prototypes, so those alone leave almost nothing
  to substitute: 16 crystals for the benchmark's palette.)

Both arms never draw the same crystal twice (``exclude``), and their draws are reproducible for
a random generator's seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pymatgen.core import Composition, Structure

from crystaloop.loop.prototypes import (  # noqa: F401 -- the substitution arm's draws, re-exported
    draw_substitution,
    model_free_checks,
    palette_of,
    passes,
    substitution_pool,
)

#: pyxtal's volume factor (its default): the random cell's volume over the sum of atomic volumes.
VOLUME_FACTOR = 1.1
#: Reduced composition of each material class, in role order (AB, ABX3, X2YZ).
CLASS_COUNTS: dict[str, tuple[int, ...]] = {"binary": (1, 1), "perovskite": (1, 1, 3), "heusler": (2, 1, 1)}
#: Lattice points of a conventional cell by the space group's centring letter (pyxtal's settings).
_CENTRING = {"P": 1, "A": 2, "B": 2, "C": 2, "I": 2, "F": 4, "R": 3}


@dataclass(frozen=True)
class RandomCrystal:
    """One random structure search draw: its species by role, space group and formula units."""

    material_class: str
    species: tuple[str, ...]
    spacegroup: int
    formula_units: int

    @property
    def formula(self) -> str:
        counts = CLASS_COUNTS[self.material_class]
        return Composition(dict(zip(self.species, counts, strict=True))).reduced_formula


def random_crystal(
    config, rng: np.random.Generator, *, max_tries: int = 50
) -> tuple[RandomCrystal, Structure] | None:
    """One random symmetric crystal of ``config``'s classes and palette (see the module docstring).

    The structure is the primitive cell of pyxtal's crystal; it is not yet checked for validity.
    None when ``max_tries`` draws found no crystal pyxtal could build (a palette or size limit
    that fits no space group).
    """
    from pyxtal import pyxtal
    from pyxtal.symmetry import Group

    palette = palette_of(config)
    classes = [c for c in config.material_classes if c in CLASS_COUNTS]
    max_nsites = config.filters.max_nsites or 20
    for _ in range(max_tries):
        cls = classes[int(rng.integers(len(classes)))]
        counts = CLASS_COUNTS[cls]
        species = tuple(str(s) for s in rng.choice(palette, size=len(counts), replace=False))
        if not config.elements.permits(species):
            continue
        sg = int(rng.integers(1, 231))
        group = Group(sg)
        # Formula units in the conventional cell whose primitive cell stays within the size limit.
        most = max_nsites * _CENTRING[group.symbol[0]] // sum(counts)
        fits = [z for z in range(1, most + 1) if group.check_compatible([z * c for c in counts])[0]]
        if not fits:
            continue
        z = fits[int(rng.integers(len(fits)))]
        crystal = pyxtal()
        try:
            crystal.from_random(
                3, sg, list(species), [z * c for c in counts], factor=VOLUME_FACTOR, random_state=rng
            )
        except Exception:  # noqa: BLE001 -- pyxtal raises several types when it cannot place the sites
            continue
        if not crystal.valid:
            continue
        structure = crystal.to_pymatgen().get_primitive_structure(tolerance=0.01)
        return RandomCrystal(cls, species, sg, z), structure
    return None


def draw_rss(
    config,
    *,
    n: int,
    rng: np.random.Generator,
    exclude: dict[str, list[Structure]] | None = None,
    max_draws: int | None = None,
) -> list[tuple[RandomCrystal, Structure]]:
    """Up to ``n`` random crystals (:func:`random_crystal`) that pass validity and size.

    ``exclude`` maps a reduced formula to the crystals drawn before (earlier rounds); a draw that
    ``StructureMatcher`` finds equivalent to one of them, or to an earlier draw of this call, is
    skipped, and the kept draws are added to it. At most ``max_draws`` (default ``200 n``) draws;
    none more once :func:`random_crystal` finds nothing to build.
    """
    from pymatgen.analysis.structure_matcher import StructureMatcher

    from crystaloop.generative.measures import matching_index

    exclude = exclude if exclude is not None else {}
    stages = model_free_checks(config)
    matcher = StructureMatcher()
    out: list[tuple[RandomCrystal, Structure]] = []
    for _ in range(max_draws or 200 * n):
        if len(out) >= n:
            break
        drawn = random_crystal(config, rng)
        if drawn is None:
            break  # nothing fits the palette and size limit
        info, structure = drawn
        checked = passes(stages, structure)
        if checked is None:
            continue
        earlier = exclude.setdefault(checked.composition.reduced_formula, [])
        if matching_index(checked, earlier, matcher) is not None:
            continue
        earlier.append(checked)
        out.append((info, checked))
    return out
