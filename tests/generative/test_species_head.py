"""The VAE's species head and its fitted latent prior: species read back by classification from
hand-built voxels, allowed elements masked, labels of the site voxels, and a Gaussian-mixture
prior that samples, saves and loads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure

from crystaloop.generative.decode import Decoder
from crystaloop.generative.models.checkpoint import load_model, save_model
from crystaloop.generative.models.shipped import CHECKPOINT_DIR, shipped_models
from crystaloop.generative.models.vae import CondDFCVAE, VAELossWeights, fit_gaussian_mixture, vae_loss
from crystaloop.generative.representation import (
    SPECIES_RADIUS_ANGSTROM,
    coordinate_channels,
    rotate_structure,
    site_channels,
    site_maps,
    site_species,
    sites_from_channels,
)

# K+ and Se2-: equal eq. 1 peak heights; Na and Cl: the rock salt
K, SE, NA, CL = 19, 34, 11, 17
VOCABULARY = [8, NA, CL, K, 22, SE]


def _head_logits(species: np.ndarray, votes: dict[int, list[int]]) -> np.ndarray:
    """(K, g, g, g) logits that, at the voxels labelled Z, rank ``votes[Z]`` first to last."""
    logits = np.full((len(VOCABULARY), *species.shape), -10.0, dtype=np.float32)
    for z, ranking in votes.items():
        for rank, choice in enumerate(ranking):
            logits[VOCABULARY.index(choice)][species == z] = 5.0 - 3.0 * rank
    return logits


def test_site_species_labels_the_voxels_around_each_site():
    s = Structure(Lattice.cubic(5.64), ["Na", "Cl"], [[0.1, 0.1, 0.1], [0.6, 0.6, 0.6]])
    species = site_species(s, grid=16)
    assert set(np.unique(species)) == {0, NA, CL}
    voxel = 5.64 / 16
    # every voxel centre within the radius is labelled: (4/3) pi r^3 / voxel^3 of them, give or take the surface
    expected = 4 / 3 * np.pi * SPECIES_RADIUS_ANGSTROM**3 / voxel**3
    for z in (NA, CL):
        assert 0.6 * expected < (species == z).sum() < 1.5 * expected
    centre = np.floor(np.array([0.1, 0.1, 0.1]) * 16).astype(int)
    assert species[tuple(centre)] == NA


def test_species_head_reads_species_where_descriptors_cannot():
    s = Structure(Lattice.cubic(6.0), ["K", "Se"], [[0.1, 0.1, 0.1], [0.6, 0.6, 0.6]])
    channels, species = site_maps(s, grid=16)
    channels[1:] = 0.0  # blank descriptors: nearest-descriptor decoding has nothing to go on
    logits = _head_logits(species, {K: [K, SE], SE: [SE, K]})
    sites = sites_from_channels(channels, s.lattice, VOCABULARY, species_logits=logits, vocabulary=VOCABULARY)
    assert sorted(z for z, _ in sites) == [K, SE]
    blind = sites_from_channels(channels, s.lattice, VOCABULARY)
    assert sorted(z for z, _ in blind) != [K, SE]


def test_species_head_picks_the_best_allowed_element():
    s = Structure(Lattice.cubic(6.0), ["K", "Se"], [[0.1, 0.1, 0.1], [0.6, 0.6, 0.6]])
    channels, species = site_maps(s, grid=16)
    logits = _head_logits(species, {K: [22, K], SE: [SE, 8]})  # Ti first at the K site
    sites = sites_from_channels(channels, s.lattice, [K, SE], species_logits=logits, vocabulary=VOCABULARY)
    assert sorted(z for z, _ in sites) == [K, SE]
    # none of the allowed elements is in the head's vocabulary: the descriptors decide
    sites = sites_from_channels(channels, s.lattice, [NA, 56], species_logits=logits, vocabulary=[8, 22])
    assert {z for z, _ in sites} <= {NA, 56} and len(sites) == 2


def _shipped_unet():
    entry = next(e for e in shipped_models() if e["kind"] == "unet")
    return load_model(CHECKPOINT_DIR / entry["file"])[0]


def test_decoder_masks_the_species_head_to_the_allowed_elements():
    vae = CondDFCVAE(
        grid=16, latent_dim=8, widths=[4, 8], circular=True, representation="sites", species=VOCABULARY
    )
    decoder = Decoder(vae, _shipped_unet(), device="cpu", workers=1)
    s = Structure(Lattice.cubic(5.64), ["Na", "Cl"], [[0.1, 0.1, 0.1], [0.6, 0.6, 0.6]])
    channels, species = site_maps(s, grid=16)
    logits = torch.from_numpy(_head_logits(species, {NA: [K, NA], CL: [CL, 8]}))[None]
    coords = torch.from_numpy(coordinate_channels(s.lattice, 16))[None]
    free, masked = (
        decoder.structures_from_maps(
            torch.from_numpy(channels)[None], coords, keep=keep, species_logits=logits
        )[0][0]
        for keep in (None, decoder.allowed_atomic_numbers(["Na", "Cl"]))
    )
    assert sorted(site.specie.Z for site in free) == [CL, K]
    assert sorted(site.specie.Z for site in masked) == [NA, CL]


def test_species_classes_and_cross_entropy_term():
    vae = CondDFCVAE(
        grid=8, latent_dim=4, widths=[4], circular=True, representation="sites", species=VOCABULARY
    )
    z_map = torch.tensor([[[[0, NA], [CL, 99]], [[SE, 0], [0, 8]]]])
    classes = vae.species_classes(z_map)
    assert classes.tolist() == [[[[-100, 1], [2, -100]], [[5, -100], [-100, 0]]]]

    s = Structure(Lattice.cubic(4.0), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    channels, species = site_maps(s, grid=8)
    x = vae.to_input(
        torch.from_numpy(channels)[None], torch.from_numpy(coordinate_channels(s.lattice, 8))[None]
    )
    output = vae(x, torch.eye(10)[:1])
    assert output.recon.shape == x.shape and output.species_logits.shape == (1, len(VOCABULARY), 8, 8, 8)
    site_classes = vae.species_classes(torch.from_numpy(species.astype(np.int64))[None])
    weights = VAELossWeights(alpha=0.0, beta=0.0, species_weight=0.5)
    with_head, parts = vae_loss(output, x, weights, site_classes=site_classes)
    without, _ = vae_loss(output, x, weights)
    assert parts["species_ce"] > 0
    assert float((with_head - without).detach()) == pytest.approx(0.5 * parts["species_ce"], rel=1e-4)


def test_a_species_head_needs_site_channels():
    with pytest.raises(ValueError, match="sites"):
        CondDFCVAE(grid=8, latent_dim=4, widths=[4], species=VOCABULARY)


def test_fitted_prior_samples_its_modes_and_survives_save_and_load(tmp_path):
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[4.0, 0.0, 0.0], [-4.0, 0.0, 0.0]])
    mu = centres[torch.arange(400) % 2] + 0.3 * torch.randn(400, 3, generator=generator)
    vae = CondDFCVAE(
        grid=8, latent_dim=3, widths=[4], circular=True, representation="sites", species=[NA, CL]
    )
    assert not vae.has_latent_prior
    with pytest.raises(ValueError, match="no fitted latent prior"):
        vae.sample_latent(4, prior="fitted")
    vae.fit_latent_prior(mu, components=2)
    z = vae.sample_latent(1000, generator=torch.Generator().manual_seed(1))
    assert z.shape == (1000, 3)
    # every draw lies near one of the two modes, about half at each; N(0, I) would not
    assert (z[:, 0].abs() > 2.5).float().mean() > 0.97
    assert 0.4 < (z[:, 0] > 0).float().mean() < 0.6
    assert z[:, 1:].std().item() == pytest.approx(0.3, abs=0.06)
    normal = vae.sample_latent(1000, prior="normal", generator=torch.Generator().manual_seed(1))
    assert normal.std().item() == pytest.approx(1.0, abs=0.08)

    save_model(vae, tmp_path / "vae.pt")
    loaded, _ = load_model(tmp_path / "vae.pt")
    assert loaded.has_latent_prior and loaded.species == [NA, CL]
    again = loaded.sample_latent(1000, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(again, z, atol=1e-5)


def test_gaussian_mixture_recovers_weights_and_means():
    generator = torch.Generator().manual_seed(0)
    x = torch.cat(
        [torch.randn(300, 2, generator=generator) + 5, torch.randn(100, 2, generator=generator) - 5]
    )
    weights, means, tril = fit_gaussian_mixture(x, 2, seed=0)
    order = torch.argsort(means[:, 0])
    assert torch.allclose(weights[order], torch.tensor([0.25, 0.75]), atol=0.02)
    assert torch.allclose(means[order], torch.tensor([[-5.0, -5.0], [5.0, 5.0]]), atol=0.3)
    assert tril.shape == (2, 2, 2)


def test_rotated_site_maps_in_the_training_set_equal_the_rotated_crystal():
    from crystaloop.generative.train.data import LabelledStructure, VoxelDataset

    s = Structure(
        Lattice.from_parameters(4.0, 5.0, 6.0, 90, 90, 90),
        ["K", "Se", "O"],
        [[0.1, 0.2, 0.3], [0.6, 0.5, 0.7], [0.3, 0.8, 0.1]],
    )
    data = VoxelDataset(
        [LabelledStructure("x", s, {"formation_energy_per_atom": -1.0})],
        ["formation_energy_per_atom"],
        grid=12,
        augment=True,
        representation="sites",
    )
    for seed in range(6):
        torch.manual_seed(seed)
        item = data[0]
        torch.manual_seed(seed)
        rotated = rotate_structure(s, int(torch.randint(24, (1,)).item()))
        assert np.allclose(item["density"].numpy(), site_channels(rotated, grid=12), atol=2e-3)
        assert np.allclose(item["coords"].numpy(), coordinate_channels(rotated.lattice, 12), atol=1e-4)
        assert (item["site_species"].numpy() == site_species(rotated, grid=12)).mean() > 0.99
