"""Materials Project import with response fixtures and a monkeypatched client (no network)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from crystaloop.cli import app
from crystaloop.db.documents import TrainingStructureDoc
from crystaloop.db.training import COLLECTION
from crystaloop.errors import UserError
from crystaloop.generative.data import materials_project as mp

FIXTURE = Path(__file__).parent / "fixtures" / "mp_summary_responses.json"
RESPONSES = json.loads(FIXTURE.read_text())["responses"]


class FakeSummary:
    def __init__(self, fail: Exception | None = None) -> None:
        self.calls: list[dict] = []
        self.fail = fail

    def search(self, **kwargs):
        self.calls.append(kwargs)
        if self.fail:
            raise self.fail
        if "num_sites" in kwargs:
            return json.loads(json.dumps(RESPONSES["general"]))
        cls = {(2, 2): "binary", (3, 3): "heusler" if kwargs["formula"] == "ABC2" else "perovskite"}
        key = f"{cls[tuple(kwargs['num_elements'])]}/{kwargs['spacegroup_number']}"
        return json.loads(json.dumps(RESPONSES.get(key, [])))


class FakeClient:
    def __init__(self, fail: Exception | None = None) -> None:
        self.summary = FakeSummary(fail)
        self.materials = self


@pytest.fixture
def fake(monkeypatch):
    client = FakeClient()
    monkeypatch.setenv("MP_API_KEY", "x" * 32)
    monkeypatch.setattr(mp, "make_client", lambda key: client)
    return client


def test_fetch_maps_summary_docs_to_training_documents(fake):
    docs = mp.fetch(["binary", "perovskite", "heusler"])
    by_id = {d["structure_id"]: d for d in docs}
    assert set(by_id) == {"mp-22865", "mp-22862", "mp-1265", "mp-2534", "mp-5229", "mp-fixture-heusler"}
    for d in docs:
        TrainingStructureDoc.model_validate(d)
        assert d["source"] == "materials_project" and d["material_id"] == d["structure_id"]
    nacl = by_id["mp-22862"]
    assert (nacl["prototype"], nacl["material_class"], nacl["spacegroup"]) == ("B1", "binary", "Fm-3m")
    assert nacl["nsites"] == 8  # conventional standard cell
    assert nacl["labels"] == {
        "formation_energy_per_atom": -2.08,
        "energy_per_atom": -3.42,
        "band_gap": 5.0,
        "bulk_modulus": 25.0,
        "shear_modulus": 14.5,
        "poisson_ratio": 0.26,
        "refractive_index": 1.59,
        "dielectric_constant": 5.9,
    }
    # Older flat k_vrh/g_vrh fields are read too; an unphysical (negative) VRH shear becomes None.
    assert by_id["mp-1265"]["labels"]["bulk_modulus"] == 152.0
    assert by_id["mp-2534"]["labels"]["shear_modulus"] is None
    assert by_id["mp-5229"]["prototype"] == "perovskite"
    assert by_id["mp-fixture-heusler"]["nsites"] == 16
    sgs = sorted(c["spacegroup_number"] for c in fake.summary.calls)
    assert sgs == [216, 221, 221, 225, 225]
    assert all(
        "structure" in c["fields"] and "homogeneous_poisson" in c["fields"] for c in fake.summary.calls
    )


def test_general_cells_of_every_system_feed_the_same_pipeline(fake, database):
    from crystaloop.generative.data.decorate import crystal_system
    from crystaloop.generative.train.config import DataConfig
    from crystaloop.generative.train.data import load_records

    docs = mp.fetch(["general"])
    [query] = fake.summary.calls
    assert query["num_sites"] == (1, 20) and query["energy_above_hull"] == (0.0, 0.1)
    by_id = {d["structure_id"]: d for d in docs}
    assert set(by_id) == {"mp-2133", "mp-2657"}
    zno = by_id["mp-2133"]
    assert (zno["dataset"], zno["material_class"], zno["prototype"]) == (
        "materials-project-general",
        "other",
        None,
    )
    assert zno["labels"]["formation_energy_per_atom"] == -1.8 and zno["nsites"] == 4
    result = CliRunner().invoke(app, ["data", "import-mp", "--class", "general"])
    assert result.exit_code == 0, result.output
    records = load_records(database, DataConfig(dataset="materials-project-general", max_sites=20))
    systems = {r.structure_id: crystal_system(r.structure) for r in records}
    assert systems == {"mp-2133": "hexagonal", "mp-2657": "tetragonal"}


def test_import_mp_cli_upserts_into_the_collection(fake, database):
    runner = CliRunner()
    for _ in range(2):
        result = runner.invoke(app, ["data", "import-mp", "--class", "binary"])
        assert result.exit_code == 0, result.output
    coll = database[COLLECTION]
    assert coll.count_documents({"source": "materials_project"}) == 4
    assert coll.find_one({"material_id": "mp-1265"})["labels"]["shear_modulus"] == 119.0


def test_missing_key_is_a_user_error(monkeypatch):
    monkeypatch.delenv("MP_API_KEY", raising=False)
    with pytest.raises(UserError, match="MP_API_KEY"):
        mp.fetch(["binary"], client_factory=lambda key: FakeClient())


def test_network_failure_is_one_line(monkeypatch):
    monkeypatch.setenv("MP_API_KEY", "x" * 32)
    client = FakeClient(fail=ConnectionError("Max retries exceeded with url: /materials/summary/"))
    with pytest.raises(UserError, match="check the network") as info:
        mp.fetch(["perovskite"], client_factory=lambda key: client)
    assert "\n" not in info.value.message


def test_unknown_class_is_a_user_error(fake):
    with pytest.raises(UserError, match="unknown material class"):
        mp.fetch(["spinel"])


def test_cli_without_key_prints_one_line_and_exits_2(settings, monkeypatch):
    env = {k: v for k, v in __import__("os").environ.items() if k != "MP_API_KEY"}
    code = "import sys; from crystaloop.cli import main; sys.argv = ['crystaloop', *sys.argv[1:]]; main()"
    result = subprocess.run(
        [sys.executable, "-c", code, "data", "import-mp"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and ("MP_API_KEY" in lines[0] or "mp-api" in lines[0])
