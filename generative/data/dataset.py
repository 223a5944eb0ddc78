"""Training records, the composition split and its record, and the on-the-fly voxel Dataset.

The torch ``Dataset`` that voxelises on the fly (M, S, S_B, C plus labels and
random cube rotations) is :class:`crystaloop.generative.train.data.VoxelDataset`;
the composition split is :func:`crystaloop.generative.train.data.composition_split`.
This module feeds them from the shipped prior file (no database needed) and
records each split with the dataset hash, so rotations of one structure, and
all structures of one composition, stay on one side.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from crystaloop.generative.data.prior import SHIPPED_PATH, read_prior
from crystaloop.generative.data.prototypes import Prototype
from crystaloop.generative.train.data import (
    LabelledStructure,
    VoxelDataset,
    composition_split,
    dataset_hash,
)

__all__ = ["SplitRecord", "VoxelDataset", "prior_records", "split_records"]


def prior_records(path: Path = SHIPPED_PATH, *, limit: int | None = None) -> list[LabelledStructure]:
    """Converged, non-rejected structures of a shipped prior file, sorted by id (the first ``limit``).

    Raises
    ------
    ValueError
        If ``limit`` is below 1.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    doc = read_prior(path)
    out = []
    for rec in doc["records"]:
        if rec.get("reject_reason") or not rec.get("converged"):
            continue
        proto = Prototype(rec["prototype"], tuple(rec["species"]))
        structure = proto.conventional(rec["a0"])
        out.append(
            LabelledStructure(rec["structure_id"], structure, dict(rec["labels"]), proto.material_class)
        )
        if limit is not None and len(out) >= limit:
            break
    return out


class SplitRecord(BaseModel):
    """A composition split, reproducible from the dataset hash, seed and fraction."""

    model_config = ConfigDict(extra="forbid")

    dataset_hash: str
    seed: int
    test_fraction: float
    n_train: int
    n_test: int
    n_train_formulas: int
    n_test_formulas: int
    test_formulas_hash: str

    def write(self, path: Path) -> Path:
        """Write as JSON to ``path``."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.model_dump_json(indent=1) + "\n")
        return path


def split_records(
    records: Sequence[LabelledStructure], *, seed: int = 0, test_fraction: float = 0.2
) -> tuple[list[LabelledStructure], list[LabelledStructure], SplitRecord]:
    """Split by reduced formula (about ``test_fraction`` of formulas held out), with its record."""
    train, test = composition_split(records, test_fraction, seed)
    test_formulas = sorted({r.formula for r in test})
    record = SplitRecord(
        dataset_hash=dataset_hash(records),
        seed=seed,
        test_fraction=test_fraction,
        n_train=len(train),
        n_test=len(test),
        n_train_formulas=len({r.formula for r in train}),
        n_test_formulas=len(test_formulas),
        test_formulas_hash=hashlib.sha256(json.dumps(test_formulas).encode()).hexdigest()[:16],
    )
    return train, test, record
