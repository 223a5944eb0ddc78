"""Formation-energy flow: relax, then E_f per atom against cached element references."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal

from jobflow import Flow, Job, job
from pymatgen.core import Structure

from crystaloop.dft import store
from crystaloop.dft.schemas import ElementReference, FormationEnergyDocument, QETaskDocument

Engine = Literal["espresso", "surrogate"]


def formation_energy_per_atom(
    structure: Structure, energy: float, references: dict[str, float]
) -> float:
    """``(E - sum_i n_i mu_i) / N`` in eV/atom; ``energy`` in eV, ``references`` in eV/atom."""
    comp = structure.composition
    reference_total = sum(amount * references[el.symbol] for el, amount in comp.element_composition.items())
    return (energy - reference_total) / comp.num_atoms


@job(output_schema=FormationEnergyDocument)
def formation_energy_job(
    task: QETaskDocument,
    references: dict[str, float | ElementReference],
    record: bool = True,
) -> FormationEnergyDocument:
    """Formation energy of a finished relaxation; stored on its ``dft_tasks`` record."""
    task = task if isinstance(task, QETaskDocument) else QETaskDocument.model_validate(task)
    energies = {
        el: (ref.energy_per_atom if isinstance(ref, ElementReference) else float(ref))
        for el, ref in references.items()
    }
    if not task.successful or task.energy is None or task.final_structure is None:
        return FormationEnergyDocument(
            task_id=task.task_id,
            engine=task.engine,
            formula_pretty=task.formula_pretty,
            state="failed",
            reasons=["relaxation failed", *task.reasons],
            references=energies,
            preset=task.input.preset,
        )
    value = formation_energy_per_atom(task.final_structure, task.energy, energies)
    if record:
        store.set_formation_energy(task.task_id, value)
    return FormationEnergyDocument(
        task_id=task.task_id,
        engine=task.engine,
        formula_pretty=task.formula_pretty,
        state="successful",
        energy_per_atom=task.energy_per_atom,
        formation_energy_per_atom=value,
        references=energies,
        preset=task.input.preset,
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
    reference_structures
        Element -> structure to use instead of the built-in reference.
    metadata
        Stored on the relaxation's record (``candidate_id``, ``campaign``, ``round``...).
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
    ) -> None:
        self.structure = structure
        self.engine = engine
        self.preset = preset
        self.overrides = dict(overrides or {})
        self.relax_maker = relax_maker or _default_relax_maker(engine, preset, self.overrides)
        self.reference_maker = reference_maker or _default_reference_maker(
            engine, preset, self.overrides
        )
        self.reference_structures = dict(reference_structures or {})
        self.metadata = dict(metadata or {})
        self.use_cache = use_cache
        relax_maker = self.relax_maker
        if self.metadata:
            relax_maker = replace(relax_maker, metadata={**relax_maker.metadata, **self.metadata})
        relax = relax_maker.make(structure)
        jobs: list[Job] = [relax]
        references: dict[str, Any] = {}
        for element in sorted(el.symbol for el in structure.composition.elements):
            cached = self._cached(element) if use_cache else None
            if cached is not None:
                references[element] = cached
                continue
            ref_job = self.reference_maker.make(element, self.reference_structures.get(element))
            ref_job.name = f"{self.reference_maker.name} {element}"
            jobs.append(ref_job)
            references[element] = ref_job.output
        fe = formation_energy_job(relax.output, references, record=relax_maker.record)
        fe.name = "formation energy"
        jobs.append(fe)
        super().__init__(jobs, output=fe.output, name=name)

    def _cached(self, element: str) -> float | None:
        from crystaloop.errors import UserError

        try:
            if self.engine == "surrogate":
                hit = store.get_reference(element, "surrogate", self.reference_maker.preset, None)
            else:
                from crystaloop.dft.espresso.jobs import preset_key
                from crystaloop.dft.pseudos import family_from_settings

                family = family_from_settings()
                entry = family.pseudopotentials.get(element)
                if entry is None:
                    return None
                key = preset_key(self.reference_maker.preset, self.reference_maker.overrides)
                hit = store.get_reference(element, "espresso", key, entry.md5)
        except UserError:
            return None
        return float(hit["energy_per_atom"]) if hit else None


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
