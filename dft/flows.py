"""Formation energy per atom: relax, then compare with the elements' (cached) references.

:class:`FormationEnergyMaker` builds the flow; building it reads no database, and each
element-reference job looks up its cache when it runs.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from typing import Any

from jobflow import Flow, Job, Maker, job
from pymatgen.core import Structure

from crystaloop.dft import records
from crystaloop.dft.backends import ROLE_KEY
from crystaloop.dft.corrections import NO_CORRECTION, AnionCorrection
from crystaloop.dft.engines import Engine, get_engine
from crystaloop.dft.sanity import unphysical_energy
from crystaloop.dft.schemas import ElementReference, FormationEnergyDocument, QETaskDocument
from crystaloop.errors import UserError


def formation_energy_per_atom(structure: Structure, energy: float, references: dict[str, float]) -> float:
    """``(E - sum_i n_i mu_i) / N`` in eV/atom; ``energy`` in eV, ``references`` in eV/atom."""
    comp = structure.composition
    reference_total = sum(amount * references[el.symbol] for el, amount in comp.element_composition.items())
    return (energy - reference_total) / comp.num_atoms


@job(output_schema=FormationEnergyDocument)
def formation_energy_job(
    task: QETaskDocument,
    references: dict[str, float | ElementReference],
    record: bool = True,
    correction: dict[str, Any] | None = None,
) -> FormationEnergyDocument:
    """Formation energy of a finished relaxation; stored on its ``dft_tasks`` record.

    ``correction`` (``label``, ``values``: an :class:`~crystaloop.dft.corrections.AnionCorrection`
    as a dict) shifts the stored value; the raw one and the label are kept beside it.
    """
    task = task if isinstance(task, QETaskDocument) else QETaskDocument.model_validate(task)
    energies = {
        el: (ref.energy_per_atom if isinstance(ref, ElementReference) else float(ref))
        for el, ref in references.items()
    }
    cutoffs = {
        "ecutwfc": task.input.ecutwfc,
        "ecutrho": task.input.ecutrho,
        "below_suggested_cutoffs": task.input.below_suggested_cutoffs,
    }
    reasons = [] if task.successful else ["relaxation failed", *task.reasons]
    mismatched = [
        f"{el} at {ref.ecutwfc:g}/{ref.ecutrho:g} Ry"
        for el, ref in sorted(references.items())
        if isinstance(ref, ElementReference)
        and ref.ecutwfc is not None
        and task.input.ecutwfc is not None
        and (ref.ecutwfc, ref.ecutrho) != (task.input.ecutwfc, task.input.ecutrho)
    ]
    if mismatched:
        # Total energies at different plane-wave cutoffs are not comparable.
        reasons.append(
            f"references at other cutoffs than the compound's "
            f"{task.input.ecutwfc:g}/{task.input.ecutrho:g} Ry: {', '.join(mismatched)}"
        )
    checked = task.successful and task.energy_per_atom is not None and energies
    unphysical = unphysical_energy(task.energy_per_atom, energies) if checked else None
    if unphysical and not reasons:
        # A failed relaxation (dft/sanity.py, one rule for pw.x and the surrogate); its record says so.
        reasons.append(unphysical)
        if record:
            failed = task.model_copy(update={"state": "failed", "reasons": [*task.reasons, unphysical]})
            records.save_task(failed)
    if reasons or task.energy is None or task.final_structure is None:
        return FormationEnergyDocument(
            task_id=task.task_id,
            engine=task.engine,
            formula_pretty=task.formula_pretty,
            state="failed",
            reasons=reasons or ["relaxation gave no energy"],
            references=energies,
            preset=task.input.preset,
            **cutoffs,
        )
    raw = formation_energy_per_atom(task.final_structure, task.energy, energies)
    anion = (
        AnionCorrection(
            correction["label"], dict(correction["values"]), metals=dict(correction.get("metals") or {})
        )
        if correction
        else NO_CORRECTION
    )
    shift = anion.per_atom(task.final_structure.composition)
    label = anion.label if anion.anions(task.final_structure.composition) else "none"
    value = raw + shift
    if record:
        records.set_formation_energy(task.task_id, value, raw=raw, correction=label)
    return FormationEnergyDocument(
        task_id=task.task_id,
        engine=task.engine,
        formula_pretty=task.formula_pretty,
        state="successful",
        energy_per_atom=task.energy_per_atom,
        formation_energy_per_atom=value,
        formation_energy_per_atom_raw=raw,
        anion_correction=label,
        anion_correction_per_atom=shift,
        references=energies,
        preset=task.input.preset,
        **cutoffs,
    )


@dataclass
class FormationEnergyMaker(Maker):
    """Relax a crystal, then compute its formation energy per atom.

    ``make(structure)`` returns a Flow of three kinds of jobs: the relaxation, one element
    reference per element of the compound, and the formation energy. Building it reads no
    database: each reference job returns the cached reference when there is one (looked up when
    it runs, at the compound's cutoffs), and otherwise relaxes the element and caches it. Only
    the elements given in ``references`` get no job.

    Parameters
    ----------
    name
        The flow's name.
    engine
        ``espresso`` (pw.x) or ``surrogate`` (CHGNet, labelled as such everywhere); see
        :mod:`crystaloop.dft.engines`.
    preset, overrides
        pw.x preset and overrides (ignored by the surrogate).
    relax_maker, reference_maker
        Replace the engine's Makers (None: the engine's, with ``preset`` and ``overrides``).
    pw_command
        The pw.x command of both Makers (pw.x engine only); None keeps the settings'.
    reference_structures
        Element -> structure to use instead of the built-in reference.
    metadata
        Stored on the relaxation's record (``candidate_id``, ``campaign``, ``round``...).
    record
        Jobs write ``dft_tasks`` and the reference cache, and read that cache, themselves.
        False for jobs on workers without a database: they only return their outputs, and the
        caller records them (see :meth:`cached_references` for the references they cannot read).
    anion_correction
        Apply the shipped anion correction fitted for this family and preset (pw.x engine;
        :mod:`crystaloop.dft.corrections`). Without a matching fit the energy stays raw, and
        its document says ``anion_correction: none``.
    magnetic_orderings
        ``["fm", "afm"]`` also relaxes the simplest antiferromagnetic ordering of a magnetic
        compound (and element) and keeps the lower (pw.x engine; :mod:`crystaloop.dft.magnetism`).
    references
        Element -> reference already known (as :meth:`cached_references` gives them); these
        elements get no reference job.
    """

    name: str = "formation energy"
    engine: str = "espresso"
    preset: str = "fast"
    overrides: dict[str, Any] = field(default_factory=dict)
    relax_maker: Maker | None = None
    reference_maker: Maker | None = None
    pw_command: str | None = None
    reference_structures: dict[str, Structure] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    record: bool = True
    anion_correction: bool = False
    magnetic_orderings: list[str] | tuple[str, ...] | None = None
    references: dict[str, ElementReference] = field(default_factory=dict)

    def make(self, structure: Structure) -> Flow:
        """The flow relaxing ``structure`` and computing its formation energy (eV/atom)."""
        jobs = self.jobs(structure)
        return Flow(jobs, output=jobs[-1].output, name=self.name)

    def jobs(self, structure: Structure) -> list[Job]:
        """The flow's jobs: the relaxation, the references, the formation energy (last)."""
        engine = get_engine(self.engine)
        relax_maker, reference_maker = self.makers()
        if self.metadata:
            relax_maker = replace(relax_maker, metadata={**relax_maker.metadata, **self.metadata})
        relax = relax_maker.make(structure)
        relax.update_metadata({ROLE_KEY: "relax"})
        jobs: list[Job] = [relax]
        references: dict[str, Any] = {}
        compound_elements = sorted(el.symbol for el in structure.composition.elements)
        for element in compound_elements:
            if element in self.references:
                references[element] = self.references[element]
                continue
            # The reference runs at the compound's cutoffs, not at the element's own.
            ref_job = reference_maker.make(element, self.reference_structures.get(element), compound_elements)
            ref_job.name = f"{reference_maker.name} {element}"
            ref_job.update_metadata({ROLE_KEY: "reference"})
            jobs.append(ref_job)
            references[element] = ref_job.output
        correction = _correction_argument(engine, self.preset) if self.anion_correction else None
        fe = formation_energy_job(relax.output, references, record=relax_maker.record, correction=correction)
        fe.name = "formation energy"
        fe.update_metadata({ROLE_KEY: "formation_energy"})
        jobs.append(fe)
        return jobs

    def makers(self) -> tuple[Maker, Maker]:
        """The relaxation and element-reference Makers the flow runs, with its settings applied."""
        engine = get_engine(self.engine)
        overrides = engine.with_orderings(self.overrides, self.magnetic_orderings)
        relax = self.relax_maker or engine.relax_maker(self.preset, overrides)
        reference = self.reference_maker or engine.reference_maker(self.preset, overrides)
        relax = engine.with_pw_command(relax, self.pw_command)
        reference = engine.with_pw_command(reference, self.pw_command)
        if not self.record:
            relax, reference = replace(relax, record=False), replace(reference, record=False)
        return relax, reference

    def cached_references(self, structure: Structure) -> dict[str, ElementReference]:
        """The references of ``structure``'s elements already in the cache (reads the database).

        For flows whose jobs cannot read the database (``record=False``): looked up where the
        database is, and passed as ``references``, they spare those jobs recomputing them.
        """
        _, reference_maker = self.makers()
        compound_elements = sorted(el.symbol for el in structure.composition.elements)
        found = {}
        for element in compound_elements:
            try:
                hit = reference_maker.cached(
                    element, self.reference_structures.get(element), compound_elements
                )
            except UserError:
                hit = None
            if hit is not None:
                found[element] = hit
        return found


