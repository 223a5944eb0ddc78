"""Fine-tune a trained CGCNN ensemble on new labelled structures (e.g. DFT results): a task of
:func:`crystaloop.generative.train.fit.fit`.

Each member is fine-tuned on its own bootstrap sample of the data, with a
per-structure weight, so DFT labels can outrank the prior labels they correct.
Normalisation and the variance calibration of the ensemble are kept.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from pymatgen.core import Structure

from crystaloop.generative.models.cgcnn import collate_graphs
from crystaloop.generative.models.ensemble import CGCNNEnsemble
from crystaloop.generative.train.config import OptimConfig
from crystaloop.generative.train.fit import fit, pick_device, seed_everything
from crystaloop.generative.train.tasks import CGCNNTask


def label_matrix(
    labels: Sequence[dict[str, float | None]], properties: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """(N, P) values (NaN where missing) and 0/1 presence for ``properties``."""
    values = np.array(
        [[np.nan if row.get(p) is None else float(row[p]) for p in properties] for row in labels],
        dtype=np.float32,
    ).reshape(len(labels), len(properties))
    return values, np.isfinite(values).astype(np.float32)


@torch.no_grad()
def predict_structures(
    ensemble: CGCNNEnsemble, structures: Sequence[Structure], *, batch_size: int = 128, device: str = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """Ensemble mean and std, (N, P) in property units, for ``structures``."""
    model = ensemble.to(device).eval()
    member = model.members[0]
    means, stds = [], []
    for start in range(0, len(structures), batch_size):
        graphs = [member.graph(s) for s in structures[start : start + batch_size]]
        mean, std = model.predict(collate_graphs(graphs).to(device))
        means.append(mean.cpu().numpy())
        stds.append(std.cpu().numpy())
    n_props = len(model.properties)
    if not means:
        return np.zeros((0, n_props)), np.zeros((0, n_props))
    return np.concatenate(means), np.concatenate(stds)


def mean_absolute_errors(
    mean: np.ndarray, values: np.ndarray, properties: Sequence[str]
) -> dict[str, float | None]:
    """Per-property MAE over the entries where both prediction and label are finite."""
    out: dict[str, float | None] = {}
    for i, name in enumerate(properties):
        ok = np.isfinite(mean[:, i]) & np.isfinite(values[:, i])
        out[name] = float(np.abs(mean[ok, i] - values[ok, i]).mean()) if ok.any() else None
    return out


def finetune_ensemble(
    ensemble: CGCNNEnsemble,
    structures: Sequence[Structure],
    labels: Sequence[dict[str, float | None]],
    weights: Sequence[float],
    *,
    epochs: int = 20,
    lr: float = 3e-4,
    batch_size: int = 64,
    seed: int = 0,
    device: str = "auto",
) -> dict[str, float]:
    """Fine-tune every member in place on ``structures`` with per-structure ``weights``.

    Parameters
    ----------
    ensemble
        The trained ensemble (changed in place).
    structures, labels
        Structures and their labels keyed by property name (units per property).
    weights
        Loss weight per structure (e.g. 1 for prior labels, 5 for DFT labels).
    epochs, lr, batch_size, seed
        Optimisation settings; each member draws its own bootstrap sample from ``seed``.

    Returns
    -------
    dict
        ``loss_first_epoch`` and ``loss_last_epoch`` (weighted normalised MSE, mean over members).
    """
    if len(structures) != len(labels) or len(structures) != len(weights):
        raise ValueError("structures, labels and weights must have the same length")
    if not structures:
        raise ValueError("nothing to fine-tune on")
    torch_device = pick_device(device)
    seed_everything(seed)
    properties = ensemble.properties
    values, present = label_matrix(labels, properties)
    graphs = [ensemble.members[0].graph(s) for s in structures]
    w = np.asarray(weights, dtype=np.float32)
    # no validation split, no gradient clipping, a constant rate: the last weights are kept
    optim = OptimConfig(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, grad_clip=None)
    first, last = [], []
    ensemble.to(torch_device)
    for k, member in enumerate(ensemble.members):
        rng = np.random.default_rng(seed + 1000 * k)
        sample = rng.integers(0, len(graphs), size=len(graphs)) if len(graphs) > 1 else np.zeros(1, int)
        batches = WeightedBatches(graphs, values, present, w, sample, batch_size, rng)
        state = fit(
            FinetuneTask(member, torch_device), batches, None, optim, device=torch_device, progress=False
        )
        first.append(state.history[0]["train_loss"])
        last.append(state.history[-1]["train_loss"])
        member.eval()
    return {"loss_first_epoch": float(np.mean(first)), "loss_last_epoch": float(np.mean(last))}


class WeightedBatches:
    """Batches ``(graphs, labels, presence, weights)`` of a bootstrap ``sample``, shuffled anew
    by ``rng`` at each pass."""

    def __init__(self, graphs, values, present, weights, sample, batch_size: int, rng) -> None:
        self.graphs, self.values, self.present, self.weights = graphs, values, present, weights
        self.sample, self.batch_size, self.rng = sample, batch_size, rng

    def __len__(self) -> int:
        return -(-len(self.sample) // self.batch_size)

    def __iter__(self):
        order = self.rng.permutation(self.sample)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            yield (
                collate_graphs([self.graphs[i] for i in idx]),
                torch.from_numpy(self.values[idx]),
                torch.from_numpy(self.present[idx]),
                torch.from_numpy(self.weights[idx])[:, None],
            )


class FinetuneTask(CGCNNTask):
    """:class:`CGCNNTask` on weighted samples, its epoch loss a mean over samples."""

    def batch_size(self, batch) -> int:
        return len(batch[1])
