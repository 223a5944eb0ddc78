"""3-D UNet that segments a density map into species and a binary site mask (paper 002, eq. 6-7)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from crystaloop.generative.models.layers import ConvBlock, conv3d


class UNetOutput(NamedTuple):
    """Logits of the two heads: species (B, C, g, g, g) and mask (B, 1, g, g, g)."""

    species_logits: torch.Tensor
    mask_logits: torch.Tensor


class SpeciesVocabulary:
    """Map atomic numbers to class indices; class 0 is the background (Z = 0).

    Parameters
    ----------
    atomic_numbers
        The elements present in the training data (background excluded).
    """

    def __init__(self, atomic_numbers: Sequence[int]) -> None:
        zs = sorted({int(z) for z in atomic_numbers if int(z) > 0})
        self.atomic_numbers: list[int] = [0, *zs]
        lookup = np.zeros(max(self.atomic_numbers) + 1, dtype=np.int64)
        lookup[self.atomic_numbers] = np.arange(len(self.atomic_numbers))
        self._lookup = lookup

    def __len__(self) -> int:
        return len(self.atomic_numbers)

    def encode(self, species: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Class indices for an array of Z values; unknown Z raise ``ValueError``."""
        z = torch.as_tensor(species).long()
        allowed = torch.as_tensor(self.atomic_numbers, device=z.device)
        if z.numel() and not bool(torch.isin(z, allowed).all()):
            missing = sorted(set(torch.unique(z).tolist()) - set(self.atomic_numbers))
            raise ValueError(f"atomic numbers {missing} are not in the UNet's vocabulary")
        return torch.as_tensor(self._lookup, device=z.device)[z]

    def decode(self, classes: torch.Tensor) -> torch.Tensor:
        """Atomic numbers for class indices."""
        table = torch.as_tensor(self.atomic_numbers, device=classes.device)
        return table[classes.long()]


INPUT_TRANSFORMS = {
    "none": lambda x: x,
    "log1p": lambda x: torch.log1p(x.clamp_min(0.0)),
}
"""Density transforms applied before the first convolution."""


