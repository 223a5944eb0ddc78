"""Acquisition: which shortlisted candidates go to DFT.

An acquisition function scores candidates from their predictions; the batch is
then taken best-first under diversity caps (at most k per reduced formula and
per chemical system) up to the round's budget. Functions are looked up by name
in :data:`ACQUISITIONS`; :func:`register_acquisition` (or the entry-point group
``crystaloop.acquisition``) adds a user's own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points

import numpy as np

from crystaloop.db.documents import CandidateDoc
from crystaloop.errors import ConfigError
from crystaloop.loop.config import probability_in_window

ENTRY_POINT_GROUP = "crystaloop.acquisition"


@dataclass(frozen=True)
class AcquisitionContext:
    """What an acquisition function may use besides the candidates.

    Attributes
    ----------
    windows
        ``(property, min, max)`` per target window, bounds None when open (property units).
    kappa
        Weight of the uncertainty bonus.
    uip_sigma
        Assumed error of the universal potential's formation energy, eV/atom; None ignores it.
    rng
        Random numbers (random acquisition, ε-greedy).
    sigma_scale
        Factor per property on the ensemble's std (see :func:`fit_sigma_scale`); 1 when absent.
    """

    windows: tuple[tuple[str, float | None, float | None], ...]
    kappa: float = 1.0
    uip_sigma: float | None = None
    rng: np.random.Generator | None = None
    sigma_scale: dict[str, float] = field(default_factory=dict)


AcquisitionFunction = Callable[[Sequence[CandidateDoc], AcquisitionContext], np.ndarray]
ACQUISITIONS: dict[str, AcquisitionFunction] = {}


def register_acquisition(name: str) -> Callable[[AcquisitionFunction], AcquisitionFunction]:
    """Decorator: make ``fn(candidates, context) -> scores`` available as ``acquisition.strategy: name``."""

    def decorate(fn: AcquisitionFunction) -> AcquisitionFunction:
        ACQUISITIONS[name] = fn
        return fn

    return decorate


def get_acquisition(name: str) -> AcquisitionFunction:
    """The function registered as ``name`` (built in, registered, or from an entry point).

    Raises
    ------
    ConfigError
        No such acquisition function.
    """
    if name not in ACQUISITIONS:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name == name:
                ACQUISITIONS[name] = ep.load()
    if name not in ACQUISITIONS:
        raise ConfigError(
            f"unknown acquisition strategy {name!r}; use one of {', '.join(sorted(ACQUISITIONS))} "
            f"or register one (entry-point group {ENTRY_POINT_GROUP!r})"
        )
    return ACQUISITIONS[name]


def combined_estimate(candidate: CandidateDoc, prop: str, context: AcquisitionContext) -> tuple[float, float]:
    """Mean and std of ``prop``: the ensemble's, fused with the UIP value when configured.

    The two estimates are combined by inverse-variance weighting (the UIP screen
    only gives a formation energy).
    """
    predicted = candidate.predicted.get(prop)
    mean = predicted.mean if predicted and predicted.mean is not None else float("nan")
    std = predicted.std if predicted and predicted.std is not None else 0.0
    std *= context.sigma_scale.get(prop, 1.0)
    uip = candidate.uip.get(prop) if candidate.uip else None
    if context.uip_sigma and uip is not None and math.isfinite(uip):
        if not math.isfinite(mean):
            return float(uip), context.uip_sigma
        if std <= 0:
            return mean, std
        w_model, w_uip = 1.0 / std**2, 1.0 / context.uip_sigma**2
        fused = (w_model * mean + w_uip * uip) / (w_model + w_uip)
        return fused, math.sqrt(1.0 / (w_model + w_uip))
    return mean, std


#: Bounds of a fitted std factor: an ensemble is rarely over-dispersed by more than 3, and a
#: factor past 10 means the predictions carry no information worth a probability.
SIGMA_SCALE_BOUNDS = (1.0 / 3.0, 10.0)


def fit_sigma_scale(
    pairs: Sequence[tuple[float | None, float | None, float | None]], *, min_count: int = 4
) -> tuple[float | None, int]:
    """Factor on the ensemble's std that makes its errors on DFT results unit-normal.

    ``pairs`` are ``(predicted mean, predicted std, DFT value)`` of relaxed candidates, the
    prediction being the one that selected them (made before any retrain saw them). The
    scale is the robust spread of the z-scores, ``median(|z|) / 0.6745``, clipped to
    :data:`SIGMA_SCALE_BOUNDS`; an ensemble overconfident by 2.5× gets 2.5. Deep ensembles
    are overconfident away from their training data, which is where a campaign's candidates
    lie; this is a one-parameter variance recalibration, refitted on the campaign's own
    residuals every round.

    Returns
    -------
    (scale, n)
        The factor (None when fewer than ``min_count`` usable pairs) and the pairs used.
    """
    z = [
        abs(value - mean) / std
        for mean, std, value in pairs
        if mean is not None
        and std is not None
        and value is not None
        and math.isfinite(mean)
        and math.isfinite(value)
        and math.isfinite(std)
        and std > 0
    ]
    if len(z) < max(min_count, 1):
        return None, len(z)
    lo, hi = SIGMA_SCALE_BOUNDS
    return float(min(max(np.median(z) / 0.6745, lo), hi)), len(z)


def estimated(candidate: CandidateDoc, prop: str, context: AcquisitionContext) -> bool:
    """Whether anything estimates ``prop`` for the candidate (the ensemble or a fused UIP value).

    A window on a property the ensemble does not predict (a band gap with an ensemble trained
    without one) is left to DFT, as the window stage of the cascade leaves it.
    """
    uip = candidate.uip.get(prop) if candidate.uip else None
    return prop in candidate.predicted or bool(context.uip_sigma and uip is not None)


def window_probability(candidate: CandidateDoc, context: AcquisitionContext) -> float:
    """Probability that the candidate lies in every window it has an estimate for (properties
    taken as independent)."""
    p = 1.0
    for prop, lower, upper in context.windows:
        if not estimated(candidate, prop, context):
            continue
        mean, std = combined_estimate(candidate, prop, context)
        p *= probability_in_window(mean, std, lower, upper)
    return p


@register_acquisition("probability_in_window")
def acquire_probability(candidates: Sequence[CandidateDoc], context: AcquisitionContext) -> np.ndarray:
    """P(in every window): exploitation with the ensemble's uncertainty."""
    return np.array([window_probability(c, context) for c in candidates])


