"""The checkpoints shipped in the package: complete manifest, small, loadable and usable."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure

from crystaloop.generative.decode import vae_channels
from crystaloop.generative.models import CGCNNEnsemble, CondDFCVAE, UNet3D, collate_graphs, load_model
from crystaloop.generative.models.shipped import CHECKPOINT_DIR, shipped_models
from crystaloop.generative.models.unet import voxel_spacing
from crystaloop.generative.representation import voxelize

ENTRIES = {entry["kind"]: entry for entry in shipped_models() if entry.get("default", True)}
"""The default model of each kind (a second model of a kind ships with ``"default": false``)."""


def _rocksalt() -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5] * 3])


def test_manifest_lists_every_kind_with_its_provenance():
    assert set(ENTRIES) == {"unet", "vae", "cgcnn-ensemble"}
    total = 0
    for entry in ENTRIES.values():
        path = CHECKPOINT_DIR / entry["file"]
        assert path.is_file(), path
        total += path.stat().st_size
        assert entry["command"].startswith(f"crystaloop train {entry['kind'].split('-')[0]} --config configs/train/cpu/")
        assert re.fullmatch(r"[0-9a-f]{16}", entry["dataset_hash"])
        assert entry["torch_version"] and entry["metrics"] and entry["config"]
    assert total < 50 * 2**20
    # the package ships only what the manifest lists; other checkpoints are rebuilt from configs
    assert {p.name for p in CHECKPOINT_DIR.glob("*.pt")} == {e["file"] for e in shipped_models()}


@pytest.fixture(scope="module")
def shipped():
    return {kind: load_model(CHECKPOINT_DIR / entry["file"])[0] for kind, entry in ENTRIES.items()}


def test_shipped_cgcnn_ensemble_predicts_with_calibrated_uncertainty(shipped):
    ensemble = shipped["cgcnn-ensemble"]
    assert isinstance(ensemble, CGCNNEnsemble) and len(ensemble.members) == 5
    assert "formation_energy_per_atom" in ensemble.properties
    assert bool((ensemble.sigma_scale > 1).all())  # the fitted factor widens the members' spread
    mean, std = ensemble.predict(collate_graphs([ensemble.members[0].graph(_rocksalt())]))
    i = ensemble.properties.index("formation_energy_per_atom")
    assert -3.0 < float(mean[0, i]) < -1.0 and float(std[0, i]) > 0  # NaCl: about -2.1 eV/atom


def test_shipped_unet_and_vae_run_on_a_voxelised_crystal(shipped):
    unet, vae = shipped["unet"], shipped["vae"]
    assert isinstance(unet, UNet3D) and isinstance(vae, CondDFCVAE)
    assert unet.spacing and {11, 17} <= set(unet.vocabulary.atomic_numbers)
    voxels = voxelize(_rocksalt(), grid=32)
    density = torch.from_numpy(np.asarray(voxels.density))[None]
    coords = torch.from_numpy(np.asarray(voxels.coords))[None]
    species = unet.predict_species(density[:, None], voxel_spacing(coords))
    assert species.shape == density.shape and set(species.unique().tolist()) <= set(unet.vocabulary.atomic_numbers)
    channels, vae_coords = vae_channels(vae, [_rocksalt()])  # eq. 1 density or site channels
    with torch.no_grad():
        out = vae(vae.to_input(channels, vae_coords), vae.condition.for_window(-2.5, -1.5)[None])
    assert out.recon.shape == (1, vae.in_channels, vae.grid, vae.grid, vae.grid) and torch.isfinite(out.recon).all()


def test_a_packaged_checkpoint_resolves_by_its_version_without_the_registry(database):
    from crystaloop.errors import UserError
    from crystaloop.generative.train.run import resolve_checkpoint

    unet = ENTRIES["unet"]
    assert resolve_checkpoint(unet["version"], "unet", database) == CHECKPOINT_DIR / unet["file"]
    cgcnn = ENTRIES["cgcnn-ensemble"]
    assert resolve_checkpoint(cgcnn["version"], "cgcnn", database) == CHECKPOINT_DIR / cgcnn["file"]
    with pytest.raises(UserError, match="no vae checkpoint"):
        resolve_checkpoint(unet["version"], "vae", database)  # a unet file is not a vae
