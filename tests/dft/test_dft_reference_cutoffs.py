"""Element references run at their compound's cutoffs, and every element has a reference.

Replays real pw.x runs (``make_references.py``): SiC with the ``demo`` preset takes the
family's cutoffs, the maximum of C's 40/320 Ry and Si's 45/360 Ry; its C reference must
run at 45/360 Ry too (the fake pw.x checks each input against the recorded one).
"""

from __future__ import annotations

import pytest

from crystaloop.dft.backends import run_local
from crystaloop.dft.espresso.inputs import load_preset
from crystaloop.dft.flows import FormationEnergyFlow, formation_energy_job
from crystaloop.dft.references import bulk_structure, check_references, default_reference
from crystaloop.dft.schemas import ElementReference, FormationEnergyDocument, QETaskDocument
from crystaloop.dft.testing import DEMO_SIC_RUNS, sic_cell
from crystaloop.errors import UserError

#: The elements of the local PBE family.
LOCAL_FAMILY = "H Be B C N O F Si Cr Fe Ni Cu Ga Ge As Rh Pd Ag I".split()


def _outputs(responses, flow):
    return [responses[job.uuid][1].output for job in flow.jobs]


def test_references_use_the_compounds_cutoffs_and_are_cached_per_cutoffs(fake_pw, fake_settings, database):
    fake = fake_pw(DEMO_SIC_RUNS)
    flow = FormationEnergyFlow(sic_cell(), preset="demo")
    outputs = _outputs(run_local(flow), flow)
    assert len(fake.calls) == 3  # relax + both references, each input checked against pw.x's
    result = outputs[-1]
    assert isinstance(result, FormationEnergyDocument) and result.state == "successful"
    assert (result.ecutwfc, result.ecutrho, result.below_suggested_cutoffs) == (45.0, 360.0, False)
    # E_f = (E_SiC - E_Si - E_C) / 2 from the three real runs.
    assert result.formation_energy_per_atom == pytest.approx(-0.275, abs=0.003)
    cached = {d["element"]: d for d in database["element_references"].find()}
    assert cached["C"]["preset"] == "demo@1@45/360Ry"
    assert (cached["C"]["ecutwfc"], cached["C"]["ecutrho"]) == (45.0, 360.0)
    tasks = {d["output"]["formula_pretty"]: d["output"]["input"] for d in database["dft_tasks"].find()}
    assert tasks["C"]["ecutwfc"] == 45.0 and tasks["C"]["suggested_ecutwfc"] == 40.0
    assert tasks["SiC"]["ecutwfc"] == 45.0 and not tasks["SiC"]["below_suggested_cutoffs"]

    # The same compound reuses both references; diamond C alone (40/320 Ry) must not.
    again = FormationEnergyFlow(sic_cell(), preset="demo")
    assert [j.name for j in again.jobs] == ["qe relax", "formation energy"]
    alone = FormationEnergyFlow(bulk_structure("C", "diamond", 3.567), preset="demo")
    assert "qe element reference C" in [j.name for j in alone.jobs]


def test_formation_energy_refuses_references_at_other_cutoffs(fake_pw, fake_settings, database):
    fake_pw(DEMO_SIC_RUNS)
    flow = FormationEnergyFlow(sic_cell(), preset="demo")
    outputs = _outputs(run_local(flow), flow)
    task = next(o for o in outputs if isinstance(o, QETaskDocument))
    refs = {o.element: o for o in outputs if isinstance(o, ElementReference)}
    stale = refs["C"].model_copy(update={"ecutwfc": 40.0, "ecutrho": 320.0})
    doc = formation_energy_job.original(task, {**refs, "C": stale}, record=False)
    assert doc.state == "failed" and doc.formation_energy_per_atom is None
    assert "C at 40/320 Ry" in doc.reasons[0]


def test_every_local_family_element_has_a_reference():
    check_references(LOCAL_FAMILY)
    assert len(default_reference("B")[0]) == 12  # α-B icosahedra
    assert len(default_reference("Ga")[0]) == 4  # α-Ga primitive cell
    iodine, calculation = default_reference("I")
    assert calculation == "vc-relax" and min(iodine.distance_matrix[0][1:]) == pytest.approx(2.715, abs=0.01)
    arsenic = default_reference("As")[0]
    assert arsenic.volume / len(arsenic) == pytest.approx(21.5, abs=0.5)  # A7 from ASE's data


def test_missing_reference_is_refused_before_the_campaign():
    with pytest.raises(
        UserError, match=r"no built-in reference structure for Np, U .*dft: \{reference_structures"
    ):
        check_references(["Fe", "U", "Np"])
    check_references(["Fe", "U", "Np"], supplied=["U", "Np"])


@pytest.mark.parametrize(
    ("element", "space_group", "sites", "volume_per_atom"),
    [
        ("Mn", "I-43m", 29, 12.2),  # α-Mn, a 8.91 Å conventional (58 atoms)
        ("S", "Fddd", 32, 25.8),  # α-S8 rings
        ("P", "Cmce", 4, 19.0),  # black P
        ("Se", "P3_121", 3, 27.3),  # trigonal Se chains
        ("Te", "P3_121", 3, 34.0),
        ("Br", "Cmce", 4, 32.6),  # Br2 molecular crystal
    ],
)
def test_ground_states_from_the_aflow_library(element, space_group, sites, volume_per_atom):
    structure, calculation = default_reference(element)
    assert calculation == "vc-relax" and len(structure) == sites
    assert {el.symbol for el in structure.composition.elements} == {element}
    assert structure.get_space_group_info(symprec=0.1)[0] == space_group
    assert structure.volume / sites == pytest.approx(volume_per_atom, abs=0.1)


def test_demo_preset_takes_the_family_cutoffs():
    demo = load_preset("demo")
    assert demo.ecutwfc is None and demo.ecutrho is None
    assert demo.kpoint_density < load_preset("standard").kpoint_density


def test_oxygen_reference_is_the_spin_triplet(fake_pw, fake_settings, database):
    """O2 runs spin-polarised although the demo preset says 'auto' (no magnetic element)."""
    from jobflow import Flow

    from crystaloop.dft.espresso.jobs import ElementReferenceMaker

    fake = fake_pw({"qe element reference O": "o2_ref_demo"})
    job = ElementReferenceMaker(preset="demo").make("O")
    job.name = "qe element reference O"
    responses = run_local(Flow([job]))
    reference = responses[job.uuid][1].output
    assert len(fake.calls) == 1  # the fake checked the input against the recorded nspin = 2 run
    pw_in = (fake.calls[0][2] / "pw.in").read_text()
    assert "nspin" in pw_in and "starting_magnetization" in pw_in
    # The recorded triplet: -82.98257 Ry per O2 (the closed-shell singlet is 0.84 eV higher).
    assert reference.energy_per_atom == pytest.approx(-82.98257044 * 13.605693 / 2, abs=2e-3)
    cached = database["element_references"].find_one({"element": "O"})
    assert cached["preset"] == "demo@1@40/320Ry+spin"
