"""jobflow Makers for pw.x: vc-relax, static, and element references.

Each Maker is a dataclass with a ``name``, a preset, overrides and run
settings; ``make(structure, prev_dir=None)`` returns a Job whose output is a
:class:`~crystaloop.dft.schemas.QETaskDocument`. ``make`` never changes the
Maker. Forces and ionic steps go to the jobflow ``data`` store.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from jobflow import Maker, job
from pymatgen.core import Structure

from crystaloop.dft import records
from crystaloop.dft.espresso.handlers import HandledRun, default_handlers, run_with_handlers
from crystaloop.dft.espresso.inputs import (
    MAGNETIC_ELEMENTS,
    available_presets,
    build_pw_input,
    deep_merge,
    is_spin_polarized,
    load_preset,
    resolve_cutoffs,
)
from crystaloop.dft.magnetism import SPIN, afm_ordering
from crystaloop.dft.pseudos import PseudoFamily, family_from_settings
from crystaloop.dft.references import SPIN_POLARIZED_REFERENCES, reference_structure, structure_digest
from crystaloop.dft.sanity import unphysical_geometry
from crystaloop.dft.schemas import (
    Correction,
    ElementReference,
    IonicStep,
    OrderingResult,
    PseudoRef,
    QEInputDoc,
    QETaskDocument,
)
from crystaloop.errors import UserError

DATA_FIELDS = ["forces", "ionic_steps"]


def current_task_id() -> str:
    """The running jobflow job's uuid, or a fresh one outside jobflow."""
    from jobflow import CURRENT_JOB

    current = CURRENT_JOB.job
    return str(current.uuid) if current is not None else str(uuid.uuid4())


def job_directory(task_id: str) -> Path:
    """``<data_dir>/dft/jobs/<task_id>``, created."""
    from crystaloop.settings import get_settings

    path = get_settings().data_dir / "dft" / "jobs" / task_id
    path.mkdir(parents=True, exist_ok=True)
    return path


def reference_key(
    preset: str,
    overrides: dict[str, Any],
    cutoffs: tuple[float, float],
    element: str | None = None,
    structure: Structure | None = None,
) -> str:
    """The element-reference cache key: preset key, the cutoffs (Ry) and any given structure.

    The cutoffs are part of the key because a reference is only comparable with a compound
    computed at the same cutoffs; a Pd reference at Pd's own 35 Ry is a different number
    from the one CuPd needs at Cu's 50 Ry. References run spin-polarised whatever the preset
    says (O2) carry ``+spin``, so that closed-shell results cached before are never reused.
    A user-supplied reference ``structure`` adds ``+s<hash>``: its energy is cached apart
    from the built-in reference's.
    """
    spin = "+spin" if element in SPIN_POLARIZED_REFERENCES else ""
    if element is not None and element not in MAGNETIC_ELEMENTS and "magnetic_orderings" in overrides:
        # Orderings change nothing for a non-magnetic element: share its cached reference.
        overrides = {k: v for k, v in overrides.items() if k != "magnetic_orderings"}
    own = f"+s{structure_digest(structure)}" if structure is not None else ""
    return f"{preset_key(preset, overrides)}@{cutoffs[0]:g}/{cutoffs[1]:g}Ry{spin}{own}"


def preset_key(preset: str, overrides: dict[str, Any]) -> str:
    """The cache key of a preset and overrides: its label, plus short hashes where needed.

    A shipped preset keeps its bare ``name@version`` label (so existing caches stay valid).
    Any other preset, such as a YAML file reusing a shipped label with other settings, gets
    ``~<hash>`` of its fully resolved settings; overrides add ``+<hash>`` of the overrides.
    """
    loaded = load_preset(preset)
    label = loaded.label
    settings = loaded.model_dump(exclude={"description"})
    if (
        loaded.name not in available_presets()
        or load_preset(loaded.name).model_dump(exclude={"description"}) != settings
    ):
        label = f"{label}~{_digest(settings)}"
    if not overrides:
        return label
    return f"{label}+{_digest(overrides)}"


def _digest(data: dict[str, Any]) -> str:
    return hashlib.md5(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:8]


