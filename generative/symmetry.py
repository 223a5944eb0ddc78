"""Symmetrise decoded crystals: the symmetry spglib finds at a loose tolerance, made exact.

A decoded crystal's lattice is read from a regression head or a least-squares fit and its
sites from voxel peaks, so it carries the symmetry of its prototype only up to a few tenths of
an angstrom. spglib at a tight tolerance then calls a decoded rock salt triclinic. Refining
the cell at a loose tolerance (``symprec``, angstrom) moves every site onto the exact
positions of the space group spglib finds and the lattice onto its exact metric, the way a
crystallographer idealises a refined structure.

:func:`symmetrize` returns the refined crystal only where the refinement keeps the
composition, the volume per site (within 5 %) and a number of sites that divides the input's;
otherwise the crystal is kept as decoded, with the reason. spglib moves no site by more than
about ``symprec``.
"""

from __future__ import annotations

from dataclasses import dataclass

from pymatgen.core import Structure

DEFAULT_SYMPREC = 0.3
"""Tolerance (angstrom) suggested for decoded crystals: the shipped VAE's sites sit 0.1-0.3 A off
their prototype's positions, and 0.3 and 0.5 gave the same crystal-system shares on its samples
(docs/models.md, "Symmetrised decoding")."""


@dataclass(frozen=True)
class Symmetrized:
    """The outcome of :func:`symmetrize`.

    Attributes
    ----------
    structure
        The refined crystal, or the input where it was kept.
    changed
        Whether ``structure`` is the refined crystal.
    spacegroup
        The international symbol spglib found at ``symprec`` (``None`` where spglib failed).
    reason
        Why the input was kept (``None`` when refined).
    """

    structure: Structure
    changed: bool
    spacegroup: str | None
    reason: str | None = None


def symmetrize(structure: Structure, symprec: float = DEFAULT_SYMPREC) -> Symmetrized:
    """``structure`` refined onto the space group spglib finds at ``symprec`` (angstrom).

    The refined cell is spglib's standard conventional cell; where its number of sites differs
    from the input's (a centred lattice, or a decoded supercell of a smaller cell), its primitive
    standard cell is returned instead, which may hold fewer sites than the input.
    """
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    try:
        analyzer = SpacegroupAnalyzer(structure, symprec=symprec)
        symbol = analyzer.get_space_group_symbol()
        refined = analyzer.get_refined_structure()
        if len(refined) != len(structure):  # a centred cell, or a decoded supercell: the primitive one
            refined = SpacegroupAnalyzer(refined, symprec=1e-3).get_primitive_standard_structure()
    except (TypeError, ValueError):  # spglib finds no cell for a degenerate input
        return Symmetrized(structure, False, None, "spglib found no symmetry")
    if refined.composition.reduced_formula != structure.composition.reduced_formula:
        return Symmetrized(structure, False, symbol, "refinement changed the composition")
    if len(structure) % len(refined):
        return Symmetrized(structure, False, symbol, "refinement changed the number of sites")
    per_site = (refined.volume / len(refined)) / (structure.volume / len(structure))
    if abs(per_site - 1.0) > 0.05:
        return Symmetrized(
            structure, False, symbol, "refinement changed the volume per site by more than 5 %"
        )
    return Symmetrized(refined, True, symbol)
