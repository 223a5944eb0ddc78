"""Reference structures of the elements for formation energies.

Bulk elements use their ground-state prototype at the experimental lattice
constant (the relaxation then finds the PBE one). Gaseous elements are
dimers in a cubic box, relaxed at fixed cell. Carbon uses diamond, which PBE
places within a few meV/atom of graphite without van der Waals terms.
"""

from __future__ import annotations

import numpy as np
from pymatgen.core import Lattice, Structure

from crystaloop.errors import UserError

#: element -> (prototype, a in Å, c/a for hcp)
BULK_PROTOTYPES: dict[str, tuple[str, float, float | None]] = {
    "C": ("diamond", 3.567, None),
    "Si": ("diamond", 5.431, None),
    "Ge": ("diamond", 5.658, None),
    "Al": ("fcc", 4.05, None),
    "Cu": ("fcc", 3.615, None),
    "Ni": ("fcc", 3.524, None),
    "Pd": ("fcc", 3.89, None),
    "Ag": ("fcc", 4.086, None),
    "Rh": ("fcc", 3.803, None),
    "Pt": ("fcc", 3.924, None),
    "Au": ("fcc", 4.078, None),
    "Li": ("bcc", 3.51, None),
    "Na": ("bcc", 4.29, None),
    "K": ("bcc", 5.33, None),
    "V": ("bcc", 3.03, None),
    "Cr": ("bcc", 2.91, None),
    "Fe": ("bcc", 2.866, None),
    "Mo": ("bcc", 3.147, None),
    "W": ("bcc", 3.165, None),
    "Be": ("hcp", 2.286, 1.568),
    "Mg": ("hcp", 3.209, 1.624),
    "Ti": ("hcp", 2.951, 1.588),
    "Co": ("hcp", 2.507, 1.623),
    "Zn": ("hcp", 2.665, 1.856),
}
#: element -> bond length of the dimer, Å
DIMERS: dict[str, float] = {"H": 0.74, "N": 1.10, "O": 1.21, "F": 1.42, "Cl": 1.99}
DIMER_BOX = 8.0


def bulk_structure(element: str, prototype: str, a: float, c_over_a: float | None = None) -> Structure:
    """The primitive cell of ``prototype`` (fcc, bcc, hcp, diamond) with lattice constant ``a``."""
    fcc = Lattice([[0, a / 2, a / 2], [a / 2, 0, a / 2], [a / 2, a / 2, 0]])
    if prototype == "fcc":
        return Structure(fcc, [element], [[0, 0, 0]])
    if prototype == "bcc":
        h = a / 2
        return Structure(Lattice([[-h, h, h], [h, -h, h], [h, h, -h]]), [element], [[0, 0, 0]])
    if prototype == "diamond":
        return Structure(fcc, [element] * 2, [[0, 0, 0], [0.25, 0.25, 0.25]])
    if prototype == "hcp":
        lattice = Lattice.hexagonal(a, a * (c_over_a or 1.633))
        return Structure(lattice, [element] * 2, [[1 / 3, 2 / 3, 0.25], [2 / 3, 1 / 3, 0.75]])
    raise ValueError(f"unknown prototype {prototype}")


def dimer_structure(element: str, bond: float, box: float = DIMER_BOX) -> Structure:
    """A dimer along x in a cubic box of side ``box`` Å."""
    centre = np.array([box / 2] * 3)
    coords = [centre - [bond / 2, 0, 0], centre + [bond / 2, 0, 0]]
    return Structure(Lattice.cubic(box), [element] * 2, coords, coords_are_cartesian=True)


def reference_structure(element: str, structure: Structure | None = None) -> tuple[Structure, str]:
    """The reference structure of ``element`` and its calculation (``vc-relax`` or ``relax``).

    Raises
    ------
    UserError
        No built-in reference for the element and none given.
    """
    if structure is not None:
        return structure, "vc-relax"
    if element in BULK_PROTOTYPES:
        prototype, a, c_over_a = BULK_PROTOTYPES[element]
        return bulk_structure(element, prototype, a, c_over_a), "vc-relax"
    if element in DIMERS:
        return dimer_structure(element, DIMERS[element]), "relax"
    raise UserError(
        f"no built-in reference structure for {element}; pass one with "
        "FormationEnergyFlow(reference_structures={...})"
    )
