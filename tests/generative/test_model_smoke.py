"""One-batch CPU smoke tests: forward, backward, finite loss, save and load, for every option."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure

from crystaloop.generative.models import (
    CGCNN,
    CGCNNEnsemble,
    CondDFCVAE,
    DecileCondition,
    UNet3D,
    VAELossWeights,
    class_weights,
    collate_graphs,
    load_model,
    masked_mse,
    save_model,
    unet_loss,
    vae_loss,
)
from crystaloop.generative.models.features import ATOM_FEATURES, atom_feature_table

GRID = 16
ZS = [8, 22, 38]


def _voxels(batch: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    species = np.zeros((batch, GRID, GRID, GRID), dtype=np.int64)
    for b in range(batch):
        for z, (i, j, k) in zip(ZS, rng.integers(2, GRID - 3, size=(3, 3)), strict=True):
            species[b, i - 1 : i + 2, j - 1 : j + 2, k - 1 : k + 2] = z
    density = torch.from_numpy(species > 0).float()[:, None] * 0.5
    axis = torch.linspace(0, 1, GRID)
    coords = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"))
    x = torch.cat([density, coords.expand(batch, -1, -1, -1, -1)], dim=1)
    return x, torch.from_numpy(species)


def _finite_grads(model: torch.nn.Module) -> bool:
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    return bool(grads) and all(g is not None and torch.isfinite(g).all() for g in grads)


def _tiny_unet(circular: bool = False) -> UNet3D:
    torch.manual_seed(0)
    return UNet3D(ZS, widths=(4, 8), circular=circular)


@pytest.mark.parametrize("circular", [False, True])
def test_unet_one_batch_trains_and_round_trips(tmp_path, circular):
    unet = _tiny_unet(circular)
    x, species = _voxels()
    classes = unet.vocabulary.encode(species)
    counts = torch.bincount(classes.flatten(), minlength=unet.n_classes)
    weights = class_weights(counts)
    assert weights[0] == 0 and (weights[1:] > 0).all()
    loss, parts = unet_loss(unet(x[:, :1]), classes, species > 0, weights)
    loss.backward()
    assert math.isfinite(loss.item()) and parts["ce"] > 0 and parts["bce"] > 0
    assert _finite_grads(unet)
    path = save_model(unet, tmp_path / "unet.pt", note="smoke")
    loaded, extra = load_model(path)
    unet.eval()
    assert extra == {"note": "smoke"}
    assert torch.allclose(loaded(x[:, :1]).species_logits, unet(x[:, :1]).species_logits)
    assert set(loaded.predict_species(x[:, :1]).unique().tolist()) <= {0, *ZS}


def test_unet_class_weights_are_used():
    """Changing the class weights changes the cross-entropy (the reference code ignored them)."""
    unet = _tiny_unet()
    x, species = _voxels()
    classes = unet.vocabulary.encode(species)
    out = unet(x[:, :1])
    even, _ = unet_loss(out, classes, species > 0, torch.tensor([0.0, 1.0, 1.0, 1.0]))
    skewed, _ = unet_loss(out, classes, species > 0, torch.tensor([0.0, 10.0, 0.1, 0.1]))
    assert not torch.isclose(even, skewed)
    background_only = torch.zeros_like(classes)
    loss, parts = unet_loss(out, background_only, background_only, class_weights([5, 1, 1, 1]))
    assert parts["ce"] == 0.0 and math.isfinite(loss.item())


def test_unet_vocabulary_rejects_unknown_elements():
    with pytest.raises(ValueError, match=r"\[26\]"):
        _tiny_unet().vocabulary.encode(np.array([0, 8, 26]))


VAE_OPTIONS = {
    "plain": {},
    "circular": {"circular": True},
    "property_head": {"properties": ["formation_energy_per_atom", "band_gap"]},
}


@pytest.mark.parametrize("option", sorted(VAE_OPTIONS))
def test_vae_one_batch_trains_and_round_trips(tmp_path, option):
    torch.manual_seed(0)
    vae = CondDFCVAE(grid=GRID, latent_dim=8, widths=(4, 8), **VAE_OPTIONS[option])
    unet = _tiny_unet()
    for p in unet.parameters():
        p.requires_grad_(False)
    unet.eval()
    x, _ = _voxels()
    condition = vae.condition.one_hot([-2.0, 0.5])
    out = vae(x, condition)
    assert out.recon.shape == x.shape and out.z.shape == (2, 8)
    targets = mask = None
    if vae.properties:
        targets = torch.tensor([[0.3, float("nan")], [-0.2, 1.0]])
        mask = (~torch.isnan(targets)).float()
    loss, parts = vae_loss(
        out, x, VAELossWeights(), perceptual=unet, property_targets=targets, property_mask=mask
    )
    loss.backward()
    assert math.isfinite(loss.item()) and parts["perceptual"] > 0 and parts["kld"] >= 0
    assert ("property" in parts) == bool(vae.properties)
    assert _finite_grads(vae)
    assert all(p.grad is None for p in unet.parameters())
    loaded, _ = load_model(save_model(vae, tmp_path / "vae.pt"))
    vae.eval()
    assert torch.allclose(loaded(x, condition).recon, vae(x, condition).recon, atol=1e-6)
    assert loaded.sample(condition[0], 3, generator=torch.Generator().manual_seed(1)).shape == (
        3,
        4,
        GRID,
        GRID,
        GRID,
    )


def test_vae_joint_unet_training_updates_both():
    torch.manual_seed(0)
    vae = CondDFCVAE(grid=GRID, latent_dim=8, widths=(4, 8))
    unet = _tiny_unet()
    x, species = _voxels()
    classes = unet.vocabulary.encode(species)
    out = vae(x, vae.condition.one_hot([0.0, 3.0]))
    loss, parts = vae_loss(
        out,
        x,
        VAELossWeights(alpha=0.0, gamma=0.1),
        segmenter=unet,
        species_classes=classes,
        mask=species > 0,
        class_weights=class_weights(torch.bincount(classes.flatten(), minlength=4)),
    )
    loss.backward()
    assert parts["segmentation"] > 0 and "perceptual" not in parts
    assert _finite_grads(vae) and _finite_grads(unet)


def test_vae_condition_changes_the_decoding():
    torch.manual_seed(0)
    vae = CondDFCVAE(grid=GRID, latent_dim=8, widths=(4, 8)).eval()
    z = torch.zeros(1, 8)
    low, high = vae.condition.one_hot([-100.0]), vae.condition.one_hot([100.0])
    assert not torch.allclose(vae.decode(z, low), vae.decode(z, high))


def test_vae_rejects_grid_not_divisible():
    with pytest.raises(ValueError, match="divide"):
        CondDFCVAE(grid=20, widths=(4, 8, 16))


def test_decile_condition_fit_window_and_round_trip():
    values = np.linspace(-3.0, 1.0, 101)
    condition = DecileCondition.fit(values)
    assert condition.index([-3.0, 1.0]).tolist() == [0, 9]
    window = condition.for_window(-3.0, -2.8)
    assert window.shape == (10,) and window[0] == 1 and window.sum() == 1
    assert condition.deciles_in_window(-3.0, 1.0) == list(range(10))
    assert DecileCondition.from_dict(condition.to_dict()) == condition
    with pytest.raises(KeyError):
        DecileCondition("colour")


def _structures():
    rocksalt = Structure.from_spacegroup(
        "Fm-3m", Lattice.cubic(4.2), ["Mg", "O"], [[0, 0, 0], [0.5, 0.5, 0.5]]
    )
    perovskite = Structure(
        Lattice.cubic(3.9),
        ["Sr", "Ti", "O", "O", "O"],
        [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]],
    )
    return [rocksalt, perovskite, Structure(Lattice.cubic(2.87), ["Fe", "Fe"], [[0, 0, 0], [0.5] * 3])]


def test_element_feature_table_is_one_hot_per_descriptor():
    table = atom_feature_table()
    assert table.shape == (95, ATOM_FEATURES)
    assert not table[0].any()
    assert table[8].sum() == 9  # oxygen has all nine descriptors
    assert len({tuple(row) for row in table[1:]}) > 80


def test_crystal_graph_uses_12_nearest_neighbours():
    model = CGCNN()
    graph = model.graph(_structures()[0])
    assert len(graph.atomic_numbers) == 8
    assert np.bincount(graph.centers).tolist() == [12] * 8
    # MgO rocksalt: 6 O at a/2, then 12 Mg at a/sqrt(2) of which 6 are kept
    first = np.sort(graph.distances[graph.centers == 0])
    assert np.allclose(first[:6], 2.1, atol=1e-6) and np.allclose(first[6:], 4.2 / np.sqrt(2))


def test_cgcnn_multi_property_masked_batch_and_round_trip(tmp_path):
    torch.manual_seed(0)
    props = ["formation_energy_per_atom", "band_gap", "dielectric_constant", "refractive_index"]
    model = CGCNN(props, hidden=8, fc_hidden=16)
    graphs = [model.graph(s) for s in _structures()]
    batch = collate_graphs(graphs)
    assert batch.atomic_numbers.shape[0] == 8 + 5 + 2
    assert batch.crystal_index.tolist().count(2) == 2
    targets = torch.tensor([[-3.0, 5.0, 3.0, 1.7], [-3.4, 3.2, float("nan"), 2.3], [0.0, 0.0, 0, 0]])
    mask = (~torch.isnan(targets)).float()
    mask[2, 1:] = 0
    loss = masked_mse(model(batch), targets, mask)
    loss.backward()
    assert math.isfinite(loss.item()) and _finite_grads(model)
    loaded, _ = load_model(save_model(model, tmp_path / "cgcnn.pt"))
    model.eval()
    assert torch.allclose(loaded(batch), model(batch), atol=1e-6)


def test_cgcnn_metallic_prediction_gives_nan_optics():
    model = CGCNN(["band_gap", "dielectric_constant", "refractive_index"], hidden=8, fc_hidden=8)
    model.set_normalization([0.0, 5.0, 2.0], [1e-6, 1.0, 1.0])  # band gap pinned at ~0
    with torch.no_grad():
        model.heads.bias.zero_()
        model.heads.weight.zero_()
    out = model.predict(collate_graphs([model.graph(_structures()[2])]))
    assert out[0, 0] == 0 and torch.isnan(out[0, 1:]).all()


def test_cgcnn_transfer_learning_stages():
    torch.manual_seed(0)
    model = CGCNN(hidden=8, fc_hidden=8)
    batch = collate_graphs([model.graph(s) for s in _structures()])
    model.replace_heads(["band_gap", "bulk_modulus"])
    model.freeze_base()
    model.train()
    before = model.convs[0].bn_sum.running_mean.clone()
    masked_mse(model(batch), torch.ones(3, 2), torch.ones(3, 2)).backward()
    assert all(p.grad is None for p in model.base_parameters())
    assert model.heads.weight.grad is not None
    model.zero_grad()
    model.unfreeze_base()
    model.train()
    masked_mse(model(batch), torch.ones(3, 2), torch.ones(3, 2)).backward()
    assert all(p.grad is not None for p in model.base_parameters())
    assert torch.equal(model.convs[0].bn_sum.running_mean, before)
    assert not model.convs[0].bn_sum.training


def _tiny_ensemble() -> CGCNNEnsemble:
    members = []
    for seed in range(3):
        torch.manual_seed(seed)
        members.append(CGCNN(["formation_energy_per_atom"], hidden=8, fc_hidden=8))
    return CGCNNEnsemble(members)


def test_ensemble_mean_and_std(tmp_path):
    ensemble = _tiny_ensemble()
    members = list(ensemble.members)
    batch = collate_graphs([members[0].graph(s) for s in _structures()])
    mean, std = ensemble.predict(batch)
    single = torch.stack([m.eval().denormalize(m(batch)) for m in members])
    assert torch.allclose(mean, single.mean(0)) and (std > 0).all()
    loaded, _ = load_model(save_model(ensemble, tmp_path / "ens.pt"))
    assert torch.allclose(loaded.predict(batch)[1], std)


def test_periodic_crop_keeps_channels_aligned():
    from crystaloop.generative.train.tasks import periodic_crop

    x, species = _voxels()
    batch = {"density": x[:, 0], "species": species, "mask": (species > 0).float()}
    torch.manual_seed(3)
    cropped = periodic_crop(batch, 8)
    assert cropped["density"].shape == (2, 8, 8, 8) and cropped["species"].shape == (2, 8, 8, 8)
    assert torch.equal(cropped["mask"] > 0, cropped["species"] > 0)
    assert torch.equal(cropped["density"] > 0, cropped["species"] > 0)


def test_latent_optimisation_moves_the_property_head_into_the_window():
    from crystaloop.generative.models.vae import optimize_latent

    torch.manual_seed(0)
    vae = CondDFCVAE(grid=GRID, latent_dim=8, widths=(4, 8), properties=["band_gap"])
    z0 = torch.randn(4, 8)

    def predicted(z):
        with torch.no_grad():
            return vae.property_head(z)[:, 0] * vae.property_std[0] + vae.property_mean[0]

    target = (float(predicted(z0).max()) + 1.0, float(predicted(z0).max()) + 1.5)
    z = optimize_latent(vae, z0, "band_gap", target, steps=300, lr=0.05, prior_weight=0.0)
    after = predicted(z)
    assert ((after >= target[0] - 0.05) & (after <= target[1] + 0.05)).all()
    with pytest.raises(ValueError, match="not predicted"):
        optimize_latent(vae, z0, "bulk_modulus", (0.0, 1.0))


def test_unet_voxel_spacing_channels_change_the_prediction_and_round_trip(tmp_path):
    from crystaloop.generative.models.unet import voxel_spacing
    from crystaloop.generative.representation import coordinate_channels

    lattice = Lattice.from_parameters(4.0, 6.0, 8.0, 90, 90, 120)
    coords = torch.from_numpy(coordinate_channels(lattice, GRID))[None]
    expected = torch.tensor([lattice.abc]) / GRID
    assert torch.allclose(voxel_spacing(coords), expected, atol=1e-5)
    rolled = torch.roll(coords, shifts=(5, 3, 7), dims=(-3, -2, -1))  # a training crop's seam
    assert torch.allclose(voxel_spacing(rolled), expected, atol=1e-5)

    torch.manual_seed(0)
    unet = UNet3D(ZS, widths=(4, 8), spacing=True).eval()
    x, _ = _voxels()
    with pytest.raises(ValueError, match="spacing"):
        unet(x[:, :1])
    small, large = torch.full((2, 3), 0.15), torch.full((2, 3), 0.45)
    assert not torch.allclose(unet(x[:, :1], small).species_logits, unet(x[:, :1], large).species_logits)
    loaded, _ = load_model(save_model(unet, tmp_path / "unet.pt"))
    assert loaded.spacing and loaded.input_transform == "log1p"
    assert torch.allclose(loaded(x[:, :1], small).species_logits, unet(x[:, :1], small).species_logits)


def test_unet_input_transform_and_older_checkpoints(tmp_path):
    with pytest.raises(ValueError, match="input_transform"):
        UNet3D(ZS, input_transform="sqrt")
    unet = UNet3D(ZS, widths=(4, 8), input_transform="none")
    payload_path = save_model(unet, tmp_path / "old.pt")
    payload = torch.load(payload_path, weights_only=False)
    del payload["hparams"]["input_transform"], payload["hparams"]["spacing"]  # as written before the options
    torch.save(payload, payload_path)
    loaded, _ = load_model(payload_path)
    assert loaded.input_transform == "none" and not loaded.spacing


def test_ensemble_variance_calibration_covers_68_percent_of_held_out_errors(tmp_path):
    ensemble = _tiny_ensemble()
    members = list(ensemble.members)
    batch = collate_graphs([members[0].graph(s) for s in _structures()])
    mean, raw = (t.numpy() for t in ensemble.predict(batch))  # uncalibrated: the factor is 1
    rng = np.random.default_rng(0)
    # Fit points: errors three times the members' spread, as in an under-dispersed ensemble.
    n = 2000
    spread = rng.uniform(0.01, 0.05, size=(n, 1))
    values = rng.normal(size=(n, 1))
    (scale,) = ensemble.calibrate(values + rng.normal(0.0, 3.0 * spread), spread, values, np.ones((n, 1)))
    assert 2.7 < scale < 3.3  # the 68.27 % quantile of 3|N(0, 1)| is 3
    # Held-out points: new labels for the three structures, drawn with the same under-dispersion
    # around the ensemble's own means and spreads (another range than the fit's), judged by the
    # calibrated sigma that predict() now returns.
    sigma = ensemble.predict(batch)[1].numpy()
    truth = mean + rng.normal(0.0, 3.0 * raw, size=(n, *raw.shape))
    error = np.abs(truth - mean)
    assert abs(float((error <= sigma).mean()) - 0.6827) < 0.03
    assert abs(float((error <= 2 * sigma).mean()) - 0.9545) < 0.02
    np.testing.assert_allclose(sigma, raw * scale, rtol=1e-5)
    loaded, _ = load_model(save_model(ensemble, tmp_path / "ens.pt"))
    assert torch.allclose(loaded.sigma_scale, torch.tensor([scale]))
