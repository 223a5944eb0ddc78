"""The ``sites`` decoder, the shipped path: heatmap peaks of site channels, no UNet.

Sites are the peaks of the decoded site heatmap; each takes the species head's most likely
allowed element, or, for a VAE without a head, the element nearest in descriptor space
(:func:`crystaloop.generative.representation.sites_from_channels`). Peaks closer than 0.9
Angstrom are merged; the raw sites (only the tied voxels of one flat maximum merged) are read
too, for validity before repair.
"""

from __future__ import annotations

from collections.abc import Sequence

from crystaloop.generative.decoders.base import (
    FLAT_MAXIMUM_ANGSTROM,
    DecodedMaps,
    Job,
    SiteReader,
    SiteResult,
)


def read_sites(job: Job) -> SiteResult:
    """Worker: site channels, a lattice matrix, the allowed atomic numbers and, with a species
    head, its logits and vocabulary, to sites (merged and raw)."""
    from pymatgen.core import Lattice

    from crystaloop.generative.representation import sites_from_channels

    channels, matrix, elements, *head = job
    logits, vocabulary = head if head else (None, ())
    lattice = Lattice(matrix)
    found = sites_from_channels(channels, lattice, elements, species_logits=logits, vocabulary=vocabulary)
    raw = sites_from_channels(
        channels,
        lattice,
        elements,
        species_logits=logits,
        vocabulary=vocabulary,
        min_separation=FLAT_MAXIMUM_ANGSTROM,
    )
    return (found, None, raw) if found else ([], "no sites", raw)


class SitesDecoder(SiteReader):
    """Reads a site-channel VAE's maps (see the module docstring)."""

    name = "sites"
    representation = "sites"
    needs_unet = False
    read = staticmethod(read_sites)

    def jobs(self, maps: DecodedMaps, elements: Sequence[int]) -> list[Job]:
        channels = maps.channels.cpu().numpy()
        logits = maps.species_logits.float().cpu().numpy() if maps.species_logits is not None else None
        vocabulary = list(getattr(self.vae, "species", []))
        zs = list(elements)
        return [
            (channels[i], maps.lattices[i].matrix, zs)
            + ((logits[i], vocabulary) if logits is not None else ())
            for i, ok in enumerate(maps.readable)
            if ok
        ]
