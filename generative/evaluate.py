"""Held-out evaluation of the trained models against the papers' tables.

Reconstruction (paper 002, Table 5): VAE MSE, UNet non-zero voxel recall, lattice MAE, mean EMD
between predicted and true sites, mean |Delta N_sites| and the species accuracy table of Hoffmann et
al. Properties (paper 002, Table 1): MAE and SMAPE per property, and the ensemble's calibration.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from crystaloop.generative.data.decorate import crystal_system
from crystaloop.generative.measures import (
    MIN_DISTANCE_ANGSTROM,
    charge_balanced,
    composition_novel_flags,
    is_valid,
    matched_site_errors,
    nearest_prototype,
    novelty_flags,
    prior_prototypes,
    prototype_novel_flags,
    prototype_templates,
    reconstruction_match,
    reference_prototypes,
    smact_valid,
    unique_flags,
)
from crystaloop.generative.models.cgcnn import CGCNN, collate_graphs
from crystaloop.generative.models.ensemble import CGCNNEnsemble
from crystaloop.generative.models.unet import UNet3D, voxel_spacing
from crystaloop.generative.paper import PAPER_SAMPLING_VALID


def recall_counts(unet: UNet3D, density, spacing, true_z) -> tuple[int, int, int]:
    """Site voxels whose species-head class is the true Z, those also inside the predicted mask, and
    all site voxels (true Z > 0).

    The first over the third is the paper's non-zero classification recall; the second over the
    third also asks the mask head to find the voxel.
    """
    species, inside = unet.predict(density, spacing)
    true_z = torch.as_tensor(true_z).to(species.device)
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
    """Per-structure reconstruction outcome.

    ``emd`` compares sites in the true cell (fractional error only); ``emd_decoded_lattice``
    places the decoded sites in the decoded cell (lattice error included). Both are ``None``
    when nothing was decoded. ``n_true``/``n_decoded`` are the site counts.
    """

    structure_id: str
    vae_mse: float
    lattice_abs_error: np.ndarray
    angle_abs_error: np.ndarray
    emd: float | None
    emd_decoded_lattice: float | None
    n_true: int
    n_decoded: int
    z_errors: np.ndarray
    recall_correct: int
    recall_total: int
    recall_masked: int
    matched: bool = False
    """StructureMatcher(ltol 0.3, stol 0.5, angle_tol 10) finds the decoded crystal equal to the true one."""
    valid_before_repair: bool = False
    """The sites as first read, in the lattice as first decoded, keep every distance >= 0.5 Å
    (before the decoder merges close peaks or rejects a lattice), as in sampling."""
    crystal_system: str = ""
    """spglib's crystal system of the true crystal."""

    @property
    def delta_nsites(self) -> int:
        return abs(self.n_decoded - self.n_true)


