"""Shards of site channels for the GPU trainer (``generative/train/gpu.py``).

The same layout as :mod:`crystaloop.generative.data.shards` (``shard-*.npz`` plus
``manifest.json``), with ``sites`` (N, 4, g, g, g; float16) from
:func:`crystaloop.generative.representation.site_channels` in place of the density, ``species``
(N, g, g, g; int16), the species head's target
(:func:`crystaloop.generative.representation.site_species`), and ``"representation": "sites"``
and the atomic numbers present (``"elements"``) in the manifest.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from crystaloop.generative.data.shards import write_shard_set
from crystaloop.generative.train.data import LabelledStructure


def write_site_shards(
    records: Sequence[LabelledStructure],
    out_dir: Path,
    properties: Sequence[str],
    *,
    grid: int = 16,
    shard_size: int = 512,
    progress=None,
) -> Path:
    """Write site-channel shards of ``records`` to ``out_dir``; returns the manifest path."""
    from crystaloop.generative.representation import site_maps

    def arrays(chunk: Sequence[LabelledStructure]) -> dict[str, np.ndarray]:
        channels, species = zip(*(site_maps(r.structure, grid=grid) for r in chunk), strict=True)
        return {
            "sites": np.stack(channels).astype(np.float16),
            "species": np.stack(species).astype(np.int16),
            "lattice": np.stack([r.structure.lattice.matrix for r in chunk]).astype(np.float64),
        }

    return write_shard_set(
        records,
        out_dir,
        properties,
        arrays,
        shard_size=shard_size,
        progress=progress,
        grid=grid,
        representation="sites",
        elements=sorted({el.Z for r in records for el in r.structure.composition.elements}),
    )
