"""Campaign configuration: pydantic models loaded from YAML.

Every model forbids unknown keys. :func:`load_campaign_config` turns every
validation problem into one line naming the field and what is allowed.
"""

from __future__ import annotations

import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pymatgen.core import Composition, Element, Structure

from crystaloop.dft.engines import get_engine
from crystaloop.errors import ConfigError, read_yaml
from crystaloop.properties import PROPERTIES, PROPERTY_NAMES

MaterialClass = Literal["binary", "perovskite", "heusler"]
CrystalSystem = Literal["triclinic", "monoclinic", "orthorhombic", "tetragonal", "trigonal", "hexagonal", "cubic"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _check_element(symbol: str) -> str:
    if not isinstance(symbol, str) or not Element.is_valid_symbol(symbol):
        raise ValueError(f"unknown element {symbol!r}; use a chemical symbol such as 'Sr', 'Ti', 'O'")
    return symbol


class TargetWindow(_Strict):
    """A target window on one property; either bound may be open (null).

    Units are fixed per property (see :mod:`crystaloop.properties`).
    """

    property: str = Field(description=f"One of: {', '.join(PROPERTY_NAMES)}.")
    min: float | None = Field(None, description="Lower bound, in the property's unit.")
    max: float | None = Field(None, description="Upper bound, in the property's unit.")

    @field_validator("property")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in PROPERTIES:
            raise ValueError(f"unknown property {value!r}; allowed: {', '.join(PROPERTY_NAMES)}")
        return value

    @model_validator(mode="after")
    def _bounds(self) -> TargetWindow:
        spec = PROPERTIES[self.property]
        unit = f" {spec.unit}" if spec.unit else ""
        if self.min is None and self.max is None:
            raise ValueError(f"empty window for {self.property}: give min, max or both")
        for bound in (self.min, self.max):
            if bound is not None and not spec.contains(bound):
                raise ValueError(
                    f"{self.property} bound {bound} is outside the physical range "
                    f"[{spec.lower}, {spec.upper}]{unit}"
                )
        if self.min is not None and self.max is not None and self.min >= self.max:
            raise ValueError(f"min ({self.min}) must be below max ({self.max}) for {self.property}{unit}")
        return self

    def contains(self, value: float | None) -> bool:
        """True if ``value`` lies inside the window (None never does)."""
        if value is None:
            return False
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)

    def probability(self, mean: float | None, std: float | None) -> float:
        """P(min <= X <= max) for X ~ N(mean, std²) (see :func:`probability_in_window`)."""
        return probability_in_window(mean, std, self.min, self.max)


def probability_in_window(
    mean: float | None, std: float | None, lower: float | None, upper: float | None
) -> float:
    """P(lower <= X <= upper) for X ~ N(mean, std²): an open bound is infinite, a zero or
    non-finite std gives 0 or 1, and a missing or non-finite mean gives 0."""
    if mean is None or not math.isfinite(mean):
        return 0.0
    if std is None or not math.isfinite(std) or std <= 0:
        return float((lower is None or mean >= lower) and (upper is None or mean <= upper))

    def cdf(x: float) -> float:
        return 0.5 * (1.0 + math.erf((x - mean) / (std * math.sqrt(2.0))))

    hi = 1.0 if upper is None else cdf(upper)
    lo = 0.0 if lower is None else cdf(lower)
    return max(hi - lo, 0.0)


