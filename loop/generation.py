"""Candidate generation: sample, decode, filter, and store the shortlist.

:func:`decode_batch` (a campaign's ``generate`` step) draws latent vectors
(:mod:`crystaloop.generative.sample`) and decodes them with the species restricted to the
campaign's elements (:class:`crystaloop.generative.decode.Decoder`). :func:`filter_batch` (the
``filter`` step) runs the filter cascade (:mod:`crystaloop.loop.filters`) and writes every survivor
as a ``shortlisted`` candidate in one ``insert_many``, each tagged with the call's
``generation_id``, so a loop killed mid-call can tell whether the call's results landed.
:func:`generate_candidates` does both (``crystaloop generate``).
"""

from __future__ import annotations

import math
import pickle
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from pymatgen.core import Composition, Structure

from crystaloop.db.documents import CandidateDoc, CandidateState, utcnow
from crystaloop.dft.surrogate import CHGNetRelaxer
from crystaloop.errors import UserError
from crystaloop.loop.config import CampaignConfig, TargetWindow
from crystaloop.loop.filters import (
    Candidate,
    CrystalSystemStage,
    DecodedStage,
    ElementStage,
    FilterCascade,
    HullPhasesStage,
    NoveltyStage,
    SizeStage,
    StoichiometryStage,
    UIPStage,
    UniqueStage,
    ValidityStage,
    WindowStage,
    material_class_formulas,
    relative_window,
)
from crystaloop.loop.stability import ENERGY_ABOVE_HULL, HullPredictor, chgnet_hull

STRATEGIES = ("random", "around_base", "interpolate", "optimize", "prototypes")
EF = "formation_energy_per_atom"


class StageReport(BaseModel):
    """Counts of one step: candidates in and out, and its wall time (s)."""

    model_config = ConfigDict(extra="forbid")

    stage: str
    n_in: int
    n_out: int
    seconds: float


class GenerationReport(BaseModel):
    """What one :func:`generate_candidates` call did."""

    model_config = ConfigDict(extra="forbid")

    generation_id: str
    campaign: str
    round: int
    strategy: str
    parameters: dict[str, Any] = Field(default_factory=dict, description="Strategy parameters.")
    seed: int
    n_requested: int
    decoder_method: str | None = Field(None, description="The decoder's path (paper, pursuit, sites).")
    restrict_elements: bool = Field(description="Species decisions restricted at decoding time.")
    allowed_elements: list[str] | None = None
    stages: list[StageReport] = Field(default_factory=list, description="The cascade, in order.")
    seconds: dict[str, float] = Field(
        default_factory=dict, description="Wall time (s) per step: load, sample, decode, each stage, write."
    )
    shortlisted: list[str] = Field(default_factory=list, description="Ids of stored survivors.")
    n_shortlisted: int = 0
    n_rejects_stored: int = 0
    model_versions: dict[str, str] = Field(default_factory=dict)
    dry_run: bool = False
    rejected_reasons: dict[str, dict[str, int]] = Field(
        default_factory=dict, description="Per stage, the most frequent rejection reasons and counts."
    )

    @property
    def total_seconds(self) -> float:
        """Wall time of the whole call (s)."""
        return float(sum(self.seconds.values()))


# -- models ------------------------------------------------------------------------------------


@lru_cache(maxsize=4)
def load_decoder(
    vae: str,
    unet: str,
    device: str = "auto",
    workers: int | None = None,
    method: str | None = None,
    symprec: float | None = None,
):
    """A :class:`~crystaloop.generative.decode.Decoder`, kept for the life of the process.

    ``method`` is the decoder's path (``paper``, ``pursuit``, ``sites``; None: the VAE's default);
    ``symprec`` symmetrises what it decodes (``sampling.symprec``).
    """
    from crystaloop.generative.decode import Decoder

    kwargs = {"method": method} if method is not None else {}
    return Decoder.from_checkpoints(vae, unet, device=device, workers=workers, symprec=symprec, **kwargs)


