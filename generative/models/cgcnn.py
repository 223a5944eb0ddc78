"""CGCNN property model (paper 002, eq. 8-10; SI section 2) with index-tensor batching.

Graphs are batched by concatenating atoms and edges and keeping a crystal index per atom, so no
padding to a fixed atom count is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from crystaloop.generative.models.features import (
    ATOM_FEATURES,
    GaussianDistance,
    atom_feature_table,
)
from crystaloop.properties import property_spec

NAN_WHEN_METALLIC = ("dielectric_constant", "refractive_index")


@dataclass
class CrystalGraph:
    """One crystal: atomic numbers (N,), directed edges i <- j and their lengths in Angstrom."""

    atomic_numbers: np.ndarray
    centers: np.ndarray
    neighbors: np.ndarray
    distances: np.ndarray


def structure_to_graph(structure, *, radius: float = 8.0, max_neighbors: int = 12) -> CrystalGraph:
    """The crystal graph: each site's ``max_neighbors`` nearest periodic neighbours within ``radius``.

    Uses pymatgen's periodic neighbour list. Raises ``ValueError`` for elements beyond Pu.
    """
    numbers = np.array([site.specie.Z for site in structure], dtype=np.int64)
    if numbers.max() > atom_feature_table().shape[0] - 1:
        raise ValueError(f"{structure.composition.reduced_formula}: elements beyond Z=94")
    center, neighbor, _, distance = structure.get_neighbor_list(r=radius)
    keep_c, keep_n, keep_d = [], [], []
    for i in range(len(structure)):
        idx = np.flatnonzero(center == i)
        idx = idx[np.argsort(distance[idx], kind="stable")[:max_neighbors]]
        keep_c.append(center[idx])
        keep_n.append(neighbor[idx])
        keep_d.append(distance[idx])
    return CrystalGraph(
        numbers,
        np.concatenate(keep_c).astype(np.int64),
        np.concatenate(keep_n).astype(np.int64),
        np.concatenate(keep_d).astype(np.float32),
    )


@dataclass
class GraphBatch:
    """Several crystal graphs joined with index tensors.

    Attributes
    ----------
    atomic_numbers
        (N_atoms,) Z of every atom in the batch.
    centers, neighbors
        (E,) atom indices (into the batch) of each edge.
    distances
        (E,) edge lengths, Angstrom.
    crystal_index
        (N_atoms,) which crystal each atom belongs to.
    n_crystals
        Number of crystals.
    """

    atomic_numbers: torch.Tensor
    centers: torch.Tensor
    neighbors: torch.Tensor
    distances: torch.Tensor
    crystal_index: torch.Tensor
    n_crystals: int

    def to(self, device) -> GraphBatch:
        """A copy on ``device``."""
        return GraphBatch(
            self.atomic_numbers.to(device),
            self.centers.to(device),
            self.neighbors.to(device),
            self.distances.to(device),
            self.crystal_index.to(device),
            self.n_crystals,
        )


def collate_graphs(graphs: Sequence[CrystalGraph]) -> GraphBatch:
    """Join graphs, shifting each graph's edge indices by the atoms before it."""
    offsets = np.cumsum([0] + [len(g.atomic_numbers) for g in graphs[:-1]])
    return GraphBatch(
        torch.from_numpy(np.concatenate([g.atomic_numbers for g in graphs])),
        torch.from_numpy(np.concatenate([g.centers + o for g, o in zip(graphs, offsets, strict=True)])),
        torch.from_numpy(np.concatenate([g.neighbors + o for g, o in zip(graphs, offsets, strict=True)])),
        torch.from_numpy(np.concatenate([g.distances for g in graphs])),
        torch.from_numpy(
            np.concatenate([np.full(len(g.atomic_numbers), k) for k, g in enumerate(graphs)])
        ).long(),
        len(graphs),
    )


class CGConv(nn.Module):
    """Eq. 8-9: ``v_i + sum_j sigmoid(z_ij W + b) * softplus(z_ij W_s)`` with ``z_ij = v_i|v_j|e_ij``."""

    def __init__(self, node_dim: int, edge_dim: int) -> None:
        super().__init__()
        self.gate = nn.Linear(2 * node_dim + edge_dim, node_dim)
        self.core = nn.Linear(2 * node_dim + edge_dim, node_dim, bias=False)
        self.bn_gate = nn.BatchNorm1d(node_dim)
        self.bn_core = nn.BatchNorm1d(node_dim)
        self.bn_sum = nn.BatchNorm1d(node_dim)

    def forward(self, v: torch.Tensor, edges: torch.Tensor, centers, neighbors) -> torch.Tensor:
        """Updated node features (N, node_dim)."""
        z = torch.cat([v[centers], v[neighbors], edges], dim=1)
        message = torch.sigmoid(self.bn_gate(self.gate(z))) * F.softplus(self.bn_core(self.core(z)))
        summed = torch.zeros_like(v).index_add_(0, centers, message.to(v.dtype))
        return v + self.bn_sum(summed)


