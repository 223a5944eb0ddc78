"""The ``paper`` decoder: the UNet's species map, then the periodic watershed of Algorithm S1.

:class:`WatershedDecoder` runs the UNet on the decoded eq. 1 density (upsampled to the UNet's
32^3 grid when the VAE decodes a coarser one), keeps the species head's best allowed class
inside the mask, and splits the map into atoms with :func:`segment`.

Algorithm S1 (Court et al. 2020, SI) labels the connected components of the binary mask. A
component whose convexity ``nonzero(R) / nonzero(convex hull of R)`` exceeds ``min_convexity`` is
one atom; otherwise it is eroded for the certain foreground, the eroded components become markers,
a watershed splits the component, and every piece goes through the same test again.

This implementation is periodic by default:

- components are joined through the cell faces, and each one is unwrapped to a contiguous crop
  before its convex hull (scikit-image ``convex_hull_image``) is measured;
- a component that wraps onto itself around the cell (touching ions forming a network) cannot
  be one atom's ball, so it is split on the full cell with wrap-around erosion, labelling and
  watershed;
- positions are periodic means, returned as fractional coordinates in ``[0, 1)``.

Choices the paper leaves open, stated here:

- The certain foreground is one erosion of each species class separately (``split_species``), so
  touching ions of different species separate at once; ``split_species=False`` erodes the
  binary mask as in the paper. If one erosion leaves fewer than two markers the erosion is
  repeated until it does or the eroded foreground falls under ``min_size`` voxels (the paper's
  termination), so overlapping balls of one species separate; ``max_iterations`` bounds the
  recursion depth. Marker components under ``min_size`` voxels (slivers left where balls
  overlap) are dropped. A species component of at least ``min_size`` voxels that erosion removed
  entirely becomes a marker of its own, so a small ion next to a large one is not swallowed.
- With ``split_species``, a region holding at least ``min_size`` voxels of each of two species
  is split whatever its convexity: a small ion touching a large one barely dents the
  convexity of their union.
- The certain background of the paper (one dilation) is the region itself: the watershed is
  confined to the mask.
- The watershed landscape is the negative density when a density map is given (flooded one
  species at a time with ``split_species``), otherwise the negative taxicab distance to the
  nearest voxel that is background or of another species.
- A region found to be one atom is remembered for the call, so translated copies of it (the fcc
  sublattices of rock salt, zinc blende and Heuslers) are not tested again.
- Species are a majority vote of the non-zero species labels over the region (of the argmax
  classes, when probabilities are given).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage as ndi
from skimage.morphology import convex_hull_image
from skimage.segmentation import watershed

from crystaloop.generative.decoders.base import SEGMENT_GRID, DecodedMaps, Job, Site, SiteReader, SiteResult

_FACE_STRUCTURE = ndi.generate_binary_structure(3, 1)


def segment(
    species_or_probabilities: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    density: np.ndarray | None = None,
    classes: Sequence[int] | None = None,
    periodic: bool = True,
    min_convexity: float = 0.8,
    max_iterations: int = 5,
    min_size: int = 8,
    split_species: bool = True,
) -> list[Site]:
    """Segment a species map into atomic sites (Algorithm S1, periodic by default).

    Parameters
    ----------
    species_or_probabilities
        Either a ``(g, g, g)`` integer map of atomic numbers (0 = background), or
        ``(n_classes, g, g, g)`` class probabilities or logits whose argmax is the species.
    mask
        ``(g, g, g)`` occupancy S_B; defaults to ``species > 0``.
    density
        Optional ``(g, g, g)`` density used as the watershed landscape.
    classes
        Atomic number of each probability channel (default: the channel index is Z).
    periodic
        Join components across cell faces and use periodic means (default). ``False`` is the
        paper's non-periodic variant.
    min_convexity
        A region whose convexity exceeds this is one atom (paper: 0.8).
    max_iterations
        Maximum recursion (erosion) levels (paper: 5).
    min_size
        Regions under this many voxels are not split further (paper: 8).
    split_species
        Erode each species class separately (default) rather than the binary mask.

    Returns
    -------
    list of Site
        Sites in the order their regions were found; regions with no species label are skipped.

    Raises
    ------
    ValueError
        If the shapes are inconsistent.
    """
    labels = _labels(species_or_probabilities, classes)
    if mask is None:
        mask = labels > 0
    mask = np.asarray(mask).astype(bool)
    if mask.shape != labels.shape or labels.ndim != 3:
        raise ValueError(f"species map {labels.shape} and mask {mask.shape} must be the same 3-D shape")
    if density is not None and np.shape(density) != labels.shape:
        raise ValueError(f"density {np.shape(density)} must have the shape {labels.shape}")
    segmenter = _Segmenter(
        labels=np.where(mask, labels, 0),
        mask=mask,
        density=None if density is None else np.asarray(density, dtype=np.float64),
        periodic=periodic,
        min_convexity=min_convexity,
        max_iterations=max_iterations,
        min_size=min_size,
        split_species=split_species,
    )
    sites = []
    for region, unwrapped in segmenter.regions():
        species = _vote(region, segmenter.labels)
        if species <= 0:
            continue
        sites.append(
            Site(
                species=species,
                frac_coords=segmenter.centroid(region, unwrapped),
                n_voxels=len(region),
            )
        )
    return sites


def periodic_label(mask: np.ndarray, periodic: bool = True) -> tuple[np.ndarray, int]:
    """Face-connected components of ``mask``, joined through the cell faces when periodic."""
    labels, n = ndi.label(mask, structure=_FACE_STRUCTURE)
    if not periodic or n < 2:
        return labels, n
    first, last = [], []
    for axis in range(3):
        a = np.take(labels, 0, axis=axis).ravel()
        b = np.take(labels, -1, axis=axis).ravel()
        both = (a > 0) & (b > 0)
        first.append(a[both])
        last.append(b[both])
    codes = np.unique(np.concatenate(first) * (n + 1) + np.concatenate(last))
    if len(codes) == 0:
        return labels, n
    pairs = np.stack([codes // (n + 1), codes % (n + 1)], axis=1).tolist()
    parent = np.arange(n + 1)

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([root(x) for x in range(n + 1)])
    # Renumber so that background stays 0 and components are 1..m in order of first label.
    _, remap = np.unique(roots[1:], return_inverse=True)
    lookup = np.concatenate([[0], remap + 1])
    return lookup[labels], int(remap.max()) + 1


def _labels(data, classes) -> np.ndarray:
    data = np.asarray(data)
    if data.ndim == 4:
        index = np.argmax(data, axis=0)
        lookup = np.arange(data.shape[0]) if classes is None else np.asarray(classes)
        if len(lookup) != data.shape[0]:
            raise ValueError(f"{len(lookup)} classes for {data.shape[0]} probability channels")
        return lookup[index].astype(np.int64)
    if data.ndim != 3:
        raise ValueError(f"species map must be (g, g, g) or (n_classes, g, g, g); got {data.shape}")
    if np.issubdtype(data.dtype, np.floating):
        data = np.rint(data)
    return data.astype(np.int64)


def _vote(region, labels) -> int:
    i, j, k = region.T
    values = labels[i, j, k]
    values = values[values > 0]
    if len(values) == 0:
        return 0
    counts = np.bincount(values)
    return int(np.argmax(counts))


def _convexity(crop: np.ndarray, cache: dict) -> float:
    key = (crop.shape, np.packbits(crop).tobytes())
    if key not in cache:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hull = np.count_nonzero(convex_hull_image(crop))
        # A flat region has no 3-D hull; it is too thin to hold two atoms.
        cache[key] = 1.0 if hull == 0 else np.count_nonzero(crop) / hull
    return cache[key]


@dataclass
class _Segmenter:
    labels: np.ndarray
    mask: np.ndarray
    density: np.ndarray | None
    periodic: bool
    min_convexity: float
    max_iterations: int
    min_size: int
    split_species: bool

    def __post_init__(self) -> None:
        self.shape = np.array(self.labels.shape)
        self._hulls: dict = {}
        self._atoms: set = set()

    def regions(self) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """One ``(coords, unwrapped)`` pair per atom: voxel indices ``(k, 3)`` wrapped into the
        cell, and the same shifted to be contiguous (None if the region wraps around)."""
        components, n = periodic_label(self.mask, self.periodic)
        if n == 0:
            return []
        flat = components.ravel()
        order = np.argsort(flat, kind="stable")
        bounds = np.searchsorted(flat[order], np.arange(1, n + 2))
        out = []
        for c in range(n):
            idx = order[bounds[c] : bounds[c + 1]]
            coords = np.stack(np.unravel_index(idx, self.labels.shape), axis=1)
            out.extend(self._segment(coords, depth=0))
        return out

    def centroid(self, region: np.ndarray, unwrapped: np.ndarray | None) -> np.ndarray:
        """Periodic mean of the region's voxel centres, fractional, in ``[0, 1)``."""
        if unwrapped is not None:
            frac = (unwrapped.mean(axis=0) + 0.5) / self.shape
        else:
            angle = 2.0 * np.pi * (region + 0.5) / self.shape
            frac = np.arctan2(np.sin(angle).mean(axis=0), np.cos(angle).mean(axis=0))
            frac = frac / (2.0 * np.pi)
        return frac - np.floor(frac)

    def _unwrap(self, coords: np.ndarray) -> np.ndarray | None:
        """Shift coordinates across the faces so the region is contiguous; None if it wraps."""
        if not self.periodic:
            return coords
        out = coords.copy()
        for axis in range(3):
            g = int(self.shape[axis])
            occupied = np.flatnonzero(np.bincount(coords[:, axis], minlength=g))
            gaps = np.diff(np.append(occupied, occupied[0] + g))
            j = int(np.argmax(gaps))
            if gaps[j] <= 1:
                return None
            start = occupied[(j + 1) % len(occupied)]
            out[:, axis] = (coords[:, axis] - start) % g + start
        return out

    def _segment(self, coords: np.ndarray, depth: int) -> list[tuple[np.ndarray, np.ndarray | None]]:
        unwrapped = self._unwrap(coords)
        atom = [(coords, unwrapped)]
        if len(coords) < self.min_size or depth >= self.max_iterations:
            return atom
        wrap = unwrapped is None
        if wrap:
            origin = np.zeros(3, dtype=np.int64)
            region = np.zeros(self.labels.shape, dtype=bool)
            region[tuple(coords.T)] = True
        else:
            origin = unwrapped.min(axis=0) - 1
            local = unwrapped - origin
            region = np.zeros(tuple(local.max(axis=0) + 2), dtype=bool)
            region[tuple(local.T)] = True
        lab = self._gather(self.labels, region, origin, 0) if self.split_species else region
        lab = np.where(region, lab, -1).astype(np.int64)
        # Markers first: a region that no erosion splits is one atom whatever its convexity, so
        # the (costly) hull is only measured when it decides something. A region that wraps
        # around the cell cannot be one atom's ball and is split without the test.
        key = None if wrap else (lab.shape, lab.tobytes())
        if key is not None and key in self._atoms:
            return atom
        counts = np.bincount(lab[region])
        several_species = self.split_species and np.count_nonzero(counts >= self.min_size) > 1
        markers, erosions = self._markers(lab, wrap, several_species)
        if markers is None or (
            not wrap and not several_species and _convexity(region, self._hulls) > self.min_convexity
        ):
            # Translated copies of a region (fcc sublattices) get the same answer.
            if key is not None:
                self._atoms.add(key)
            return atom
        pieces = self._watershed(region, lab, markers, origin, pad=erosions + 1 if wrap else 0)
        if len(pieces) < 2:
            return atom
        out = []
        for piece in pieces:
            out.extend(self._segment(piece, depth + 1))
        return out

    def _gather(self, array: np.ndarray, region: np.ndarray, origin: np.ndarray, fill):
        """Values of a cell array on the region's grid (crop or full cell), ``fill`` outside."""
        idx = np.nonzero(region)
        out = np.full(region.shape, fill, dtype=array.dtype)
        cell = tuple((idx[a] + origin[a]) % self.shape[a] for a in range(3))
        out[idx] = array[cell]
        return out

    def _label(self, image: np.ndarray, wrap: bool) -> tuple[np.ndarray, int]:
        if wrap:
            return periodic_label(image, True)
        return ndi.label(image, structure=_FACE_STRUCTURE)

    def _markers(self, lab: np.ndarray, wrap: bool, several_species: bool) -> tuple[np.ndarray | None, int]:
        """Watershed markers from repeated erosion (at least two) and the erosions used."""
        foreground = _erode(lab, wrap=wrap)
        if wrap or several_species:
            taxicab = None
        else:
            # In one species the k-th erosion is the set at taxicab depth >= k in the first one.
            # Every component of a level set holds a regional maximum of that depth, so a single
            # maximum means no erosion can split the region.
            taxicab = ndi.distance_transform_cdt(foreground, metric="taxicab")
            peaks = (taxicab == ndi.maximum_filter(taxicab, footprint=_FACE_STRUCTURE)) & foreground
            peak_labels, n_peaks = ndi.label(peaks, structure=_FACE_STRUCTURE)
            if n_peaks <= 1:
                return None, 1
            heights = np.zeros(n_peaks + 1, dtype=taxicab.dtype)
            np.maximum.at(heights, peak_labels[peaks], taxicab[peaks])
            heights = heights[1:]
            # Level k has at most as many components as there are peaks of height >= k.
            last_level = int(np.sort(heights)[-2])
        erosions = 0
        while True:
            erosions += 1
            if taxicab is not None and erosions > last_level:
                return None, erosions
            if erosions > 1:
                if taxicab is None:
                    foreground = _erode(np.where(foreground, lab, -1), wrap=wrap)
                else:
                    foreground = taxicab >= erosions
            if np.count_nonzero(foreground) < self.min_size:
                return None, erosions
            markers, n = self._label(foreground, wrap)
            if n < 2 and not several_species:
                continue
            markers, n = self._drop_small(markers, n)
            if several_species:
                markers, n = self._add_lost_species(markers, n, lab, wrap)
            if n >= 2:
                return markers, erosions

    def _watershed(self, region, lab, markers, origin, pad) -> list[np.ndarray]:
        """Watershed pieces of a region as wrapped cell coordinates.

        A region that wraps around the cell is padded periodically by ``pad`` voxels (more than
        the erosion depth, so every voxel sees the marker copies that can reach it) and cropped
        back after the watershed.
        """
        if self.density is not None:
            landscape = -self._gather(self.density, region, origin, 0.0)
        else:
            landscape = _erode(lab, wrap=pad > 0, same_species_only=True)
        if pad:
            landscape = np.pad(landscape, pad, mode="wrap")
            markers = np.pad(markers, pad, mode="wrap")
            region = np.pad(region, pad, mode="wrap")
        if self.density is None:
            landscape = -ndi.distance_transform_cdt(landscape, metric="taxicab")
        if self.density is not None and self.split_species:
            # The density does not stop at species boundaries; flood each species separately.
            lab_padded = np.pad(lab, pad, mode="wrap") if pad else lab
            pieces = np.zeros(markers.shape, dtype=markers.dtype)
            for z in np.unique(lab_padded[lab_padded > 0]):
                inside = lab_padded == z
                pieces += watershed(landscape, np.where(inside, markers, 0), mask=inside, connectivity=1)
        else:
            pieces = watershed(landscape, markers, mask=region, connectivity=1)
        if pad:
            pieces = pieces[pad:-pad, pad:-pad, pad:-pad]
            region = region[pad:-pad, pad:-pad, pad:-pad]
        unassigned = region & (pieces == 0)
        if unassigned.any():
            # Voxels no marker flooded within the padding join the nearest piece.
            nearest = ndi.distance_transform_edt(pieces == 0, return_distances=False, return_indices=True)
            pieces = np.where(unassigned, pieces[tuple(nearest)], pieces)
        flat = pieces.ravel()
        order = np.argsort(flat, kind="stable")
        ids = np.unique(flat)
        bounds = np.searchsorted(flat[order], np.append(ids, ids[-1] + 1))
        out = []
        for c, label in enumerate(ids):
            if label == 0:
                continue
            idx = order[bounds[c] : bounds[c + 1]]
            local = np.stack(np.unravel_index(idx, region.shape), axis=1)
            out.append((local + origin) % self.shape)
        return out

    def _drop_small(self, markers: np.ndarray, n: int) -> tuple[np.ndarray, int]:
        """Remove marker components under ``min_size`` voxels (erosion slivers at necks)."""
        if n == 0:
            return markers, n
        sizes = np.bincount(markers.ravel(), minlength=n + 1)
        keep = sizes >= self.min_size
        keep[0] = False
        if keep[1:].all():
            return markers, n
        lookup = np.zeros(n + 1, dtype=markers.dtype)
        lookup[keep] = np.arange(1, int(keep.sum()) + 1)
        return lookup[markers], int(keep.sum())

    def _add_lost_species(self, markers, n, lab, wrap):
        """Give a marker to every sizeable species component that erosion removed entirely."""
        if not self.split_species:
            return markers, n
        for z in np.unique(lab[lab > 0]):
            parts, m = self._label(lab == z, wrap)
            if m == 0:
                continue
            sizes = np.bincount(parts.ravel(), minlength=m + 1)
            marked = np.unique(parts[(markers > 0) & (parts > 0)])
            for part in range(1, m + 1):
                if sizes[part] >= self.min_size and part not in marked:
                    n += 1
                    markers = np.where(parts == part, n, markers)
        return markers, n


