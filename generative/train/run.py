"""Train a UNet, VAE or CGCNN (ensemble) from a config and register it in the ``models`` collection."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from crystaloop.errors import UserError
from crystaloop.generative.models.cgcnn import CGCNN
from crystaloop.generative.models.checkpoint import load_model, save_model
from crystaloop.generative.models.condition import DecileCondition
from crystaloop.generative.models.ensemble import CGCNNEnsemble, bootstrap_indices
from crystaloop.generative.models.unet import UNet3D
from crystaloop.generative.models.vae import CondDFCVAE, VAELossWeights
from crystaloop.generative.train.config import (
    CGCNNTrainConfig,
    UNetTrainConfig,
    VAETrainConfig,
)
from crystaloop.generative.train.data import (
    LabelledStructure,
    VoxelDataset,
    composition_split,
    dataset_hash,
    elements_of,
    load_records,
    perturbed_copies,
)
from crystaloop.generative.train.fit import TrainState, fit, pick_device, seed_everything
from crystaloop.generative.train.tasks import (
    CGCNNTask,
    UNetTask,
    VAETask,
    estimate_class_weights,
    graph_collate,
)

AnyConfig = UNetTrainConfig | VAETrainConfig | CGCNNTrainConfig


def default_version(name: str, config: AnyConfig) -> str:
    """``<name>-<8 hex of the config>``: stable, so ``--resume`` finds the same run."""
    digest = hashlib.sha256(json.dumps(config.model_dump(mode="json"), sort_keys=True).encode())
    return f"{name}-{digest.hexdigest()[:8]}"


def resolve_checkpoint(reference: str | None, kind: str, database) -> Path:
    """A checkpoint path from a path, a registry version, or (None) the registry default.

    Raises
    ------
    UserError
        If nothing is found.
    """
    if reference and Path(reference).expanduser().is_file():
        return Path(reference).expanduser()
    from crystaloop.db.registry import ModelRegistry

    registry = ModelRegistry(database)
    doc = None
    kinds = [kind, "cgcnn-ensemble"] if kind == "cgcnn" else [kind]
    for k in kinds:
        doc = doc or registry.get(k, version=reference)
    if doc is None and reference:  # a checkpoint packaged beside the defaults, by its version
        from crystaloop.generative.models.shipped import CHECKPOINT_DIR

        packaged = [CHECKPOINT_DIR / f"{k}-{reference}.pt" for k in kinds]
        found = next((p for p in packaged if p.is_file()), None)
        if found is not None:
            return found
    if doc is None or not Path(doc.checkpoint).is_file():
        what = f"version {reference!r}" if reference else "a default"
        raise UserError(
            f"no {kind} checkpoint ({what}) found; train one with `crystaloop train {kind}` "
            "or run `crystaloop models load-default`"
        )
    return Path(doc.checkpoint)


def register(
    database, kind: str, version: str, checkpoint: Path, extra: dict[str, Any], metrics, *, default: bool = True
):
    """Insert the trained model in the registry (and, with ``default``, make it the default of its kind)."""
    from crystaloop.db.documents import ModelDoc
    from crystaloop.db.registry import ModelRegistry

    doc = ModelDoc(
        kind=kind,
        version=version,
        dataset_hash=extra["dataset_hash"],
        config=extra["config"],
        metrics={k: float(v) for k, v in metrics.items() if isinstance(v, int | float)},
        checkpoint=str(checkpoint.resolve()),
        torch_version=torch.__version__,
    )
    return ModelRegistry(database).register(doc, make_default=default)


def _loader(dataset: Dataset, batch_size: int, *, shuffle: bool, workers: int, collate=None, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        collate_fn=collate,
        generator=generator,
        persistent_workers=workers > 0,
    )


def _val_subset(dataset: Dataset, limit: int | None) -> Dataset:
    if limit is None or limit >= len(dataset):
        return dataset
    return Subset(dataset, np.linspace(0, len(dataset) - 1, limit).astype(int).tolist())


def _prepare(config: AnyConfig, database, keep=None) -> tuple[list, list, str, list[int]]:
    """Train and validation records (those passing ``keep``), the hash of all that is used and
    the atomic numbers of every record (held-out ones included: a UNet's vocabulary).

    The held-out (test) formulas are never trained or validated on. Validation formulas are a
    second composition split of the training side (``data.val_fraction``), so early stopping and
    the ensemble's variance calibration never see the held-out split the evaluate commands use.
    """
    records = load_records(database, config.data)
    if keep is not None:
        records = [r for r in records if keep(r)]
        if not records:
            raise UserError("no training structures carry the labels this config needs; check its properties")
    train, val = composition_split(records, config.data.test_fraction, config.data.split_seed)
    if config.data.val_fraction > 0:  # else the held-out split validates, as in older runs
        train, val = composition_split(train, config.data.val_fraction, config.data.split_seed + 1)
    return train, val, dataset_hash(records), elements_of(records)


def train_unet(
    config: UNetTrainConfig, database, run_dir: Path, *, resume=False, device="auto", console=None
):
    """Train the segmentation UNet; returns the best checkpoint, extra metadata and metrics."""
    device = pick_device(device)
    seed_everything(config.optim.seed)
    train, val, data_hash, elements = _prepare(config, database)
    unet = UNet3D(
        elements,
        widths=config.model.widths,
        circular=config.model.circular,
        input_transform=config.model.input_transform,
        spacing=config.model.spacing,
    )
    train_set = VoxelDataset(train, [], grid=config.data.grid, augment=config.data.augment)
    val_set = _val_subset(VoxelDataset(val, [], grid=config.data.grid), config.data.val_limit)
    weights = estimate_class_weights(
        unet, VoxelDataset(train, [], grid=config.data.grid), config.class_count_samples
    )
    extra = _extra(config, data_hash, train, val, class_weights=weights.tolist())
    state = fit(
        UNetTask(unet, weights, device, crop=config.data.crop),
        _loader(train_set, config.optim.batch_size, shuffle=True, workers=config.data.num_workers),
        _loader(val_set, config.optim.batch_size, shuffle=False, workers=config.data.num_workers),
        config.optim,
        run_dir,
        device=device,
        resume=resume,
        label="unet",
        extra=extra,
        console=console,
    )
    return run_dir / "best.pt", extra, state.best_metrics


def train_vae(config: VAETrainConfig, database, run_dir: Path, *, resume=False, device="auto", console=None):
    """Train the Cond-DFC-VAE (perceptual UNet from the registry, or joint UNet training)."""
    device = pick_device(device)
    seed_everything(config.optim.seed)
    key = config.condition_property
    train, val, data_hash, elements = _prepare(config, database, keep=lambda r: r.labels.get(key) is not None)
    properties = [key, *config.model.properties]
    m = config.model
    vae = CondDFCVAE(
        grid=config.data.grid,
        latent_dim=m.latent_dim,
        widths=m.widths,
        circular=m.circular,
        properties=m.properties,
        property_hidden=m.property_hidden,
        condition=DecileCondition.fit([r.labels[key] for r in train], key),
        density_scale=m.density_scale,
        coord_scale=m.coord_scale,
        representation=m.representation,
        species=elements if m.species_head else (),
    )
    if m.properties:
        mean, std = _label_statistics(np.array([r.label_array(m.properties)[0] for r in train]))
        vae.property_mean.copy_(torch.as_tensor(mean))
        vae.property_std.copy_(torch.as_tensor(std))
    unet, seg_weights, unet_ref = None, None, None
    if config.alpha > 0 or config.joint_unet:
        try:
            path = resolve_checkpoint(config.unet, "unet", database)
            unet, unet_extra = load_model(path)
            unet_ref = str(path)
            seg_weights = torch.tensor(unet_extra.get("class_weights") or [])
        except UserError:
            if not config.joint_unet:
                raise
            unet = UNet3D(elements)
        if config.joint_unet and (seg_weights is None or len(seg_weights) != unet.n_classes):
            seg_weights = estimate_class_weights(unet, VoxelDataset(train, [], grid=config.data.grid), 200)
        missing = set(elements) - set(unet.vocabulary.atomic_numbers)
        if config.joint_unet and missing:
            raise UserError(
                f"the UNet does not know elements Z={sorted(missing)}; retrain the UNet on this data"
            )
    weights = VAELossWeights(
        config.alpha, config.beta, config.gamma, config.property_weight, config.species_weight
    )
    # the element list the decoder chooses from when the VAE has no species head
    extra = _extra(config, data_hash, train, val, unet=unet_ref, elements=list(elements))
    train_set = VoxelDataset(
        train, properties, grid=config.data.grid, augment=config.data.augment, representation=m.representation
    )
    val_set = _val_subset(
        VoxelDataset(val, properties, grid=config.data.grid, representation=m.representation),
        config.data.val_limit,
    )
    task = VAETask(vae, weights, device, unet=unet, joint=config.joint_unet, seg_weights=seg_weights)
    state = fit(
        task,
        _loader(train_set, config.optim.batch_size, shuffle=True, workers=config.data.num_workers),
        _loader(val_set, config.optim.batch_size, shuffle=False, workers=config.data.num_workers),
        config.optim,
        run_dir,
        device=device,
        resume=resume,
        label="vae",
        extra=extra,
        console=console,
    )
    if config.joint_unet and unet is not None:
        save_model(unet, run_dir / "joint-unet.pt", **extra)
    if config.latent_prior_components and (run_dir / "best.pt").is_file():
        plain = train_set_plain(train, properties, config)
        plain._site_cache = train_set._site_cache  # the maps the run computed, unrotated
        fit_prior_of_checkpoint(run_dir / "best.pt", plain, config.latent_prior_components)
    return run_dir / "best.pt", extra, state.best_metrics


def train_set_plain(train, properties, config: VAETrainConfig) -> VoxelDataset:
    """The training split without augmentation: what the latent prior is fitted to."""
    return VoxelDataset(train, properties, grid=config.data.grid, representation=config.model.representation)


@torch.no_grad()
def fit_prior_of_checkpoint(path: Path, dataset: Dataset, components: int, *, batch_size: int = 64) -> Path:
    """Fit the latent prior of the VAE at ``path`` to ``dataset``'s posterior means; rewrite ``path``.

    The mixture (``components`` full-covariance Gaussians) is stored in the checkpoint and drawn
    from by random sampling (:meth:`CondDFCVAE.sample_latent`).
    """
    vae, extra = load_model(path)
    means = []
    for batch in _loader(dataset, batch_size, shuffle=False, workers=0):
        x = vae.to_input(batch["density"], batch["coords"])
        condition = vae.condition.one_hot(batch["labels"][:, 0].numpy())
        means.append(vae.encode(x, condition)[0])
    mu = torch.cat(means)
    vae.fit_latent_prior(mu, components)
    extra["latent_prior"] = {"components": int(components), "n_fitted": len(mu)}
    return save_model(vae, path, **extra)


class _GraphSet(Dataset):
    def __init__(self, graphs, values, present) -> None:
        self.graphs, self.values, self.present = graphs, values, present

    def __len__(self) -> int:
        return len(self.graphs)

    def __getitem__(self, i):
        return self.graphs[i], self.values[i], self.present[i]


def graph_set(model: CGCNN, records: list[LabelledStructure], properties) -> _GraphSet:
    """Graphs and labels of ``records`` (built once, kept in memory)."""
    graphs = [model.graph(r.structure) for r in records]
    arrays = [r.label_array(properties) for r in records]
    return _GraphSet(graphs, [a[0] for a in arrays], [a[1] for a in arrays])


def train_cgcnn(
    config: CGCNNTrainConfig, database, run_dir: Path, *, resume=False, device="auto", console=None
):
    """Train K CGCNNs on bootstrap samples (optionally by transfer) and evaluate the ensemble."""
    device = pick_device(device)
    seed_everything(config.optim.seed)
    props = config.properties
    train, val, data_hash, _ = _prepare(
        config, database, keep=lambda r: bool(np.isfinite(r.label_array(props)[0]).any())
    )
    m = config.model
    template = CGCNN(
        props,
        hidden=m.hidden,
        n_conv=m.n_conv,
        fc_hidden=m.fc_hidden,
        radius=m.radius,
        max_neighbors=m.max_neighbors,
    )
    template_kwargs = {k: v for k, v in template.hparams.items() if k != "properties"}
    start = None
    if config.init:
        start, _ = load_model(resolve_checkpoint(config.init, "cgcnn", database))
        template = start.members[0] if isinstance(start, CGCNNEnsemble) else start
        if list(template.properties) != list(props):
            raise UserError(
                f"init model {config.init} predicts {', '.join(template.properties)}; "
                f"set properties to the same list or use transfer: instead"
            )
    perturbed = perturbed_copies(train, config.geometry_noise, config.optim.seed)
    train_graphs = graph_set(template, train + perturbed, props)
    val_graphs = _val_subset(graph_set(template, val, props), config.data.val_limit)
    mean, std = _label_statistics(np.array(train_graphs.values))
    base = None
    if config.transfer:
        base, _ = load_model(resolve_checkpoint(config.transfer.base, "cgcnn", database))
    extra = _extra(config, data_hash, train, val, n_perturbed=len(perturbed))
    members = []
    for k in range(config.ensemble_size):
        seed = config.optim.seed + k
        seed_everything(seed)
        indices = np.arange(len(train_graphs))
        if config.bootstrap and config.ensemble_size > 1:
            indices = bootstrap_indices(len(train_graphs), seed)
        subset = Subset(train_graphs, indices.tolist())
        member_dir = run_dir / f"member-{k}"
        loaders = (
            _loader(
                subset, config.optim.batch_size, shuffle=True, workers=0, collate=graph_collate, seed=seed
            ),
            _loader(val_graphs, config.optim.batch_size, shuffle=False, workers=0, collate=graph_collate),
        )
        member_optim = config.optim.model_copy(update={"seed": seed})
        if base is None:
            torch.manual_seed(seed)
            if start is not None:  # its own normalisation: the weights were trained with it
                members_of = start.members if isinstance(start, CGCNNEnsemble) else [start]
                model = load_model_copy(members_of[k % len(members_of)])
            else:
                model = CGCNN(props, **template_kwargs)
                model.set_normalization(mean, std)
            fit(
                CGCNNTask(model, device),
                *loaders,
                member_optim,
                member_dir,
                device=device,
                resume=resume,
                label=f"cgcnn {k + 1}/{config.ensemble_size}",
                extra=extra,
                console=console,
            )
        else:
            source = base.members[k % len(base.members)] if isinstance(base, CGCNNEnsemble) else base
            model = load_model_copy(source)
            model.replace_heads(props)
            model.set_normalization(mean, std)
            model.freeze_base()
            t = config.transfer
            heads_optim = member_optim.model_copy(update={"epochs": max(t.head_epochs, 1)})
            fit(
                CGCNNTask(model, device),
                *loaders,
                heads_optim,
                member_dir / "heads",
                device=device,
                resume=resume,
                label=f"cgcnn {k + 1} heads",
                extra=extra,
                console=console,
            )
            model, _ = load_model(member_dir / "heads" / "best.pt")
            model.unfreeze_base()
            if t.finetune_epochs:
                tune = member_optim.model_copy(
                    update={"epochs": t.finetune_epochs, "lr": config.optim.lr * t.finetune_lr_factor}
                )
                fit(
                    CGCNNTask(model, device),
                    *loaders,
                    tune,
                    member_dir,
                    device=device,
                    resume=resume,
                    label=f"cgcnn {k + 1} fine-tune",
                    extra=extra,
                    console=console,
                )
            else:
                save_model(model, member_dir / "best.pt", **extra)
        best, _ = load_model(member_dir / "best.pt")
        members.append(best)
    ensemble = CGCNNEnsemble(members) if len(members) > 1 else members[0]
    from crystaloop.generative.evaluate import predict_properties, property_metrics

    val_items = [val_graphs[i] for i in range(len(val_graphs))]
    if isinstance(ensemble, CGCNNEnsemble):
        extra["sigma_scale"] = ensemble.calibrate(*predict_properties(ensemble, val_items))
    metrics = property_metrics(ensemble, val_items, device="cpu")
    path = save_model(ensemble, run_dir / "best.pt", **extra, metrics=metrics)
    return path, extra, metrics


def load_model_copy(model: CGCNN) -> CGCNN:
    """A fresh copy of ``model`` (same hparams and weights)."""
    from crystaloop.generative.models.checkpoint import model_from_payload, model_payload

    return model_from_payload(model_payload(model))


def _label_statistics(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and std over finite values (0 and 1 for columns with none)."""
    mean, std = np.zeros(values.shape[1], np.float32), np.ones(values.shape[1], np.float32)
    for i in range(values.shape[1]):
        column = values[:, i][np.isfinite(values[:, i])]
        if column.size:
            mean[i], std[i] = column.mean(), max(float(column.std()), 1e-6)
    return mean, std


def _extra(config: AnyConfig, data_hash: str, train, val, **more) -> dict[str, Any]:
    return {
        "config": config.model_dump(mode="json"),
        "dataset_hash": data_hash,
        "n_train": len(train),
        "n_val": len(val),
        **more,
    }


TRAINERS = {"unet": train_unet, "vae": train_vae, "cgcnn": train_cgcnn}


def train_and_register(
    kind: str,
    config: AnyConfig,
    database,
    run_root: Path,
    *,
    version: str,
    resume: bool = False,
    device: str = "auto",
    console=None,
    default: bool = True,
):
    """Train ``kind`` with ``config`` into ``run_root/kind/version`` and register it
    (as the default of its kind unless ``default`` is false).

    Raises
    ------
    UserError
        If the run directory already holds a run and ``resume`` is not set.
    """
    run_dir = run_root / kind / version
    if (run_dir / "last.pt").exists() or any(run_dir.glob("member-*")):
        if not resume:
            raise UserError(f"{run_dir} already holds a run; pass --resume or a new --version")
    path, extra, metrics = TRAINERS[kind](
        config, database, run_dir, resume=resume, device=device, console=console
    )
    registered_kind = kind
    if kind == "cgcnn" and getattr(config, "ensemble_size", 1) > 1:
        registered_kind = "cgcnn-ensemble"
    return register(database, registered_kind, version, path, extra, metrics, default=default), metrics


__all__ = ["TrainState", "train_and_register", "resolve_checkpoint", "default_version"]
