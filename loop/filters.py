"""The filter cascade: staged checks on decoded candidates, with a count in and out per stage.

Stages run in order (paper 002, Table 2, plus a universal-potential screen):

1. ``decoded``: at least one site and a physical lattice (edges above 1 Å, positive volume).
2. ``valid``: every minimum-image interatomic distance at least ``min_distance`` (Å).
3. ``stoichiometry`` (optional): the base compound's reduced formula, or an allowed anonymous one.
4. ``elements``: the campaign's allow/deny lists and the pseudopotential family's coverage.
   ``size`` (optional): at most ``max_nsites`` sites in the cell.
5. ``novel``: not equivalent (``StructureMatcher``) to training data or earlier campaign candidates.
6. ``window``: the CGCNN ensemble puts the candidate in the target window.
7. ``uip_screen``: CHGNet relaxation; its formation energy must lie in the widened window too.
8. ``unique``: equivalent survivors are grouped and the best-scored one is kept.

Every stage writes a verdict (and reason) into each candidate's filter trail.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Composition, Structure

from crystaloop.db.documents import FilterStep
from crystaloop.dft.hull import FormationHull
from crystaloop.generative.measures import matching_index, shortest_distance_below
from crystaloop.loop.config import ElementRules, TargetWindow

MIN_EDGE_ANGSTROM = 1.0
# Solids hold at least ~5 Å^3 per atom (diamond 5.7); denser decoded cells are not DFT starting
# points, and their neighbour graphs make a universal-potential relaxation slow and memory-hungry.
MIN_VOLUME_PER_ATOM = 3.0


@dataclass
class Candidate:
    """A candidate travelling through the cascade.

    Attributes
    ----------
    index
        Row in the sampled batch.
    structure
        The decoded structure (None when decoding failed).
    sample
        Sampling metadata of its row (decile, base formula ...).
    latent
        The latent vector it was decoded from.
    windows
        Per-candidate windows that replace the campaign's for their property (e.g. the paper's
        "within 20 % of the base E_f").
    """

    index: int
    structure: Structure | None
    sample: dict[str, Any] = field(default_factory=dict)
    latent: np.ndarray | None = None
    decode_reason: str | None = None
    windows: dict[str, TargetWindow] = field(default_factory=dict)
    trail: list[FilterStep] = field(default_factory=list)
    predicted: dict[str, dict[str, Any]] = field(default_factory=dict)
    score: float | None = None
    uip: dict[str, Any] = field(default_factory=dict)
    rejected_stage: str | None = None
    rejected_reason: str | None = None

    def record(self, stage: str, passed: bool, reason: str | None = None) -> None:
        """Append a verdict to the trail; a failure marks the candidate rejected at ``stage``."""
        self.trail.append(FilterStep(stage=stage, passed=passed, reason=reason))
        if not passed:
            self.rejected_stage, self.rejected_reason = stage, reason

    def window_for(self, target: TargetWindow) -> TargetWindow:
        """The window this candidate is judged against for ``target.property``."""
        return self.windows.get(target.property, target)


Verdict = tuple[bool, str | None]


class Stage(Protocol):
    """One cascade stage: a verdict (passed, reason) per candidate, in order."""

    name: str

    def judge(self, candidates: Sequence[Candidate]) -> list[Verdict]: ...


@dataclass
class StageCount:
    """Counts of one stage of one run."""

    stage: str
    n_in: int
    n_out: int
    seconds: float


# -- window arithmetic ------------------------------------------------------------------------


def widen(window: TargetWindow, tolerance: float) -> tuple[float, float]:
    """Window bounds moved outward by ``tolerance`` times their magnitude (open bounds infinite)."""
    lo = -math.inf if window.min is None else window.min - tolerance * abs(window.min)
    hi = math.inf if window.max is None else window.max + tolerance * abs(window.max)
    return lo, hi


def relative_window(prop: str, center: float, fraction: float) -> TargetWindow:
    """The window ``center ± fraction·|center|`` on ``prop`` (paper: E_f within 20 % of the base).

    Built without a user window's checks: a base at 0 gives an empty window, and a wide one
    may reach past the property's plausible range; neither is the user's input to reject.
    """
    half = abs(center) * fraction
    return TargetWindow.model_construct(property=prop, min=center - half, max=center + half)


# -- stages ------------------------------------------------------------------------------------


@dataclass
class DecodedStage:
    """Segmentation found at least one site and the lattice is physical."""

    name: str = "decoded"
    min_edge: float = MIN_EDGE_ANGSTROM

    def judge(self, candidates: Sequence[Candidate]) -> list[Verdict]:
        out = []
        for c in candidates:
            s = c.structure
            if s is None:
                out.append((False, c.decode_reason or "not decoded"))
            elif len(s) == 0:
                out.append((False, "no sites"))
            elif min(s.lattice.abc) <= self.min_edge:
                out.append((False, f"lattice edge {min(s.lattice.abc):.2f} Å below {self.min_edge:g} Å"))
            elif not s.volume > 0:
                out.append((False, "non-positive cell volume"))
            else:
                out.append((True, None))
        return out


@dataclass
class ValidityStage:
    """Every minimum-image interatomic distance is at least ``min_distance`` (Å)."""

    min_distance: float = 0.5
    name: str = "valid"

    def judge(self, candidates: Sequence[Candidate]) -> list[Verdict]:
        out = []
        for c in candidates:
            closest = shortest_distance_below(c.structure, self.min_distance)
            if closest is None:
                out.append((True, None))
            else:
                out.append((False, f"atoms {closest:.2f} Å apart (minimum {self.min_distance:g} Å)"))
        return out


#: A formula of each material class (its anonymous formula is what the class allows).
CLASS_FORMULAS: dict[str, str] = {"binary": "NaCl", "perovskite": "SrTiO3", "heusler": "Cu2MnAl"}


def material_class_formulas(classes: Sequence[str]) -> list[str]:
    """Formulas standing for ``classes`` (AB, ABC3, ABC2); empty when every class is allowed."""
    if set(CLASS_FORMULAS) <= set(classes):
        return []
    return [CLASS_FORMULAS[c] for c in classes]


def anonymous_formula(formula: str) -> str:
    """pymatgen's anonymised reduced formula ('SrTiO3' -> 'ABC3')."""
    return Composition(formula).anonymized_formula


