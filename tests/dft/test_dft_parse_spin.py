"""Band gaps of spin-polarised pw.x runs, from real outputs.

Both references are real pw.x 6.7 scf runs (``fast`` preset, local PBE family, about 3 and 5 s
on one core), made as ``make_references.py`` makes the others: ``run_espresso_task`` with
``QEStaticMaker(record=False)``, every attempt's ``pw.in`` and gzipped ``pw.out`` stored:

- ``o2_fm_scf``: one O2 molecule (1.23 Å) in a 5 Å cube, ``spin_polarization: on``. It ends
  in the triplet (2.00 Bohr mag/cell): the up channel holds 7 occupied bands, the down channel
  5, and both are gapped. A ferromagnetic insulator.
- ``cras_half_metal_scf``: zinc-blende CrAs at a = 5.65 Å (spin-polarised through Cr). It ends
  at 3.00 Bohr mag/cell; the up channel is metallic, the down channel gapped. A half-metal.

The expected gaps are cross-checked against pymatgen's ``BandStructure.get_band_gap`` built from
the same eigenvalues, and their extrema are the levels pw.x printed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from pymatgen.core import Lattice, Structure

from crystaloop.dft.espresso.parse import _ase_images, _read_text, band_gap_from, parse_pw_output
from crystaloop.dft.references import dimer_structure
from crystaloop.settings import get_settings

REFERENCE = Path(__file__).parent / "reference"
O2 = REFERENCE / "o2_fm_scf" / "attempt_0" / "pw.out.gz"
CRAS = REFERENCE / "cras_half_metal_scf" / "attempt_0" / "pw.out.gz"
SI = REFERENCE / "si_static" / "attempt_0" / "pw.out.gz"
#: The local-pbe entries the two references were run with (no UPF files are needed to replay).
SPIN_FAMILY = {
    "name": "spin-refs",
    "functional": "PBE",
    "pseudopotentials": {
        "O": {"filename": "O.pbe-paw_kj.UPF", "md5": "ca214e77fc9c361e64068290943e85eb",
              "ecutwfc": 40.0, "ecutrho": 320.0, "pseudo_type": "PAW", "source": "ld1.x"},
        "Cr": {"filename": "Cr.pbe-spn-kjpaw_psl.1.0.0.UPF", "md5": "198f1a2427a48552563eee314eba32ba",
               "ecutwfc": 50.0, "ecutrho": 456.6060713719, "pseudo_type": "PAW", "source": "debian"},
        "As": {"filename": "As.pbe-n-kjpaw_psl.0.2.upf", "md5": "076d91deeb42e24e5cc35739acc2a16c",
               "ecutwfc": 20.0, "ecutrho": 160.0, "pseudo_type": "PAW", "source": "qe-examples"},
    },
}  # fmt: skip


def pymatgen_gap(path: Path) -> dict:
    """pymatgen's ``get_band_gap`` on the eigenvalues of a pw.x output (the independent check)."""
    from pymatgen.electronic_structure.bandstructure import BandStructure
    from pymatgen.electronic_structure.core import Spin

    calc = _ase_images(path, _read_text(path))[-1].calc
    structure = parse_pw_output(path).final_structure
    reciprocal = structure.lattice.reciprocal_lattice
    up = [k for k in calc.kpts if k.s == 0]
    eigenvalues = {Spin.up: np.array([k.eps_n for k in up]).T}
    if calc.get_number_of_spins() == 2:
        eigenvalues[Spin.down] = np.array([k.eps_n for k in calc.kpts if k.s == 1]).T
    kpoints = [np.asarray(k.k) for k in up]  # ASE stores them fractional (scaled)
    bs = BandStructure(kpoints, eigenvalues, reciprocal, calc.get_fermi_level(), structure=structure)
    return bs.get_band_gap()


def test_ferromagnetic_insulator_is_gapped_in_both_channels():
    out = parse_pw_output(O2)
    assert out.successful and out.total_magnetization == pytest.approx(2.0)
    # The channels hold 7 (up) and 5 (down) occupied bands: before the per-spin treatment this
    # run came out as a metal with gap 0.0.
    assert out.is_metal is False and out.is_half_metal is False
    # VBM: up-spin pi* at -5.4770 eV; CBM: down-spin pi* at -3.2607 eV (pw.x's printout).
    assert out.band_gap == pytest.approx(-3.2607 - -5.4770, abs=1e-4)
    up, down = out.band_gap_by_spin
    assert up == pytest.approx(0.0970 - -5.4770, abs=1e-4)
    assert down == pytest.approx(-3.2607 - -10.0244, abs=1e-4)
    reference = pymatgen_gap(O2)
    assert out.band_gap == pytest.approx(reference["energy"], abs=1e-6)


