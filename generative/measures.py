"""Structure measures of generated crystals, as the field reports them.

Structural validity (every minimum-image distance at least 0.5 Angstrom, CDVAE's rule),
compositional validity (pymatgen's oxidation-state guess, and SMACT's charge-neutrality and
electronegativity rules as CDVAE, DiffCSP and MatterGen report it), novelty by composition, by
structure (same reduced formula, ``StructureMatcher``) and by prototype (species anonymised),
uniqueness within a batch, the prior's prototypes, and the matching of decoded sites to true ones.
The filter cascade, the evaluation and the benchmarks all measure structures with these.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

MIN_DISTANCE_ANGSTROM = 0.5


def minimum_distance(structure) -> float:
    """Shortest distance (Angstrom) between any two sites, periodic images of a site included."""
    lattice = structure.lattice
    # a site's nearest own image is a short lattice vector: the shortest of the 26 neighbours
    shifts = np.array(
        [[i, j, k] for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1) if (i, j, k) != (0, 0, 0)]
    )
    own = float(np.min(np.linalg.norm(shifts @ lattice.matrix, axis=1)))
    if len(structure) < 2:
        return own
    matrix = structure.distance_matrix
    pairs = matrix[np.triu_indices(len(structure), 1)]
    return min(own, float(pairs.min()))


def shortest_distance_below(structure, cutoff: float) -> float | None:
    """The shortest periodic interatomic distance below ``cutoff`` (Angstrom), or None if there is none."""
    # exclude_self drops only a site's zero-distance pair with itself, so coincident sites count.
    _, _, _, distances = structure.get_neighbor_list(r=cutoff, exclude_self=True)
    return float(distances.min()) if len(distances) else None


def is_valid(structure, min_distance: float = MIN_DISTANCE_ANGSTROM) -> bool:
    """Every minimum-image distance, including a site's own periodic images, is >= ``min_distance``."""
    return structure is not None and minimum_distance(structure) >= min_distance


def charge_balanced(structure) -> bool:
    """pymatgen's oxidation-state guess finds a neutral assignment of the composition."""
    composition = structure.composition.reduced_composition
    if len(composition.elements) == 1:
        return True  # an elemental crystal is neutral (a metal or a covalent solid)
    try:
        return len(composition.oxi_state_guesses(max_sites=-50)) > 0
    except ValueError:
        return False


def smact_valid(structure) -> bool:
    """SMACT's compositional validity: a charge-neutral combination of common oxidation states that
    passes the Pauling electronegativity test, with all-metal compositions (alloys) valid, as
    CDVAE, DiffCSP and MatterGen count it."""
    from smact.screening import smact_validity

    composition = structure.composition.reduced_composition
    if len(composition.elements) == 1:
        return True
    return bool(smact_validity(composition, use_pauling_test=True, include_alloys=True))


RECONSTRUCTION_MATCHER = {"ltol": 0.3, "stol": 0.5, "angle_tol": 10.0}
"""StructureMatcher tolerances of the field's reconstruction match rate (CDVAE, DiffCSP)."""


def reconstruction_match(true, decoded) -> bool:
    """``decoded`` is the same crystal as ``true`` under :data:`RECONSTRUCTION_MATCHER` (False if None)."""
    from pymatgen.analysis.structure_matcher import StructureMatcher

    if decoded is None:
        return False
    try:
        return bool(StructureMatcher(**RECONSTRUCTION_MATCHER).fit(true, decoded))
    except (ValueError, RuntimeError):  # a degenerate decoded cell
        return False


def composition_novel_flags(structures: Sequence, references: Sequence) -> list[bool]:
    """True where no reference record has the structure's reduced formula (no structural check)."""
    known = {record.structure.composition.reduced_formula for record in references}
    return [s.composition.reduced_formula not in known for s in structures]


def matching_index(structure, others: Sequence, matcher=None) -> int | None:
    """Index of the first of ``others`` that ``matcher`` (default ``StructureMatcher()``) finds
    equivalent to ``structure``, else None: the one rule of novelty and uniqueness."""
    if matcher is None:
        from pymatgen.analysis.structure_matcher import StructureMatcher

        matcher = StructureMatcher()
    return next((i for i, other in enumerate(others) if matcher.fit(structure, other)), None)


def novelty_flags(structures: Sequence, references: Sequence) -> list[bool]:
    """True where no reference structure of the same reduced formula is StructureMatcher-equivalent."""
    from pymatgen.analysis.structure_matcher import StructureMatcher

    by_formula: dict[str, list] = {}
    for record in references:
        by_formula.setdefault(record.structure.composition.reduced_formula, []).append(record.structure)
    matcher = StructureMatcher()
    flags = []
    for structure in structures:
        same = by_formula.get(structure.composition.reduced_formula, [])
        flags.append(matching_index(structure, same, matcher) is None)
    return flags


def unique_flags(structures: Sequence) -> list[bool]:
    """True for the first structure of each StructureMatcher-equivalence group in the batch."""
    from pymatgen.analysis.structure_matcher import StructureMatcher

    matcher = StructureMatcher()
    seen: dict[str, list] = {}
    flags = []
    for structure in structures:
        group = seen.setdefault(structure.composition.reduced_formula, [])
        first = matching_index(structure, group, matcher) is None
        if first:
            group.append(structure)
        flags.append(first)
    return flags


def _anonymous_matcher():
    from pymatgen.analysis.structure_matcher import StructureMatcher

    return StructureMatcher(scale=True, attempt_supercell=True)


def _fits_anonymous(matcher, structure, other) -> bool:
    try:
        return bool(matcher.fit_anonymous(structure, other))
    except Exception:  # noqa: BLE001 -- pymatgen raises several types on degenerate cells
        return False