@torch.no_grad()
def reconstruct_one(decoder, record) -> ReconstructionRow:
    """Encode a held-out crystal (z = mu), decode it with ``decoder`` and compare with the input.

    ``decoder`` is a :class:`crystaloop.generative.decode.Decoder`; its method decides the path
    from the decoded maps to sites. The UNet recall counts are taken on the true eq. 1 density at
    the UNet's 32^3 grid, whichever path decodes (the ``sites`` path does not use the UNet).
    """
    from crystaloop.generative.decode import SEGMENT_GRID, vae_channels
    from crystaloop.generative.representation import lattice_from_coordinates, voxelize

    vae, unet, device = decoder.vae, decoder.unet, decoder.device
    channels, coords = vae_channels(vae, [record.structure])
    channels, coords = channels.to(device), coords.to(device)
    x = vae.to_input(channels, coords)
    condition = vae.condition.one_hot([record.labels.get(vae.condition.property_name, 0.0)]).to(device)
    out = vae(x, condition)
    species_logits = getattr(out, "species_logits", None)
    vae_mse = float(((out.recon[:, 0] - x[:, 0]) ** 2).mean())
    recon_channels, recon_coords = vae.split_output(out.recon)
    # the paper's UNet recall, on the true eq. 1 density at the UNet's grid (whatever the VAE reads)
    voxels = voxelize(record.structure, grid=SEGMENT_GRID)
    density = torch.from_numpy(np.asarray(voxels.density, dtype=np.float32))[None].to(device)
    true_coords = torch.from_numpy(np.asarray(voxels.coords, dtype=np.float32))[None].to(device)
    true_species = torch.from_numpy(voxels.species.astype(np.int64)).to(device)
    correct, masked, total = recall_counts(
        unet, density[:, None], voxel_spacing(true_coords), true_species[None]
    )
    head = decoder.head_lattices(out.z, condition)  # eval mode: z is mu
    [row] = decoder.structures_from_maps(
        recon_channels, recon_coords, species_logits=species_logits, lattices=head
    )
    structure = row.structure
    lattice = head[0] if head is not None else lattice_from_coordinates(recon_coords[0].float().cpu().numpy())
    true = record.structure
    lattice_error = np.abs(np.array(lattice.abc) - np.array(true.lattice.abc))
    angle_error = np.abs(np.array(lattice.angles) - np.array(true.lattice.angles))
    common = (record.structure_id, vae_mse, lattice_error, angle_error)
    recall = (correct, total, masked)
    raw = row.raw_min_distance
    judged = {
        "matched": reconstruction_match(true, structure),
        "valid_before_repair": raw is not None and raw >= MIN_DISTANCE_ANGSTROM,
        "crystal_system": crystal_system(true),
    }
    if structure is None:
        return ReconstructionRow(*common, None, None, len(true), 0, np.zeros(0, dtype=int), *recall, **judged)
    true_z = np.array([s.specie.Z for s in true])
    decoded_z = np.array([s.specie.Z for s in structure])
    distances, z_errors = matched_site_errors(
        true.frac_coords, true_z, structure.frac_coords, decoded_z, true.lattice
    )
    in_own_cells, _ = matched_site_errors(
        true.frac_coords, true_z, structure.frac_coords, decoded_z, true.lattice, structure.lattice
    )
    return ReconstructionRow(
        *common,
        float(distances.mean()) if len(distances) else None,
        float(in_own_cells.mean()) if len(in_own_cells) else None,
        len(true),
        len(structure),
        z_errors,
        *recall,
        **judged,
    )


def reconstruction_metrics(rows: Sequence[ReconstructionRow]) -> dict[str, float | None]:
    """Table 5 metrics (snake case with units) over ``rows``.

    ``species_exact`` is Hoffmann et al.'s share over matched sites; ``species_exact_of_all_sites``
    divides the same exact matches by every site of either crystal (matched, missing and extra:
    the larger of the two site counts per structure, the true count when nothing was decoded).
    """
    emds = [r.emd for r in rows if r.emd is not None]
    emds_decoded = [r.emd_decoded_lattice for r in rows if r.emd_decoded_lattice is not None]
    z_errors = np.concatenate([r.z_errors for r in rows]) if rows else np.zeros(0)
    all_sites = sum(max(r.n_true, r.n_decoded) for r in rows)
    return {
        "n_structures": len(rows),
        "vae_mse": float(np.mean([r.vae_mse for r in rows])),
        "unet_nonzero_recall": sum(r.recall_correct for r in rows)
        / max(sum(r.recall_total for r in rows), 1),
        "unet_nonzero_recall_masked": sum(r.recall_masked for r in rows)
        / max(sum(r.recall_total for r in rows), 1),
        "lattice_mae_angstrom": float(np.mean([r.lattice_abs_error for r in rows])),
        "angle_mae_degrees": float(np.mean([r.angle_abs_error for r in rows])),
        "emd_mean_angstrom": float(np.mean(emds)) if emds else None,
        "emd_decoded_lattice_mean_angstrom": float(np.mean(emds_decoded)) if emds_decoded else None,
        "delta_nsites_mean": float(np.mean([r.delta_nsites for r in rows])),
        "no_sites_found": sum(r.emd is None for r in rows),
        **species_accuracy(z_errors),
        "species_exact_of_all_sites": int((z_errors == 0).sum()) / max(all_sites, 1),
        "match_rate": float(np.mean([r.matched for r in rows])),
        "valid_before_repair_share": float(np.mean([r.valid_before_repair for r in rows])),
        "by_crystal_system": _by_crystal_system(rows),
    }


