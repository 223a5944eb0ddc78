"""From latent vectors to crystal structures.

:class:`Decoder` is the one entry point that generation uses. It holds a trained
:class:`~crystaloop.generative.models.vae.CondDFCVAE` and
:class:`~crystaloop.generative.models.unet.UNet3D` and turns a batch of latent vectors and
decile conditions into pymatgen Structures, one :class:`DecodedCandidate` per input row, in the
input order:

1. the VAE decodes z and the condition into voxel channels and coordinate channels (batched on
   the device);
2. the lattice comes from the VAE's lattice head when it has one (:data:`LATTICE_SOURCES`), else
   from the least-squares fit of the coordinate channels;
3. the sites come from one of :data:`METHODS` (worker processes): ``paper`` (Court et al. 2020:
   the UNet's species and mask, then the periodic watershed of Algorithm S1; a density decoded on
   a coarser grid is upsampled to the UNet's 32^3 first), ``pursuit`` (eq. 1 Gaussians matched to
   the density, no UNet) or ``sites`` (for a VAE over site channels: heatmap peaks and the nearest
   element in descriptor space, no UNet);
4. the sites and the lattice become a Structure.

A row fails, with a short reason, when the lattice is not physical or no site is found.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from pymatgen.core import Element, Lattice, Structure

from crystaloop.generative.models.condition import N_DECILES
from crystaloop.generative.models.unet import UNet3D, voxel_spacing
from crystaloop.generative.models.vae import CondDFCVAE

# A decoded lattice outside these bounds is not a crystal the DFT stage could run: edges under
# 1.5 Angstrom hold no ion, edges over 30 Angstrom are beyond the prior's cells by a factor > 3,
# and cells flatter than these angles or volumes are degenerate fits of noisy coordinate maps.
MIN_EDGE_ANGSTROM = 1.5
MAX_EDGE_ANGSTROM = 30.0
MIN_ANGLE_DEGREES = 30.0
MAX_ANGLE_DEGREES = 150.0
MIN_VOLUME_PER_EDGE3 = 0.1


METHODS = ("paper", "pursuit", "sites")
"""Decoding paths. For a VAE over eq. 1's density: ``paper`` is the UNet's species and mask, then
Algorithm S1; ``pursuit`` reads sites and species from the density alone by matching eq. 1's
Gaussians (:func:`crystaloop.generative.segmentation.pursuit_sites`). For a VAE over site
channels: ``sites`` takes the heatmap's peaks and the nearest element in descriptor space
(:func:`crystaloop.generative.representation.sites_from_channels`)."""

LATTICE_SOURCES = ("auto", "head", "fit")
"""Where the lattice comes from: ``head`` (the VAE's lattice head, from z and the condition),
``fit`` (least squares on the decoded coordinate channels) or ``auto`` (the head when the VAE has
one, else the fit). Sites are read in fractional coordinates of the voxel grid, so either lattice
gives a consistent crystal."""

FLAT_MAXIMUM_ANGSTROM = 0.05
"""Raw peaks closer than this are the tied voxels of one flat maximum (they refine to one point),
not two sites: the only merge applied before validity is measured before repair."""

SEGMENT_GRID = 32
"""Grid the UNet was trained on: a coarser decoded density is upsampled to it (periodic, linear)."""


@dataclass(frozen=True)
class DecodedCandidate:
    """One decoded row.

    Attributes
    ----------
    index : int
        Position in the input batch.
    structure : pymatgen.core.Structure or None
        The decoded crystal; ``None`` when decoding failed.
    reason : str or None
        One short phrase why decoding failed (``"no sites"``, ``"unphysical lattice"``).
    latent : numpy.ndarray or None
        The z the row came from, shape ``(latent_dim,)``.
    raw_min_distance : float or None
        Shortest site distance (Angstrom) before any merge or rejection (see :class:`DecodedRow`).
    merged_sites : int
        Peaks merged into a kept site by the decoder.
    """

    index: int
    structure: Structure | None
    reason: str | None
    latent: np.ndarray | None = None
    raw_min_distance: float | None = None
    merged_sites: int = 0


class DecodedRow(NamedTuple):
    """One row of :meth:`Decoder.structures_from_maps`.

    ``raw_min_distance`` (Angstrom) is the shortest minimum-image distance, a site's own images
    included, of the sites as first read from the maps, in the lattice as first decoded: before
    close peaks are merged and before a lattice outside the physical bounds is rejected. It is
    ``None`` when no site was found or the lattice is not finite. ``merged_sites`` counts the
    peaks dropped for lying within the merge distance of a kept one.
    """

    structure: Structure | None
    reason: str | None
    raw_min_distance: float | None = None
    merged_sites: int = 0


def lattice_problem(lattice: Lattice) -> str | None:
    """Why ``lattice`` is not physical (one phrase), or ``None`` if it is."""
    abc = np.asarray(lattice.abc, dtype=float)
    angles = np.asarray(lattice.angles, dtype=float)
    if not (np.all(np.isfinite(abc)) and np.all(np.isfinite(angles))):
        return "unphysical lattice"
    if abc.min() < MIN_EDGE_ANGSTROM or abc.max() > MAX_EDGE_ANGSTROM:
        return "unphysical lattice"
    if angles.min() < MIN_ANGLE_DEGREES or angles.max() > MAX_ANGLE_DEGREES:
        return "unphysical lattice"
    if not lattice.volume > MIN_VOLUME_PER_EDGE3 * float(np.prod(abc)):
        return "unphysical lattice"
    return None


def _segment_row(args) -> tuple[list[tuple[int, np.ndarray]], str | None, list[tuple[int, np.ndarray]]]:
    """Worker: a species map and density (``paper``), a density and lattice (``pursuit``) or site
    channels and lattice (``sites``) to [(Z, frac)] sites or a failure reason, and the raw sites
    before any merge (the same sites where the path merges nothing)."""
    from crystaloop.generative.segmentation import pursuit_sites, segment

    method, first, second, elements, *head = args
    if method == "sites":
        from pymatgen.core import Lattice as _Lattice

        from crystaloop.generative.representation import sites_from_channels

        logits, vocabulary = head if head else (None, ())
        lattice = _Lattice(second)
        found = sites_from_channels(first, lattice, elements, species_logits=logits, vocabulary=vocabulary)
        raw = sites_from_channels(
            first,
            lattice,
            elements,
            species_logits=logits,
            vocabulary=vocabulary,
            min_separation=FLAT_MAXIMUM_ANGSTROM,
        )
        return (found, None, raw) if found else ([], "no sites", raw)
    if method == "pursuit":
        sites = pursuit_sites(first, second, elements)
    else:
        species, density = first, second
        if not (species > 0).any():
            return [], "no sites", []
        sites = segment(species, species > 0, density=density)
    if not sites:
        return [], "no sites", []
    found = [(s.species, s.frac_coords) for s in sites]
    return found, None, found


def _raw_min_distance(sites: Sequence[tuple[int, np.ndarray]], lattice: Lattice | None) -> float | None:
    """Shortest minimum-image distance (Angstrom) of ``sites`` in ``lattice``, own images included."""
    if not sites or lattice is None or not np.all(np.isfinite(lattice.matrix)):
        return None
    from crystaloop.generative.measures import minimum_distance

    try:
        structure = Structure(lattice, [int(z) for z, _ in sites], [f for _, f in sites])
        return minimum_distance(structure)
    except (ValueError, np.linalg.LinAlgError):  # a singular decoded cell has no distances
        return None


def vae_channels(vae: CondDFCVAE, structures: Sequence[Structure]) -> tuple[torch.Tensor, torch.Tensor]:
    """The voxel channels the VAE reads (eq. 1 density or site channels) and coordinates, batched."""
    from crystaloop.generative.representation import coordinate_channels, site_channels, voxelize

    if getattr(vae, "representation", "density") == "sites":
        channels = np.stack([site_channels(s, grid=vae.grid) for s in structures])
        coords = np.stack([coordinate_channels(s.lattice, vae.grid) for s in structures])
    else:
        voxels = [voxelize(s, grid=vae.grid) for s in structures]
        channels = np.stack([v.density for v in voxels])
        coords = np.stack([v.coords for v in voxels])
    return torch.from_numpy(channels.astype(np.float32)), torch.from_numpy(coords.astype(np.float32))


def upsample(density: torch.Tensor, grid: int) -> torch.Tensor:
    """Periodic trilinear upsampling of (B, g, g, g) maps to (B, grid, grid, grid)."""
    g = density.shape[-1]
    if g == grid:
        return density
    padded = torch.nn.functional.pad(density[:, None], (1, 1, 1, 1, 1, 1), mode="circular")
    # voxel centres of the fine grid in the padded coarse grid's index space (centres at i + 1)
    t = (torch.arange(grid, dtype=density.dtype, device=density.device) + 0.5) * g / grid + 0.5
    coords = 2 * t / (g + 1) - 1  # align_corners=True: -1 and 1 are the padded grid's end centres
    zz, yy, xx = torch.meshgrid(coords, coords, coords, indexing="ij")
    sampling = torch.stack([xx, yy, zz], dim=-1)[None].expand(density.shape[0], -1, -1, -1, -1)
    out = torch.nn.functional.grid_sample(padded, sampling, mode="bilinear", align_corners=True)
    return out[:, 0]


class Decoder:
    """Latent vectors to structures with a trained VAE and UNet.

    Parameters
    ----------
    vae
        The conditional VAE (its ``condition`` gives the decile boundaries).
    unet
        The UNet whose vocabulary gives the species that can be decoded.
    device
        Where the networks run (``"auto"``: CUDA when available).
    workers
        Processes for the watershed (``None``: all cores; ``1``: in this process).
    method
        Decoding path (:data:`METHODS`; default: the VAE's own).
    lattice
        Lattice source (:data:`LATTICE_SOURCES`).
    """

    def __init__(
        self,
        vae: CondDFCVAE,
        unet: UNet3D,
        *,
        device: str | torch.device = "auto",
        workers: int | None = None,
        method: str | None = None,
        lattice: str = "auto",
    ) -> None:
        if lattice not in LATTICE_SOURCES:
            raise ValueError(f"lattice must be one of {LATTICE_SOURCES}; got {lattice!r}")
        if lattice == "head" and not getattr(vae, "has_lattice_head", False):
            raise ValueError("this VAE has no lattice head; use lattice 'fit' or 'auto'")
        self.lattice_source = (
            "head"
            if lattice == "head" or (lattice == "auto" and getattr(vae, "has_lattice_head", False))
            else "fit"
        )
        sites = getattr(vae, "representation", "density") == "sites"
        method = method or ("sites" if sites else "paper")
        if method not in METHODS or (method == "sites") != sites:
            allowed = "sites" if sites else "paper or pursuit"
            raise ValueError(
                f"this VAE ({'site channels' if sites else 'density'}) decodes with {allowed}, not {method!r}"
            )
        self.method = method
        if str(device) == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.vae = vae.to(self.device).eval()
        self.unet = unet.to(self.device).eval()
        self.workers = max(1, int(workers if workers is not None else (os.cpu_count() or 1)))

    @classmethod
    def from_checkpoints(
        cls,
        vae: str | Path,
        unet: str | Path,
        *,
        device: str = "auto",
        workers: int | None = None,
        method: str | None = None,
        lattice: str = "auto",
    ) -> Decoder:
        """Load both networks from checkpoint files (see ``crystaloop models list``)."""
        from crystaloop.generative.models.checkpoint import load_model

        vae_model, _ = load_model(vae)
        unet_model, _ = load_model(unet)
        if not isinstance(vae_model, CondDFCVAE) or not isinstance(unet_model, UNet3D):
            from crystaloop.errors import UserError

            raise UserError(f"{vae} must be a VAE checkpoint and {unet} a UNet checkpoint")
        return cls(vae_model, unet_model, device=device, workers=workers, method=method, lattice=lattice)

    @property
    def elements(self) -> list[str]:
        """Symbols of the elements the UNet can decode."""
        return [Element.from_Z(z).symbol for z in self.unet.vocabulary.atomic_numbers[1:]]

    def _class_filter(self, allowed_elements: Sequence[str] | None) -> torch.Tensor | None:
        """Boolean (n_classes,) of the classes that may be chosen, background excluded."""
        if allowed_elements is None:
            return None
        from crystaloop.errors import UserError

        wanted = set()
        for symbol in allowed_elements:
            try:
                wanted.add(Element(str(symbol)).Z)
            except ValueError as error:
                raise UserError(f"{symbol!r} is not an element symbol; use symbols such as 'Na'") from error
        keep = torch.tensor([z in wanted for z in self.unet.vocabulary.atomic_numbers], dtype=torch.bool)
        keep[0] = False
        if not keep.any():
            raise UserError(
                f"none of {sorted(allowed_elements)} can be decoded; the UNet knows {', '.join(self.elements)}"
            )
        return keep

    @torch.no_grad()
    def species_maps(
        self, density: torch.Tensor, spacing: torch.Tensor, keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Atomic numbers per voxel (B, g, g, g) inside the UNet's mask, 0 outside.

        ``spacing`` (B, 3) are the voxel edges (Angstrom); ``keep`` (n_classes,) restricts the
        species head's choice to the allowed classes.
        """
        out = self.unet(density[:, None], spacing)
        logits = out.species_logits[:, 1:]
        if keep is not None:
            logits = logits.masked_fill(~keep[1:].to(logits.device)[None, :, None, None, None], float("-inf"))
        best = self.unet.vocabulary.decode(logits.argmax(dim=1) + 1)
        inside = torch.sigmoid(out.mask_logits[:, 0]) > 0.5
        return torch.where(inside, best, torch.zeros_like(best))

    @torch.no_grad()
    def decode(
        self,
        z: torch.Tensor,
        condition: torch.Tensor,
        *,
        allowed_elements: Sequence[str] | None = None,
        batch_size: int = 64,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[DecodedCandidate]:
        """Decode ``z`` (n, latent_dim) under one-hot ``condition`` (n, 10) into candidates.

        Parameters
        ----------
        z, condition
            Latent vectors and their decile one-hots, row for row.
        allowed_elements
            Element symbols the species decisions are restricted to (``None``: the UNet's all).
        batch_size
            Rows per network pass.
        progress
            Called as ``progress(done, total)`` after each batch.

        Returns
        -------
        list of DecodedCandidate
            One per row, in the input order.
        """
        z = torch.as_tensor(z, dtype=torch.float32)
        condition = torch.as_tensor(condition, dtype=torch.float32)
        if z.ndim != 2 or z.shape[1] != self.vae.latent_dim:
            raise ValueError(f"z must be shaped (n, {self.vae.latent_dim}); got {tuple(z.shape)}")
        if condition.shape != (z.shape[0], N_DECILES):
            raise ValueError(
                f"condition must be shaped ({z.shape[0]}, {N_DECILES}); got {tuple(condition.shape)}"
            )
        keep = self._class_filter(allowed_elements)
        total = z.shape[0]
        results: list[DecodedCandidate] = []
        pool = ProcessPoolExecutor(self.workers) if self.workers > 1 and total > 1 else None
        try:
            for start in range(0, total, batch_size):
                zb = z[start : start + batch_size].to(self.device)
                cb = condition[start : start + batch_size].to(self.device)
                decoded = self.vae.decode(zb, cb)
                density, coords = self.vae.split_output(decoded)
                rows = self.structures_from_maps(
                    density,
                    coords,
                    keep=keep,
                    pool=pool,
                    species_logits=self.vae.species_logits(decoded),
                    lattices=self.head_lattices(zb, cb),
                )
                for i, row in enumerate(rows):
                    index = start + i
                    results.append(
                        DecodedCandidate(
                            index,
                            row.structure,
                            row.reason,
                            z[index].numpy().copy(),
                            raw_min_distance=row.raw_min_distance,
                            merged_sites=row.merged_sites,
                        )
                    )
                if progress is not None:
                    progress(min(start + batch_size, total), total)
        finally:
            if pool is not None:
                pool.shutdown()
        return results

    @torch.no_grad()
    def head_lattices(self, z: torch.Tensor, condition: torch.Tensor) -> list[Lattice] | None:
        """The lattice head's lattices of ``z`` (n, latent_dim) under ``condition`` (n, 10).

        ``None`` when this decoder fits the lattice to the coordinate channels instead.
        """
        if self.lattice_source != "head":
            return None
        parameters = self.vae.lattice_parameters(z.to(self.device), condition.to(self.device))
        return [Lattice.from_parameters(*row) for row in parameters.double().cpu().numpy()]

    @torch.no_grad()
    def structures_from_maps(
        self,
        density: torch.Tensor,
        coords: torch.Tensor,
        *,
        keep: torch.Tensor | None = None,
        pool: ProcessPoolExecutor | None = None,
        species_logits: torch.Tensor | None = None,
        lattices: Sequence[Lattice] | None = None,
    ) -> list[DecodedRow]:
        """Structures (or failure reasons) from decoded density (B, g, g, g) and coordinates (B, 3, g, g, g).

        ``lattices`` (one per row, e.g. :meth:`head_lattices`) replace the least-squares fit of
        the coordinate channels.
        ``keep`` is :meth:`_class_filter`'s output: the classes species may be chosen from.
        ``species_logits`` (B, K, g, g, g) are a species head's outputs (``sites`` path): sites
        then take the head's most likely allowed element (see
        :func:`~crystaloop.generative.representation.sites_from_channels`).
        """
        from crystaloop.generative.representation import coordinate_channels, lattice_from_coordinates
        from crystaloop.generative.segmentation import to_structure

        density = density.float()
        if density.ndim == 4:  # eq. 1 density; site channels carry signed descriptors
            density = density.clamp_min(0.0)
        coords_np = coords.float().cpu().numpy()
        given, lattices, problems = lattices, [], []
        for i in range(len(coords_np)):
            try:
                lattice = given[i] if given is not None else lattice_from_coordinates(coords_np[i])
                problems.append(lattice_problem(lattice))
            except (ValueError, np.linalg.LinAlgError):
                lattice = None
                problems.append("unphysical lattice")
            lattices.append(lattice)
        # raw sites are read wherever the lattice is finite, so validity before the lattice bounds
        # and the merge can be measured; only rows without a problem become structures
        readable = [lat is not None and bool(np.all(np.isfinite(lat.matrix))) for lat in lattices]
        if self.method in ("pursuit", "sites"):
            zs = self.unet.vocabulary.atomic_numbers[1:]
            if keep is not None:
                zs = [z for z, k in zip(self.unet.vocabulary.atomic_numbers, keep.tolist(), strict=True) if k]
            density_np = density.cpu().numpy()
            logits_np = species_logits.float().cpu().numpy() if species_logits is not None else None
            vocabulary = list(getattr(self.vae, "species", []))
            jobs = [
                (self.method, density_np[i], lattices[i].matrix, zs)
                + ((logits_np[i], vocabulary) if logits_np is not None else ())
                for i in range(len(density_np))
                if readable[i]
            ]
        else:
            fine = upsample(density, SEGMENT_GRID) if density.shape[-1] < SEGMENT_GRID else density
            grid = fine.shape[-1]
            spacing = torch.stack(
                [
                    voxel_spacing(torch.from_numpy(coordinate_channels(lattices[i], grid))[None])[0]
                    if problems[i] is None
                    else voxel_spacing(coords[i : i + 1].float().cpu())[0]
                    for i in range(len(lattices))
                ]
            ).to(fine.device)
            species = self.species_maps(fine, spacing, keep).cpu().numpy()
            fine_np = fine.cpu().numpy()
            jobs = [("paper", species[i], fine_np[i], None) for i in range(len(species)) if readable[i]]
        segmented = iter(list(pool.map(_segment_row, jobs)) if pool else [_segment_row(j) for j in jobs])
        rows: list[DecodedRow] = []
        for lattice, problem, ok in zip(lattices, problems, readable, strict=True):
            if not ok:
                rows.append(DecodedRow(None, problem or "unphysical lattice"))
                continue
            sites, reason, raw = next(segmented)
            raw_min = _raw_min_distance(raw, lattice)
            merged = len(raw) - len(sites) if sites else 0
            if problem is not None:
                rows.append(DecodedRow(None, problem, raw_min, merged))
            elif reason is not None:
                rows.append(DecodedRow(None, reason, raw_min, merged))
            else:
                rows.append(DecodedRow(to_structure(sites, lattice), None, raw_min, merged))
        return rows

    @torch.no_grad()
    def encode(
        self, structures: Sequence[Structure], property_values: Sequence[float] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder posterior (mu, logvar), each (n, latent_dim), of ``structures``.

        ``property_values`` (in the VAE condition's property) pick each structure's decile;
        ``None`` takes the middle decile for all.
        """
        if property_values is not None and len(property_values) != len(structures):
            raise ValueError(f"{len(property_values)} property values for {len(structures)} structures")
        if not structures:
            empty = torch.zeros(0, self.vae.latent_dim)
            return empty, empty.clone()
        density, coords = vae_channels(self.vae, structures)
        density, coords = density.to(self.device), coords.to(self.device)
        if property_values is None:
            condition = torch.zeros(len(structures), N_DECILES)
            condition[:, N_DECILES // 2] = 1.0
        else:
            condition = self.vae.condition.one_hot(list(property_values))
        mu, logvar = self.vae.encode(self.vae.to_input(density, coords), condition.to(self.device))
        return mu.cpu(), logvar.cpu()
