"""Convex hulls of formation energies, one engine at a time.

A :class:`FormationHull` holds phases (a reduced formula and a formation energy per atom, each
with a source id) computed by one engine, and answers a candidate's energy above the hull of its
chemical system, its decomposition, and how many phases other than the elements that hull holds.
pymatgen's :class:`~pymatgen.analysis.phase_diagram.PhaseDiagram` does the hull arithmetic; the
elements enter at zero, so every energy here is a formation energy (eV/atom).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import combinations

from pydantic import BaseModel, ConfigDict, Field
from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram
from pymatgen.core import Composition


@dataclass(frozen=True)
class HullPhase:
    """One competing phase: its composition, formation energy (eV/atom) and where it came from."""

    formula: str
    formation_energy_per_atom: float
    source: str


class DecompositionPart(BaseModel):
    """One product of a decomposition and its share of the atoms."""

    model_config = ConfigDict(extra="forbid")

    formula: str
    fraction: float = Field(description="Share of the candidate's atoms that go to this phase.")
    source: str = Field(description="The phase's id (a task, a prior record, or 'element').")


class Stability(BaseModel):
    """A formation energy placed against one engine's hull."""

    model_config = ConfigDict(extra="forbid")

    energy_above_hull: float = Field(
        description="eV/atom above the hull of the other phases; negative when below it (a new ground state)."
    )
    hull_energy_per_atom: float = Field(
        description="The hull's formation energy at this composition, eV/atom."
    )
    engine: str = Field(description="Whose energies built the hull (e.g. chgnet-0.3.0, espresso/demo).")
    chemical_system: str
    n_phases: int = Field(
        description="Phases of the chemical system on the hull's list besides the elements."
    )
    against_elements_only: bool = Field(
        description="No phase but the elements: the energy above the hull is the formation energy."
    )
    upper_bound: bool = Field(
        False, description="A competing phase could not be computed, so the hull may lie lower."
    )
    decomposition: list[DecompositionPart] = Field(default_factory=list)


@dataclass
class FormationHull:
    """Phases of one engine, indexed by chemical system; hulls are built per system and cached.

    Parameters
    ----------
    engine
        The engine (and version or preset) whose energies these are; recorded with every answer.
    phases
        Competing phases. Elements need not be given: they enter at zero.
    """

    engine: str
    phases: Iterable[HullPhase] = ()
    missing: set[str] = field(default_factory=set)
    _by_system: dict[frozenset[str], list[HullPhase]] = field(init=False, default_factory=dict)
    _diagrams: dict[frozenset[str], PhaseDiagram] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        for phase in list(self.phases):
            self.add(phase)

    def add(self, phase: HullPhase) -> None:
        """Add a phase; hulls of its chemical system and of every larger one are rebuilt on use."""
        elements = frozenset(el.symbol for el in Composition(phase.formula).elements)
        if len(elements) < 2:
            return  # the elements are the hull's corners, at zero
        self._by_system.setdefault(elements, []).append(phase)
        for key in [k for k in self._diagrams if elements <= k]:
            del self._diagrams[key]

    def mark_missing(self, formula: str) -> None:
        """Note a competing phase that could not be computed: answers in its system are upper bounds."""
        self.missing.add(Composition(formula).reduced_formula)

    def phases_in(self, elements: Iterable[str]) -> list[HullPhase]:
        """Every phase whose elements all lie in ``elements`` (the elements themselves excluded)."""
        system = sorted(set(elements))
        out = []
        for size in range(2, len(system) + 1):
            for subset in combinations(system, size):
                out.extend(self._by_system.get(frozenset(subset), []))
        return out

    def phase_diagram(self, elements: Iterable[str], extra: Iterable[HullPhase] = ()) -> PhaseDiagram:
        """pymatgen's diagram of the system's phases (and ``extra`` ones, e.g. candidates to plot)."""
        entries = [
            PDEntry(Composition(el), 0.0, name=el, attribute="element") for el in sorted(set(elements))
        ]
        for phase in [*self.phases_in(elements), *extra]:
            composition = Composition(phase.formula)
            entries.append(
                PDEntry(
                    composition,
                    phase.formation_energy_per_atom * composition.num_atoms,
                    name=composition.reduced_formula,
                    attribute=phase.source,
                )
            )
        return PhaseDiagram(entries)

    def _diagram(self, elements: frozenset[str]) -> PhaseDiagram:
        if elements not in self._diagrams:
            self._diagrams[elements] = self.phase_diagram(elements)
        return self._diagrams[elements]

    def stability(self, formula: str | Composition, formation_energy_per_atom: float) -> Stability:
        """Where a phase of ``formula`` with this formation energy (eV/atom) lies against the hull."""
        composition = Composition(formula)
        elements = frozenset(el.symbol for el in composition.elements)
        diagram = self._diagram(elements)
        entry = PDEntry(composition, formation_energy_per_atom * composition.num_atoms)
        decomposition, above = diagram.get_decomp_and_e_above_hull(entry, allow_negative=True)
        parts = [
            DecompositionPart(
                formula=e.composition.reduced_formula, fraction=float(x), source=str(e.attribute)
            )
            for e, x in sorted(decomposition.items(), key=lambda item: -item[1])
        ]
        n_phases = len(self.phases_in(elements))
        missing = any(
            frozenset(el.symbol for el in Composition(f).elements) <= elements for f in self.missing
        )
        return Stability(
            energy_above_hull=float(above),
            hull_energy_per_atom=float(diagram.get_hull_energy_per_atom(composition)),
            engine=self.engine,
            chemical_system="-".join(sorted(elements)),
            n_phases=n_phases,
            against_elements_only=n_phases == 0,
            upper_bound=missing,
            decomposition=parts,
        )

    def hull_energy_per_atom(self, formula: str | Composition) -> float:
        """The hull's formation energy (eV/atom) at ``formula``'s composition."""
        composition = Composition(formula)
        elements = frozenset(el.symbol for el in composition.elements)
        return float(self._diagram(elements).get_hull_energy_per_atom(composition))
