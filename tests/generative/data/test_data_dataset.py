"""Training records from the prior file, the composition split record, shards vs on-the-fly voxels."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch

from crystaloop.generative.data import prior
from crystaloop.generative.data.dataset import SplitRecord, VoxelDataset, prior_records, split_records
from crystaloop.generative.data.shards import ShardDataset, ShardOrderSampler, shard_set_bytes, write_shards
from crystaloop.properties import PROPERTY_NAMES

SPECS = [
    ("B1", ("Na", "Cl"), 5.69),
    ("B2", ("Cs", "Cl"), 4.22),
    ("B3", ("Ga", "As"), 5.74),
    ("B1", ("Mg", "O"), 4.25),
    ("B3", ("Mg", "O"), 4.6),
    ("perovskite", ("Sr", "Ti", "O"), 3.95),
    ("perovskite", ("K", "Ta", "O"), 4.03),
    ("L21", ("Cu", "Mn", "Al"), 5.92),
    ("L21", ("Co", "Mn", "Si"), 5.63),
    ("B2", ("Ni", "Al"), 2.89),
]


@pytest.fixture
def prior_file(tmp_path):
    records = []
    for i, (name, species, a0) in enumerate(SPECS):
        labels = dict.fromkeys(prior.LABEL_KEYS, -1.0 - i)
        labels["bulk_modulus"], labels["shear_modulus"], labels["poisson_ratio"] = 100.0 + i, None, None
        records.append(
            {
                "structure_id": f"prior:{name}:{'-'.join(species)}",
                "prototype": name,
                "species": list(species),
                "a0": a0,
                "converged": True,
                "reject_reason": None,
                "labels": labels,
            }
        )
    records.append(
        {"structure_id": "prior:B1:Pd-C", "prototype": "B1", "species": ["Pd", "C"], "a0": 3.0,
         "converged": False, "reject_reason": "no E(V) minimum inside the volume scan"}
    )  # fmt: skip
    records.sort(key=lambda r: r["structure_id"])
    doc = {"dataset": "prior-v1", "content_hash": prior.content_hash(records), "records": records}
    path = tmp_path / "prior.json.gz"
    path.write_bytes(gzip.compress(json.dumps(doc).encode()))
    return path


def test_prior_records_skip_rejects(prior_file):
    records = prior_records(prior_file)
    assert len(records) == len(SPECS)
    assert all(r.structure_id != "prior:B1:Pd-C" for r in records)
    heusler = next(r for r in records if r.material_class == "heusler")
    assert len(heusler.structure) == 16


def test_split_is_by_composition_fixed_by_seed_and_recorded(prior_file, tmp_path):
    records = prior_records(prior_file)
    train, test, record = split_records(records, seed=3)
    assert not {r.formula for r in train} & {r.formula for r in test}
    # MgO in rock salt and in zinc blende land on the same side.
    sides = {r.structure_id: r in test for r in records}
    assert sides["prior:B1:Mg-O"] == sides["prior:B3:Mg-O"]
    assert record.n_train + record.n_test == len(records)
    assert 1 <= record.n_test_formulas < record.n_train_formulas
    assert record.n_train_formulas + record.n_test_formulas == len(SPECS) - 1
    again = split_records(list(reversed(records)), seed=3)[2]
    assert again == record
    path = record.write(tmp_path / "split.json")
    assert SplitRecord.model_validate_json(path.read_text()) == record
    assert split_records(records, seed=4)[2].test_formulas_hash != record.test_formulas_hash


def test_shards_serve_the_same_voxels_as_on_the_fly(prior_file, tmp_path):
    records = prior_records(prior_file)[:4]
    manifest = write_shards(records, tmp_path / "shards", PROPERTY_NAMES, grid=16, shard_size=3)
    data = json.loads(manifest.read_text())
    assert [s["count"] for s in data["shards"]] == [3, 1]
    assert data["grid"] == 16 and data["count"] == 4
    shard_set = ShardDataset(manifest)
    fly = VoxelDataset(records, PROPERTY_NAMES, grid=16)
    assert len(shard_set) == len(fly) == 4
    for i in range(4):
        a, b = shard_set[i], fly[i]
        assert set(a) == set(b) == {"density", "coords", "species", "mask", "labels", "label_mask"}
        assert torch.equal(a["species"], b["species"]) and torch.equal(a["mask"], b["mask"])
        assert torch.allclose(a["density"], b["density"], rtol=2e-3, atol=1e-4)  # float16 storage
        assert torch.allclose(a["coords"], b["coords"], atol=1e-5)
        assert torch.equal(a["label_mask"], b["label_mask"])
        assert torch.allclose(torch.nan_to_num(a["labels"]), torch.nan_to_num(b["labels"]))


def test_rotation_augmentation_permutes_voxels(prior_file, tmp_path):
    # Zinc blende lacks the 4-fold axes, so some cube rotations change its voxels (rock salt
    # and the perovskite would map onto themselves).
    records = [r for r in prior_records(prior_file) if r.structure_id == "prior:B3:Ga-As"]
    manifest = write_shards(records, tmp_path / "shards", PROPERTY_NAMES, grid=16)
    plain = ShardDataset(manifest)[0]
    torch.manual_seed(0)
    rotated = [ShardDataset(manifest, augment=True)[0] for _ in range(6)]
    for r in rotated:
        # A cube rotation only moves voxels: same multiset of species and same total density.
        assert torch.equal(torch.sort(r["species"].flatten())[0], torch.sort(plain["species"].flatten())[0])
        assert float(r["density"].sum()) == pytest.approx(float(plain["density"].sum()), rel=1e-5)
    assert any(not torch.equal(r["species"], plain["species"]) for r in rotated)


def test_shard_order_sampler_visits_every_sample_once_per_epoch(prior_file, tmp_path):
    records = prior_records(prior_file)
    manifest = write_shards(records, tmp_path / "shards", PROPERTY_NAMES, grid=8, shard_size=4)
    sampler = ShardOrderSampler(ShardDataset(manifest), seed=1)
    first, second = list(sampler), list(sampler)
    assert sorted(first) == sorted(second) == list(range(len(records)))
    assert first != second
    assert np.all(np.diff([i // 4 for i in first])[:3] == 0)


def test_prior_records_limit_counts_structures_and_refuses_below_one(prior_file):
    assert [r.structure_id for r in prior_records(prior_file, limit=3)] == [
        r.structure_id for r in prior_records(prior_file)[:3]
    ]
    for limit in (0, -3):
        with pytest.raises(ValueError, match="at least 1"):
            prior_records(prior_file, limit=limit)


def test_a_smaller_shard_set_replaces_the_shard_files_of_a_larger_one(prior_file, tmp_path):
    out = tmp_path / "shards"
    records = prior_records(prior_file)
    write_shards(records, out, PROPERTY_NAMES, grid=8, shard_size=2)
    assert len(list(out.glob("shard-*.npz"))) == 5
    manifest = write_shards(records[:3], out, PROPERTY_NAMES, grid=8, shard_size=2)
    assert sorted(f.name for f in out.glob("shard-*.npz")) == ["shard-00000.npz", "shard-00001.npz"]
    assert shard_set_bytes(manifest) == sum(f.stat().st_size for f in out.glob("shard-*.npz"))
    assert len(ShardDataset(manifest)) == 3
    with pytest.raises(NotADirectoryError):
        write_shards(records, manifest, PROPERTY_NAMES, grid=8)


def test_data_shards_cli_checks_limit_and_folder_before_work(prior_file, tmp_path):
    from typer.testing import CliRunner

    from crystaloop.cli import app
    from crystaloop.errors import UserError

    runner = CliRunner()
    out = tmp_path / "shards"
    base = ["data", "shards", str(out), "--path", str(prior_file), "--grid", "8", "--shard-size", "2"]
    for limit in ("0", "-3"):
        result = runner.invoke(app, [*base, "--limit", limit])
        assert result.exit_code == 2 and "--limit" in result.output and not out.exists()
    result = runner.invoke(app, ["data", "bench-loader", "--samples", "0", "--path", str(prior_file)])
    assert result.exit_code == 2 and "--samples" in result.output

    assert runner.invoke(app, base).exit_code == 0
    result = runner.invoke(app, [*base, "--limit", "3"])
    assert result.exit_code == 0, result.output
    manifest = out / "manifest.json"
    assert json.loads(manifest.read_text())["count"] == 3 and len(list(out.glob("shard-*.npz"))) == 2
    assert f"({shard_set_bytes(manifest) / 1e6:.1f} MB)" in result.output

    result = runner.invoke(app, ["data", "shards", str(manifest), "--path", str(prior_file)])
    assert isinstance(result.exception, UserError)
    assert str(result.exception) == f"{manifest} is a file; pass a folder (new or existing) for the shards"