def reference_prototypes(references: Sequence, labels: Sequence[str | None] | None = None) -> dict[str, list]:
    """The distinct structure types of ``references`` (records with a ``structure``), species
    anonymised, grouped by anonymised formula.

    ``labels`` (one per record, e.g. the prior set's prototype names) mark records known to share
    a type: one of each label is kept without matching. Unlabelled records are kept when no kept
    structure of their anonymised formula matches them (``fit_anonymous``, scaled volumes).
    """
    matcher = _anonymous_matcher()
    labels = list(labels) if labels is not None else [None] * len(references)
    seen_labels: set[tuple[str, str]] = set()
    groups: dict[str, list] = {}
    for record, label in zip(references, labels, strict=True):
        structure = record.structure
        key = structure.composition.reduced_composition.anonymized_formula
        if label is not None:
            if (key, label) in seen_labels:
                continue
            seen_labels.add((key, label))
            groups.setdefault(key, []).append(structure)
            continue
        kept = groups.setdefault(key, [])
        if not any(_fits_anonymous(matcher, structure, other) for other in kept):
            kept.append(structure)
    return groups


def prototype_novel_flags(structures: Sequence, prototypes: dict[str, list]) -> list[bool]:
    """True where no reference prototype (:func:`reference_prototypes`) matches the structure with
    species anonymised: a structure type the references do not hold."""
    matcher = _anonymous_matcher()
    flags = []
    for structure in structures:
        key = structure.composition.reduced_composition.anonymized_formula
        same = prototypes.get(key, [])
        flags.append(not any(_fits_anonymous(matcher, structure, other) for other in same))
    return flags


@lru_cache(maxsize=1)
def prior_prototypes(max_sites: int = 40) -> dict[str, list]:
    """One structure per prototype of the shipped prior set, grouped by anonymised formula (see
    :func:`~crystaloop.generative.measures.reference_prototypes`): a structure type the prior
    holds is one of these, whatever its species."""
    from crystaloop.generative.data.prior import read_prior
    from crystaloop.generative.data.prototypes import Prototype
    from crystaloop.generative.train.data import LabelledStructure

    seen, records, names = set(), [], []
    for rec in read_prior()["records"]:
        key = (rec["prototype"], len(set(rec["species"])))
        if key in seen or not rec.get("converged") or rec.get("reject_reason"):
            continue
        proto = Prototype(rec["prototype"], tuple(rec["species"]))
        if proto.atoms_per_conventional > max_sites:
            continue
        seen.add(key)
        records.append(LabelledStructure(rec["structure_id"], proto.conventional(rec["a0"]), {}))
        names.append(rec["prototype"])
    return reference_prototypes(records, names)


@dataclass(frozen=True)
class PrototypeTemplate:
    """One of the prior's structure types as a StructureMatcher template."""

    name: str
    structure: object


def prototype_templates() -> list[PrototypeTemplate]:
    """Ideal B1, B2, B3, perovskite and L21 cells with distinct placeholder species."""
    from crystaloop.generative.data.prototypes import PROTOTYPES, Prototype

    placeholders = ("Na", "Cl", "Br")
    out = []
    for name in PROTOTYPES:
        roles = 3 if name in ("perovskite", "L21") else 2
        out.append(PrototypeTemplate(name, Prototype(name, placeholders[:roles]).conventional(5.0)))
    return out


def nearest_prototype(structure, templates: Sequence[PrototypeTemplate]) -> str:
    """Name of the template the structure matches with species anonymised, else its space group."""
    from pymatgen.analysis.structure_matcher import StructureMatcher
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    matcher = StructureMatcher(scale=True, attempt_supercell=True)
    for template in templates:
        if len(template.structure.composition.elements) != len(structure.composition.elements):
            continue
        try:
            if matcher.fit_anonymous(structure, template.structure):
                return template.name
        except Exception:  # noqa: BLE001 -- pymatgen raises several types on degenerate cells
            continue
    try:
        return f"other ({SpacegroupAnalyzer(structure, symprec=0.1).get_space_group_symbol()})"
    except Exception:  # noqa: BLE001
        return "other"


def matched_site_errors(
    true_frac: np.ndarray,
    true_z: np.ndarray,
    pred_frac: np.ndarray,
    pred_z: np.ndarray,
    lattice,
    pred_lattice=None,
) -> tuple[np.ndarray, np.ndarray]:
    """Optimal one-to-one matching of sites by minimum-image distance.

    With only ``lattice`` both site sets are placed in it (the fractional error alone). With
    ``pred_lattice`` too, each site set is placed in its own cell: a true site at ``f @ lattice``
    and its predicted partner, at the periodic image nearest in fractional coordinates, at
    ``f' @ pred_lattice``, so an error of the decoded lattice moves the sites as well.
    Returns the matched distances (Angstrom) and |Z_pred - Z_true| for min(N, N') pairs.
    """
    if len(true_frac) == 0 or len(pred_frac) == 0:
        return np.zeros(0), np.zeros(0, dtype=int)
    delta = pred_frac[None, :, :] - true_frac[:, None, :]
    delta -= np.round(delta)
    if pred_lattice is None:
        cart = delta @ np.asarray(lattice.matrix)
    else:
        image = true_frac[:, None, :] + delta
        cart = image @ np.asarray(pred_lattice.matrix) - (true_frac @ np.asarray(lattice.matrix))[:, None, :]
    cost = np.linalg.norm(cart, axis=-1)
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(cost)
    return cost[rows, cols], np.abs(pred_z[cols] - true_z[rows])