@dataclass
class StoichiometryStage:
    """Same reduced formula as the candidate's base compound(s), or an allowed anonymous formula."""

    use_base: bool = True
    allowed_formulas: Sequence[str] = ()
    name: str = "stoichiometry"

    def __post_init__(self) -> None:
        self._anonymous = {anonymous_formula(f) for f in self.allowed_formulas}

    def judge(self, candidates: Sequence[Candidate]) -> list[Verdict]:
        out = []
        for c in candidates:
            comp = c.structure.composition
            bases = c.sample.get("base_formulas") or (
                [c.sample["base_formula"]] if c.sample.get("base_formula") else []
            )
            if self.use_base and bases:
                reduced = {Composition(b).reduced_formula for b in bases}
                if comp.reduced_formula in reduced:
                    out.append((True, None))
                    continue
            if comp.anonymized_formula in self._anonymous:
                out.append((True, None))
                continue
            if not (self.use_base and bases) and not self._anonymous:
                out.append((True, None))
                continue
            wanted = sorted({Composition(b).reduced_formula for b in bases} | self._anonymous)
            out.append((False, f"{comp.reduced_formula} is not {' or '.join(wanted)}"))
        return out


@dataclass
class ElementStage:
    """Inside the campaign's allow/deny lists and, when given, the pseudopotential family."""

    rules: ElementRules
    covered: frozenset[str] | None = None
    family: str | None = None
    name: str = "elements"

    def judge(self, candidates: Sequence[Candidate]) -> list[Verdict]:
        out = []
        for c in candidates:
            symbols = {el.symbol for el in c.structure.composition.elements}
            if not self.rules.permits(symbols):
                denied = sorted(symbols & set(self.rules.deny))
                outside = sorted(symbols - set(self.rules.allow or symbols))
                out.append((False, f"element(s) {', '.join(denied + outside)} not allowed"))
            elif self.covered is not None and not symbols <= self.covered:
                missing = ", ".join(sorted(symbols - self.covered))
                out.append((False, f"no pseudopotential for {missing} in {self.family}"))
            else:
                out.append((True, None))
        return out


