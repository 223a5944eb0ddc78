"""Precomputed voxel shards: compressed ``.npz`` files plus a JSON manifest.

Each shard holds, for up to ``shard_size`` structures in their stored
orientation: density M (float16), species S (uint8; S_B = S > 0), the lattice
matrix (C is rebuilt from it), and labels with their presence mask.
:class:`ShardDataset` serves the same items as the on-the-fly
:class:`~crystaloop.generative.train.data.VoxelDataset`, with the same random
cube rotations.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from crystaloop.generative.train.data import LabelledStructure, dataset_hash

MANIFEST = "manifest.json"


def write_shard_set(
    records: Sequence[LabelledStructure],
    out_dir: Path,
    properties: Sequence[str],
    arrays: Callable[[Sequence[LabelledStructure]], dict[str, np.ndarray]],
    *,
    shard_size: int,
    progress=None,
    **manifest_fields: Any,
) -> Path:
    """Write ``out_dir/shard-XXXXX.npz`` files and their manifest; returns the manifest path.

    ``arrays(chunk)`` gives the representation's arrays of one chunk; labels, label masks,
    ids and checksums are added here, and ``manifest_fields`` (grid, representation ...) go
    into the manifest. Shard files of an earlier set in ``out_dir`` that the new manifest does
    not list are removed (the manifest that listed them is replaced).

    Raises
    ------
    NotADirectoryError
        If ``out_dir`` is an existing file.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir} is a file, not a folder for shards")
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = []
    for start in range(0, len(records), shard_size):
        chunk = records[start : start + shard_size]
        labels = [r.label_array(properties) for r in chunk]
        name = f"shard-{start // shard_size:05d}.npz"
        path = out_dir / name
        np.savez_compressed(
            path,
            **arrays(chunk),
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
        **manifest_fields,
        "properties": list(properties),
        "count": len(records),
        "shards": shards,
    }
    path = out_dir / MANIFEST
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    listed = {s["file"] for s in shards}
    for stale in out_dir.glob("shard-*.npz"):
        if stale.name not in listed:
            stale.unlink()
    return path


def shard_set_bytes(manifest: Path) -> int:
    """Bytes on disk of the shard files ``manifest`` lists."""
    listed = json.loads(manifest.read_text())["shards"]
    return sum((manifest.parent / s["file"]).stat().st_size for s in listed)


def write_shards(
    records: Sequence[LabelledStructure],
    out_dir: Path,
    properties: Sequence[str],
    *,
    grid: int = 32,
    shard_size: int = 256,
    progress=None,
) -> Path:
    """Voxelise ``records`` into ``out_dir/shard-XXXXX.npz`` and write the manifest; returns its path."""
    from crystaloop.generative.representation import voxelize

    def arrays(chunk: Sequence[LabelledStructure]) -> dict[str, np.ndarray]:
        voxels = [voxelize(r.structure, grid=grid) for r in chunk]
        return {
            "density": np.stack([v.density for v in voxels]).astype(np.float16),
            "species": np.stack([v.species for v in voxels]).astype(np.uint8),
            "lattice": np.stack([v.lattice.matrix for v in voxels]).astype(np.float64),
        }

    return write_shard_set(
        records, out_dir, properties, arrays, shard_size=shard_size, progress=progress, grid=grid
    )


class ShardDataset(Dataset):
    """Voxel samples read from shards (the items of ``VoxelDataset``).

    Parameters
    ----------
    manifest
        Path of ``manifest.json``.
    augment
        Apply a random cube rotation (of the 24) to every sample.
    cache_shards
        Decompressed shards kept in memory per process.
    """

    def __init__(self, manifest: Path, *, augment: bool = False, cache_shards: int = 4) -> None:
        self.root = manifest.parent
        self.manifest = json.loads(manifest.read_text())
        self.augment, self.cache_shards = augment, cache_shards
        self._index = [(i, j) for i, s in enumerate(self.manifest["shards"]) for j in range(s["count"])]
        self._cache: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._index)

    def _shard(self, i: int) -> dict[str, np.ndarray]:
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        with np.load(self.root / self.manifest["shards"][i]["file"]) as data:
            arrays = {k: data[k] for k in data.files}
        self._cache[i] = arrays
        while len(self._cache) > self.cache_shards:
            self._cache.popitem(last=False)
        return arrays

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        from pymatgen.core import Lattice

        from crystaloop.generative.representation import VoxelCrystal, coordinate_channels, rotate90

        i, j = self._index[index]
        shard = self._shard(i)
        species = shard["species"][j].astype(np.int16)
        lattice = Lattice(shard["lattice"][j])
        grid = species.shape[0]
        voxels = VoxelCrystal(
            density=shard["density"][j].astype(np.float32),
            species=species,
            mask=species > 0,
            coords=coordinate_channels(lattice, grid),
            lattice=lattice,
        )
        if self.augment:
            voxels = rotate90(voxels, int(torch.randint(24, (1,)).item()))
        return {
            "density": torch.from_numpy(np.ascontiguousarray(voxels.density, dtype=np.float32)),
            "coords": torch.from_numpy(np.ascontiguousarray(voxels.coords, dtype=np.float32)),
            "species": torch.from_numpy(voxels.species.astype(np.int64)),
            "mask": torch.from_numpy(voxels.mask.astype(np.float32)),
            "labels": torch.from_numpy(shard["labels"][j]),
            "label_mask": torch.from_numpy(shard["label_mask"][j]),
        }


class ShardOrderSampler(torch.utils.data.Sampler[int]):
    """Shuffles shards, then samples within each shard, so each shard is decompressed once per epoch."""

    def __init__(self, dataset: ShardDataset, seed: int = 0) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self):
        rng = np.random.default_rng(self.seed + self.epoch)
        self.epoch += 1
        starts = np.cumsum([0] + [s["count"] for s in self.dataset.manifest["shards"]])
        for i in rng.permutation(len(starts) - 1):
            yield from (starts[i] + rng.permutation(starts[i + 1] - starts[i])).tolist()
