"""Reference structures of the elements for formation energies.

Bulk elements use their ground-state prototype at the experimental lattice
constant (the relaxation then finds the PBE one). Gaseous elements are
dimers in a cubic box, relaxed at fixed cell. Carbon uses diamond, which PBE
places within a few meV/atom of graphite without van der Waals terms.

Elements whose ground state is no simple prototype are built from their
experimental crystal structures (``COMPLEX_STRUCTURES``: α-B, α-Ga, solid I2; and
``AFLOW_REFERENCES``, from pymatgen's AFLOW prototype library: α-Mn, α-S, black P,
trigonal Se and Te, solid Br2), and the rest from ASE's reference states where those are a structure ASE can
build (fcc, bcc, hcp metals, diamond, bct, A7 rhombohedral). Any other element
needs a structure from the user; :func:`check_references` says so before a
campaign starts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

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
#: Elements whose reference has unpaired spins whatever ``spin_polarization: auto`` says: O2 is a
#: triplet. Closed-shell O2 is 0.84 eV per molecule above the triplet with the local PBE file
#: (``demo`` preset, pw.x 6.7), which would make every oxide 0.42 x_O eV/atom too stable.
SPIN_POLARIZED_REFERENCES = frozenset({"O"})
#: element -> (space group, lattice a, b, c in Å (hexagonal setting for R-3m), Wyckoff sites);
#: experimental structures, reduced to the primitive cell.
COMPLEX_STRUCTURES: dict[str, tuple[str, tuple[float, float, float], list[list[float]], str]] = {
    # α-B, 12-atom icosahedra (Decker & Kasper, Acta Cryst. 12, 503 (1959)).
    "B": (
        "R-3m",
        (4.9179, 4.9179, 12.5805),
        [[0.11886, 0.88114, 0.89133], [0.19686, 0.80314, 0.02432]],
        "alpha-B",
    ),
    # α-Ga, Ga2 dimers (Sharma & Donohue, Z. Kristallogr. 117, 293 (1962)).
    "Ga": ("Cmce", (4.5197, 7.6633, 4.5260), [[0.0, 0.1549, 0.0810]], "alpha-Ga"),
    # Solid I2 at 110 K (van Bolhuis et al., Acta Cryst. 23, 90 (1967)).
    "I": ("Cmce", (7.136, 4.686, 9.784), [[0.0, 0.15434, 0.11741]], "I2 molecular crystal"),
}
#: element -> (AFLOW prototype label, reduced formula of its entry in pymatgen's AFLOW prototype
#: library, volume per atom in Å^3 to scale to or None to keep the entry's own): ground states whose
#: experimental structure the library holds (α-Mn I-43m, α-S Fddd, black P Cmce, trigonal Se), and
#: two that share a type with one (Te with Se, Br2 with I2) at their experimental densities.
AFLOW_REFERENCES: dict[str, tuple[str, str, float | None]] = {
    "Mn": ("A_cI58_217_ac2g", "Mn", None),
    "S": ("A_oF128_70_4h", "S", None),
    "P": ("A_oC8_64_f", "P", None),
    "Se": ("A_hP3_152_a", "Se", None),
    "Te": ("A_hP3_152_a", "Se", 33.98),  # a 4.457, c 5.929 Å, 3 atoms
    "Br": ("A_oC8_64_f", "I", 32.6),  # Br2 at 5 K: a 6.67, b 4.48, c 8.72 Å, 8 atoms
}
#: ASE reference-state symmetries that ``ase.build.bulk`` builds faithfully.
ASE_SYMMETRIES = {"fcc", "bcc", "hcp", "diamond", "bct", "rhombohedral"}


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


def complex_structure(element: str) -> Structure:
    """The primitive cell of ``element``'s entry in ``COMPLEX_STRUCTURES``."""
    group, (a, b, c), sites, _ = COMPLEX_STRUCTURES[element]
    lattice = Lattice.hexagonal(a, c) if group == "R-3m" else Lattice.orthorhombic(a, b, c)
    conventional = Structure.from_spacegroup(group, lattice, [element] * len(sites), sites)
    return conventional.get_primitive_structure()


