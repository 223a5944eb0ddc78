"""An ensemble of K CGCNNs: mean and standard deviation per property drive acquisition."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from crystaloop.generative.models.cgcnn import CGCNN, GraphBatch, apply_metallic_nan


class CGCNNEnsemble(nn.Module):
    """K CGCNNs with the same properties, trained on different seeds and bootstrap samples.

    Parameters
    ----------
    members
        The trained models.
    """

    kind = "cgcnn-ensemble"

    def __init__(self, members: Sequence[CGCNN]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        names = {tuple(m.properties) for m in members}
        if len(names) != 1:
            raise ValueError(f"ensemble members predict different properties: {sorted(names)}")
        self.members = nn.ModuleList(members)
        self.properties = list(members[0].properties)

    @torch.no_grad()
    def predict(self, batch: GraphBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation over members (n_crystals, n_properties), property units.

        The metallic NaN rule is applied to the mean from the mean band gap.
        """
        stack = torch.stack([m.eval().denormalize(m(batch)) for m in self.members])
        mean = stack.mean(dim=0)
        std = stack.std(dim=0, unbiased=False) if len(self.members) > 1 else torch.zeros_like(mean)
        mean = apply_metallic_nan(mean, self.properties)
        return mean, torch.where(torch.isnan(mean), torch.nan, std)


def bootstrap_indices(n: int, seed: int) -> np.ndarray:
    """``n`` indices drawn with replacement, reproducible from ``seed``."""
    return np.random.default_rng(seed).integers(0, n, size=n)