class UNet3D(nn.Module):
    """A 3-D UNet with a species head and a mask head.

    Parameters
    ----------
    atomic_numbers
        Elements in the training data; the species head has ``len + 1`` classes (background 0).
    in_channels
        Input channels (1: the density map).
    widths
        Channels per level; ``len(widths) - 1`` poolings, so the grid must divide by
        ``2 ** (len(widths) - 1)``.
    circular
        Periodic padding in every convolution.
    input_transform
        ``"log1p"`` (default) feeds ``log(1 + max(M, 0))`` to the network: eq. 1 peaks span about
        0.3 (large anions) to 100 Angstrom^-3 (small cations), and on that compressed scale a peak's
        height and width, which identify the species, are both visible to the first layer.
        ``"none"`` feeds the raw density.
    spacing
        Also feed the voxel edge lengths (Angstrom, one constant channel per axis). The grid spans
        one cell, so a voxel is 0.1-0.5 Angstrom depending on the cell; without the spacing a peak's
        width is only known in voxels, and peak heights alone do not separate the species (most
        neighbouring elements in ``Z / r^3`` differ by under 5 %). Callers then pass ``spacing``
        (B, 3), e.g. from :func:`voxel_spacing`.
    """

    kind = "unet"

    def __init__(
        self,
        atomic_numbers: Sequence[int],
        *,
        in_channels: int = 1,
        widths: Sequence[int] = (16, 32, 64),
        circular: bool = False,
        input_transform: str = "log1p",
        spacing: bool = False,
    ) -> None:
        super().__init__()
        if input_transform not in INPUT_TRANSFORMS:
            raise ValueError(f"input_transform must be one of {sorted(INPUT_TRANSFORMS)}; got {input_transform!r}")
        self.vocabulary = SpeciesVocabulary(atomic_numbers)
        self.input_transform = input_transform
        self.spacing = spacing
        self.hparams = {
            "atomic_numbers": self.vocabulary.atomic_numbers[1:],
            "in_channels": in_channels,
            "widths": list(widths),
            "circular": circular,
            "input_transform": input_transform,
            "spacing": spacing,
        }
        widths = list(widths)
        self.down = nn.ModuleList()
        previous = in_channels + (3 if spacing else 0)
        for width in widths:
            self.down.append(
                nn.Sequential(
                    ConvBlock(previous, width, circular=circular),
                    ConvBlock(width, width, circular=circular),
                )
            )
            previous = width
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for deep, shallow in zip(reversed(widths[1:]), reversed(widths[:-1]), strict=True):
            self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), conv3d(deep, shallow)))
            self.merge.append(
                nn.Sequential(
                    ConvBlock(2 * shallow, shallow, circular=circular),
                    ConvBlock(shallow, shallow, circular=circular),
                )
            )
        self.species_head = nn.Conv3d(widths[0], len(self.vocabulary), 1)
        self.mask_head = nn.Conv3d(widths[0], 1, 1)

    @property
    def n_classes(self) -> int:
        """Species classes including background."""
        return len(self.vocabulary)

    def _encode(self, x: torch.Tensor, spacing: torch.Tensor | None) -> list[torch.Tensor]:
        x = INPUT_TRANSFORMS[self.input_transform](x)
        if self.spacing:
            if spacing is None:
                raise ValueError("this UNet was trained with voxel spacings; pass spacing=(B, 3) in Angstrom")
            planes = spacing.to(x.dtype)[:, :, None, None, None].expand(-1, -1, *x.shape[2:])
            x = torch.cat([x, planes], dim=1)
        skips = []
        for level, block in enumerate(self.down):
            if level:
                x = F.max_pool3d(x, 2)
            x = block(x)
            skips.append(x)
        return skips

    def features(self, x: torch.Tensor, spacing: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Hidden feature maps phi_p (every level, encoder and decoder) for the perceptual loss."""
        skips = self._encode(x, spacing)
        hidden = list(skips)
        x = skips[-1]
        for up, merge, skip in zip(self.up, self.merge, reversed(skips[:-1]), strict=True):
            x = merge(torch.cat([up(x), skip], dim=1))
            hidden.append(x)
        return hidden

    def forward(self, x: torch.Tensor, spacing: torch.Tensor | None = None) -> UNetOutput:
        """Species and mask logits for density maps ``x`` of shape (B, in_channels, g, g, g).

        ``spacing`` (B, 3) holds the voxel edge lengths in Angstrom; needed when the UNet was
        built with ``spacing=True``.
        """
        last = self.features(x, spacing)[-1]
        return UNetOutput(self.species_head(last), self.mask_head(last))

    @torch.no_grad()
    def predict(
        self, x: torch.Tensor, spacing: torch.Tensor | None = None, threshold: float = 0.5
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Species head and mask head read out per voxel: (B, g, g, g) each.

        The first is the atomic number of the best non-background class everywhere (the species
        head is trained on site voxels only: background has weight 0); the second is the mask.
        """
        out = self(x, spacing)
        best = self.vocabulary.decode(out.species_logits[:, 1:].argmax(dim=1) + 1)
        return best, torch.sigmoid(out.mask_logits[:, 0]) > threshold

    @torch.no_grad()
    def predict_species(
        self, x: torch.Tensor, spacing: torch.Tensor | None = None, threshold: float = 0.5
    ) -> torch.Tensor:
        """Atomic numbers per voxel (B, g, g, g): the best non-background class inside the mask."""
        best, inside = self.predict(x, spacing, threshold)
        return torch.where(inside, best, torch.zeros_like(best))


def voxel_spacing(coords: torch.Tensor) -> torch.Tensor:
    """Voxel edge lengths (B, 3) from coordinate channels (B, 3, g, g, g), in their units.

    The step between neighbouring voxel centres along each grid axis, taken as the median over
    the grid so that a periodic roll (a training crop) or a noisy decoded map does not bias it.
    """
    steps = []
    for axis in (2, 3, 4):
        step = torch.linalg.vector_norm(torch.diff(coords.float(), dim=axis), dim=1)
        steps.append(step.flatten(1).median(dim=1).values)
    return torch.stack(steps, dim=1)


def class_weights(class_counts: Sequence[float] | np.ndarray) -> torch.Tensor:
    """Inverse-frequency class weights with the background (class 0) weight set to 0.

    The weights of the present classes are scaled to average 1; absent classes get 0.
    """
    counts = torch.as_tensor(np.asarray(class_counts, dtype=np.float64), dtype=torch.float32)
    weights = torch.where(counts > 0, 1.0 / counts.clamp_min(1.0), torch.zeros_like(counts))
    weights[0] = 0.0
    present = weights > 0
    if present.any():
        weights = weights / weights[present].mean()
    return weights


def unet_loss(
    output: UNetOutput,
    species_classes: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Class-weighted cross-entropy plus mask BCE (paper 002, eq. 7).

    Parameters
    ----------
    output
        The UNet's logits.
    species_classes
        Target class indices (B, g, g, g).
    mask
        Target binary mask (B, g, g, g).
    weights
        Per-class weights from :func:`class_weights` (background 0).

    Returns
    -------
    The scalar loss and its parts as floats.
    """
    log_p = F.log_softmax(output.species_logits.float(), dim=1)
    nll = -log_p.gather(1, species_classes.long().unsqueeze(1)).squeeze(1)
    voxel_weight = weights.to(nll.device)[species_classes.long()]
    ce = (voxel_weight * nll).sum() / voxel_weight.sum().clamp_min(1e-8)
    bce = F.binary_cross_entropy_with_logits(output.mask_logits[:, 0].float(), mask.float())
    loss = ce + bce
    return loss, {"ce": float(ce.detach()), "bce": float(bce.detach())}
