"""Shared pieces of the loop tests: a small surrogate campaign and a hand-made shortlist."""

from __future__ import annotations

import pytest
from pymatgen.core import Lattice, Structure

from crystaloop.db.documents import CandidateState
from crystaloop.db.store import CandidateStore


def campaign_config(name: str, **changes) -> dict:
    """A small surrogate campaign."""
    config = {
        "name": name,
        "targets": [{"property": "formation_energy_per_atom", "min": -1.5, "max": -0.05}],
        "material_classes": ["binary"],
        "elements": {"allow": ["Cu", "Pd", "Ni", "Al", "Fe", "Ti", "Ga", "Ag"]},
        "budget": {"candidates_per_round": 16, "dft_per_round": 2},
        "max_rounds": 1,
        "dft": {"engine": "surrogate"},
        "retrain": {"epochs": 1, "replay": 16},
        "execution": {"poll_interval_s": 0.2},
        "acquisition": {"max_per_chemsys": 1},
    }
    config.update(changes)
    return config


def b2(a: str, b: str, lattice: float) -> Structure:
    return Structure(Lattice.cubic(lattice), [a, b], [[0, 0, 0], [0.5, 0.5, 0.5]])


SHORTLIST = [
    (b2("Ni", "Al", 2.88), -0.65, 0.05),
    (b2("Cu", "Pd", 3.00), -0.12, 0.05),
    (b2("Fe", "Al", 2.91), -0.30, 0.08),
    (b2("Ti", "Ga", 3.10), 0.40, 0.05),
]


def shortlist(database, name: str, round: int = 0, items=SHORTLIST) -> list[str]:
    """Store candidates as ``shortlisted`` with an ensemble prediction of E_f (eV/atom)."""
    store = CandidateStore(database)
    ids = []
    for structure, mean, std in items:
        cid, inserted = store.add(
            structure,
            campaign=name,
            round=round,
            predicted={"formation_energy_per_atom": {"mean": mean, "std": std}},
            provenance={"generation_id": f"{name}-r{round}"},
        )
        assert inserted
        store.transition(cid, CandidateState.SHORTLISTED)
        ids.append(cid)
    return ids


@pytest.fixture
def prior_subset(database):
    """A few hundred prior structures (replay data for the fine-tune, conditioning labels)."""
    from crystaloop.db.training import upsert_documents
    from crystaloop.generative.data import prior

    docs = prior.to_documents(prior.read_prior(prior.SHIPPED_PATH))
    upsert_documents(database, [d for d in docs if not d["reject_reason"]][:200])
    return database


@pytest.fixture
def loop_config():
    """``loop_config(name, **changes)``: a small surrogate campaign as a mapping."""
    return campaign_config


@pytest.fixture
def make_shortlist():
    """``make_shortlist(database, name, round=0, items=...)``: store shortlisted candidates."""
    return shortlist


@pytest.fixture
def shortlist_items():
    """(structure, predicted E_f mean, std) of four B2 binaries."""
    return list(SHORTLIST)


@pytest.fixture
def worker_bin(tmp_path):
    """A folder with ``jf`` and ``rlaunch`` that run under this interpreter.

    Console scripts of a copied virtualenv keep the original's interpreter in their
    shebang, so workers started through them could run another checkout's code.
    """
    import sys

    folder = tmp_path / "bin"
    folder.mkdir()
    scripts = {
        "jf": "from jobflow_remote.cli.jf import app; app()",
        "rlaunch": "import sys; from fireworks.scripts.rlaunch_run import rlaunch; sys.exit(rlaunch())",
    }
    for name, code in scripts.items():
        path = folder / name
        path.write_text(f'#!/bin/sh\nexec {sys.executable} -c "{code}" "$@"\n')
        path.chmod(0o755)
    return folder
