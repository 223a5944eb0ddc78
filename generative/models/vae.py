"""Cond-DFC-VAE: a conditional deep-feature-consistent VAE on 4-channel voxel crystals.

Paper 002 (eq. 4-5): loss ``MSE + beta * KLD + alpha * sum_p MSE(phi_p(M), phi_p(M'))`` with
phi_p the hidden layers of a frozen UNet. Options: periodic padding, widths, a property head on
z trained jointly (FTCP, paper 004) and joint VAE + UNet training with weight gamma (paper 003).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from crystaloop.generative.models.condition import N_DECILES, DecileCondition
from crystaloop.generative.models.layers import ConvBlock, conv3d
from crystaloop.generative.models.unet import UNet3D, unet_loss


class VAEOutput(NamedTuple):
    """Reconstruction (B, C, g, g, g), posterior mean and log-variance, sample z, property head,
    and the species head's per-voxel element logits (B, K, g, g, g) when the model has one."""

    recon: torch.Tensor
    mu: torch.Tensor
    logvar: torch.Tensor
    z: torch.Tensor
    properties: torch.Tensor | None
    species_logits: torch.Tensor | None = None


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
    species
        Atomic numbers of a species head (``representation="sites"`` only): the decoder's last
        convolution also gives one logit per element and voxel, trained with cross-entropy at the
        voxels within :data:`~crystaloop.generative.representation.SPECIES_RADIUS_ANGSTROM` of a
        site. Empty: no head (species from the descriptor channels).
    prior_components
        Size of the fitted latent prior (a Gaussian mixture over the training posterior means,
        :meth:`fit_latent_prior`); 0 for none, where random samples draw z ~ N(0, I).
    lattice_head_hidden
        Hidden width of a lattice head (:class:`LatticeHead`: (z, condition) to the six lattice
        parameters, trained after the VAE by ``crystaloop train lattice-head``); 0 for none, where
        the lattice is fitted to the decoded coordinate channels.
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
        species: Sequence[int] = (),
        prior_components: int = 0,
        lattice_head_hidden: int = 0,
    ) -> None:
        super().__init__()
        if representation not in REPRESENTATIONS:
            raise ValueError(f"representation must be one of {REPRESENTATIONS}; got {representation!r}")
        if representation == "sites":
            in_channels = SITE_CHANNELS + 3
        species = [int(z) for z in species]
        if species and representation != "sites":
            raise ValueError("a species head needs representation='sites'")
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
            "species": species,
            "prior_components": int(prior_components),
            "lattice_head_hidden": int(lattice_head_hidden),
        }
        self.representation = representation
        self.species = species
        self._register_prior(int(prior_components), latent_dim)
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
        decoder.append(conv3d(widths[0], in_channels + len(species), circular=circular))
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
        self.lattice_head = LatticeHead(latent_dim, lattice_head_hidden) if lattice_head_hidden else None

    # --- lattice head -----------------------------------------------------------------------------

    @property
    def has_lattice_head(self) -> bool:
        """Whether a lattice head is stored (see :class:`LatticeHead`)."""
        return self.lattice_head is not None

    def attach_lattice_head(self, head: LatticeHead) -> None:
        """Store ``head`` (trained on this VAE's latent space) in the model and its hparams."""
        if head.latent_dim != self.latent_dim:
            raise ValueError(
                f"the head reads {head.latent_dim} latent dimensions, this VAE {self.latent_dim}"
            )
        self.lattice_head = head.to(next(self.parameters()).device)
        self.hparams["lattice_head_hidden"] = head.hidden

    def lattice_parameters(self, z: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """The lattice head's (B, 6) a, b, c (Angstrom) and alpha, beta, gamma (degrees).

        Raises
        ------
        ValueError
            If the model has no lattice head.
        """
        if self.lattice_head is None:
            raise ValueError("this VAE has no lattice head; train one with `crystaloop train lattice-head`")
        return self.lattice_head.parameters_of(z, condition)

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
        """Voxel maps (B, in_channels + len(species), g, g, g) from z and the (B, 10) condition.

        The first ``in_channels`` are the reconstruction (:meth:`split_output`), the rest the
        species head's logits (:meth:`species_logits`).
        """
        h = self.from_latent(torch.cat([z, condition.to(z.dtype)], dim=1))
        h = h.view(-1, self._widths[-1], self.bottom, self.bottom, self.bottom)
        return self.decoder(h)

    def species_logits(self, decoded: torch.Tensor) -> torch.Tensor | None:
        """The species head's logits (B, K, g, g, g) of a :meth:`decode` output; None without a head."""
        return decoded[:, self.in_channels :] if self.species else None

    def species_classes(self, species: torch.Tensor) -> torch.Tensor:
        """Class indices of a per-voxel atomic-number map (B, g, g, g); -100 (ignored) off sites."""
        lookup = torch.full((max(self.species) + 1,), -100, dtype=torch.long, device=species.device)
        lookup[torch.as_tensor(self.species, device=species.device)] = torch.arange(
            len(self.species), device=species.device
        )
        z = species.long().clamp(min=0)
        inside = z < len(lookup)
        return torch.where(inside, lookup[z.clamp(max=len(lookup) - 1)], torch.full_like(z, -100))

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> VAEOutput:
        """Encode, sample z with the reparameterisation trick (mean in eval mode), decode."""
        mu, logvar = self.encode(x, condition)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        properties = self.property_head(z) if self.property_head is not None else None
        decoded = self.decode(z, condition)
        return VAEOutput(
            decoded[:, : self.in_channels], mu, logvar, z, properties, self.species_logits(decoded)
        )

    # --- latent prior ---------------------------------------------------------------------------

    def _register_prior(self, k: int, d: int) -> None:
        self.register_buffer("prior_weights", torch.full((k,), 1.0 / max(k, 1)))
        self.register_buffer("prior_means", torch.zeros(k, d))
        self.register_buffer("prior_scale_tril", torch.eye(d).expand(k, d, d).clone())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written before the latent prior existed hold no prior buffers
        for name in ("prior_weights", "prior_means", "prior_scale_tril"):
            state_dict.setdefault(prefix + name, getattr(self, name))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def has_latent_prior(self) -> bool:
        """Whether a fitted latent prior is stored (see :meth:`fit_latent_prior`)."""
        return self.hparams["prior_components"] > 0

    def set_latent_prior(self, weights: torch.Tensor, means: torch.Tensor, scale_tril: torch.Tensor) -> None:
        """Store a Gaussian mixture prior: weights (k,), means (k, d), Cholesky factors (k, d, d)."""
        k = int(weights.shape[0])
        if means.shape != (k, self.latent_dim) or scale_tril.shape != (k, self.latent_dim, self.latent_dim):
            raise ValueError(
                f"a {k}-component prior over {self.latent_dim} latent dimensions has the wrong shapes"
            )
        device = self.prior_weights.device
        self.prior_weights = (weights / weights.sum()).float().to(device)
        self.prior_means = means.float().to(device)
        self.prior_scale_tril = scale_tril.float().to(device)
        self.hparams["prior_components"] = k

    def fit_latent_prior(self, mu: torch.Tensor, components: int = 16, *, seed: int = 0) -> None:
        """Fit and store a Gaussian mixture over training posterior means ``mu`` (n, d).

        Ex-post density estimation: random samples then come from where the encoder put the
        training crystals, not from N(0, I), which a VAE with a light KL term leaves partly empty.
        """
        weights, means, scale_tril = fit_gaussian_mixture(mu, components, seed=seed)
        self.set_latent_prior(weights, means, scale_tril)

    def sample_latent(
        self, n: int, *, prior: str = "auto", generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``n`` latent vectors (n, latent_dim) on the CPU from the fitted prior or N(0, I).

        ``prior``: ``"fitted"`` (the stored mixture; ValueError without one), ``"normal"``
        (N(0, I)) or ``"auto"`` (the mixture when stored, else N(0, I)).
        """
        if prior not in ("auto", "fitted", "normal"):
            raise ValueError(f"prior must be 'auto', 'fitted' or 'normal'; got {prior!r}")
        if prior == "fitted" and not self.has_latent_prior:
            raise ValueError("this VAE stores no fitted latent prior; use prior='normal'")
        noise = torch.randn(n, self.latent_dim, generator=generator)
        if prior == "normal" or not self.has_latent_prior:
            return noise
        weights = self.prior_weights.cpu()
        which = torch.multinomial(weights, n, replacement=True, generator=generator)
        tril = self.prior_scale_tril.cpu()[which]
        return self.prior_means.cpu()[which] + (tril @ noise[:, :, None])[:, :, 0]

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


class LatticeHead(nn.Module):
    """MLP from (z, decile condition) to the lattice: log a, b, c and cos alpha, beta, gamma.

    The coordinate channels give the lattice only through a least-squares fit of noisy decoded
    maps (a few hundredths of an Angstrom off, biased small); this head regresses it from the
    latent vector directly. Targets are standardised with ``target_mean`` and ``target_std``.
    """

    def __init__(self, latent_dim: int, hidden: int = 128) -> None:
        super().__init__()
        self.latent_dim, self.hidden = int(latent_dim), int(hidden)
        self.net = nn.Sequential(
            nn.Linear(latent_dim + N_DECILES, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, 6),
        )
        self.register_buffer("target_mean", torch.zeros(6))
        self.register_buffer("target_std", torch.ones(6))

    @staticmethod
    def targets(parameters: torch.Tensor) -> torch.Tensor:
        """(B, 6) log lengths and angle cosines of (B, 6) a, b, c (Angstrom), angles (degrees)."""
        parameters = torch.as_tensor(parameters, dtype=torch.float32)
        return torch.cat([parameters[:, :3].log(), torch.cos(torch.deg2rad(parameters[:, 3:]))], dim=1)

    def forward(self, z: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """Standardised targets (B, 6)."""
        return self.net(torch.cat([z, condition.to(z.dtype)], dim=1))

    def parameters_of(self, z: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """(B, 6) a, b, c (Angstrom) and alpha, beta, gamma (degrees)."""
        raw = self(z, condition) * self.target_std + self.target_mean
        angles = torch.rad2deg(torch.arccos(raw[:, 3:].clamp(-0.999, 0.999)))
        return torch.cat([raw[:, :3].exp(), angles], dim=1)


def fit_gaussian_mixture(
    x: torch.Tensor, components: int, *, seed: int = 0, iterations: int = 100, ridge: float = 1e-3
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full-covariance Gaussian mixture by EM: weights (k,), means (k, d), Cholesky factors (k, d, d).

    Written here with torch because the GPU trainer and the decoder need no scikit-learn;
    ``ridge`` (times the mean variance) is added to each covariance's diagonal.
    """
    x = torch.as_tensor(x, dtype=torch.float64)
    n, d = x.shape
    k = max(1, min(int(components), n))
    generator = torch.Generator().manual_seed(seed)
    means = x[torch.randperm(n, generator=generator)[:k]].clone()
    floor = ridge * float(x.var(dim=0).mean()) + 1e-9
    cov = torch.cov(x.T).reshape(d, d) + floor * torch.eye(d, dtype=x.dtype)
    covs = cov.expand(k, d, d).clone()
    weights = torch.full((k,), 1.0 / k, dtype=x.dtype)
    previous = -float("inf")
    for _ in range(iterations):
        tril = torch.linalg.cholesky(covs)
        diff = x[None] - means[:, None]  # (k, n, d)
        solved = torch.linalg.solve_triangular(tril, diff.transpose(1, 2), upper=False)  # (k, d, n)
        log_det = 2 * torch.log(torch.diagonal(tril, dim1=1, dim2=2)).sum(dim=1)
        log_p = -0.5 * (solved.pow(2).sum(dim=1) + log_det[:, None] + d * np.log(2 * np.pi))
        log_p = log_p + torch.log(weights)[:, None]
        total = torch.logsumexp(log_p, dim=0)
        resp = torch.exp(log_p - total[None])  # (k, n)
        counts = resp.sum(dim=1) + 1e-10
        weights = counts / n
        means = (resp @ x) / counts[:, None]
        diff = x[None] - means[:, None]
        covs = torch.einsum("kn,kni,knj->kij", resp, diff, diff) / counts[:, None, None]
        covs = covs + floor * torch.eye(d, dtype=x.dtype)
        likelihood = float(total.mean())
        if abs(likelihood - previous) < 1e-6 * max(1.0, abs(likelihood)):
            break
        previous = likelihood
    return weights.float(), means.float(), torch.linalg.cholesky(covs).float()


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
    species_weight: float = 1.0


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
    site_classes: torch.Tensor | None = None,
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
    site_classes
        (B, g, g, g) class indices of the species head (-100 off sites,
        :meth:`CondDFCVAE.species_classes`): adds ``species_weight`` times the cross-entropy at
        the site voxels.
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
    if output.species_logits is not None and site_classes is not None:
        term = F.cross_entropy(output.species_logits.float(), site_classes, ignore_index=-100)
        if torch.isfinite(term):  # a batch without labelled voxels adds nothing
            loss = loss + weights.species_weight * term
            parts["species_ce"] = float(term.detach())
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