def test_half_metal_has_one_metallic_and_one_gapped_channel():
    out = parse_pw_output(CRAS)
    assert out.successful and out.total_magnetization == pytest.approx(3.0)
    assert out.is_metal is True and out.band_gap == 0.0 and out.is_half_metal is True
    up, down = out.band_gap_by_spin
    assert up == 0.0
    assert down == pytest.approx(7.9781 - 5.7949, abs=1e-4)
    assert pymatgen_gap(CRAS)["energy"] == 0.0


def test_unpolarised_runs_have_no_per_spin_gaps():
    out = parse_pw_output(SI)
    assert out.band_gap > 0.3 and out.is_metal is False
    assert out.band_gap_by_spin is None and out.is_half_metal is None
    assert out.band_gap == pytest.approx(pymatgen_gap(SI)["energy"], abs=1e-6)


def test_a_channel_without_empty_bands_leaves_the_gap_unknown():
    atoms = _ase_images(O2, _read_text(O2))[-1]
    for kpt in atoms.calc.kpts:  # keep only the occupied levels, as a run without empty bands
        kpt.eps_n = np.asarray(kpt.eps_n)[: 7 if kpt.s == 0 else 5]
    gap = band_gap_from(atoms)
    assert gap.gap is None and gap.is_metal is None
    assert gap.by_spin == (None, None)


@pytest.fixture
def spin_settings(settings, monkeypatch, tmp_path):
    """Settings whose family holds the O, Cr and As entries the references were run with."""
    pseudo_dir = tmp_path / "pseudo"
    pseudo_dir.mkdir()
    (pseudo_dir / "family.yaml").write_text(yaml.safe_dump(SPIN_FAMILY))
    monkeypatch.setenv("CRYSTALOOP_PSEUDO_DIR", str(pseudo_dir))
    get_settings.cache_clear()
    yield get_settings()
    get_settings.cache_clear()


def test_task_document_stores_per_spin_gaps(fake_pw, spin_settings, database):
    from jobflow import Flow

    from crystaloop.dft.backends import run_local
    from crystaloop.dft.espresso.jobs import QEStaticMaker

    a = 5.65
    fcc = Lattice([[0, a / 2, a / 2], [a / 2, 0, a / 2], [a / 2, a / 2, 0]])
    cras = Structure(fcc, ["Cr", "As"], [[0, 0, 0], [0.25, 0.25, 0.25]])
    fake_pw({"qe static O2": "o2_fm_scf", "qe static CrAs": "cras_half_metal_scf"})
    o2_job = QEStaticMaker(name="qe static O2", overrides={"spin_polarization": "on"}).make(
        dimer_structure("O", 1.23, box=5.0)
    )
    cras_job = QEStaticMaker(name="qe static CrAs").make(cras)
    responses = run_local(Flow([o2_job, cras_job]))

    o2 = responses[o2_job.uuid][1].output
    assert o2.state == "successful" and o2.input.parameters["system"]["nspin"] == 2
    assert o2.band_gap == pytest.approx(2.2163, abs=1e-4) and o2.is_metal is False
    assert o2.band_gap_by_spin == pytest.approx([5.5740, 6.7637], abs=1e-4)
    assert o2.is_half_metal is False
    stored = database["jobflow_outputs"].find_one({"uuid": o2_job.uuid})["output"]
    assert stored["band_gap_by_spin"] == pytest.approx([5.5740, 6.7637], abs=1e-4)

    half = responses[cras_job.uuid][1].output
    assert half.state == "successful" and half.is_half_metal is True and half.is_metal is True
    assert half.band_gap == 0.0 and half.band_gap_by_spin == pytest.approx([0.0, 2.1832], abs=1e-4)


@pytest.mark.pwx
@pytest.mark.skipif(shutil.which("pw.x") is None, reason="pw.x is not installed")
def test_ferromagnetic_insulator_with_real_pwx(dft_settings):
    from crystaloop.dft.espresso.jobs import QEStaticMaker, run_espresso_task

    o2 = dimer_structure("O", 1.23, box=5.0)
    doc = run_espresso_task(QEStaticMaker(record=False, overrides={"spin_polarization": "on"}), o2)
    assert doc.state == "successful" and doc.total_magnetization == pytest.approx(2.0, abs=0.05)
    assert doc.is_metal is False and doc.band_gap == pytest.approx(2.22, abs=0.05)
    assert all(g > 5 for g in doc.band_gap_by_spin)
