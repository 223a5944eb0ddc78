"""Model-specific training tasks for :func:`crystaloop.generative.train.fit.fit`."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from crystaloop.generative.evaluate import recall_counts
from crystaloop.generative.models.cgcnn import CGCNN, CrystalGraph, GraphBatch, collate_graphs, masked_mse
from crystaloop.generative.models.unet import UNet3D, class_weights, unet_loss, voxel_spacing
from crystaloop.generative.models.vae import CondDFCVAE, VAELossWeights, vae_loss

CHANNELS_LAST = torch.channels_last_3d
"""3-D convolutions run about twice as fast on the CPU in this memory format."""


def _volumes(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=CHANNELS_LAST)


def _mean_parts(rows: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
    total = sum(n for n, _ in rows) or 1
    keys = rows[0][1].keys() if rows else ()
    return {k: sum(n * parts[k] for n, parts in rows) / total for k in keys}


class UNetTask:
    """Segmentation of true density maps into species and mask."""

    def __init__(
        self, unet: UNet3D, weights: torch.Tensor, device: torch.device, crop: int | None = None
    ) -> None:
        self.unet = unet.to(device, memory_format=CHANNELS_LAST)
        self.weights, self.device, self.crop = weights.to(device), device, crop

    def modules(self) -> dict[str, nn.Module]:
        return {"unet": self.unet}

    def trainable(self) -> Iterable[nn.Parameter]:
        return self.unet.parameters()

    def _loss(self, batch):
        density = _volumes(batch["density"].to(self.device)[:, None])
        species = batch["species"].to(self.device)
        spacing = voxel_spacing(batch["coords"].to(self.device))
        classes = self.unet.vocabulary.encode(species)
        output = self.unet(density, spacing)
        loss, parts = unet_loss(output, classes, batch["mask"].to(self.device), self.weights)
        return loss, parts, density, species, spacing

    def train_step(self, batch):
        if self.crop:
            batch = periodic_crop(batch, self.crop)
        loss, parts, *_ = self._loss(batch)
        return loss, parts

    def evaluate(self, batches) -> dict[str, float]:
        rows, counts = [], np.zeros(3, dtype=np.int64)
        for batch in batches:
            loss, parts, density, species, spacing = self._loss(batch)
            rows.append((len(density), {"loss": float(loss), **parts}))
            counts += recall_counts(self.unet, density, spacing, species)
        total = max(int(counts[2]), 1)
        return {
            **_mean_parts(rows),
            "unet_nonzero_recall": float(counts[0] / total),
            "unet_nonzero_recall_masked": float(counts[1] / total),
        }

    def final_model(self) -> nn.Module:
        return self.unet


def periodic_crop(batch: dict[str, torch.Tensor], size: int) -> dict[str, torch.Tensor]:
    """The same random periodic ``size``-cube crop of every voxel tensor in ``batch``.

    The UNet is fully convolutional, so training on crops is cheaper and it still runs on full grids.
    ``coords`` stays whole: the voxel spacing is taken from the full cell.
    """
    out = dict(batch)
    grid = batch["density"].shape[-1]
    if size >= grid:
        return out
    shifts = [int(s) for s in torch.randint(grid, (3,))]
    for key in ("density", "species", "mask"):
        volume = torch.roll(batch[key], shifts=shifts, dims=(-3, -2, -1))
        out[key] = volume[..., :size, :size, :size].contiguous()
    return out


def estimate_class_weights(unet: UNet3D, dataset, n: int) -> torch.Tensor:
    """Inverse-frequency weights from the voxel counts of up to ``n`` samples of ``dataset``."""
    counts = torch.zeros(unet.n_classes, dtype=torch.float64)
    for i in np.linspace(0, len(dataset) - 1, min(n, len(dataset))).astype(int):
        classes = unet.vocabulary.encode(dataset[int(i)]["species"])
        counts += torch.bincount(classes.flatten(), minlength=unet.n_classes).double()
    return class_weights(counts.numpy())


class VAETask:
    """Cond-DFC-VAE with a frozen perceptual UNet, or a jointly trained UNet."""

    def __init__(
        self,
        vae: CondDFCVAE,
        weights: VAELossWeights,
        device: torch.device,
        *,
        unet: UNet3D | None = None,
        joint: bool = False,
        seg_weights: torch.Tensor | None = None,
    ) -> None:
        self.vae = vae.to(device, memory_format=CHANNELS_LAST)
        self.weights, self.device, self.joint = weights, device, joint
        self.unet = unet.to(device, memory_format=CHANNELS_LAST) if unet is not None else None
        self.seg_weights = seg_weights.to(device) if seg_weights is not None else None
        if self.unet is not None and not joint:
            self.unet.eval()
            for p in self.unet.parameters():
                p.requires_grad_(False)

    def modules(self) -> dict[str, nn.Module]:
        return {"vae": self.vae, **({"unet": self.unet} if self.joint else {})}

    def trainable(self) -> Iterable[nn.Parameter]:
        yield from self.vae.parameters()
        if self.joint and self.unet is not None:
            yield from self.unet.parameters()

    def _loss(self, batch):
        density = batch["density"].to(self.device)
        coords = batch["coords"].to(self.device)
        x = _volumes(self.vae.to_input(density, coords))
        labels = batch["labels"].to(self.device)
        condition = self.vae.condition.one_hot(labels[:, 0].cpu().numpy()).to(self.device)
        output = self.vae(x, condition)
        kwargs = {}
        if self.vae.properties:
            targets = (labels[:, 1:] - self.vae.property_mean) / self.vae.property_std
            kwargs.update(property_targets=targets, property_mask=batch["label_mask"][:, 1:].to(self.device))
        if self.vae.species and "site_species" in batch:
            kwargs["site_classes"] = self.vae.species_classes(batch["site_species"].to(self.device))
        if self.unet is not None:
            kwargs["spacing"] = voxel_spacing(coords)
        if self.unet is not None and not self.joint:
            self.unet.eval()
            kwargs["perceptual"] = self.unet
        if self.joint and self.unet is not None:
            kwargs.update(
                segmenter=self.unet,
                species_classes=self.unet.vocabulary.encode(batch["species"].to(self.device)),
                mask=batch["mask"].to(self.device),
                class_weights=self.seg_weights,
                perceptual=None,
            )
        loss, parts = vae_loss(output, x, self.weights, density_scale=self.vae.density_scale, **kwargs)
        return loss, parts, output, x, kwargs.get("site_classes")

    def train_step(self, batch):
        loss, parts, *_ = self._loss(batch)
        return loss, parts

    def evaluate(self, batches) -> dict[str, float]:
        rows = []
        for batch in batches:
            loss, parts, output, x, classes = self._loss(batch)
            density_mse = float(((output.recon[:, 0] - x[:, 0]) ** 2).mean())
            coords_mse = float(((output.recon[:, 1:] - x[:, 1:]) ** 2).mean())
            row = {**parts, "vae_mse": density_mse, "coords_mse": coords_mse}
            if classes is not None and output.species_logits is not None:
                labelled = classes >= 0
                hits = (output.species_logits.argmax(dim=1) == classes)[labelled]
                row["species_voxel_accuracy"] = float(hits.float().mean()) if hits.numel() else 0.0
            rows.append((len(x), row))
        return _mean_parts(rows)

    def final_model(self) -> nn.Module:
        return self.vae


def graph_collate(items: Sequence[tuple[CrystalGraph, np.ndarray, np.ndarray]]):
    """(GraphBatch, labels (B, P), presence mask (B, P)) from dataset items."""
    graphs, values, present = zip(*items, strict=True)
    return (
        collate_graphs(graphs),
        torch.from_numpy(np.stack(values)),
        torch.from_numpy(np.stack(present)),
    )


class CGCNNTask:
    """Multi-property regression with masks for missing labels (normalised targets).

    A batch is ``(graphs, labels, presence)`` or, with sample weights, ``(graphs, labels,
    presence, weights (B, 1))``: the loss is then the weighted mean over present labels.
    """

    def __init__(self, model: CGCNN, device: torch.device) -> None:
        self.model, self.device = model.to(device), device

    def modules(self) -> dict[str, nn.Module]:
        return {"cgcnn": self.model}

    def trainable(self) -> Iterable[nn.Parameter]:
        return self.model.parameters()

    def _loss(self, batch):
        graphs, values, present, *weights = batch
        graphs: GraphBatch = graphs.to(self.device)
        values, present = values.to(self.device), present.to(self.device)
        prediction = self.model(graphs)
        if weights:
            weight = weights[0].to(self.device)
            normalised = (torch.nan_to_num(values) - self.model.target_mean) / self.model.target_std
            error = (prediction - normalised) ** 2 * present * weight
            loss = error.sum() / (present * weight).sum().clamp_min(1e-8)
            return loss, prediction, values, present
        targets = (values - self.model.target_mean) / self.model.target_std
        return masked_mse(prediction, targets, present), prediction, values, present

    def train_step(self, batch):
        loss, *_ = self._loss(batch)
        return loss, {}

    def evaluate(self, batches) -> dict[str, float]:
        errors, counts, loss_sum, n = None, None, 0.0, 0
        for batch in batches:
            loss, prediction, values, present = self._loss(batch)
            absolute = (self.model.denormalize(prediction) - torch.nan_to_num(values)).abs() * present
            errors = absolute.sum(0) if errors is None else errors + absolute.sum(0)
            counts = present.sum(0) if counts is None else counts + present.sum(0)
            loss_sum, n = loss_sum + float(loss) * len(values), n + len(values)
        metrics = {"loss": loss_sum / max(n, 1)}
        for i, name in enumerate(self.model.properties):
            if counts is not None and counts[i] > 0:
                metrics[f"mae_{name}"] = float(errors[i] / counts[i])
        return metrics

    def final_model(self) -> nn.Module:
        return self.model