class ElementRules(_Strict):
    """Which elements candidates may contain."""

    allow: list[str] | None = Field(None, description="Only these elements (null: any).")
    deny: list[str] = Field(default_factory=list, description="Never these elements.")

    @field_validator("allow", "deny")
    @classmethod
    def _elements(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else [_check_element(s) for s in value]

    @model_validator(mode="after")
    def _disjoint(self) -> ElementRules:
        both = sorted(set(self.allow or ()) & set(self.deny))
        if both:
            raise ValueError(f"elements both allowed and denied: {', '.join(both)}; keep each in one list")
        return self

    def permits(self, symbols: typing.Iterable[str]) -> bool:
        """True if every symbol is allowed and none is denied."""
        symbols = set(symbols)
        if symbols & set(self.deny):
            return False
        return self.allow is None or symbols <= set(self.allow)


class Budget(_Strict):
    """Per-round budgets."""

    candidates_per_round: int = Field(1000, ge=1, description="Candidates generated per round.")
    dft_per_round: int = Field(8, ge=1, description="DFT relaxations per round.")


class StopRules(_Strict):
    """When a campaign stops before ``max_rounds``."""

    min_hits: int | None = Field(None, ge=1, description="Stop after this many DFT-verified hits.")
    hit_rate: float | None = Field(
        None, gt=0, le=1, description="Stop when a round's DFT hit rate reaches this fraction."
    )
    patience: int | None = Field(None, ge=1, description="Stop after this many rounds without a new hit.")
    max_dft: int | None = Field(None, ge=1, description="Stop once this many DFT relaxations were submitted.")


class Sampling(_Strict):
    """How latent vectors are drawn."""

    mode: Literal["random", "around_base", "interpolate", "optimize", "prototypes"] = Field(
        "random",
        description=(
            "How candidates are proposed: from the VAE's latent space (random, around_base, interpolate, "
            "optimize), or prototypes: known AFLOW prototypes of any crystal system decorated with the "
            "palette (elements.allow) by ionic substitution probability."
        ),
    )
    base_formulas: list[str] = Field(
        default_factory=list,
        description="Compounds to sample around: formulas in the training data or CIF paths.",
    )
    std: float = Field(
        0.5, gt=0, description="Standard deviation of the latent perturbation (not a variance)."
    )
    interpolation_steps: int = Field(10, ge=2, description="Points between two base compounds.")
    condition_on: Literal["base", "target"] = Field(
        "base", description="around_base: condition on the base compound's decile or the target's."
    )
    optimize_steps: int = Field(100, ge=1, description="optimize: gradient steps in latent space.")
    restrict_elements: bool = Field(
        True, description="Restrict the decoder's species choice to the campaign's allowed elements."
    )
    around_hits: float = Field(
        0.0,
        ge=0,
        lt=1,
        description=(
            "Campaigns: once there are DFT-verified hits, the share of each round's samples drawn around "
            "them in latent space (std hits_std, conditioned on the target window); 0: off."
        ),
    )
    hits_std: float = Field(
        0.7, gt=0, description="Standard deviation of the latent perturbation around hits."
    )
    store_latent: bool = Field(False, description="Keep each candidate's latent vector in its provenance.")
    symprec: float | None = Field(
        None,
        gt=0,
        le=1,
        description=(
            "Symmetrise each decoded crystal onto the space group spglib finds at this tolerance (angstrom, "
            "e.g. 0.3) before it is filtered; null: as decoded. See `crystaloop evaluate sampling --symprec`."
        ),
    )
    seed: int = Field(0, ge=0)

    @field_validator("base_formulas")
    @classmethod
    def _formulas(cls, value: list[str]) -> list[str]:
        for formula in value:
            if formula.lower().endswith(".cif"):
                continue  # read when sampling (resolve_base), with its own error
            try:
                comp = Composition(formula)
            except Exception:
                raise ValueError(
                    f"base formula {formula!r} is not a chemical formula, e.g. 'SrTiO3'"
                ) from None
            if comp.num_atoms == 0:
                raise ValueError(f"base formula {formula!r} has no atoms")
        return value

    @model_validator(mode="after")
    def _needs_bases(self) -> Sampling:
        need = {"around_base": 1, "interpolate": 2}.get(self.mode, 0)
        if len(self.base_formulas) < need:
            raise ValueError(f"mode {self.mode!r} needs at least {need} base_formulas")
        return self


class Filters(_Strict):
    """Thresholds of the filter cascade."""

    min_distance: float = Field(0.5, gt=0, description="Minimum interatomic distance (Å).")
    min_hull_phases: int = Field(
        0,
        ge=0,
        description="Reject candidates whose chemical system holds fewer phases than this on the CHGNet "
        "hull, the elements not counted (0: no check; an E_hull against the elements alone equals E_f).",
    )
    same_stoichiometry_as_base: bool = Field(
        True, description="With around_base sampling, keep only the base compounds' stoichiometries."
    )
    novelty: bool = Field(True, description="Drop structures present in the training set.")
    novelty_scope: Literal["all", "own"] = Field(
        "all",
        description="What counts as known: all training data (all), or the training data less other "
        "campaigns' DFT results (own), so that campaigns run side by side stay independent.",
    )
    window_tolerance: float = Field(
        0.2, ge=0, description="Keep predictions within this relative margin of a window bound."
    )
    uip_screen: bool = Field(True, description="Relax with CHGNet and re-check the window before DFT.")
    max_uip_volume_change: float = Field(
        0.3, gt=0, description="Reject if CHGNet relaxation changes the volume by more than this fraction."
    )
    max_nsites: int | None = Field(
        None,
        ge=1,
        description="Reject cells with more sites than this (null: no limit); DFT cost grows steeply with it.",
    )
    size_symprec: float | None = Field(
        None,
        gt=0,
        description=(
            "Tolerance (Å) at which max_nsites counts the primitive cell of a larger decoded cell "
            "(null: the cell as decoded); use with dft.symmetrize_start so that DFT runs that cell."
        ),
    )
    allowed_formulas: list[str] = Field(
        default_factory=list, description="Anonymous formulas (e.g. 'ABC3') the stoichiometry stage keeps."
    )
    crystal_systems: list[CrystalSystem] | None = Field(
        None,
        description="Keep only candidates of these crystal systems (spglib at size_symprec, or 0.1 Å); null: any.",
    )

    @field_validator("allowed_formulas")
    @classmethod
    def _formulas(cls, formulas: list[str]) -> list[str]:
        from pymatgen.core import Composition

        for formula in formulas:
            try:
                Composition(formula)
            except Exception:
                raise ValueError(
                    f"{formula!r} is not a formula; use anonymous formulas like 'ABC3'"
                ) from None
        return formulas

    min_probability: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Window rule: keep if P(in window) under N(mean, std) reaches this (null: mean rule).",
    )
    window_relative_to_base: float | None = Field(
        None,
        gt=0,
        description="Formation-energy window per candidate: base E_f widened by this fraction (paper: 0.2).",
    )
    uip_max_relaxations: int | None = Field(
        None,
        ge=1,
        description="CHGNet relaxations per generation at most, best-scored first (null: every survivor).",
    )
    uip_fmax: float = Field(0.1, gt=0, description="CHGNet relaxation force convergence (eV/Å).")
    uip_steps: int = Field(100, ge=1, description="CHGNet relaxation step limit.")
    store_rejects: bool = Field(
        False, description="Store rejected candidates compactly (state rejected); default: count only."
    )


