"""Makers, task documents, records and the formation-energy flow, on the fake pw.x."""

from __future__ import annotations

import dataclasses

import pytest
from jobflow import Flow

from crystaloop.db.documents import DFTTaskRecord
from crystaloop.dft.backends import job_store, run_local
from crystaloop.dft.espresso.jobs import QERelaxMaker, QEStaticMaker, run_espresso_task
from crystaloop.dft.flows import FormationEnergyFlow, formation_energy_per_atom
from crystaloop.dft.references import bulk_structure
from crystaloop.dft.schemas import FormationEnergyDocument, QETaskDocument
from crystaloop.dft.testing import SIC_RUNS, sic_cell


def _output(responses, job) -> object:
    return responses[job.uuid][1].output


def test_relax_maker_job_gives_a_full_document(fake_pw, fake_settings, database):
    fake_pw({"qe relax": "si_relax"})
    maker = QERelaxMaker()
    before = dataclasses.asdict(maker)
    si = bulk_structure("Si", "diamond", 5.431)
    relax = maker.make(si)
    assert dataclasses.asdict(maker) == before
    responses = run_local(Flow([relax]))
    doc = _output(responses, relax)
    assert isinstance(doc, QETaskDocument)
    assert doc.engine == "espresso" and doc.state == "successful" and doc.calculation == "vc-relax"
    assert doc.energy_per_atom == pytest.approx(-138.7332, abs=1e-3)
    assert doc.final_structure.lattice.a == pytest.approx(3.888, abs=0.01)
    assert len(doc.forces) == 2 and len(doc.stress) == 3
    assert doc.band_gap > 0.3 and doc.code_version == "pw.x 6.7MaX"
    assert doc.input.preset == "fast@1" and doc.input.kpoints == [3, 3, 3]
    assert [p.filename for p in doc.input.pseudopotentials] == ["Si.pbe-nl-rrkjus_psl.1.0.0.UPF"]
    assert doc.input.pseudopotentials[0].md5 == "78279d3766ecb5dbdc0623f3e93c9a23"
    assert doc.relax_converged and doc.n_ionic_steps >= 2 and doc.wall_time_s > 0
    record = database["dft_tasks"].find_one({"task_id": str(relax.uuid)}, {"_id": 0})
    DFTTaskRecord.model_validate(record)
    assert record["state"] == "successful" and record["engine"] == "espresso"
    stored = database["jobflow_outputs"].find_one({"uuid": relax.uuid})
    assert "blob_uuid" in stored["output"]["forces"]
    assert database["jobflow_data"].count_documents({}) >= 1


def test_static_maker(fake_pw, fake_settings):
    fake_pw({"qe static": "si_static"})
    job = QEStaticMaker().make(bulk_structure("Si", "diamond", 5.431))
    doc = _output(run_local(Flow([job])), job)
    assert doc.calculation == "scf" and doc.state == "successful"
    assert "cell" not in doc.input.parameters


def test_missing_pseudopotential_never_starts_pwx(fake_pw, fake_settings, database):
    fake = fake_pw({})
    zro = bulk_structure("Zr", "fcc", 4.5)
    doc = run_espresso_task(QERelaxMaker(), zro)
    assert doc.state == "failed" and "no pseudopotential for Zr" in doc.reasons[0]
    assert fake.calls == []
    assert database["dft_tasks"].find_one({"task_id": doc.task_id})["state"] == "failed"


def test_formation_energy_flow_caches_references(fake_pw, fake_settings, database):
    fake = fake_pw(SIC_RUNS)
    flow = FormationEnergyFlow(sic_cell())
    assert len(flow.jobs) == 4
    responses = run_local(flow)
    result = _output(responses, flow.jobs[-1])
    assert isinstance(result, FormationEnergyDocument) and result.state == "successful"
    assert result.formation_energy_per_atom == pytest.approx(-0.3417, abs=2e-3)
    expected = formation_energy_per_atom(
        _output(responses, flow.jobs[0]).final_structure,
        _output(responses, flow.jobs[0]).energy,
        result.references,
    )
    assert result.formation_energy_per_atom == pytest.approx(expected)
    cached = {d["element"]: d for d in database["element_references"].find()}
    # fast fixes 25/200 Ry for every element, so both references share the compound's cutoffs.
    assert set(cached) == {"Si", "C"} and cached["Si"]["preset"] == "fast@1@25/200Ry"
    assert (result.ecutwfc, result.ecutrho, result.below_suggested_cutoffs) == (25.0, 200.0, True)
    record = database["dft_tasks"].find_one({"task_id": result.task_id})
    assert record["formation_energy_per_atom"] == pytest.approx(result.formation_energy_per_atom)
    assert len(fake.calls) == 3

    again = FormationEnergyFlow(sic_cell())
    assert [j.name for j in again.jobs] == ["qe relax", "formation energy"]
    second = _output(run_local(again), again.jobs[-1])
    assert second.formation_energy_per_atom == pytest.approx(result.formation_energy_per_atom)
    assert len(fake.calls) == 4