def aflow_reference_structure(element: str) -> Structure | None:
    """``element``'s entry in :data:`AFLOW_REFERENCES`, from pymatgen's AFLOW prototype library."""
    if element not in AFLOW_REFERENCES:
        return None
    from pymatgen.analysis.prototypes import AFLOW_PROTOTYPE_LIBRARY

    label, formula, volume_per_atom = AFLOW_REFERENCES[element]
    entry = next(
        e
        for e in AFLOW_PROTOTYPE_LIBRARY
        if e["tags"]["aflow"] == label and e["snl"].structure.composition.reduced_formula == formula
    )
    structure = entry["snl"].structure.copy()
    structure.replace_species({sp: element for sp in structure.composition.elements})
    if volume_per_atom is not None:
        structure.scale_lattice(volume_per_atom * len(structure))
    return structure


def ase_reference_structure(element: str) -> Structure | None:
    """``element`` from ASE's reference states, when ASE can build that state faithfully."""
    from ase.build import bulk
    from ase.data import atomic_numbers, reference_states
    from pymatgen.io.ase import AseAtomsAdaptor

    state = reference_states[atomic_numbers[element]] if element in atomic_numbers else None
    if not state or state.get("symmetry") not in ASE_SYMMETRIES:
        return None
    # ASE files trigonal Se and Te as "hcp" with c/a near 1.1-1.3: not their real structure.
    if state["symmetry"] == "hcp" and not 1.5 <= state.get("c/a", 0.0) <= 1.95:
        return None
    try:
        return AseAtomsAdaptor.get_structure(bulk(element))
    except (ValueError, KeyError, RuntimeError):
        return None


def default_reference(element: str) -> tuple[Structure, str] | None:
    """The built-in reference of ``element`` and its calculation, or None."""
    if element in BULK_PROTOTYPES:
        prototype, a, c_over_a = BULK_PROTOTYPES[element]
        return bulk_structure(element, prototype, a, c_over_a), "vc-relax"
    if element in DIMERS:
        return dimer_structure(element, DIMERS[element]), "relax"
    if element in COMPLEX_STRUCTURES:
        return complex_structure(element), "vc-relax"
    if element in AFLOW_REFERENCES:
        return aflow_reference_structure(element), "vc-relax"
    found = ase_reference_structure(element)
    return (found, "vc-relax") if found is not None else None


def structure_digest(structure: Structure) -> str:
    """A short hash of ``structure``'s lattice, species and fractional coordinates (to 1e-4).

    Part of an element-reference cache key when the user supplies the structure, so that
    its energy is never stored under, or read from, the built-in reference's key.
    """
    # + 0.0 turns -0.0 into 0.0; the second % 1.0 turns a rounded 1.0 into 0.0.
    lattice = [round(float(x), 4) + 0.0 for x in structure.lattice.matrix.flat]
    sites = sorted(
        (site.species_string, *(round(float(x) % 1.0, 4) % 1.0 + 0.0 for x in site.frac_coords))
        for site in structure
    )
    return hashlib.sha256(repr((lattice, sites)).encode()).hexdigest()[:10]


def reference_structure(element: str, structure: Structure | None = None) -> tuple[Structure, str]:
    """The reference structure of ``element`` and its calculation (``vc-relax`` or ``relax``).

    Raises
    ------
    UserError
        No built-in reference for the element and none given.
    """
    if structure is not None:
        return structure, "vc-relax"
    found = default_reference(element)
    if found is None:
        raise UserError(
            f"no built-in reference structure for {element}; give its ground state in the campaign "
            f"file, e.g. dft: {{reference_structures: {{{element}: {element}.cif}}}}"
        )
    return found


def check_references(elements: Iterable[str], supplied: Iterable[str] = ()) -> None:
    """Raise before a campaign starts if an element has no reference structure.

    Parameters
    ----------
    elements
        The campaign's allowed elements.
    supplied
        Elements the user gives reference structures for.

    Raises
    ------
    UserError
        One line naming every element without a reference and how to supply one.
    """
    missing = sorted(e for e in {str(e) for e in elements} - set(supplied) if default_reference(e) is None)
    if missing:
        raise UserError(
            f"no built-in reference structure for {', '.join(missing)} (formation energies need "
            "one per element); give its ground state in the campaign file, e.g. "
            f"dft: {{reference_structures: {{{missing[0]}: {missing[0]}.cif}}}}, or drop the element"
        )
