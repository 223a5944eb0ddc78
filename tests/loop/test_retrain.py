"""Retraining hooks learn only from DFT values on the scale of the models' labels."""

from __future__ import annotations

import pytest
from pymatgen.core import Lattice, Structure

from crystaloop.loop.config import parse_campaign_config
from crystaloop.loop.retrain import DFTResult, HookContext, cgcnn_finetune, conditioning_update

#: Four pw.x results of the demo campaign (demo preset, 45/360 Ry, local PBE family): B2 cells at
#: their relaxed lattice constants, the DFT formation energy and pw.x's total energy per atom.
DEMO_RESULTS = [
    (("Si", "Pd", 3.068), -0.2931, -2322.29),
    (("As", "Pd", 3.205), -0.1718, -3449.92),
    (("Pd", "F", 2.956), -0.2769, -2655.24),
    (("Ag", "O", 2.875), 0.2500, -2238.77),
]


def b2(a: str, b: str, lattice: float) -> Structure:
    return Structure(Lattice.cubic(lattice), [a, b], [[0, 0, 0], [0.5, 0.5, 0.5]])


def _results(engine: str) -> list[DFTResult]:
    return [
        DFTResult(
            candidate_id=f"c{i}",
            round=0,
            structure=b2(*cell),
            values={"formation_energy_per_atom": ef, "energy_per_atom": e, "band_gap": 0.0},
            engine=engine,
            screened=b2(cell[0], cell[1], cell[2] * 1.1),  # decoded cells are often 10 % long
        )
        for i, (cell, ef, e) in enumerate(DEMO_RESULTS)
    ]


def test_pwx_absolute_energies_never_become_labels():
    espresso, surrogate = _results("espresso")[0], _results("surrogate")[0]
    assert espresso.labels == {"formation_energy_per_atom": -0.2931, "band_gap": 0.0}
    assert surrogate.labels["energy_per_atom"] == -2322.29  # CHGNet's scale is the labels' scale


def test_finetune_on_pwx_results_lowers_their_error(database, tmp_path, loop_config):
    """With pw.x's -2322 eV/atom as an energy label the fine-tune doubled this error (0.43 -> 0.90)."""
    from crystaloop.generative.models.shipped import resolve_models

    config = parse_campaign_config(loop_config("retrain", retrain={"epochs": 5, "replay": 0}))
    models = {kind: str(path) for kind, path in resolve_models(database).items()}
    results = _results("espresso")
    context = HookContext("retrain", 0, config, database, models, results, results, tmp_path)
    outcome = cgcnn_finetune(context)
    assert outcome.status == "done"
    target = "formation_energy_per_atom"
    before, after = outcome.metrics["mae_before"][target], outcome.metrics["mae_after"][target]
    assert after < before
    assert outcome.metrics["mae_screened_after"][target] < outcome.metrics["mae_screened_before"][target]
    added = conditioning_update(context)
    assert added.metrics["added"] == len(results)
    stored = database["training_structures"].find_one({"dataset": "campaign:retrain"})
    assert "energy_per_atom" not in stored["labels"] and stored["labels"][target] == pytest.approx(-0.2931)
