"""Evaluation helpers: species table, reconstruction, sampling and property metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure
from typer.testing import CliRunner

from crystaloop.cli import app
from crystaloop.errors import UserError
from crystaloop.generative.decode import DecodedCandidate
from crystaloop.generative.evaluate import (
    ReconstructionRow,
    crystal_system_shares,
    distribution_distances,
    evaluate_properties,
    nest_property_metrics,
    property_metrics,
    reconstruction_metrics,
    sampling_metrics,
    species_accuracy,
    system_share_table,
)
from crystaloop.generative.measures import reconstruction_match
from crystaloop.generative.models import CGCNN, CGCNNEnsemble, CondDFCVAE, save_model
from crystaloop.generative.models.cgcnn import structure_to_graph


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


def _row(n_true, n_decoded, z_errors, *, angles=(0.0, 0.0, 0.0), emd=0.1, **judged):
    return ReconstructionRow(
        "s",
        0.01,
        np.array([0.1, 0.1, 0.1]),
        np.array(angles),
        emd if n_decoded else None,
        2 * emd if n_decoded else None,
        n_true,
        n_decoded,
        np.array(z_errors, dtype=int),
        1,
        1,
        1,
        **judged,
    )


def test_reconstruction_metrics_count_missing_and_extra_sites_against_species():
    rows = [
        _row(2, 2, [0, 0], angles=(0.0, 3.0, 0.0)),  # perfect sites, one angle 3 degrees off
        _row(4, 2, [0, 1]),  # two sites missing
        _row(2, 3, [0, 0]),  # one site extra
        _row(2, 0, []),  # nothing decoded: both true sites missing
    ]
    metrics = reconstruction_metrics(rows)
    assert metrics["species_exact"] == pytest.approx(5 / 6)  # over matched pairs only
    assert metrics["species_exact_of_all_sites"] == pytest.approx(5 / (2 + 4 + 3 + 2))
    assert metrics["angle_mae_degrees"] == pytest.approx(3.0 / 12)
    assert metrics["emd_mean_angstrom"] == pytest.approx(0.1)
    assert metrics["emd_decoded_lattice_mean_angstrom"] == pytest.approx(0.2)
    assert metrics["delta_nsites_mean"] == pytest.approx((0 + 2 + 1 + 2) / 4)
    assert metrics["no_sites_found"] == 1


def _wurtzite(a=3.25, c=5.21, u=0.382, species=("Zn", "O")):
    return Structure.from_spacegroup(
        "P6_3mc", Lattice.hexagonal(a, c), list(species), [[1 / 3, 2 / 3, 0], [1 / 3, 2 / 3, u]]
    )


def test_reconstruction_match_uses_the_fields_tolerances_on_a_general_cell():
    true = _wurtzite()
    # the same crystal in another setting, strained 5 % and with every site moved a little
    decoded = true.copy()
    decoded.apply_strain([0.05, 0.0, 0.0])
    decoded.perturb(0.05, min_distance=0.0)
    decoded = decoded.get_reduced_structure("niggli")
    assert reconstruction_match(true, decoded)
    assert not reconstruction_match(true, _wurtzite(species=("Zn", "S"))), "other species"
    rock_salt = Structure.from_spacegroup(
        "Fm-3m", Lattice.cubic(4.28), ["Zn", "O"], [[0, 0, 0], [0.5, 0.5, 0.5]]
    )
    assert not reconstruction_match(true, rock_salt), "another structure of the same formula"
    assert not reconstruction_match(true, None)


def test_reconstruction_metrics_report_match_validity_and_each_crystal_system():
    rows = [
        _row(2, 2, [0, 0], matched=True, valid_before_repair=True, crystal_system="hexagonal"),
        _row(
            2,
            2,
            [0, 0],
            angles=(0.0, 0.0, 6.0),
            matched=False,
            valid_before_repair=True,
            crystal_system="hexagonal",
        ),
        _row(2, 2, [0, 0], matched=True, valid_before_repair=True, crystal_system="cubic"),
        _row(2, 0, [], crystal_system="monoclinic"),
    ]
    metrics = reconstruction_metrics(rows)
    assert metrics["match_rate"] == pytest.approx(2 / 4)
    assert metrics["valid_before_repair_share"] == pytest.approx(3 / 4)
    hexagonal = metrics["by_crystal_system"]["hexagonal"]
    assert hexagonal["n"] == 2 and hexagonal["match_rate"] == pytest.approx(0.5)
    assert hexagonal["angle_mae_degrees"] == pytest.approx(6.0 / 6)
    assert metrics["by_crystal_system"]["monoclinic"]["match_rate"] == 0.0
    assert set(metrics["by_crystal_system"]) == {"cubic", "hexagonal", "monoclinic"}


def test_crystal_system_shares_of_samples_against_training():
    rock_salt = Structure.from_spacegroup(
        "Fm-3m", Lattice.cubic(4.2), ["Mg", "O"], [[0, 0, 0], [0.5, 0.5, 0.5]]
    )
    rutile = Structure.from_spacegroup(
        "P4_2/mnm", Lattice.tetragonal(4.59, 2.96), ["Ti", "O"], [[0, 0, 0], [0.305, 0.305, 0]]
    )
    samples = crystal_system_shares([_wurtzite(), _wurtzite(), rutile, rock_salt])
    assert samples == {"cubic": 0.25, "hexagonal": 0.5, "tetragonal": 0.25}
    table = system_share_table(samples, crystal_system_shares([rock_salt, rutile]))
    assert table["by_system"]["hexagonal"] == {"samples": 0.5, "training": 0.0}
    assert table["largest_gap_points"] == pytest.approx(50.0)


def _candidate(index, structure, *, raw, merged=0, reason=None):
    return DecodedCandidate(index, structure, reason, None, raw_min_distance=raw, merged_sites=merged)


def test_sampling_metrics_on_hand_built_samples():
    from crystaloop.generative.measures import prototype_templates
    from crystaloop.generative.train.data import LabelledStructure

    def rock_salt(a, cation="Na", anion="Cl"):
        return Structure.from_spacegroup("Fm-3m", Lattice.cubic(a), [cation, anion], [[0, 0, 0], [0.5] * 3])

    kbr2 = Structure(Lattice.cubic(5.0), ["K", "Br", "Br"], [[0, 0, 0], [0.5, 0.5, 0.5], [0, 0.5, 0.5]])
    references = [LabelledStructure("nacl", rock_salt(5.64), {})]
    candidates = [
        _candidate(0, rock_salt(5.64), raw=3.99),  # the reference itself: not novel
        _candidate(1, rock_salt(4.2, "Mg", "O"), raw=2.1),  # new formula, known prototype
        _candidate(2, rock_salt(4.21, "Mg", "O"), raw=0.4, merged=1),  # repaired; a duplicate of 1
        _candidate(3, kbr2, raw=2.5),  # valid, not charge-balanced
        _candidate(4, None, raw=1.2, reason="unphysical lattice"),
        _candidate(5, None, raw=None, reason="no sites"),
    ]
    m = sampling_metrics(candidates, 6.0, references=references, templates=prototype_templates())
    assert m["n_samples"] == 6 and m["decoded_share"] == pytest.approx(4 / 6)
    assert m["valid_share"] == pytest.approx(4 / 6)
    assert m["valid_before_repair_share"] == pytest.approx(4 / 6)  # 0, 1, 3 and the rejected cell
    assert m["samples_with_merged_sites_share"] == pytest.approx(1 / 6)
    assert m["merged_sites_mean"] == pytest.approx(1 / 5)
    assert m["charge_balanced_share_of_valid"] == pytest.approx(3 / 4)
    assert m["smact_valid_share_of_valid"] == pytest.approx(3 / 4)
    assert m["composition_novel_share_of_valid"] == pytest.approx(3 / 4)
    assert m["novel_share_of_valid"] == pytest.approx(3 / 4)
    assert m["prototype_novel_share_of_valid"] == pytest.approx(1 / 4)  # only KBr2's type is new
    assert m["unique_share_of_valid"] == pytest.approx(3 / 4)
    assert m["novel_unique_share_of_valid"] == pytest.approx(2 / 4)  # MgO (first) and KBr2
    assert m["valid_smact_novel_unique_share"] == pytest.approx(1 / 6)  # MgO only: KBr2 fails SMACT
    assert m["seconds_per_sample"] == pytest.approx(1.0)
    assert m["failures"] == {"unphysical lattice": 1, "no sites": 1}
    assert "crystal_systems" not in m and "wasserstein_density" not in m
    # against a training set and a held-out set: the four valid samples (three cubic, the KBr2 cell
    # tetragonal) are compared
    hexagonal = Structure.from_spacegroup(
        "P6_3mc", Lattice.hexagonal(3.25, 5.21), ["Zn", "O"], [[1 / 3, 2 / 3, 0], [1 / 3, 2 / 3, 0.382]]
    )
    kw = {"references": references, "templates": prototype_templates()}
    m = sampling_metrics(
        candidates, 6.0, **kw, training=[rock_salt(5.64), hexagonal], held_out=[rock_salt(5.64)]
    )
    assert m["crystal_systems"]["by_system"]["cubic"] == {"samples": 0.75, "training": 0.5}
    assert m["crystal_systems"]["by_system"]["hexagonal"] == {"samples": 0.0, "training": 0.5}
    assert m["crystal_systems"]["largest_gap_points"] == pytest.approx(50.0)
    assert m["wasserstein_n_elements"] == pytest.approx(0.0) and m["wasserstein_density"] > 0


def test_wasserstein_distances_of_density_and_element_count():
    zno = _wurtzite()
    denser = zno.copy()
    denser.scale_lattice(zno.volume / 2)  # twice the density
    same = distribution_distances([zno, zno], [zno])
    assert same == {"wasserstein_density": 0.0, "wasserstein_n_elements": 0.0}
    moved = distribution_distances([denser], [zno])
    assert moved["wasserstein_density"] == pytest.approx(float(zno.density))
    ternary = Structure(zno.lattice, ["Zn", "O", "Mg", "O"], zno.frac_coords)
    assert distribution_distances([ternary], [zno])["wasserstein_n_elements"] == 1.0
    assert distribution_distances([], [zno])["wasserstein_density"] is None
