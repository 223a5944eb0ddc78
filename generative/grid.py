"""Voxel-grid geometry with numpy alone: voxel centres, coordinate channels, cube rotations.

Kept apart from :mod:`crystaloop.generative.representation` (which needs pymatgen) so that the
GPU trainer, which has only torch and numpy, uses the same functions as the CPU code.
"""

from __future__ import annotations

import itertools
from functools import cache

import numpy as np


def voxel_centres(grid: int) -> np.ndarray:
    """Fractional coordinates ``(i + 1/2) / grid`` of the voxel centres along one axis."""
    return (np.arange(grid, dtype=np.float64) + 0.5) / grid


def _centres(t, m):
    # x[j] = t_a m[0, j] + t_b m[1, j] + t_c m[2, j] over the grid, for one (3, 3) or (B, 3, 3) m
    return (
        t[None, :, None, None] * m[..., 0, :, None, None, None]
        + t[None, None, :, None] * m[..., 1, :, None, None, None]
        + t[None, None, None, :] * m[..., 2, :, None, None, None]
    )


def coordinate_channels(lattice, grid: int = 32):
    """Cartesian coordinates (Å) of the voxel centres.

    Parameters
    ----------
    lattice
        A pymatgen ``Lattice`` or a 3 × 3 matrix (rows are the lattice vectors): the result is a
        float32 numpy array ``(3, g, g, g)``. A torch tensor of matrices ``(B, 3, 3)`` gives a
        tensor ``(B, 3, g, g, g)`` in its dtype and on its device.
    grid
        Voxels per cell edge.

    Raises
    ------
    ValueError
        If a single matrix is not 3 × 3.
    """
    matrix = getattr(lattice, "matrix", lattice)
    if type(matrix).__module__.startswith("torch"):
        import torch

        t = (torch.arange(grid, dtype=matrix.dtype, device=matrix.device) + 0.5) / grid
        return _centres(t, matrix)
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape != (3, 3):
        raise ValueError(f"lattice matrix must be 3 × 3; got {matrix.shape}")
    return _centres(voxel_centres(grid), matrix).astype(np.float32)


@cache
def cube_rotations() -> tuple[tuple[tuple[int, int, int], tuple[int, int, int]], ...]:
    """The 24 proper rotations of the cube as ``(axis permutation, axis signs)``, identity first.

    Rotation ``(perm, signs)`` sends fractional offsets from the cell centre ``u`` to ``u'`` with
    ``u'[r] = signs[r] * u[perm[r]]``.
    """
    rotations = []
    for perm in itertools.permutations(range(3)):
        parity = np.linalg.det(np.eye(3)[list(perm)])
        for signs in itertools.product((1, -1), repeat=3):
            if round(parity * np.prod(signs)) == 1:
                rotations.append((tuple(perm), tuple(signs)))
    return tuple(rotations)
