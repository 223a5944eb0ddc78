"""Save and load models as one ``.pt`` file: kind, constructor arguments, weights, extras."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

# the model classes are imported when a payload is read: writing one needs torch alone (the GPU
# trainer), and the CGCNN needs pymatgen
_CLASSES = {
    "unet": "crystaloop.generative.models.unet:UNet3D",
    "vae": "crystaloop.generative.models.vae:CondDFCVAE",
    "cgcnn": "crystaloop.generative.models.cgcnn:CGCNN",
    "cgcnn-ensemble": "crystaloop.generative.models.ensemble:CGCNNEnsemble",
}


def _class(kind: str) -> type[nn.Module]:
    import importlib

    module, _, name = _CLASSES[kind].partition(":")
    return getattr(importlib.import_module(module), name)


def model_payload(model: nn.Module) -> dict[str, Any]:
    """The picklable description of ``model`` (kind, hparams, state dict)."""
    if model.kind == "cgcnn-ensemble":
        return {
            "kind": model.kind,
            "members": [model_payload(m) for m in model.members],
            "sigma_scale": model.sigma_scale.tolist(),
        }
    return {
        "kind": model.kind,
        "hparams": dict(model.hparams),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }


def model_from_payload(payload: dict[str, Any]) -> nn.Module:
    """Rebuild a model from :func:`model_payload` output."""
    if payload["kind"] == "cgcnn-ensemble":
        ensemble = _class("cgcnn-ensemble")([model_from_payload(m) for m in payload["members"]])
        if "sigma_scale" in payload:
            ensemble.sigma_scale.copy_(torch.as_tensor(payload["sigma_scale"], dtype=torch.float32))
        return ensemble
    cls = _class(payload["kind"])
    hparams = dict(payload["hparams"])
    if payload["kind"] == "unet":
        hparams.setdefault("input_transform", "none")  # checkpoints that predate the option
        model = cls(hparams.pop("atomic_numbers"), **hparams)
    elif payload["kind"] == "cgcnn":
        model = cls(hparams.pop("properties"), **hparams)
    else:
        model = cls(**hparams)
    model.load_state_dict(payload["state_dict"])
    return model


def save_model(model: nn.Module, path: str | Path, **extra: Any) -> Path:
    """Write ``model`` and ``extra`` metadata (config, metrics ...) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = model_payload(model)
    payload["extra"] = extra
    payload["torch_version"] = torch.__version__
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def load_model(path: str | Path, map_location: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The model stored at ``path`` (in eval mode) and its extra metadata.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    payload = torch.load(path, map_location=map_location, weights_only=False)
    model = model_from_payload(payload)
    model.eval()
    return model, payload.get("extra", {})
