"""Held-out evaluation of the trained models against the papers' tables.

Reconstruction (paper 002, Table 5): VAE MSE, UNet non-zero voxel recall, lattice MAE, mean EMD
between predicted and true sites, mean |Delta N_sites| and the species accuracy table of Hoffmann et
al. Properties (paper 002, Table 1): MAE and SMAPE per property, and the ensemble's calibration.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from crystaloop.generative.models.cgcnn import CGCNN, collate_graphs
from crystaloop.generative.models.ensemble import CGCNNEnsemble
from crystaloop.generative.models.unet import UNet3D, voxel_spacing
from crystaloop.generative.models.vae import CondDFCVAE

PAPER_TABLE5 = {
    "vae_mse": 0.013,
    "unet_nonzero_recall": 0.87,
    "lattice_mae_angstrom": 0.06,
    "emd_mean_angstrom": 0.090,
    "delta_nsites_mean": 0.198,
}
TARGETS_TABLE5 = {
    "unet_nonzero_recall": (">=", 0.87),
    "lattice_mae_angstrom": ("<=", 0.06),
    "emd_mean_angstrom": ("<=", 0.10),
    "delta_nsites_mean": ("<=", 0.25),
}
PAPER_TABLE1_MAE = {"formation_energy_per_atom": 0.102, "band_gap": 0.299}
TARGETS_TABLE1_MAE = {"formation_energy_per_atom": 0.06}


def matched_site_errors(
    true_frac: np.ndarray, true_z: np.ndarray, pred_frac: np.ndarray, pred_z: np.ndarray, lattice
) -> tuple[np.ndarray, np.ndarray]:
    """Optimal one-to-one matching of sites by minimum-image distance in ``lattice``.

    Returns the matched distances (Angstrom) and |Z_pred - Z_true| for min(N, N') pairs.
    """
    if len(true_frac) == 0 or len(pred_frac) == 0:
        return np.zeros(0), np.zeros(0, dtype=int)
    delta = pred_frac[None, :, :] - true_frac[:, None, :]
    delta -= np.round(delta)
    cart = delta @ np.asarray(lattice.matrix)
    cost = np.linalg.norm(cart, axis=-1)
    rows, cols = linear_sum_assignment(cost)
    return cost[rows, cols], np.abs(pred_z[cols] - true_z[rows])


def recall_counts(unet: UNet3D, density, spacing, true_z) -> tuple[int, int, int]:
    """Site voxels whose species-head class is the true Z, those also inside the predicted mask, and
    all site voxels (true Z > 0).

    The first over the third is the paper's non-zero classification recall; the second over the
    third also asks the mask head to find the voxel.
    """
    species, inside = unet.predict(density, spacing)
    site = true_z > 0
    right = (species == true_z) & site
    return int(right.sum()), int((right & inside).sum()), int(site.sum())


def species_accuracy(z_errors: np.ndarray) -> dict[str, float]:
    """Shares of matched sites with exact Z, Z off by 1, by 2, and by more (Hoffmann et al.)."""
    n = max(len(z_errors), 1)
    return {
        "species_exact": float((z_errors == 0).sum() / n),
        "species_off_by_1": float((z_errors == 1).sum() / n),
        "species_off_by_2": float((z_errors == 2).sum() / n),
        "species_off_by_more": float((z_errors > 2).sum() / n),
    }


@dataclass
class ReconstructionRow:
    """Per-structure reconstruction outcome."""

    structure_id: str
    vae_mse: float
    lattice_abs_error: np.ndarray
    emd: float | None
    delta_nsites: int
    z_errors: np.ndarray
    recall_correct: int
    recall_total: int
    recall_masked: int


@torch.no_grad()
def reconstruct_one(vae: CondDFCVAE, unet: UNet3D, record, *, grid: int) -> ReconstructionRow:
    """Voxelise, encode and decode (z = mu), segment with the UNet and compare with the input."""
    from crystaloop.generative.representation import lattice_from_coordinates, voxelize
    from crystaloop.generative.segmentation import segment, to_structure

    device = next(vae.parameters()).device
    voxels = voxelize(record.structure, grid=grid)
    density = torch.from_numpy(np.asarray(voxels.density, dtype=np.float32))[None].to(device)
    coords = torch.from_numpy(np.asarray(voxels.coords, dtype=np.float32))[None].to(device)
    x = vae.to_input(density, coords)
    condition = vae.condition.one_hot([record.labels.get(vae.condition.property_name, 0.0)]).to(device)
    out = vae(x, condition)
    vae_mse = float(((out.recon[:, 0] - x[:, 0]) ** 2).mean())
    recon_density, recon_coords = vae.split_output(out.recon)
    lattice = lattice_from_coordinates(recon_coords[0].cpu().numpy())
    true_species = torch.from_numpy(voxels.species.astype(np.int64))
    correct, masked, total = recall_counts(unet, density[:, None], voxel_spacing(coords), true_species[None])
    predicted = unet.predict_species(recon_density[:, None], voxel_spacing(recon_coords)).cpu()[0].numpy()
    sites = segment(predicted, predicted > 0, density=recon_density[0].cpu().numpy())
    structure = to_structure(sites, lattice) if len(sites) else None
    true = record.structure
    lattice_error = np.abs(np.array(lattice.abc) - np.array(true.lattice.abc))
    if structure is None:
        return ReconstructionRow(
            record.structure_id,
            vae_mse,
            lattice_error,
            None,
            len(true),
            np.zeros(0, dtype=int),
            correct,
            total,
            masked,
        )
    distances, z_errors = matched_site_errors(
        true.frac_coords,
        np.array([s.specie.Z for s in true]),
        structure.frac_coords,
        np.array([s.specie.Z for s in structure]),
        true.lattice,
    )
    return ReconstructionRow(
        record.structure_id,
        vae_mse,
        lattice_error,
        float(distances.mean()) if len(distances) else None,
        abs(len(structure) - len(true)),
        z_errors,
        correct,
        total,
        masked,
    )


def reconstruction_metrics(rows: Sequence[ReconstructionRow]) -> dict[str, float | None]:
    """Table 5 metrics (snake case with units) over ``rows``."""
    emds = [r.emd for r in rows if r.emd is not None]
    z_errors = np.concatenate([r.z_errors for r in rows]) if rows else np.zeros(0)
    return {
        "n_structures": len(rows),
        "vae_mse": float(np.mean([r.vae_mse for r in rows])),
        "unet_nonzero_recall": sum(r.recall_correct for r in rows)
        / max(sum(r.recall_total for r in rows), 1),
        "unet_nonzero_recall_masked": sum(r.recall_masked for r in rows)
        / max(sum(r.recall_total for r in rows), 1),
        "lattice_mae_angstrom": float(np.mean([r.lattice_abs_error for r in rows])),
        "emd_mean_angstrom": float(np.mean(emds)) if emds else None,
        "delta_nsites_mean": float(np.mean([r.delta_nsites for r in rows])),
        "no_sites_found": sum(r.emd is None for r in rows),
        **species_accuracy(z_errors),
    }


@torch.no_grad()
def predict_properties(model: CGCNN | CGCNNEnsemble, items, *, batch_size: int = 256, device: str = "cpu"):
    """Predicted means, standard deviations (zero for a single model), labels and label masks.

    ``items`` are (CrystalGraph, values, present) triples; arrays come back as (N, P).
    """
    model = model.to(device).eval()
    means, stds = [], []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        batch = collate_graphs([g for g, _, _ in chunk]).to(device)
        if isinstance(model, CGCNNEnsemble):
            mean, std = model.predict(batch)
        else:
            mean = model.predict(batch)
            std = torch.zeros_like(mean)
        means.append(mean.cpu().numpy())
        stds.append(std.cpu().numpy())
    values = np.stack([v for _, v, _ in items])
    present = np.stack([p for _, _, p in items]).astype(bool)
    return np.concatenate(means), np.concatenate(stds), values, present


def property_metrics(model, items, *, device: str = "cpu") -> dict[str, float]:
    """Flat ``mae_<p>``, ``smape_<p>`` and (ensembles) ``within_1sigma_<p>``/``within_2sigma_<p>``.

    SMAPE is ``mean(2|y - y'| / (|y| + |y'|))`` in percent over labelled structures.
    """
    mean, std, values, present = predict_properties(model, items, device=device)
    metrics: dict[str, float] = {"n_structures": float(len(items))}
    for i, name in enumerate(model.properties):
        ok = present[:, i] & np.isfinite(mean[:, i])
        if not ok.any():
            continue
        error = np.abs(mean[ok, i] - values[ok, i])
        denominator = np.abs(mean[ok, i]) + np.abs(values[ok, i])
        smape = np.where(denominator > 0, 2 * error / np.where(denominator > 0, denominator, 1), 0.0)
        metrics[f"mae_{name}"] = float(error.mean())
        metrics[f"smape_{name}"] = float(100 * smape.mean())
        metrics["loss"] = metrics.get("loss", 0.0) + float((error**2).mean())
        if isinstance(model, CGCNNEnsemble) and len(model.members) > 1:
            sigma = std[ok, i]
            metrics[f"within_1sigma_{name}"] = float((error <= sigma).mean())
            metrics[f"within_2sigma_{name}"] = float((error <= 2 * sigma).mean())
    return metrics


def nest_property_metrics(flat: dict[str, float]) -> dict:
    """``{"mae": {p: ..}, "smape": {p: ..}, "within_1sigma": {..}, "within_2sigma": {..}}``."""
    nested: dict = {"n_structures": int(flat.get("n_structures", 0))}
    for key, value in flat.items():
        for prefix in ("mae", "smape", "within_1sigma", "within_2sigma"):
            if key.startswith(prefix + "_"):
                nested.setdefault(prefix, {})[key[len(prefix) + 1 :]] = value
    return nested


def parity_plot(mean: np.ndarray, values: np.ndarray, present: np.ndarray, properties, path) -> None:
    """Predicted against true values, one panel per property, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from crystaloop.properties import property_spec

    n = len(properties)
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 4), squeeze=False)
    for i, (ax, name) in enumerate(zip(axes[0], properties, strict=True)):
        ok = present[:, i] & np.isfinite(mean[:, i])
        ax.scatter(values[ok, i], mean[ok, i], s=4, alpha=0.5)
        if ok.any():
            lo, hi = float(np.min(values[ok, i])), float(np.max(values[ok, i]))
            ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        label = property_spec(name).label
        ax.set_xlabel(f"true {label}")
        ax.set_ylabel(f"predicted {label}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _held_out(database, extra: dict, limit: int | None, seed: int, keep=None):
    from crystaloop.generative.train.config import DataConfig
    from crystaloop.generative.train.data import composition_split, load_records

    data = DataConfig.model_validate(extra["config"]["data"])
    records = load_records(database, data)
    _, test = composition_split(records, data.test_fraction, data.split_seed)
    if keep is not None:
        test = [r for r in test if keep(r)]
    if limit is not None and limit < len(test):
        order = np.random.default_rng(seed).permutation(len(test))[:limit]
        test = [test[i] for i in sorted(order)]
    return test, data


def evaluate_reconstruction(
    database, *, vae: str | None = None, unet: str | None = None, limit: int | None = None, seed: int = 0
) -> dict:
    """Table 5 metrics of the registered (or given) VAE and UNet on the VAE's held-out split."""
    from crystaloop.generative.models.checkpoint import load_model
    from crystaloop.generative.train.run import resolve_checkpoint

    vae_model, vae_extra = load_model(resolve_checkpoint(vae, "vae", database))
    unet_model, _ = load_model(resolve_checkpoint(unet, "unet", database))
    key = vae_model.condition.property_name
    known = set(unet_model.vocabulary.atomic_numbers)

    def usable(record) -> bool:
        elements = {el.Z for el in record.structure.composition.elements}
        return record.labels.get(key) is not None and elements <= known

    test, data = _held_out(database, vae_extra, limit, seed, keep=usable)
    rows = [reconstruct_one(vae_model, unet_model, r, grid=data.grid) for r in test]
    if not rows:
        from crystaloop.errors import UserError

        raise UserError("no held-out structures to evaluate; check the data and the UNet's elements")
    return reconstruction_metrics(rows)


def evaluate_properties(
    database,
    *,
    model: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    plot: str | None = None,
) -> dict:
    """MAE, SMAPE and calibration of the registered (or given) CGCNN (ensemble) on held-out data."""
    from crystaloop.generative.models.checkpoint import load_model
    from crystaloop.generative.train.run import graph_set, resolve_checkpoint

    network, extra = load_model(resolve_checkpoint(model, "cgcnn", database))

    def labelled(record) -> bool:
        return any(record.labels.get(p) is not None for p in network.properties)

    test, _ = _held_out(database, extra, limit, seed, keep=labelled)
    template = network.members[0] if isinstance(network, CGCNNEnsemble) else network
    graphs = graph_set(template, test, network.properties)
    items = [graphs[i] for i in range(len(graphs))]
    flat = property_metrics(network, items)
    if plot:
        mean, _, values, present = predict_properties(network, items)
        parity_plot(mean, values, present, network.properties, plot)
    return nest_property_metrics(flat)
