"""Voxel representation of a crystal (Court et al. 2020, eq. 1-3), periodic by default.

The grid spans exactly one unit cell. Voxel ``(i, j, k)`` has its centre at fractional coordinates
``((i + 1/2)/g, (j + 1/2)/g, (k + 1/2)/g)`` and Cartesian coordinates ``frac @ lattice.matrix``, so
non-orthogonal cells are handled through the lattice matrix. With ``periodic=True`` every
atom-voxel distance is the minimum-image distance; with ``periodic=False`` it is the plain distance
inside the cell (the paper's variant, kept to measure what periodic handling gains).

Channels, for sites ``i`` with atomic number ``Z_i`` and ionic radius ``r_i`` (Å,
:func:`crystaloop.generative.radii.ionic_radius`):

- density ``M_v = (2π)^(-3/2) Σ_i Z_i / r_i³ · exp(-d(i, v)² / 2 r_i²)`` (eq. 1), in Å⁻³;
- species ``S_v = Z`` of the nearest site with ``d(i, v) <= r_i``, else 0 (eq. 2);
- mask ``S_B = S > 0`` (eq. 3);
- coordinates ``C``: the Cartesian position (Å) of every voxel centre, shape ``(3, g, g, g)``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
from pymatgen.core import Lattice, Structure

from crystaloop.generative.grid import coordinate_channels, cube_rotations, voxel_centres
from crystaloop.generative.radii import ionic_radius

_NORM = (2.0 * np.pi) ** -1.5
_ORTHOGONAL_TOLERANCE_DEGREES = 1e-6


@dataclass(frozen=True, eq=False)
class VoxelCrystal:
    """One crystal on a ``g × g × g`` voxel grid spanning its unit cell.

    Attributes
    ----------
    density : numpy.ndarray
        ``(g, g, g)`` float32, eq. 1 (Å⁻³).
    species : numpy.ndarray
        ``(g, g, g)`` int16, atomic number of the nearest ion within its radius, 0 elsewhere.
    mask : numpy.ndarray
        ``(g, g, g)`` bool, ``species > 0``.
    coords : numpy.ndarray
        ``(3, g, g, g)`` float32, Cartesian coordinates (Å) of the voxel centres.
    lattice : pymatgen.core.Lattice
        The unit cell the grid spans.
    periodic : bool
        Whether distances were minimum-image distances.
    """

    density: np.ndarray
    species: np.ndarray
    mask: np.ndarray
    coords: np.ndarray
    lattice: Lattice
    periodic: bool = True

    @property
    def grid(self) -> int:
        """Voxels per cell edge."""
        return int(self.density.shape[0])

    @property
    def abc(self) -> tuple[float, float, float]:
        """Lattice lengths (Å)."""
        return tuple(float(x) for x in self.lattice.abc)

    @property
    def angles(self) -> tuple[float, float, float]:
        """Lattice angles α, β, γ (degrees)."""
        return tuple(float(x) for x in self.lattice.angles)

    @property
    def lattice_parameters(self) -> np.ndarray:
        """``(a, b, c, α, β, γ)`` in Å and degrees, float64."""
        return np.array([*self.lattice.abc, *self.lattice.angles], dtype=np.float64)

    def channels(self) -> np.ndarray:
        """The 4-channel model input ``(density, x, y, z)``, shape ``(4, g, g, g)``, float32."""
        return np.concatenate([self.density[None], self.coords], axis=0).astype(np.float32, copy=False)


def lattice_from_coordinates(coords: np.ndarray) -> Lattice:
    """Recover the lattice from coordinate channels ``(3, g1, g2, g3)``.

    Each lattice vector is the least-squares slope of the coordinates along its grid axis
    (computed in float64), so exact channels give the lattice to float32 precision and
    noisy (reconstructed) channels give the best linear fit.

    Raises
    ------
    ValueError
        If ``coords`` is not shaped ``(3, g1, g2, g3)`` with every ``g >= 2``.
    """
    coords = np.asarray(coords)
    if coords.ndim != 4 or coords.shape[0] != 3 or min(coords.shape[1:]) < 2:
        raise ValueError(f"coordinate channels must be shaped (3, g, g, g); got {coords.shape}")
    vectors = []
    for axis in range(3):
        g = coords.shape[axis + 1]
        other = tuple(a + 1 for a in range(3) if a != axis)
        profile = coords.mean(axis=other, dtype=np.float64)  # (3, g)
        t = voxel_centres(g)
        t = t - t.mean()
        vectors.append(profile @ t / (t @ t))
    return Lattice(np.array(vectors))


def voxelize(structure: Structure, grid: int = 32, periodic: bool = True) -> VoxelCrystal:
    """Encode ``structure`` on a ``grid³`` voxel grid spanning its unit cell.

    Parameters
    ----------
    structure
        An ordered pymatgen Structure.
    grid
        Voxels per cell edge (32 in the paper; any value >= 2).
    periodic
        Minimum-image distances (default) or the paper's plain in-cell distances.

    Raises
    ------
    ValueError
        If the structure is disordered or empty, or ``grid < 2``.
    """
    if not structure.is_ordered:
        raise ValueError("voxelize needs an ordered structure (one species per site)")
    if len(structure) == 0:
        raise ValueError("voxelize needs a structure with at least one site")
    if int(grid) != grid or grid < 2:
        raise ValueError(f"grid must be an integer >= 2; got {grid}")
    grid = int(grid)
    lattice = structure.lattice
    z = np.array([site.specie.Z for site in structure], dtype=np.int64)
    radii = np.array([ionic_radius(int(x)) for x in z], dtype=np.float64)
    frac = np.asarray(structure.frac_coords, dtype=np.float64)
    frac = frac - np.floor(frac)
    if np.all(np.abs(np.asarray(lattice.angles) - 90.0) < _ORTHOGONAL_TOLERANCE_DEGREES):
        density, species = _voxelize_orthogonal(frac, z, radii, lattice, grid, periodic)
    else:
        density, species = _voxelize_general(frac, z, radii, lattice, grid, periodic)
    return VoxelCrystal(
        density=density.astype(np.float32),
        species=species,
        mask=species > 0,
        coords=coordinate_channels(lattice, grid),
        lattice=lattice,
        periodic=periodic,
    )


def _voxelize_orthogonal(frac, z, radii, lattice, grid, periodic):
    # In an orthogonal cell the squared (minimum-image) distance is a sum of per-axis terms, so
    # the Gaussians factorise per axis and each ball touches only a box of voxels.
    lengths = np.asarray(lattice.abc, dtype=np.float64)
    delta = voxel_centres(grid)[None, None, :] - frac[:, :, None]  # (n, 3, g)
    if periodic:
        delta -= np.rint(delta)
    d2 = (delta * lengths[None, :, None]) ** 2  # (n, 3, g), Å²
    r2 = radii**2
    weights = _NORM * z / radii**3
    gauss = np.exp(-d2 / (2.0 * r2)[:, None, None])
    n = len(z)
    gxy = (weights[:, None, None] * gauss[:, 0, :, None]) * gauss[:, 1, None, :]
    density = (gxy.reshape(n, grid * grid).T @ gauss[:, 2, :]).reshape(grid, grid, grid)

    best = np.full((grid, grid, grid), np.inf)
    species = np.zeros((grid, grid, grid), dtype=np.int16)
    for i in range(n):
        inside = d2[i] <= r2[i]
        idx = [np.flatnonzero(inside[a]) for a in range(3)]
        if any(len(ix) == 0 for ix in idx):
            continue
        box = np.ix_(*idx)
        sub = (
            d2[i, 0, idx[0]][:, None, None]
            + d2[i, 1, idx[1]][None, :, None]
            + d2[i, 2, idx[2]][None, None, :]
        )
        current = best[box]
        closer = (sub <= r2[i]) & (sub < current)
        best[box] = np.where(closer, sub, current)
        species[box] = np.where(closer, z[i], species[box])
    return density, species


def _voxelize_general(frac, z, radii, lattice, grid, periodic):
    t = voxel_centres(grid)
    centres = np.stack(np.meshgrid(t, t, t, indexing="ij"), axis=-1).reshape(-1, 3)
    matrix = np.asarray(lattice.matrix, dtype=np.float64)
    density = np.zeros(len(centres))
    best = np.full(len(centres), np.inf)
    species = np.zeros(len(centres), dtype=np.int16)
    if periodic:
        # Minimum image through the LLL-reduced basis, where the 27 neighbouring images suffice.
        lll = np.asarray(lattice.lll_matrix, dtype=np.float64)
        lll_inverse = np.linalg.inv(lll)
        images = np.array(list(itertools.product((-1, 0, 1), repeat=3)), dtype=np.float64) @ lll
    for i in range(len(z)):
        cart = (centres - frac[i]) @ matrix
        if periodic:
            reduced = cart @ lll_inverse
            cart = (reduced - np.rint(reduced)) @ lll
            d2 = np.min(np.sum((cart[None] + images[:, None]) ** 2, axis=-1), axis=0)
        else:
            d2 = np.sum(cart**2, axis=-1)
        r2 = radii[i] ** 2
        density += _NORM * z[i] / radii[i] ** 3 * np.exp(-d2 / (2.0 * r2))
        closer = (d2 <= r2) & (d2 < best)
        best = np.where(closer, d2, best)
        species[closer] = z[i]
    shape = (grid, grid, grid)
    return density.reshape(shape), species.reshape(shape)


def _rotation(k: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    if not 0 <= int(k) < 24 or int(k) != k:
        raise ValueError(f"rotation index k must be an integer in range(24); got {k}")
    return cube_rotations()[int(k)]


def _rotate_array(array: np.ndarray, perm, signs, leading: int = 0) -> np.ndarray:
    axes = tuple(range(leading)) + tuple(p + leading for p in perm)
    out = np.transpose(array, axes)
    flips = tuple(r + leading for r in range(3) if signs[r] < 0)
    if flips:
        out = np.flip(out, axis=flips)
    return np.ascontiguousarray(out)


def _rotated_lattice(lattice: Lattice, perm, signs) -> Lattice:
    # The rotated grid is the same point lattice in the basis rows Q @ M; re-expressing it in
    # pymatgen's standard orientation makes it a proper rotation of the crystal.
    q = np.zeros((3, 3))
    for r in range(3):
        q[r, perm[r]] = signs[r]
    relabelled = Lattice(q @ np.asarray(lattice.matrix))
    return Lattice.from_parameters(*relabelled.abc, *relabelled.angles)


def rotate90(voxel_crystal: VoxelCrystal, k: int) -> VoxelCrystal:
    """Apply cube rotation ``k`` (of :func:`cube_rotations`) to every channel.

    ``rotate90(voxelize(s), k)`` equals ``voxelize(rotate_structure(s, k))``: M, S and S_B are
    rotated on the grid, the lattice lengths and angles are permuted accordingly, and C holds the
    voxel centres of the rotated crystal (for a cubic cell C is unchanged).

    Raises
    ------
    ValueError
        If ``k`` is not in ``range(24)``.
    """
    perm, signs = _rotation(k)
    lattice = _rotated_lattice(voxel_crystal.lattice, perm, signs)
    return VoxelCrystal(
        density=_rotate_array(voxel_crystal.density, perm, signs),
        species=_rotate_array(voxel_crystal.species, perm, signs),
        mask=_rotate_array(voxel_crystal.mask, perm, signs),
        coords=coordinate_channels(lattice, voxel_crystal.grid),
        lattice=lattice,
        periodic=voxel_crystal.periodic,
    )


def rotate_structure(structure: Structure, k: int) -> Structure:
    """The crystal that cube rotation ``k`` turns ``structure`` into (see :func:`rotate90`)."""
    perm, signs = _rotation(k)
    lattice = _rotated_lattice(structure.lattice, perm, signs)
    frac = np.asarray(structure.frac_coords, dtype=np.float64)
    rotated = np.array(signs)[None, :] * (frac[:, list(perm)] - 0.5) + 0.5
    return Structure(lattice, structure.species, rotated)


# ---------------------------------------------------------------------------------------------
# Site channels: a sharp site-centre heatmap and element descriptors carried at each site
# ---------------------------------------------------------------------------------------------

SITE_WIDTH_ANGSTROM = 0.5
"""Width of the site-centre Gaussians: under a third of the shortest site distance of the prior
(about 1.8 Angstrom), so neighbouring peaks stay separate local maxima, and about one voxel of a
16^3 grid over a 6 Angstrom cell, so each peak spans a few voxels."""

DESCRIPTORS = ("atomic_number", "electronegativity", "ionic_radius")
"""Element descriptors carried by the site channels, each scaled to about unit range."""


@cache
def element_descriptors(z: int) -> tuple[float, float, float]:
    """Scaled (Z / 50, (Pauling chi - 1.8) / 0.8, (r - 1.2 Angstrom) / 0.4) of element ``z``.

    Elements without a Pauling electronegativity get 1.8 (the scale's centre).
    """
    from pymatgen.core import Element

    element = Element.from_Z(int(z))
    chi = element.X if element.X == element.X and element.X > 0 else 1.8  # NaN for noble gases
    return (z / 50.0, (float(chi) - 1.8) / 0.8, (ionic_radius(int(z)) - 1.2) / 0.4)


SPECIES_RADIUS_ANGSTROM = 0.75
"""Radius of the voxels that carry a site's species label (:func:`site_species`): under half the
prior's shortest site distance, so each labelled voxel belongs to one site, and wide enough to
label the few voxels around each heatmap peak on a 16^3 grid."""


def site_channels(structure: Structure, grid: int = 16, width: float = SITE_WIDTH_ANGSTROM) -> np.ndarray:
    """Site-centre heatmap and descriptor channels, shape ``(1 + len(DESCRIPTORS), g, g, g)``.

    Channel 0 is ``H_v = Σ_i exp(-d(i, v)² / 2 w²)`` (one peak of height 1 per site, minimum-image
    distances); channel ``1 + k`` is ``Σ_i D_k(Z_i) exp(-d(i, v)² / 2 w²)``, so at a site's peak
    the ratio of channel ``1 + k`` to channel 0 is the site's descriptor ``D_k``
    (:func:`element_descriptors`) and the species is read back as the nearest element.

    Raises
    ------
    ValueError
        If the structure is disordered or empty, or ``grid < 2``.
    """
    return site_maps(structure, grid, width)[0]


def site_species(structure: Structure, grid: int = 16, radius: float = SPECIES_RADIUS_ANGSTROM) -> np.ndarray:
    """Atomic number of the nearest site within ``radius`` Angstrom of each voxel, else 0; ``(g, g, g)`` int16.

    The target of the VAE's species head (cross-entropy at these voxels only).
    """
    return site_maps(structure, grid, species_radius=radius)[1]


def site_maps(
    structure: Structure,
    grid: int = 16,
    width: float = SITE_WIDTH_ANGSTROM,
    *,
    species_radius: float = SPECIES_RADIUS_ANGSTROM,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`site_channels` and :func:`site_species` of ``structure`` in one pass over its sites."""
    if not structure.is_ordered or len(structure) == 0:
        raise ValueError("site_channels needs an ordered, non-empty structure")
    if int(grid) != grid or grid < 2:
        raise ValueError(f"grid must be an integer >= 2; got {grid}")
    grid = int(grid)
    t = voxel_centres(grid)
    centres = np.stack(np.meshgrid(t, t, t, indexing="ij"), axis=-1).reshape(-1, 3)
    lll = np.asarray(structure.lattice.lll_matrix, dtype=np.float64)
    lll_inverse = np.linalg.inv(lll)
    matrix = np.asarray(structure.lattice.matrix, dtype=np.float64)
    images = np.array(list(itertools.product((-1, 0, 1), repeat=3)), dtype=np.float64) @ lll
    out = np.zeros((1 + len(DESCRIPTORS), len(centres)))
    species = np.zeros(len(centres), dtype=np.int16)
    nearest = np.full(len(centres), species_radius**2)
    for site in structure:
        cart = (centres - site.frac_coords) @ matrix
        reduced = cart @ lll_inverse
        cart = (reduced - np.rint(reduced)) @ lll
        d2 = np.min(np.sum((cart[None] + images[:, None]) ** 2, axis=-1), axis=0)
        peak = np.exp(-d2 / (2.0 * width**2))
        out[0] += peak
        out[1:] += np.asarray(element_descriptors(site.specie.Z))[:, None] * peak[None]
        closer = d2 <= nearest
        species[closer], nearest[closer] = site.specie.Z, d2[closer]
    return (
        out.reshape(-1, grid, grid, grid).astype(np.float32),
        species.reshape(grid, grid, grid),
    )


def sites_from_channels(
    channels: np.ndarray,
    lattice: Lattice,
    elements: Sequence[int],
    *,
    relative_threshold: float = 0.5,
    floor: float = 0.1,
    min_separation: float = 0.9,
    species_logits: np.ndarray | None = None,
    vocabulary: Sequence[int] = (),
) -> list[tuple[int, np.ndarray]]:
    """Sites ``(Z, frac)`` read from (decoded) site channels.

    Sites are the periodic local maxima of the heatmap above ``relative_threshold`` times its
    highest value (and above ``floor``), refined by a parabola along each axis; of two closer than
    ``min_separation`` Angstrom the higher is kept. The threshold is relative because every site
    has the same true peak and a blurry decoding lowers them all alike. Each site's descriptors
    are the channel ratios at its voxel, and its species is the element of ``elements`` nearest
    in descriptor space.

    With ``species_logits`` (K, g, g, g), the per-voxel element logits of a VAE's species head over
    ``vocabulary`` (K atomic numbers), a site's species is instead the class of highest
    log-probability summed over the peak voxel and its 26 neighbours, weighted by the heatmap,
    among the classes that are also in ``elements``; descriptors decide only when none is.
    """
    from scipy import ndimage as ndi

    heat = np.asarray(channels[0], dtype=np.float64)
    shape = np.array(heat.shape)
    local = ndi.maximum_filter(heat, size=3, mode="wrap")
    threshold = max(floor, relative_threshold * float(heat.max()))
    peaks = np.argwhere((heat >= local) & (heat > threshold))
    peaks = peaks[np.argsort(-heat[tuple(peaks.T)], kind="stable")]
    table = np.array([element_descriptors(int(z)) for z in elements])
    matrix = np.asarray(lattice.matrix, dtype=np.float64)
    classify = _site_classifier(heat, species_logits, vocabulary, elements)
    kept: list[tuple[int, np.ndarray]] = []
    for index in peaks:
        shift = np.zeros(3)
        for axis in range(3):
            step = np.zeros(3, dtype=int)
            step[axis] = 1
            minus, centre, plus = (heat[tuple((index + s) % shape)] for s in (-step, 0 * step, step))
            curvature = minus - 2 * centre + plus
            if curvature < 0:
                shift[axis] = float(np.clip(0.5 * (minus - plus) / curvature, -0.5, 0.5))
        frac = ((index + 0.5 + shift) / shape) % 1.0
        if any(_min_image(frac - other, matrix) < min_separation for _, other in kept):
            continue
        if classify is not None:
            z = classify(index)
        else:
            descriptors = (
                np.asarray(channels[1:, index[0], index[1], index[2]], dtype=np.float64) / heat[tuple(index)]
            )
            z = int(elements[int(np.argmin(((table - descriptors) ** 2).sum(axis=1)))])
        kept.append((z, frac))
    return kept


def _site_classifier(heat: np.ndarray, logits: np.ndarray | None, vocabulary: Sequence[int], elements):
    """``index -> Z`` from the species head's logits around a peak, or ``None`` when it cannot decide."""
    if logits is None or not len(vocabulary):
        return None
    allowed = {int(z) for z in elements}
    columns = [k for k, z in enumerate(vocabulary) if int(z) in allowed]
    if not columns:
        return None
    logits = np.asarray(logits, dtype=np.float64)
    # log-softmax over the whole vocabulary, then the best allowed class
    shifted = logits - logits.max(axis=0, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=0, keepdims=True))
    log_p = log_p[columns]
    shape = np.array(heat.shape)
    offsets = np.array(list(itertools.product((-1, 0, 1), repeat=3)))

    def classify(index: np.ndarray) -> int:
        cells = (index[None] + offsets) % shape
        weights = heat[tuple(cells.T)].clip(min=0.0)
        score = log_p[:, cells[:, 0], cells[:, 1], cells[:, 2]] @ weights
        return int(vocabulary[columns[int(np.argmax(score))]])

    return classify


def _min_image(delta: np.ndarray, matrix: np.ndarray) -> float:
    delta = np.asarray(delta, dtype=np.float64) - np.round(delta)
    return float(np.linalg.norm(delta @ matrix))
