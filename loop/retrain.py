"""Retraining hooks: feed a round's DFT results back into the models.

A hook is ``fn(context) -> HookResult``, registered by name with
:func:`register_hook`. Built in:

- ``cgcnn_finetune``: fine-tune the CGCNN ensemble on a replay sample of the
  prior data plus every DFT result so far (DFT labels weighted up), register the
  new version, and record the MAE on this round's DFT results before and after.
- ``conditioning_update``: add the DFT-relaxed structures and their values to the
  training data (``training_structures``, source ``dft`` or ``surrogate``) and
  recompute the decile boundaries of the generator's condition.

A hook that raises leaves the previous model versions in use; its error is
recorded and the campaign goes on.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pymatgen.core import Structure

from crystaloop.dft.engines import get_engine
from crystaloop.errors import ConfigError

#: DFT values on an absolute scale of their own: pw.x's total energy per atom depends on the
#: pseudopotentials (-2322 eV/atom for B2 SiPd with the local family, where the CHGNet labels the
#: models learnt are near -6), so it never trains a model. Formation energies are differences and
#: carry over; so do the surrogate engine's energies, which are on the CHGNet scale of the labels.
ABSOLUTE_LABELS = frozenset({"energy_per_atom"})


@dataclass
class DFTResult:
    """One harvested relaxation: candidate, relaxed structure, DFT values (property units).

    ``screened`` is the structure the selecting prediction was made on (the decoded one): the
    CGCNN scores unrelaxed candidates, so it also learns from them (initial structure to relaxed
    value, as in OC20's IS2RE task), not only from relaxed structures it never screens.
    """

    candidate_id: str
    round: int
    structure: Structure
    values: dict[str, float | None]
    engine: str
    predicted: dict[str, float | None] = field(default_factory=dict)
    screened: Structure | None = None

    @property
    def labels(self) -> dict[str, float | None]:
        """The values a model may learn from (without pw.x's absolute energies)."""
        if get_engine(self.engine).portable_energies:
            return dict(self.values)
        return {k: v for k, v in self.values.items() if k not in ABSOLUTE_LABELS}


@dataclass
class HookContext:
    """What a hook sees.

    Attributes
    ----------
    campaign, round
        Which campaign and round ran.
    config
        The validated :class:`~crystaloop.loop.config.CampaignConfig`.
    database
        The crystaloop database.
    models
        Checkpoint path per kind (``vae``, ``unet``, ``cgcnn``) that the round used.
    results
        Every harvested DFT result of the campaign so far.
    new_results
        Those of this round.
    work_dir
        Where new checkpoints go.
    """

    campaign: str
    round: int
    config: Any
    database: Any
    models: dict[str, str]
    results: list[DFTResult]
    new_results: list[DFTResult]
    work_dir: Path


@dataclass
class HookResult:
    """Outcome of one hook: metrics, the model versions it registered, or its error."""

    name: str
    status: str = "done"
    metrics: dict[str, Any] = field(default_factory=dict)
    new_models: dict[str, str] = field(default_factory=dict)
    error: str | None = None


Hook = Callable[[HookContext], HookResult]
HOOKS: dict[str, Hook] = {}


def register_hook(name: str) -> Callable[[Hook], Hook]:
    """Decorator: make ``fn(context) -> HookResult`` available to ``retrain.hooks``."""

    def decorate(fn: Hook) -> Hook:
        HOOKS[name] = fn
        return fn

    return decorate


def enabled_hooks(retraining) -> list[str]:
    """Hook names a campaign's ``retrain`` section turns on, in order.

    Raises
    ------
    ConfigError
        A named hook is not registered.
    """
    names = []
    if retraining.cgcnn:
        names.append("cgcnn_finetune")
    if retraining.generator_conditioning:
        names.append("conditioning_update")
    for name in retraining.hooks:
        if name not in HOOKS:
            raise ConfigError(f"unknown retraining hook {name!r}; registered: {', '.join(sorted(HOOKS))}")
        if name not in names:
            names.append(name)
    return names


def run_hooks(names: list[str], context: HookContext) -> list[HookResult]:
    """Run each hook; one that raises gives a ``failed`` result and changes nothing."""
    results = []
    for name in names:
        try:
            result = HOOKS[name](context)
        except Exception as exc:  # a failing hook must never end the campaign
            last = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
            where = f" ({Path(last.filename).name}:{last.lineno})" if last else ""
            result = HookResult(name, status="failed", error=f"{type(exc).__name__}: {exc}{where}")
        results.append(result)
    return results


def _registry_version(
    database, kind: str, version: str, checkpoint: Path, config: dict, metrics: dict, data_hash: str
):
    from crystaloop.db.documents import ModelDoc
    from crystaloop.db.registry import ModelRegistry

    clean = {
        k: (float(v) if v is not None else None)
        for k, v in metrics.items()
        if isinstance(v, int | float) or v is None
    }
    ModelRegistry(database).register(
        ModelDoc(
            kind=kind,
            version=version,
            dataset_hash=data_hash,
            config=config,
            metrics=clean,
            checkpoint=str(checkpoint),
        )
    )


@register_hook("cgcnn_finetune")
def cgcnn_finetune(context: HookContext) -> HookResult:
    """Fine-tune the CGCNN ensemble on prior replay plus all DFT results; register the new version."""
    import torch

    from crystaloop.generative.models.checkpoint import load_model, save_model
    from crystaloop.generative.train.finetune import (
        finetune_ensemble,
        mean_absolute_errors,
        predict_structures,
    )

    settings = context.config.retrain
    ensemble, extra = load_model(context.models["cgcnn"])
    properties = list(ensemble.properties)
    new = context.new_results
    new_values = _matrix([r.labels for r in new], properties)
    before, _ = predict_structures(ensemble, [r.structure for r in new])
    screened = _matrix([r.predicted for r in new], properties)
    metrics: dict[str, Any] = {
        "mae_before": mean_absolute_errors(before, new_values, properties),
        "mae_screening": mean_absolute_errors(screened, new_values, properties),
        "n_dft": len(context.results),
        "n_new_dft": len(new),
    }
    screened_new = [r for r in new if r.screened is not None]
    screened_values = _matrix([r.labels for r in screened_new], properties)
    before_screened, _ = predict_structures(ensemble, [r.screened for r in screened_new])
    metrics["mae_screened_before"] = mean_absolute_errors(before_screened, screened_values, properties)
    replay = _replay_records(context.database, settings.replay, seed=context.config.seed + context.round)
    pairs = [(r.structure, r.labels) for r in context.results]
    pairs += [(r.screened, r.labels) for r in context.results if r.screened is not None]
    structures = [s for s, _ in replay] + [s for s, _ in pairs]
    labels = [lab for _, lab in replay] + [v for _, v in pairs]
    weights = [1.0] * len(replay) + [settings.dft_weight] * len(pairs)
    previous_threads = torch.get_num_threads()
    try:
        losses = finetune_ensemble(
            ensemble,
            structures,
            labels,
            weights,
            epochs=settings.epochs,
            lr=settings.learning_rate,
            seed=context.config.seed + context.round,
        )
    finally:
        torch.set_num_threads(previous_threads)
    after, _ = predict_structures(ensemble, [r.structure for r in new])
    metrics["mae_after"] = mean_absolute_errors(after, new_values, properties)
    after_screened, _ = predict_structures(ensemble, [r.screened for r in screened_new])
    metrics["mae_screened_after"] = mean_absolute_errors(after_screened, screened_values, properties)
    metrics.update(losses)
    version = f"{context.campaign}-cgcnn-r{context.round}"
    path = context.work_dir / f"{version}.pt"
    save_model(
        ensemble, path, **{**extra, "finetuned_from": str(context.models["cgcnn"]), "round": context.round}
    )
    target = properties[0] if properties else "formation_energy_per_atom"
    flat = {
        f"mae_before_{target}": metrics["mae_before"].get(target),
        f"mae_after_{target}": metrics["mae_after"].get(target),
    }
    _registry_version(
        context.database,
        "cgcnn-ensemble",
        version,
        path,
        {
            "finetuned_from": str(context.models["cgcnn"]),
            "epochs": settings.epochs,
            "dft_weight": settings.dft_weight,
        },
        flat,
        data_hash=f"{context.campaign}:r{context.round}:{len(context.results)}",
    )
    return HookResult("cgcnn_finetune", metrics=metrics, new_models={"cgcnn": version})


def _matrix(rows: list[dict[str, float | None]], properties: list[str]) -> np.ndarray:
    """(N, P) floats with NaN for missing values."""
    return np.array(
        [[np.nan if row.get(p) is None else float(row[p]) for p in properties] for row in rows], dtype=float
    ).reshape(len(rows), len(properties))


def _replay_records(database, n: int, *, seed: int) -> list[tuple[Structure, dict]]:
    """``n`` random labelled prior structures (converged, not rejected)."""
    if n <= 0:
        return []
    query = {"source": "prior", "converged": True, "reject_reason": None}
    # Sorted ids, and the documents in that order: the same seed replays the same structures in
    # the same order, whatever order the server returns them in.
    ids = sorted(
        d["structure_id"] for d in database["training_structures"].find(query, {"structure_id": 1, "_id": 0})
    )
    if not ids:
        return []
    rng = np.random.default_rng(seed)
    picked = sorted(rng.choice(len(ids), size=min(n, len(ids)), replace=False))
    chosen = [ids[i] for i in picked]
    docs = database["training_structures"].find(
        {"structure_id": {"$in": chosen}}, {"_id": 0, "structure_id": 1, "structure": 1, "labels": 1}
    )
    docs = sorted(docs, key=lambda d: d["structure_id"])
    return [(Structure.from_dict(d["structure"]), dict(d.get("labels") or {})) for d in docs]


@register_hook("conditioning_update")
def conditioning_update(context: HookContext) -> HookResult:
    """Add the campaign's DFT results to the training data and recompute the condition's decile boundaries.

    All results, not only the new ones: a round whose retrain was skipped is added by the next
    one (documents are replaced by id, so adding one twice changes nothing).
    """
    from crystaloop.db.documents import StructureFields, TrainingStructureDoc
    from crystaloop.db.training import campaign_dataset, upsert_documents
    from crystaloop.generative.models.checkpoint import load_model
    from crystaloop.generative.models.condition import DecileCondition

    vae, _ = load_model(context.models["vae"])
    condition = vae.condition
    docs = []
    for r in context.results:
        docs.append(
            TrainingStructureDoc(
                structure_id=f"{r.engine}:{context.campaign}:{r.candidate_id}",
                source=get_engine(r.engine).source,
                dataset=campaign_dataset(context.campaign),
                labels={k: v for k, v in r.labels.items() if v is not None},
                labeller=r.engine,
                **StructureFields.fields_from(r.structure),
            ).model_dump()
        )
    added = upsert_documents(context.database, docs) if docs else 0
    name = condition.property_name
    query = {"converged": True, "reject_reason": None, f"labels.{name}": {"$ne": None}}
    values = [
        d["labels"][name]
        for d in context.database["training_structures"].find(query, {"labels": 1, "_id": 0})
        if d.get("labels", {}).get(name) is not None
    ]
    updated = DecileCondition.fit(values, name)
    shift = [float(b - a) for a, b in zip(condition.boundaries, updated.boundaries, strict=True)]
    return HookResult(
        "conditioning_update",
        metrics={
            "added": added,
            "n_labelled": len(values),
            "boundaries_before": list(condition.boundaries),
            "boundaries_after": list(updated.boundaries),
            "max_boundary_shift": float(np.max(np.abs(shift))) if shift else 0.0,
        },
    )


@register_hook("dft_hull")
def dft_hull_phases(context: HookContext) -> HookResult:
    """Relax the competing phases of this round's hits' chemical systems with the campaign's DFT
    settings (once, cached) and place the campaign's relaxed candidates of those systems against
    the hull they complete (:func:`crystaloop.loop.hull_phases.verify_against_hull`)."""
    from crystaloop.loop.hull_phases import verify_against_hull

    systems = sorted(
        {
            "-".join(sorted(el.symbol for el in r.structure.composition.elements))
            for r in context.new_results
            if context.config.in_all_windows(r.values)
        }
    )
    run, rows = verify_against_hull(context.database, context.config, systems=systems)
    return HookResult(
        "dft_hull",
        metrics={
            "systems": run.systems,
            "phases": run.phases,
            "reused": run.reused,
            "from_cache": run.from_cache,
            "relaxed": run.relaxed,
            "failed": run.failed,
            "placed": len(rows),
            "seconds": run.seconds,
        },
    )