class Acquisition(_Strict):
    """How shortlisted candidates are chosen for DFT.

    ``strategy`` names a registered acquisition function (see :mod:`crystaloop.loop.acquire`):
    ``probability_in_window`` (default), ``uncertainty``, ``ucb``, ``greedy``, ``random``, or a
    user's own.
    """

    strategy: str = Field("probability_in_window", description="A registered acquisition function.")
    kappa: float = Field(1.0, ge=0, description="Weight of the uncertainty bonus (uncertainty, ucb).")
    epsilon: float = Field(0.0, ge=0, le=1, description="Chance of a uniformly random pick (ε-greedy).")
    max_per_formula: int | None = Field(
        1, ge=1, description="At most this many per reduced formula per batch."
    )
    max_per_chemsys: int | None = Field(
        2, ge=1, description="At most this many per chemical system per batch."
    )
    uip_sigma: float | None = Field(
        0.1,
        gt=0,
        description="Error (eV/atom) given to the UIP formation energy when fused; null: ignore it.",
    )
    calibrate: bool = Field(
        False,
        description="Rescale the ensemble's std per target so that the campaign's own DFT results "
        "have unit-normal errors (refitted every round; docs/campaigns.md has its ablation).",
    )
    calibrate_min: int = Field(
        4, ge=1, description="DFT results needed before the std is rescaled; until then it is used as is."
    )

    @field_validator("strategy")
    @classmethod
    def _registered(cls, value: str) -> str:
        from crystaloop.loop.acquire import get_acquisition

        try:
            get_acquisition(value)
        except ConfigError as exc:
            raise ValueError(exc.message) from None
        return value


