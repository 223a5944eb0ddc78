"""End-to-end training on a tiny labelled set in the real database: train, register, resume, evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from pymatgen.core import Lattice, Structure
from typer.testing import CliRunner

from crystaloop.cli import app
from crystaloop.db.documents import StructureFields, TrainingStructureDoc
from crystaloop.db.registry import ModelRegistry
from crystaloop.errors import ConfigError, UserError
from crystaloop.generative.decode import SEGMENT_GRID
from crystaloop.generative.evaluate import predict_properties
from crystaloop.generative.models import CGCNNEnsemble, CondDFCVAE, UNet3D, load_model, save_model
from crystaloop.generative.models.unet import voxel_spacing
from crystaloop.generative.representation import voxelize
from crystaloop.generative.train.config import DataConfig, GeometryNoise, load_train_config
from crystaloop.generative.train.data import composition_split, load_records, perturbed_copies
from crystaloop.generative.train.run import _prepare, default_version, graph_set, train_and_register

GRID = 16
TINY_DATA = {"grid": GRID, "max_sites": 40}
TINY_OPTIM = {"epochs": 1, "batch_size": 4, "lr": 1e-3, "max_batches_per_epoch": 2}


def _records() -> list[dict]:
    rows = []
    rng = np.random.default_rng(0)
    pairs = [("Na", "Cl"), ("K", "Cl"), ("Mg", "O"), ("Ca", "O"), ("Li", "F"), ("Na", "F")]
    for i, (a, b) in enumerate(pairs):
        s = Structure.from_spacegroup("Fm-3m", Lattice.cubic(4.2 + 0.3 * i), [a, b], [[0, 0, 0], [0.5] * 3])
        rows.append((f"test:B1:{a}{b}", s, "binary"))
    for i, (a, b) in enumerate([("Sr", "Ti"), ("Ba", "Ti"), ("Ca", "Ti"), ("Sr", "Zr")]):
        s = Structure(
            Lattice.cubic(3.9 + 0.1 * i),
            [a, b, "O", "O", "O"],
            [[0, 0, 0], [0.5] * 3, [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]],
        )
        rows.append((f"test:perovskite:{a}{b}O3", s, "perovskite"))
    docs = []
    for sid, s, cls in rows:
        labels = {
            "formation_energy_per_atom": float(rng.normal(-2, 1)),
            "bulk_modulus": float(rng.uniform(20, 200)),
            "band_gap": None,
        }
        doc = TrainingStructureDoc(
            **StructureFields.fields_from(s, spacegroup=False),
            structure_id=sid,
            source="prior",
            dataset="test",
            material_class=cls,
            labels=labels,
        )
        docs.append(doc.model_dump())
    return docs


@pytest.fixture
def labelled(database):
    database["training_structures"].insert_many(_records())
    return database


def _config(tmp_path, name: str, body: dict):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def test_another_dataset_is_mixed_in_as_a_stated_subset(labelled):
    others = []
    for doc in _records()[:6]:  # the rock salts again, as a second dataset
        others.append({**doc, "structure_id": doc["structure_id"].replace("test:", "other:"), "dataset": "other"})
    labelled["training_structures"].insert_many(others)
    alone = load_records(labelled, DataConfig(dataset="test"))
    mixed = load_records(labelled, DataConfig(dataset="test", mix={"other": 4}))
    assert len(alone) == 10 and len(mixed) == 14
    picked = {r.structure_id for r in mixed} - {r.structure_id for r in alone}
    assert len(picked) == 4 and all(sid.startswith("other:") for sid in picked)
    again = load_records(labelled, DataConfig(dataset="test", mix={"other": 4}))
    assert [r.structure_id for r in again] == [r.structure_id for r in mixed]  # the same draw
    assert len(load_records(labelled, DataConfig(dataset="test", mix={"other": 100}))) == 16
    with pytest.raises(UserError, match="data.mix names dataset 'absent'"):
        load_records(labelled, DataConfig(dataset="test", mix={"absent": 5}))
    for bad in ({"dataset": None, "mix": {"other": 4}}, {"dataset": "test", "mix": {"test": 4}}, {"dataset": "test", "mix": {"other": 0}}):
        with pytest.raises(ValueError, match="data.mix"):
            DataConfig(**bad)


def test_split_is_by_composition_and_stable(labelled):
    config = DataConfig(grid=GRID, test_fraction=0.3)
    records = load_records(labelled, config)
    train, test = composition_split(records, 0.3, 0)
    assert {r.formula for r in train}.isdisjoint({r.formula for r in test})
    again, _ = composition_split(list(reversed(records)), 0.3, 0)
    assert {r.structure_id for r in again} == {r.structure_id for r in train}


def test_validation_formulas_come_from_the_training_side(labelled):
    from crystaloop.generative.train.config import CGCNNTrainConfig

    config = CGCNNTrainConfig(data={"max_sites": 40, "test_fraction": 0.3, "val_fraction": 0.3})
    train, val, data_hash, elements = _prepare(config, labelled)
    _, test = composition_split(load_records(labelled, config.data), 0.3, 0)
    formulas = [{r.formula for r in side} for side in (train, val, test)]
    assert (
        all(formulas)
        and formulas[0].isdisjoint(formulas[1])
        and formulas[2].isdisjoint(formulas[0] | formulas[1])
    )
    assert len(train) + len(val) + len(test) == 10 and len(data_hash) == 16
    assert {8, 9, 11, 17, 22, 40, 56} <= set(elements)


def test_train_unet_then_vae_then_cgcnn_register_and_resume(labelled, tmp_path, settings):
    root = tmp_path / "runs"
    unet_path = _config(
        tmp_path,
        "unet",
        {"data": TINY_DATA, "optim": TINY_OPTIM, "model": {"widths": [4, 8]}, "class_count_samples": 4},
    )
    unet_cfg = load_train_config(unet_path, "unet")
    doc, metrics = train_and_register("unet", unet_cfg, labelled, root, version="u1")
    assert doc.kind == "unet" and doc.default
    unet_doc = doc
    unet, extra = load_model(doc.checkpoint)
    assert isinstance(unet, UNet3D) and extra["class_weights"][0] == 0.0
    assert extra["dataset_hash"] == doc.dataset_hash and len(doc.dataset_hash) == 16
    # The recall is the share of the validation crystals' site voxels whose species the
    # registered UNet names right, counted here voxel by voxel.
    _, val, _, _ = _prepare(unet_cfg, labelled)
    right = sites = 0
    for record in val:
        voxels = voxelize(record.structure, grid=GRID)
        density = torch.from_numpy(np.asarray(voxels.density, dtype=np.float32))[None, None]
        coords = torch.from_numpy(np.asarray(voxels.coords, dtype=np.float32))[None]
        species = torch.from_numpy(voxels.species.astype(np.int64))
        predicted, _ = unet.predict(density, voxel_spacing(coords))
        site = species > 0
        right, sites = right + int((predicted[0] == species)[site].sum()), sites + int(site.sum())
    assert [r.formula for r in val] == ["NaCl", "BaTiO3"] and sites > 0
    assert metrics["unet_nonzero_recall"] == pytest.approx(right / sites, abs=1e-9)

    vae_body = {
        "data": TINY_DATA,
        "optim": TINY_OPTIM,
        "model": {"latent_dim": 8, "widths": [4, 8], "properties": ["bulk_modulus"], "circular": True},
    }
    vae_cfg = load_train_config(_config(tmp_path, "vae", vae_body), "vae")
    doc, metrics = train_and_register("vae", vae_cfg, labelled, root, version="v1")
    assert np.isfinite(metrics["loss"]) and metrics["perceptual"] > 0 and "property" in metrics
    vae, extra = load_model(doc.checkpoint)
    assert isinstance(vae, CondDFCVAE) and extra["unet"].endswith("best.pt")
    assert len(vae.condition.boundaries) == 9 and vae.property_std[0] > 1

    cg_body = {
        "data": {"max_sites": 40},
        "optim": {**TINY_OPTIM, "epochs": 2, "schedule": "cosine"},
        "model": {"hidden": 8, "fc_hidden": 8},
        "properties": ["formation_energy_per_atom", "bulk_modulus", "band_gap"],
        "ensemble_size": 2,
    }
    cg_cfg = load_train_config(_config(tmp_path, "cgcnn", cg_body), "cgcnn")
    doc, metrics = train_and_register("cgcnn", cg_cfg, labelled, root, version="c1")
    assert doc.kind == "cgcnn-ensemble" and "mae_formation_energy_per_atom" in metrics
    assert "mae_band_gap" not in metrics  # no labels: masked out
    ensemble, _ = load_model(doc.checkpoint)
    assert isinstance(ensemble, CGCNNEnsemble) and len(ensemble.members) == 2

    with pytest.raises(Exception, match="--resume"):
        train_and_register("cgcnn", cg_cfg, labelled, root, version="c1")
    longer = cg_cfg.model_copy(update={"optim": cg_cfg.optim.model_copy(update={"epochs": 3})})
    train_and_register("cgcnn", longer, labelled, root, version="c1", resume=True)
    state = torch.load(root / "cgcnn" / "c1" / "member-1" / "last.pt", weights_only=False)
    assert state["state"]["epoch"] == 3 and len(state["state"]["history"]) == 3
    assert state["scheduler"]["_last_lr"][0] < 1e-3  # cosine decay, carried through the resume
    # The validation split of ten records holds fewer than 10 labelled items per property, so
    # training stores the unfitted factor 1.0 for each.
    assert ensemble.sigma_scale.tolist() == [1.0, 1.0, 1.0]
    # Calibration on points whose answer is known: the ensemble's own means and spreads on the
    # ten records, with labels drawn so that every error is 3 x N(0, 1) times the spread (an
    # under-dispersed ensemble). The factor is fitted on five crystals and judged on the other five.
    records = load_records(labelled, DataConfig(max_sites=40))
    graphs = graph_set(ensemble.members[0], records, ensemble.properties)
    items = [graphs[i] for i in range(len(graphs))]
    mean, spread, _, _ = predict_properties(ensemble, items)
    ef, gap = ensemble.properties.index("formation_energy_per_atom"), ensemble.properties.index("band_gap")
    assert len(items) == 10 and (spread[:, ef] > 0).all()
    rng, draws = np.random.default_rng(0), 400

    def labels_around(rows):
        """Each crystal's prediction repeated ``draws`` times, with labels drawn around it."""
        m, s = np.repeat(mean[rows], draws, axis=0), np.repeat(spread[rows], draws, axis=0)
        present = np.ones(m.shape, dtype=bool)
        present[:, gap] = False  # no band-gap labels: that factor stays unfitted
        return m, s, m + 3.0 * s * rng.standard_normal(m.shape), present

    fitted, held_out = slice(0, 5), slice(5, 10)
    scales = ensemble.calibrate(*labels_around(fitted))
    assert scales[ef] == pytest.approx(3.0, abs=0.25) and scales[gap] == 1.0
    _, sigma, _, _ = predict_properties(ensemble, items[held_out])  # now calibrated
    np.testing.assert_allclose(sigma[:, ef], spread[held_out, ef] * scales[ef], rtol=1e-5)
    m, _, values, _ = labels_around(held_out)
    error, sigma = np.abs(values - m)[:, ef], np.repeat(sigma, draws, axis=0)[:, ef]
    assert abs(float((error <= sigma).mean()) - 0.6827) < 0.035
    assert abs(float((error <= 2 * sigma).mean()) - 0.9545) < 0.02

    kinds = {d.kind for d in ModelRegistry(labelled).list()}
    assert kinds == {"unet", "vae", "cgcnn-ensemble"}

    runner = CliRunner()
    listed = runner.invoke(app, ["models", "list"])
    assert listed.exit_code == 0 and "cgcnn-ensemble" in listed.output

    # A hand-set ensemble whose answers are known: member k predicts one constant for every
    # crystal (zero head weights, target mean c_k), E_f -2 -+ d, so its mean is -2 and its spread d.
    _, test = composition_split(records, 0.2, 0)
    assert sorted(r.formula for r in test) == ["CaO", "SrTiO3"]  # the held-out split
    ef_error = np.array([abs(r.labels["formation_energy_per_atom"] + 2.0) for r in test])
    bulk_error = np.array([abs(r.labels["bulk_modulus"] - 100.0) for r in test])
    d = (max(ef_error.min(), ef_error.max() / 2) + ef_error.max()) / 2  # covers one error; 2d both
    known, known_extra = load_model(doc.checkpoint)
    for k, member in enumerate(known.members):
        constants = {
            "formation_energy_per_atom": -2.0 + (d if k else -d),
            "bulk_modulus": 100.0,
            "band_gap": 1.0,
        }
        with torch.no_grad():
            member.heads.weight.zero_()
            member.heads.bias.zero_()
            member.target_mean.copy_(torch.tensor([constants[p] for p in member.properties]))
    known_path = save_model(known, tmp_path / "known-cgcnn.pt", **known_extra)
    result = runner.invoke(app, ["evaluate", "properties", "--model", str(known_path), "--format", "json"])
    assert result.exit_code == 0, result.output
    props = json.loads(result.stdout)
    assert props["n_structures"] == 2
    assert props["mae"]["formation_energy_per_atom"] == pytest.approx(ef_error.mean(), abs=1e-5)
    assert props["mae"]["bulk_modulus"] == pytest.approx(bulk_error.mean(), abs=1e-4)
    assert props["within_1sigma"]["formation_energy_per_atom"] == 0.5
    assert props["within_2sigma"]["formation_energy_per_atom"] == 1.0
    assert props["within_2sigma"]["bulk_modulus"] == 0.0  # no spread: no error is covered
    assert "band_gap" not in props["mae"]  # no labels

    # A hand-set UNet that names every voxel oxygen and puts none inside its mask. Its species
    # recall on the held-out crystals is their share of oxygen site voxels on the 32^3 grid; its
    # masked recall is 0; and with an empty mask no crystal decodes to any site.
    oxygen_unet, unet_extra = load_model(unet_doc.checkpoint)
    with torch.no_grad():
        oxygen_unet.species_head.weight.zero_()
        oxygen_unet.species_head.bias.zero_()
        oxygen_unet.species_head.bias[oxygen_unet.vocabulary.atomic_numbers.index(8)] = 1.0
        oxygen_unet.mask_head.weight.zero_()
        oxygen_unet.mask_head.bias.fill_(-5.0)
    unet_path = save_model(oxygen_unet, tmp_path / "oxygen-unet.pt", **unet_extra)
    true_species = [voxelize(r.structure, grid=SEGMENT_GRID).species for r in test]
    oxygen_voxels = sum(int((z == 8).sum()) for z in true_species)
    oxygen_share = oxygen_voxels / sum(int((z > 0).sum()) for z in true_species)
    assert 0.3 < oxygen_share < 0.9
    result = runner.invoke(
        app, ["evaluate", "reconstruction", "--unet", str(unet_path), "--format", "json", "--limit", "2"]
    )
    assert result.exit_code == 0, result.output
    recon = json.loads(result.stdout)  # the progress bar goes to stderr
    assert recon["method"] == "paper" and recon["n_structures"] == 2
    assert "reconstructing: 2/2" in result.stderr
    assert recon["unet_nonzero_recall"] == pytest.approx(oxygen_share, abs=1e-12)
    assert recon["unet_nonzero_recall_masked"] == 0.0
    assert recon["no_sites_found"] == 2 and recon["emd_mean_angstrom"] is None
    assert recon["delta_nsites_mean"] == np.mean([len(r.structure) for r in test]) == 6.5  # CaO 8, SrTiO3 5
    assert recon["species_exact"] == 0.0  # no site matched
    assert np.isfinite(recon["lattice_mae_angstrom"]) and recon["vae_mse"] > 0