class EnsemblePredictor:
    """The CGCNN ensemble (or a single CGCNN) as a batched predictor of means and stds.

    Structures the model cannot featurise (elements beyond Pu) get NaN rows.
    """

    def __init__(self, path: str | Path, version: str, *, device: str = "cpu", batch_size: int = 256) -> None:
        from crystaloop.generative.models.checkpoint import load_model

        self.model, _ = load_model(path)
        self.model = self.model.to(device).eval()
        self.device, self.batch_size, self.version = device, batch_size, version
        self.properties = list(self.model.properties)
        members = getattr(self.model, "members", None)
        self._graph = (members[0] if members is not None else self.model).graph

    @torch.no_grad()
    def predict(self, structures: Sequence[Structure]) -> tuple[np.ndarray, np.ndarray]:
        """Means and standard deviations, each (n, n_properties), property units."""
        from crystaloop.generative.models.cgcnn import collate_graphs
        from crystaloop.generative.models.ensemble import CGCNNEnsemble

        n, p = len(structures), len(self.properties)
        mean, std = np.full((n, p), np.nan), np.full((n, p), np.nan)
        graphs, rows = [], []
        for i, s in enumerate(structures):
            try:
                graphs.append(self._graph(s))
                rows.append(i)
            except ValueError:
                continue
        for start in range(0, len(graphs), self.batch_size):
            batch = collate_graphs(graphs[start : start + self.batch_size]).to(self.device)
            if isinstance(self.model, CGCNNEnsemble):
                m, s = self.model.predict(batch)
            else:
                m = self.model.predict(batch)
                s = torch.zeros_like(m)
            idx = rows[start : start + self.batch_size]
            mean[idx], std[idx] = m.cpu().numpy(), s.cpu().numpy()
        return mean, std


def chgnet_references(labeller: str) -> Callable[[Iterable[str]], dict[str, float]]:
    """Elemental CHGNet references (eV/atom) of the prior data; missing ones computed and cached.

    New elements are cached under the data directory, never in the installed package.
    """
    from crystaloop.generative.data.references import compute_references, load_references
    from crystaloop.settings import get_settings

    cache = get_settings().data_dir / "references" / f"references-{labeller}.json"
    table = {s: v["energy_per_atom"] for s, v in load_references(labeller, cache).items()}

    def lookup(symbols: Iterable[str]) -> dict[str, float]:
        symbols = sorted(set(symbols))
        missing = [s for s in symbols if s not in table]
        if missing:
            from crystaloop.dft.surrogate import load_chgnet

            table.update(compute_references(missing, labeller, model=load_chgnet(), cache=cache))
        return {s: table[s] for s in symbols}

    return lookup


def model_versions(database, paths: dict[str, str]) -> dict[str, str]:
    """Registry version of each checkpoint path (the file stem when it is not registered)."""
    out = {}
    for kind, path in paths.items():
        doc = database["models"].find_one({"checkpoint": str(path)}, {"version": 1})
        out[kind] = doc["version"] if doc else Path(path).stem
    return out


# -- data the cascade compares with ----------------------------------------------------------


@lru_cache(maxsize=1)
def _shipped_prior() -> dict[str, list[tuple[Structure, dict]]]:
    from crystaloop.generative.data.dataset import prior_records

    by_formula: dict[str, list[tuple[Structure, dict]]] = {}
    for record in prior_records():
        by_formula.setdefault(record.structure.composition.reduced_formula, []).append(
            (record.structure, dict(record.labels))
        )
    return by_formula


def training_structures(
    database, reduced_formula: str, *, only_campaign: str | None = None
) -> list[tuple[Structure, dict]]:
    """Training structures of one reduced formula with their labels.

    From the ``training_structures`` collection; when it is empty, from the shipped prior set the
    shipped models were trained on. With ``only_campaign`` the DFT results other campaigns added
    are left out (that campaign's own are kept).
    """
    from crystaloop.db.training import CAMPAIGN_DATASET_PREFIX, COLLECTION, campaign_dataset

    coll = database[COLLECTION]
    if coll.estimated_document_count() == 0:
        return list(_shipped_prior().get(reduced_formula, []))
    # One indexed equality query; the campaign filter is applied here, as an $or beside it
    # would make the embedded server scan the whole collection for every formula.
    docs = coll.find({"reduced_formula": reduced_formula}, {"structure": 1, "labels": 1, "dataset": 1})
    own = campaign_dataset(only_campaign) if only_campaign is not None else None
    return [
        (Structure.from_dict(d["structure"]), d.get("labels") or {})
        for d in docs
        if own is None
        or not str(d.get("dataset", "")).startswith(CAMPAIGN_DATASET_PREFIX)
        or d["dataset"] == own
    ]


