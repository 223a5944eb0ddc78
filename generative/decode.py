"""From latent vectors to crystal structures.

:class:`Decoder` is the one entry point that generation uses. It holds a trained
:class:`~crystaloop.generative.models.vae.CondDFCVAE` and one decoder of
:mod:`crystaloop.generative.decoders`, and turns a batch of latent vectors and decile conditions
into pymatgen Structures, one :class:`DecodedCandidate` per input row, in the input order:

1. the VAE decodes z and the condition into voxel channels and coordinate channels (batched on
   the device);
2. the lattice comes from the VAE's lattice head when it has one (:data:`LATTICE_SOURCES`), else
   from the least-squares fit of the coordinate channels;
3. the decoder named by the method (:data:`METHODS`) reads the sites: ``sites`` (the shipped
   path, for a VAE over site channels: heatmap peaks and the species head, no UNet), or the
   plug-ins for eq. 1 density VAEs, ``paper`` (Court et al. 2020: the UNet's species and mask,
   then the periodic watershed of Algorithm S1) and ``pursuit`` (eq. 1 Gaussians matched to the
   density, no UNet);
4. the sites and the lattice become a Structure.

A row fails, with a short reason, when the lattice is not physical or no site is found. The
species a decoder may choose are the VAE's own (its species head, or the element list stored in
its checkpoint); only a VAE that stores neither takes them from a UNet.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pymatgen.core import Element, Lattice, Structure

from crystaloop.generative.decoders import DECODERS, decoder_class
from crystaloop.generative.decoders.base import (
    FLAT_MAXIMUM_ANGSTROM,
    MAX_ANGLE_DEGREES,
    MAX_EDGE_ANGSTROM,
    MIN_ANGLE_DEGREES,
    MIN_EDGE_ANGSTROM,
    MIN_VOLUME_PER_EDGE3,
    SEGMENT_GRID,
    DecodedMaps,
    DecodedRow,
    lattice_problem,
)
from crystaloop.generative.device import resolve_device
from crystaloop.generative.models.condition import N_DECILES
from crystaloop.generative.models.vae import CondDFCVAE

METHODS = tuple(DECODERS)
"""Built-in decoding paths (:data:`crystaloop.generative.decoders.DECODERS`). For a VAE over eq. 1's
density: ``paper`` is the UNet's species and mask, then Algorithm S1; ``pursuit`` reads sites and
species from the density alone by matching eq. 1's Gaussians. For a VAE over site channels:
``sites`` takes the heatmap's peaks and the species head's (or the nearest descriptor's) element."""

LATTICE_SOURCES = ("auto", "head", "fit")
"""Where the lattice comes from: ``head`` (the VAE's lattice head, from z and the condition),
``fit`` (least squares on the decoded coordinate channels) or ``auto`` (the head when the VAE has
one, else the fit). Sites are read in fractional coordinates of the voxel grid, so either lattice
gives a consistent crystal."""

__all__ = [
    "FLAT_MAXIMUM_ANGSTROM",
    "LATTICE_SOURCES",
    "MAX_ANGLE_DEGREES",
    "MAX_EDGE_ANGSTROM",
    "METHODS",
    "MIN_ANGLE_DEGREES",
    "MIN_EDGE_ANGSTROM",
    "MIN_VOLUME_PER_EDGE3",
    "SEGMENT_GRID",
    "DecodedCandidate",
    "DecodedRow",
    "Decoder",
    "lattice_problem",
    "vae_channels",
]


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


class Decoder:
    """Latent vectors to structures with a trained VAE and one decoder of
    :mod:`crystaloop.generative.decoders`.

    Parameters
    ----------
    vae
        The conditional VAE (its ``condition`` gives the decile boundaries).
    unet
        A UNet, or the path of its checkpoint (loaded when first needed). The ``paper`` decoder
        needs one; other paths use it only for the element list of a VAE that stores none.
    device
        Where the networks run (``"auto"``: CUDA when available).
    workers
        Processes that read the sites (``None``: all cores; ``1``: in this process).
    method
        Decoder name (:data:`METHODS`; default: the VAE's own, ``sites`` or ``paper``).
    lattice
        Lattice source (:data:`LATTICE_SOURCES`).
    elements
        Atomic numbers the decoder may choose from, when the VAE has no species head (a VAE
        checkpoint's ``elements``); default: the species head's, else the UNet's.
    symprec
        Refine every decoded crystal onto the space group spglib finds at this tolerance
        (angstrom; :func:`crystaloop.generative.symmetry.symmetrize`). ``None``: as decoded.

    Raises
    ------
    ValueError
        If the method or lattice source does not fit the VAE, or no element list can be found.
    """

    def __init__(
        self,
        vae: CondDFCVAE,
        unet=None,
        *,
        device: str | torch.device = "auto",
        workers: int | None = None,
        method: str | None = None,
        lattice: str = "auto",
        elements: Sequence[int] | None = None,
        symprec: float | None = None,
    ) -> None:
        if symprec is not None and not symprec > 0:
            raise ValueError(f"symprec must be positive (angstrom); got {symprec}")
        self.symprec = symprec
        if lattice not in LATTICE_SOURCES:
            raise ValueError(f"lattice must be one of {LATTICE_SOURCES}; got {lattice!r}")
        if lattice == "head" and not getattr(vae, "has_lattice_head", False):
            raise ValueError("this VAE has no lattice head; use lattice 'fit' or 'auto'")
        self.lattice_source = (
            "head"
            if lattice == "head" or (lattice == "auto" and getattr(vae, "has_lattice_head", False))
            else "fit"
        )
        representation = getattr(vae, "representation", "density")
        method = method or ("sites" if representation == "sites" else "paper")
        cls = decoder_class(method) if method in METHODS else None
        if cls is None or cls.representation != representation:
            allowed = " or ".join(m for m in METHODS if decoder_class(m).representation == representation)
            raise ValueError(
                f"this VAE ({'site channels' if representation == 'sites' else 'density'}) decodes with "
                f"{allowed}, not {method!r}"
            )
        self.method = method
        self.device = torch.device(resolve_device(device))
        self.vae = vae.to(self.device).eval()
        self._unet = unet
        self.workers = max(1, int(workers if workers is not None else (os.cpu_count() or 1)))
        self._atomic_numbers = [int(z) for z in (getattr(vae, "species", None) or elements or ())]
        if not self._atomic_numbers and self._unet is None:
            raise ValueError(
                "this VAE stores no element list (no species head); pass a UNet for its elements"
            )
        self.map_decoder = cls(self.vae, unet=self.unet if cls.needs_unet else None, device=self.device)

    @classmethod
    def from_checkpoints(
        cls,
        vae: str | Path,
        unet: str | Path | None = None,
        *,
        device: str = "auto",
        workers: int | None = None,
        method: str | None = None,
        lattice: str = "auto",
        symprec: float | None = None,
    ) -> Decoder:
        """Load the VAE (and, when the decoder needs it, the UNet) from checkpoint files.

        The UNet checkpoint is read only when needed: by the ``paper`` decoder, for a VAE that
        stores no element list, or when :attr:`unet` is asked for.
        """
        from crystaloop.generative.models.checkpoint import load_model

        vae_model, extra = load_model(vae)
        if not isinstance(vae_model, CondDFCVAE):
            from crystaloop.errors import UserError

            raise UserError(f"{vae} must be a VAE checkpoint")
        return cls(
            vae_model,
            Path(unet) if unet is not None else None,
            device=device,
            workers=workers,
            method=method,
            lattice=lattice,
            elements=extra.get("elements"),
            symprec=symprec,
        )

    @property
    def unet(self):
        """The UNet (loaded from its checkpoint on first use); ``None`` when none was given.

        Raises
        ------
        UserError
            If the checkpoint holds no UNet.
        """
        if isinstance(self._unet, str | Path):
            from crystaloop.generative.models.checkpoint import load_model
            from crystaloop.generative.models.unet import UNet3D

            path, (model, _) = self._unet, load_model(self._unet)
            if not isinstance(model, UNet3D):
                from crystaloop.errors import UserError

                raise UserError(f"{path} must be a UNet checkpoint")
            self._unet = model.to(self.device).eval()
        return self._unet

    @property
    def atomic_numbers(self) -> list[int]:
        """Atomic numbers of the elements this decoder can decode."""
        if not self._atomic_numbers:
            self._atomic_numbers = [int(z) for z in self.unet.vocabulary.atomic_numbers[1:]]
        return self._atomic_numbers

    @property
    def elements(self) -> list[str]:
        """Symbols of the elements this decoder can decode."""
        return [Element.from_Z(z).symbol for z in self.atomic_numbers]

    def allowed_atomic_numbers(self, allowed_elements: Sequence[str] | None) -> list[int] | None:
        """The decodable atomic numbers among ``allowed_elements`` (symbols), in decoder order;
        ``None`` when ``allowed_elements`` is.

        Raises
        ------
        UserError
            If a symbol is not an element, or none of them can be decoded.
        """
        if allowed_elements is None:
            return None
        from crystaloop.errors import UserError

        wanted = set()
        for symbol in allowed_elements:
            try:
                wanted.add(Element(str(symbol)).Z)
            except ValueError as error:
                raise UserError(f"{symbol!r} is not an element symbol; use symbols such as 'Na'") from error
        keep = [z for z in self.atomic_numbers if z in wanted]
        if not keep:
            raise UserError(
                f"none of {sorted(allowed_elements)} can be decoded; the decoder knows {', '.join(self.elements)}"
            )
        return keep

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
        keep = self.allowed_atomic_numbers(allowed_elements)
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
        keep: Sequence[int] | None = None,
        pool: ProcessPoolExecutor | None = None,
        species_logits: torch.Tensor | None = None,
        lattices: Sequence[Lattice] | None = None,
    ) -> list[DecodedRow]:
        """Structures (or failure reasons) from decoded density (B, g, g, g) or site channels
        (B, C, g, g, g) and coordinates (B, 3, g, g, g).

        ``lattices`` (one per row, e.g. :meth:`head_lattices`) replace the least-squares fit of
        the coordinate channels. With :attr:`symprec`, each structure is symmetrised (the raw
        minimum distance stays that of the sites as first read). ``keep`` (atomic numbers, :meth:`allowed_atomic_numbers`)
        restricts the species; ``None``: every element of the decoder. ``species_logits``
        (B, K, g, g, g) are a species head's outputs (``sites`` path).
        """
        from crystaloop.generative.representation import lattice_from_coordinates

        density = density.float()
        if density.ndim == 4:  # eq. 1 density; site channels carry signed descriptors
            density = density.clamp_min(0.0)
        coords_np = coords.float().cpu().numpy()
        given, settled, problems = lattices, [], []
        for i in range(len(coords_np)):
            try:
                lattice = given[i] if given is not None else lattice_from_coordinates(coords_np[i])
                problems.append(lattice_problem(lattice))
            except (ValueError, np.linalg.LinAlgError):
                lattice = None
                problems.append("unphysical lattice")
            settled.append(lattice)
        maps = DecodedMaps(density, coords, species_logits, settled, problems)
        elements = list(keep) if keep is not None else self.atomic_numbers
        rows = self.map_decoder.decode(maps, elements=elements, pool=pool)
        if self.symprec is None:
            return rows
        from crystaloop.generative.symmetry import symmetrize

        return [
            row._replace(structure=symmetrize(row.structure, self.symprec).structure)
            if row.structure is not None
            else row
            for row in rows
        ]

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