def _correction_argument(engine: Engine, preset: str) -> dict[str, Any] | None:
    """The shipped anion correction of ``engine`` and ``preset``, as the formation-energy job's argument."""
    try:
        found = engine.anion_correction(preset)
    except UserError:
        return None
    return {"label": found.label, "values": found.values, "metals": found.metals} if found else None


class FormationEnergyFlow(Flow):
    """Deprecated: use :class:`FormationEnergyMaker`.

    The flow of ``FormationEnergyMaker(...).make(structure)``, with the elements already in the
    reference cache looked up while it is built (``use_cache``), so that they get no job. The
    keyword arguments are the Maker's fields; ``relax_maker`` and ``reference_maker`` are the
    Makers it runs.
    """

    def __init__(
        self,
        structure: Structure,
        *,
        engine: str = "espresso",
        preset: str = "fast",
        overrides: dict[str, Any] | None = None,
        relax_maker=None,
        reference_maker=None,
        reference_structures: dict[str, Structure] | None = None,
        metadata: dict[str, Any] | None = None,
        name: str = "formation energy",
        use_cache: bool = True,
        pw_command: str | None = None,
        record: bool = True,
        anion_correction: bool = False,
        magnetic_orderings: list[str] | tuple[str, ...] | None = None,
    ) -> None:
        warnings.warn(
            "FormationEnergyFlow is deprecated; use FormationEnergyMaker(...).make(structure)",
            DeprecationWarning,
            stacklevel=2,
        )
        maker = FormationEnergyMaker(
            name=name,
            engine=engine,
            preset=preset,
            overrides=dict(overrides or {}),
            relax_maker=relax_maker,
            reference_maker=reference_maker,
            pw_command=pw_command,
            reference_structures=dict(reference_structures or {}),
            metadata=dict(metadata or {}),
            record=record,
            anion_correction=anion_correction,
            magnetic_orderings=magnetic_orderings,
        )
        if use_cache:
            maker = replace(maker, references=maker.cached_references(structure))
        self.structure, self.engine, self.preset = structure, engine, preset
        self.relax_maker, self.reference_maker = maker.makers()
        jobs = maker.jobs(structure)
        super().__init__(jobs, output=jobs[-1].output, name=name)
