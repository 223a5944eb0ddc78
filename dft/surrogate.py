"""The ``surrogate`` engine: CHGNet relaxations behind the same Maker interface as pw.x.

For machines without pw.x and for fast loop tests. Every document it produces
has ``engine="surrogate"``; its energies are CHGNet's (MPtrj-compatible GGA/GGA+U
scale), never DFT.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

from jobflow import Maker, job
from pymatgen.core import Structure

from crystaloop.dft import records
from crystaloop.dft.espresso.jobs import DATA_FIELDS, current_task_id
from crystaloop.dft.references import reference_structure, structure_digest
from crystaloop.dft.sanity import unphysical_geometry
from crystaloop.dft.schemas import ElementReference, IonicStep, QEInputDoc, QETaskDocument

SURROGATE_PRESET = "chgnet"


@lru_cache(maxsize=1)
def load_chgnet():
    """The bundled pretrained CHGNet (offline; loaded once per process)."""
    from chgnet.model import CHGNet

    return CHGNet.load(verbose=False)


@dataclass
class CHGNetRelaxation:
    """How a CHGNet relaxation ended.

    Attributes
    ----------
    structure
        The last structure.
    energies
        Energy of each optimiser step, eV per cell.
    steps
        Optimiser steps taken.
    converged
        The forces fell below ``fmax`` before ``steps`` ran out.
    stopped_early
        Stopped (not converged) because the volume changed more than allowed.
    """

    structure: Structure
    energies: list[float]
    steps: int
    converged: bool
    stopped_early: bool


class CHGNetRelaxer:
    """Cell and position relaxation with the bundled CHGNet, for the screen and the surrogate engine.

    The relaxation runs in chunks of ``chunk`` steps (all of them in one chunk when None) and
    stops early once the volume has changed by more than ``max_volume_change`` (a fraction): a
    collapsing cell grows its neighbour graph with every step, and the screen rejects it anyway.

    Parameters
    ----------
    fmax
        Force convergence, eV/Å.
    steps
        Maximum optimiser steps.
    max_volume_change
        Stop once ``|V/V0 - 1|`` exceeds it; None never stops early.
    chunk
        Steps per optimiser call, between two volume checks.
    """

    def __init__(
        self,
        *,
        fmax: float = 0.1,
        steps: int = 100,
        max_volume_change: float | None = None,
        chunk: int | None = 25,
    ) -> None:
        from chgnet.model import StructOptimizer

        self.model = load_chgnet()
        self.optimizer = StructOptimizer(model=self.model, use_device="cpu")
        self.fmax, self.steps, self.chunk = fmax, steps, chunk or steps
        self.max_volume_change = max_volume_change
        self.version = f"chgnet-{self.model.version}"

    def run(self, structure: Structure) -> CHGNetRelaxation:
        """Relax ``structure`` (a copy); the final structure is never handed to the model again."""
        import warnings

        current, energies, converged, stopped = structure.copy(), [], False, False
        while len(energies) < self.steps and not converged and not stopped:
            todo = min(self.chunk, self.steps - len(energies))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = self.optimizer.relax(current, fmax=self.fmax, steps=todo, verbose=False)
            chunk = [float(e) for e in result["trajectory"].energies]
            current = result["final_structure"]
            energies.extend(chunk)
            converged = len(chunk) < todo
            change = current.volume / structure.volume - 1.0
            stopped = self.max_volume_change is not None and abs(change) > self.max_volume_change
        return CHGNetRelaxation(current, energies, len(energies), converged, stopped and not converged)

    def relax(self, structure: Structure) -> dict[str, Any]:
        """Relaxed structure, initial and final energies (eV/atom), steps, convergence, early stop."""
        run = self.run(structure)
        return {
            "structure": run.structure,
            "initial_energy_per_atom": run.energies[0] / len(structure) if run.energies else None,
            "energy_per_atom": float(self.model.predict_structure(run.structure, task="e")["e"]),
            "steps": run.steps,
            "converged": run.converged,
            "stopped_early": run.stopped_early,
        }


@dataclass
class SurrogateRelaxMaker(Maker):
    """Relax with CHGNet (cell and positions); output is a QETaskDocument labelled surrogate.

    Parameters
    ----------
    fmax
        Force convergence, eV/Å.
    steps
        Maximum optimiser steps.
    num_threads
        torch CPU threads during the relaxation (small cells run fastest on one).
    preset
        Recorded only (keeps the interface of the pw.x Makers).
    """

    name: str = "surrogate relax"
    preset: str = SURROGATE_PRESET
    overrides: dict[str, Any] = field(default_factory=dict)
    fmax: float = 0.05
    steps: int = 300
    num_threads: int = 1
    metadata: dict[str, Any] = field(default_factory=dict)
    record: bool = True
    relax_cell: ClassVar[bool] = True

    @job(data=DATA_FIELDS, output_schema=QETaskDocument)
    def make(self, structure: Structure, prev_dir: str | Path | None = None) -> QETaskDocument:
        """A Job that relaxes ``structure`` with CHGNet."""
        return run_surrogate_task(self, structure, prev_dir=prev_dir)


@dataclass
class SurrogateStaticMaker(SurrogateRelaxMaker):
    """A single CHGNet energy/force/stress evaluation."""

    name: str = "surrogate static"
    relax_cell: ClassVar[bool] = False


def run_surrogate_task(
    maker: SurrogateRelaxMaker,
    structure: Structure,
    *,
    prev_dir: str | Path | None = None,
    relax: bool | None = None,
) -> QETaskDocument:
    """Relax (or evaluate) ``structure`` with CHGNet; record and return the document."""
    import torch

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(maker.num_threads)
    try:
        return _surrogate_task(maker, structure, prev_dir=prev_dir, relax=relax)
    finally:
        torch.set_num_threads(previous_threads)


def _surrogate_task(
    maker: SurrogateRelaxMaker, structure: Structure, *, prev_dir, relax: bool | None
) -> QETaskDocument:
    import chgnet

    start = time.perf_counter()
    relax = maker.relax_cell if relax is None else relax
    task_id = current_task_id()
    model = load_chgnet()
    reasons: list[str] = []
    energies: list[float] = []
    engine_start = time.perf_counter()
    unphysical: list[str] = []
    try:
        if relax:
            run = CHGNetRelaxer(fmax=maker.fmax, steps=maker.steps, chunk=None).run(structure)
            final, energies, n_steps, converged = run.structure, run.energies, run.steps, run.converged
            if not converged:
                reasons.append(f"not converged to fmax={maker.fmax} eV/Å in {maker.steps} steps")
            unphysical = unphysical_geometry(structure, final)
            if unphysical:
                reasons.extend(unphysical)
                converged = False
        else:
            final, n_steps, converged = structure.copy(), 1, True
        # a collapsed cell's neighbour graph takes gigabytes: no second pass of the model over it
        prediction = None if unphysical else model.predict_structure(final, task="efsm")
        state = "successful" if converged else "failed"
    except Exception as exc:  # a model failure must still end as a failed task
        final, prediction, n_steps, state = None, None, 0, "failed"
        reasons.append(f"CHGNet failed: {type(exc).__name__}: {exc}")
    engine_time = time.perf_counter() - engine_start
    energy = float(prediction["e"]) * len(final) if prediction is not None else None
    doc = QETaskDocument(
        task_id=task_id,
        engine="surrogate",
        task_label=maker.name,
        calculation="vc-relax" if relax else "scf",
        state=state,
        reasons=reasons,
        formula_pretty=structure.composition.reduced_formula,
        elements=sorted(el.symbol for el in structure.composition.elements),
        nsites=len(structure),
        initial_structure=structure,
        final_structure=final,
        energy=energy,
        energy_per_atom=energy / len(final) if energy is not None else None,
        forces=prediction["f"].tolist() if prediction is not None else None,
        stress=prediction["s"].tolist() if prediction is not None else None,
        total_magnetization=float(prediction["m"].sum()) if prediction is not None else None,
        scf_converged=None,
        relax_converged=converged if relax else None,
        n_ionic_steps=n_steps,
        ionic_steps=[IonicStep(energy=e) for e in energies],
        wall_time_s=engine_time,
        code_version=f"chgnet {chgnet.__version__}",
        input=QEInputDoc(preset=maker.preset, overrides=maker.overrides),
        prev_dir=str(prev_dir) if prev_dir is not None else None,
        metadata=dict(maker.metadata),
    )
    if doc.stress is not None:
        doc.stress = _full_stress(doc.stress)
    doc.total_time_s = time.perf_counter() - start
    if maker.record:
        records.save_task(doc)
    return doc


def _full_stress(stress: list) -> list[list[float]]:
    values = [float(v) for v in (stress if not isinstance(stress[0], list) else sum(stress, []))]
    if len(values) == 9:
        return [values[0:3], values[3:6], values[6:9]]
    xx, yy, zz, yz, xz, xy = values
    return [[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]]


@dataclass
class SurrogateElementReferenceMaker(SurrogateRelaxMaker):
    """CHGNet element reference, cached like the pw.x one (engine ``surrogate``)."""

    name: str = "surrogate element reference"

    @job(output_schema=ElementReference)
    def make(
        self,
        element: str,
        structure: Structure | None = None,
        compound_elements: list[str] | None = None,
    ) -> ElementReference:
        """A Job returning the element's CHGNet reference energy (eV/atom).

        ``compound_elements`` keeps the interface of the pw.x Maker; CHGNet has no cutoffs to match.
        """
        return run_surrogate_reference(self, element, structure)

    def cached(
        self,
        element: str,
        structure: Structure | None = None,
        compound_elements: list[str] | None = None,
    ) -> ElementReference | None:
        """The element's reference from the ``element_references`` cache, or None (reads the database)."""
        key = surrogate_reference_key(self.preset, structure)
        return records.cached_reference(element, "surrogate", key, None)


