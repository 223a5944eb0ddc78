"""Decile conditioning: a 10-dim one-hot of the decile of a property (paper 002, Methods)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from crystaloop.properties import property_spec

N_DECILES = 10


@dataclass
class DecileCondition:
    """Decile boundaries of one property, fitted on the training labels and stored with the model.

    Attributes
    ----------
    property_name
        A name from :mod:`crystaloop.properties` (default formation energy per atom, eV/atom).
    boundaries
        The nine inner decile edges, in the property's unit.
    """

    property_name: str = "formation_energy_per_atom"
    boundaries: list[float] = field(default_factory=lambda: [float(i) for i in range(1, 10)])

    def __post_init__(self) -> None:
        property_spec(self.property_name)
        if len(self.boundaries) != N_DECILES - 1:
            raise ValueError(f"need {N_DECILES - 1} decile boundaries, got {len(self.boundaries)}")

    @classmethod
    def fit(cls, values, property_name: str = "formation_energy_per_atom") -> DecileCondition:
        """Boundaries from the finite values of ``values`` (raises ``ValueError`` if none)."""
        array = np.asarray(values, dtype=float)
        array = array[np.isfinite(array)]
        if array.size == 0:
            raise ValueError(f"no finite {property_name} values to fit deciles on")
        edges = np.quantile(array, np.linspace(0.1, 0.9, N_DECILES - 1))
        return cls(property_name, [float(e) for e in edges])

    def index(self, values) -> np.ndarray:
        """Decile index 0..9 for each value."""
        return np.searchsorted(np.asarray(self.boundaries), np.asarray(values, dtype=float), "right")

    def one_hot(self, values) -> torch.Tensor:
        """(N, 10) float one-hot of the deciles of ``values``."""
        idx = torch.as_tensor(self.index(np.atleast_1d(values)), dtype=torch.long)
        return torch.nn.functional.one_hot(idx, N_DECILES).float()

    def for_window(self, lower: float, upper: float) -> torch.Tensor:
        """The (10,) condition for a target window: the decile holding the window's midpoint."""
        if upper < lower:
            raise ValueError(f"window upper bound {upper} is below lower bound {lower}")
        return self.one_hot([(lower + upper) / 2.0])[0]

    def deciles_in_window(self, lower: float, upper: float) -> list[int]:
        """All decile indices that overlap ``[lower, upper]``."""
        return list(range(int(self.index([lower])[0]), int(self.index([upper])[0]) + 1))

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {"property_name": self.property_name, "boundaries": list(self.boundaries)}

    @classmethod
    def from_dict(cls, data: dict) -> DecileCondition:
        """Inverse of :meth:`to_dict`."""
        return cls(data["property_name"], [float(b) for b in data["boundaries"]])