@dataclass
class BaseQEMaker(Maker):
    """Common settings of the pw.x Makers.

    Parameters
    ----------
    name
        Job name.
    preset
        Preset name (``fast``, ``standard``) or a YAML path.
    overrides
        Deep-merged into a copy of the preset (``input_data``, ``kpoint_density``...).
    max_retries
        Error-handler retries before the task is marked failed.
    timeout_s
        Wall-time limit per pw.x attempt, s (the run restarts from the last geometry).
    pw_command
        Overrides the settings' ``pw_command``.
    metadata
        Stored with the result (``candidate_id``, ``campaign``, ``round``...).
    record
        Write the result to the ``dft_tasks`` collection.
    """

    name: str = "qe job"
    preset: str = "fast"
    overrides: dict[str, Any] = field(default_factory=dict)
    max_retries: int = 3
    timeout_s: float | None = None
    pw_command: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    record: bool = True
    calculation: ClassVar[str] = "scf"

    @job(data=DATA_FIELDS, output_schema=QETaskDocument)
    def make(self, structure: Structure, prev_dir: str | Path | None = None) -> QETaskDocument:
        """A Job that runs pw.x on ``structure`` and returns a QETaskDocument."""
        return run_espresso_task(self, structure, prev_dir=prev_dir)


@dataclass
class QERelaxMaker(BaseQEMaker):
    """Variable-cell relaxation (``vc-relax``)."""

    name: str = "qe relax"
    calculation: ClassVar[str] = "vc-relax"


@dataclass
class QEStaticMaker(BaseQEMaker):
    """A single SCF calculation."""

    name: str = "qe static"
    calculation: ClassVar[str] = "scf"


def _merged_preset(maker: BaseQEMaker, calculation: str):
    base = {"input_data": {"control": {"calculation": calculation}}}
    return load_preset(maker.preset, deep_merge(base, maker.overrides))


def _failed_document(
    maker: BaseQEMaker, structure: Structure, task_id: str, reasons: list[str], calculation: str
) -> QETaskDocument:
    return QETaskDocument(
        task_id=task_id,
        engine="espresso",
        task_label=maker.name,
        calculation=calculation,
        state="failed",
        reasons=reasons,
        formula_pretty=structure.composition.reduced_formula,
        elements=sorted(el.symbol for el in structure.composition.elements),
        nsites=len(structure),
        initial_structure=structure,
        input=QEInputDoc(preset=load_preset(maker.preset).label, overrides=maker.overrides),
        metadata=dict(maker.metadata),
    )


def run_espresso_task(
    maker: BaseQEMaker,
    structure: Structure,
    *,
    prev_dir: str | Path | None = None,
    calculation: str | None = None,
    family: PseudoFamily | None = None,
    cutoff_elements: list[str] | None = None,
) -> QETaskDocument:
    """Run pw.x for ``maker`` on ``structure`` with error recovery; record and return the result.

    A structure with elements the family lacks gives a failed document and never starts pw.x.
    ``cutoff_elements`` widens the elements whose suggested cutoffs apply (an element
    reference runs at its compound's cutoffs).
    """
    start = time.perf_counter()
    calculation = calculation or maker.calculation
    task_id = current_task_id()
    family = family or family_from_settings()
    missing = family.missing(el.symbol for el in structure.composition.elements)
    if missing:
        doc = _failed_document(
            maker,
            structure,
            task_id,
            [f"no pseudopotential for {', '.join(missing)} in family '{family.name}'"],
            calculation,
        )
        if maker.record:
            records.save_task(doc)
        return doc
    preset = _merged_preset(maker, calculation)
    if maker.record:
        records.mark_running(
            task_id,
            structure.composition.reduced_formula,
            sorted(el.symbol for el in structure.composition.elements),
            "espresso",
            preset.label,
            maker.metadata,
        )
    trials = [("fm", structure)]
    if "afm" in preset.magnetic_orderings and is_spin_polarized(structure, preset):
        antiferro = afm_ordering(structure)
        if antiferro is not None:
            ferro = structure.copy()
            if SPIN in ferro.site_properties:
                ferro.remove_site_property(SPIN)
            trials = [("fm", ferro), ("afm", antiferro)]
    docs = []
    for ordering, trial in trials:
        directory = job_directory(task_id) if ordering == "fm" else job_directory(task_id) / ordering
        doc = _run_pw(
            maker,
            trial,
            preset,
            family,
            task_id,
            directory,
            calculation,
            prev_dir=prev_dir if ordering == "fm" else None,
            cutoff_elements=cutoff_elements,
        )
        if doc.final_structure is not None and ordering == "afm":
            # The relaxed cell keeps its pattern, so that a later run starts from it.
            spins = trial.site_properties[SPIN]
            doc.final_structure.add_site_property(SPIN, spins)
        if is_spin_polarized(structure, preset):
            doc.magnetic_ordering = ordering  # type: ignore[assignment]
        docs.append(doc)
    doc = _lowest(docs)
    if len(docs) > 1:
        doc.magnetic_orderings = [
            OrderingResult(
                ordering=d.magnetic_ordering or "fm",
                state=d.state,
                energy_per_atom=d.energy_per_atom,
                nsites=d.nsites,
                total_magnetization=d.total_magnetization,
                absolute_magnetization=d.absolute_magnetization,
                band_gap=d.band_gap,
                wall_time_s=d.wall_time_s,
                dir_name=d.dir_name,
                reasons=d.reasons,
            )
            for d in docs
        ]
    doc.total_time_s = time.perf_counter() - start
    if maker.record:
        records.save_task(doc)
    return doc