def test_joint_vae_unet_training_saves_both(labelled, tmp_path, settings):
    body = {
        "data": TINY_DATA,
        "optim": TINY_OPTIM,
        "model": {"latent_dim": 8, "widths": [4, 8]},
        "alpha": 0.0,
        "joint_unet": True,
    }
    cfg = load_train_config(_config(tmp_path, "joint", body), "vae")
    doc, metrics = train_and_register("vae", cfg, labelled, tmp_path / "runs", version="j1")
    assert metrics["segmentation"] > 0
    assert (tmp_path / "runs" / "vae" / "j1" / "joint-unet.pt").is_file()


def _registered_tiny_cgcnn(database, tmp_path, version: str, ensemble_size: int):
    """A tiny CGCNN (ensemble) trained and registered as ``version``, and the config body it used."""
    base = {
        "data": {"max_sites": 40},
        "optim": TINY_OPTIM,
        "model": {"hidden": 8, "fc_hidden": 8},
        "ensemble_size": ensemble_size,
    }
    cfg = load_train_config(_config(tmp_path, f"base-{version}", base), "cgcnn")
    doc, _ = train_and_register("cgcnn", cfg, database, tmp_path / "runs", version=version)
    return base, doc


def test_cgcnn_transfer_learning_from_a_registered_model(labelled, tmp_path, settings):
    base, doc = _registered_tiny_cgcnn(labelled, tmp_path, "ef", ensemble_size=1)
    assert doc.kind == "cgcnn"
    pretrained, _ = load_model(doc.checkpoint)
    transfer = {
        **base,
        "properties": ["bulk_modulus"],
        "transfer": {"base": "ef", "head_epochs": 1, "finetune_epochs": 1},
    }
    cfg = load_train_config(_config(tmp_path, "transfer", transfer), "cgcnn")
    doc, metrics = train_and_register("cgcnn", cfg, labelled, tmp_path / "runs", version="k")
    tuned, _ = load_model(doc.checkpoint)
    assert tuned.properties == ["bulk_modulus"] and "mae_bulk_modulus" in metrics
    heads, _ = load_model(tmp_path / "runs" / "cgcnn" / "k" / "member-0" / "heads" / "best.pt")
    # stage 2 kept the pretrained base; stage 3 fine-tuned it
    assert torch.equal(heads.embedding.weight, pretrained.embedding.weight)
    assert not torch.equal(tuned.embedding.weight, pretrained.embedding.weight)


