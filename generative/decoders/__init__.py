"""Decoders: from a VAE's decoded maps to crystals, behind one interface (:class:`MapDecoder`).

The shipped path is ``sites`` (:mod:`.sites`, no UNet). The paper's ``paper`` path (UNet and
periodic watershed, :mod:`.watershed`) and the ``pursuit`` path (:mod:`.pursuit`) are plug-ins,
imported only when named. Other packages add decoders through the ``crystaloop.decoders``
entry-point group (name = ``module:Class``).
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from crystaloop.generative.decoders.base import DecodedMaps, DecodedRow, MapDecoder, SiteReader

DECODERS: dict[str, str] = {
    "paper": "crystaloop.generative.decoders.watershed:WatershedDecoder",
    "pursuit": "crystaloop.generative.decoders.pursuit:PursuitDecoder",
    "sites": "crystaloop.generative.decoders.sites:SitesDecoder",
}
"""Built-in decoders by name, as ``module:Class``; a module is imported only when its name is used."""

ENTRY_POINT_GROUP = "crystaloop.decoders"


def decoder_names() -> tuple[str, ...]:
    """Names of the built-in decoders and of those installed through entry points."""
    return tuple(DECODERS) + tuple(
        e.name for e in entry_points(group=ENTRY_POINT_GROUP) if e.name not in DECODERS
    )


def decoder_class(name: str) -> type[MapDecoder]:
    """The decoder class registered as ``name``.

    Raises
    ------
    ValueError
        If no decoder has that name.
    """
    target = DECODERS.get(name)
    if target is None:
        found = [e for e in entry_points(group=ENTRY_POINT_GROUP) if e.name == name]
        if not found:
            raise ValueError(f"no decoder named {name!r}; use one of {', '.join(decoder_names())}")
        return found[0].load()
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


__all__ = [
    "DECODERS",
    "DecodedMaps",
    "DecodedRow",
    "MapDecoder",
    "SiteReader",
    "decoder_class",
    "decoder_names",
]