def _lowest(docs: list[QETaskDocument]) -> QETaskDocument:
    """The successful document with the lowest energy per atom, else the first."""
    done = [d for d in docs if d.successful and d.energy_per_atom is not None]
    return min(done, key=lambda d: d.energy_per_atom) if done else docs[0]


def _run_pw(
    maker: BaseQEMaker,
    structure: Structure,
    preset,
    family: PseudoFamily,
    task_id: str,
    directory: Path,
    calculation: str,
    *,
    prev_dir: str | Path | None,
    cutoff_elements: list[str] | None,
) -> QETaskDocument:
    """One pw.x run with error recovery, as a task document (never raises)."""
    pw_input = build_pw_input(structure, preset, family, cutoff_elements=cutoff_elements)
    directory.mkdir(parents=True, exist_ok=True)
    try:
        if prev_dir is not None and (Path(prev_dir) / "out").is_dir():
            shutil.copytree(Path(prev_dir) / "out", directory / "out", dirs_exist_ok=True)
        handled = run_with_handlers(
            pw_input,
            directory,
            handlers=default_handlers(),
            max_retries=maker.max_retries,
            pw_command=maker.pw_command,
            timeout_s=maker.timeout_s,
        )
        doc = task_document(
            handled,
            structure=structure,
            task_id=task_id,
            label=maker.name,
            calculation=calculation,
            overrides=maker.overrides,
            family=family,
            directory=directory,
            prev_dir=prev_dir,
            metadata=maker.metadata,
        )
        unphysical = unphysical_geometry(structure, doc.final_structure) if doc.successful else []
        if unphysical:
            doc.state, doc.reasons = "failed", [*doc.reasons, *unphysical]
    except Exception as exc:  # a submitted task must still end as failed, with the reason
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        doc = _failed_document(maker, structure, task_id, [reason], calculation)
        doc.dir_name = str(directory)
    return doc


def task_document(
    handled: HandledRun,
    *,
    structure: Structure,
    task_id: str,
    label: str,
    calculation: str,
    overrides: dict[str, Any],
    family: PseudoFamily,
    directory: Path,
    prev_dir: str | Path | None,
    metadata: dict[str, Any],
) -> QETaskDocument:
    """Build the task document from a handled pw.x run."""
    out = handled.output
    pw_input = handled.pw_input
    final = out.final_structure if out is not None else None
    energy = out.energy if out is not None else None
    return QETaskDocument(
        task_id=task_id,
        engine="espresso",
        task_label=label,
        calculation=calculation,
        state=handled.state,
        reasons=handled.reasons,
        formula_pretty=structure.composition.reduced_formula,
        elements=sorted(el.symbol for el in structure.composition.elements),
        nsites=len(structure),
        initial_structure=structure,
        final_structure=final,
        energy=energy,
        energy_per_atom=energy / len(structure) if energy is not None else None,
        forces=out.forces.tolist() if out is not None and out.forces is not None else None,
        stress=out.stress.tolist() if out is not None and out.stress is not None else None,
        total_magnetization=out.total_magnetization if out is not None else None,
        absolute_magnetization=out.absolute_magnetization if out is not None else None,
        band_gap=out.band_gap if out is not None else None,
        is_metal=out.is_metal if out is not None else None,
        band_gap_by_spin=out.band_gap_by_spin if out is not None else None,
        is_half_metal=out.is_half_metal if out is not None else None,
        scf_converged=out.scf_converged if out is not None else None,
        relax_converged=out.relax_converged if out is not None else None,
        n_ionic_steps=out.n_ionic_steps if out is not None else 0,
        ionic_steps=[IonicStep(energy=e) for e in (out.energies if out is not None else [])],
        wall_time_s=handled.engine_wall_time_s,
        code_version=f"pw.x {out.version}" if out is not None and out.version else None,
        input=QEInputDoc(
            preset=pw_input.preset,
            overrides=overrides,
            parameters=pw_input.input_data,
            kpoints=list(pw_input.kpts),
            pseudopotentials=[
                PseudoRef(element=el, filename=fn, md5=pw_input.pseudo_md5.get(el, ""))
                for el, fn in sorted(pw_input.pseudopotentials.items())
            ],
            pseudo_family=family.name,
            ecutwfc=pw_input.cutoffs[0],
            ecutrho=pw_input.cutoffs[1],
            suggested_ecutwfc=pw_input.suggested_cutoffs[0] if pw_input.suggested_cutoffs else None,
            suggested_ecutrho=pw_input.suggested_cutoffs[1] if pw_input.suggested_cutoffs else None,
            below_suggested_cutoffs=pw_input.below_suggested_cutoffs,
        ),
        corrections=[Correction(**c) for c in handled.corrections],
        dir_name=str(directory),
        prev_dir=str(prev_dir) if prev_dir is not None else None,
        metadata=dict(metadata),
    )