def known_structures(database, campaign: str, *, scope: str = "all") -> Callable[[str], list[Structure]]:
    """Lookup of known structures by reduced formula: training data plus live campaign candidates.

    ``scope="own"`` leaves out the DFT results of other campaigns (``filters.novelty_scope``).
    """
    from crystaloop.db.store import CandidateStore

    store = CandidateStore(database)
    only = campaign if scope == "own" else None

    def lookup(formula: str) -> list[Structure]:
        known = [s for s, _ in training_structures(database, formula, only_campaign=only)]
        query = {
            "campaign": campaign,
            "reduced_formula": formula,
            "state": {"$ne": CandidateState.REJECTED.value},
        }
        known += [Structure.from_dict(d["structure"]) for d in store.collection.find(query, {"structure": 1})]
        return known

    return lookup


@dataclass(frozen=True)
class BaseCompound:
    """A compound to sample around: its structure and, when known, its formation energy (eV/atom)."""

    formula: str
    structure: Structure
    formation_energy: float | None


def resolve_base(database, reference: str) -> BaseCompound:
    """A base compound from a CIF path or a formula in the training data (lowest E_f polymorph).

    Raises
    ------
    UserError
        If the CIF cannot be read or the formula is not in the training data.
    """
    path = Path(reference)
    if path.suffix.lower() == ".cif" or path.is_file():
        try:
            structure = Structure.from_file(path)
        except Exception as exc:
            raise UserError(
                f"cannot read base compound {path} ({type(exc).__name__}); give a valid CIF"
            ) from None
        return BaseCompound(structure.composition.reduced_formula, structure, None)
    formula = Composition(reference).reduced_formula
    found = training_structures(database, formula)
    if not found:
        raise UserError(
            f"base compound {reference} is not in the training data; give a CIF path in "
            "sampling.base_formulas or load the data with `crystaloop data load-prior`"
        )

    def energy(item: tuple[Structure, dict]) -> float:
        value = item[1].get(EF)
        return math.inf if value is None else float(value)

    structure, labels = min(found, key=energy)
    return BaseCompound(formula, structure, labels.get(EF))


# -- sampling ----------------------------------------------------------------------------------


def condition_window(config: CampaignConfig, property_name: str) -> TargetWindow | None:
    """The campaign's window on the VAE condition's property, if it has one."""
    return next((t for t in config.targets if t.property == property_name), None)


