"""Acquisition scores and the online recalibration of the ensemble's std."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from crystaloop.db.documents import PredictedValue
from crystaloop.loop.acquire import (
    SIGMA_SCALE_BOUNDS,
    AcquisitionContext,
    acquire_probability,
    fit_sigma_scale,
)
from crystaloop.loop.config import Acquisition, probability_in_window

PROP = "formation_energy_per_atom"
WINDOW = ((PROP, -1.6, -1.1),)


def _candidate(mean: float, std: float) -> SimpleNamespace:
    return SimpleNamespace(predicted={PROP: PredictedValue(mean=mean, std=std)}, uip={})


def test_fit_recovers_the_factor_of_an_overconfident_ensemble():
    rng = np.random.default_rng(0)
    std = rng.uniform(0.05, 0.3, 4000)
    mean = rng.normal(-1.0, 0.5, 4000)
    truth = mean + rng.normal(0.0, 1.0, 4000) * std * 2.5  # errors 2.5x the claimed std
    scale, n = fit_sigma_scale(list(zip(mean, std, truth, strict=True)))
    assert n == 4000
    assert scale == pytest.approx(2.5, rel=0.05)


def test_fit_needs_enough_usable_results_and_is_clipped():
    pairs = [
        (-1.0, 0.1, -1.2),
        (-1.0, None, -1.1),
        (None, 0.1, -1.0),
        (-1.0, 0.0, -1.1),
        (-1.0, 0.1, math.nan),
    ]
    assert fit_sigma_scale(pairs, min_count=2) == (None, 1)  # only the first pair is usable
    assert fit_sigma_scale(pairs, min_count=1) == (pytest.approx(2.0 / 0.6745), 1)
    lo, hi = SIGMA_SCALE_BOUNDS
    assert fit_sigma_scale([(0.0, 1e-3, 5.0)] * 4)[0] == hi
    assert fit_sigma_scale([(0.0, 1.0, 1e-4)] * 4)[0] == lo


def test_scaled_std_weighs_the_ensembles_confidence_against_centring():
    confident, centred = _candidate(-1.14, 0.02), _candidate(-1.35, 0.1)
    plain = acquire_probability([confident, centred], AcquisitionContext(windows=WINDOW))
    scaled = acquire_probability(
        [confident, centred], AcquisitionContext(windows=WINDOW, sigma_scale={PROP: 3.0})
    )
    assert plain[1] > plain[0]  # taken at its word, the centred prediction is the safer bet
    assert scaled[0] > scaled[1]  # with both stds tripled, the one 5x narrower wins despite the edge
    assert scaled[1] == pytest.approx(probability_in_window(-1.35, 0.3, -1.6, -1.1))


def test_calibration_is_off_by_default_and_needs_four_results():
    acq = Acquisition()
    assert acq.calibrate is False and acq.calibrate_min == 4  # it lost its benchmark ablation


def test_batch_caps_count_the_picks_a_killed_acquisition_already_made():
    from crystaloop.loop.acquire import select_batch

    pool = [
        SimpleNamespace(candidate_id=i, reduced_formula=f, chemsys=s)
        for i, (f, s) in enumerate([("NaCl", "Cl-Na"), ("NaCl", "Cl-Na"), ("KBr", "Br-K"), ("NaCl2", "Cl-Na")])
    ]
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    caps = {"max_per_formula": 1, "max_per_chemsys": 2}
    fresh = select_batch(pool, scores, budget=2, **caps)
    assert [c.candidate_id for c, _ in fresh] == [0, 2]
    # The rerun tops up with the first pick already made: the second NaCl stays out.
    topped = select_batch(pool[1:], scores[1:], budget=1, preselected=[pool[0]], **caps)
    assert [c.candidate_id for c, _ in topped] == [2]
    chemsys_full = select_batch(pool[3:], scores[3:], budget=1, preselected=pool[:2], **caps)
    assert chemsys_full == []


def test_a_window_the_ensemble_does_not_predict_is_left_to_dft():
    from crystaloop.loop.acquire import acquire_uncertainty

    windows = (*WINDOW, ("band_gap", 1.0, 3.0))  # an ensemble without a band-gap head
    inside, outside = _candidate(-1.35, 0.05), _candidate(-0.2, 0.05)
    context = AcquisitionContext(windows=windows, kappa=0.2)
    p = acquire_probability([inside, outside], context)
    assert p[0] == pytest.approx(probability_in_window(-1.35, 0.05, -1.6, -1.1)) and p[1] < 1e-6
    bonus = acquire_uncertainty([inside], context)[0] - p[0]
    assert bonus == pytest.approx(0.2 * 0.05 / 0.5)  # the missing band gap adds nothing to the mean std


def test_greedy_on_a_one_sided_window_prefers_any_candidate_inside_it():
    from crystaloop.loop.acquire import acquire_greedy

    window = ((PROP, None, -3.3),)
    deep, edge, outside = _candidate(-5.0, 0.1), _candidate(-3.4, 0.1), _candidate(-3.0, 0.1)
    scores = acquire_greedy([deep, edge, outside], AcquisitionContext(windows=window))
    assert scores[0] == scores[1] == 0.0 and scores[2] == pytest.approx(-0.3)
