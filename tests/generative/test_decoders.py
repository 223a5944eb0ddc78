"""The decoder registry, and the shipped path that needs neither a UNet nor the plug-ins."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from crystaloop.generative.decode import METHODS, Decoder
from crystaloop.generative.decoders import DECODERS, decoder_class, decoder_names
from crystaloop.generative.decoders.base import SiteReader
from crystaloop.generative.models.shipped import CHECKPOINT_DIR, shipped_models
from crystaloop.generative.models.vae import CondDFCVAE


def _shipped(kind: str):
    return CHECKPOINT_DIR / next(e for e in shipped_models() if e["kind"] == kind)["file"]


def test_registry_names_each_decoder_and_the_representation_it_reads():
    assert METHODS == tuple(DECODERS) == ("paper", "pursuit", "sites")
    assert set(decoder_names()) >= set(METHODS)
    kinds = {name: (decoder_class(name).representation, decoder_class(name).needs_unet) for name in METHODS}
    assert kinds == {"paper": ("density", True), "pursuit": ("density", False), "sites": ("sites", False)}
    assert all(issubclass(decoder_class(name), SiteReader) for name in METHODS)
    with pytest.raises(ValueError, match="no decoder named 'watershd'"):
        decoder_class("watershd")


def test_a_method_that_does_not_read_the_vae_is_refused():
    vae = CondDFCVAE(
        grid=16, latent_dim=8, widths=[4, 8], circular=True, representation="sites", species=[11, 17]
    )
    with pytest.raises(ValueError, match="decodes with sites, not 'paper'"):
        Decoder(vae, device="cpu", workers=1, method="paper")
    density = CondDFCVAE(grid=16, latent_dim=8, widths=[4, 8], circular=True)
    with pytest.raises(ValueError, match="needs a UNet"):
        Decoder(density, device="cpu", workers=1, elements=[11, 17], method="paper")
    with pytest.raises(ValueError, match="no element list"):
        Decoder(density, device="cpu", workers=1, method="pursuit")
    # with the elements given, pursuit decodes a density VAE without any UNet
    decoder = Decoder(density, device="cpu", workers=1, elements=[11, 17], method="pursuit")
    assert decoder.elements == ["Na", "Cl"] and decoder.unet is None
    out = decoder.decode(torch.zeros(2, 8), torch.eye(10)[:2])
    assert len(out) == 2 and all((c.structure is None) != (c.reason is None) for c in out)


SHIPPED_RUN = """
import json, sys, torch
from crystaloop.generative.decode import Decoder
vae, unet = sys.argv[1], sys.argv[2]
decoder = Decoder.from_checkpoints(vae, unet, device="cpu", workers=1)
z = decoder.vae.sample_latent(8, generator=torch.Generator().manual_seed(0))
condition = torch.nn.functional.one_hot(torch.arange(8) % 10, 10).float()
out = decoder.decode(z, condition, allowed_elements=["Na", "Cl", "Mg", "O"])
print(json.dumps({
    "decoded": sum(c.structure is not None for c in out),
    "species": sorted({el.symbol for c in out if c.structure for el in c.structure.composition.elements}),
    "unet_loaded": not isinstance(decoder._unet, (str, type(None))) and hasattr(decoder._unet, "vocabulary"),
    "modules": [m for m in ("crystaloop.generative.decoders.watershed", "crystaloop.generative.decoders.pursuit",
                            "skimage") if m in sys.modules],
}))
"""


def test_the_shipped_sites_path_loads_no_unet_and_no_plug_in():
    result = subprocess.run(
        [sys.executable, "-c", SHIPPED_RUN, str(_shipped("vae")), str(_shipped("unet"))],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["decoded"] >= 6
    assert set(report["species"]) <= {"Na", "Cl", "Mg", "O"}
    assert not report["unet_loaded"] and report["modules"] == []


def test_the_shipped_vae_decodes_without_any_unet():
    from crystaloop.generative.models.checkpoint import load_model

    vae, _ = load_model(_shipped("vae"))
    decoder = Decoder(vae, device="cpu", workers=1)
    assert decoder.method == "sites" and decoder.atomic_numbers == list(vae.species)
    with_unet = Decoder.from_checkpoints(_shipped("vae"), _shipped("unet"), device="cpu", workers=1)
    assert with_unet.elements == decoder.elements
    # the shipped VAE's species are the shipped UNet's elements: the list the UNet used to give
    assert with_unet.atomic_numbers == list(with_unet.unet.vocabulary.atomic_numbers[1:])