def draw_latents(
    config: CampaignConfig,
    decoder,
    database,
    *,
    n: int,
    strategy: str,
    seed: int,
    hits: Sequence[BaseCompound] = (),
):
    """The :class:`~crystaloop.generative.sample.LatentSamples` and the bases they came from.

    With ``hits`` (a campaign's DFT-verified hits) and ``sampling.around_hits`` > 0, that share
    of the ``n`` samples is drawn around the hits' encodings instead (rows marked ``around_hit``),
    conditioned on the target window.
    """
    from crystaloop.generative import sample

    vae = decoder.vae
    window = condition_window(config, vae.condition.property_name)
    target_deciles = (
        sample.window_deciles(vae.condition, window.min, window.max)
        if window is not None
        else list(range(10))
    )
    bases: list[BaseCompound] = []
    sampling = config.sampling
    n_hits = int(round(n * sampling.around_hits)) if hits else 0
    n_own = n - n_hits  # drawn as `strategy` says
    if strategy in ("around_base", "interpolate") or (strategy == "optimize" and sampling.base_formulas):
        if not sampling.base_formulas:
            raise UserError(f"strategy {strategy!r} needs sampling.base_formulas in the campaign file")
        bases = [resolve_base(database, f) for f in sampling.base_formulas]
        values = [b.formation_energy for b in bases]
        means = encode_bases(decoder, bases)
        if sampling.condition_on == "base" and vae.condition.property_name == EF:
            base_deciles = [
                [int(vae.condition.index([v])[0])] if v is not None else target_deciles for v in values
            ]
        else:
            base_deciles = [target_deciles] * len(bases)
        formulas = [b.formula for b in bases]
    if strategy == "random" or (strategy == "optimize" and not bases):
        samples = sample.sample_random(vae.latent_dim, n_own, target_deciles, seed=seed, vae=vae)
    elif strategy in ("around_base", "optimize"):
        samples = sample.sample_around_bases(
            means, formulas, base_deciles, n_own, std=sampling.std, seed=seed
        )
    elif strategy == "interpolate":
        if len(bases) < 2:
            raise UserError("strategy 'interpolate' needs at least two sampling.base_formulas")
        samples = sample.sample_interpolation(
            means,
            formulas,
            base_deciles,
            n_own,
            steps=sampling.interpolation_steps,
            std=sampling.std,
            seed=seed,
        )
    else:
        raise UserError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    if strategy == "optimize":
        target = next((t for t in config.targets if t.property in vae.properties), None)
        if target is None:
            raise UserError(
                f"strategy 'optimize' needs a VAE with a property head for one of the targets "
                f"({', '.join(t.property for t in config.targets)}); this VAE predicts "
                f"{', '.join(vae.properties) or 'nothing'}; train configs/train/paper/vae_joint.yaml"
            )
        lo = -math.inf if target.min is None else target.min
        hi = math.inf if target.max is None else target.max
        samples = sample.optimize_samples(
            vae, samples, target.property, (lo, hi), steps=sampling.optimize_steps
        )
    if n_hits:
        formulas = [h.formula for h in hits]
        around = sample.sample_around_bases(
            encode_bases(decoder, hits), formulas, [target_deciles] * len(hits), n_hits,
            std=sampling.hits_std, seed=seed + 1,
        )  # fmt: skip
        samples = sample.LatentSamples(
            torch.cat([samples.z, around.z]),
            torch.cat([samples.condition, around.condition]),
            samples.rows + [{**row, "around_hit": True} for row in around.rows],
            samples.strategy,
            {**samples.parameters, "around_hits": n_hits, "hits_std": sampling.hits_std, "hits": formulas},
        )
    return samples, bases


def encode_bases(decoder, bases: Sequence[BaseCompound]) -> torch.Tensor:
    """Encoder means of base compounds, each conditioned on its formation energy when all are known."""
    values = [b.formation_energy for b in bases]
    labelled = decoder.vae.condition.property_name == EF and all(v is not None for v in values)
    means, _ = decoder.encode([b.structure for b in bases], values if labelled else None)
    return means


# -- elements ----------------------------------------------------------------------------------


def pseudo_family(config: CampaignConfig):
    """The pseudopotential family a campaign's espresso engine uses (None for the surrogate).

    ``dft.pseudo_family`` is a family YAML path, or the name of the family configured in the
    settings (``CRYSTALOOP_PSEUDO_FAMILY``).

    Raises
    ------
    UserError
        If the family cannot be found or the configured one has another name.
    """
    from crystaloop.dft.engines import get_engine

    if not get_engine(config.dft.engine).dft:
        return None
    from crystaloop.dft.pseudos import family_from_settings, load_family

    ref = config.dft.pseudo_family
    if ref.endswith((".yaml", ".yml")) or Path(ref).expanduser().is_file():
        return load_family(ref)
    family = family_from_settings()
    if family.name != ref:
        raise UserError(
            f"the campaign asks for pseudopotential family {ref!r} but the configured one is "
            f"{family.name!r}; set CRYSTALOOP_PSEUDO_FAMILY to its YAML or give the YAML path in dft.pseudo_family"
        )
    return family


