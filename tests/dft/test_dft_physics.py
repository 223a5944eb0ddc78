"""Physics checks with the standard preset (slow; not run in CI).

References (PBE, Haas, Tran & Blaha, Phys. Rev. B 79, 085104 (2009)):
Si a = 5.47 Å (diamond), Cu a = 3.63 Å (fcc), Fe a = 2.83 Å (bcc, ferromagnetic).
"""

from __future__ import annotations

import pytest

from crystaloop.dft.espresso.jobs import QERelaxMaker, run_espresso_task
from crystaloop.dft.references import bulk_structure

pytestmark = [pytest.mark.slow, pytest.mark.pwx]


def _conventional_a(doc, prototype: str) -> float:
    a = doc.final_structure.lattice.a
    return a * 2**0.5 if prototype in ("diamond", "fcc") else a * 2 / 3**0.5


@pytest.mark.parametrize(
    ("element", "prototype", "start", "pbe", "tolerance"),
    [
        ("Si", "diamond", 5.431, 5.47, 0.01),
        ("Cu", "fcc", 3.615, 3.63, 0.02),
        ("Fe", "bcc", 2.866, 2.83, 0.02),
    ],
)
def test_standard_preset_lattice_constants(dft_settings, element, prototype, start, pbe, tolerance):
    structure = bulk_structure(element, prototype, start)
    doc = run_espresso_task(QERelaxMaker(preset="standard", record=False), structure)
    assert doc.state == "successful", doc.reasons
    assert _conventional_a(doc, prototype) == pytest.approx(pbe, rel=tolerance)
    if element == "Fe":
        assert doc.total_magnetization == pytest.approx(2.2, abs=0.4)
