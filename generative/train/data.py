"""Labelled structures from the ``training_structures`` collection, split and served to models."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from pymatgen.core import Structure
from torch.utils.data import Dataset

from crystaloop.errors import UserError
from crystaloop.generative.train.config import DataConfig, GeometryNoise


@dataclass
class LabelledStructure:
    """One training record: id, structure and labels keyed by property name."""

    structure_id: str
    structure: Structure
    labels: dict[str, float | None] = field(default_factory=dict)
    material_class: str = "other"

    @property
    def formula(self) -> str:
        """Reduced formula (the split key)."""
        return self.structure.composition.reduced_formula

    def label_array(self, properties: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Values (NaN where missing) and a 0/1 presence mask for ``properties``."""
        values = np.array(
            [np.nan if self.labels.get(p) is None else float(self.labels[p]) for p in properties],
            dtype=np.float32,
        )
        return values, np.isfinite(values).astype(np.float32)


def perturbed_copies(
    records: Sequence[LabelledStructure], noise: GeometryNoise, seed: int
) -> list[LabelledStructure]:
    """``noise.copies`` perturbed copies of every record, with the record's labels.

    Each copy is strained by ``I + e`` (``e`` symmetric, components N(0, ``strain``)), scaled
    to a volume factor drawn log-uniformly from ``volume`` and has its sites displaced by
    N(0, ``displacement``) Å.
    """
    from pymatgen.core import Lattice

    rng = np.random.default_rng(seed)
    low, high = np.log(noise.volume[0]), np.log(noise.volume[1])
    out = []
    for record in records:
        for copy in range(noise.copies):
            s = record.structure
            e = rng.normal(0.0, noise.strain, (3, 3))
            lattice = Lattice(s.lattice.matrix @ (np.eye(3) + 0.5 * (e + e.T)))
            cart = lattice.get_cartesian_coords(s.frac_coords) + rng.normal(
                0.0, noise.displacement, (len(s), 3)
            )
            moved = Structure(lattice, s.species, cart, coords_are_cartesian=True, to_unit_cell=True)
            moved.scale_lattice(s.volume * float(np.exp(rng.uniform(low, high))))
            out.append(
                LabelledStructure(
                    f"{record.structure_id}~{copy}", moved, record.labels, record.material_class
                )
            )
    return out


def load_records(database, config: DataConfig) -> list[LabelledStructure]:
    """Converged, non-rejected records matching ``config``, in a seeded random order.

    Raises
    ------
    UserError
        If nothing matches (e.g. the prior data has not been loaded).
    """
    query: dict = {"converged": True, "reject_reason": None, "nsites": {"$lte": config.max_sites}}
    if config.dataset:
        query["dataset"] = config.dataset
    if config.material_classes:
        query["material_class"] = {"$in": list(config.material_classes)}
    projection = {"_id": 0, "structure_id": 1, "structure": 1, "labels": 1, "material_class": 1}
    docs = sorted(database["training_structures"].find(query, projection), key=lambda d: d["structure_id"])
    if not docs:
        raise UserError(
            "no training structures match the config; run `crystaloop data load-prior` "
            "(or check data.dataset / data.material_classes)"
        )
    for name, most in sorted(config.mix.items()):
        extra = sorted(
            database["training_structures"].find({**query, "dataset": name}, projection),
            key=lambda d: d["structure_id"],
        )
        if not extra:
            raise UserError(
                f"data.mix names dataset {name!r}, which holds no matching structures; load it first "
                f"(`crystaloop data load-prior --dataset {name}`) or remove it from data.mix"
            )
        picks = np.random.default_rng(config.split_seed).permutation(len(extra))[:most]
        docs += [extra[i] for i in sorted(picks)]
    if config.mix:
        docs.sort(key=lambda d: d["structure_id"])
    order = np.random.default_rng(config.split_seed).permutation(len(docs))
    if config.limit:
        order = order[: config.limit]
    return [
        LabelledStructure(
            docs[i]["structure_id"],
            Structure.from_dict(docs[i]["structure"]),
            dict(docs[i].get("labels") or {}),
            docs[i].get("material_class", "other"),
        )
        for i in order
    ]


def dataset_hash(records: Sequence[LabelledStructure]) -> str:
    """Content hash (16 hex) of the ids, structures and labels of ``records``."""
    digest = hashlib.sha256()
    for record in sorted(records, key=lambda r: r.structure_id):
        lattice = np.round(record.structure.lattice.matrix, 4).tolist()
        frac = np.round(record.structure.frac_coords, 4).tolist()
        species = [s.specie.symbol for s in record.structure]
        labels = {k: None if v is None else round(float(v), 5) for k, v in sorted(record.labels.items())}
        digest.update(json.dumps([record.structure_id, lattice, frac, species, labels]).encode())
    return digest.hexdigest()[:16]


