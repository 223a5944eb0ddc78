"""Real pw.x, end to end: local family, fast preset, run_locally, embedded DB, formation energy."""

from __future__ import annotations

import pytest

from crystaloop.dft.backends import run_local
from crystaloop.dft.flows import FormationEnergyFlow
from crystaloop.dft.references import bulk_structure

pytestmark = pytest.mark.pwx


def test_sic_then_si_formation_energy_with_real_pwx(dft_settings, database):
    sic = bulk_structure("Si", "diamond", 4.36)
    sic.replace(1, "C")
    flow = FormationEnergyFlow(sic, preset="fast")
    result = run_local(flow)[flow.jobs[-1].uuid][1].output
    assert result.state == "successful" and result.engine == "espresso"
    # PBE zincblende SiC lies a few tenths of an eV/atom below Si + diamond.
    assert -0.5 < result.formation_energy_per_atom < -0.15
    relax = database["dft_tasks"].find_one({"task_id": result.task_id})
    assert relax["state"] == "successful" and relax["output"]["code_version"].startswith("pw.x")
    assert database["element_references"].count_documents({}) == 2

    si = bulk_structure("Si", "diamond", 5.40)
    again = FormationEnergyFlow(si, preset="fast")
    assert len(again.jobs) == 2
    si_result = run_local(again)[again.jobs[-1].uuid][1].output
    assert si_result.formation_energy_per_atom == pytest.approx(0.0, abs=5e-3)
    assert database["dft_tasks"].count_documents({"state": "successful"}) == 4
