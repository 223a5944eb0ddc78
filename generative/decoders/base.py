"""The decoder interface: a batch of decoded VAE maps in, one :class:`DecodedRow` per map out.

A decoder (:class:`MapDecoder`) reads sites and species from what the VAE decoded. The lattice
is settled before it is called (the VAE's lattice head, or the fit of the coordinate channels),
so every decoder sees the same cells and the same bounds (:func:`lattice_problem`). Most decoders
read each row on its own, in worker processes: :class:`SiteReader` gives them the shared part
(jobs to workers, validity before repair, assembly of the rows).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, NamedTuple, Protocol

import numpy as np
import torch
from pymatgen.core import Element, Lattice, Structure

# A decoded lattice outside these bounds is not a crystal the DFT stage could run: edges under
# 1.5 Angstrom hold no ion, edges over 30 Angstrom are beyond the prior's cells by a factor > 3,
# and cells flatter than these angles or volumes are degenerate fits of noisy coordinate maps.
MIN_EDGE_ANGSTROM = 1.5
MAX_EDGE_ANGSTROM = 30.0
MIN_ANGLE_DEGREES = 30.0
MAX_ANGLE_DEGREES = 150.0
MIN_VOLUME_PER_EDGE3 = 0.1

FLAT_MAXIMUM_ANGSTROM = 0.05
"""Raw peaks closer than this are the tied voxels of one flat maximum (they refine to one point),
not two sites: the only merge applied before validity is measured before repair."""

SEGMENT_GRID = 32
"""Grid the UNet was trained on: a coarser decoded density is upsampled to it (periodic, linear)."""


@dataclass(frozen=True)
class Site:
    """One decoded atom.

    Attributes
    ----------
    species : int
        Atomic number Z.
    frac_coords : numpy.ndarray
        Fractional coordinates in ``[0, 1)``, shape ``(3,)``.
    n_voxels : int
        Voxels in the region the site came from (1 for a peak).
    """

    species: int
    frac_coords: np.ndarray
    n_voxels: int

    @property
    def symbol(self) -> str:
        """Element symbol of :attr:`species`."""
        return Element.from_Z(self.species).symbol


def to_structure(
    sites: Sequence[Site] | Sequence[tuple[int | str, Sequence[float]]],
    lattice: Lattice | np.ndarray | Sequence[float],
) -> Structure:
    """Build a pymatgen Structure from decoded sites.

    Parameters
    ----------
    sites
        :class:`Site` objects or ``(species, frac_coords)`` pairs (species as Z or symbol).
    lattice
        A Lattice, a 3 × 3 matrix, or ``(a, b, c, α, β, γ)`` in Å and degrees.

    Raises
    ------
    ValueError
        If there are no sites or the lattice cannot be read.
    """
    if len(sites) == 0:
        raise ValueError("to_structure needs at least one site")
    if not isinstance(lattice, Lattice):
        values = np.asarray(lattice, dtype=np.float64)
        if values.shape == (3, 3):
            lattice = Lattice(values)
        elif values.shape == (6,):
            lattice = Lattice.from_parameters(*values)
        else:
            raise ValueError(f"lattice must be a Lattice, 3 × 3 matrix or 6 parameters; {values.shape}")
    species, coords = [], []
    for site in sites:
        z, frac = (site.species, site.frac_coords) if isinstance(site, Site) else site
        species.append(Element.from_Z(int(z)) if isinstance(z, int | np.integer) else Element(z))
        coords.append(np.asarray(frac, dtype=np.float64) % 1.0)
    return Structure(lattice, species, np.array(coords))


class DecodedRow(NamedTuple):
    """One decoded map: a structure, or the reason there is none.

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


@dataclass(frozen=True)
class DecodedMaps:
    """One batch of VAE output with its lattices settled.

    Attributes
    ----------
    channels : torch.Tensor
        Eq. 1 density (B, g, g, g), clamped at 0, or site channels (B, C, g, g, g).
    coords : torch.Tensor
        Decoded coordinate channels (B, 3, g, g, g), Angstrom.
    species_logits : torch.Tensor or None
        A species head's per-voxel logits (B, K, g, g, g) over the VAE's ``species``.
    lattices : list of Lattice or None
        One per row; ``None`` where no lattice could be read.
    problems : list of str or None
        Why each row's lattice is not physical (:func:`lattice_problem`), or ``None``.
    """

    channels: torch.Tensor
    coords: torch.Tensor
    species_logits: torch.Tensor | None
    lattices: list[Lattice | None]
    problems: list[str | None]

    @property
    def readable(self) -> list[bool]:
        """Rows whose lattice is finite: their raw sites are read even when the lattice is out of
        bounds, so validity before repair can be measured."""
        return [lat is not None and bool(np.all(np.isfinite(lat.matrix))) for lat in self.lattices]


