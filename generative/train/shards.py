"""Shards of site channels for the GPU trainer (``generative/train/gpu.py``).

The same layout as :mod:`crystaloop.generative.data.shards` (``shard-*.npz`` plus
``manifest.json``), with ``sites`` (N, 4, g, g, g; float16) from
:func:`crystaloop.generative.representation.site_channels` in place of the density, and
``"representation": "sites"`` in the manifest.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from crystaloop.generative.train.data import LabelledStructure, dataset_hash


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
    from crystaloop.generative.representation import site_channels

    out_dir.mkdir(parents=True, exist_ok=True)
    shards = []
    for start in range(0, len(records), shard_size):
        chunk = records[start : start + shard_size]
        labels = [r.label_array(properties) for r in chunk]
        name = f"shard-{start // shard_size:05d}.npz"
        path = out_dir / name
        np.savez_compressed(
            path,
            sites=np.stack([site_channels(r.structure, grid=grid) for r in chunk]).astype(np.float16),
            lattice=np.stack([r.structure.lattice.matrix for r in chunk]).astype(np.float64),
            labels=np.stack([values for values, _ in labels]),
            label_mask=np.stack([mask for _, mask in labels]),
        )
        shards.append(
            {
                "file": name,
                "count": len(chunk),
                "ids": [r.structure_id for r in chunk],
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            }
        )
        if progress:
            progress(start + len(chunk), len(records))
    manifest = {
        "dataset_hash": dataset_hash(records),
        "grid": grid,
        "representation": "sites",
        "properties": list(properties),
        "count": len(records),
        "shards": shards,
    }
    path = out_dir / "manifest.json"
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    return path
