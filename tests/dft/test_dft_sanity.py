"""The rule that makes a finished relaxation unphysical, on hand-built structures."""

from __future__ import annotations

import pytest
from pymatgen.core import Lattice, Structure

from crystaloop.dft.sanity import (
    PREFIX,
    close_pair,
    covalent_radius,
    unphysical_energy,
    unphysical_geometry,
    volume_change,
)


def _rock_salt(a: float, species=("Na", "Cl")) -> Structure:
    """Primitive rock salt with cubic lattice constant ``a`` (Å): nearest pair at a/2."""
    lattice = Lattice([[0, a / 2, a / 2], [a / 2, 0, a / 2], [a / 2, a / 2, 0]])
    return Structure(lattice, list(species), [[0, 0, 0], [0.5, 0.5, 0.5]])


def test_covalent_radii_are_cordero_values():
    assert covalent_radius("Si") == pytest.approx(1.11)
    assert covalent_radius("C") == pytest.approx(0.73)


def test_a_pair_below_half_its_covalent_radii_sum_is_collapsed():
    # Na 1.66 + Cl 1.02 = 2.68 Å; half of that is 1.34 Å.
    assert close_pair(_rock_salt(5.64)) is None  # NaCl itself, 2.82 Å
    assert close_pair(_rock_salt(2.70)) is None  # 1.35 Å: squeezed, but above the line
    reason = close_pair(_rock_salt(2.60))  # 1.30 Å
    assert reason is not None and reason.startswith(f"{PREFIX}: Na-Cl at 1.30 Å")
    assert "2.68 Å" in reason
    # A periodic image counts: one Si atom in a 1.0 Å cube sits 1.0 Å from itself (limit 1.11 Å).
    lone = Structure(Lattice.cubic(1.0), ["Si"], [[0, 0, 0]])
    assert close_pair(lone) is None  # a single site has no pair in distance_matrix
    two = Structure(Lattice.cubic(1.0), ["Si", "Si"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    assert close_pair(two).startswith(f"{PREFIX}: Si-Si at 0.87 Å")


def test_a_cell_blown_up_or_collapsed_against_its_start():
    start = _rock_salt(5.64)
    assert volume_change(start, _rock_salt(5.64 * 1.8)) is None  # 5.8x: a crushed start relaxing
    assert volume_change(start, _rock_salt(5.64 * 2.1)).startswith(f"{PREFIX}: volume 9.26 x")
    assert volume_change(start, _rock_salt(5.64 * 0.45)).startswith(f"{PREFIX}: volume 0.09 x")
    # Per atom: a supercell of the same crystal has not changed its volume.
    assert volume_change(start, start * (2, 1, 1)) is None
    assert volume_change(start, _rock_salt(5.64 * 1.2), allowed=(0.5, 1.5)).startswith(
        f"{PREFIX}: volume 1.73 x"
    )


def test_geometry_reasons_together():
    start = _rock_salt(5.64)
    assert unphysical_geometry(start, start) == []
    assert unphysical_geometry(start, None) == []
    crushed = unphysical_geometry(start, _rock_salt(1.0))
    assert len(crushed) == 2 and all(r.startswith(PREFIX) for r in crushed)  # both rules fire


def test_an_energy_far_above_every_reference():
    references = {"Si": -5.31, "C": -9.06}
    assert unphysical_energy(-7.0, references) is None  # SiC, near its elements
    assert unphysical_energy(-3.31, references) is None  # exactly 2 eV/atom above Si: allowed
    reason = unphysical_energy(+3.6, references)  # the collapsed rock salt's order of magnitude
    assert reason is not None and reason.startswith(f"{PREFIX}: energy 8.91 eV/atom above")
    assert unphysical_energy(-4.0, references, margin=1.0) == (
        f"{PREFIX}: energy 1.31 eV/atom above the highest element reference (allowed 1)"
    )


def _task(energy_per_atom: float, *, final: Structure, engine: str = "espresso"):
    from crystaloop.dft.schemas import QEInputDoc, QETaskDocument

    start = _rock_salt(4.36, ("Si", "C"))
    return QETaskDocument(
        task_id="t-sanity",
        engine=engine,
        task_label="qe relax",
        calculation="vc-relax",
        state="successful",
        formula_pretty="SiC",
        elements=["C", "Si"],
        nsites=2,
        initial_structure=start,
        final_structure=final,
        energy=2 * energy_per_atom,
        energy_per_atom=energy_per_atom,
        input=QEInputDoc(preset="test"),
    )


@pytest.mark.parametrize("engine", ["espresso", "surrogate"])
def test_the_formation_energy_step_fails_an_energy_far_above_the_references(settings, database, engine):
    """One rule for both engines: the E_f step turns such a result into a failed relaxation."""
    from crystaloop.dft.flows import formation_energy_job

    references = {"Si": -5.31, "C": -9.06}
    fine = formation_energy_job.original(_task(-7.0, final=_rock_salt(4.36, ("Si", "C"))), references)
    assert fine.state == "successful" and fine.formation_energy_per_atom == pytest.approx(0.185)
    crushed = _task(3.6, final=_rock_salt(4.36, ("Si", "C")), engine=engine)
    database["dft_tasks"].insert_one({"task_id": crushed.task_id, "state": "successful"})
    doc = formation_energy_job.original(crushed, references)
    assert doc.state == "failed" and doc.formation_energy_per_atom is None
    assert doc.reasons == [f"{PREFIX}: energy 8.91 eV/atom above the highest element reference (allowed 2)"]
    record = database["dft_tasks"].find_one({"task_id": crushed.task_id})
    assert record["state"] == "failed" and record["reasons"] == doc.reasons  # the harvest sees a failure


def test_a_pwx_relaxation_outside_the_rule_is_a_failed_task(fake_pw, fake_settings, database, monkeypatch):
    """The pw.x relax job applies the rule to its real output (Si: the cell grows 1.04x on relaxing)."""
    from jobflow import Flow

    from crystaloop.dft.backends import run_local
    from crystaloop.dft.espresso import jobs
    from crystaloop.dft.references import bulk_structure

    fake_pw({"qe relax": "si_relax"})
    si = bulk_structure("Si", "diamond", 5.431)
    relax = jobs.QERelaxMaker().make(si)
    assert run_local(Flow([relax]))[relax.uuid][1].output.state == "successful"  # within the rule
    # The same run under a tighter volume range than the rule's:
    monkeypatch.setattr(jobs, "unphysical_geometry", lambda a, b: [volume_change(a, b, allowed=(0.5, 1.01))])
    relax = jobs.QERelaxMaker().make(si)
    doc = run_local(Flow([relax]))[relax.uuid][1].output
    assert doc.state == "failed" and doc.reasons[-1].startswith(f"{PREFIX}: volume 1.04 x")
    record = database["dft_tasks"].find_one({"task_id": str(relax.uuid)})
    assert record["state"] == "failed" and record["reasons"][-1] == doc.reasons[-1]
