"""A whole campaign round on the pw.x engine, its pw.x replaced by recordings of the real one.

The round takes a shortlisted SiC candidate through acquire, submit (the local backend's worker
process), harvest and report, with ``dft.engine: espresso`` and the ``demo`` preset. Each pw.x
run of the flow (the SiC relaxation and its Si and C references) is answered by
:class:`crystaloop.dft.testing.FakePw` from the real runs in ``tests/dft/reference``, after it
checked that the generated input asks for what the recorded one asked for.

The local backend runs the flow in a worker process (``python -m crystaloop.dft.local_worker``),
so the fake is installed there: a ``sitecustomize`` on the worker's ``PYTHONPATH`` patches
``crystaloop.dft.espresso.run.run_pw`` when that module is imported, and appends each call (or
each rejected input) to a log the test reads.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
from pathlib import Path

import pytest
from ase.units import create_units

from crystaloop.db.campaigns import CampaignStore
from crystaloop.db.documents import CandidateState
from crystaloop.db.store import CandidateStore
from crystaloop.dft.testing import DEMO_SIC_RUNS, sic_cell
from crystaloop.loop.campaign import Campaign
from crystaloop.loop.config import parse_campaign_config
from crystaloop.loop.report import round_rows
from crystaloop.settings import get_settings

DFT_TESTS = Path(__file__).resolve().parents[1] / "dft"
REFERENCE = DFT_TESTS / "reference"
FAKE_FAMILY = DFT_TESTS / "data" / "family.yaml"
NO_RETRAIN = {"cgcnn": False, "generator_conditioning": False}
FAKE_ENV = "CRYSTALOOP_TEST_FAKE_PW"
#: eV per Ry as ASE's pw.x output reader converts (CODATA 2006).
RY = create_units("2006")["Ry"]

#: Installs FakePw in every Python process started with this folder on PYTHONPATH and
#: ``$CRYSTALOOP_TEST_FAKE_PW`` set: when ``crystaloop.dft.espresso.run`` is first imported,
#: its ``run_pw`` is replaced. Nothing of crystaloop is imported before the process asks for it.
SITECUSTOMIZE = """
import importlib.util
import json
import os
import sys

_TARGET = "crystaloop.dft.espresso.run"


def _install(module, spec):
    from pathlib import Path

    from crystaloop.dft.testing import FakePw

    fake = FakePw(spec["mapping"], Path(spec["reference"]))

    def record(entry):
        with open(spec["log"], "a") as fh:
            fh.write(json.dumps(entry) + "\\n")

    def replay(directory, **kwargs):
        try:
            result = fake(directory, **kwargs)
        except AssertionError as exc:
            record({"rejected": str(exc), "directory": str(directory)})
            raise
        name, attempt, folder = fake.calls[-1]
        record({"job": name, "attempt": attempt, "directory": str(folder)})
        return result

    module.run_pw = replay


class _Hook:
    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        sys.meta_path.remove(self)
        found = importlib.util.find_spec(fullname)
        execute = found.loader.exec_module

        def exec_module(module):
            execute(module)
            _install(module, json.loads(os.environ["CRYSTALOOP_TEST_FAKE_PW"]))

        found.loader.exec_module = exec_module
        return found


if os.environ.get("CRYSTALOOP_TEST_FAKE_PW"):
    sys.meta_path.insert(0, _Hook())
