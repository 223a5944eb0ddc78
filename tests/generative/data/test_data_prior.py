"""The prior build: resumable labelling, the shipped file, its hash, and load-prior into MongoDB."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from crystaloop.cli import app
from crystaloop.db.documents import TrainingStructureDoc
from crystaloop.db.training import COLLECTION
from crystaloop.errors import UserError
from crystaloop.generative.data import prior
from crystaloop.properties import PROPERTIES

runner = CliRunner()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """Run the real entry point (user errors -> one line, exit 2)."""
    code = "import sys; from crystaloop.cli import main; sys.argv = ['crystaloop', *sys.argv[1:]]; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def small_build(tmp_path_factory):
    build_dir = tmp_path_factory.mktemp("prior-build")
    first = prior.build(build_dir, limit=3, workers=1)
    return build_dir, first


def test_build_labels_then_resumes_without_relabelling(small_build):
    build_dir, first = small_build
    assert (first.total, first.labelled_now, first.already_done) == (3, 3, 0)
    lines = (build_dir / "labels.jsonl").read_text().splitlines()
    assert len(lines) == 3
    again = prior.build(build_dir, limit=3, workers=1)
    assert (again.labelled_now, again.already_done) == (0, 3)
    assert (build_dir / "labels.jsonl").read_text().splitlines() == lines
    # Extending the limit labels only the new structure.
    more = prior.build(build_dir, limit=4, workers=1)
    assert (more.labelled_now, more.already_done) == (1, 3)


def test_a_torn_last_line_is_ignored_on_resume(tmp_path):
    path = tmp_path / "labels.jsonl"
    path.write_text(json.dumps({"structure_id": "prior:B2:Ni-Al"}) + "\n" + '{"structure_id": "pri')
    assert list(prior.read_done(path)) == ["prior:B2:Ni-Al"]


@pytest.mark.parametrize(
    ("lines", "bad_line"),
    [
        # A broken line in the middle is not a torn write: the build appends whole lines.
        (
            [
                '{"structure_id": "prior:B2:Ni-Al"}',
                '{"structure_id": "pri',
                '{"structure_id": "prior:B2:Co-Al"}',
            ],
            2,
        ),
        # A malformed last line that ends with a newline was written whole.
        (['{"structure_id": "prior:B2:Ni-Al"}', "not json"], 2),
        # Valid JSON that is no label record.
        (['{"structure_id": "prior:B2:Ni-Al"}', '{"labels": {}}', '{"structure_id": "prior:B2:Co-Al"}'], 2),
        (['["prior:B2:Ni-Al"]'], 1),
    ],
)
def test_any_other_malformed_line_stops_with_the_file_and_line(tmp_path, lines, bad_line):
    path = tmp_path / "labels.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=rf"{path} line {bad_line}: .*remove that line"):
        prior.read_done(path)
    with pytest.raises(UserError, match=rf"line {bad_line}"):
        prior.build(tmp_path, limit=1, workers=1)


def test_a_resumed_build_replaces_a_torn_last_line(small_build, tmp_path):
    build_dir, _ = small_build
    lines = (build_dir / "labels.jsonl").read_text().splitlines()[:3]  # the first 3 of the order
    labels = tmp_path / "labels.jsonl"
    # Killed while writing the third record: two whole lines and half of the third.
    labels.write_text(lines[0] + "\n" + lines[1] + "\n" + lines[2][: len(lines[2]) // 2])
    report = prior.build(tmp_path, limit=3, workers=1)
    assert (report.labelled_now, report.already_done) == (1, 2)
    resumed = labels.read_text()
    assert resumed.endswith("\n") and resumed.count("\n") == 3
    assert set(prior.read_done(labels)) == {json.loads(line)["structure_id"] for line in lines}


def test_a_whole_record_without_its_newline_is_kept(small_build, tmp_path):
    build_dir, _ = small_build
    lines = (build_dir / "labels.jsonl").read_text().splitlines()[:3]
    labels = tmp_path / "labels.jsonl"
    labels.write_text("\n".join(lines))  # killed between the last record and its newline
    report = prior.build(tmp_path, limit=3, workers=1)
    assert (report.labelled_now, report.already_done) == (0, 3)
    assert labels.read_text() == "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def shipped_small(small_build, tmp_path_factory):
    build_dir, _ = small_build
    refs = {s: {"energy_per_atom": -3.0, "state": "test"} for p in prior.build_order(4) for s in p.species}
    out = tmp_path_factory.mktemp("ship") / "prior-small.json.gz"
    header = prior.finalize(build_dir / "labels.jsonl", out, refs, limit=4)
    return out, header


def test_shipped_file_has_records_labels_and_a_valid_hash(shipped_small):
    path, header = shipped_small
    doc = prior.read_prior(path)
    assert doc["count"] == 4 == len(doc["records"])
    assert doc["content_hash"] == header["content_hash"] == prior.content_hash(doc["records"])
    assert doc["labeller"] == "chgnet-0.3.0"
    for rec in doc["records"]:
        if rec["reject_reason"]:
            continue
        assert set(rec["labels"]) == set(prior.LABEL_KEYS) <= set(PROPERTIES)
        assert rec["a0"] > 2 and rec["eos_residual"] >= 0
        assert PROPERTIES["bulk_modulus"].contains(rec["labels"]["bulk_modulus"])


def test_a_corrupted_file_is_refused(shipped_small, tmp_path):
    path, _ = shipped_small
    doc = json.loads(gzip.decompress(path.read_bytes()))
    doc["records"][0]["a0"] += 0.1
    bad = tmp_path / "bad.json.gz"
    bad.write_bytes(gzip.compress(json.dumps(doc).encode()))
    with pytest.raises(UserError, match="content hash"):
        prior.read_prior(bad)


def test_documents_validate_against_the_schema(shipped_small):
    path, _ = shipped_small
    docs = prior.to_documents(prior.read_prior(path))
    for d in docs:
        TrainingStructureDoc.model_validate(d)
        assert d["source"] == "prior" and d["dataset"] == prior.DATASET
        assert d["structure_id"].startswith(f"prior:{d['prototype']}:")


def test_load_prior_cli_fills_the_collection_and_is_idempotent(shipped_small, database):
    path, header = shipped_small
    for _ in range(2):
        result = runner.invoke(app, ["data", "load-prior", "--path", str(path)])
        assert result.exit_code == 0, result.output
    coll = database[COLLECTION]
    assert coll.count_documents({"dataset": prior.DATASET}) == 4
    assert "structure_id_1" in coll.index_information()
    assert header["content_hash"][:16] in result.output


def test_load_prior_without_a_file_exits_2(settings, tmp_path):
    result = run_cli("data", "load-prior", "--path", str(tmp_path / "missing.json.gz"))
    assert result.returncode == 2
    assert "not found" in result.stderr and "Traceback" not in result.stderr


def test_build_prior_cli_rejects_a_bad_limit(settings):
    result = run_cli("data", "build-prior", "--limit", "0")
    assert result.returncode == 2
    assert "--limit" in result.stderr


def test_stats_summarize_and_plot(shipped_small, tmp_path):
    from crystaloop.generative.data.stats import plot_histograms, summarize

    path, _ = shipped_small
    doc = prior.read_prior(path)
    s = summarize(doc)
    assert s["count"] == 4 == s["labelled"] + sum(s["rejects"].values())
    assert sum(s["per_prototype"].values()) == s["labelled"]
    assert s["labels"]["bulk_modulus"]["n"] == s["labelled"]
    paths = plot_histograms(doc, tmp_path / "fig")
    assert paths and all(p.stat().st_size > 1000 for p in paths)


def test_shipped_prior_set():
    if not prior.SHIPPED_PATH.exists():
        pytest.skip("the prior set has not been built yet")
    from crystaloop.generative.data.prototypes import enumerate_all, prototype_from_id

    doc = prior.read_prior()
    enumerated = {p.structure_id for p in enumerate_all()}
    ids = [r["structure_id"] for r in doc["records"]]
    assert len(set(ids)) == len(ids) and set(ids) <= enumerated
    # One record per crystal: B3 SiC, GeC and SnC are not stored a second time as C-Si, C-Ge, C-Sn.
    keys = [prototype_from_id(i).crystal_key for i in ids]
    assert len(set(keys)) == len(keys)
    labelled = [r for r in doc["records"] if not r["reject_reason"]]
    if len(ids) == len(enumerated):  # a complete build
        assert len(labelled) >= 10_000
    assert {r["prototype"] for r in labelled} == {"B1", "B2", "B3", "perovskite", "L21"}
    for rec in labelled:
        assert rec["labeller"] == doc["labeller"]
        for name, value in rec["labels"].items():
            assert value is None or PROPERTIES[name].contains(value) or not rec["converged"], (rec, name)
        assert rec["labels"]["formation_energy_per_atom"] is not None
    assert all(r["reject_reason"] for r in doc["records"] if "labels" not in r)


def test_build_order_drops_only_the_swaps_and_keeps_every_other_place():
    import random

    from crystaloop.generative.data.prototypes import enumerate_all

    order = [p.structure_id for p in prior.build_order()]
    # The order before the B3 carbide swaps were deduplicated: the same seeded shuffle.
    before = enumerate_all(one_per_crystal=False)
    random.Random(prior.ORDER_SEED).shuffle(before)
    before = [p.structure_id for p in before]
    assert len(before) - len(order) == 3
    assert [i for i in before if not i.startswith("prior:B3:C-")] == order
    assert [p.structure_id for p in prior.build_order(5)] == order[:5]