class CGCNN(nn.Module):
    """Multi-property CGCNN: embedding, graph convolutions, mean pooling, two dense layers.

    Parameters
    ----------
    properties
        Names from :mod:`crystaloop.properties`, one output each.
    hidden
        Node feature size after the embedding.
    n_conv
        Graph convolution layers (1 in the paper).
    fc_hidden
        Width of the first dense layer after pooling.
    radius, max_neighbors
        Neighbour cut-off (Angstrom) and count used to build graphs.
    gaussian_step
        Gaussian spacing for edge features, Angstrom.
    """

    kind = "cgcnn"

    def __init__(
        self,
        properties: Sequence[str] = ("formation_energy_per_atom",),
        *,
        hidden: int = 64,
        n_conv: int = 1,
        fc_hidden: int = 128,
        radius: float = 8.0,
        max_neighbors: int = 12,
        gaussian_step: float = 0.2,
    ) -> None:
        super().__init__()
        for name in properties:
            property_spec(name)
        self.properties = list(properties)
        self.hparams = {
            "properties": self.properties,
            "hidden": hidden,
            "n_conv": n_conv,
            "fc_hidden": fc_hidden,
            "radius": radius,
            "max_neighbors": max_neighbors,
            "gaussian_step": gaussian_step,
        }
        self.radius, self.max_neighbors = radius, max_neighbors
        self.expand = GaussianDistance(radius, gaussian_step)
        self.register_buffer("atom_table", torch.from_numpy(atom_feature_table()))
        self.register_buffer("target_mean", torch.zeros(len(self.properties)))
        self.register_buffer("target_std", torch.ones(len(self.properties)))
        self.embedding = nn.Linear(ATOM_FEATURES, hidden)
        self.convs = nn.ModuleList(CGConv(hidden, self.expand.size) for _ in range(n_conv))
        self.dense = nn.Linear(hidden, fc_hidden)
        self.heads = nn.Linear(fc_hidden, len(self.properties))
        self._bn_frozen = False

    def graph(self, structure) -> CrystalGraph:
        """The graph of ``structure`` with this model's cut-offs."""
        return structure_to_graph(structure, radius=self.radius, max_neighbors=self.max_neighbors)

    def set_normalization(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Per-property target mean and standard deviation (property units)."""
        self.target_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.target_std.copy_(torch.as_tensor(std, dtype=torch.float32).clamp_min(1e-6))

    def forward(self, batch: GraphBatch) -> torch.Tensor:
        """Normalised predictions (n_crystals, n_properties)."""
        v = self.embedding(self.atom_table[batch.atomic_numbers])
        edges = self.expand(batch.distances)
        for conv in self.convs:
            v = conv(v, edges, batch.centers, batch.neighbors)
        pooled = torch.zeros(batch.n_crystals, v.shape[1], device=v.device, dtype=v.dtype)
        pooled.index_add_(0, batch.crystal_index, v)
        counts = torch.bincount(batch.crystal_index, minlength=batch.n_crystals).clamp_min(1)
        pooled = pooled / counts[:, None].to(v.dtype)
        return self.heads(F.softplus(self.dense(F.softplus(pooled))))

    def denormalize(self, normalized: torch.Tensor) -> torch.Tensor:
        """Predictions in property units."""
        return normalized * self.target_std + self.target_mean

    @torch.no_grad()
    def predict(self, batch: GraphBatch) -> torch.Tensor:
        """Predictions in property units, with the paper's metallic NaN rule applied."""
        was_training = self.training
        self.eval()
        out = apply_metallic_nan(self.denormalize(self(batch)), self.properties)
        self.train(was_training)
        return out

    # transfer learning (SI 2.6)
    def base_parameters(self):
        """Embedding and convolution parameters (the pretrained feature extractor)."""
        yield from self.embedding.parameters()
        yield from self.convs.parameters()

    def freeze_base(self) -> None:
        """Stage 2: freeze embedding and convolutions; only the dense layers train."""
        for parameter in self.base_parameters():
            parameter.requires_grad_(False)
        self.freeze_batch_norm()

    def unfreeze_base(self) -> None:
        """Stage 3: train everything again, with batch-norm statistics kept frozen."""
        for parameter in self.base_parameters():
            parameter.requires_grad_(True)
        self.freeze_batch_norm()

    def freeze_batch_norm(self) -> None:
        """Keep every batch-norm layer in eval mode (running statistics fixed)."""
        self._bn_frozen = True
        self.train(self.training)

    def train(self, mode: bool = True) -> CGCNN:
        """As :meth:`torch.nn.Module.train`, but frozen batch norms stay in eval mode."""
        super().train(mode)
        if self._bn_frozen:
            for module in self.modules():
                if isinstance(module, nn.BatchNorm1d):
                    module.eval()
        return self

    def replace_heads(self, properties: Sequence[str]) -> None:
        """New output heads and dense layer for ``properties`` (transfer to new targets)."""
        for name in properties:
            property_spec(name)
        self.properties = list(properties)
        self.hparams["properties"] = self.properties
        device = self.heads.weight.device
        self.dense = nn.Linear(self.dense.in_features, self.dense.out_features).to(device)
        self.heads = nn.Linear(self.dense.out_features, len(self.properties)).to(device)
        self.target_mean = torch.zeros(len(self.properties), device=device)
        self.target_std = torch.ones(len(self.properties), device=device)


def apply_metallic_nan(
    values: torch.Tensor, properties: Sequence[str], gap_threshold: float = 0.0
) -> torch.Tensor:
    """Set dielectric constant and refractive index to NaN where band gap <= threshold (eV)."""
    properties = list(properties)
    if "band_gap" not in properties:
        return values
    values = values.clone()
    metallic = values[:, properties.index("band_gap")] <= gap_threshold
    for name in NAN_WHEN_METALLIC:
        if name in properties:
            values[metallic, properties.index(name)] = float("nan")
    return values


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MSE over present labels only (``mask`` 1 where a label exists)."""
    diff = (prediction.float() - torch.nan_to_num(target.float())) ** 2 * mask
    return diff.sum() / mask.sum().clamp_min(1.0)