class DFTSettings(_Strict):
    """The relaxation engine."""

    engine: Literal["espresso", "surrogate"] = "espresso"
    preset: str = Field(
        "fast",
        description="Preset name in dft/espresso/presets (fast, demo, standard) or a preset YAML path.",
    )
    pseudo_family: str = Field("local-pbe", description="Family name, or a path to a family YAML.")
    overrides: dict[str, Any] = Field(default_factory=dict, description="Merged into a preset copy.")
    allow_unverified: bool = Field(
        False, description="Let elements whose pseudopotential the family has not verified judge hits."
    )
    symmetrize_start: float | None = Field(
        None,
        gt=0,
        description=(
            "Symmetry tolerance (Å, spglib symprec) to which the DFT starting structure is refined and "
            "reduced to its primitive standard cell; null: start from it as it is."
        ),
    )
    pw_command: str | None = Field(
        None,
        description="Command that runs pw.x for this campaign, e.g. 'mpirun -np 2 pw.x' (null: the settings').",
    )
    reference_structures: dict[str, str] = Field(
        default_factory=dict,
        description="Element -> structure file (CIF, POSCAR...) of its ground state, replacing the "
        "built-in reference; a relative path is read from the current folder and stored absolute.",
    )
    magnetic_orderings: list[Literal["fm", "afm"]] = Field(
        default_factory=lambda: ["fm"],
        description="[fm, afm] also relaxes the simplest antiferromagnetic ordering of a magnetic "
        "compound (and element reference) and keeps the lower energy per atom (pw.x engine).",
    )
    anion_correction: bool = Field(
        False,
        description="Apply the anion correction fitted for this family and preset (pw.x engine; "
        "dft/data/anion_corrections.yaml) to every formation energy and hull phase; the raw "
        "energies are kept beside the corrected ones.",
    )

    @model_validator(mode="after")
    def _orderings_reach_the_preset(self) -> DFTSettings:
        # The preset carries the orderings, so that the relaxation's cache key includes them.
        overrides = get_engine(self.engine).with_orderings(self.overrides, self.magnetic_orderings)
        if overrides != self.overrides:
            self.overrides = overrides  # validated again, once
        return self

    @field_validator("reference_structures")
    @classmethod
    def _readable_references(cls, given: dict[str, str]) -> dict[str, str]:
        checked = {}
        for element, path in given.items():
            if not isinstance(element, str) or not Element.is_valid_symbol(element):
                raise ValueError(f"{element!r} is not an element symbol")
            file = Path(path).expanduser().resolve()
            if not file.is_file():
                raise ValueError(f"{element}: no file {path}")
            try:
                structure = Structure.from_file(file)
            except Exception as error:  # noqa: BLE001 -- pymatgen raises many types on a bad file
                raise ValueError(
                    f"{element}: {path} is not a structure pymatgen can read ({error})"
                ) from None
            found = sorted(el.symbol for el in structure.composition.elements)
            if found != [element]:
                raise ValueError(f"{element}: {path} holds {', '.join(found)}, not {element} alone")
            checked[element] = str(file)
        return checked

    def reference_structure_objects(self) -> dict[str, Structure]:
        """The given reference structures, read from their files."""
        return {element: Structure.from_file(path) for element, path in self.reference_structures.items()}


class Resources(_Strict):
    """What one DFT job asks its queue for; unset fields are left to the worker's defaults."""

    nodes: int | None = Field(None, ge=1, description="Nodes.")
    cores: int | None = Field(None, ge=1, description="MPI processes in all (SLURM ntasks).")
    walltime: str | None = Field(None, description="Wall time, [D-]HH:MM:SS.")
    partition: str | None = Field(None, description="SLURM partition or PBS queue.")
    account: str | None = Field(None, description="Account charged.")
    qos: str | None = Field(None, description="Quality of service.")

    @field_validator("walltime")
    @classmethod
    def _walltime(cls, value: str | None) -> str | None:
        if value is not None:
            from crystaloop.dft.backends import walltime_seconds
            from crystaloop.errors import UserError

            try:
                walltime_seconds(value)
            except UserError as exc:
                raise ValueError(exc.message) from None
        return value