@dataclass
class SizeStage:
    """At most ``max_nsites`` sites in the cell, so that only small cells reach DFT.

    With ``symprec`` (Å) a larger cell passes when its primitive cell at that tolerance is small
    enough, and the candidate goes on as that primitive cell, refined to its symmetry: the decoder
    draws rock salt as its 8-site cubic cell, which the CHGNet screen and DFT then run as 2 sites.
    """

    max_nsites: int
    symprec: float | None = None
    name: str = "size"

    def judge(self, candidates: Sequence[Candidate]) -> list[Verdict]:
        out = []
        for c in candidates:
            n = len(c.structure)
            if n > self.max_nsites and self.symprec is not None:
                primitive = primitive_cell(c.structure, self.symprec)
                if len(primitive) <= self.max_nsites:
                    c.structure, n = primitive, len(primitive)
            if n > self.max_nsites:
                out.append((False, f"{n} sites in the cell, above max_nsites {self.max_nsites}"))
            else:
                out.append((True, None))
        return out


@dataclass
class CrystalSystemStage:
    """The candidate's crystal system (spglib at ``symprec`` Å) is one of ``systems``."""

    systems: Sequence[str]
    symprec: float = 0.1
    name: str = "crystal_system"

    def judge(self, candidates: Sequence[Candidate]) -> list[Verdict]:
        from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

        out = []
        for c in candidates:
            try:
                system = SpacegroupAnalyzer(c.structure, symprec=self.symprec).get_crystal_system()
            except (TypeError, ValueError):  # spglib found no cell
                system = "triclinic"
            if system in self.systems:
                out.append((True, None))
            else:
                out.append((False, f"{system}, not one of crystal_systems {', '.join(self.systems)}"))
        return out


def primitive_cell(structure: Structure, symprec: float) -> Structure:
    """The primitive standard cell spglib finds at ``symprec`` (Å); ``structure`` itself if none."""
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    try:
        primitive = SpacegroupAnalyzer(structure, symprec=symprec).get_primitive_standard_structure()
    except (TypeError, ValueError):  # spglib found no cell
        return structure
    if primitive.composition.reduced_formula != structure.composition.reduced_formula:
        return structure
    return Structure(primitive.lattice, primitive.species, primitive.frac_coords)


@dataclass
class NoveltyStage:
    """Not equivalent to a known structure of the same reduced formula.

    ``known(reduced_formula)`` returns the structures to compare with (training data and earlier
    campaign candidates); it is called once per formula.
    """

    known: Callable[[str], Sequence[Structure]]
    matcher: StructureMatcher = field(default_factory=StructureMatcher)
    name: str = "novel"

    def judge(self, candidates: Sequence[Candidate]) -> list[Verdict]:
        cache: dict[str, Sequence[Structure]] = {}
        out = []
        for c in candidates:
            formula = c.structure.composition.reduced_formula
            if formula not in cache:
                cache[formula] = self.known(formula)
            if matching_index(c.structure, cache[formula], self.matcher) is not None:
                out.append((False, f"{formula} is already known (training data or campaign)"))
            else:
                out.append((True, None))
        return out


class Predictor(Protocol):
    """Property model: means and standard deviations (n, n_properties), property units."""

    properties: list[str]
    version: str

    def predict(self, structures: Sequence[Structure]) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass
class WindowStage:
    """The ensemble puts the candidate in every target window it can predict.

    With ``min_probability`` None the mean must lie in the window widened by ``tolerance``;
    otherwise P(in window) under N(mean, std^2) must reach ``min_probability``. The score is the
    product over targets of P(in window); every predicted property is stored on the candidate.
    """

    predictor: Predictor
    targets: Sequence[TargetWindow]
    tolerance: float = 0.2
    min_probability: float | None = None
    name: str = "window"

    def judge(self, candidates: Sequence[Candidate]) -> list[Verdict]:
        if not candidates:
            return []
        mean, std = self.predictor.predict([c.structure for c in candidates])
        names = list(self.predictor.properties)
        out = []
        for row, c in enumerate(candidates):
            c.predicted = {
                p: {
                    "mean": _finite(mean[row, i]),
                    "std": _finite(std[row, i]),
                    "model_version": self.predictor.version,
                }
                for i, p in enumerate(names)
            }
            score, failures = 1.0, []
            for target in self.targets:
                if target.property not in names:
                    continue
                i = names.index(target.property)
                window = c.window_for(target)
                m, s = float(mean[row, i]), float(std[row, i])
                probability = window.probability(m, s)
                score *= probability
                if self.min_probability is None:
                    lo, hi = widen(window, self.tolerance)
                    ok = math.isfinite(m) and lo <= m <= hi
                    why = f"{target.property} {m:.3g} outside [{lo:.3g}, {hi:.3g}]"
                else:
                    ok = probability >= self.min_probability
                    why = f"P({target.property} in window) {probability:.2f} < {self.min_probability:g}"
                if not ok:
                    failures.append(why)
            c.score = score
            out.append((not failures, "; ".join(failures) or None))
        return out