def _by_crystal_system(rows: Sequence[ReconstructionRow]) -> dict[str, dict[str, float]]:
    """Count, match rate and lattice/angle MAE of ``rows`` per true crystal system."""
    out = {}
    for system in sorted({r.crystal_system for r in rows}):
        chosen = [r for r in rows if r.crystal_system == system]
        out[system] = {
            "n": len(chosen),
            "match_rate": float(np.mean([r.matched for r in chosen])),
            "lattice_mae_angstrom": float(np.mean([r.lattice_abs_error for r in chosen])),
            "angle_mae_degrees": float(np.mean([r.angle_abs_error for r in chosen])),
        }
    return out


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
    database,
    *,
    vae: str | None = None,
    unet: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    method: str | None = None,
    lattice: str = "auto",
    symprec: float | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Table 5 metrics of the registered (or given) VAE and UNet on the VAE's held-out split.

    ``method`` is the decoding path (:data:`crystaloop.generative.decode.METHODS`; default: the
    VAE's own); ``lattice`` the lattice source (:data:`~crystaloop.generative.decode.LATTICE_SOURCES`);
    ``symprec`` symmetrises each decoded crystal (:mod:`crystaloop.generative.symmetry`);
    ``progress(done, total)`` is called after each structure.
    """
    from crystaloop.generative.decode import Decoder
    from crystaloop.generative.models.checkpoint import load_model
    from crystaloop.generative.train.run import resolve_checkpoint

    vae_path = resolve_checkpoint(vae, "vae", database)
    _, vae_extra = load_model(vae_path)
    try:
        decoder = Decoder.from_checkpoints(
            vae_path,
            resolve_checkpoint(unet, "unet", database),
            workers=1,
            method=method,
            lattice=lattice,
            symprec=symprec,
        )
    except ValueError as error:
        from crystaloop.errors import UserError

        raise UserError(f"{error}; pass a matching --method or --lattice") from error
    vae_model, unet_model = decoder.vae, decoder.unet
    key = vae_model.condition.property_name
    known = set(unet_model.vocabulary.atomic_numbers)

    def usable(record) -> bool:
        elements = {el.Z for el in record.structure.composition.elements}
        return record.labels.get(key) is not None and elements <= known

    test, data = _held_out(database, vae_extra, limit, seed, keep=usable)
    rows = []
    for record in test:
        rows.append(reconstruct_one(decoder, record))
        if progress is not None:
            progress(len(rows), len(test))
    if not rows:
        from crystaloop.errors import UserError

        raise UserError("no held-out structures to evaluate; check the data and the UNet's elements")
    return {
        "method": decoder.method,
        "lattice": decoder.lattice_source,
        "symprec": symprec,
        **reconstruction_metrics(rows),
    }


def load_cgcnn(model: str | None, database):
    """The CGCNN (ensemble) at a registry version or checkpoint (None: the default), its extra
    metadata and its path.

    Raises
    ------
    UserError
        If the reference is unknown or is not a CGCNN (ensemble) checkpoint.
    """
    from crystaloop.errors import UserError
    from crystaloop.generative.models.checkpoint import load_model
    from crystaloop.generative.train.run import resolve_checkpoint

    path = resolve_checkpoint(model, "cgcnn", database)
    network, extra = load_model(path)
    if not isinstance(network, CGCNN | CGCNNEnsemble):
        raise UserError(f"{path} is not a CGCNN checkpoint; pass --model with a CGCNN version")
    return network, extra, path


def evaluate_properties(
    database,
    *,
    model: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    plot: str | None = None,
) -> dict:
    """MAE, SMAPE and calibration of the registered (or given) CGCNN (ensemble) on held-out data.

    Raises
    ------
    UserError
        If ``model`` is not a CGCNN (ensemble) checkpoint.
    """
    from crystaloop.generative.train.run import graph_set

    network, extra, _ = load_cgcnn(model, database)

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


# ---------------------------------------------------------------------------------------------
# Sampling (issue: random and around-base samples must decode into valid, novel crystals)
# ---------------------------------------------------------------------------------------------

AROUND_BASE_SIGMA = float(np.sqrt(0.5))  # the paper's sigma for sampling around a base compound


def prior_records(max_sites: int = 40):
    """Converged, accepted records of the shipped prior set, as training records (no database)."""
    from crystaloop.generative.data.prior import read_prior
    from crystaloop.generative.data.prototypes import Prototype
    from crystaloop.generative.train.data import LabelledStructure

    out = []
    for rec in read_prior()["records"]:
        if not rec.get("converged") or rec.get("reject_reason"):
            continue
        proto = Prototype(rec["prototype"], tuple(rec["species"]))
        if proto.atoms_per_conventional > max_sites:
            continue
        out.append(
            LabelledStructure(
                rec["structure_id"], proto.conventional(rec["a0"]), dict(rec.get("labels") or {})
            )
        )
    return out


def dataset_references(database, data) -> tuple[list, list[str | None]]:
    """The records of ``data``'s dataset and mix (training and held-out) and their prototype labels."""
    from crystaloop.generative.train.data import load_records

    records = load_records(database, data)
    names = {
        d["structure_id"]: d.get("prototype")
        for d in database["training_structures"].find(
            {"dataset": {"$in": [data.dataset, *data.mix]}}, {"_id": 0, "structure_id": 1, "prototype": 1}
        )
    }
    return records, [names.get(r.structure_id) for r in records]


def composition_shares(records, *, n: int = 1000, seed: int = 0) -> dict:
    """Charge-balanced (pymatgen) and SMACT-valid shares of up to ``n`` records drawn at random:
    the chemistry a model trained on ``records`` has seen."""
    rng = np.random.default_rng(seed)
    picks = [records[i] for i in sorted(rng.permutation(len(records))[: min(n, len(records))])]
    structures = [r.structure for r in picks]
    return {
        "n": len(structures),
        "charge_balanced_share": sum(map(charge_balanced, structures)) / max(len(structures), 1),
        "smact_valid_share": sum(map(smact_valid, structures)) / max(len(structures), 1),
    }


def sampling_latents(
    decoder,
    n: int,
    strategy: str,
    *,
    bases: Sequence = (),
    seed: int = 0,
    sigma: float = AROUND_BASE_SIGMA,
    prior: str = "auto",
):
    """Latent vectors (n, latent_dim) and one-hot conditions (n, 10) for a sampling strategy.

    ``random``: z from the VAE's fitted latent prior when it stores one (``prior="auto"`` or
    ``"fitted"``), else z ~ N(0, I) (``"normal"`` forces it), under a uniformly drawn decile.
    ``around_base``: each row picks a base structure, encodes it under its own decile and draws
    z ~ N(mu, sigma^2 I).
    """
    from crystaloop.generative.models.condition import N_DECILES

    generator = torch.Generator().manual_seed(seed)
    if strategy == "random":
        sample_latent = getattr(decoder.vae, "sample_latent", None)
        if sample_latent is not None:
            z = sample_latent(n, prior=prior, generator=generator)
        else:
            z = torch.randn(n, decoder.vae.latent_dim, generator=generator)
        deciles = torch.randint(0, N_DECILES, (n,), generator=generator)
        return z, torch.nn.functional.one_hot(deciles, N_DECILES).float(), None
    if strategy != "around_base":
        from crystaloop.errors import UserError

        raise UserError(f"--strategy must be 'random' or 'around_base', not {strategy!r}")
    rng = np.random.default_rng(seed)
    picks = [bases[i] for i in rng.integers(0, len(bases), n)]
    key = decoder.vae.condition.property_name
    values = [float(r.labels.get(key) or 0.0) for r in picks]
    mu, _ = decoder.encode([r.structure for r in picks], property_values=values)
    z = mu + sigma * torch.randn(mu.shape, generator=generator)
    return z, decoder.vae.condition.one_hot(values), picks


def crystal_system_shares(structures: Sequence) -> dict[str, float]:
    """Share of ``structures`` per crystal system (spglib at the prior-v2 builder's tolerance)."""
    from collections import Counter

    counts = Counter()
    for structure in structures:
        try:
            counts[crystal_system(structure)] += 1
        except Exception:  # noqa: BLE001 -- spglib fails on a few degenerate cells
            counts["undetermined"] += 1
    total = max(sum(counts.values()), 1)
    return {system: n / total for system, n in sorted(counts.items())}


def distribution_distances(samples: Sequence, references: Sequence) -> dict[str, float | None]:
    """Wasserstein distances of density (g/cm^3) and of the number of elements, samples against
    ``references`` (the held-out split), as CDVAE reports them."""
    from scipy.stats import wasserstein_distance

    if not samples or not references:
        return {"wasserstein_density": None, "wasserstein_n_elements": None}

    def columns(structures):
        return (
            [float(s.density) for s in structures],
            [len(s.composition.elements) for s in structures],
        )

    (rho_s, n_s), (rho_r, n_r) = columns(samples), columns(references)
    return {
        "wasserstein_density": float(wasserstein_distance(rho_s, rho_r)),
        "wasserstein_n_elements": float(wasserstein_distance(n_s, n_r)),
    }


def system_share_table(samples: dict[str, float], training: dict[str, float]) -> dict:
    """Per crystal system the sample and training shares, and the largest gap in percentage points."""
    systems = sorted(set(samples) | set(training))
    rows = {s: {"samples": samples.get(s, 0.0), "training": training.get(s, 0.0)} for s in systems}
    gap = max((abs(r["samples"] - r["training"]) for r in rows.values()), default=0.0)
    return {"by_system": rows, "largest_gap_points": 100 * gap}


def sampling_metrics(
    candidates,
    seconds: float,
    *,
    references,
    templates,
    bases=None,
    prototypes=None,
    training=None,
    held_out=None,
) -> dict:
    """Shares of decoded, valid, charge-balanced, novel and unique samples; distributions; timing.

    ``valid_before_repair_share`` counts samples whose sites as first read, in the lattice as
    first decoded, keep every distance >= 0.5 A (no merge of close peaks, no lattice bounds);
    ``valid_share`` counts the structures the decoder returns, after both. Novelty is by
    composition (reduced formula absent from ``references``), by structure (no same-formula
    reference matches) and by prototype (no structure type of ``prototypes``, see
    :func:`~crystaloop.generative.measures.reference_prototypes`, matches with species anonymised).
    ``sun_share`` is the share of all samples that are valid, SMACT-valid, structurally novel and
    unique. With ``training`` (structures), ``crystal_systems`` compares the valid samples' shares
    per crystal system with it; with ``held_out``, the Wasserstein distances of density and
    element count are taken against it.
    """
    from collections import Counter

    n = len(candidates)
    decoded = [c for c in candidates if c.structure is not None]
    valid = [c.structure for c in decoded if is_valid(c.structure)]
    raw_valid = [
        c
        for c in candidates
        if c.raw_min_distance is not None and c.raw_min_distance >= MIN_DISTANCE_ANGSTROM
    ]
    read = [c for c in candidates if c.raw_min_distance is not None]
    balanced = [charge_balanced(s) for s in valid]
    smact = [smact_valid(s) for s in valid]
    novel = novelty_flags(valid, references)
    composition_novel = composition_novel_flags(valid, references)
    if prototypes is None:
        prototypes = reference_prototypes(references)
    prototype_novel = prototype_novel_flags(valid, prototypes)
    unique = unique_flags(valid)
    novel_unique = sum(a and b for a, b in zip(novel, unique, strict=True))
    prototype_novel_unique = sum(a and b for a, b in zip(prototype_novel, unique, strict=True))
    sun = sum(all(flags) for flags in zip(smact, novel, unique, strict=True))
    reasons = Counter(c.reason for c in candidates if c.structure is None)
    reasons.update("sites closer than 0.5 A" for c in decoded if not is_valid(c.structure))
    out = {
        "n_samples": n,
        "decoded_share": len(decoded) / max(n, 1),
        "valid_before_repair_share": len(raw_valid) / max(n, 1),
        "merged_sites_mean": float(np.mean([c.merged_sites for c in read])) if read else 0.0,
        "samples_with_merged_sites_share": sum(c.merged_sites > 0 for c in read) / max(n, 1),
        "valid_share": len(valid) / max(n, 1),
        "charge_balanced_share": sum(balanced) / max(n, 1),
        "charge_balanced_share_of_valid": sum(balanced) / max(len(valid), 1),
        "smact_valid_share": sum(smact) / max(n, 1),
        "smact_valid_share_of_valid": sum(smact) / max(len(valid), 1),
        "composition_novel_share_of_valid": sum(composition_novel) / max(len(valid), 1),
        "novel_share_of_valid": sum(novel) / max(len(valid), 1),
        "prototype_novel_share_of_valid": sum(prototype_novel) / max(len(valid), 1),
        "unique_share_of_valid": sum(unique) / max(len(valid), 1),
        "novel_unique_share_of_valid": novel_unique / max(len(valid), 1),
        "prototype_novel_unique_share_of_valid": prototype_novel_unique / max(len(valid), 1),
        "valid_smact_novel_unique_share": sun / max(n, 1),
        "seconds_per_sample": seconds / max(n, 1),
        "site_counts": dict(sorted(Counter(len(c.structure) for c in decoded).items())),
        "prototypes": dict(Counter(nearest_prototype(s, templates) for s in valid).most_common()),
        "failures": dict(reasons.most_common()),
    }
    if training is not None:
        out["crystal_systems"] = system_share_table(
            crystal_system_shares(valid), crystal_system_shares(training)
        )
    if held_out is not None:
        out.update(distribution_distances(valid, held_out))
    if bases is not None:
        # around a base: how often the decoded crystal is the base itself
        from pymatgen.analysis.structure_matcher import StructureMatcher

        matcher = StructureMatcher()
        same = [
            c.structure is not None and is_valid(c.structure) and matcher.fit(c.structure, b)
            for c, b in zip(candidates, bases, strict=True)
        ]
        out["base_recovered_share"] = sum(same) / max(n, 1)
    return out


def evaluate_sampling(
    database,
    *,
    n: int,
    strategy: str = "random",
    vae: str | None = None,
    unet: str | None = None,
    seed: int = 0,
    method: str | None = None,
    allowed_elements: Sequence[str] | None = None,
    workers: int | None = None,
    prior: str = "auto",
    lattice: str = "auto",
    symprec: float | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Decode ``n`` samples of the registered (or given) VAE and UNet and measure them.

    Novelty is judged against the whole shipped prior set (training and held-out structures);
    around-base samples start from the VAE's held-out split of it. ``prior`` picks the latent
    distribution of random samples (see :func:`sampling_latents`); ``lattice`` the lattice source
    (:data:`~crystaloop.generative.decode.LATTICE_SOURCES`); ``symprec`` symmetrises each decoded
    crystal (:mod:`crystaloop.generative.symmetry`); ``progress(done, total)`` is called after each
    decoded batch.
    """
    import time

    from crystaloop.errors import UserError
    from crystaloop.generative.decode import Decoder
    from crystaloop.generative.models.checkpoint import load_model
    from crystaloop.generative.models.shipped import register_shipped, shipped_models
    from crystaloop.generative.train.config import DataConfig
    from crystaloop.generative.train.data import composition_split
    from crystaloop.generative.train.run import resolve_checkpoint

    paths = {}
    for kind, reference in (("vae", vae), ("unet", unet)):
        try:
            paths[kind] = resolve_checkpoint(reference, kind, database)
        except UserError:
            if reference is not None or not shipped_models():
                raise
            register_shipped(database, kinds=[kind])  # a fresh install runs on the shipped models
            paths[kind] = resolve_checkpoint(None, kind, database)
    try:
        decoder = Decoder.from_checkpoints(
            paths["vae"], paths["unet"], workers=workers, method=method, lattice=lattice, symprec=symprec
        )
    except ValueError as error:
        from crystaloop.errors import UserError

        raise UserError(f"{error}; pass a matching --method or --lattice") from error
    _, extra = load_model(paths["vae"])
    data = DataConfig.model_validate(extra.get("config", {}).get("data", {}))
    general = data.dataset not in (None, "prior-v1")
    if general:  # a model of another dataset (prior-v2): its own records are the references
        references, labels = dataset_references(database, data)
        prototypes = reference_prototypes(references, labels)
    else:
        references, prototypes = prior_records(data.max_sites), prior_prototypes(data.max_sites)
    training, bases = composition_split(references, data.test_fraction, data.split_seed)
    held_out = bases
    if strategy != "around_base":
        bases = None
    if prior == "fitted" and not getattr(decoder.vae, "has_latent_prior", False):
        from crystaloop.errors import UserError

        raise UserError(
            f"VAE {paths['vae'].name} stores no fitted latent prior; use --prior normal or a VAE trained "
            "with a latent prior"
        )
    z, condition, picks = sampling_latents(decoder, n, strategy, bases=bases or (), seed=seed, prior=prior)
    fitted = getattr(decoder.vae, "has_latent_prior", False) and prior != "normal"
    start = time.perf_counter()
    candidates = decoder.decode(z, condition, allowed_elements=allowed_elements, progress=progress)
    seconds = time.perf_counter() - start
    metrics = sampling_metrics(
        candidates,
        seconds,
        references=references,
        templates=prototype_templates(),
        bases=[p.structure for p in picks] if picks else None,
        prototypes=prototypes,
        training=[r.structure for r in training],
        held_out=[r.structure for r in held_out],
    )
    training_shares = composition_shares(training, seed=seed)
    return {
        "strategy": strategy,
        "latent_prior": ("fitted mixture" if fitted else "N(0, I)") if strategy == "random" else None,
        "method": decoder.method,
        "lattice": decoder.lattice_source,
        "symprec": symprec,
        "vae": str(paths["vae"]),
        "unet": str(paths["unet"]),
        "paper_valid_share": PAPER_SAMPLING_VALID.get(strategy),
        **metrics,
        "training_charge_balanced_share": training_shares["charge_balanced_share"],
        "training_smact_valid_share": training_shares["smact_valid_share"],
        "training_composition_sample": training_shares["n"],
    }