def composition_split(
    records: Sequence[LabelledStructure], test_fraction: float = 0.2, seed: int = 0
) -> tuple[list[LabelledStructure], list[LabelledStructure]]:
    """Train and held-out lists; every structure of one reduced formula lands on the same side.

    A formula is held out when a seeded hash of it, read as a number in [0, 1), falls below
    ``test_fraction``; the side of a formula therefore never depends on which other records are
    loaded. Sets too small to fill both sides fall back to holding out the lowest-hash formulas.
    """

    def score(formula: str) -> float:
        digest = hashlib.sha256(f"{seed}:{formula}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    formulas = sorted({r.formula for r in records}, key=score)
    held_out = {f for f in formulas if score(f) < test_fraction}
    if not held_out or len(held_out) == len(formulas):
        held_out = set(formulas[: max(1, round(test_fraction * len(formulas)))])
    train = [r for r in records if r.formula not in held_out]
    test = [r for r in records if r.formula in held_out]
    if not train or not test:
        raise UserError(
            f"the composition split left an empty side ({len(train)} train, {len(test)} test); "
            "use more structures or change data.test_fraction"
        )
    return train, test


class VoxelDataset(Dataset):
    """Voxel samples voxelised on the fly, with random cube rotations when ``augment``.

    Items are dicts of tensors: ``density`` (g, g, g; 1/Angstrom^3), ``coords`` (3, g, g, g;
    Angstrom), ``species`` (g, g, g; Z), ``mask`` (g, g, g), ``labels`` and ``label_mask`` (P,).
    With ``representation="sites"``, ``density`` holds the site channels (4, g, g, g) of
    :func:`crystaloop.generative.representation.site_channels`, ``site_species`` (g, g, g) the
    species head's target (:func:`~crystaloop.generative.representation.site_species`), and there
    is no species or mask.
    """

    def __init__(
        self,
        records: Sequence[LabelledStructure],
        properties: Sequence[str],
        *,
        grid: int = 32,
        augment: bool = False,
        seed: int = 0,
        representation: str = "density",
    ) -> None:
        self.records = list(records)
        self.properties = list(properties)
        self.grid, self.augment, self.seed = grid, augment, seed
        self.representation = representation
        self._site_cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        from crystaloop.generative.representation import rotate90, voxelize

        record = self.records[index]
        if self.representation == "sites":
            return self._sites_item(record)
        voxels = voxelize(record.structure, grid=self.grid)
        if self.augment:
            voxels = rotate90(voxels, int(torch.randint(24, (1,)).item()))
        values, present = record.label_array(self.properties)
        return {
            "density": torch.from_numpy(np.ascontiguousarray(voxels.density, dtype=np.float32)),
            "coords": torch.from_numpy(np.ascontiguousarray(voxels.coords, dtype=np.float32)),
            "species": torch.from_numpy(voxels.species.astype(np.int64)),
            "mask": torch.from_numpy(voxels.mask.astype(np.float32)),
            "labels": torch.from_numpy(values),
            "label_mask": torch.from_numpy(present),
        }

    def _sites_item(self, record) -> dict[str, torch.Tensor]:
        from crystaloop.generative.representation import (
            _rotate_array,
            _rotated_lattice,
            coordinate_channels,
            cube_rotations,
            site_maps,
        )

        key = record.structure_id
        if key not in self._site_cache:  # site maps cost ~40 ms a crystal; rotating them, microseconds
            channels, species = site_maps(record.structure, grid=self.grid)
            self._site_cache[key] = (channels.astype(np.float16), species)
        channels, species = self._site_cache[key]
        lattice = record.structure.lattice
        if self.augment:
            # rotating the maps equals the maps of the rotated crystal (rotate90's identity)
            perm, signs = cube_rotations()[int(torch.randint(24, (1,)).item())]
            channels = _rotate_array(channels, perm, signs, leading=1)
            species = _rotate_array(species, perm, signs)
            lattice = _rotated_lattice(lattice, perm, signs)
        values, present = record.label_array(self.properties)
        return {
            "density": torch.from_numpy(channels.astype(np.float32)),
            "site_species": torch.from_numpy(species.astype(np.int64)),
            "coords": torch.from_numpy(coordinate_channels(lattice, self.grid)),
            "labels": torch.from_numpy(values),
            "label_mask": torch.from_numpy(present),
        }


def elements_of(records: Sequence[LabelledStructure]) -> list[int]:
    """Sorted atomic numbers present in ``records``."""
    return sorted({el.Z for r in records for el in r.structure.composition.elements})
