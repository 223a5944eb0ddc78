"""The CHGNet surrogate engine: same interface, labelled surrogate everywhere."""

from __future__ import annotations

import pytest
from jobflow import Flow

from crystaloop.dft.backends import run_local
from crystaloop.dft.flows import FormationEnergyFlow
from crystaloop.dft.references import bulk_structure
from crystaloop.dft.schemas import QETaskDocument
from crystaloop.dft.surrogate import SurrogateElementReferenceMaker, SurrogateRelaxMaker


def test_surrogate_relax_is_labelled_and_recorded(settings, database):
    si = bulk_structure("Si", "diamond", 5.3)
    job = SurrogateRelaxMaker(fmax=0.1, steps=150).make(si)
    doc = run_local(Flow([job]))[job.uuid][1].output
    assert isinstance(doc, QETaskDocument)
    assert doc.engine == "surrogate" and doc.state == "successful"
    assert doc.code_version.startswith("chgnet")
    conventional_a = doc.final_structure.lattice.a * 2**0.5
    assert conventional_a == pytest.approx(5.45, abs=0.1)
    assert len(doc.forces) == 2 and len(doc.stress) == 3
    record = database["dft_tasks"].find_one({"task_id": doc.task_id})
    assert record["engine"] == "surrogate" and record["output"]["engine"] == "surrogate"


def test_surrogate_formation_energy_flow(settings, database):
    sic = bulk_structure("Si", "diamond", 4.36)
    sic.replace(1, "C")
    flow = FormationEnergyFlow(
        sic,
        engine="surrogate",
        relax_maker=SurrogateRelaxMaker(fmax=0.1, steps=150),
        reference_maker=SurrogateElementReferenceMaker(fmax=0.1, steps=150),
    )
    responses = run_local(flow)
    result = responses[flow.jobs[-1].uuid][1].output
    assert result.engine == "surrogate" and result.state == "successful"
    assert -1.0 < result.formation_energy_per_atom < 0.2
    assert {d["engine"] for d in database["dft_tasks"].find()} == {"surrogate"}
    assert {d["engine"] for d in database["element_references"].find()} == {"surrogate"}
    assert len(FormationEnergyFlow(sic, engine="surrogate").jobs) == 2


def test_a_collapsed_cell_is_a_failure_not_a_formation_energy(settings, monkeypatch):
    """CHGNet crushes rock-salt SiC from its radius-based guess to a = 1.13 Å (Si-C 0.80 Å).

    The relaxation is replayed (the end of a real one, at that lattice constant): run for real,
    the collapsing cell's neighbour graph grows to gigabytes. The collapsed cell is never handed
    to the model again.
    """
    import chgnet.model

    from crystaloop.dft.surrogate import run_surrogate_task
    from crystaloop.generative.data.prototypes import Prototype

    rock_salt = Prototype("B1", ("Si", "C"))
    start = rock_salt.primitive(rock_salt.lattice_guess())
    collapsed = rock_salt.primitive(1.13 * 2**0.5)  # conventional a = 1.6 Å: Si-C 0.80 Å

    class ReplayedRelaxation:
        def __init__(self, **kwargs):
            pass

        def relax(self, structure, **kwargs):
            trajectory = type("Trajectory", (), {"energies": [-9.0, -10.5, -12.0]})()
            return {"final_structure": collapsed, "trajectory": trajectory}

    predicted = []
    model = chgnet.model.CHGNet.load()
    monkeypatch.setattr(model, "predict_structure", lambda *a, **k: predicted.append(a) or {})
    monkeypatch.setattr("crystaloop.dft.surrogate.load_chgnet", lambda: model)
    monkeypatch.setattr(chgnet.model, "StructOptimizer", ReplayedRelaxation)
    doc = run_surrogate_task(SurrogateRelaxMaker(record=False), start)
    assert doc.state == "failed" and doc.energy is None and not predicted
    assert any(r.startswith("unphysical: Si-C at 0.") for r in doc.reasons), doc.reasons
