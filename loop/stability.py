"""Energy above the hull in a campaign: which hull, built from whose energies, and the predictor
that gives the property models' E_hull.

Two hulls, never mixed:

- the **CHGNet hull** holds the prior set's CHGNet formation energies and the campaign's
  CHGNet-screened structures. The screen, the property model's predicted E_hull and the
  surrogate engine are judged against it (the surrogate's relaxed results join it);
- the **DFT hull** of an ``espresso`` campaign holds the campaign's own DFT results under its
  preset, and the prior set's competing phases of the system relaxed with the same settings
  (:mod:`crystaloop.loop.hull_phases`, by ``crystaloop campaign hull``). Its corners are the
  element references of the same preset (zero formation energy). A system with no relaxed
  phase is judged against the elements alone, and says so (``against_elements_only``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from pymatgen.core import Structure

from crystaloop.dft.corrections import NO_CORRECTION, AnionCorrection
from crystaloop.dft.engines import get_engine
from crystaloop.dft.hull import FormationHull, HullPhase, Stability

ENERGY_ABOVE_HULL = "energy_above_hull"
FORMATION_ENERGY = "formation_energy_per_atom"
RAW_FORMATION_ENERGY = "formation_energy_per_atom_raw"


@lru_cache(maxsize=1)
def prior_phases() -> tuple[str, tuple[HullPhase, ...]]:
    """The shipped prior set's labeller and its converged, accepted records as hull phases."""
    from crystaloop.generative.data.prior import read_prior

    prior = read_prior()
    phases, labeller = [], None
    for record in prior["records"]:
        value = (record.get("labels") or {}).get(FORMATION_ENERGY)
        if not record.get("converged") or record.get("reject_reason") or value is None:
            continue
        labeller = labeller or record.get("labeller")
        phases.append(HullPhase(record["formula"], float(value), record["structure_id"]))
    return labeller or "chgnet", tuple(phases)


def chgnet_hull(database, campaign: str, *, exclude: str | None = None) -> FormationHull:
    """The CHGNet hull: the prior set plus the campaign's screened (and surrogate-relaxed) structures.

    ``exclude`` leaves one candidate out, so that a candidate is never judged against itself.
    """
    labeller, phases = prior_phases()
    hull = FormationHull(labeller, phases)
    for doc in database["candidates"].find(
        {"campaign": campaign, "uip.formation_energy_per_atom": {"$ne": None}},
        {"_id": 0, "candidate_id": 1, "uip.formation_energy_per_atom": 1, "uip.structure": 1},
    ):
        if doc["candidate_id"] == exclude:
            continue
        structure = Structure.from_dict(doc["uip"]["structure"])
        hull.add(
            HullPhase(
                structure.composition.reduced_formula,
                float(doc["uip"]["formation_energy_per_atom"]),
                doc["candidate_id"],
            )
        )
    for phase in _relaxed_phases(database, campaign, "surrogate", exclude):
        hull.add(phase)
    return hull


def campaign_correction(config) -> AnionCorrection:
    """The anion correction of the campaign ``config`` (``dft.anion_correction``), or none.

    Only a DFT engine (pw.x) is corrected, and only with a fit shipped for the campaign's family
    and preset (:meth:`crystaloop.dft.engines.Engine.anion_correction`).
    """
    if not config.dft.anion_correction:
        return NO_CORRECTION
    return get_engine(config.dft.engine).anion_correction(config.dft.preset) or NO_CORRECTION


def corrected_values(config, formula: str, values: dict) -> tuple[dict, str]:
    """A DFT result's values with the campaign's anion correction (the corrected formation
    energy and the raw one, ``formation_energy_per_atom_raw``), and the correction's label."""
    raw = values.get(RAW_FORMATION_ENERGY, values.get(FORMATION_ENERGY))
    if raw is None:
        return values, "none"
    correction = campaign_correction(config)
    label = correction.label if correction.anions(formula) else "none"
    return {**values, RAW_FORMATION_ENERGY: raw, FORMATION_ENERGY: correction.correct(formula, raw)}, label


def dft_hull(database, config, *, exclude: str | None = None, elements: Iterable[str] = ()) -> FormationHull:
    """The hull a DFT result of the campaign ``config`` is verified against (see the module
    docstring); ``elements`` names the system whose relaxed competing phases
    (:mod:`crystaloop.loop.hull_phases`) join it. Every phase, the campaign's own results and
    the competing phases alike, gets the campaign's anion correction from its raw energy."""
    engine, preset = config.dft.engine, config.dft.preset
    if not get_engine(engine).dft:
        return chgnet_hull(database, config.name, exclude=exclude)
    from crystaloop.loop.hull_phases import add_hull_phases

    correction = campaign_correction(config)
    phases = _relaxed_phases(database, config.name, engine, exclude, correction)
    hull = FormationHull(f"{engine}/{preset}", phases)
    return add_hull_phases(hull, database, config, elements, correction) if elements else hull


