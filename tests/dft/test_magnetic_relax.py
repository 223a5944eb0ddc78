"""A magnetic compound relaxed in both orderings keeps the lower, records both, and takes the
anion correction; replays real pw.x runs of rock-salt NiO with the ``demo`` preset
(``tests/dft/reference/nio_fm_afm_demo``: the ferromagnetic 2-atom cell, then the (111)
antiferromagnetic 4-atom cell, pw.x 6.7 with the local family's Ni and O files)."""

from __future__ import annotations

from pathlib import Path

import pytest
from jobflow import Flow
from pymatgen.core import Lattice, Structure

from crystaloop.dft.backends import run_local
from crystaloop.dft.espresso.jobs import QERelaxMaker
from crystaloop.dft.flows import formation_energy_job

FAMILY = Path(__file__).parent / "data" / "family_nio.yaml"
RY = 13.605693122994
#: Total energies of the replayed runs, Ry (the last "!" line of each pw.out).
FM_RY, AFM_RY = -470.73092090, -941.49456000


@pytest.fixture
def nio_settings(family_settings):
    return family_settings(FAMILY)


def _nio() -> Structure:
    h = 4.177 / 2
    return Structure(Lattice([[0, h, h], [h, 0, h], [h, h, 0]]), ["Ni", "O"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def _relax(fake_pw, orderings):
    fake = fake_pw({"qe relax": "nio_fm_afm_demo"})
    job = QERelaxMaker(preset="demo", overrides={"magnetic_orderings": orderings}).make(_nio())
    responses = run_local(Flow([job]))
    return fake, responses[job.uuid][1].output


def test_the_lower_of_fm_and_afm_is_kept_and_both_are_recorded(fake_pw, nio_settings, database):
    fake, task = _relax(fake_pw, ["fm", "afm"])
    assert len(fake.calls) == 2  # each input checked against the recorded one
    assert task.successful and task.magnetic_ordering == "afm" and task.nsites == 4
    fm, afm = task.magnetic_orderings
    assert (fm.ordering, afm.ordering) == ("fm", "afm")
    assert afm.energy_per_atom < fm.energy_per_atom
    assert task.energy_per_atom == afm.energy_per_atom
    # Antiferromagnetic order lowers NiO by about 0.11 eV/atom here (the replayed energies).
    assert fm.energy_per_atom - afm.energy_per_atom == pytest.approx((FM_RY / 2 - AFM_RY / 4) * RY, abs=2e-3)
    assert abs(afm.total_magnetization) < 0.05 < 2.0 < afm.absolute_magnetization
    assert fm.total_magnetization > 1.5
    assert afm.band_gap > 0.5 and task.band_gap == afm.band_gap  # the AFM insulator
    assert task.final_structure.site_properties["spin"].count(-1) == 1
    record = database["dft_tasks"].find_one({"task_id": task.task_id})
    assert [o["ordering"] for o in record["output"]["magnetic_orderings"]] == ["fm", "afm"]


def test_the_anion_correction_shifts_a_replayed_result_by_the_fitted_amount(fake_pw, nio_settings, database):
    _, task = _relax(fake_pw, ["fm", "afm"])
    references = {"Ni": -4000.0, "O": -430.0}  # eV/atom: any pair; only the difference is checked
    raw = formation_energy_job.original(task, references, record=False)
    fitted = formation_energy_job.original(
        task, references, record=False, correction={"label": "anion-fit:test", "values": {"O": -0.64}}
    )
    assert (
        raw.anion_correction == "none" and raw.formation_energy_per_atom == raw.formation_energy_per_atom_raw
    )
    assert fitted.formation_energy_per_atom_raw == pytest.approx(raw.formation_energy_per_atom)
    assert fitted.anion_correction == "anion-fit:test"
    assert fitted.anion_correction_per_atom == pytest.approx(-0.32)  # one O in two atoms
    assert fitted.formation_energy_per_atom - raw.formation_energy_per_atom == pytest.approx(-0.32)
