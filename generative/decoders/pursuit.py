"""The ``pursuit`` decoder: sites and species read from an eq. 1 density alone (no UNet).

Two readers over the density: :func:`pursuit_sites` (matching pursuit of eq. 1's Gaussians, the
decoder's path) and :func:`peak_sites` (a Gaussian fitted to each local maximum, then the
nearest element by integral and width). Species come from the element list the decoder is given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pymatgen.core import Element, Lattice
from scipy import ndimage as ndi

from crystaloop.generative.decoders.base import DecodedMaps, Job, Site, SiteReader, SiteResult

_GAUSS_NORM = (2.0 * np.pi) ** -1.5


@dataclass(frozen=True)
class Peak:
    """One fitted density peak.

    Attributes
    ----------
    frac_coords : numpy.ndarray
        Fitted centre, fractional, shape ``(3,)``.
    amplitude : float
        Fitted peak height A (1/Angstrom^3).
    width : float
        Fitted Gaussian width sigma (Angstrom).
    """

    frac_coords: np.ndarray
    amplitude: float
    width: float

    @property
    def z_estimate(self) -> float:
        """Atomic number from eq. 1's integral, ``Z = A sigma^3 / (2 pi)^(-3/2)``.

        The integral of a blurred Gaussian is its original one, so this survives a blurry decoding
        better than the height Z/r^3 alone, which two species can share.
        """
        return self.amplitude * self.width**3 / _GAUSS_NORM


def _neighbourhood_offsets() -> np.ndarray:
    return np.array([(i, j, k) for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)])


def fit_peaks(
    density: np.ndarray,
    lattice: Lattice | np.ndarray,
    *,
    threshold: float,
    min_separation: float = 1.0,
) -> list[Peak]:
    """Periodic local maxima of ``density`` with a Gaussian (amplitude, width, centre) fitted to each.

    Each maximum's 3 × 3 × 3 periodic neighbourhood is fitted with ``ln M = ln A - |x - x0|^2 /
    2 sigma^2`` by linear least squares in Cartesian offsets (Angstrom), so non-cubic voxels are
    handled through the lattice. Maxima under ``threshold`` (1/Angstrom^3) are skipped; of two
    maxima closer than ``min_separation`` (Angstrom, minimum image) only the higher is kept, since
    no two ions sit that close.

    Parameters
    ----------
    density
        ``(g1, g2, g3)`` density over one cell.
    lattice
        The cell (Lattice or 3 × 3 matrix, Angstrom).
    threshold
        Lowest peak height kept (1/Angstrom^3).
    min_separation
        Non-maximum suppression radius (Angstrom).
    """
    density = np.asarray(density, dtype=np.float64)
    matrix = np.asarray(lattice.matrix if isinstance(lattice, Lattice) else lattice, dtype=np.float64)
    shape = np.array(density.shape)
    local_max = ndi.maximum_filter(density, size=3, mode="wrap")
    candidates = np.argwhere((density >= local_max) & (density > threshold))
    order = np.argsort(-density[tuple(candidates.T)], kind="stable")
    offsets = _neighbourhood_offsets()
    cart = (offsets / shape) @ matrix  # (27, 3) Angstrom
    design = np.column_stack([np.ones(len(cart)), cart, -(cart**2).sum(axis=1)])
    kept: list[Peak] = []
    kept_cart: list[np.ndarray] = []
    inverse = np.linalg.inv(matrix)
    for index in candidates[order]:
        values = density[tuple(((index + offsets) % shape).T)]
        centre_frac = (index + 0.5) / shape
        amplitude, width, shift = float(density[tuple(index)]), None, np.zeros(3)
        ok = values > 1e-8
        if ok.sum() >= 6:
            coef, *_ = np.linalg.lstsq(design[ok], np.log(values[ok]), rcond=None)
            q = coef[4]
            if q > 1e-6:
                shift = coef[1:4] / (2 * q)
                if np.linalg.norm(shift @ inverse * shape) <= 1.0:  # stays within a voxel
                    width = float(np.sqrt(1.0 / (2 * q)))
                    amplitude = float(np.exp(coef[0] + q * shift @ shift))
                else:
                    shift = np.zeros(3)
        if width is None:
            # a flat top: take the half-height extent along the neighbourhood as the width
            width = float(np.mean(np.linalg.norm(matrix, axis=1) / shape))
        frac = (centre_frac + shift @ inverse) % 1.0
        position = frac @ matrix
        too_close = False
        for other in kept_cart:
            delta = (position - other) @ inverse
            delta -= np.round(delta)
            if np.linalg.norm(delta @ matrix) < min_separation:
                too_close = True
                break
        if too_close:
            continue
        kept.append(Peak(frac, amplitude, width))
        kept_cart.append(position)
    return kept


def element_table(elements: Sequence[int | str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Atomic numbers, ionic radii (Angstrom) and eq. 1 peak heights (1/Angstrom^3) of ``elements``."""
    from crystaloop.generative.radii import ionic_radius

    zs = np.array([Element(e).Z if isinstance(e, str) else int(e) for e in elements])
    radii = np.array([ionic_radius(int(z)) for z in zs])
    return zs, radii, _GAUSS_NORM * zs / radii**3


