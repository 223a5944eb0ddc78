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
        self.register_buffer("sigma_scale", torch.ones(len(self.properties)))

    def calibrate(self, mean: np.ndarray, std: np.ndarray, values: np.ndarray, present: np.ndarray) -> list[float]:
        """Fit one factor per property that scales the members' spread into a calibrated σ.

        A bootstrap ensemble of a few members under-disperses: its spread is smaller than its
        error. The factor is the 68.27 % quantile of ``|error| / spread`` on validation data (not
        the held-out split), so that one predicted σ covers 68 % of the errors, as for a Gaussian.
        ``mean`` and ``std`` are the ensemble's uncalibrated predictions, (N, P) like ``values``.
        """
        scales = []
        for i in range(len(self.properties)):
            ok = present[:, i].astype(bool) & np.isfinite(mean[:, i]) & (std[:, i] > 0)
            if ok.sum() < 10:
                scales.append(1.0)
                continue
            ratio = np.abs(mean[ok, i] - values[ok, i]) / std[ok, i]
            scales.append(float(np.quantile(ratio, 0.6827)))
        self.sigma_scale.copy_(torch.as_tensor(scales, dtype=torch.float32))
        return scales

    @torch.no_grad()
    def predict(self, batch: GraphBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation over members (n_crystals, n_properties), property units.

        The standard deviation is the members' spread times :attr:`sigma_scale` (see
        :meth:`calibrate`; 1 until calibrated).
        The metallic NaN rule is applied to the mean from the mean band gap.
        """
        stack = torch.stack([m.eval().denormalize(m(batch)) for m in self.members])
        mean = stack.mean(dim=0)
        std = stack.std(dim=0, unbiased=False) if len(self.members) > 1 else torch.zeros_like(mean)
        std = std * self.sigma_scale.to(std.device)
        mean = apply_metallic_nan(mean, self.properties)
        return mean, torch.where(torch.isnan(mean), torch.nan, std)


def bootstrap_indices(n: int, seed: int) -> np.ndarray:
    """``n`` indices drawn with replacement, reproducible from ``seed``."""
    return np.random.default_rng(seed).integers(0, n, size=n)
