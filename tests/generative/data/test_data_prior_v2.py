"""The prior-v2 build: fixed decorations per folder, resumable CHGNet labels, the shipped file, shares."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from crystaloop.errors import UserError
from crystaloop.generative.data import prior, prior_v2
from crystaloop.generative.data.elements import palette
from crystaloop.generative.data.references import load_references
from crystaloop.generative.data.shares import pymatgen_balanced, smact_valid, summarize

CDI2 = "AB2_hP3_164_a_d"  # three sites: the cheapest real prototype to relax
SETTINGS = prior_v2.DecorationSettings(seed=1, per_prototype=4)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """Run the real entry point (user errors -> one line, exit 2)."""
    code = "import sys; from crystaloop.cli import main; sys.argv = ['crystaloop', *sys.argv[1:]]; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    build_dir = tmp_path_factory.mktemp("prior-v2")
    decorations = prior_v2.load_decorations(build_dir, SETTINGS, palette(), prototypes=[CDI2])
    first = prior_v2.build(build_dir, decorations, limit=2, workers=1)
    return build_dir, decorations, first


def test_build_labels_then_resumes_without_relabelling(small):
    build_dir, decorations, first = small
    assert len(decorations) == 4
    assert (first.total, first.labelled_now, first.already_done) == (2, 2, 0)
    lines = (build_dir / prior_v2.LABELS).read_text().splitlines()
    assert len(lines) == 2
    # A rerun of the same limit (a killed build restarted) labels nothing again.
    again = prior_v2.build(build_dir, decorations, limit=2, workers=1)
    assert (again.labelled_now, again.already_done) == (0, 2)
    assert (build_dir / prior_v2.LABELS).read_text().splitlines() == lines
    more = prior_v2.build(build_dir, decorations, limit=3, workers=1)
    assert (more.labelled_now, more.already_done) == (1, 2)
    records = list(prior.read_done(build_dir / prior_v2.LABELS).values())
    assert [r["structure_id"] for r in records] == [d.structure_id for d in decorations[:3]]
    for rec in records:
        assert rec["prototype"] == CDI2 and rec["labeller"].startswith("chgnet")
        assert rec["start_crystal_system"] == "trigonal"
        assert 0 < rec["probability"] <= 1
        if not rec["reject_reason"]:
            assert rec["crystal_system"] in ("trigonal", "hexagonal")
            assert rec["energy_per_atom"] < 0 and rec["bulk_modulus"] > 0
            assert 1 / 1.5 <= rec["volume_ratio"] <= 1.5


def test_decorations_are_fixed_for_a_folder(small):
    build_dir, decorations, _ = small
    assert prior_v2.load_decorations(build_dir, SETTINGS, palette(), prototypes=[CDI2]) == decorations
    other = prior_v2.DecorationSettings(seed=2, per_prototype=4)
    with pytest.raises(UserError, match="other decoration settings .*seed 1 -> 2"):
        prior_v2.load_decorations(build_dir, other, palette(), prototypes=[CDI2])


def test_finalize_writes_a_hashed_file_with_the_structures(small, tmp_path):
    build_dir, _, _ = small
    out = tmp_path / "prior-v2.json.gz"
    header = prior_v2.finalize(build_dir / prior_v2.LABELS, out, load_references("chgnet-0.3.0"))
    doc = prior.read_prior(out)
    assert doc["dataset"] == "prior-v2" and doc["content_hash"] == header["content_hash"]
    assert doc["count"] == len((build_dir / prior_v2.LABELS).read_text().splitlines())
    labelled = [r for r in doc["records"] if not r["reject_reason"]]
    assert labelled, "no structure of CdI2-type labelled"
    for rec in labelled:
        assert len(rec["species"]) == len(rec["frac_coords"]) == 3
        assert -5 < rec["labels"]["formation_energy_per_atom"] < 2


def test_a_partial_build_is_finalized_from_what_it_holds(small, tmp_path):
    build_dir, decorations, _ = small
    report, chosen = prior_v2.labelled_so_far(build_dir, decorations)
    lines = (build_dir / prior_v2.LABELS).read_text().splitlines()
    assert report.total == report.already_done == len(lines) and report.labelled_now == 0
    assert {d.structure_id for d in chosen} == {json.loads(line)["structure_id"] for line in lines}
    with pytest.raises(UserError, match="run the build without --finalize-only"):
        prior_v2.labelled_so_far(tmp_path / "empty", decorations)


def test_a_build_seeded_from_a_finished_file_labels_only_what_it_lacks(small, tmp_path):
    build_dir, decorations, _ = small
    finished = tmp_path / "finished.json.gz"
    references = load_references("chgnet-0.3.0")
    prior_v2.finalize(build_dir / prior_v2.LABELS, finished, references)
    records = prior.read_prior(finished)["records"]

    seeded_dir = tmp_path / "seeded"
    assert prior_v2.seed_labels(seeded_dir, finished, decorations) == (len(records), 0)
    assert prior_v2.seed_labels(seeded_dir, finished, decorations) == (0, 0)  # a rerun adds nothing
    report = prior_v2.build(seeded_dir, decorations, limit=2, workers=1)
    assert (report.labelled_now, report.already_done) == (0, 2)  # nothing relabelled
    again = tmp_path / "again.json.gz"
    prior_v2.finalize(seeded_dir / prior_v2.LABELS, again, references)
    for before, after in zip(records, prior.read_prior(again)["records"], strict=True):
        assert {k: v for k, v in after.items() if k != "labels"} == {
            k: v for k, v in before.items() if k != "labels"
        }
        for key, value in (before.get("labels") or {}).items():  # recomputed from rounded energies
            assert after["labels"][key] == pytest.approx(value, abs=2e-6)
    assert prior_v2.label_elements(seeded_dir / prior_v2.LABELS) == sorted(
        {el for r in records for el in r["species"]}
    )

    other = tmp_path / "other"  # records drawn outside this build's list are kept, and counted
    assert prior_v2.seed_labels(other, finished, []) == (len(records), len(records))
    with pytest.raises(UserError, match="not a prior-v2 file"):
        prior_v2.seed_labels(tmp_path / "v1", prior.SHIPPED_PATH, decorations)


def test_the_file_loads_as_general_cells_for_training(small, tmp_path, database):
    from pymatgen.core import Lattice, Structure

    from crystaloop.db.training import replace_dataset
    from crystaloop.generative.train.config import DataConfig
    from crystaloop.generative.train.data import load_records

    build_dir, _, _ = small
    out = tmp_path / "prior-v2.json.gz"
    prior_v2.finalize(build_dir / prior_v2.LABELS, out, load_references("chgnet-0.3.0"))
    doc = prior.read_prior(out)
    docs = prior.to_documents(doc)  # the same entry point as prior-v1's (`data load-prior --path`)
    with_structure = [r for r in doc["records"] if r.get("lattice")]
    assert len(docs) == len(with_structure)
    assert replace_dataset(database, "prior-v2", docs) == len(docs)
    records = load_records(database, DataConfig(dataset="prior-v2", max_sites=20))
    accepted = {r["structure_id"]: r for r in with_structure if r["converged"] and not r["reject_reason"]}
    assert records and {r.structure_id for r in records} == set(accepted)
    for record in records:
        rec = accepted[record.structure_id]
        relaxed = Structure(Lattice(rec["lattice"]), rec["species"], rec["frac_coords"])
        assert record.structure.composition.reduced_formula == rec["formula"]
        assert record.structure.volume == pytest.approx(relaxed.volume, rel=1e-6)
        assert record.structure.lattice.abc == pytest.approx(relaxed.get_reduced_structure().lattice.abc)
        assert record.labels["formation_energy_per_atom"] == rec["labels"]["formation_energy_per_atom"]


def test_the_shipped_prior_v1_is_never_a_target(tmp_path):
    shipped = prior.SHIPPED_PATH.read_bytes()
    with pytest.raises(UserError, match="shipped prior-v1"):
        prior_v2.check_build_dir(prior.SHIPPED_PATH.parent)
    with pytest.raises(UserError, match="shipped prior-v1"):
        prior_v2.finalize(tmp_path / "labels.jsonl", prior.SHIPPED_PATH.parent / "prior-v2.json.gz", {})
    assert prior.SHIPPED_PATH.read_bytes() == shipped


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--out", str(prior.SHIPPED_PATH.parent)], "package folder of the shipped prior-v1"),
        (["--out", "{tmp}", "--workers", "0"], "--workers must be at least 1"),
        (["--out", "{tmp}", "--limit", "0"], "--limit must be at least 1"),
        (["--out", "{file}"], "is a file; pass a folder"),
        (["--out", "{tmp}", "--seed-from", "{tmp}/none.json.gz"], "--seed-from"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    (tmp_path / "f").write_text("x")
    args = [a.format(tmp=tmp_path / "b", file=tmp_path / "f") for a in args]
    proc = run_cli("data", "build-prior-v2", *args)
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr


def test_shares_count_what_was_built(small):
    build_dir, _, _ = small
    records = list(prior.read_done(build_dir / prior_v2.LABELS).values())
    s = summarize(records)
    assert s["records"] == len(records) == s["labelled"] + s["rejected"]
    assert sum(v["count"] for v in s["crystal_system"].values()) == s["labelled"]
    assert sum(v["count"] for v in s["prototype"].values()) == s["labelled"]
    balanced = sum(pymatgen_balanced(r["formula"]) for r in records if not r["reject_reason"])
    assert s["charge_balance"]["pymatgen balanced"]["count"] == balanced


def test_charge_balance_judges():
    assert pymatgen_balanced("CdI2") and smact_valid("CdI2")
    assert not pymatgen_balanced("NaCl2") and not smact_valid("NaCl2")
    assert not pymatgen_balanced("Mg")


def test_shares_cli_prints_the_table(small):
    build_dir, _, _ = small
    proc = run_cli("data", "shares-v2", str(build_dir), "--format", "json")
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)
    assert s["records"] == len((build_dir / prior_v2.LABELS).read_text().splitlines())
    bad = run_cli("data", "shares-v2", str(build_dir / "missing"))
    assert bad.returncode == 2 and "not found" in bad.stderr


def test_the_shipped_prior_v2_loads_with_every_crystal_system(database):
    """`data load-prior --dataset prior-v2`: the packaged partial build, general cells of all systems."""
    from typer.testing import CliRunner

    from crystaloop.cli import app
    from crystaloop.generative.data.decorate import crystal_system

    doc = prior.read_prior(prior.SHIPPED_V2_PATH)
    assert doc["dataset"] == "prior-v2" and doc["format"] == prior_v2.FORMAT
    result = CliRunner().invoke(app, ["data", "load-prior", "--dataset", "prior-v2"])
    assert result.exit_code == 0, result.output
    stored = database["training_structures"].count_documents({"dataset": "prior-v2"})
    assert stored == sum(1 for r in doc["records"] if r.get("lattice")) > 500
    labelled = [r for r in doc["records"] if r["converged"] and not r["reject_reason"]]
    systems = {r["crystal_system"] for r in labelled}
    assert {"cubic", "hexagonal", "trigonal", "tetragonal", "orthorhombic", "monoclinic"} <= systems
    sample = next(r for r in labelled if r["crystal_system"] == "hexagonal")
    from pymatgen.core import Lattice, Structure

    assert (
        crystal_system(Structure(Lattice(sample["lattice"]), sample["species"], sample["frac_coords"]))
        == "hexagonal"
    )
    bad = run_cli("data", "load-prior", "--dataset", "prior-v3")
    assert bad.returncode == 2 and "choose prior-v1 or prior-v2" in bad.stderr