class SiteRule(Resources):
    """Resources for cells of up to ``max_sites`` sites."""

    max_sites: int = Field(ge=1, description="The rule applies to cells with at most this many sites.")


class ResourceRules(Resources):
    """Default resources, and rules by the cell's number of sites (the first that fits wins)."""

    by_sites: list[SiteRule] = Field(default_factory=list, description="Rules, checked by max_sites.")

    def for_sites(self, n_sites: int) -> dict[str, object]:
        """The resources of a cell of ``n_sites`` sites: the defaults, overlaid by its rule."""
        base = self.model_dump(exclude={"by_sites"}, exclude_none=True)
        for rule in sorted(self.by_sites, key=lambda r: r.max_sites):
            if n_sites <= rule.max_sites:
                base.update(rule.model_dump(exclude={"max_sites"}, exclude_none=True))
                break
        return base


class Execution(_Strict):
    """Where DFT jobs run, and how the loop waits for them."""

    backend: Literal["local", "fireworks", "jobflow-remote"] = "local"
    worker: str | None = Field(
        None, description="FireWorks fworker name (the Fireworks' _fworker) or jobflow-remote worker name."
    )
    category: str | None = Field(None, description="FireWorks category (_category) of the DFT Fireworks.")
    project: str | None = Field(None, description="jobflow-remote project name.")
    exec_config: str | None = Field(
        None, description="A named jobflow-remote execution config (pre_run, modules)."
    )
    parallel_jobs: int = Field(1, ge=1, description="Local backend: relaxations run at once.")
    cores: int | None = Field(
        None,
        ge=1,
        description="Local backend: cores shared by the parallel jobs (default: all); {np} in pw_command.",
    )
    max_attempts: int = Field(3, ge=1, description="Runs of a failed or lost job before its candidate fails.")
    lost_after_s: float = Field(
        14400.0, gt=0, description="FireWorks: a RUNNING job without a ping for this long is lost (s)."
    )
    resources: ResourceRules | None = Field(
        None, description="Queue resources per job (FireWorks _queueadapter, jobflow-remote resources)."
    )
    harvest_timeout_s: float = Field(
        86400.0, gt=0, description="Give up waiting for a round's DFT results after this long (s)."
    )
    poll_interval_s: float = Field(10.0, gt=0, description="Seconds between polls of the DB for results.")
    db_retry_s: float = Field(120.0, ge=0, description="Ride out a lost database connection this long (s).")


class Retraining(_Strict):
    """When and what to retrain from DFT results (hooks in :mod:`crystaloop.loop.retrain`)."""

    every: int = Field(1, ge=1, description="Retrain after every this many rounds.")
    cgcnn: bool = Field(True, description="Run the cgcnn_finetune hook.")
    generator_conditioning: bool = Field(True, description="Run the conditioning_update hook.")
    hooks: list[str] = Field(default_factory=list, description="Further registered hooks, by name.")
    epochs: int = Field(20, ge=1, description="Fine-tuning epochs of the CGCNN ensemble.")
    dft_weight: float = Field(5.0, gt=0, description="Weight of a DFT label against a prior label.")
    replay: int = Field(512, ge=0, description="Prior structures mixed into each fine-tune.")
    learning_rate: float = Field(3e-4, gt=0)
    min_new_results: int = Field(1, ge=1, description="Skip retraining with fewer new DFT results.")

    @field_validator("hooks")
    @classmethod
    def _registered_hooks(cls, names: list[str]) -> list[str]:
        from crystaloop.loop.retrain import HOOKS

        unknown = [n for n in names if n not in HOOKS]
        if unknown:
            raise ValueError(
                f"unknown retraining hook(s) {', '.join(map(repr, unknown))}; registered: {', '.join(sorted(HOOKS))}"
            )
        return names