def surrogate_reference_key(preset: str, structure: Structure | None = None) -> str:
    """The surrogate reference cache key: ``preset``, plus ``+s<hash>`` for a user-supplied structure."""
    return f"{preset}+s{structure_digest(structure)}" if structure is not None else preset


def run_surrogate_reference(
    maker: SurrogateElementReferenceMaker, element: str, structure: Structure | None = None
) -> ElementReference:
    """Look up, or relax and cache, the CHGNet reference for ``element``."""
    from crystaloop.errors import UserError

    cached = maker.cached(element, structure) if maker.record else None
    if cached is not None:
        return cached
    key = surrogate_reference_key(maker.preset, structure)
    ref_structure, calculation = reference_structure(element, structure)
    runner = SurrogateRelaxMaker(
        name=f"{maker.name} {element}",
        fmax=maker.fmax,
        steps=maker.steps,
        num_threads=maker.num_threads,
        metadata={**maker.metadata, "role": "element_reference", "element": element},
        record=maker.record,
    )
    doc = run_surrogate_task(runner, ref_structure, relax=calculation == "vc-relax")
    if doc.energy_per_atom is None:
        raise UserError(f"surrogate reference for {element} failed ({'; '.join(doc.reasons)})")
    if maker.record:
        records.put_reference(element, "surrogate", key, None, doc.energy_per_atom, doc.task_id)
    return ElementReference(
        element=element,
        engine="surrogate",
        preset=key,
        energy_per_atom=doc.energy_per_atom,
        task_id=doc.task_id,
        cached=False,
    )
