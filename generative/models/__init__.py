"""Generative and property models: Cond-DFC-VAE, 3-D UNet and the CGCNN ensemble.

Names are imported on first use, so that ``crystaloop.generative.models.vae`` (torch alone) loads
without pymatgen, which the CGCNN needs: the GPU trainer has only torch and numpy.
"""

from __future__ import annotations

import importlib

_HOMES = {
    "CGCNN": "cgcnn",
    "CrystalGraph": "cgcnn",
    "GraphBatch": "cgcnn",
    "collate_graphs": "cgcnn",
    "masked_mse": "cgcnn",
    "structure_to_graph": "cgcnn",
    "load_model": "checkpoint",
    "save_model": "checkpoint",
    "DecileCondition": "condition",
    "CGCNNEnsemble": "ensemble",
    "bootstrap_indices": "ensemble",
    "SpeciesVocabulary": "unet",
    "UNet3D": "unet",
    "class_weights": "unet",
    "unet_loss": "unet",
    "CondDFCVAE": "vae",
    "VAELossWeights": "vae",
    "vae_loss": "vae",
}


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_HOMES)
