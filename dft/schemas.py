"""Job outputs: the task document every DFT (or surrogate) job returns."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, Field, PlainSerializer
from pymatgen.core import Structure


def _to_structure(value: Any) -> Any:
    return Structure.from_dict(value) if isinstance(value, dict) else value


#: A pymatgen Structure that validates from ``as_dict()`` and serialises to it in JSON mode.
StructureField = Annotated[
    Structure,
    BeforeValidator(_to_structure),
    PlainSerializer(lambda s: s.as_dict(), when_used="json"),
]


class PseudoRef(BaseModel):
    """A pseudopotential used by a run."""

    element: str
    filename: str
    md5: str


class QEInputDoc(BaseModel):
    """What pw.x was asked to do."""

    preset: str = Field(description="Preset label, name@version.")
    overrides: dict[str, Any] = Field(default_factory=dict, description="User overrides merged in.")
    parameters: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="pw.x namelists as written (Ry, Bohr units)."
    )
    kpoints: list[int] | None = Field(None, description="Monkhorst-Pack divisions.")
    pseudopotentials: list[PseudoRef] = Field(default_factory=list)
    pseudo_family: str | None = None
    ecutwfc: float | None = Field(None, description="Wavefunction cutoff used, Ry.")
    ecutrho: float | None = Field(None, description="Charge-density cutoff used, Ry.")
    suggested_ecutwfc: float | None = Field(
        None, description="The family's suggestion for this structure's elements, Ry."
    )
    suggested_ecutrho: float | None = Field(
        None, description="The family's suggestion for this structure's elements, Ry."
    )
    below_suggested_cutoffs: bool = Field(
        False, description="True when a cutoff used is below the family's suggestion."
    )


class Correction(BaseModel):
    """One error handler's fix, applied before a retry."""

    attempt: int
    handler: str
    errors: list[str] = Field(default_factory=list)
    actions: list[str] = Field(default_factory=list)


class IonicStep(BaseModel):
    """One ionic step of a relaxation."""

    energy: float = Field(description="Total energy, eV.")


class OrderingResult(BaseModel):
    """One magnetic ordering of a compound, relaxed."""

    ordering: Literal["fm", "afm"]
    state: Literal["successful", "failed"]
    energy_per_atom: float | None = Field(None, description="eV/atom.")
    nsites: int
    total_magnetization: float | None = Field(None, description="Bohr magneton per cell.")
    absolute_magnetization: float | None = Field(None, description="Bohr magneton per cell.")
    band_gap: float | None = Field(None, description="eV.")
    wall_time_s: float | None = Field(None, description="The engine's own wall time, s.")
    dir_name: str | None = None
    reasons: list[str] = Field(default_factory=list)


class QETaskDocument(BaseModel):
    """The result of one relaxation or static run.

    ``engine`` says what produced it: ``espresso`` (pw.x) or ``surrogate`` (CHGNet).
    A surrogate result is never DFT.
    """

    task_id: str = Field(description="Unique id (the jobflow job uuid when run as a job).")
    engine: Literal["espresso", "surrogate"]
    task_label: str = Field(description="Job name, e.g. 'qe relax'.")
    calculation: str = Field(description="vc-relax, relax or scf.")
    state: Literal["successful", "failed"]
    reasons: list[str] = Field(default_factory=list, description="Why the run failed.")
    formula_pretty: str
    elements: list[str]
    nsites: int
    initial_structure: StructureField
    final_structure: StructureField | None = None
    energy: float | None = Field(None, description="Total energy of the final structure, eV.")
    energy_per_atom: float | None = Field(None, description="eV/atom.")
    formation_energy_per_atom: float | None = Field(
        None, description="eV/atom, against the element references (set by the flow)."
    )
    forces: list[list[float]] | None = Field(None, description="Final forces, eV/Å.")
    stress: list[list[float]] | None = Field(
        None, description="Final stress tensor, GPa, ASE sign (the negative of pw.x's printout)."
    )
    total_magnetization: float | None = Field(None, description="Bohr magneton per cell.")
    absolute_magnetization: float | None = Field(
        None, description="Bohr magneton per cell, |m| integrated: nonzero for an antiferromagnet."
    )
    magnetic_ordering: Literal["fm", "afm"] | None = Field(
        None, description="The ordering of this result, for spin-polarised runs."
    )
    magnetic_orderings: list[OrderingResult] = Field(
        default_factory=list,
        description="Every ordering relaxed (dft.magnetic_orderings); the lowest is this result.",
    )
    band_gap: float | None = Field(
        None, description="eV; 0.0 for a metal; None when there are no empty bands."
    )
    is_metal: bool | None = None
    band_gap_by_spin: list[float | None] | None = Field(
        None,
        description="eV per spin channel (up, down) of a spin-polarised run; 0.0 for a metallic "
        "channel; None for unpolarised runs.",
    )
    is_half_metal: bool | None = Field(
        None, description="One spin channel metallic, the other gapped; None when unpolarised."
    )
    scf_converged: bool | None = None
    relax_converged: bool | None = None
    n_ionic_steps: int = Field(0, description="Ionic steps (SCF cycles with an energy).")
    ionic_steps: list[IonicStep] = Field(default_factory=list)
    wall_time_s: float | None = Field(None, description="The engine's own wall time, s.")
    total_time_s: float | None = Field(None, description="Wall time of the whole job, s.")
    code_version: str | None = Field(None, description="pw.x (or CHGNet) version.")
    input: QEInputDoc
    corrections: list[Correction] = Field(default_factory=list)
    dir_name: str | None = Field(None, description="Job directory.")
    prev_dir: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict, description="candidate_id, campaign...")
    completed_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    @property
    def successful(self) -> bool:
        """True when the run finished and converged."""
        return self.state == "successful"


class ElementReference(BaseModel):
    """An element's reference energy for formation energies."""

    element: str
    engine: Literal["espresso", "surrogate"]
    preset: str = Field(description="Preset label plus overrides hash.")
    energy_per_atom: float = Field(description="eV/atom.")
    task_id: str = Field(description="The relaxation that produced it.")
    cached: bool = Field(False, description="True when read from the DB cache.")
    ecutwfc: float | None = Field(None, description="Wavefunction cutoff, Ry (pw.x only).")
    ecutrho: float | None = Field(None, description="Charge-density cutoff, Ry (pw.x only).")


class FormationEnergyDocument(BaseModel):
    """A formation energy against per-element references."""

    task_id: str = Field(description="The relaxation's task id.")
    engine: Literal["espresso", "surrogate"]
    formula_pretty: str
    state: Literal["successful", "failed"]
    reasons: list[str] = Field(default_factory=list)
    energy_per_atom: float | None = Field(None, description="eV/atom.")
    formation_energy_per_atom: float | None = Field(
        None, description="eV/atom; with the anion correction when one was applied."
    )
    formation_energy_per_atom_raw: float | None = Field(
        None, description="eV/atom against the references, before any correction."
    )
    anion_correction: str = Field(
        "none", description="The correction applied: a fit's label (dft/corrections.py) or none."
    )
    anion_correction_per_atom: float = Field(0.0, description="The shift applied, eV/atom.")
    references: dict[str, float] = Field(
        default_factory=dict, description="Element -> reference energy, eV/atom."
    )
    preset: str | None = None
    ecutwfc: float | None = Field(None, description="Cutoff of the compound and its references, Ry.")
    ecutrho: float | None = Field(None, description="Cutoff of the compound and its references, Ry.")
    below_suggested_cutoffs: bool = Field(
        False, description="True when the cutoffs were below the family's suggestion."
    )
