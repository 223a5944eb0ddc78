"""One engine interface, and the formation-energy Maker that builds its flow without the database."""

from __future__ import annotations

import pytest

from crystaloop.dft.backends import run_local
from crystaloop.dft.engines import ENGINES, get_engine
from crystaloop.dft.espresso.jobs import ElementReferenceMaker, QERelaxMaker
from crystaloop.dft.flows import FormationEnergyFlow, FormationEnergyMaker
from crystaloop.dft.schemas import ElementReference, FormationEnergyDocument
from crystaloop.dft.surrogate import SurrogateElementReferenceMaker, SurrogateRelaxMaker
from crystaloop.dft.testing import SIC_RUNS, sic_cell
from crystaloop.errors import UserError


def _outputs(responses, flow) -> list:
    return [responses[job.uuid][1].output for job in flow.jobs]


def test_an_unknown_engine_is_one_line():
    with pytest.raises(UserError, match=r"^unknown engine 'vasp'; choose espresso or surrogate$"):
        get_engine("vasp")


def test_each_engine_hands_out_its_makers():
    espresso, surrogate = get_engine("espresso"), get_engine("surrogate")
    assert set(ENGINES) == {"espresso", "surrogate"}
    relax = espresso.relax_maker("demo", {"kpoint_density": 2}, pw_command="mpirun -np 2 pw.x")
    assert (
        isinstance(relax, QERelaxMaker) and relax.preset == "demo" and relax.pw_command == "mpirun -np 2 pw.x"
    )
    assert isinstance(espresso.reference_maker("demo"), ElementReferenceMaker)
    assert isinstance(surrogate.relax_maker("demo"), SurrogateRelaxMaker)
    assert isinstance(surrogate.reference_maker(), SurrogateElementReferenceMaker)
    assert surrogate.with_pw_command(surrogate.relax_maker(), "pw.x") == surrogate.relax_maker()
    assert espresso.dft and not surrogate.dft and surrogate.caveat
    assert "band_gap" in espresso.properties and "band_gap" not in surrogate.properties


def test_magnetic_orderings_reach_only_the_pwx_overrides():
    espresso, surrogate = get_engine("espresso"), get_engine("surrogate")
    assert espresso.with_orderings({}, ["afm"]) == {"magnetic_orderings": ["fm", "afm"]}
    assert espresso.with_orderings({"a": 1}, ["fm"]) == {"a": 1}
    assert espresso.with_orderings({}, None) == {}
    assert surrogate.with_orderings({}, ["fm", "afm"]) == {}


def test_building_the_flow_reads_no_database(fake_settings, monkeypatch):
    from crystaloop.dft import records

    def refuse(*args, **kwargs):
        raise AssertionError("the database was read while the flow was built")

    monkeypatch.setattr(records, "get_reference", refuse)
    flow = FormationEnergyMaker(preset="demo", magnetic_orderings=["fm", "afm"]).make(sic_cell())
    names = [j.name for j in flow.jobs]
    assert names == ["qe relax", "qe element reference C", "qe element reference Si", "formation energy"]
    assert flow.jobs[0].function.__self__.overrides == {"magnetic_orderings": ["fm", "afm"]}


def test_cached_references_are_looked_up_when_the_job_runs(fake_pw, fake_settings, database):
    fake = fake_pw(SIC_RUNS)
    maker = FormationEnergyMaker()
    flow = maker.make(sic_cell())
    first = _outputs(run_local(flow), flow)[-1]
    assert isinstance(first, FormationEnergyDocument) and first.state == "successful"
    assert len(fake.calls) == 3

    again = maker.make(sic_cell())
    assert len(again.jobs) == 4  # the same flow: the cache is read by its reference jobs
    outputs = _outputs(run_local(again), again)
    assert len(fake.calls) == 4  # only the relaxation ran
    references = [o for o in outputs if isinstance(o, ElementReference)]
    assert sorted(r.element for r in references) == ["C", "Si"] and all(r.cached for r in references)
    assert outputs[-1].formation_energy_per_atom == pytest.approx(first.formation_energy_per_atom)


def test_references_resolved_beforehand_get_no_job(fake_pw, fake_settings, database):
    fake_pw(SIC_RUNS)
    maker = FormationEnergyMaker(record=False)
    assert maker.cached_references(sic_cell()) == {}
    run_local(FormationEnergyMaker().make(sic_cell()))
    known = maker.cached_references(sic_cell())
    assert sorted(known) == ["C", "Si"] and all(r.cached for r in known.values())
    flow = FormationEnergyMaker(record=False, references=known).make(sic_cell())
    assert [j.name for j in flow.jobs] == ["qe relax", "formation energy"]


def test_the_deprecated_flow_still_builds(fake_settings, database):
    with pytest.warns(DeprecationWarning, match="FormationEnergyMaker"):
        flow = FormationEnergyFlow(sic_cell(), preset="demo")
    assert [j.name for j in flow.jobs][-1] == "formation energy"
