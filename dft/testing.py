"""A fake pw.x for tests that replays real pw.x runs, as atomate2 ships a fake VASP.

Reference folders made by the real pw.x (``tests/dft/make_references.py`` writes them: one
``attempt_<n>`` folder per run with ``pw.in``, ``pw.out.gz``, ``pw.err.gz`` and ``run.json``) are
keyed by job name. :class:`FakePw` stands in for :func:`crystaloop.dft.espresso.run.run_pw`:
it checks the input it is handed against the reference input (namelists, k-points,
pseudopotentials, cell, positions), then copies in the reference output.
"""

from __future__ import annotations

import gzip
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

#: Keys that depend on the machine, not on what was asked.
VOLATILE_KEYS = {"pseudo_dir", "outdir"}


def _read_input(path: Path):
    from ase.io.espresso import read_fortran_namelist

    with path.open() as fh:
        namelist, cards = read_fortran_namelist(fh)
    return namelist, [c.strip() for c in cards if c.strip()]


def _card(cards: list[str], name: str, count: int) -> list[str]:
    index = next(i for i, c in enumerate(cards) if c.upper().startswith(name))
    return cards[index : index + 1 + count]


def check_input(actual: Path, reference: Path) -> None:
    """Assert that a generated pw.in asks for what the reference pw.in asked for."""
    got, got_cards = _read_input(actual)
    want, want_cards = _read_input(reference)
    assert set(got) == set(want), f"namelists differ: {set(got)} vs {set(want)}"
    for section in want:
        g = {k: v for k, v in got[section].items() if k not in VOLATILE_KEYS}
        w = {k: v for k, v in want[section].items() if k not in VOLATILE_KEYS}
        assert g == w, f"&{section} differs: {g} vs {w}"
    nat = int(want["system"]["nat"])
    ntyp = int(want["system"]["ntyp"])
    assert _card(got_cards, "K_POINTS", 1) == _card(want_cards, "K_POINTS", 1)
    g_species = [ln.split()[::2] for ln in _card(got_cards, "ATOMIC_SPECIES", ntyp)[1:]]
    w_species = [ln.split()[::2] for ln in _card(want_cards, "ATOMIC_SPECIES", ntyp)[1:]]
    assert g_species == w_species, f"pseudopotentials differ: {g_species} vs {w_species}"
    for name, count in (("CELL_PARAMETERS", 3), ("ATOMIC_POSITIONS", nat)):
        g = _card(got_cards, name, count)
        w = _card(want_cards, name, count)
        assert g[0] == w[0]
        g_num = np.array([[float(x) for x in ln.split()[-3:]] for ln in g[1:]])
        w_num = np.array([[float(x) for x in ln.split()[-3:]] for ln in w[1:]])
        assert [ln.split()[0] for ln in g[1:]] == [ln.split()[0] for ln in w[1:]]
        np.testing.assert_allclose(g_num, w_num, atol=1e-5, err_msg=name)


class FakePw:
    """Replays reference folders by job name; records every call.

    Parameters
    ----------
    mapping
        Job name -> reference folder name under ``reference``.
    reference
        The folder holding the reference folders.
    """

    def __init__(self, mapping: dict[str, str], reference: Path):
        self.mapping = mapping
        self.reference = Path(reference)
        self.calls: list[tuple[str, int, Path]] = []
        self._attempts: dict[tuple[str, str], int] = defaultdict(int)

    def __call__(self, directory, *, pw_command=None, omp_num_threads=None, timeout_s=None):
        from jobflow import CURRENT_JOB

        from crystaloop.dft.espresso.run import PwRun

        directory = Path(directory)
        job = CURRENT_JOB.job
        name = job.name if job is not None else "direct"
        assert name in self.mapping, f"no reference for job '{name}'"
        key = (name, str(job.uuid) if job is not None else "")
        attempt = self._attempts[key]
        self._attempts[key] += 1
        folder = self.reference / self.mapping[name] / f"attempt_{attempt}"
        assert folder.is_dir(), f"job '{name}' ran {attempt + 1} times; no {folder.name}"
        check_input(directory / "pw.in", folder / "pw.in")
        for gz, target in (("pw.out.gz", "pw.out"), ("pw.err.gz", "pw.err")):
            if (folder / gz).exists():
                with gzip.open(folder / gz, "rt") as fh:
                    (directory / target).write_text(fh.read())
            else:
                (directory / target).write_text("")
        meta = json.loads((folder / "run.json").read_text())
        self.calls.append((name, attempt, directory))
        return PwRun(
            command=["fake-pw.x", "-in", "pw.in"],
            returncode=meta["returncode"],
            wall_time_s=meta["wall_time_s"],
            timed_out=meta["timed_out"],
            directory=directory,
        )


#: Recorded runs of zinc-blende SiC and its element references, by job name (``make_references.py``).
SIC_RUNS = {
    "qe relax": "sic_relax",
    "qe element reference Si": "si_relax",
    "qe element reference C": "c_relax",
}
#: The same with the ``demo`` preset, the references at the compound's cutoffs.
DEMO_SIC_RUNS = {
    "qe relax": "sic_relax_demo",
    "qe element reference C": "c_ref_demo_in_sic",
    "qe element reference Si": "si_ref_demo_in_sic",
}


def sic_cell():
    """The zinc-blende SiC cell the recorded SiC runs started from."""
    from crystaloop.dft.references import bulk_structure

    sic = bulk_structure("Si", "diamond", 4.36)
    sic.replace(1, "C")
    return sic