class Models(_Strict):
    """Which trained models a campaign uses: a registry version or a checkpoint path per kind.

    ``None`` is the registry default of that kind; with nothing registered, the checkpoints shipped
    with crystaloop are registered and used.
    """

    vae: str | None = Field(None, description="VAE version or checkpoint path; None: default.")
    unet: str | None = Field(None, description="UNet version or checkpoint path; None: default.")
    cgcnn: str | None = Field(None, description="CGCNN (ensemble) version or path; None: default.")


class CampaignConfig(_Strict):
    """A whole campaign."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Letters, digits, _ . -")
    description: str = ""
    targets: list[TargetWindow] = Field(min_length=1)
    material_classes: list[MaterialClass] = Field(
        default_factory=lambda: ["binary", "perovskite", "heusler"], min_length=1
    )
    elements: ElementRules = Field(default_factory=ElementRules)
    budget: Budget = Field(default_factory=Budget)
    max_rounds: int = Field(3, ge=1)
    stop: StopRules = Field(default_factory=StopRules)
    sampling: Sampling = Field(default_factory=Sampling)
    filters: Filters = Field(default_factory=Filters)
    acquisition: Acquisition = Field(default_factory=Acquisition)
    dft: DFTSettings = Field(default_factory=DFTSettings)
    execution: Execution = Field(default_factory=Execution)
    retrain: Retraining = Field(default_factory=Retraining)
    models: Models = Field(default_factory=Models)
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _unique_targets(self) -> CampaignConfig:
        names = [t.property for t in self.targets]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"one window per property; repeated: {', '.join(repeated)}")
        return self

    @model_validator(mode="after")
    def _verifiable_targets(self) -> CampaignConfig:
        computed = get_engine(self.dft.engine).properties
        unverifiable = [t.property for t in self.targets if t.property not in computed]
        if unverifiable:
            raise ValueError(
                f"the {self.dft.engine} engine does not compute {', '.join(unverifiable)}, so no candidate "
                f"could ever be verified as a hit; target {', '.join(computed)}"
            )
        return self

    def in_all_windows(self, values: dict[str, float | None]) -> bool:
        """True if ``values`` (property -> value) lie in every target window."""
        return all(t.contains(values.get(t.property)) for t in self.targets)


# -- loading and error reporting -------------------------------------------------------------


def _unwrap(annotation: Any) -> Any:
    """The model class inside Optional[...] / list[...] / dict[..., ...], if any."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, list, dict, tuple):
        for arg in typing.get_args(annotation):
            inner = _unwrap(arg)
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                return inner
    return annotation


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    model: Any = CampaignConfig
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return []
        model = _unwrap(model.model_fields[part].annotation)
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def format_validation_error(error: ValidationError) -> list[str]:
    """One line per problem: ``field: what is wrong; what is allowed``."""
    lines = []
    for err in error.errors():
        loc = tuple(err["loc"])
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc[:-1])
            lines.append(f"{_path(loc)}: unknown key; allowed keys: {', '.join(allowed)}")
        elif err["type"] == "string_pattern_mismatch":
            lines.append(f"{_path(loc)}: use only letters, digits, '_', '.' and '-' (no spaces)")
        elif err["type"] == "missing":
            lines.append(f"{_path(loc)}: required field is missing")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{_path(loc)}: {msg}")
    return lines


def parse_campaign_config(data: Any, *, source: str = "<config>") -> CampaignConfig:
    """Validate a mapping as a :class:`CampaignConfig`.

    Raises
    ------
    ConfigError
        With one line per problem in ``.lines``.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a campaign file must be a YAML mapping (key: value)")
    try:
        return CampaignConfig.model_validate(data)
    except ValidationError as exc:
        lines = format_validation_error(exc)
        raise ConfigError(f"{source}: {len(lines)} problem(s) in the campaign config", lines) from None


def load_campaign_config(path: str | Path) -> CampaignConfig:
    """Read and validate a campaign YAML file.

    Raises
    ------
    ConfigError
        Missing file, YAML syntax error (with its line), or validation problems.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"campaign file {path} does not exist; pass a YAML file such as configs/demo.yaml")
    data = read_yaml(path, what="campaign file")
    return parse_campaign_config(data, source=str(path))