def _finite(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


class Relaxer(Protocol):
    """A universal potential: relax a structure, return the relaxed structure and energies."""

    version: str

    def relax(self, structure: Structure) -> dict[str, Any]: ...


@dataclass
class UIPStage:
    """CHGNet relaxes the candidate; its formation energy must lie in the widened window.

    ``references`` are elemental energies (eV/atom) on the same scale as the prior data's
    labels. The relaxed structure, energies (eV/atom), formation energy, mean and max site
    displacement (Å), volume change and wall time (s) go into the candidate's ``uip`` record.
    Cells denser than ``min_volume_per_atom`` (Å^3) are rejected without a relaxation. A candidate
    equivalent (``StructureMatcher``, same number of sites) to one relaxed earlier in the same call
    takes that relaxation's results (``shared`` in its record) instead of running another. With
    ``max_relaxations`` the best-scored candidates (highest P in window) are relaxed first and the
    ones left when that many relaxations have run are rejected unscreened.
    """

    relaxer: Relaxer
    references: Callable[[Iterable[str]], dict[str, float]]
    targets: Sequence[TargetWindow]
    tolerance: float = 0.2
    max_volume_change: float = 0.3
    min_volume_per_atom: float = MIN_VOLUME_PER_ATOM
    matcher: StructureMatcher = field(default_factory=StructureMatcher)
    max_relaxations: int | None = None
    hull: FormationHull | None = None
    name: str = "uip_screen"

    def judge(self, candidates: Sequence[Candidate]) -> list[Verdict]:
        # Candidates equivalent to one relaxed before in this call share its relaxation: decoders
        # often repeat a crystal many times, and each relaxation costs seconds.
        done: dict[str, list[tuple[Structure, dict[str, Any] | Exception]]] = defaultdict(list)
        verdicts: dict[int, Verdict] = {}
        for i in sorted(range(len(candidates)), key=lambda i: (-(candidates[i].score or 0.0), i)):
            verdicts[i] = self._screen(candidates[i], done)
        return [verdicts[i] for i in range(len(candidates))]

    def _screen(self, c: Candidate, done: dict[str, list]) -> Verdict:
        per_atom = c.structure.volume / len(c.structure)
        if per_atom < self.min_volume_per_atom:
            return False, f"{per_atom:.1f} Å^3/atom is too dense to relax"
        start = time.perf_counter()
        group = done[c.structure.composition.reduced_formula]
        initial, result = next(
            ((s, r) for s, r in group if len(s) == len(c.structure) and self.matcher.fit(c.structure, s)),
            (c.structure, None),
        )
        if result is None:
            relaxed = sum(len(g) for g in done.values())
            if self.max_relaxations is not None and relaxed >= self.max_relaxations:
                return False, f"not screened: {self.max_relaxations} relaxations went to better-scored ones"
            try:
                result = self.relaxer.relax(c.structure)
            except Exception as exc:  # a potential that fails on a wild cell rejects the cell
                result = exc
            group.append((c.structure, result))
        if isinstance(result, Exception):
            return False, f"relaxation failed: {type(result).__name__}"
        final: Structure = result["structure"]
        comp = final.composition.fractional_composition
        refs = self.references(el.symbol for el in comp.elements)
        formation = result["energy_per_atom"] - sum(x * refs[el.symbol] for el, x in comp.items())
        shift = displacement(initial, final)
        volume_change = final.volume / initial.volume - 1.0
        c.uip = {
            "model": self.relaxer.version,
            "structure": final.as_dict(),
            "initial_energy_per_atom": result["initial_energy_per_atom"],
            "energy_per_atom": result["energy_per_atom"],
            "formation_energy_per_atom": formation,
            "mean_displacement_angstrom": float(shift.mean()),
            "max_displacement_angstrom": float(shift.max()),
            "volume_change": volume_change,
            "steps": result["steps"],
            "converged": result["converged"],
            "stopped_early": result.get("stopped_early", False),
            "shared": initial is not c.structure,
            "seconds": time.perf_counter() - start,
        }
        failures = []
        if abs(volume_change) > self.max_volume_change:
            failures.append(f"volume changed by {100 * volume_change:+.0f} %")
        screened = {"formation_energy_per_atom": formation}
        if self.hull is not None:
            screened["energy_above_hull"] = formation - self.hull.hull_energy_per_atom(final.composition)
            c.uip["energy_above_hull"] = screened["energy_above_hull"]
        for target in self.targets:
            value = screened.get(target.property)
            if value is None:
                continue
            lo, hi = widen(c.window_for(target), self.tolerance)
            if not lo <= value <= hi:
                label = "E_f" if target.property == "formation_energy_per_atom" else "E_hull"
                failures.append(f"CHGNet {label} {value:.3f} eV/atom outside [{lo:.3g}, {hi:.3g}]")
        return not failures, "; ".join(failures) or None


@dataclass
class HullPhasesStage:
    """The CHGNet hull of the candidate's chemical system holds at least ``min_phases`` phases
    besides the elements, so that its energy above the hull means more than its formation energy."""

    hull: FormationHull
    min_phases: int
    name: str = "hull_phases"

    def judge(self, candidates: Sequence[Candidate]) -> list[Verdict]:
        out = []
        for c in candidates:
            elements = [el.symbol for el in c.structure.composition.elements]
            n = len(self.hull.phases_in(elements))
            ok = n >= self.min_phases
            why = f"the {'-'.join(sorted(elements))} hull holds {n} phases besides the elements (< {self.min_phases})"
            out.append((ok, None if ok else why))
        return out


def displacement(initial: Structure, final: Structure) -> np.ndarray:
    """Per-site minimum-image displacement (Å), fractional shifts measured in the final lattice."""
    delta = final.frac_coords - initial.frac_coords
    delta -= np.round(delta)
    return np.linalg.norm(delta @ final.lattice.matrix, axis=1)


@dataclass
class UniqueStage:
    """Group equivalent candidates (same reduced formula, then ``StructureMatcher``); keep the best.

    "Best" is the highest score (P in window), ties broken by batch order.
    """

    matcher: StructureMatcher = field(default_factory=StructureMatcher)
    name: str = "unique"

    def judge(self, candidates: Sequence[Candidate]) -> list[Verdict]:
        groups: dict[str, list[int]] = defaultdict(list)
        for i, c in enumerate(candidates):
            groups[c.structure.composition.reduced_formula].append(i)
        verdicts: list[Verdict] = [(True, None)] * len(candidates)
        for members in groups.values():
            members.sort(key=lambda i: (-(candidates[i].score or 0.0), candidates[i].index))
            kept: list[int] = []
            for i in members:
                j = matching_index(candidates[i].structure, [candidates[k].structure for k in kept], self.matcher)
                if j is None:
                    kept.append(i)
                else:
                    verdicts[i] = (False, f"equivalent to sample {candidates[kept[j]].index}")
        return verdicts


# -- the cascade -------------------------------------------------------------------------------


@dataclass
class FilterCascade:
    """Stages in order; :meth:`run` returns the survivors and a count per stage."""

    stages: Sequence[Stage]

    def run(
        self,
        candidates: Sequence[Candidate],
        *,
        progress: Callable[[str, int, int], None] | None = None,
    ) -> tuple[list[Candidate], list[StageCount]]:
        """Judge ``candidates`` stage by stage; each stage sees only the previous survivors."""
        alive = list(candidates)
        counts = []
        for k, stage in enumerate(self.stages):
            start = time.perf_counter()
            verdicts = stage.judge(alive) if alive else []
            survivors = []
            for c, (passed, reason) in zip(alive, verdicts, strict=True):
                c.record(stage.name, passed, reason)
                if passed:
                    survivors.append(c)
            counts.append(StageCount(stage.name, len(alive), len(survivors), time.perf_counter() - start))
            alive = survivors
            if progress is not None:
                progress(stage.name, k + 1, len(self.stages))
        return alive, counts
