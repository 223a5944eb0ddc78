"""The decoder contract on the shipped models: one candidate per row, in order, with reasons."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure

from crystaloop.generative.decode import DecodedCandidate, Decoder, lattice_problem
from crystaloop.generative.models.shipped import CHECKPOINT_DIR, shipped_models


def _shipped(kind: str):
    entry = next(e for e in shipped_models() if e["kind"] == kind)
    return CHECKPOINT_DIR / entry["file"]


@pytest.fixture(scope="module")
def decoder() -> Decoder:
    return Decoder.from_checkpoints(_shipped("vae"), _shipped("unet"), device="cpu", workers=1)


def test_decode_returns_one_candidate_per_row_in_order(decoder):
    torch.manual_seed(0)
    z = torch.randn(3, decoder.vae.latent_dim)
    condition = torch.nn.functional.one_hot(torch.tensor([0, 4, 9]), 10).float()
    seen = []
    out = decoder.decode(z, condition, batch_size=2, progress=lambda done, total: seen.append((done, total)))
    assert [c.index for c in out] == [0, 1, 2]
    assert seen == [(2, 3), (3, 3)]
    for c in out:
        assert isinstance(c, DecodedCandidate)
        assert (c.structure is None) != (c.reason is None)
        assert np.allclose(c.latent, z[c.index].numpy())
        if c.structure is not None:
            assert len(c.structure) >= 1 and lattice_problem(c.structure.lattice) is None


def test_allowed_elements_restrict_species(decoder):
    mu, _ = decoder.encode([Structure(Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])])
    out = decoder.decode(
        mu.repeat(2, 1), decoder.vae.condition.one_hot([-2.0, -2.0]), allowed_elements=["Na", "Cl"]
    )
    decoded = [c.structure for c in out if c.structure is not None]
    assert decoded
    assert {el.symbol for s in decoded for el in s.composition.elements} <= {"Na", "Cl"}


def test_encode_gives_posterior_of_each_structure(decoder):
    s = Structure(Lattice.cubic(4.2), ["Mg", "O"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    mu, logvar = decoder.encode([s, s], property_values=[-3.0, 0.5])
    assert mu.shape == logvar.shape == (2, decoder.vae.latent_dim)
    assert not torch.allclose(mu[0], mu[1])  # different deciles condition the encoder


def test_lattice_problem_flags_degenerate_cells():
    assert lattice_problem(Lattice.cubic(4.0)) is None
    assert lattice_problem(Lattice.cubic(0.5)) == "unphysical lattice"
    assert lattice_problem(Lattice.from_parameters(4, 4, 4, 90, 90, 10)) == "unphysical lattice"


def _sites_decoder() -> Decoder:
    from crystaloop.generative.models.checkpoint import load_model
    from crystaloop.generative.models.vae import CondDFCVAE

    vae = CondDFCVAE(grid=16, latent_dim=8, widths=[4, 8], circular=True, representation="sites")
    return Decoder(vae, load_model(_shipped("unet"))[0], device="cpu", workers=1)


def _maps(structure: Structure, lattice: Lattice | None = None):
    from crystaloop.generative.representation import coordinate_channels, site_channels

    channels = torch.from_numpy(site_channels(structure, grid=16))[None]
    coords = torch.from_numpy(coordinate_channels(lattice or structure.lattice, 16))[None]
    return channels, coords


def test_validity_before_repair_sees_the_merge_and_the_lattice_bounds():
    decoder = _sites_decoder()
    # a one-site map plus a satellite peak two voxels (0.75 A) away: the decoder merges the two
    # (merge distance 0.9 A); before the merge they are 0.75 A apart
    one = Structure(Lattice.cubic(6.0), ["Na"], [[4.5 / 16, 4.5 / 16, 4.5 / 16]])
    channels, coords = _maps(one)
    channels[0, :, 6, 4, 4] = 0.9 * channels[0, :, 4, 4, 4]
    [row] = decoder.structures_from_maps(channels, coords, lattices=[one.lattice])
    assert row.reason is None and len(row.structure) == 1
    assert row.merged_sites == 1
    # the parabola refinement pulls the satellite toward the main peak: between the two rules
    assert 0.5 < row.raw_min_distance < 0.75
    # a cell with a 1.2 A edge is rejected; its one raw site sits 1.2 A from its own image
    thin = Lattice.orthorhombic(1.2, 6.0, 6.0)
    [row] = decoder.structures_from_maps(*_maps(one), lattices=[thin])
    assert row.structure is None and row.reason == "unphysical lattice"
    assert row.raw_min_distance == pytest.approx(1.2) and row.merged_sites == 0
    # an unreadable cell has no raw distances at all
    [row] = decoder.structures_from_maps(*_maps(one), lattices=[Lattice(np.full((3, 3), np.nan))])
    assert row.structure is None and row.raw_min_distance is None
