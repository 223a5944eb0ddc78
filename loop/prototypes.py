"""Known prototypes decorated with a campaign's elements: candidates of any crystal system.

The AFLOW prototype library that prior-v2 is built from (pymatgen ships it; 224 entries of at
most 20 sites over all seven crystal systems) is decorated with the palette's elements by
pymatgen's ionic substitution probabilities (Hautier et al. 2011), as the prior-v2 builder
decorates it (:func:`crystaloop.generative.data.decorate.substitutions`). A campaign with
``sampling.mode: prototypes`` draws its round's candidates here instead of from the VAE
(:func:`prototype_candidates`), and the filter cascade judges them as it judges decoded ones;
``bench campaign``'s ``substitution`` arm draws here with no model at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from pymatgen.core import Structure


def model_free_checks(config) -> list[Any]:
    """The model-free checks of a drawn crystal: validity (``filters.min_distance``) and size."""
    from crystaloop.loop.filters import SizeStage, ValidityStage

    f = config.filters
    stages: list[Any] = [ValidityStage(f.min_distance)]
    if f.max_nsites is not None:
        stages.append(SizeStage(f.max_nsites, f.size_symprec))
    return stages


def passes(stages: Sequence[Any], structure: Structure) -> Structure | None:
    """``structure`` after the checks (a size stage may reduce it to its primitive cell), or None."""
    from crystaloop.loop.filters import Candidate, FilterCascade

    survivors, _ = FilterCascade(list(stages)).run([Candidate(0, structure)])
    return survivors[0].structure if survivors else None


def palette_of(config) -> list[str]:
    """The campaign's palette (``elements.allow``), sorted; decorations draw their elements from it.

    Raises
    ------
    UserError
        The config leaves the palette open.
    """
    from crystaloop.errors import UserError

    if not config.elements.allow:
        raise UserError(
            "prototype decorations and the model-free benchmark arms draw from elements.allow, which "
            "this config leaves open; list the palette's elements (as configs/bench-campaign.yaml does)"
        )
    return sorted(config.elements.allow)


def substitution_pool(
    config, *, threshold: float | None = None, crystal_systems: Sequence[str] | None = None
) -> list:
    """Every decoration of the known prototypes (module docstring), most probable first.

    The prototypes are the AFLOW library entries (:func:`crystaloop.generative.data.decorate.load_prototypes`)
    with at most ``filters.max_nsites`` sites whose anonymous formula is one of the campaign's
    classes (AB, ABC3, AB2C); the decorations are
    :func:`~crystaloop.generative.data.decorate.substitutions` within the palette and the element
    rules, less each prototype's own compound (a known one, not a prediction). With
    ``crystal_systems``, only prototypes of those systems (spglib at the library's tolerance).
    """
    from crystaloop.generative.data import decorate
    from crystaloop.loop.filters import anonymous_formula, material_class_formulas

    palette = palette_of(config)
    formulas = {anonymous_formula(f) for f in material_class_formulas(config.material_classes)}
    max_sites = config.filters.max_nsites or decorate.DEFAULT_MAX_SITES
    pool = []
    for proto in decorate.load_prototypes(max_sites=max_sites):
        if formulas and proto.structure.composition.anonymized_formula not in formulas:
            continue
        if crystal_systems and decorate.crystal_system(proto.structure) not in crystal_systems:
            continue
        for decoration in decorate.substitutions(
            proto, palette, threshold=threshold or decorate.DEFAULT_THRESHOLD
        ):
            species = [new for _, new in decoration.substitution]
            if decoration.kind != "identity" and config.elements.permits(species):
                pool.append(decoration)
    return sorted(pool, key=lambda d: (-d.probability, d.structure_id))


def weighted_order(pool: Sequence, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``pool`` in a random order where each decoration comes early in proportion to
    its probability: weighted sampling without replacement, as the order of log(p) plus Gumbel
    noise (Efraimidis-Spirakis)."""
    keys = np.log([d.probability for d in pool]) + rng.gumbel(size=len(pool))
    return np.argsort(-keys, kind="stable")


def draw_substitution(
    config,
    *,
    n: int,
    rng: np.random.Generator,
    known,
    exclude: dict[str, list[Structure]] | None = None,
    pool: Sequence | None = None,
) -> list[tuple[Any, Structure]]:
    """Up to ``n`` decorations from :func:`substitution_pool`, drawn in proportion to their
    probability without replacement, that pass validity, size and novelty against the prior.

    ``known(reduced_formula)`` gives the prior structures: a decoration that ``StructureMatcher``
    finds equivalent to a prior compound is a known compound and is skipped. ``exclude`` maps a
    reduced formula to the crystals drawn before (earlier rounds); a decoration equivalent to one
    of them, or to an earlier draw of this call, is skipped, and the kept ones are added to it.
    The structure is the prototype with the new species, its volume scaled by their radii
    (``decorate.radius_scaled``).
    """
    from crystaloop.loop.filters import NoveltyStage

    exclude = exclude if exclude is not None else {}
    pool = list(pool if pool is not None else substitution_pool(config))
    if not pool:
        return []
    stages = [*model_free_checks(config), NoveltyStage(lambda formula: [*known(formula), *exclude.get(formula, [])])]
    out: list[tuple[Any, Structure]] = []
    for i in weighted_order(pool, rng):
        if len(out) >= n:
            break
        decoration = pool[int(i)]
        checked = passes(stages, decoration.structure())
        if checked is None:
            continue
        exclude.setdefault(checked.composition.reduced_formula, []).append(checked)
        out.append((decoration, checked))
    return out


def prototype_batch(config, *, database, n: int, seed: int, models: dict[str, str] | None = None):
    """A round's candidates from the decorated prototypes: ``sampling.mode: prototypes``.

    Up to ``n`` decorations of :func:`substitution_pool` (of ``filters.crystal_systems`` where
    the config names some), drawn in proportion to their probability without replacement with
    the round's ``seed``. Nothing is checked here: the filter cascade judges them as it judges
    decoded crystals, and its novelty stage leaves out those an earlier round already proposed.
    Each candidate's sampling row records its prototype, substitution and probability.

    Raises
    ------
    UserError
        The config leaves the palette open, or no prototype fits its classes, palette and systems.
    """
    import time

    from crystaloop.errors import UserError
    from crystaloop.generative.data import decorate
    from crystaloop.generative.models.shipped import resolve_models
    from crystaloop.loop.filters import Candidate
    from crystaloop.loop.generation import DecodedBatch, model_versions

    clock = time.perf_counter()
    systems = config.filters.crystal_systems
    pool = substitution_pool(config, crystal_systems=systems)
    if not pool:
        raise UserError(
            f"no known prototype of the classes {', '.join(config.material_classes)}"
            + (f" and crystal systems {', '.join(systems)}" if systems else "")
            + f" with at most {config.filters.max_nsites or decorate.DEFAULT_MAX_SITES} sites decorates with the "
            "palette; widen elements.allow, material_classes, filters.crystal_systems or filters.max_nsites"
        )
    candidates = []
    for index, i in enumerate(weighted_order(pool, np.random.default_rng(seed))[:n]):
        decoration = pool[int(i)]
        row = {
            "strategy": "prototypes",
            "prototype": decoration.prototype,
            "substitution": [list(pair) for pair in decoration.substitution],
            "probability": float(decoration.probability),
            "structure_id": decoration.structure_id,
        }
        candidates.append(Candidate(index=index, structure=decoration.structure(), sample=row))
    paths = {k: str(v) for k, v in (models or resolve_models(database, **config.models.model_dump())).items()}
    return DecodedBatch(
        candidates=candidates,
        strategy="prototypes",
        parameters={"pool": len(pool), "crystal_systems": list(systems or [])},
        seed=seed,
        n_requested=n,
        restrict_elements=True,
        allowed_elements=palette_of(config),
        decoder_method=None,
        model_paths=paths,
        model_versions=model_versions(database, paths),
        seconds={"sample": time.perf_counter() - clock},
    )
