"""Xie-Grossman crystal-graph features: one-hot element descriptors and Gaussian distances.

The element table is built once from pymatgen's element data (no hand-typed numbers): each
descriptor is one-hot encoded in fixed bins, as in Xie & Grossman's CGCNN; a missing value
leaves its block all zero.
"""

from __future__ import annotations

import warnings
from functools import lru_cache

import numpy as np
import torch

MAX_Z = 94
"""Elements 1..94 (H..Pu) have rows in the table."""

AVOGADRO = 6.02214076e23

# (name, bin edges or categories); continuous descriptors use 10 bins over the given range.
_CONTINUOUS: dict[str, tuple[float, float]] = {
    "electronegativity": (0.5, 4.0),
    "covalent_radius": (0.25, 2.5),  # Angstrom
    "first_ionization_energy": (3.0, 25.0),  # eV
    "electron_affinity": (-3.0, 3.7),  # eV
    "atomic_volume": (1.5, 4.3),  # log(Angstrom^3 per atom)
}
_N_BINS = 10
_BLOCKS = ("s", "p", "d", "f")
ATOM_FEATURES = 18 + 7 + 2 * _N_BINS + 12 + 2 * _N_BINS + len(_BLOCKS) + _N_BINS


def _valence_electrons(group: int, block: str) -> int:
    if block == "f":
        return 3
    if block == "d" or group <= 2:
        return group
    return group - 10


def _descriptors(z: int) -> dict[str, float | int | str | None]:
    from pymatgen.analysis.molecule_structure_comparator import CovalentRadius
    from pymatgen.core import Element

    element = Element.from_Z(z)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x = element.X
        energies = element.ionization_energies
        volume = element.molar_volume
        try:
            affinity = float(element.electron_affinity)
        except (TypeError, ValueError, KeyError):
            affinity = None
    group, block = int(element.group), str(element.block)
    return {
        "group": group,
        "period": int(element.row),
        "electronegativity": None if x is None or np.isnan(x) else float(x),
        "covalent_radius": CovalentRadius.radius.get(element.symbol),
        "valence_electrons": _valence_electrons(group, block),
        "first_ionization_energy": float(energies[0]) if energies and energies[0] else None,
        "electron_affinity": affinity,
        "block": block,
        "atomic_volume": float(np.log(float(volume) * 1e24 / AVOGADRO)) if volume else None,
    }


def _one_hot(value, n: int, index) -> np.ndarray:
    out = np.zeros(n, dtype=np.float32)
    if value is not None:
        out[min(max(index(value), 0), n - 1)] = 1.0
    return out


@lru_cache(maxsize=1)
def atom_feature_table() -> np.ndarray:
    """(MAX_Z + 1, F) float32 table: row Z holds the one-hot features of element Z (row 0 zero).

    Blocks: group (18), period (7), electronegativity (10), covalent radius (10), valence
    electrons (12), first ionisation energy (10), electron affinity (10), block (4), atomic
    volume (10); F = 91.
    """
    rows = [np.zeros(ATOM_FEATURES, dtype=np.float32)]
    for z in range(1, MAX_Z + 1):
        d = _descriptors(z)
        blocks = [
            _one_hot(d["group"], 18, lambda g: g - 1),
            _one_hot(d["period"], 7, lambda p: p - 1),
        ]
        for name in ("electronegativity", "covalent_radius"):
            blocks.append(_continuous(name, d[name]))
        blocks.append(_one_hot(d["valence_electrons"], 12, lambda v: v - 1))
        for name in ("first_ionization_energy", "electron_affinity"):
            blocks.append(_continuous(name, d[name]))
        blocks.append(_one_hot(d["block"], 4, _BLOCKS.index))
        blocks.append(_continuous("atomic_volume", d["atomic_volume"]))
        rows.append(np.concatenate(blocks))
    return np.stack(rows)


def _continuous(name: str, value) -> np.ndarray:
    low, high = _CONTINUOUS[name]
    return _one_hot(value, _N_BINS, lambda v: int((v - low) / (high - low) * _N_BINS))


class GaussianDistance:
    """Expand distances (Angstrom) on Gaussians centred every ``step`` from 0 to ``cutoff``.

    Parameters
    ----------
    cutoff
        Largest centre, Angstrom (8 A as in the paper).
    step
        Spacing and width of the Gaussians, Angstrom.
    """

    def __init__(self, cutoff: float = 8.0, step: float = 0.2) -> None:
        self.centers = torch.arange(0.0, cutoff + step / 2, step)
        self.width = step

    @property
    def size(self) -> int:
        """Number of edge features."""
        return int(self.centers.numel())

    def __call__(self, distances: torch.Tensor) -> torch.Tensor:
        """(E,) distances -> (E, size) features."""
        centers = self.centers.to(distances.device, distances.dtype)
        return torch.exp(-((distances[:, None] - centers) ** 2) / self.width**2)