def allowed_elements(config: CampaignConfig, family, decodable: Sequence[str]) -> list[str]:
    """Decodable elements the campaign allows (allow/deny lists and pseudopotential coverage).

    Raises
    ------
    UserError
        If none remain.
    """
    rules = config.elements
    keep = [s for s in decodable if rules.permits([s]) and (family is None or s in family.pseudopotentials)]
    if not keep:
        raise UserError(
            "no element the decoder knows is allowed by elements.allow/deny"
            + (f" and covered by pseudopotential family {family.name}" if family else "")
            + f"; the decoder knows {' '.join(decodable)}"
        )
    return keep


# -- the call ------------------------------------------------------------------------------------


def derive_seed(config: CampaignConfig, round: int) -> int:
    """The default seed of a round: the campaign's sampling seed and round number combined."""
    return int(np.random.SeedSequence([config.sampling.seed, config.seed, round]).generate_state(1)[0])


def build_cascade(
    config: CampaignConfig,
    *,
    strategy: str,
    database,
    family,
    predictor,
    uip: bool,
) -> FilterCascade:
    """The stages a campaign's filter settings ask for, in order."""
    f = config.filters
    stages: list[Any] = [DecodedStage(), ValidityStage(f.min_distance)]
    by_base = f.same_stoichiometry_as_base and strategy in ("around_base", "interpolate")
    # Without base compounds, the campaign's material classes fix the stoichiometry (AB, ABC3, ABC2).
    allowed = list(f.allowed_formulas) + ([] if by_base else material_class_formulas(config.material_classes))
    if by_base or allowed:
        stages.append(StoichiometryStage(use_base=by_base, allowed_formulas=allowed))
    covered = frozenset(family.pseudopotentials) if family is not None else None
    stages.append(ElementStage(config.elements, covered, family.name if family is not None else None))
    if f.max_nsites is not None:
        stages.append(SizeStage(f.max_nsites, f.size_symprec))
    if f.crystal_systems:
        stages.append(CrystalSystemStage(f.crystal_systems, f.size_symprec or 0.1))
    if f.novelty:
        from crystaloop.db.training import COLLECTION

        if database[COLLECTION].estimated_document_count() == 0:
            _shipped_prior()  # read once here, so the novel stage's time is its own
        stages.append(NoveltyStage(known_structures(database, config.name, scope=f.novelty_scope)))
    hull = None
    if f.min_hull_phases or any(t.property == ENERGY_ABOVE_HULL for t in config.targets):
        hull = chgnet_hull(database, config.name)
        if f.min_hull_phases:
            stages.append(HullPhasesStage(hull, f.min_hull_phases))
        predictor = HullPredictor(predictor, hull)
    stages.append(WindowStage(predictor, config.targets, f.window_tolerance, f.min_probability))
    if uip:
        relaxer = CHGNetRelaxer(fmax=f.uip_fmax, steps=f.uip_steps, max_volume_change=f.max_uip_volume_change)
        stages.append(
            UIPStage(
                relaxer,
                chgnet_references(relaxer.version),
                config.targets,
                f.window_tolerance,
                f.max_uip_volume_change,
                max_relaxations=f.uip_max_relaxations,
                hull=hull,
            )
        )
    stages.append(UniqueStage())
    return FilterCascade(stages)


