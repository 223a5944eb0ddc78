"""The GPU trainer runs from shards with torch and numpy only, and its checkpoint registers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from crystaloop.cli import app
from crystaloop.generative.evaluate import prior_records
from crystaloop.generative.models.checkpoint import load_model
from crystaloop.generative.models.vae import CondDFCVAE
from crystaloop.generative.train.config import DataConfig
from crystaloop.generative.train.shards import write_site_shards

SCRIPT = Path(__file__).resolve().parents[2] / "generative" / "train" / "gpu.py"

# Fails the run if anything beyond torch and numpy (and the standard library) is imported.
BLOCKER = """
import runpy, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'pymatgen', 'scipy', 'skimage', 'pydantic', 'typer', 'rich', 'pymongo', 'ase'}:
            raise ImportError('the GPU trainer imported ' + name)
sys.meta_path.insert(0, Block())
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def test_gpu_trainer_two_steps_on_cpu_from_tiny_shards(tmp_path, settings):
    records = prior_records()[:6]
    shards = tmp_path / "shards"
    write_site_shards(records, shards, ["formation_energy_per_atom"], grid=8, shard_size=4)
    run = tmp_path / "run"
    argv = ["--shards", str(shards), "--out", str(run), "--steps", "2", "--batch-size", "3"]
    argv += ["--latent-dim", "8", "--widths", "4,8", "--save-every", "1", "--device", "cpu"]
    argv += ["--prior-components", "2"]
    result = subprocess.run(
        [sys.executable, "-c", BLOCKER, str(SCRIPT), *argv], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "step 2/2" in result.stdout
    model, extra = load_model(run / "vae.pt")
    assert isinstance(model, CondDFCVAE) and model.representation == "sites" and model.grid == 8
    # the shards carry species targets: the head is trained over their elements, and the latent
    # prior is fitted to the shard structures' posterior means
    elements = sorted({el.Z for r in records for el in r.structure.composition.elements})
    assert model.species == elements
    assert model.has_latent_prior and model.sample_latent(5).shape == (5, 8)
    assert extra["config"]["model"]["species_head"] and "species_ce" in result.stdout
    assert extra["config"]["optim"]["steps"] == 2 and extra["dataset_hash"]
    # evaluate and lattice-head read the held-out split back from config.data
    data = DataConfig.model_validate(extra["config"]["data"])
    assert data.grid == 8 and extra["config"]["shards"] == str(shards)
    assert torch.load(run / "last.pt", weights_only=False)["step"] == 2

    out = CliRunner().invoke(app, ["models", "register", str(run / "vae.pt"), "--version", "gpu-test"])
    assert out.exit_code == 0, out.output
    listed = CliRunner().invoke(app, ["models", "list", "--kind", "vae"])
    assert "gpu-test" in listed.output


def test_register_rejects_a_missing_checkpoint(settings, tmp_path):
    from crystaloop.errors import UserError

    out = CliRunner().invoke(app, ["models", "register", str(tmp_path / "nope.pt"), "--version", "x"])
    assert isinstance(out.exception, UserError) and out.exception.exit_code == 2
    assert "does not exist" in str(out.exception)
    nameless = CliRunner().invoke(app, ["models", "register", str(tmp_path / "nope.pt"), "--version", ""])
    assert isinstance(nameless.exception, UserError) and "--version ''" in str(nameless.exception)
    unknown = CliRunner().invoke(app, ["models", "list", "--kind", "vea"])
    assert isinstance(unknown.exception, UserError) and "unet, vae, cgcnn" in str(unknown.exception)


def test_gpu_rotation_matches_the_cpu_augmentation():
    """Each sample gets one of the 24 rotations, and the lattice comes back in the standard
    orientation, as the CPU trainer's ``_rotate_array`` and ``_rotated_lattice`` give them."""
    import importlib.util

    import numpy as np
    from pymatgen.core import Lattice

    from crystaloop.generative.representation import (
        _rotate_array,
        _rotated_lattice,
        coordinate_channels,
        cube_rotations,
    )

    spec = importlib.util.spec_from_file_location("gpu_trainer", SCRIPT)
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    # the trainer imports the package (no module patching) and uses its own rotations and
    # coordinate channels, not copies of them
    assert gpu.cube_rotations is cube_rotations and gpu.coordinate_channels is coordinate_channels
    assert "sys.modules" not in SCRIPT.read_text()

    lattice = Lattice.from_parameters(4.1, 5.3, 6.7, 80, 95, 110)
    batch = 120
    channels = torch.randn(batch, 2, 5, 5, 5, generator=torch.Generator().manual_seed(0))
    matrices = torch.tensor(lattice.matrix, dtype=torch.float32).expand(batch, 3, 3).contiguous()
    out, rotated = gpu.rotate(channels, matrices, torch.Generator().manual_seed(1))
    which = torch.randint(24, (batch,), generator=torch.Generator().manual_seed(1))
    assert len(set(which.tolist())) > 12
    for i, k in enumerate(which.tolist()):
        perm, signs = cube_rotations()[k]
        assert np.array_equal(out[i].numpy(), _rotate_array(channels[i].numpy(), perm, signs, leading=1))
        expected = _rotated_lattice(lattice, perm, signs).matrix
        assert np.allclose(rotated[i].numpy(), expected, atol=1e-5)
    # stored lattices are already in that orientation: unchanged
    assert torch.allclose(gpu.standard_lattice(matrices), matrices, atol=1e-5)


def _gpu_trainer():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_trainer", SCRIPT)
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    return gpu


class _Killed(Exception):
    """Stands in for a kill of the trainer."""


def test_a_resumed_gpu_run_ends_with_the_weights_of_a_straight_run(tmp_path, monkeypatch):
    records = prior_records()[:6]
    shards = tmp_path / "shards"
    write_site_shards(records, shards, ["formation_energy_per_atom"], grid=8, shard_size=4)
    argv = ["--shards", str(shards), "--steps", "4", "--batch-size", "3", "--latent-dim", "8"]
    argv += ["--widths", "4,8", "--save-every", "2", "--device", "cpu", "--prior-components", "0"]
    gpu = _gpu_trainer()
    straight, _ = load_model(gpu.main([*argv, "--out", str(tmp_path / "straight")]))

    calls = {"n": 0}
    channels_of = gpu.coordinate_channels

    def killed_in_step_3(lattices, grid):  # called once per step
        calls["n"] += 1
        if calls["n"] == 3:
            raise _Killed
        return channels_of(lattices, grid)

    run = tmp_path / "resumed"
    monkeypatch.setattr(gpu, "coordinate_channels", killed_in_step_3)
    with pytest.raises(_Killed):
        gpu.main([*argv, "--out", str(run)])
    assert torch.load(run / "last.pt", weights_only=False)["step"] == 2 and not (run / "vae.pt").exists()
    monkeypatch.setattr(gpu, "coordinate_channels", channels_of)
    resumed, extra = load_model(gpu.main([*argv, "--out", str(run), "--resume"]))
    for name, weight in straight.state_dict().items():
        assert torch.equal(weight, resumed.state_dict()[name]), name

    # resuming the finished run trains nothing and writes the same checkpoint again
    (run / "vae.pt").unlink()
    again, again_extra = load_model(gpu.main([*argv, "--out", str(run), "--resume"]))
    assert again_extra["metrics"] == extra["metrics"] and set(extra["metrics"]) == {"loss", "mse", "kld"}
    for name, weight in resumed.state_dict().items():
        assert torch.equal(weight, again.state_dict()[name]), name
