"""Formation-energy flow: relax, then E_f per atom against cached element references."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal

from jobflow import Flow, Job, job
from pymatgen.core import Structure

from crystaloop.dft import store
from crystaloop.dft.backends import ROLE_KEY
from crystaloop.dft.corrections import NO_CORRECTION, AnionCorrection
from crystaloop.dft.magnetism import check_orderings
from crystaloop.dft.sanity import unphysical_energy
from crystaloop.dft.schemas import ElementReference, FormationEnergyDocument, QETaskDocument

Engine = Literal["espresso", "surrogate"]


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
            store.save_task(failed)
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
        store.set_formation_energy(task.task_id, value, raw=raw, correction=label)
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


class FormationEnergyFlow(Flow):
    """Relax ``structure``, then compute its formation energy per atom.

    Element references are looked up in the ``element_references`` cache when
    the flow is built; only missing ones get a reference job (which checks the
    cache again when it runs and stores its result there).

    Parameters
    ----------
    structure
        The crystal to relax.
    engine
        ``espresso`` (pw.x) or ``surrogate`` (CHGNet, labelled as such everywhere).
    preset, overrides
        pw.x preset and overrides (ignored by the surrogate).
    relax_maker, reference_maker
        Replace the default Makers.
    pw_command
        The pw.x command of both Makers (pw.x engine only); None keeps the settings'.
    reference_structures
        Element -> structure to use instead of the built-in reference.
    metadata
        Stored on the relaxation's record (``candidate_id``, ``campaign``, ``round``...).
    record
        Jobs write ``dft_tasks`` and the reference cache themselves. False for jobs on
        workers without a database: they only return their outputs, and the caller records them.
    anion_correction
        Apply the shipped anion correction fitted for this family and preset (pw.x engine;
        :mod:`crystaloop.dft.corrections`). Without a matching fit the energy stays raw, and
        its document says ``anion_correction: none``.
    magnetic_orderings
        ``["fm", "afm"]`` also relaxes the simplest antiferromagnetic ordering of a magnetic
        compound (and element) and keeps the lower (pw.x engine; :mod:`crystaloop.dft.magnetism`).
    """

    def __init__(
        self,
        structure: Structure,
        *,
        engine: Engine = "espresso",
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
        self.structure = structure
        self.engine = engine
        self.preset = preset
        self.overrides = dict(overrides or {})
        if magnetic_orderings and engine == "espresso" and tuple(magnetic_orderings) != ("fm",):
            self.overrides["magnetic_orderings"] = list(check_orderings(magnetic_orderings))
        self.relax_maker = relax_maker or _default_relax_maker(engine, preset, self.overrides)
        self.reference_maker = reference_maker or _default_reference_maker(engine, preset, self.overrides)
        if pw_command and engine == "espresso":
            self.relax_maker = replace(self.relax_maker, pw_command=pw_command)
            self.reference_maker = replace(self.reference_maker, pw_command=pw_command)
        if not record:
            self.relax_maker = replace(self.relax_maker, record=False)
            self.reference_maker = replace(self.reference_maker, record=False)
        self.reference_structures = dict(reference_structures or {})
        self.metadata = dict(metadata or {})
        self.use_cache = use_cache
        relax_maker = self.relax_maker
        if self.metadata:
            relax_maker = replace(relax_maker, metadata={**relax_maker.metadata, **self.metadata})
        relax = relax_maker.make(structure)
        relax.update_metadata({ROLE_KEY: "relax"})
        jobs: list[Job] = [relax]
        references: dict[str, Any] = {}
        compound_elements = sorted(el.symbol for el in structure.composition.elements)
        for element in compound_elements:
            cached = self._cached(element, compound_elements) if use_cache else None
            if cached is not None:
                references[element] = cached
                continue
            if engine == "surrogate":
                ref_job = self.reference_maker.make(element, self.reference_structures.get(element))
            else:
                # The reference runs at the compound's cutoffs, not at the element's own.
                ref_job = self.reference_maker.make(
                    element, self.reference_structures.get(element), compound_elements
                )
            ref_job.name = f"{self.reference_maker.name} {element}"
            ref_job.update_metadata({ROLE_KEY: "reference"})
            jobs.append(ref_job)
            references[element] = ref_job.output
        correction = self._correction() if anion_correction and engine == "espresso" else None
        fe = formation_energy_job(relax.output, references, record=relax_maker.record, correction=correction)
        fe.name = "formation energy"
        fe.update_metadata({ROLE_KEY: "formation_energy"})
        jobs.append(fe)
        super().__init__(jobs, output=fe.output, name=name)

    def _correction(self) -> dict[str, Any] | None:
        """The shipped anion correction of this family and preset, as the job's argument."""
        from crystaloop.dft.corrections import correction_for
        from crystaloop.dft.espresso.inputs import load_preset
        from crystaloop.dft.pseudos import family_from_settings
        from crystaloop.errors import UserError

        try:
            found = correction_for(family_from_settings(), load_preset(self.preset).label)
        except UserError:
            return None
        return {"label": found.label, "values": found.values, "metals": found.metals} if found else None

    def _cached(self, element: str, compound_elements: list[str]) -> ElementReference | None:
        from crystaloop.errors import UserError

        structure = self.reference_structures.get(element)
        try:
            if self.engine == "surrogate":
                from crystaloop.dft.surrogate import surrogate_reference_key

                key = surrogate_reference_key(self.reference_maker.preset, structure)
                hit = store.get_reference(element, "surrogate", key, None)
            else:
                from crystaloop.dft.espresso.jobs import reference_cutoffs, reference_key
                from crystaloop.dft.pseudos import family_from_settings

                family = family_from_settings()
                entry = family.pseudopotentials.get(element)
                if entry is None or family.missing(compound_elements):
                    return None
                maker = self.reference_maker
                cutoffs = reference_cutoffs(maker, element, compound_elements, family)
                key = reference_key(maker.preset, maker.overrides, cutoffs, element, structure)
                hit = store.get_reference(element, "espresso", key, entry.md5)
        except UserError:
            return None
        if not hit:
            return None
        return ElementReference(
            element=element,
            engine=self.engine,
            preset=hit["preset"],
            energy_per_atom=float(hit["energy_per_atom"]),
            task_id=hit["task_id"],
            cached=True,
            ecutwfc=hit.get("ecutwfc"),
            ecutrho=hit.get("ecutrho"),
        )


def _default_relax_maker(engine: Engine, preset: str, overrides: dict[str, Any]):
    if engine == "surrogate":
        from crystaloop.dft.surrogate import SurrogateRelaxMaker

        return SurrogateRelaxMaker()
    from crystaloop.dft.espresso.jobs import QERelaxMaker

    return QERelaxMaker(preset=preset, overrides=overrides)


def _default_reference_maker(engine: Engine, preset: str, overrides: dict[str, Any]):
    if engine == "surrogate":
        from crystaloop.dft.surrogate import SurrogateElementReferenceMaker

        return SurrogateElementReferenceMaker()
    from crystaloop.dft.espresso.jobs import ElementReferenceMaker

    return ElementReferenceMaker(preset=preset, overrides=overrides)