def test_perturbed_copies_keep_labels_within_the_configured_noise(labelled):
    records = load_records(labelled, DataConfig(max_sites=40))
    noise = GeometryNoise(copies=2, volume=(0.6, 1.5), strain=0.03, displacement=0.05)
    copies = perturbed_copies(records, noise, seed=4)
    assert len(copies) == 2 * len(records)
    assert [c.structure_id for c in copies[:2]] == [
        f"{records[0].structure_id}~0",
        f"{records[0].structure_id}~1",
    ]
    for i, copy in enumerate(copies):
        source = records[i // 2]
        assert copy.labels == source.labels and copy.material_class == source.material_class
        assert copy.structure.composition == source.structure.composition
        assert 0.6 - 1e-6 <= copy.structure.volume / source.structure.volume <= 1.5 + 1e-6
        assert copy.structure.lattice != source.structure.lattice
    again = perturbed_copies(records, noise, seed=4)
    assert all(a.structure == b.structure for a, b in zip(copies, again, strict=True))  # seeded
    assert perturbed_copies(records, GeometryNoise(), seed=4) == []  # copies: 0 is off


def test_cgcnn_init_continues_a_registered_ensemble_on_perturbed_copies(labelled, tmp_path, settings):
    base, doc = _registered_tiny_cgcnn(labelled, tmp_path, "e0", ensemble_size=2)
    assert doc.kind == "cgcnn-ensemble"
    start, _ = load_model(doc.checkpoint)
    # the architecture comes from the init model, not from `model`
    more = {**base, "model": {"hidden": 32}, "init": "e0", "geometry_noise": {"copies": 1}}
    cfg = load_train_config(_config(tmp_path, "more", more), "cgcnn")
    doc, _ = train_and_register("cgcnn", cfg, labelled, tmp_path / "runs", version="e1")
    tuned, extra = load_model(doc.checkpoint)
    assert extra["n_perturbed"] == extra["n_train"] > 0
    for before, after in zip(start.members, tuned.members, strict=True):
        assert after.hparams == before.hparams  # hidden 8, as trained
        assert torch.equal(after.target_mean, before.target_mean)  # its own normalisation
        assert not torch.equal(after.embedding.weight, before.embedding.weight)  # trained on
    wrong = {**more, "properties": ["bulk_modulus"]}
    with pytest.raises(UserError, match="init model e0 predicts formation_energy_per_atom"):
        train_and_register(
            "cgcnn",
            load_train_config(_config(tmp_path, "w", wrong), "cgcnn"),
            labelled,
            tmp_path / "r",
            version="x",
        )


def test_bad_configs_are_user_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_train_config(tmp_path / "missing.yaml", "unet")
    path = _config(tmp_path, "bad", {"optim": {"epochs": 0}, "colour": "red"})
    with pytest.raises(ConfigError) as info:
        load_train_config(path, "vae")
    assert any("colour" in line for line in info.value.lines)
    with pytest.raises(ConfigError, match="crystaloop train unet"):
        load_train_config(_config(tmp_path, "u", {"kind": "unet"}), "vae")
    assert default_version("x", load_train_config(_config(tmp_path, "ok", {}), "cgcnn")).startswith("x-")
    with pytest.raises(ConfigError) as info:
        load_train_config(_config(tmp_path, "g", {"geometry_noise": {"volume": [1.5, 0.5]}}), "cgcnn")
    assert any(
        line.startswith("geometry_noise.volume") and "low <= high" in line for line in info.value.lines
    )


def test_cli_train_without_data_is_a_one_line_error(settings, tmp_path):
    path = _config(tmp_path, "unet", {"data": TINY_DATA, "optim": TINY_OPTIM})
    result = CliRunner().invoke(app, ["train", "unet", "--config", str(path)])
    assert result.exit_code != 0
    assert "load-prior" in str(result.exception)


@pytest.mark.parametrize(
    "path",
    sorted((Path(__file__).parents[2] / "configs" / "train").glob("*/*.yaml")),
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_shipped_training_configs_validate(path):
    config = load_train_config(path, yaml.safe_load(path.read_text())["kind"])
    assert config.optim.epochs >= 1
    if path.parent.name == "paper":
        assert config.optim.lr in (1e-4, 3e-6, 1e-3)


def test_load_default_registers_shipped_checkpoints(settings, tmp_path, monkeypatch):
    from crystaloop.db import get_database
    from crystaloop.db.documents import ModelDoc
    from crystaloop.generative.models import save_model, shipped

    monkeypatch.setattr(shipped, "CHECKPOINT_DIR", tmp_path / "ckpt")
    monkeypatch.setattr(shipped, "MANIFEST", tmp_path / "ckpt" / "manifest.json")
    runner = CliRunner()
    assert runner.invoke(app, ["models", "load-default"]).exit_code != 0  # nothing shipped yet
    path = save_model(UNet3D([8, 22], widths=[4, 8]), tmp_path / "trained.pt")
    doc = ModelDoc(kind="unet", version="cpu-1", dataset_hash="abc", checkpoint=str(path), metrics={"x": 1.0})
    entry = shipped.ship(doc, "crystaloop train unet --config configs/train/cpu/unet.yaml")
    assert (tmp_path / "ckpt" / entry["file"]).is_file()
    result = runner.invoke(app, ["models", "load-default"])
    assert result.exit_code == 0, result.output
    registered = ModelRegistry(get_database()).get("unet")
    assert registered.version == "cpu-1" and registered.default
    assert registered.checkpoint == str(tmp_path / "ckpt" / entry["file"])


def test_campaign_models_default_to_the_shipped_checkpoints(settings, tmp_path, monkeypatch):
    from crystaloop.db import get_database
    from crystaloop.db.documents import ModelDoc
    from crystaloop.errors import UserError
    from crystaloop.generative.models import CGCNN, CondDFCVAE, save_model, shipped
    from crystaloop.loop.config import CampaignConfig

    monkeypatch.setattr(shipped, "CHECKPOINT_DIR", tmp_path / "ckpt")
    monkeypatch.setattr(shipped, "MANIFEST", tmp_path / "ckpt" / "manifest.json")
    database = get_database()
    with pytest.raises(UserError, match="load-default"):
        shipped.resolve_models(database)
    models = {
        "unet": UNet3D([8, 22], widths=[4, 8]),
        "vae": CondDFCVAE(grid=GRID, latent_dim=8, widths=(4, 8)),
        "cgcnn": CGCNN(["formation_energy_per_atom"], hidden=8, fc_hidden=8),
    }
    for kind, model in models.items():
        path = save_model(model, tmp_path / f"{kind}.pt")
        shipped.ship(
            ModelDoc(kind=kind, version=f"{kind}-shipped", dataset_hash="h", checkpoint=str(path)), "cmd"
        )
    config = CampaignConfig.model_validate(
        {"name": "c", "targets": [{"property": "band_gap", "min": 1, "max": 2}]}
    )
    assert config.models.vae is None
    mine = save_model(models["unet"], tmp_path / "my-unet.pt")
    ModelRegistry(database).register(
        ModelDoc(kind="unet", version="mine", dataset_hash="h", checkpoint=str(mine)), make_default=True
    )
    paths = shipped.resolve_models(database, **config.models.model_dump())
    assert paths["unet"] == mine  # a registered model of a kind is kept; only missing kinds fall back
    assert {k: paths[k].name for k in ("vae", "cgcnn")} == {
        k: f"{k}-{k}-shipped.pt" for k in ("vae", "cgcnn")
    }
    assert (
        ModelRegistry(database).get("vae").default and ModelRegistry(database).get("unet").version == "mine"
    )
    own = save_model(models["vae"], tmp_path / "mine.pt")
    assert shipped.resolve_models(database, vae=str(own))["vae"] == own
    with pytest.raises(UserError, match="no unet checkpoint"):
        shipped.resolve_models(database, unet="no-such-version")


def test_cli_train_no_default_leaves_the_registry_default(labelled, settings, tmp_path):
    from crystaloop.db.registry import ModelRegistry

    body = {
        "data": {"max_sites": 40},
        "optim": {**TINY_OPTIM, "epochs": 1},
        "model": {"hidden": 8, "fc_hidden": 8},
        "properties": ["formation_energy_per_atom"],
        "ensemble_size": 1,
    }
    path = _config(tmp_path, "cg", body)
    first = CliRunner().invoke(app, ["train", "cgcnn", "--config", str(path), "--version", "a"])
    assert first.exit_code == 0, first.output
    assert "registered cgcnn a (the default)" in first.output
    second = CliRunner().invoke(
        app, ["train", "cgcnn", "--config", str(path), "--version", "b", "--no-default"]
    )
    assert second.exit_code == 0, second.output
    assert "registered cgcnn b (not the default)" in second.output
    registry = ModelRegistry(labelled)
    assert registry.get("cgcnn").version == "a"
    assert registry.get("cgcnn", version="b").default is False


def test_a_resumed_cgcnn_run_ends_with_the_weights_of_a_straight_run(labelled, tmp_path):
    body = {
        "data": {"max_sites": 40, "val_fraction": 0.0},
        "optim": {**TINY_OPTIM, "epochs": 3, "batch_size": 2, "max_batches_per_epoch": None},
        "model": {"hidden": 8, "fc_hidden": 8},
        "properties": ["formation_energy_per_atom"],
        "ensemble_size": 1,
    }
    three = load_train_config(_config(tmp_path, "three", body), "cgcnn")
    one = three.model_copy(update={"optim": three.optim.model_copy(update={"epochs": 1})})
    root = tmp_path / "runs"
    train_and_register("cgcnn", three, labelled, root, version="straight")
    train_and_register("cgcnn", one, labelled, root, version="resumed")
    train_and_register("cgcnn", three, labelled, root, version="resumed", resume=True)
    straight, resumed = (
        torch.load(root / "cgcnn" / v / "member-0" / "last.pt", weights_only=False)
        for v in ("straight", "resumed")
    )
    assert [row["loss"] for row in resumed["state"]["history"]] == [
        row["loss"] for row in straight["state"]["history"]
    ]
    for name, weight in straight["modules"]["cgcnn"].items():
        assert torch.equal(weight, resumed["modules"]["cgcnn"][name]), name


@pytest.mark.parametrize(
    ("kind", "body", "problem"),
    [
        (
            "vae",
            {"data": {"grid": 20}, "model": {"widths": [8, 16, 32]}},
            "data.grid 20 must be a multiple of 8",
        ),
        ("vae", {"data": {"grid": 12}, "model": {"widths": [8, 16, 32]}}, "set data.grid to 8 or 16"),
        (
            "unet",
            {"data": {"grid": 18}, "model": {"widths": [4, 8, 16]}},
            "data.grid 18 must be a multiple of 4",
        ),
        (
            "unet",
            {"data": {"grid": 16, "crop": 6}, "model": {"widths": [16, 32, 64]}},
            "data.crop 6 must be a multiple of 4",
        ),
    ],
)
def test_grids_and_crops_the_model_cannot_pool_are_config_errors(tmp_path, kind, body, problem):
    with pytest.raises(ConfigError) as info:
        load_train_config(_config(tmp_path, kind, body), kind)
    assert len(info.value.lines) == 1 and problem in info.value.lines[0]


def test_grids_and_crops_the_model_can_pool_validate(tmp_path):
    unet = {"data": {"grid": 16, "crop": 12}, "model": {"widths": [4, 8, 16]}}
    assert load_train_config(_config(tmp_path, "u", unet), "unet").data.crop == 12
    larger_crop = {"data": {"grid": 16, "crop": 20}, "model": {"widths": [4, 8, 16]}}  # crops nothing
    assert load_train_config(_config(tmp_path, "c", larger_crop), "unet").data.crop == 20
    vae = {"data": {"grid": 24}, "model": {"widths": [8, 16, 32]}}
    assert CondDFCVAE(grid=24, widths=[8, 16, 32], latent_dim=2).bottom == 3
    assert load_train_config(_config(tmp_path, "v", vae), "vae").data.grid == 24


def test_site_shards_command_shows_progress_and_refuses_a_file(labelled, tmp_path):
    out = tmp_path / "sites"
    result = CliRunner().invoke(app, ["train", "site-shards", str(out), "--grid", "8", "--split", "all"])
    assert result.exit_code == 0, result.output
    assert "site channels: 10/10" in result.stderr and "eta" in result.stderr
    assert json.loads((out / "manifest.json").read_text())["count"] == 10
    general = tmp_path / "general"  # --dataset picks one loaded set (prior-v2 for general cells)
    result = CliRunner().invoke(app, ["train", "site-shards", str(general), "--grid", "8", "--dataset", "test"])
    assert result.exit_code == 0 and json.loads((general / "manifest.json").read_text())["count"] == 8
    result = CliRunner().invoke(app, ["train", "site-shards", str(tmp_path / "x"), "--dataset", "prior-v2"])
    assert isinstance(result.exception, UserError) and "no training structures match" in str(result.exception)
    for bad, message in (("test=x", "must read NAME=N"), ("test=3", "must name another dataset")):
        result = CliRunner().invoke(app, ["train", "site-shards", str(tmp_path / "y"), "--dataset", "test", "--mix", bad])
        assert isinstance(result.exception, UserError) and message in str(result.exception), result.output
    result = CliRunner().invoke(app, ["train", "site-shards", str(out / "manifest.json"), "--grid", "8"])
    assert isinstance(result.exception, UserError)
    assert "is a file; pass a folder (new or existing) for the shards" in str(result.exception)
