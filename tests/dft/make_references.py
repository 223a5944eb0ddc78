"""Regenerate the fake pw.x reference folders with the real pw.x.

Run from the repository root (takes about a minute; name cases to redo only those)::

    python tests/dft/make_references.py [si_relax ...]

``cu_overlap_crash`` was made by hand with the real pw.x: an scf of two Cu atoms 0.3 Å
apart in a 5 Å cube (``fast`` preset), which aborts with MPI error code 57.
``si_bfgs_curvature_warning`` was made by hand with the real pw.x: a fixed-cell ``relax`` of
two Si atoms (Debian's Si.pbe-nl-rrkjus_psl.1.0.0.UPF, 20/160 Ry, 4x4x4 k-points), the second
displaced by (0.10, 0.10, -0.08) in crystal units; BFGS prints "WARNING: bfgs curvature
condition failed, Theta= 0.912" and then converges.

Each case runs the real job code with the local PBE family and the ``fast``
preset, then stores every attempt's ``pw.in`` and gzipped ``pw.out`` under
``tests/dft/reference/<case>/attempt_<n>/``, plus ``run.json`` (exit code,
wall time, whether it was killed).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REFERENCE = HERE / "reference"


def cases():
    from crystaloop.dft.espresso.jobs import QERelaxMaker, QEStaticMaker
    from crystaloop.dft.references import DIMERS, bulk_structure, dimer_structure

    si = bulk_structure("Si", "diamond", 5.431)
    c = bulk_structure("C", "diamond", 3.567)
    sic = bulk_structure("Si", "diamond", 4.36)
    sic.replace(1, "C")
    strained = bulk_structure("Si", "diamond", 5.10)
    return {
        "si_relax": (QERelaxMaker(record=False), si),
        "c_relax": (QERelaxMaker(record=False), c),
        "sic_relax": (QERelaxMaker(record=False), sic),
        "si_static": (QEStaticMaker(record=False), si),
        "si_scf_retry": (
            QEStaticMaker(record=False, overrides={"input_data": {"electrons": {"electron_maxstep": 3}}}),
            si,
        ),
        "si_ionic_retry": (
            QERelaxMaker(record=False, overrides={"input_data": {"control": {"nstep": 3}}}),
            strained,
        ),
        # SiC with the demo preset (family cutoffs: max of C 40 and Si 45 Ry), and its element
        # references at the compound's 45/360 Ry, as FormationEnergyFlow runs them.
        "sic_relax_demo": (QERelaxMaker(preset="demo", record=False), sic),
        "c_ref_demo_in_sic": (
            QERelaxMaker(preset="demo", record=False), c, {"cutoff_elements": ["C", "Si"]}
        ),
        "si_ref_demo_in_sic": (
            QERelaxMaker(preset="demo", record=False), si, {"cutoff_elements": ["C", "Si"]}
        ),
        # The O2 reference as ElementReferenceMaker runs it: fixed cell, Gamma only, and
        # spin-polarised (the triplet) although the demo preset's spin setting is 'auto'.
        "o2_ref_demo": (
            QERelaxMaker(
                preset="demo", record=False, overrides={"kpoint_density": 1, "spin_polarization": "on"}
            ),
            dimer_structure("O", DIMERS["O"]),
            {"calculation": "relax"},
        ),
    }


def record_verify(element: str, name: str, family_dir: Path) -> None:
    """Record every pw.x run of ``crystaloop dft pseudos verify`` for ``element`` as attempt_<n>.

    The verify command runs its SCFs one after another outside jobflow, so the fake pw.x
    replays them in order under the job name ``direct``.
    """
    from crystaloop.dft.espresso import run as pw_run
    from crystaloop.dft.pseudos import load_family
    from crystaloop.dft.verification import pwx_energy_fn, verify_element

    family = load_family(family_dir / "family.yaml")
    target = REFERENCE / name
    shutil.rmtree(target, ignore_errors=True)
    real_run_pw = pw_run.run_pw
    count = 0

    def recording_run_pw(directory, **kwargs):
        nonlocal count
        result = real_run_pw(directory, **kwargs)
        attempt = target / f"attempt_{count}"
        attempt.mkdir(parents=True)
        shutil.copyfile(Path(directory) / "pw.in", attempt / "pw.in")
        with gzip.open(attempt / "pw.out.gz", "wt") as fh:
            fh.write((Path(directory) / "pw.out").read_text())
        (attempt / "run.json").write_text(
            json.dumps(
                {
                    "returncode": result.returncode,
                    "wall_time_s": round(result.wall_time_s, 3),
                    "timed_out": result.timed_out,
                }
            )
        )
        count += 1
        return result

    pw_run.run_pw = recording_run_pw
    try:
        result = verify_element(element, pwx_energy_fn(family))
    finally:
        pw_run.run_pw = real_run_pw
    print(f"{name}: {count} runs, verdict {result.verdict}, nu {result.nu}, dE {result.structural_energy}")


def main() -> None:
    from crystaloop.dft.espresso import run as pw_run
    from crystaloop.dft.espresso.jobs import run_espresso_task
    from crystaloop.dft.pseudos import build_local_family
    from crystaloop.settings import get_settings

    tmp = Path(tempfile.mkdtemp(prefix="crystaloop-refs-"))
    build_local_family(tmp / "pseudo", ld1_elements=["C"])
    os.environ["CRYSTALOOP_PSEUDO_DIR"] = str(tmp / "pseudo")
    os.environ["CRYSTALOOP_DATA_DIR"] = str(tmp / "data")
    get_settings.cache_clear()
    runs = []
    real_run_pw = pw_run.run_pw

    def recording_run_pw(directory, **kwargs):
        result = real_run_pw(directory, **kwargs)
        runs.append(result)
        return result

    pw_run.run_pw = recording_run_pw
    selected = set(sys.argv[1:])
    if "be_verify" in selected:
        # Be: one atom per cell, the cheapest element to verify (structural check + 7-point EOS).
        build_local_family(tmp / "pseudo-be", ld1_elements=["Be"])
        record_verify("Be", "be_verify", tmp / "pseudo-be")
        selected.discard("be_verify")
        if not selected:
            return
    for name, (maker, structure, *extra) in cases().items():
        if selected and name not in selected:
            continue
        runs.clear()
        doc = run_espresso_task(maker, structure, **(extra[0] if extra else {}))
        target = REFERENCE / name
        shutil.rmtree(target, ignore_errors=True)
        directory = Path(doc.dir_name)
        for index, run in enumerate(runs):
            suffix = "" if index == len(runs) - 1 else f".{index}"
            attempt = target / f"attempt_{index}"
            attempt.mkdir(parents=True)
            shutil.copyfile(directory / f"pw.in{suffix}", attempt / "pw.in")
            with gzip.open(attempt / "pw.out.gz", "wt") as fh:
                fh.write((directory / f"pw.out{suffix}").read_text())
            (attempt / "run.json").write_text(
                json.dumps(
                    {
                        "returncode": run.returncode,
                        "wall_time_s": round(run.wall_time_s, 3),
                        "timed_out": run.timed_out,
                    }
                )
            )
        print(f"{name}: {doc.state}, {len(runs)} attempt(s), {doc.energy_per_atom} eV/atom")


if __name__ == "__main__":
    main()