"""


def final_energy_per_atom(folder: str) -> float:
    """eV/atom of a recorded run: its last ``!`` total energy over its number of atoms."""
    with gzip.open(REFERENCE / folder / "attempt_0" / "pw.out.gz", "rt") as fh:
        text = fh.read()
    energy = float(re.findall(r"^!\s+total energy\s+=\s+(-?\d+\.\d+) Ry", text, re.M)[-1])
    nat = int(re.search(r"number of atoms/cell\s+=\s+(\d+)", text).group(1))
    return energy * RY / nat


@pytest.fixture
def replayed_pw(settings, monkeypatch, tmp_path):
    """The fake family and a FakePw in the local workers; returns a reader of its call log."""
    pseudo_dir = tmp_path / "pseudo"
    pseudo_dir.mkdir()
    shutil.copyfile(FAKE_FAMILY, pseudo_dir / "family.yaml")
    monkeypatch.setenv("CRYSTALOOP_PSEUDO_DIR", str(pseudo_dir))
    site = tmp_path / "fake-pw-site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    log = tmp_path / "fake-pw.jsonl"
    monkeypatch.setenv("PYTHONPATH", ":".join(p for p in (str(site), *_pythonpath()) if p))
    monkeypatch.setenv(
        FAKE_ENV, json.dumps({"mapping": DEMO_SIC_RUNS, "reference": str(REFERENCE), "log": str(log)})
    )
    get_settings.cache_clear()

    def calls() -> list[dict]:
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    yield calls
    get_settings.cache_clear()


@pytest.fixture(scope="module")
def prior_head() -> list[dict]:
    """Training documents of the shipped prior's first records (converting all 11k takes seconds)."""
    from crystaloop.generative.data import prior

    shipped = prior.read_prior(prior.SHIPPED_PATH)
    return prior.to_documents({**shipped, "records": shipped["records"][:20]})


@pytest.fixture
def prior_loaded(database, prior_head):
    """A database that holds prior documents, so the campaign's first run loads no prior set
    (this round neither generates nor retrains)."""
    from crystaloop.db.training import upsert_documents

    upsert_documents(database, prior_head)
    return database


def _pythonpath() -> list[str]:
    return [p for p in os.environ.get("PYTHONPATH", "").split(":") if p]


def _campaign(name: str, database, **dft) -> Campaign:
    config = {
        "name": name,
        "targets": [{"property": "formation_energy_per_atom", "min": -1.5, "max": -0.05}],
        "material_classes": ["binary"],
        "elements": {"allow": ["Si", "C"]},
        "budget": {"candidates_per_round": 4, "dft_per_round": 1},
        "max_rounds": 1,
        # The fake family carries no verification verdicts.
        "dft": {"engine": "espresso", "preset": "demo", "allow_unverified": True, **dft},
        "execution": {"backend": "local", "max_attempts": 1, "poll_interval_s": 0.2},
        "retrain": NO_RETRAIN,
    }
    return Campaign(parse_campaign_config(config), database=database)


def _shortlist_sic(database, name: str) -> str:
    """Store the SiC cell as the round's shortlisted candidate (as its filter step would)."""
    store = CandidateStore(database)
    cid, inserted = store.add(
        sic_cell(),
        campaign=name,
        round=0,
        predicted={"formation_energy_per_atom": {"mean": -0.3, "std": 0.05}},
        provenance={"generation_id": f"{name}-r0"},
    )
    assert inserted
    store.transition(cid, CandidateState.SHORTLISTED)
    return cid