def nearest_element(
    peak: Peak,
    table: tuple[np.ndarray, np.ndarray, np.ndarray],
    *,
    z_scale: float = 0.25,
    width_scale: float = 0.3,
) -> int:
    """The element of ``table`` nearest the peak in (ln Z, width) space.

    ``z_scale`` is the tolerated error of ln Z, ``width_scale`` that of the width (Angstrom):
    the width is the looser one because a blurred decoding widens every peak.
    """
    zs, radii, _ = table
    cost = ((np.log(max(peak.z_estimate, 1e-3)) - np.log(zs)) / z_scale) ** 2 + (
        (peak.width - radii) / width_scale
    ) ** 2
    return int(zs[int(np.argmin(cost))])


def peak_sites(
    density: np.ndarray,
    lattice: Lattice | np.ndarray,
    elements: Sequence[int | str],
    *,
    min_separation: float = 1.0,
    threshold_fraction: float = 0.5,
) -> list[Site]:
    """Sites from a density map by peak fitting and the nearest element of ``elements``.

    Peaks under ``threshold_fraction`` of the lowest eq. 1 peak height among ``elements`` are
    background. ``n_voxels`` of each site is 1 (a peak, not a region).
    """
    table = element_table(elements)
    threshold = threshold_fraction * float(table[2].min())
    peaks = fit_peaks(density, lattice, threshold=threshold, min_separation=min_separation)
    return [Site(species=nearest_element(p, table), frac_coords=p.frac_coords, n_voxels=1) for p in peaks]


def pursuit_sites(
    density: np.ndarray,
    lattice: Lattice | np.ndarray,
    elements: Sequence[int | str],
    *,
    max_sites: int = 40,
    min_separation: float = 0.9,
    floor_fraction: float = 0.3,
    refine_passes: int = 2,
    fit_radius: float = 1.2,
) -> list[Site]:
    """Sites by matching pursuit of eq. 1's Gaussians over the density (no UNet).

    Eq. 1 gives every ion a known shape: a Gaussian of width ``r`` (its ionic radius) and height
    ``Z / r^3``. Starting from the density as the residual, each step takes the residual's highest
    voxel that is at least ``min_separation`` (Angstrom) from every placed site, refines it to
    sub-voxel precision (a parabola through it and its two neighbours along each axis), picks the
    element of ``elements`` whose Gaussian there removes the most squared residual, and subtracts
    it. It stops when no element reduces the residual, when the highest free voxel is under
    ``floor_fraction`` of the lowest height among ``elements``, or after ``max_sites`` sites. Then
    ``refine_passes`` times, each site's element is chosen again against the density minus all
    other sites, and a site no element improves is dropped: the first sites were chosen while
    their neighbours' tails still sat in the residual.

    Overlapping ions are split because each is subtracted before the next is sought, and two
    species with the same height ``Z / r^3`` are told apart by their widths.

    Parameters
    ----------
    density
        ``(g1, g2, g3)`` density over one cell (1/Angstrom^3).
    lattice
        The cell (Lattice or 3 × 3 matrix, Angstrom).
    elements
        Candidate species (atomic numbers or symbols).
    max_sites
        Most sites placed.
    min_separation
        Closest two sites may be (Angstrom); the prior's cells have none under 1.5.
    floor_fraction
        Residual height, as a fraction of the lowest element height, under which the search stops.
    refine_passes
        Passes of element reassignment after the greedy placement.
    """
    density = np.asarray(density, dtype=np.float64)
    matrix = np.asarray(lattice.matrix if isinstance(lattice, Lattice) else lattice, dtype=np.float64)
    shape = np.array(density.shape)
    zs, radii, heights = element_table(elements)
    axes = [(np.arange(n) + 0.5) / n for n in shape]
    centres = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    inverse_two_r2 = 1.0 / (2.0 * radii**2)

    def gaussians(frac: np.ndarray) -> np.ndarray:
        delta = centres - frac
        delta -= np.round(delta)
        d2 = ((delta @ matrix) ** 2).sum(axis=1)
        shapes = heights[:, None] * np.exp(-d2[None, :] * inverse_two_r2[:, None])  # (E, voxels)
        return shapes, d2 <= fit_radius**2

    residual = density.reshape(-1).copy()
    free = np.ones(residual.shape, dtype=bool)
    floor = floor_fraction * float(heights.min())
    placed: list[tuple[np.ndarray, int, np.ndarray]] = []  # (frac, element index, its Gaussian)
    while len(placed) < max_sites:
        masked = np.where(free, residual, -np.inf)
        flat = int(np.argmax(masked))
        if masked[flat] < floor:
            break
        index = np.array(np.unravel_index(flat, density.shape))
        frac = (index + 0.5 + _parabolic_shift(residual.reshape(density.shape), index)) / shape % 1.0
        if any(_periodic_distance(frac, other, matrix) < min_separation for other, _, _ in placed):
            free[flat] = False
            continue
        shapes, local = gaussians(frac)
        best = _best_element(shapes, residual, local)
        if best is None:
            free[flat] = False
            continue
        residual -= shapes[best]
        placed.append((frac, best, shapes[best]))
        delta = centres - frac
        delta -= np.round(delta)
        free &= ((delta @ matrix) ** 2).sum(axis=1) >= min_separation**2
    model = density.reshape(-1) - residual
    for _ in range(refine_passes):
        kept = []
        for frac, _, shape_ in placed:
            others = density.reshape(-1) - (model - shape_)
            shapes, local = gaussians(frac)
            best = _best_element(shapes, others, local)
            model = model - shape_
            if best is None:
                continue
            model = model + shapes[best]
            kept.append((frac, best, shapes[best]))
        placed = kept
    return [Site(species=int(zs[e]), frac_coords=frac, n_voxels=1) for frac, e, _ in placed]


