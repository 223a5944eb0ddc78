"""Document schemas for every collection.

Structures are stored as pymatgen ``as_dict()`` with derived query fields.
Predicted and DFT property values are kept apart.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pymatgen.core import Structure

from crystaloop.properties import PROPERTY_NAMES

COLLECTIONS = (
    "candidates",
    "dft_tasks",
    "campaigns",
    "campaign_rounds",
    "dft_cache",
    "models",
    "training_structures",
)


def utcnow() -> datetime:
    """Timezone-aware now (UTC)."""
    return datetime.now(UTC)


class CandidateState(StrEnum):
    """The candidate life cycle.

    ``generated -> rejected | shortlisted -> selected -> submitted -> relaxed | failed``
    """

    GENERATED = "generated"
    REJECTED = "rejected"
    SHORTLISTED = "shortlisted"
    SELECTED = "selected"
    SUBMITTED = "submitted"
    RELAXED = "relaxed"
    FAILED = "failed"


ALLOWED_TRANSITIONS: dict[CandidateState, tuple[CandidateState, ...]] = {
    CandidateState.GENERATED: (CandidateState.REJECTED, CandidateState.SHORTLISTED),
    CandidateState.SHORTLISTED: (CandidateState.SELECTED, CandidateState.REJECTED),
    CandidateState.SELECTED: (CandidateState.SUBMITTED,),
    CandidateState.SUBMITTED: (CandidateState.RELAXED, CandidateState.FAILED),
    CandidateState.REJECTED: (),
    CandidateState.RELAXED: (),
    CandidateState.FAILED: (CandidateState.SUBMITTED,),  # `campaign retry` reruns its DFT job
}


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", use_enum_values=True)


class StructureFields(_Doc):
    """A structure plus the fields that queries use."""

    structure: dict[str, Any] = Field(description="pymatgen Structure.as_dict().")
    formula_pretty: str
    reduced_formula: str
    elements: list[str] = Field(description="Sorted element symbols (multikey index).")
    chemsys: str = Field(description="Elements joined by '-', sorted.")
    nsites: int
    spacegroup: str | None = Field(None, description="International symbol, symprec 0.1.")
    fingerprint: str = Field(description="Cheap dedup key: reduced formula, nsites, volume bin.")

    @classmethod
    def fields_from(cls, structure: Structure, spacegroup: bool = True) -> dict[str, Any]:
        """The derived fields for ``structure`` as a dict."""
        comp = structure.composition
        elements = sorted(el.symbol for el in comp.elements)
        sg = None
        if spacegroup:
            try:
                sg = structure.get_space_group_info(symprec=0.1)[0]
            except Exception:  # spglib can fail on badly distorted cells; the field is optional
                sg = None
        return {
            "structure": structure.as_dict(),
            "formula_pretty": comp.reduced_formula,
            "reduced_formula": comp.reduced_formula,
            "elements": elements,
            "chemsys": "-".join(elements),
            "nsites": len(structure),
            "spacegroup": sg,
            "fingerprint": fingerprint(structure),
        }


def fingerprint(structure: Structure) -> str:
    """A cheap key: equal structures share it (formula, sites per formula unit, volume/atom bin)."""
    comp = structure.composition
    _, n_units = comp.get_reduced_composition_and_factor()
    vpa = structure.volume / len(structure)
    return f"{comp.reduced_formula}|{len(structure) / n_units:g}|{round(vpa * 2) / 2:g}"


class PredictedValue(_Doc):
    """A model prediction of one property."""

    mean: float | None
    std: float | None = None
    model_version: str | None = None


class FilterStep(_Doc):
    """One stage of the filter cascade that a candidate went through."""

    stage: str
    passed: bool
    reason: str | None = None
    at: datetime = Field(default_factory=utcnow)


class CandidateDoc(StructureFields):
    """A generated candidate. ``predicted`` and ``dft`` are kept apart."""

    candidate_id: str
    campaign: str
    round: int = Field(ge=0)
    state: CandidateState = CandidateState.GENERATED
    state_history: list[dict[str, Any]] = Field(default_factory=list)
    rejected_stage: str | None = None
    rejected_reason: str | None = None
    provenance: dict[str, Any] = Field(
        default_factory=dict,
        description="How it was made: model versions, sampling mode, base formula, seed.",
    )
    filter_trail: list[FilterStep] = Field(default_factory=list)
    predicted: dict[str, PredictedValue] = Field(default_factory=dict)
    dft: dict[str, float | None] = Field(
        default_factory=dict, description="DFT values keyed by property name (units per property)."
    )
    dft_engine: Literal["espresso", "surrogate"] | None = None
    dft_task_id: str | None = None
    uip: dict[str, Any] = Field(
        default_factory=dict,
        description="Universal-potential screen: relaxed structure, energies (eV/atom), displacement (Å).",
    )
    stability: dict[str, Any] = Field(
        default_factory=dict,
        description="Its DFT result against the engine's hull: E_hull (eV/atom), decomposition, hull phases.",
    )
    acquisition_score: float | None = None
    selected_round: int | None = Field(None, description="The round whose acquisition picked it for DFT.")
    dft_job: dict[str, Any] = Field(
        default_factory=dict, description="Backend, flow uuid, attempts and ids of its DFT submission."
    )
    owner: str | None = Field(None, description="Process that made the last transition.")
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)

    def order_key(self) -> tuple:
        """A reproducible order: round, then the generator's sample index, then the structure.

        ``candidate_id`` is random, so ordering by it alone would make the same seed pick a
        different random batch, break score ties differently and fine-tune on the results in
        another order; it only breaks the ties that remain.
        """
        index = self.provenance.get("sample_index")
        return (
            self.round,
            index if isinstance(index, int) else -1,
            self.reduced_formula,
            self.fingerprint,
            self.candidate_id,
        )


class DFTTaskRecord(_Doc):
    """One DFT (or surrogate) relaxation, as seen by the loop and the query CLI."""

    task_id: str
    candidate_id: str | None = None
    campaign: str | None = None
    round: int | None = None
    engine: Literal["espresso", "surrogate"]
    preset: str | None = None
    state: Literal["submitted", "running", "successful", "failed"]
    reasons: list[str] = Field(default_factory=list)
    reduced_formula: str | None = None
    elements: list[str] = Field(default_factory=list)
    energy_per_atom: float | None = Field(None, description="eV/atom")
    formation_energy_per_atom: float | None = Field(None, description="eV/atom")
    output: dict[str, Any] = Field(default_factory=dict, description="The full task document.")
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class StepRecord(_Doc):
    """One step of a campaign round: what went in, what came out, and which models it used."""

    name: str
    status: Literal["running", "done", "failed"] = "running"
    inputs: dict[str, Any] = Field(default_factory=dict)
    outputs: dict[str, Any] = Field(default_factory=dict, description="Counts, ids, metrics.")
    model_versions: dict[str, str] = Field(default_factory=dict)
    error: str | None = None
    started_at: datetime = Field(default_factory=utcnow)
    finished_at: datetime | None = None
    wall_s: float | None = Field(None, description="Wall time of the attempt that finished the step, s.")


class RoundDoc(_Doc):
    """What one campaign round did, step by step (collection ``campaign_rounds``)."""

    campaign: str
    round: int = Field(ge=0)
    steps: dict[str, StepRecord] = Field(
        default_factory=dict, description="Keyed by step name (the round's steps are loop.steps.ROUND)."
    )
    counts: dict[str, int] = Field(default_factory=dict)
    metrics: dict[str, float | None] = Field(default_factory=dict)
    started_at: datetime = Field(default_factory=utcnow)
    finished_at: datetime | None = None


class Lease(_Doc):
    """Which process may act on a campaign; renewed by a heartbeat, taken over once expired."""

    owner: str = Field(description="host:pid of the holder.")
    token: str
    heartbeat_at: datetime = Field(default_factory=utcnow)
    expires_at: datetime


class CampaignDoc(_Doc):
    """A campaign (collection ``campaigns``); its rounds live in ``campaign_rounds``."""

    name: str
    config: dict[str, Any]
    status: Literal["created", "running", "waiting", "stopped", "finished", "failed"] = Field(
        "created", description="waiting: a `run --until-blocked` returned with DFT jobs still out."
    )
    status_reason: str | None = None
    lease: Lease | None = None
    stop_requested: bool = False
    model_versions: dict[str, str] = Field(
        default_factory=dict, description="Models the next round uses: kind -> registry version."
    )
    conditioning: dict[str, Any] = Field(
        default_factory=dict, description="Decile boundaries of the generator's condition, as last updated."
    )
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class ModelDoc(_Doc):
    """A trained model version in the registry."""

    kind: Literal["unet", "vae", "cgcnn", "cgcnn-ensemble"]
    version: str
    dataset_hash: str
    config: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, float | None] = Field(default_factory=dict)
    checkpoint: str = Field(description="Checkpoint path (or gridfs:<id>).")
    torch_version: str | None = None
    default: bool = False
    created_at: datetime = Field(default_factory=utcnow)


class TrainingStructureDoc(StructureFields):
    """A labelled structure for training (prior set, Materials Project, or DFT feedback)."""

    structure_id: str = Field(description="Stable id, e.g. 'prior:perovskite:SrTiO3' or 'mp-5229'.")
    source: Literal["prior", "materials_project", "dft", "surrogate"]
    dataset: str = Field(description="Dataset name, e.g. 'prior-v1'.")
    material_class: Literal["binary", "perovskite", "heusler", "other"] = "other"
    prototype: str | None = Field(None, description="B1, B2, B3, perovskite, L21 ...")
    labels: dict[str, float | None] = Field(
        default_factory=dict, description=f"Keyed by {', '.join(PROPERTY_NAMES)}."
    )
    labeller: str | None = Field(None, description="e.g. 'chgnet-0.3.0', 'pw.x-6.7', 'mp-api'.")
    converged: bool = True
    eos_residual: float | None = Field(None, description="RMS E(V) fit residual, eV/atom.")
    reject_reason: str | None = None
    material_id: str | None = None
    created_at: datetime = Field(default_factory=utcnow)