@dataclass
class ElementReferenceMaker(BaseQEMaker):
    """Relax an element's reference structure once per (preset, cutoffs, pseudopotential).

    The cache lives in the ``element_references`` collection, keyed by element, engine,
    preset (with an overrides hash and the cutoffs) and pseudopotential md5. A cached
    reference is returned without running pw.x. The cutoffs are those of the compound
    (``compound_elements``), never the element's own, so every formation energy compares
    total energies at one plane-wave basis.
    """

    name: str = "qe element reference"
    calculation: ClassVar[str] = "vc-relax"

    @job(output_schema=ElementReference)
    def make(
        self,
        element: str,
        structure: Structure | None = None,
        compound_elements: list[str] | None = None,
    ) -> ElementReference:
        """A Job returning the element's reference energy (eV/atom), cached in the DB."""
        return run_element_reference(self, element, structure, compound_elements)

    def cached(
        self,
        element: str,
        structure: Structure | None = None,
        compound_elements: list[str] | None = None,
    ) -> ElementReference | None:
        """The element's reference from the ``element_references`` cache, or None (reads the database).

        None also when the family lacks ``element`` or any of ``compound_elements``.
        """
        family = family_from_settings()
        entry = family.pseudopotentials.get(element)
        if entry is None or family.missing(compound_elements or []):
            return None
        cutoffs = reference_cutoffs(self, element, compound_elements, family)
        key = reference_key(self.preset, self.overrides, cutoffs, element, structure)
        return records.cached_reference(
            element, "espresso", key, entry.md5, ecutwfc=cutoffs[0], ecutrho=cutoffs[1]
        )


def reference_cutoffs(
    maker: BaseQEMaker, element: str, compound_elements: list[str] | None, family: PseudoFamily
) -> tuple[float, float]:
    """The cutoffs (Ry) the reference of ``element`` runs at for a compound of ``compound_elements``."""
    elements = sorted({element, *(compound_elements or [])})
    return resolve_cutoffs(_merged_preset(maker, maker.calculation), family, elements)


def run_element_reference(
    maker: ElementReferenceMaker,
    element: str,
    structure: Structure | None = None,
    compound_elements: list[str] | None = None,
) -> ElementReference:
    """Look up, or relax and cache, the reference for ``element`` at the compound's cutoffs.

    Raises
    ------
    UserError
        The family lacks the element, or the reference relaxation failed.
    """
    family = family_from_settings()
    if element not in family.pseudopotentials:
        raise UserError(f"no pseudopotential for {element} in family '{family.name}'; add one to the family")
    cached = maker.cached(element, structure, compound_elements) if maker.record else None
    if cached is not None:
        return cached
    md5 = family.pseudopotentials[element].md5
    cutoffs = reference_cutoffs(maker, element, compound_elements, family)
    key = reference_key(maker.preset, maker.overrides, cutoffs, element, structure)
    ref_structure, calculation = reference_structure(element, structure)
    overrides = maker.overrides
    if calculation == "relax":
        overrides = deep_merge({"kpoint_density": 1}, maker.overrides)
    if element in SPIN_POLARIZED_REFERENCES:
        overrides = deep_merge(overrides, {"spin_polarization": "on"})
    runner = BaseQEMaker(
        name=f"{maker.name} {element}",
        preset=maker.preset,
        overrides=overrides,
        max_retries=maker.max_retries,
        timeout_s=maker.timeout_s,
        pw_command=maker.pw_command,
        metadata={**maker.metadata, "role": "element_reference", "element": element},
        record=maker.record,
    )
    doc = run_espresso_task(
        runner,
        ref_structure,
        calculation=calculation,
        family=family,
        cutoff_elements=sorted({element, *(compound_elements or [])}),
    )
    if not doc.successful or doc.energy_per_atom is None:
        raise UserError(
            f"reference relaxation for {element} failed ({'; '.join(doc.reasons)}); see {doc.dir_name}"
        )
    if maker.record:
        records.put_reference(
            element, "espresso", key, md5, doc.energy_per_atom, doc.task_id, cutoffs=cutoffs
        )
    return ElementReference(
        element=element,
        engine="espresso",
        preset=key,
        energy_per_atom=doc.energy_per_atom,
        task_id=doc.task_id,
        cached=False,
        ecutwfc=cutoffs[0],
        ecutrho=cutoffs[1],
    )