def _relaxed_phases(
    database, campaign: str, engine: str, exclude: str | None, correction: AnionCorrection = NO_CORRECTION
) -> list[HullPhase]:
    phases = []
    for doc in database["candidates"].find(
        {
            "campaign": campaign,
            "state": "relaxed",
            "dft_engine": engine,
            f"dft.{FORMATION_ENERGY}": {"$ne": None},
        },
        {"_id": 0, "candidate_id": 1, "reduced_formula": 1, "dft": 1},
    ):
        if doc["candidate_id"] != exclude:
            raw = doc["dft"].get(RAW_FORMATION_ENERGY, doc["dft"][FORMATION_ENERGY])
            formula = doc["reduced_formula"]
            phases.append(HullPhase(formula, correction.correct(formula, float(raw)), doc["candidate_id"]))
    return phases


def stability_of(hull: FormationHull, formula: str, values: dict[str, float | None]) -> Stability | None:
    """The candidate's place against ``hull`` from its formation energy (None without one)."""
    value = values.get(FORMATION_ENERGY)
    if value is None or not np.isfinite(value):
        return None
    return hull.stability(formula, float(value))


@dataclass
class HullPredictor:
    """A property predictor that also gives E_hull: the predicted formation energy minus the
    hull's formation energy at the candidate's composition, with the formation energy's std.

    Parameters
    ----------
    predictor
        Means and stds of properties that include the formation energy (eV/atom).
    hull
        The CHGNet hull the prediction is placed against.
    """

    predictor: object
    hull: FormationHull

    def __post_init__(self) -> None:
        if FORMATION_ENERGY not in self.predictor.properties:
            raise ValueError("the property model predicts no formation energy, so no energy above the hull")
        self.properties = [*self.predictor.properties, ENERGY_ABOVE_HULL]
        self.version = self.predictor.version

    def predict(self, structures: Sequence[Structure]) -> tuple[np.ndarray, np.ndarray]:
        """Means and stds (n, n_properties + 1); the last column is E_hull (eV/atom)."""
        mean, std = self.predictor.predict(structures)
        column = self.predictor.properties.index(FORMATION_ENERGY)
        hull = np.array([self.hull.hull_energy_per_atom(s.composition) for s in structures], dtype=float)
        e_hull = mean[:, column] - hull if len(structures) else np.zeros(0)
        return (
            np.concatenate([mean, e_hull[:, None]], axis=1),
            np.concatenate([std, std[:, column : column + 1]], axis=1),
        )


@dataclass(frozen=True)
class SUNFlags:
    """Stable, unique and novel, for one relaxed candidate (in the order the campaign relaxed them).

    ``stable``: E_hull <= 0 by the oracle; ``metastable``: E_hull <= 0.1 eV/atom; ``unique``: no
    earlier relaxed candidate of the campaign matches it (StructureMatcher); ``novel``: no
    structure type of the prior set or of an earlier result matches it with species anonymised.
    """

    stable: bool
    metastable: bool
    unique: bool
    novel: bool

    @property
    def sun(self) -> bool:
        return self.stable and self.unique and self.novel


METASTABLE_EV_PER_ATOM = 0.1


def sun_flags(structures: Sequence[Structure], energies_above_hull: Sequence[float | None]) -> list[SUNFlags]:
    """S.U.N. flags of relaxed structures in campaign order, with their E_hull (eV/atom)."""
    from crystaloop.generative.measures import prior_prototypes, prototype_novel_flags, unique_flags

    known = {key: list(group) for key, group in prior_prototypes().items()}
    unique = unique_flags(structures)
    flags = []
    for structure, first, e_hull in zip(structures, unique, energies_above_hull, strict=True):
        [novel] = prototype_novel_flags([structure], known)
        key = structure.composition.reduced_composition.anonymized_formula
        known.setdefault(key, []).append(structure)
        flags.append(
            SUNFlags(
                stable=e_hull is not None and e_hull <= 0.0,
                metastable=e_hull is not None and e_hull <= METASTABLE_EV_PER_ATOM,
                unique=first,
                novel=novel,
            )
        )
    return flags
