"""Cond-DFC-VAE: a conditional deep-feature-consistent VAE on 4-channel voxel crystals.

Paper 002 (eq. 4-5): loss ``MSE + beta * KLD + alpha * sum_p MSE(phi_p(M), phi_p(M'))`` with
phi_p the hidden layers of a frozen UNet. Options: periodic padding, widths, a property head on
z trained jointly (FTCP, paper 004) and joint VAE + UNet training with weight gamma (paper 003).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from crystaloop.generative.models.condition import N_DECILES, DecileCondition
from crystaloop.generative.models.layers import ConvBlock, conv3d
from crystaloop.generative.models.unet import UNet3D, unet_loss


class VAEOutput(NamedTuple):
    """Reconstruction (B, C, g, g, g), posterior mean and log-variance, sample z, property head."""

    recon: torch.Tensor
    mu: torch.Tensor
    logvar: torch.Tensor
    z: torch.Tensor
    properties: torch.Tensor | None


class CondDFCVAE(nn.Module):
    """Conditional VAE with Conv3d-BN-LeakyReLU-MaxPool encoder and upsample+conv decoder.

    Parameters
    ----------
    grid
        Voxels per edge; must divide by ``2 ** len(widths)``.
    in_channels
        Input and output channels (density plus x, y, z coordinates).
    latent_dim
        Size of z.
    widths
        Encoder channels per block (the decoder mirrors them).
    circular
        Periodic padding in every convolution.
    properties
        Names of properties regressed from z (FTCP joint head); empty for none.
    condition
        Decile boundaries of the conditioning property (stored with the model).
    density_scale, coord_scale
        Divisors that bring density (1/Angstrom^3) and coordinates (Angstrom) to model units.
    """

    kind = "vae"

    def __init__(
        self,
        *,
        grid: int = 32,
        in_channels: int = 4,
        latent_dim: int = 256,
        widths: Sequence[int] = (32, 64, 128, 256),
        circular: bool = False,
        properties: Sequence[str] = (),
        property_hidden: int = 128,
        condition: DecileCondition | dict | None = None,
        density_scale: float = 1.0,
        coord_scale: float = 10.0,
        representation: str = "density",
    ) -> None:
        super().__init__()
        if representation not in REPRESENTATIONS:
            raise ValueError(f"representation must be one of {REPRESENTATIONS}; got {representation!r}")
        if representation == "sites":
            in_channels = SITE_CHANNELS + 3
        widths = list(widths)
        if grid % 2 ** len(widths):
            raise ValueError(f"grid {grid} must divide by 2**{len(widths)} (one pool per width)")
        if isinstance(condition, dict):
            condition = DecileCondition.from_dict(condition)
        self.condition = condition or DecileCondition()
        self.properties = list(properties)
        self.hparams = {
            "grid": grid,
            "in_channels": in_channels,
            "latent_dim": latent_dim,
            "widths": widths,
            "circular": circular,
            "properties": self.properties,
            "property_hidden": property_hidden,
            "condition": self.condition.to_dict(),
            "density_scale": density_scale,
            "coord_scale": coord_scale,
            "representation": representation,
        }
        self.representation = representation
        self.density_scale, self.coord_scale = density_scale, coord_scale
        self.register_buffer("property_mean", torch.zeros(len(self.properties)))
        self.register_buffer("property_std", torch.ones(len(self.properties)))
        self.grid, self.in_channels, self.latent_dim = grid, in_channels, latent_dim
        self.bottom = grid // 2 ** len(widths)
        flat = widths[-1] * self.bottom**3

        encoder: list[nn.Module] = []
        previous = in_channels + N_DECILES
        for width in widths:
            encoder += [ConvBlock(previous, width, circular=circular), nn.MaxPool3d(2)]
            previous = width
        self.encoder = nn.Sequential(*encoder, nn.Flatten())
        self.to_mu = nn.Linear(flat, latent_dim)
        self.to_logvar = nn.Linear(flat, latent_dim)

        self.from_latent = nn.Linear(latent_dim + N_DECILES, flat)
        decoder: list[nn.Module] = []
        previous = widths[-1]
        for width in reversed(widths):
            decoder += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                ConvBlock(previous, width, circular=circular),
            ]
            previous = width
        decoder.append(conv3d(widths[0], in_channels, circular=circular))
        self.decoder = nn.Sequential(*decoder)
        self._widths = widths

        self.property_head = (
            nn.Sequential(
                nn.Linear(latent_dim, property_hidden),
                nn.LeakyReLU(0.2),
                nn.Linear(property_hidden, len(self.properties)),
            )
            if self.properties
            else None
        )

    def to_input(self, density: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """Model input (B, in_channels, g, g, g) from the voxel channels and coordinates (B, 3, g, g, g).

        ``density`` is eq. 1's (B, g, g, g) map, or for ``representation="sites"`` the site
        channels (B, 4, g, g, g) of :func:`crystaloop.generative.representation.site_channels`.
        """
        channels = density if density.ndim == 5 else density[:, None]
        return torch.cat([channels / self.density_scale, coords / self.coord_scale], dim=1)

    def split_output(self, recon: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Voxel channels and coordinates (B, 3, g, g, g; Angstrom) of a decoded batch.

        The first is the density (B, g, g, g; 1/Angstrom^3), or the site channels (B, 4, g, g, g).
        """
        n = self.in_channels - 3
        channels = recon[:, :n] * self.density_scale
        return (channels[:, 0] if n == 1 else channels), recon[:, n : n + 3] * self.coord_scale

    def encode(self, x: torch.Tensor, condition: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and log-variance; ``condition`` (B, 10) is broadcast as channels."""
        g = x.shape[-1]
        planes = condition[:, :, None, None, None].expand(-1, -1, g, g, g).to(x.dtype)
        h = self.encoder(torch.cat([x, planes], dim=1))
        return self.to_mu(h), self.to_logvar(h).clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """Voxel maps (B, in_channels, g, g, g) from z and the (B, 10) condition."""
        h = self.from_latent(torch.cat([z, condition.to(z.dtype)], dim=1))
        h = h.view(-1, self._widths[-1], self.bottom, self.bottom, self.bottom)
        return self.decoder(h)

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> VAEOutput:
        """Encode, sample z with the reparameterisation trick (mean in eval mode), decode."""
        mu, logvar = self.encode(x, condition)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        properties = self.property_head(z) if self.property_head is not None else None
        return VAEOutput(self.decode(z, condition), mu, logvar, z, properties)

    @torch.no_grad()
    def sample(
        self,
        condition: torch.Tensor,
        n: int,
        *,
        mean: torch.Tensor | None = None,
        std: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Decode ``n`` draws of z ~ N(mean, std^2) under one (10,) condition."""
        device = next(self.parameters()).device
        z = torch.randn(n, self.latent_dim, generator=generator).to(device) * std
        if mean is not None:
            z = z + mean.to(device)
        return self.decode(z, condition.to(device).expand(n, -1))


REPRESENTATIONS = ("density", "sites")
"""Voxel inputs: eq. 1's density (the paper) or site-centre heatmap plus element descriptors."""

SITE_CHANNELS = 4
"""Heatmap plus the three descriptors of ``representation.DESCRIPTORS``; a constant here so that
the model imports without pymatgen (the GPU trainer has only torch and numpy)."""


@dataclass
class VAELossWeights:
    """Weights of the loss terms (paper 002 Table 6: alpha 1.0, beta 0.0005; paper 003: gamma 0.1)."""

    alpha: float = 1.0
    beta: float = 0.0005
    gamma: float = 0.1
    property_weight: float = 1.0


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(q(z|M) || N(0, 1)), summed over latent dimensions and averaged over the batch."""
    return (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(dim=1)).mean()


def perceptual_loss(
    unet: UNet3D,
    target: torch.Tensor,
    recon: torch.Tensor,
    density_scale: float = 1.0,
    spacing: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum over UNet hidden layers of MSE(phi_p(M), phi_p(M')) on the density channel.

    ``density_scale`` turns the VAE's density channel back into the UNet's units; ``spacing``
    (B, 3) are the true voxel edge lengths, for a UNet that takes them.
    """
    with torch.no_grad():
        reference = unet.features(target[:, :1] * density_scale, spacing)
    return sum(
        F.mse_loss(mine.float(), ref.float())
        for mine, ref in zip(unet.features(recon[:, :1] * density_scale, spacing), reference, strict=True)
    )


def vae_loss(
    output: VAEOutput,
    target: torch.Tensor,
    weights: VAELossWeights,
    *,
    perceptual: UNet3D | None = None,
    property_targets: torch.Tensor | None = None,
    property_mask: torch.Tensor | None = None,
    segmenter: UNet3D | None = None,
    species_classes: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    class_weights: torch.Tensor | None = None,
    density_scale: float = 1.0,
    spacing: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The Cond-DFC-VAE loss and its parts.

    Parameters
    ----------
    output, target
        Model output and the input voxels (B, C, g, g, g).
    weights
        alpha (perceptual), beta (KLD), gamma (joint segmentation), property weight.
    perceptual
        A frozen UNet whose hidden features give the perceptual term; None drops the term.
    property_targets, property_mask
        (B, P) normalised targets and a 0/1 mask of present labels, for the property head.
    segmenter, species_classes, mask, class_weights
        For joint VAE + UNet training: the trainable UNet and its targets (paper 003).
    density_scale
        Factor from the VAE's density channel to the UNet's density units.
    spacing
        True voxel edge lengths (B, 3; Angstrom) for UNets that take them.
    """
    mse = F.mse_loss(output.recon.float(), target.float())
    kld = kl_divergence(output.mu.float(), output.logvar.float())
    loss = mse + weights.beta * kld
    parts = {"mse": float(mse.detach()), "kld": float(kld.detach())}
    if perceptual is not None and weights.alpha:
        term = perceptual_loss(perceptual, target, output.recon, density_scale, spacing)
        loss = loss + weights.alpha * term
        parts["perceptual"] = float(term.detach())
    if output.properties is not None and property_targets is not None:
        present = property_mask if property_mask is not None else torch.ones_like(property_targets)
        diff = (output.properties.float() - torch.nan_to_num(property_targets.float())) ** 2
        term = (diff * present).sum() / present.sum().clamp_min(1.0)
        loss = loss + weights.property_weight * term
        parts["property"] = float(term.detach())
    if segmenter is not None and species_classes is not None and mask is not None:
        seg_input = output.recon[:, :1] * density_scale
        seg, _ = unet_loss(segmenter(seg_input, spacing), species_classes, mask, class_weights)
        loss = loss + weights.gamma * seg
        parts["segmentation"] = float(seg.detach())
    parts["loss"] = float(loss.detach())
    return loss, parts


def optimize_latent(
    vae: CondDFCVAE,
    z: torch.Tensor,
    property_name: str,
    window: tuple[float, float],
    *,
    steps: int = 100,
    lr: float = 0.05,
    prior_weight: float = 0.01,
) -> torch.Tensor:
    """Move latent vectors so the property head predicts values inside ``window`` (FTCP-style).

    Minimises the squared distance of the (de-normalised) prediction to the window plus
    ``prior_weight * |z|^2`` to stay near the prior. Needs a model trained with a property head.

    Raises
    ------
    ValueError
        If ``property_name`` is not one of the head's properties.
    """
    if property_name not in vae.properties:
        raise ValueError(f"{property_name!r} is not predicted by this VAE's head ({vae.properties})")
    index = vae.properties.index(property_name)
    lower, upper = window
    z = z.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([z], lr=lr)
    was_training = vae.training
    vae.eval()
    for _ in range(steps):
        value = vae.property_head(z)[:, index] * vae.property_std[index] + vae.property_mean[index]
        outside = F.relu(lower - value) + F.relu(value - upper)
        loss = (outside**2).mean() + prior_weight * z.pow(2).sum(dim=1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    vae.train(was_training)
    return z.detach()