def test_a_round_relaxes_sic_with_replayed_pwx_runs(replayed_pw, prior_loaded):
    """Shortlisted SiC -> selected -> submitted -> relaxed, E_f from the three recorded runs."""
    database = prior_loaded
    name = "replay-sic"
    cid = _shortlist_sic(database, name)
    campaign = _campaign(name, database)
    result = campaign.run()
    assert result.status == "finished", result.reason

    # The worker's FakePw answered each job once, each input checked against pw.x's.
    calls = replayed_pw()
    assert not [c for c in calls if "rejected" in c], calls
    assert sorted((c["job"], c["attempt"]) for c in calls) == sorted((job, 0) for job in DEMO_SIC_RUNS)

    candidate = CandidateStore(database).get(cid)
    assert candidate.state == "relaxed", candidate.state_history[-1]
    assert candidate.dft_engine == "espresso" and candidate.dft_job["backend"] == "local"
    assert candidate.dft_job["attempts"] == 1
    (task,) = database["dft_tasks"].find({"candidate_id": cid})
    assert database["dft_tasks"].count_documents({}) == 1
    assert task["task_id"] == candidate.dft_task_id
    # The relaxation the worker recorded ran where the fake wrote the recorded pw.x output.
    relax_dir = next(Path(c["directory"]) for c in calls if c["job"] == "qe relax")
    assert Path(task["output"]["dir_name"]) == relax_dir
    with gzip.open(REFERENCE / DEMO_SIC_RUNS["qe relax"] / "attempt_0" / "pw.out.gz", "rt") as fh:
        assert (relax_dir / "pw.out").read_text() == fh.read()

    # E_f from the recorded energies: E(SiC) - (E(Si) + E(C)) / 2, per atom.
    e_sic = final_energy_per_atom(DEMO_SIC_RUNS["qe relax"])
    e_si = final_energy_per_atom(DEMO_SIC_RUNS["qe element reference Si"])
    e_c = final_energy_per_atom(DEMO_SIC_RUNS["qe element reference C"])
    expected = e_sic - (e_si + e_c) / 2
    assert expected == pytest.approx(-0.275, abs=0.01)  # the recorded runs are the SiC demo ones
    assert candidate.dft["formation_energy_per_atom"] == pytest.approx(expected, abs=1e-6)
    assert candidate.dft["energy_per_atom"] == pytest.approx(e_sic, abs=1e-6)
    assert task["output"]["formation_energy_per_atom"] == pytest.approx(expected, abs=1e-6)
    assert task["output"]["input"]["ecutwfc"] == 45.0
    references = {d["element"]: d for d in database["element_references"].find()}
    assert references["Si"]["energy_per_atom"] == pytest.approx(e_si, abs=1e-6)
    assert references["C"]["energy_per_atom"] == pytest.approx(e_c, abs=1e-6)

    record = CampaignStore(database).round(name, 0)
    assert all(step.status == "done" for step in record.steps.values())
    assert record.steps["generate"].outputs["resumed"] is True
    assert record.steps["submit"].outputs["submitted"] == 1
    assert record.steps["harvest"].outputs["relaxed"] == 1 and record.steps["harvest"].outputs["failed"] == 0
    assert record.steps["retrain"].outputs["hooks"] == []  # both hooks turned off
    assert (record.counts["selected"], record.counts["relaxed"], record.counts["failed"]) == (1, 1, 0)
    assert record.counts["hits"] == 1  # -0.275 eV/atom lies in the window
    (row,) = round_rows(database, name)
    assert (row["relaxed"], row["failed"]) == (1, 0)
    assert (campaign.work_dir() / "report.md").is_file()


def test_an_input_unlike_the_recorded_one_is_rejected(replayed_pw, prior_loaded):
    """The same round with the ``fast`` preset: the fake refuses every input, the candidate fails."""
    database = prior_loaded
    name = "replay-sic-fast"
    cid = _shortlist_sic(database, name)
    result = _campaign(name, database, preset="fast").run()
    assert result.status == "finished", result.reason

    calls = replayed_pw()
    # Each job's input was refused (fast: nstep 30, looser thresholds, 25/200 Ry) before any
    # recorded output was copied in.
    assert len(calls) == len(DEMO_SIC_RUNS) and all("rejected" in c for c in calls), calls
    assert all("&control differs" in c["rejected"] and "'nstep': 50" in c["rejected"] for c in calls)
    assert not any((Path(c["directory"]) / "pw.out").exists() for c in calls)
    # The reference jobs raise on their failed relaxation, so the worker records the flow failed.
    candidate = CandidateStore(database).get(cid)
    assert candidate.state == "failed"
    reason = candidate.state_history[-1]["reason"]
    assert "failed after 1 attempt" in reason and "qe element reference" in reason, reason
    assert "AssertionError: &control differs" in reason, reason  # the job's own error, not "an error"
    worker_log = (Path(candidate.dft_job["job_dir"]) / "worker.log").read_text()
    assert "AssertionError: &control differs" in worker_log
    assert database["dft_tasks"].count_documents({}) == 0
    assert candidate.dft is None or candidate.dft.get("formation_energy_per_atom") is None
    assert CampaignStore(database).round(name, 0).counts["relaxed"] == 0