SiteResult = tuple[list[tuple[int, np.ndarray]], str | None, list[tuple[int, np.ndarray]]]
"""What a worker returns for one row: the sites ``[(Z, frac)]``, a failure reason or ``None``,
and the raw sites before any merge (the same sites where the decoder merges nothing)."""

Job = tuple[Any, ...]
"""The picklable arguments of one row's read."""


class MapDecoder(Protocol):
    """Reads crystals from decoded VAE maps.

    Attributes
    ----------
    name
        The name it is registered under (:data:`crystaloop.generative.decoders.DECODERS`).
    representation
        The VAE representation it reads: ``"density"`` (eq. 1) or ``"sites"``.
    needs_unet
        Whether it needs a trained UNet (passed to the constructor as ``unet``).
    """

    name: ClassVar[str]
    representation: ClassVar[Literal["density", "sites"]]
    needs_unet: ClassVar[bool]

    def decode(
        self, maps: DecodedMaps, *, elements: Sequence[int], pool: Executor | None = None
    ) -> list[DecodedRow]:
        """One row per map of ``maps``, species chosen among ``elements`` (atomic numbers)."""


class SiteReader:
    """A :class:`MapDecoder` that reads each row on its own (in ``pool`` when given).

    Subclasses give :meth:`jobs` (in this process: network passes belong here) and :attr:`read`,
    a module-level function (so that worker processes can unpickle it) from one job to a
    :data:`SiteResult`.
    """

    name: ClassVar[str]
    representation: ClassVar[Literal["density", "sites"]]
    needs_unet: ClassVar[bool] = False
    read: ClassVar[Callable[[Job], SiteResult]]

    def __init__(self, vae, *, unet=None, device: str | torch.device = "cpu") -> None:
        self.vae, self.unet, self.device = vae, unet, torch.device(device)

    def jobs(self, maps: DecodedMaps, elements: Sequence[int]) -> list[Job]:
        """One job per readable row of ``maps`` (:attr:`DecodedMaps.readable`), in order."""
        raise NotImplementedError

    def decode(
        self, maps: DecodedMaps, *, elements: Sequence[int], pool: Executor | None = None
    ) -> list[DecodedRow]:
        """See :meth:`MapDecoder.decode`."""
        jobs = self.jobs(maps, elements)
        read = type(self).read
        results = iter(list(pool.map(read, jobs)) if pool else [read(job) for job in jobs])
        rows: list[DecodedRow] = []
        for lattice, problem, ok in zip(maps.lattices, maps.problems, maps.readable, strict=True):
            if not ok:
                rows.append(DecodedRow(None, problem or "unphysical lattice"))
                continue
            sites, reason, raw = next(results)
            raw_min = raw_min_distance(raw, lattice)
            merged = len(raw) - len(sites) if sites else 0
            if problem is not None:
                rows.append(DecodedRow(None, problem, raw_min, merged))
            elif reason is not None:
                rows.append(DecodedRow(None, reason, raw_min, merged))
            else:
                rows.append(DecodedRow(to_structure(sites, lattice), None, raw_min, merged))
        return rows


def raw_min_distance(sites: Sequence[tuple[int, np.ndarray]], lattice: Lattice | None) -> float | None:
    """Shortest minimum-image distance (Angstrom) of ``sites`` in ``lattice``, own images included."""
    if not sites or lattice is None or not np.all(np.isfinite(lattice.matrix)):
        return None
    from crystaloop.generative.measures import minimum_distance

    try:
        structure = Structure(lattice, [int(z) for z, _ in sites], [f for _, f in sites])
        return minimum_distance(structure)
    except (ValueError, np.linalg.LinAlgError):  # a singular decoded cell has no distances
        return None