def test_failed_relaxation_gives_a_failed_formation_energy(fake_pw, fake_settings, database):
    fake_pw({"qe relax": "si_scf_retry", "qe element reference Si": "si_relax"})
    flow = FormationEnergyFlow(
        bulk_structure("Si", "diamond", 5.431),
        relax_maker=QERelaxMaker(
            max_retries=0,
            overrides={
                "input_data": {"control": {"calculation": "scf"}, "electrons": {"electron_maxstep": 3}}
            },
        ),
    )
    responses = run_local(flow, store=job_store())
    result = _output(responses, flow.jobs[-1])
    assert result.state == "failed" and "relaxation failed" in result.reasons
    states = {d["state"] for d in database["dft_tasks"].find()}
    assert states == {"successful", "failed"}


def test_unexpected_error_still_ends_as_failed(monkeypatch, fake_settings, database):
    from crystaloop.dft.espresso import run as pw_run
    from crystaloop.errors import UserError

    def broken(directory, **kwargs):
        raise UserError("cannot start 'pw.x' (No such file or directory)")

    monkeypatch.setattr(pw_run, "run_pw", broken)
    doc = run_espresso_task(QERelaxMaker(), bulk_structure("Si", "diamond", 5.431))
    assert doc.state == "failed" and "cannot start" in doc.reasons[0]
    assert database["dft_tasks"].find_one({"task_id": doc.task_id})["state"] == "failed"


def test_flow_pw_command_reaches_both_makers(fake_settings):
    si = bulk_structure("Si", "diamond", 5.431)
    flow = FormationEnergyFlow(si, preset="demo", pw_command="mpirun -np 2 pw.x")
    assert flow.relax_maker.pw_command == "mpirun -np 2 pw.x"
    assert flow.reference_maker.pw_command == "mpirun -np 2 pw.x"
    assert FormationEnergyFlow(si, preset="demo").relax_maker.pw_command is None  # the settings'
    surrogate = FormationEnergyFlow(si, engine="surrogate", pw_command="mpirun -np 2 pw.x")
    assert not hasattr(surrogate.relax_maker, "pw_command")


def test_a_user_reference_structure_is_cached_apart_from_the_built_in_one(fake_pw, fake_settings, database):
    fake = fake_pw(SIC_RUNS)
    run_local(FormationEnergyFlow(sic_cell()))
    assert len(fake.calls) == 3
    # The user's Si (here the same diamond cell, given explicitly) must not be answered by the
    # built-in reference's cache entry, nor overwrite it.
    user_si = {"Si": bulk_structure("Si", "diamond", 5.431)}
    flow = FormationEnergyFlow(sic_cell(), reference_structures=user_si)
    assert [j.name for j in flow.jobs] == ["qe relax", "qe element reference Si", "formation energy"]
    run_local(flow)
    assert len(fake.calls) == 5
    keys = sorted(d["preset"] for d in database["element_references"].find({"element": "Si"}))
    assert keys[0] == "fast@1@25/200Ry" and keys[1].startswith("fast@1@25/200Ry+s") and len(keys) == 2
    # The same user structure is then a cache hit.
    again = FormationEnergyFlow(sic_cell(), reference_structures=user_si)
    assert [j.name for j in again.jobs] == ["qe relax", "formation energy"]


def test_structure_digest_ignores_representation_noise_and_names_the_structure():
    from crystaloop.dft.references import structure_digest
    from crystaloop.dft.surrogate import surrogate_reference_key

    si = bulk_structure("Si", "diamond", 5.431)
    shifted = si.copy()
    shifted.translate_sites([0], [1.0, 0.0, -1.0], frac_coords=True, to_unit_cell=False)
    assert structure_digest(si) == structure_digest(shifted)  # same crystal, other image
    assert structure_digest(si) != structure_digest(bulk_structure("Si", "diamond", 5.40))
    assert surrogate_reference_key("chgnet") == "chgnet"
    assert surrogate_reference_key("chgnet", si) == f"chgnet+s{structure_digest(si)}"
