"""The VAE's lattice head: the decoder builds crystals on its lattice, a checkpoint without one
still loads and decodes on the fitted lattice, the head saves and loads, and its trainer learns a
lattice from latent vectors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure

from crystaloop.generative.decode import Decoder
from crystaloop.generative.models.checkpoint import load_model, model_payload, save_model
from crystaloop.generative.models.condition import N_DECILES
from crystaloop.generative.models.shipped import CHECKPOINT_DIR, shipped_models
from crystaloop.generative.models.vae import CondDFCVAE, LatticeHead
from crystaloop.generative.representation import coordinate_channels, site_maps
from crystaloop.generative.train.lattice_head import Posterior, lattice_errors, train_lattice_head

HEAD_LATTICE = (5.5, 5.8, 6.1, 88.0, 92.0, 95.0)


def _shipped(kind: str):
    entry = next(e for e in shipped_models() if e["kind"] == kind)
    return load_model(CHECKPOINT_DIR / entry["file"])[0]


def _constant_head(latent_dim: int, parameters=HEAD_LATTICE) -> LatticeHead:
    """A head whose output is ``parameters`` for every z."""
    head = LatticeHead(latent_dim, hidden=8)
    with torch.no_grad():
        head.net[-1].weight.zero_()
        head.net[-1].bias.zero_()
        head.target_mean.copy_(LatticeHead.targets(torch.tensor([parameters]))[0])
    return head


def _vae(head: bool = True) -> CondDFCVAE:
    vae = CondDFCVAE(grid=16, latent_dim=8, widths=[4, 8], circular=True, representation="sites")
    if head:
        vae.attach_lattice_head(_constant_head(8))
    return vae.eval()


def _rock_salt_maps() -> tuple[torch.Tensor, Lattice]:
    """Decoded-looking (1, 7, 16, 16, 16) maps: a rock salt's site channels on a cubic 5.64 cell."""
    s = Structure(Lattice.cubic(5.64), ["Na", "Cl"], [[0.1, 0.1, 0.1], [0.6, 0.6, 0.6]])
    channels, _ = site_maps(s, grid=16)
    coords = coordinate_channels(s.lattice, 16)
    return torch.from_numpy(np.concatenate([channels, coords]))[None].float(), s.lattice


def test_head_gives_the_stored_lattice_parameters():
    vae = _vae()
    parameters = vae.lattice_parameters(torch.randn(3, 8), torch.eye(N_DECILES)[:3])
    assert parameters.shape == (3, 6)
    np.testing.assert_allclose(parameters.detach().numpy(), np.tile(HEAD_LATTICE, (3, 1)), atol=1e-3)


def test_decoder_builds_crystals_on_the_head_lattice(monkeypatch):
    vae = _vae()
    maps, fitted = _rock_salt_maps()
    vae.density_scale = vae.coord_scale = 1.0
    monkeypatch.setattr(vae, "decode", lambda z, condition: maps.expand(len(z), -1, -1, -1, -1))
    unet = _shipped("unet")
    z, condition = torch.zeros(2, 8), torch.eye(N_DECILES)[:2]

    head = Decoder(vae, unet, device="cpu", workers=1)
    assert head.lattice_source == "head"
    for candidate in head.decode(z, condition):
        assert candidate.structure is not None
        np.testing.assert_allclose(candidate.structure.lattice.parameters, HEAD_LATTICE, atol=1e-3)
        assert len(candidate.structure) == 2
        # the sites keep their fractional positions on the voxel grid whichever lattice holds them
        assert sorted(round(float(f[0]), 2) for f in candidate.structure.frac_coords) == [0.1, 0.6]

    fit = Decoder(vae, unet, device="cpu", workers=1, lattice="fit")
    [candidate, _] = fit.decode(z, condition)
    np.testing.assert_allclose(candidate.structure.lattice.abc, fitted.abc, atol=1e-3)


def test_a_checkpoint_without_a_head_loads_and_fits_the_lattice(tmp_path):
    # the shipped VAE as written before the head existed: no head weights, no hparam for it
    payload = model_payload(_shipped("vae"))
    payload["hparams"].pop("lattice_head_hidden", None)
    payload["state_dict"] = {
        k: v for k, v in payload["state_dict"].items() if not k.startswith("lattice_head.")
    }
    path = tmp_path / "old.pt"
    torch.save({**payload, "extra": {}}, path)
    old, _ = load_model(path)
    assert not old.has_lattice_head and old.hparams["lattice_head_hidden"] == 0
    with pytest.raises(ValueError, match="no lattice head"):
        old.lattice_parameters(torch.zeros(1, old.latent_dim), torch.eye(N_DECILES)[:1])
    unet = _shipped("unet")
    with pytest.raises(ValueError, match="no lattice head"):
        Decoder(old, unet, device="cpu", workers=1, lattice="head")
    decoder = Decoder(old, unet, device="cpu", workers=1)
    assert decoder.lattice_source == "fit"
    z = old.sample_latent(4, generator=torch.Generator().manual_seed(0))
    condition = torch.zeros(4, N_DECILES)
    condition[:, 5] = 1.0
    candidates = decoder.decode(z, condition)
    assert sum(c.structure is not None for c in candidates) >= 3


def test_lattice_head_round_trips_through_a_checkpoint(tmp_path):
    vae = _vae()
    with torch.no_grad():
        vae.lattice_head.net[-1].weight.normal_()  # make the output depend on z
    z, condition = torch.randn(5, 8), torch.eye(N_DECILES)[:5]
    before = vae.lattice_parameters(z, condition)
    loaded, _ = load_model(save_model(vae, tmp_path / "vae.pt"))
    assert loaded.has_lattice_head and loaded.hparams["lattice_head_hidden"] == 8
    torch.testing.assert_close(loaded.lattice_parameters(z, condition), before)


def test_attaching_a_head_of_another_latent_size_is_refused():
    with pytest.raises(ValueError, match="latent dimensions"):
        _vae(head=False).attach_lattice_head(LatticeHead(4))


def _posterior(n: int, rng: np.random.Generator) -> Posterior:
    mu = rng.normal(size=(n, 6)).astype(np.float32)
    lattice = np.column_stack(
        [
            4.0 + 0.8 * mu[:, 0],
            5.0 + 0.5 * mu[:, 1],
            6.0 + 0.6 * np.tanh(mu[:, 2]),
            90 + 8 * np.tanh(mu[:, 3]),
            90.0 * np.ones(n),
            100 + 5 * np.tanh(mu[:, 4]),
        ]
    )
    condition = np.eye(N_DECILES, dtype=np.float32)[rng.integers(0, N_DECILES, n)]
    return Posterior(mu, np.full_like(mu, -8.0), condition, lattice, lattice + 0.05)


def test_trained_head_learns_the_lattice_from_z():
    rng = np.random.default_rng(0)
    train, val = _posterior(2000, rng), _posterior(300, rng)
    head, metrics = train_lattice_head(train, val, hidden=32, epochs=40, lr=5e-3)
    constant = lattice_errors(np.tile(train.lattice.mean(axis=0), (len(val.mu), 1)), val.lattice)
    assert metrics["lattice_mae_angstrom"] < 0.1 < constant["lattice_mae_angstrom"]
    assert metrics["angle_mae_degrees"] < 1.5
    assert 1 <= metrics["epoch"] <= 40
    assert lattice_errors(val.fitted, val.lattice)["lattice_bias_angstrom"] == pytest.approx(0.05)