def _erode(lab: np.ndarray, wrap: bool, same_species_only: bool = False) -> np.ndarray:
    """Erosion of labelled regions (-1 = outside) with the face-connected cross.

    With ``wrap`` the array is a periodic cell; otherwise its border voxels must be outside.
    With ``same_species_only`` a voxel is removed only when a neighbour inside the region has a
    different label (background neighbours are allowed); otherwise any differing neighbour
    removes it.
    """
    if not wrap:
        out = np.zeros(lab.shape, dtype=bool)
        out[1:-1, 1:-1, 1:-1] = _erode_interior(lab, same_species_only)
        return out
    padded = np.pad(lab, 1, mode="wrap")
    return _erode_interior(padded, same_species_only)


def _erode_interior(padded: np.ndarray, same_species_only: bool) -> np.ndarray:
    """Erosion of the interior ``[1:-1, 1:-1, 1:-1]`` of ``padded``."""
    centre = padded[1:-1, 1:-1, 1:-1]
    out = centre >= 0
    for neighbour in (
        padded[2:, 1:-1, 1:-1],
        padded[:-2, 1:-1, 1:-1],
        padded[1:-1, 2:, 1:-1],
        padded[1:-1, :-2, 1:-1],
        padded[1:-1, 1:-1, 2:],
        padded[1:-1, 1:-1, :-2],
    ):
        if same_species_only:
            out &= (neighbour == centre) | (neighbour < 0)
        else:
            out &= neighbour == centre
    return out


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