@dataclass
class DecodedBatch:
    """What :func:`decode_batch` made: the decoded candidates and how they were sampled.

    A campaign's generate step saves it (:meth:`save`) for its filter step to read.
    """

    candidates: list[Candidate]
    strategy: str
    parameters: dict[str, Any]
    seed: int
    n_requested: int
    restrict_elements: bool
    allowed_elements: list[str]
    decoder_method: str | None
    model_paths: dict[str, str]
    model_versions: dict[str, str]
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def n_decoded(self) -> int:
        """How many samples gave a structure."""
        return sum(c.structure is not None for c in self.candidates)

    def summary(self) -> str:
        """One line for the round's log: what was asked for and what came out."""
        if "pool" in self.parameters:  # drawn from a finite pool (sampling.mode: prototypes)
            return (
                f"drew {self.n_decoded} of {self.parameters['pool']} prototype decorations "
                f"(asked for {self.n_requested})"
            )
        return f"generated {self.n_requested}, decoded {self.n_decoded}"

    def save(self, path: Path) -> Path:
        """Write the batch to ``path`` (a pickle: structures, latents and sampling rows)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        with partial.open("wb") as handle:
            pickle.dump(self, handle, protocol=pickle.HIGHEST_PROTOCOL)
        partial.replace(path)  # a kill mid-write never leaves a truncated batch behind
        return path

    @staticmethod
    def load(path: Path) -> DecodedBatch:
        """The batch :meth:`save` wrote to ``path``."""
        with path.open("rb") as handle:
            return pickle.load(handle)


def decode_batch(
    config: CampaignConfig,
    *,
    database,
    n: int,
    round: int = 0,
    strategy: str | None = None,
    seed: int | None = None,
    models: dict[str, str] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    restrict_elements: bool | None = None,
    batch_size: int = 64,
    device: str | None = None,
    workers: int | None = None,
    decoder_method: str | None = None,
    hits: Sequence[BaseCompound] = (),
) -> DecodedBatch:
    """Sample ``n`` latent vectors and decode them into candidate crystals (nothing is filtered
    or stored). The arguments are :func:`generate_candidates`'s.

    Raises
    ------
    UserError
        Unknown strategy, base compound or pseudopotential family; no allowed element.
    """
    from crystaloop.generative.models.shipped import resolve_models
    from crystaloop.settings import get_settings

    if n < 1:
        raise UserError(f"--n must be at least 1; got {n}")
    strategy = strategy or config.sampling.mode
    if strategy not in STRATEGIES:
        raise UserError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    restrict = config.sampling.restrict_elements if restrict_elements is None else restrict_elements
    seed = derive_seed(config, round) if seed is None else int(seed)
    if strategy == "prototypes":
        from crystaloop.loop.prototypes import prototype_batch

        return prototype_batch(config, database=database, n=n, seed=seed, models=models)
    seconds: dict[str, float] = {}

    clock = time.perf_counter()
    family = pseudo_family(config)
    paths = models or resolve_models(database, **config.models.model_dump())
    paths = {k: str(v) for k, v in paths.items()}
    versions = model_versions(database, paths)
    device = device or get_settings().resolve_device()
    try:
        decoder = load_decoder(
            paths["vae"], paths["unet"], device, workers, decoder_method, config.sampling.symprec
        )
    except ValueError as exc:
        raise UserError(f"{exc}; pick another decoder method") from None
    allowed = allowed_elements(config, family, decoder.elements)
    seconds["load"] = time.perf_counter() - clock

    clock = time.perf_counter()
    samples, bases = draw_latents(config, decoder, database, n=n, strategy=strategy, seed=seed, hits=hits)
    seconds["sample"] = time.perf_counter() - clock

    clock = time.perf_counter()
    decoded = decoder.decode(
        samples.z,
        samples.condition,
        allowed_elements=allowed if restrict else None,
        batch_size=batch_size,
        progress=(lambda done, total: progress("decode", done, total)) if progress else None,
    )
    seconds["decode"] = time.perf_counter() - clock

    base_windows = {}
    fraction = config.filters.window_relative_to_base
    if fraction is not None:
        base_windows = {
            b.formula: relative_window(EF, b.formation_energy, fraction)
            for b in bases
            if b.formation_energy is not None
        }
    candidates = []
    for d in decoded:
        row = samples.rows[d.index]
        window = base_windows.get(row.get("base_formula"))
        candidates.append(
            Candidate(
                index=d.index,
                structure=d.structure,
                sample=row,
                latent=d.latent,
                decode_reason=d.reason,
                windows={EF: window} if window is not None else {},
            )
        )
    return DecodedBatch(
        candidates=candidates,
        strategy=strategy,
        parameters=samples.parameters,
        seed=seed,
        n_requested=n,
        restrict_elements=restrict,
        allowed_elements=allowed,
        decoder_method=getattr(decoder, "method", None),
        model_paths=paths,
        model_versions=versions,
        seconds=seconds,
    )


def filter_batch(
    config: CampaignConfig,
    batch: DecodedBatch,
    *,
    database,
    round: int = 0,
    generation_id: str | None = None,
    dry_run: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
    uip_screen: bool | None = None,
    device: str | None = None,
) -> GenerationReport:
    """Run the filter cascade over a decoded batch and store the survivors as ``shortlisted``.

    The survivors (and, with ``filters.store_rejects``, the rejects) are written in one
    ``insert_many``, each tagged with ``generation_id`` (default: a new id). The arguments are
    :func:`generate_candidates`'s.
    """
    from crystaloop.db.store import CandidateStore
    from crystaloop.settings import get_settings

    uip = config.filters.uip_screen if uip_screen is None else uip_screen
    generation_id = generation_id or uuid.uuid4().hex
    seconds = dict(batch.seconds)

    clock = time.perf_counter()
    device = device or get_settings().resolve_device()
    predictor = EnsemblePredictor(batch.model_paths["cgcnn"], batch.model_versions["cgcnn"], device=device)
    cascade = build_cascade(
        config,
        strategy=batch.strategy,
        database=database,
        family=pseudo_family(config),
        predictor=predictor,
        uip=uip,
    )
    seconds["load"] = seconds.get("load", 0.0) + time.perf_counter() - clock

    candidates = batch.candidates
    survivors, counts = cascade.run(candidates, progress=progress)
    for c in counts:
        seconds[c.stage] = c.seconds

    restrict = batch.restrict_elements
    report = GenerationReport(
        generation_id=generation_id,
        decoder_method=batch.decoder_method,
        campaign=config.name,
        round=round,
        strategy=batch.strategy,
        parameters=batch.parameters,
        seed=batch.seed,
        n_requested=batch.n_requested,
        restrict_elements=restrict,
        allowed_elements=batch.allowed_elements if restrict else None,
        stages=[StageReport(stage=c.stage, n_in=c.n_in, n_out=c.n_out, seconds=c.seconds) for c in counts],
        model_versions=batch.model_versions,
        dry_run=dry_run,
        rejected_reasons=reason_counts(candidates),
    )

    clock = time.perf_counter()
    provenance = {
        "generation_id": generation_id,
        "strategy": batch.strategy,
        "parameters": batch.parameters,
        "seed": batch.seed,
        "model_versions": batch.model_versions,
        "restrict_elements": restrict,
    }
    docs = [
        candidate_document(
            c, config, round, provenance, CandidateState.SHORTLISTED, config.sampling.store_latent
        )
        for c in survivors
    ]
    rejects = []
    if config.filters.store_rejects:
        rejects = [
            candidate_document(c, config, round, provenance, CandidateState.REJECTED, False)
            for c in candidates
            if c.rejected_stage is not None and c.structure is not None and len(c.structure) > 0
        ]
    if not dry_run:
        CandidateStore(database).insert_many(docs + rejects)
    seconds["write"] = time.perf_counter() - clock
    report.shortlisted = [d.candidate_id for d in docs]
    report.n_shortlisted = len(docs)
    report.n_rejects_stored = 0 if dry_run else len(rejects)
    report.seconds = seconds
    return report


def generate_candidates(
    config: CampaignConfig,
    *,
    database,
    n: int,
    round: int = 0,
    generation_id: str | None = None,
    strategy: str | None = None,
    dry_run: bool = False,
    seed: int | None = None,
    models: dict[str, str] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    restrict_elements: bool | None = None,
    uip_screen: bool | None = None,
    batch_size: int = 64,
    device: str | None = None,
    workers: int | None = None,
    decoder_method: str | None = None,
    hits: Sequence[BaseCompound] = (),
) -> GenerationReport:
    """Sample ``n`` candidates, filter them and store the survivors as ``shortlisted``:
    :func:`decode_batch`, then :func:`filter_batch`.

    Parameters
    ----------
    config
        The campaign.
    database
        The crystaloop database.
    n
        Latent samples to draw.
    round
        Campaign round recorded on every candidate.
    generation_id
        Tag written into every stored candidate's provenance (default: a new id).
    strategy
        ``random``, ``around_base``, ``interpolate``, ``optimize`` or ``prototypes`` (default ``sampling.mode``).
    dry_run
        Run everything, write nothing.
    seed
        Sampling seed (default: derived from the campaign seeds and the round).
    models
        Checkpoint paths ``{"vae", "unet", "cgcnn"}`` (default: the campaign's, resolved).
    progress
        Called as ``progress(step, done, total)``: ``decode`` per batch, then each stage.
    restrict_elements, uip_screen
        Override ``sampling.restrict_elements`` and ``filters.uip_screen``.
    batch_size, device, workers, decoder_method
        Decoder batch size, device (default from settings), watershed processes and decoding path
        (``paper``, ``pursuit``, ``sites``; default: the VAE's).
    hits
        A campaign's DFT-verified hits, sampled around when ``sampling.around_hits`` > 0.

    Raises
    ------
    UserError
        Unknown strategy, base compound or pseudopotential family; no allowed element.
    """
    batch = decode_batch(
        config,
        database=database,
        n=n,
        round=round,
        strategy=strategy,
        seed=seed,
        models=models,
        progress=progress,
        restrict_elements=restrict_elements,
        batch_size=batch_size,
        device=device,
        workers=workers,
        decoder_method=decoder_method,
        hits=hits,
    )
    return filter_batch(
        config,
        batch,
        database=database,
        round=round,
        generation_id=generation_id,
        dry_run=dry_run,
        progress=progress,
        uip_screen=uip_screen,
        device=device,
    )


def why_empty(stages: Sequence[dict], rejected_reasons: dict[str, dict[str, int]]) -> str | None:
    """One line naming the cascade stage that emptied a shortlist and its most frequent rejection,
    or ``None`` when something survived.

    ``stages`` and ``rejected_reasons`` are a :class:`GenerationReport`'s, as stored (dicts).
    """
    if not stages or stages[-1]["n_out"] > 0:
        return None
    first_empty = next(s for s in stages if s["n_out"] == 0)
    name = first_empty["stage"]
    line = f"nothing shortlisted: the {name} stage took {first_empty['n_in']} and kept none"
    reasons = rejected_reasons.get(name) or {}
    if reasons:
        reason, count = max(reasons.items(), key=lambda item: item[1])
        line += f"; most frequent rejection: {reason!r} ({count})"
    return line


def reason_counts(candidates: Sequence[Candidate], top: int = 5) -> dict[str, dict[str, int]]:
    """Per stage, the ``top`` most frequent rejection reasons (numbers stripped) and their counts."""
    import re
    from collections import Counter

    per_stage: dict[str, Counter] = {}
    for c in candidates:
        if c.rejected_stage is None:
            continue
        reason = re.sub(r"-?\d+(\.\d+)?", "#", c.rejected_reason or "")
        per_stage.setdefault(c.rejected_stage, Counter())[reason] += 1
    return {stage: dict(counter.most_common(top)) for stage, counter in per_stage.items()}


def candidate_document(
    candidate: Candidate,
    config: CampaignConfig,
    round: int,
    provenance: dict[str, Any],
    state: CandidateState,
    store_latent: bool,
) -> CandidateDoc:
    """The stored form of a candidate that went through the cascade."""
    from crystaloop.db.store import CandidateStore

    prov = {**provenance, "sample": candidate.sample, "sample_index": candidate.index}
    if store_latent and candidate.latent is not None:
        prov["latent"] = [float(x) for x in candidate.latent]
    doc = CandidateStore.new_document(
        candidate.structure,
        campaign=config.name,
        round=round,
        provenance=prov,
        predicted=candidate.predicted,
    )
    now = utcnow()
    history = [*doc.state_history, {"state": state.value, "at": now}]
    update: dict[str, Any] = {
        "state": state.value,
        "state_history": history,
        "filter_trail": candidate.trail,
        "uip": candidate.uip,
    }
    if state is CandidateState.REJECTED:
        update["rejected_stage"] = candidate.rejected_stage
        update["rejected_reason"] = candidate.rejected_reason
        history[-1].update(stage=candidate.rejected_stage, reason=candidate.rejected_reason)
    return doc.model_copy(update=update)