@register_acquisition("uncertainty")
def acquire_uncertainty(candidates: Sequence[CandidateDoc], context: AcquisitionContext) -> np.ndarray:
    """P(in window) plus ``kappa`` times the mean normalised ensemble std (an exploration bonus)."""
    scores = acquire_probability(candidates, context)
    bonus = np.zeros(len(candidates))
    for i, c in enumerate(candidates):
        windows = [w for w in context.windows if estimated(c, w[0], context)]
        stds = [combined_estimate(c, prop, context)[1] for prop, _, _ in windows]
        widths = [(hi - lo) if lo is not None and hi is not None else 1.0 for _, lo, hi in windows]
        bonus[i] = np.mean([s / w for s, w in zip(stds, widths, strict=True) if math.isfinite(s)] or [0.0])
    return scores + context.kappa * bonus


@register_acquisition("ucb")
def acquire_ucb(candidates: Sequence[CandidateDoc], context: AcquisitionContext) -> np.ndarray:
    """Minus the distance of (mean ± kappa·std) to the window, summed over windows: 0 is best."""
    scores = np.zeros(len(candidates))
    for i, c in enumerate(candidates):
        total = 0.0
        for prop, lower, upper in context.windows:
            mean, std = combined_estimate(c, prop, context)
            if not math.isfinite(mean):
                total -= 1e6
                continue
            reach = context.kappa * (std if math.isfinite(std) else 0.0)
            below = 0.0 if lower is None else max(lower - (mean + reach), 0.0)
            above = 0.0 if upper is None else max((mean - reach) - upper, 0.0)
            total -= below + above
        scores[i] = total
    return scores


@register_acquisition("greedy")
def acquire_greedy(candidates: Sequence[CandidateDoc], context: AcquisitionContext) -> np.ndarray:
    """Minus the distance of the mean to the window centre (no uncertainty); for a window open
    on one side, minus the distance to its bound outside it and 0 inside."""
    scores = np.zeros(len(candidates))
    for i, c in enumerate(candidates):
        for prop, lower, upper in context.windows:
            mean, _ = combined_estimate(c, prop, context)
            if not math.isfinite(mean):
                scores[i] -= 1e6
                continue
            if lower is not None and upper is not None:
                scores[i] -= abs(mean - 0.5 * (lower + upper))
            else:
                scores[i] -= max(lower - mean, 0.0) if lower is not None else max(mean - upper, 0.0)
    return scores


@register_acquisition("random")
def acquire_random(candidates: Sequence[CandidateDoc], context: AcquisitionContext) -> np.ndarray:
    """Uniform random scores: the baseline of the efficiency benchmark."""
    rng = context.rng or np.random.default_rng()
    return rng.random(len(candidates))


def select_batch(
    candidates: Sequence[CandidateDoc],
    scores: np.ndarray,
    *,
    budget: int,
    max_per_formula: int | None = None,
    max_per_chemsys: int | None = None,
    epsilon: float = 0.0,
    rng: np.random.Generator | None = None,
    preselected: Sequence[CandidateDoc] = (),
) -> list[tuple[CandidateDoc, float]]:
    """Best-first batch of at most ``budget`` under the diversity caps.

    With probability ``epsilon`` each pick is a uniformly random remaining
    candidate instead of the best one (ε-greedy exploration). Ties keep the
    candidates' order, so a fixed seed gives a fixed batch. ``preselected``
    (the round's picks so far, when a killed acquisition tops up) count
    against the caps.
    """
    rng = rng or np.random.default_rng(0)
    order = list(np.argsort(-np.asarray(scores, dtype=float), kind="stable"))
    per_formula: dict[str, int] = {}
    per_chemsys: dict[str, int] = {}

    def count(c: CandidateDoc) -> None:
        per_formula[c.reduced_formula] = per_formula.get(c.reduced_formula, 0) + 1
        per_chemsys[c.chemsys] = per_chemsys.get(c.chemsys, 0) + 1

    for c in preselected:
        count(c)
    chosen: list[tuple[CandidateDoc, float]] = []

    def allowed(c: CandidateDoc) -> bool:
        return (max_per_formula is None or per_formula.get(c.reduced_formula, 0) < max_per_formula) and (
            max_per_chemsys is None or per_chemsys.get(c.chemsys, 0) < max_per_chemsys
        )

    while order and len(chosen) < budget:
        eligible = [i for i in order if allowed(candidates[i])]
        if not eligible:
            break
        pick = (
            eligible[int(rng.integers(len(eligible)))] if epsilon and rng.random() < epsilon else eligible[0]
        )
        order.remove(pick)
        c = candidates[pick]
        count(c)
        chosen.append((c, float(scores[pick])))
    return chosen
