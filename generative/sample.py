"""Latent sampling strategies: where in latent space, and under which condition decile, to decode.

Each strategy returns a :class:`LatentSamples`: the latent vectors, their one-hot decile
conditions and, per row, what it came from. Decoding them is
:meth:`crystaloop.generative.decode.Decoder.decode`.

- ``random``: z ~ N(0, I) (or the VAE's fitted latent prior, when passed the VAE), with the
  condition deciles spread over those the target window spans.
- ``around_base``: z ~ N(mu_base, std^2 I) around the encoder means of base compounds. ``std`` is a
  standard deviation: the paper's "variance 0.5" is ``std = sqrt(0.5)`` (the reference code
  confused the two).
- ``interpolate``: straight lines between the encoder means of consecutive base compounds.
- ``optimize``: gradient steps on z toward the window through the VAE's property head (FTCP,
  paper 004), from random or base starts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from crystaloop.generative.models.condition import N_DECILES, DecileCondition


@dataclass
class LatentSamples:
    """Latent vectors ready to decode.

    Attributes
    ----------
    z
        (n, latent_dim) latent vectors.
    condition
        (n, 10) one-hot decile conditions.
    rows
        One dict per row: ``decile`` and, where relevant, ``base_formula``/``base_formulas`` and
        ``step`` (position along an interpolation path, 0..1).
    strategy
        The strategy name.
    parameters
        The strategy's parameters (std, steps ...), for provenance.
    """

    z: torch.Tensor
    condition: torch.Tensor
    rows: list[dict[str, Any]]
    strategy: str
    parameters: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.z.shape[0])


def variance_to_std(variance: float) -> float:
    """The standard deviation of a latent perturbation given as a variance (paper: 0.5 -> 0.707)."""
    if variance <= 0:
        raise ValueError(f"variance must be positive; got {variance}")
    return math.sqrt(variance)


def window_deciles(condition: DecileCondition, lower: float | None, upper: float | None) -> list[int]:
    """Decile indices that a target window spans (an open bound reaches the outer decile)."""
    lo = -math.inf if lower is None else lower
    hi = math.inf if upper is None else upper
    first, last = (int(i) for i in condition.index([lo, hi]))
    return list(range(first, last + 1))


def spread_deciles(n: int, deciles: Sequence[int]) -> np.ndarray:
    """``n`` decile indices that cycle through ``deciles``, so each gets n/len(deciles) samples."""
    if not deciles:
        raise ValueError("no deciles to spread samples over")
    return np.asarray(deciles, dtype=np.int64)[np.arange(n) % len(deciles)]


def one_hot(deciles: Sequence[int] | np.ndarray) -> torch.Tensor:
    """(n, 10) float one-hot rows for decile indices."""
    idx = torch.as_tensor(np.asarray(deciles, dtype=np.int64))
    return torch.nn.functional.one_hot(idx, N_DECILES).float()


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def sample_random(
    latent_dim: int, n: int, deciles: Sequence[int], *, seed: int, vae=None, prior: str = "auto"
) -> LatentSamples:
    """z ~ N(0, I) with conditions cycling over ``deciles``.

    Given the ``vae``, z comes from its fitted latent prior when it stores one (``prior`` as in
    :meth:`~crystaloop.generative.models.vae.CondDFCVAE.sample_latent`).
    """
    if vae is not None and hasattr(vae, "sample_latent"):
        z = vae.sample_latent(n, prior=prior, generator=_generator(seed))
    else:
        z = torch.randn(n, latent_dim, generator=_generator(seed))
    rows_deciles = spread_deciles(n, deciles)
    rows = [{"decile": int(d)} for d in rows_deciles]
    return LatentSamples(z, one_hot(rows_deciles), rows, "random", {"deciles": list(map(int, deciles))})


def sample_around_bases(
    means: torch.Tensor,
    formulas: Sequence[str],
    base_deciles: Sequence[Sequence[int]],
    n: int,
    *,
    std: float,
    seed: int,
) -> LatentSamples:
    """z ~ N(mu_base, std^2 I), the ``n`` samples split evenly over the bases.

    Parameters
    ----------
    means
        (k, latent_dim) encoder means of the base compounds.
    formulas
        Their reduced formulas (recorded per row).
    base_deciles
        Per base, the deciles to condition on (its own, or the target window's).
    std
        Standard deviation of the perturbation (latent units), not a variance.
    """
    if std <= 0:
        raise ValueError(f"std must be positive; got {std}")
    k = means.shape[0]
    if k == 0 or k != len(formulas) or k != len(base_deciles):
        raise ValueError("need one formula and one decile list per base mean")
    which = np.arange(n) % k
    generator = _generator(seed)
    noise = torch.randn(n, means.shape[1], generator=generator) * std
    z = means[torch.as_tensor(which)] + noise
    deciles, rows, seen = [], [], np.zeros(k, dtype=np.int64)
    for b in which:
        options = base_deciles[b]
        decile = int(options[seen[b] % len(options)])
        seen[b] += 1
        deciles.append(decile)
        rows.append({"decile": decile, "base_formula": formulas[b]})
    return LatentSamples(z, one_hot(deciles), rows, "around_base", {"std": std, "bases": list(formulas)})


def sample_interpolation(
    means: torch.Tensor,
    formulas: Sequence[str],
    base_deciles: Sequence[Sequence[int]],
    n: int,
    *,
    steps: int,
    std: float,
    seed: int,
) -> LatentSamples:
    """Points on straight lines between consecutive bases (``steps`` points per line, ends included).

    The first pass over the paths gives the exact points; when ``n`` asks for more, later passes
    add N(0, std^2) noise to them. A point takes the condition of the nearer end.
    """
    k = means.shape[0]
    if k < 2:
        raise ValueError("interpolation needs at least two base compounds")
    path = []
    for a in range(k - 1):
        for t in np.linspace(0.0, 1.0, steps):
            path.append((a, a + 1, float(t)))
    generator = _generator(seed)
    z = torch.empty(n, means.shape[1])
    deciles, rows = [], []
    for i in range(n):
        a, b, t = path[i % len(path)]
        z[i] = (1 - t) * means[a] + t * means[b]
        if i >= len(path):
            z[i] += torch.randn(means.shape[1], generator=generator) * std
        near = a if t < 0.5 else b
        options = base_deciles[near]
        decile = int(options[(i // len(path)) % len(options)])
        deciles.append(decile)
        rows.append({"decile": decile, "base_formulas": [formulas[a], formulas[b]], "step": t})
    return LatentSamples(
        z, one_hot(deciles), rows, "interpolate", {"steps": steps, "std": std, "bases": list(formulas)}
    )


def optimize_samples(
    vae,
    start: LatentSamples,
    property_name: str,
    window: tuple[float, float],
    *,
    steps: int,
) -> LatentSamples:
    """Move the ``start`` latent vectors toward ``window`` through the VAE's property head.

    Raises
    ------
    ValueError
        If the VAE has no property head predicting ``property_name``.
    """
    from crystaloop.generative.models.vae import optimize_latent

    if property_name not in getattr(vae, "properties", []):
        raise ValueError(
            f"the VAE has no property head for {property_name!r} (it predicts {vae.properties or 'nothing'}); "
            "train one with configs/train/paper/vae_joint.yaml or use another sampling mode"
        )
    device = next(vae.parameters()).device
    z = optimize_latent(vae, start.z.to(device), property_name, window, steps=steps).cpu()
    parameters = {**start.parameters, "start": start.strategy, "steps": steps, "window": list(window)}
    return LatentSamples(z, start.condition, [dict(r) for r in start.rows], "optimize", parameters)
