"""Evaluation helpers: site matching across the periodic boundary, species table, property metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pymatgen.core import Lattice
from typer.testing import CliRunner

from crystaloop.cli import app
from crystaloop.errors import UserError
from crystaloop.generative.evaluate import (
    evaluate_properties,
    matched_site_errors,
    nest_property_metrics,
    property_metrics,
    species_accuracy,
)
from crystaloop.generative.models import CGCNN, CGCNNEnsemble, CondDFCVAE, save_model
from crystaloop.generative.models.cgcnn import structure_to_graph


def test_site_matching_uses_minimum_image_and_optimal_pairs():
    lattice = Lattice.cubic(4.0)
    true = np.array([[0.0, 0.0, 0.0], [0.5, 0.5, 0.5]])
    pred = np.array([[0.49, 0.5, 0.5], [0.99, 0.0, 0.0]])  # swapped order, one across the face
    distances, z_errors = matched_site_errors(true, np.array([8, 22]), pred, np.array([23, 8]), lattice)
    assert np.allclose(sorted(distances), [0.04, 0.04])
    assert sorted(z_errors.tolist()) == [0, 1]
    distances, _ = matched_site_errors(true, np.array([8, 22]), pred[:1], np.array([22]), lattice)
    assert len(distances) == 1 and np.isclose(distances[0], 0.04)


def test_species_accuracy_table():
    table = species_accuracy(np.array([0, 0, 1, 2, 5]))
    assert table == {
        "species_exact": 0.4,
        "species_off_by_1": 0.2,
        "species_off_by_2": 0.2,
        "species_off_by_more": 0.2,
    }


def test_property_metrics_mae_smape_and_calibration():
    from pymatgen.core import Structure

    members = []
    for shift in (-0.1, 0.1):
        model = CGCNN(["formation_energy_per_atom"], hidden=4, fc_hidden=4)
        with torch.no_grad():
            model.heads.weight.zero_()
            model.heads.bias.fill_(shift)
        model.set_normalization([-1.0], [1.0])
        members.append(model)
    ensemble = CGCNNEnsemble(members)  # every prediction: mean -1.0, std 0.1
    s = Structure(Lattice.cubic(3.0), ["Fe"], [[0, 0, 0]])
    graph = structure_to_graph(s)
    items = [(graph, np.array([y], np.float32), np.ones(1, np.float32)) for y in (-1.05, -1.15, -1.5)]
    flat = property_metrics(ensemble, items)
    assert np.isclose(flat["mae_formation_energy_per_atom"], (0.05 + 0.15 + 0.5) / 3, atol=1e-5)
    assert np.isclose(flat["within_1sigma_formation_energy_per_atom"], 1 / 3)
    assert np.isclose(flat["within_2sigma_formation_energy_per_atom"], 2 / 3)
    expected_smape = 100 * np.mean(
        [2 * e / (1.0 + abs(y)) for e, y in ((0.05, 1.05), (0.15, 1.15), (0.5, 1.5))]
    )
    assert np.isclose(flat["smape_formation_energy_per_atom"], expected_smape, atol=1e-3)
    nested = nest_property_metrics(flat)
    assert set(nested) == {"n_structures", "mae", "smape", "within_1sigma", "within_2sigma"}


def test_recall_counts_species_head_and_mask():
    from crystaloop.generative.evaluate import recall_counts

    class _Fixed:
        def predict(self, density, spacing):
            species = torch.tensor([[8, 8, 22, 22, 38]])
            inside = torch.tensor([[True, False, True, True, True]])
            return species, inside

    true_z = torch.tensor([[8, 8, 38, 0, 38]])
    # site voxels 0, 1, 2, 4; species right at 0, 1, 4; of those, 0 and 4 are inside the mask
    assert recall_counts(_Fixed(), None, None, true_z) == (3, 2, 4)


@pytest.mark.parametrize(
    ("args", "plot", "problem"),
    [
        (["properties"], "missing/parity.png", "does not exist; create it first"),
        (["candidates", "c1"], "missing/parity.png", "does not exist; create it first"),
        (["properties"], "parity.txt", "cannot write '.txt' files"),
    ],
)
def test_a_plot_path_that_cannot_be_written_is_refused_before_any_work(
    tmp_path, monkeypatch, args, plot, problem
):
    import crystaloop.generative.evaluate as evaluate
    import crystaloop.loop.accuracy as accuracy

    def never(*_, **__):
        raise AssertionError("the evaluation ran before --plot was checked")

    monkeypatch.setattr(evaluate, "evaluate_properties", never)
    monkeypatch.setattr(accuracy, "campaign_accuracy", never)
    result = CliRunner().invoke(app, ["evaluate", *args, "--plot", str(tmp_path / plot)])
    assert isinstance(result.exception, UserError), result.output
    assert str(result.exception).startswith("--plot ") and problem in str(result.exception)


def test_properties_of_a_vae_checkpoint_is_a_user_error(tmp_path):
    path = save_model(CondDFCVAE(grid=16, latent_dim=8, widths=(4, 8)), tmp_path / "vae.pt")
    with pytest.raises(UserError, match="is not a CGCNN checkpoint; pass --model with a CGCNN version"):
        evaluate_properties(None, model=str(path))
