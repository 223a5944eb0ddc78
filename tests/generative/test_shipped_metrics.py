"""Shipped metrics come from code: evaluate writes its numbers to the registry and the manifest,
re-shipping keeps them, and calibration-split coverage is labelled as calibration."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from crystaloop.cli import app
from crystaloop.db.documents import ModelDoc
from crystaloop.db.registry import ModelRegistry
from crystaloop.errors import UserError
from crystaloop.generative.models import shipped

SAMPLING_KEYS = {
    "n_samples",
    "decoded_share",
    "valid_share",
    "valid_before_repair_share",
    "merged_sites_mean",
    "charge_balanced_share",
    "smact_valid_share",
    "composition_novel_share_of_valid",
    "novel_share_of_valid",
    "prototype_novel_share_of_valid",
    "valid_smact_novel_unique_share",
    "training_charge_balanced_share",
    "training_smact_valid_share",
    "unique_share_of_valid",
    "novel_unique_share_of_valid",
    "seconds_per_sample",
    "site_counts",
    "prototypes",
    "failures",
}


def _ship_real(monkeypatch, tmp_path, database) -> dict[str, ModelDoc]:
    """Ship copies of the packaged VAE and UNet into a temporary manifest; returns their docs."""
    sources = {
        e["kind"]: shipped.CHECKPOINT_DIR / e["file"]
        for e in shipped.shipped_models()
        if e.get("default", True)
    }
    monkeypatch.setattr(shipped, "CHECKPOINT_DIR", tmp_path / "ckpt")
    monkeypatch.setattr(shipped, "MANIFEST", tmp_path / "ckpt" / "manifest.json")
    docs = {}
    for kind in ("vae", "unet"):
        doc = ModelDoc(kind=kind, version=f"{kind}-t1", dataset_hash="h", checkpoint=str(sources[kind]))
        docs[kind] = ModelRegistry(database).register(doc, make_default=True)
        shipped.ship(docs[kind], f"crystaloop train {kind} --config configs/train/cpu/{kind}.yaml")
    return docs


def test_ship_then_evaluate_sampling_writes_that_versions_numbers(monkeypatch, tmp_path, database):
    _ship_real(monkeypatch, tmp_path, database)
    args = ["evaluate", "sampling", "--n", "4", "--workers", "1", "--format", "json", "--update-manifest"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # the progress bar goes to stderr
    assert SAMPLING_KEYS <= set(report) and report["n_samples"] == 4
    # the shares nest: after repair >= valid >= novel and SMACT-valid >= all four at once
    assert report["valid_share"] >= report["valid_smact_novel_unique_share"]
    assert 0.0 <= report["valid_before_repair_share"] <= 1.0
    # the prior's chemistry, measured on the training split: most of it is not charge-balanced
    assert 0.0 < report["training_charge_balanced_share"] < 1.0
    assert "decoding samples: 4/4" in result.stderr
    entry = next(e for e in shipped.shipped_models() if e["kind"] == "vae")
    block = entry["sampling_random"]
    assert block["command"] == "crystaloop evaluate sampling --n 4 --strategy random"
    assert block["valid_share"] == report["valid_share"] and block["n_samples"] == 4
    registered = ModelRegistry(database).get("vae", version="vae-t1")
    assert registered.metrics["sampling_random_valid_share"] == report["valid_share"]


def test_sampling_from_normal_prior_is_recorded_apart_from_the_fitted_one(monkeypatch, tmp_path, database):
    _ship_real(monkeypatch, tmp_path, database)
    runner = CliRunner()
    before = shipped.MANIFEST.read_text()
    quick = runner.invoke(app, ["evaluate", "sampling", "--n", "2", "--workers", "1", "--format", "json"])
    assert quick.exit_code == 0, quick.output
    # Without --update-manifest the package's files stay as shipped; the registry gets the numbers.
    assert shipped.MANIFEST.read_text() == before
    assert ModelRegistry(database).get("vae").metrics["sampling_random_n_samples"] == 2
    common = ["evaluate", "sampling", "--n", "3", "--workers", "1", "--update-manifest"]
    fitted = runner.invoke(app, [*common, "--format", "json"])
    assert fitted.exit_code == 0, fitted.output
    args = [*common, "--prior", "normal", "--format", "json"]
    normal = runner.invoke(app, args)
    assert normal.exit_code == 0, normal.output
    assert json.loads(normal.stdout)["latent_prior"] == "N(0, I)"
    assert json.loads(fitted.stdout)["latent_prior"] == "fitted mixture"  # the shipped VAE stores one
    entry = next(e for e in shipped.shipped_models() if e["kind"] == "vae")
    assert entry["sampling_normal"]["command"].endswith("--strategy random --prior normal")
    assert entry["sampling_random"]["n_samples"] == 3  # the fitted prior's block is kept

    bad = runner.invoke(app, ["evaluate", "sampling", "--n", "3", "--prior", "uniform"])
    assert isinstance(bad.exception, UserError) and bad.exception.exit_code == 2
    assert "--prior must be" in str(bad.exception)


def test_evaluate_output_survives_reshipping_and_calibration_is_labelled(monkeypatch, tmp_path, database):
    docs = _ship_real(monkeypatch, tmp_path, database)
    held_out = {"n_structures": 3, "lattice_mae_angstrom": 0.5, "mae": {"band_gap": 0.2}}
    shipped.record_held_out(
        database, docs["vae"].checkpoint, "crystaloop evaluate reconstruction", held_out, manifest=True
    )
    entry = next(e for e in shipped.shipped_models() if e["kind"] == "vae")
    assert entry["held_out"] == {"command": "crystaloop evaluate reconstruction", **held_out}
    again = ModelRegistry(database).get("vae", version="vae-t1")
    assert again.metrics["held_out_mae_band_gap"] == 0.2
    shipped.ship(again, "crystaloop train vae --config configs/train/cpu/vae.yaml")  # re-ship, same version
    entry = next(e for e in shipped.shipped_models() if e["kind"] == "vae")
    assert (
        entry["held_out"]["lattice_mae_angstrom"] == 0.5 and "held_out_mae_band_gap" not in entry["metrics"]
    )

    ensemble = ModelDoc(
        kind="cgcnn-ensemble",
        version="e1",
        dataset_hash="h",
        checkpoint=docs["unet"].checkpoint,
        metrics={"mae_band_gap": 0.3, "within_1sigma_band_gap": 0.68, "within_2sigma_band_gap": 0.95},
    )
    entry = shipped.ship(ensemble, "crystaloop train cgcnn --config configs/train/cpu/cgcnn.yaml")
    assert entry["metrics"] == {"mae_band_gap": 0.3}
    assert entry["calibration"] == {"within_1sigma_band_gap": 0.68, "within_2sigma_band_gap": 0.95}


def test_reshipping_a_registered_shipped_checkpoint_in_place(monkeypatch, tmp_path, database):
    docs = _ship_real(monkeypatch, tmp_path, database)
    entry = next(e for e in shipped.shipped_models() if e["kind"] == "unet")
    in_place = docs["unet"].model_copy(update={"checkpoint": str(shipped.CHECKPOINT_DIR / entry["file"])})
    again = shipped.ship(in_place, entry["command"])
    assert again["file"] == entry["file"] and (shipped.CHECKPOINT_DIR / entry["file"]).is_file()


def test_reconstruction_gives_the_vae_and_the_unet_each_their_own_numbers():
    from crystaloop.cli.evaluate import split_reconstruction

    metrics = {
        "n_structures": 5,
        "method": "sites",
        "unet_nonzero_recall": 0.9,
        "unet_nonzero_recall_masked": 0.8,
        "lattice_mae_angstrom": 0.02,
        "angle_mae_degrees": 0.1,
    }
    vae, unet = split_reconstruction(metrics)
    assert vae == {
        "n_structures": 5,
        "method": "sites",
        "lattice_mae_angstrom": 0.02,
        "angle_mae_degrees": 0.1,
    }
    assert unet == {"n_structures": 5, "unet_nonzero_recall": 0.9, "unet_nonzero_recall_masked": 0.8}


def test_a_second_model_of_a_kind_ships_beside_the_default(monkeypatch, tmp_path, database):
    docs = _ship_real(monkeypatch, tmp_path, database)
    general = ModelDoc(
        kind="vae", version="vae-general-t1", dataset_hash="g", checkpoint=docs["vae"].checkpoint
    )
    general = ModelRegistry(database).register(general, make_default=False)
    shipped.ship(
        general, "crystaloop train vae --config configs/train/cpu/vae_sites_general.yaml", default=False
    )
    entries = {e["version"]: e for e in shipped.shipped_models()}
    assert set(entries) == {"vae-t1", "unet-t1", "vae-general-t1"}
    assert entries["vae-general-t1"]["default"] is False and "default" not in entries["vae-t1"]
    database["models"].delete_many({})
    shipped.register_shipped(database, kinds=["vae"])
    registry = ModelRegistry(database)
    assert registry.get("vae").version == "vae-t1"  # the default stays the default
    assert registry.get("vae", version="vae-general-t1").checkpoint.endswith("vae-vae-general-t1.pt")
    # re-shipping the default replaces only the default
    shipped.ship(docs["vae"], "crystaloop train vae --config configs/train/cpu/vae.yaml")
    assert {e["version"] for e in shipped.shipped_models()} == {"vae-t1", "unet-t1", "vae-general-t1"}
