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
