"""CHGNet elemental reference energies (eV/atom) for formation energies, cached.

Reference states, per element:

- Solids: ``ase.build.bulk(symbol)``, the ground state of
  ``ase.data.reference_states`` (fcc, bcc, hcp, diamond, rhombohedral, bct ...),
  relaxed (cell and positions) with CHGNet's ``StructOptimizer``.
- Gases H, N, O, F, Cl: the diatomic molecule (bond length from
  ``reference_states``) in a 12 Å cubic box, positions relaxed. The box is far
  beyond CHGNet's 5 Å cutoff, so the molecule is isolated.
- Elements whose ``reference_states`` entry has no atomic basis in ASE
  (B, P, S, Mn, Ga, Se, Br, Te, I): the lowest relaxed energy among sc, bcc,
  fcc, hcp, diamond and the dimer in a box. These simple stand-ins lie above the
  true ground states (alpha-B, black P, S8, alpha-Mn, alpha-Ga ...), which
  makes formation energies involving them slightly too negative.

The table is shipped as ``references-<labeller>.json`` next to the prior set
and reused; ``compute_references`` only fills in missing elements.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from crystaloop.generative.data.elements import GASES

PRIOR_DIR = Path(__file__).parent / "prior"
BOX_ANGSTROM = 12.0
GAS_BOND_ANGSTROM = {"Cl": 1.99}
"""Bond lengths for gases whose ``reference_states`` entry is not a diatom."""
FMAX = 0.02
"""Force convergence of reference relaxations (eV/Å)."""


def reference_path(labeller: str) -> Path:
    """Path of the shipped reference cache for ``labeller`` (e.g. 'chgnet-0.3.0')."""
    return PRIOR_DIR / f"references-{labeller}.json"


def _dimer(symbol: str, bond: float):
    from ase import Atoms

    half = BOX_ANGSTROM / 2
    return Atoms(
        [symbol, symbol],
        positions=[[half - bond / 2, half, half], [half + bond / 2, half, half]],
        cell=[BOX_ANGSTROM] * 3,
        pbc=True,
    )


def _candidates(symbol: str) -> list[tuple[str, object, bool]]:
    """(description, ase Atoms, relax cell) for the reference state of ``symbol``."""
    from ase.build import bulk
    from ase.data import atomic_numbers, covalent_radii, reference_states

    state = reference_states[atomic_numbers[symbol]] or {}
    if symbol in GASES:
        return [
            (
                f"{symbol}2 molecule in a {BOX_ANGSTROM:g} A box",
                _dimer(symbol, state.get("d") or GAS_BOND_ANGSTROM[symbol]),
                False,
            )
        ]
    try:
        atoms = bulk(symbol)
        return [(f"ase reference state {state.get('symmetry')}", atoms, True)]
    except (ValueError, KeyError, TypeError):
        pass
    r = covalent_radii[atomic_numbers[symbol]]
    out = [
        ("sc", bulk(symbol, "sc", a=2 * r), True),
        ("bcc", bulk(symbol, "bcc", a=4 * r / 3**0.5), True),
        ("fcc", bulk(symbol, "fcc", a=2 * r * 2**0.5), True),
        ("hcp", bulk(symbol, "hcp", a=2 * r, covera=(8 / 3) ** 0.5), True),
        ("diamond", bulk(symbol, "diamond", a=8 * r / 3**0.5), True),
        (f"{symbol}2 molecule in a {BOX_ANGSTROM:g} A box", _dimer(symbol, 2 * r), False),
    ]
    return [(f"lowest of sc/bcc/fcc/hcp/diamond/dimer: {name}", a, c) for name, a, c in out]


def compute_reference(symbol: str, optimizer) -> dict:
    """Relax the reference candidates of ``symbol`` with ``optimizer`` (a CHGNet StructOptimizer).

    Returns
    -------
    dict
        ``energy_per_atom`` (eV/atom), ``state`` (description) and ``natoms``.
    """
    best: dict | None = None
    for name, atoms, relax_cell in _candidates(symbol):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = optimizer.relax(atoms, fmax=FMAX, steps=500, relax_cell=relax_cell, verbose=False)
        final = out["final_structure"]
        natoms = len(final)
        energy = float(optimizer.calculator.model.predict_structure(final, task="e")["e"])
        if best is None or energy < best["energy_per_atom"]:
            best = {"energy_per_atom": energy, "state": name, "natoms": natoms}
    assert best is not None
    return best


def load_references(labeller: str, cache: Path | None = None) -> dict[str, dict]:
    """The shipped reference table for ``labeller``, updated by ``cache`` if given."""
    table: dict[str, dict] = {}
    for path in (reference_path(labeller), cache):
        if path is not None and path.exists():
            table.update(json.loads(path.read_text()))
    return table


def compute_references(symbols, labeller: str, *, model=None, cache: Path | None = None) -> dict[str, float]:
    """Reference energies (eV/atom) for ``symbols``, computing missing ones.

    Parameters
    ----------
    cache
        Where newly computed references are written (with the known ones); default the shipped
        table next to the prior set.
    """
    table = load_references(labeller, cache)
    missing = [s for s in symbols if s not in table]
    if missing:
        from chgnet.model import CHGNet, StructOptimizer

        optimizer = StructOptimizer(model=model or CHGNet.load(verbose=False))
        for symbol in missing:
            table[symbol] = compute_reference(symbol, optimizer)
        path = cache or reference_path(labeller)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dict(sorted(table.items())), indent=1) + "\n")
    return {s: table[s]["energy_per_atom"] for s in symbols}