def read_watershed(job: Job) -> SiteResult:
    """Worker: a species map (Z per voxel, 0 outside the mask) and its density to sites."""
    species, density = job
    if not (species > 0).any():
        return [], "no sites", []
    sites = segment(species, species > 0, density=density)
    if not sites:
        return [], "no sites", []
    found = [(s.species, s.frac_coords) for s in sites]
    return found, None, found


class WatershedDecoder(SiteReader):
    """The paper's path: UNet species and mask, then Algorithm S1 (needs the UNet)."""

    name = "paper"
    representation = "density"
    needs_unet = True
    read = staticmethod(read_watershed)

    def __init__(self, vae, *, unet=None, device="cpu") -> None:
        if unet is None:
            raise ValueError("the paper decoder needs a UNet; pass one (--unet)")
        super().__init__(vae, unet=unet.to(device).eval(), device=device)

    @torch.no_grad()
    def species_maps(
        self, density: torch.Tensor, spacing: torch.Tensor, elements: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Atomic numbers per voxel (B, g, g, g) inside the UNet's mask, 0 outside.

        ``spacing`` (B, 3) are the voxel edges (Angstrom); ``elements`` (atomic numbers) restrict
        the species head's choice.
        """
        out = self.unet(density[:, None], spacing)
        logits = out.species_logits[:, 1:]
        if elements is not None:
            allowed = {int(z) for z in elements}
            keep = torch.tensor([z in allowed for z in self.unet.vocabulary.atomic_numbers[1:]])
            logits = logits.masked_fill(~keep.to(logits.device)[None, :, None, None, None], float("-inf"))
        best = self.unet.vocabulary.decode(logits.argmax(dim=1) + 1)
        inside = torch.sigmoid(out.mask_logits[:, 0]) > 0.5
        return torch.where(inside, best, torch.zeros_like(best))

    @torch.no_grad()
    def jobs(self, maps: DecodedMaps, elements: Sequence[int]) -> list[Job]:
        from crystaloop.generative.models.unet import voxel_spacing
        from crystaloop.generative.representation import coordinate_channels

        density = maps.channels.to(self.device)
        fine = upsample(density, SEGMENT_GRID) if density.shape[-1] < SEGMENT_GRID else density
        grid = fine.shape[-1]
        spacing = torch.stack(
            [
                voxel_spacing(torch.from_numpy(coordinate_channels(maps.lattices[i], grid))[None])[0]
                if maps.problems[i] is None
                else voxel_spacing(maps.coords[i : i + 1].float().cpu())[0]
                for i in range(len(maps.lattices))
            ]
        ).to(fine.device)
        species = self.species_maps(fine, spacing, elements).cpu().numpy()
        fine_np = fine.cpu().numpy()
        return [(species[i], fine_np[i]) for i, ok in enumerate(maps.readable) if ok]
