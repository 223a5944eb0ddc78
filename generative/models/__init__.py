"""Generative and property models: Cond-DFC-VAE, 3-D UNet and the CGCNN ensemble."""

from crystaloop.generative.models.cgcnn import (
    CGCNN,
    CrystalGraph,
    GraphBatch,
    collate_graphs,
    masked_mse,
    structure_to_graph,
)
from crystaloop.generative.models.checkpoint import load_model, save_model
from crystaloop.generative.models.condition import DecileCondition
from crystaloop.generative.models.ensemble import CGCNNEnsemble, bootstrap_indices
from crystaloop.generative.models.unet import SpeciesVocabulary, UNet3D, class_weights, unet_loss
from crystaloop.generative.models.vae import CondDFCVAE, VAELossWeights, vae_loss

__all__ = [
    "CGCNN",
    "CGCNNEnsemble",
    "CondDFCVAE",
    "CrystalGraph",
    "DecileCondition",
    "GraphBatch",
    "SpeciesVocabulary",
    "UNet3D",
    "VAELossWeights",
    "bootstrap_indices",
    "class_weights",
    "collate_graphs",
    "load_model",
    "masked_mse",
    "save_model",
    "structure_to_graph",
    "unet_loss",
    "vae_loss",
]