def read_pursuit(job: Job) -> SiteResult:
    """Worker: a density, a lattice matrix and the allowed atomic numbers to sites."""
    density, matrix, elements = job
    sites = pursuit_sites(density, matrix, elements)
    if not sites:
        return [], "no sites", []
    found = [(s.species, s.frac_coords) for s in sites]
    return found, None, found


class PursuitDecoder(SiteReader):
    """Reads an eq. 1 density VAE's maps by Gaussian pursuit (:func:`pursuit_sites`), no UNet."""

    name = "pursuit"
    representation = "density"
    needs_unet = False
    read = staticmethod(read_pursuit)

    def jobs(self, maps: DecodedMaps, elements: Sequence[int]) -> list[Job]:
        density = maps.channels.cpu().numpy()
        zs = list(elements)
        return [(density[i], maps.lattices[i].matrix, zs) for i, ok in enumerate(maps.readable) if ok]


def _best_element(shapes: np.ndarray, residual: np.ndarray, local: np.ndarray) -> int | None:
    """Index of the element whose Gaussian, over a constant local background, best fits the
    residual inside ``local``; ``None`` unless it leaves under a quarter of the squared deviation
    that a flat background alone leaves.

    The free constant stands for the tails of neighbours not yet placed, which eq. 1's wide
    anion Gaussians make large: without it, the widest element always absorbs them.
    """
    y = residual[local]
    g = shapes[:, local]
    offsets = (y[None, :] - g).mean(axis=1, keepdims=True)
    sse = ((y[None, :] - g - offsets) ** 2).sum(axis=1)
    flat = float(((y - y.mean()) ** 2).sum())
    best = int(np.argmin(sse))
    return best if sse[best] < 0.25 * flat else None


def _parabolic_shift(values: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Sub-voxel offset (voxels, each in [-0.5, 0.5]) of a maximum from a parabola per axis."""
    shift = np.zeros(3)
    shape = np.array(values.shape)
    centre = values[tuple(index)]
    for axis in range(3):
        step = np.zeros(3, dtype=int)
        step[axis] = 1
        minus = values[tuple((index - step) % shape)]
        plus = values[tuple((index + step) % shape)]
        curvature = minus - 2 * centre + plus
        if curvature < 0:
            shift[axis] = float(np.clip(0.5 * (minus - plus) / curvature, -0.5, 0.5))
    return shift


def _periodic_distance(a: np.ndarray, b: np.ndarray, matrix: np.ndarray) -> float:
    delta = np.asarray(a) - np.asarray(b)
    delta -= np.round(delta)
    return float(np.linalg.norm(delta @ matrix))
