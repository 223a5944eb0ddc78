"""`crystaloop train lattice-head` end to end in the real database: posteriors cached and reused,
the VAE with its head registered, and `evaluate reconstruction --lattice` picking the source."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from crystaloop.cli import app
from crystaloop.db.registry import ModelRegistry
from crystaloop.errors import UserError
from crystaloop.generative.models import CondDFCVAE, load_model
from crystaloop.generative.models.checkpoint import save_model
from crystaloop.generative.models.condition import DecileCondition
from crystaloop.generative.models.shipped import CHECKPOINT_DIR, shipped_models
from crystaloop.generative.train.config import DataConfig
from crystaloop.generative.train.lattice_head import checkpoint_sha256
from tests.generative.test_training import _records


@pytest.fixture
def labelled(database):
    database["training_structures"].insert_many(_records())
    return database


def _headless_vae(tmp_path, seed: int = 0):
    torch.manual_seed(seed)
    vae = CondDFCVAE(
        grid=16,
        latent_dim=8,
        widths=[4, 8],
        circular=True,
        representation="sites",
        condition=DecileCondition.fit(list(np.linspace(-3, 0, 20)), "formation_energy_per_atom"),
    )
    data = DataConfig(grid=16, max_sites=40, val_fraction=0.2).model_dump(mode="json")
    return save_model(vae, tmp_path / f"vae-{seed}.pt", config={"data": data}, dataset_hash="0" * 16)


def test_lattice_head_command_trains_registers_and_resumes(labelled, tmp_path, settings):
    source = _headless_vae(tmp_path)
    runner = CliRunner()
    args = ["train", "lattice-head", "--vae", str(source), "--version", "lh1", "--epochs", "3"]
    args += ["--hidden", "8", "--out", str(tmp_path / "runs")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / "vae" / "lh1"
    cache = run_dir / "posterior.npz"
    arrays = np.load(cache)
    n_train, n_val = len(arrays["train_mu"]), len(arrays["val_mu"])
    assert n_train >= 1 and n_val >= 1 and n_train + n_val < 10  # the held-out formulas stay out
    assert arrays["train_lattice"].shape == (n_train, 6)

    doc = ModelRegistry(labelled).get("vae", version="lh1")
    assert doc.default and doc.checkpoint == str((run_dir / "best.pt").resolve())
    assert 0 < doc.metrics["lattice_head_val_lattice_mae_angstrom"] < 10
    assert "fit_val_lattice_mae_angstrom" in doc.metrics
    vae, extra = load_model(doc.checkpoint)
    assert vae.has_lattice_head and extra["lattice_head"]["n_train"] == n_train
    # the VAE's own weights are untouched
    before, _ = load_model(source)
    for key, value in before.state_dict().items():
        torch.testing.assert_close(vae.state_dict()[key], value)

    # a rerun reads the cached posteriors and trains the same head
    stamp = cache.stat().st_mtime_ns
    assert runner.invoke(app, args).exit_code == 0
    assert cache.stat().st_mtime_ns == stamp
    again, _ = load_model(run_dir / "best.pt")
    for key, value in vae.lattice_head.state_dict().items():
        torch.testing.assert_close(again.lattice_head.state_dict()[key], value)

    unet = CHECKPOINT_DIR / next(e for e in shipped_models() if e["kind"] == "unet")["file"]
    sources = {}
    for lattice in ("auto", "fit"):
        result = runner.invoke(
            app,
            ["evaluate", "reconstruction", "--unet", str(unet), "--lattice", lattice]
            + ["--limit", "2", "--format", "json"],
        )
        assert result.exit_code == 0, result.output
        sources[lattice] = json.loads(result.stdout)["lattice"]
    assert sources == {"auto": "head", "fit": "fit"}
    result = runner.invoke(
        app, ["evaluate", "reconstruction", "--vae", str(source), "--unet", str(unet), "--lattice", "head"]
    )
    assert isinstance(result.exception, UserError) and "no lattice head" in str(result.exception)


def test_a_rerun_on_another_vae_encodes_its_posteriors_again(labelled, tmp_path, settings):
    runner = CliRunner()
    args = ["train", "lattice-head", "--version", "lh", "--epochs", "1", "--hidden", "8"]
    args += ["--out", str(tmp_path / "runs")]
    first, second = _headless_vae(tmp_path, seed=0), _headless_vae(tmp_path, seed=1)
    assert runner.invoke(app, [*args, "--vae", str(first)]).exit_code == 0
    cache = tmp_path / "runs" / "vae" / "lh" / "posterior.npz"
    mu_first = np.load(cache)["train_mu"]
    result = runner.invoke(app, [*args, "--vae", str(second)])
    assert result.exit_code == 0, result.output
    assert "another VAE checkpoint" in result.output
    arrays = np.load(cache)
    assert not np.allclose(arrays["train_mu"], mu_first)
    assert str(arrays["source_sha256"]) == checkpoint_sha256(second)
    _, extra = load_model(tmp_path / "runs" / "vae" / "lh" / "best.pt")
    assert extra["lattice_head"]["source_sha256"] == checkpoint_sha256(second)
