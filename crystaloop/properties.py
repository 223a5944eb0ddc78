"""The target properties, defined once: name, unit and valid physical range.

Eight are the paper's: the prior set labels them and the property models learn them
(:data:`LABEL_NAMES`). ``energy_above_hull`` is derived: a formation energy placed against one
engine's convex hull (:mod:`crystaloop.dft.hull`), never a label or a model head. Every module
that names a property (campaign windows, DB indexes, model heads, labels) imports it from here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PropertySpec:
    """One target property.

    Attributes
    ----------
    name
        Snake-case key used in configs, documents and model heads.
    unit
        Fixed unit of every value ("" for dimensionless).
    lower, upper
        Physically valid range; window bounds outside it are rejected.
    label
        Human-readable name with unit, for tables and plots.
    derived
        Computed from other properties (against a hull), not learnt or labelled.
    """

    name: str
    unit: str
    lower: float
    upper: float
    label: str
    derived: bool = False

    def contains(self, value: float) -> bool:
        """True if ``value`` lies within the valid physical range."""
        return self.lower <= value <= self.upper


PROPERTIES: dict[str, PropertySpec] = {
    spec.name: spec
    for spec in (
        PropertySpec("formation_energy_per_atom", "eV/atom", -10.0, 5.0, "E_f (eV/atom)"),
        PropertySpec("energy_per_atom", "eV/atom", -20.0, 5.0, "E (eV/atom)"),
        PropertySpec("band_gap", "eV", 0.0, 20.0, "band gap (eV)"),
        PropertySpec("bulk_modulus", "GPa", 0.0, 1000.0, "K (GPa)"),
        PropertySpec("shear_modulus", "GPa", 0.0, 1000.0, "G (GPa)"),
        PropertySpec("poisson_ratio", "", -1.0, 0.5, "Poisson ratio"),
        PropertySpec("refractive_index", "", 1.0, 10.0, "refractive index"),
        PropertySpec("dielectric_constant", "", 1.0, 1000.0, "dielectric constant"),
        # negative: below the hull of the known phases, i.e. a new ground state
        PropertySpec("energy_above_hull", "eV/atom", -5.0, 5.0, "E_hull (eV/atom)", derived=True),
    )
}

PROPERTY_NAMES: tuple[str, ...] = tuple(PROPERTIES)
LABEL_NAMES: tuple[str, ...] = tuple(name for name, spec in PROPERTIES.items() if not spec.derived)
"""The properties a prior set labels and a property model learns (the paper's eight)."""


def property_spec(name: str) -> PropertySpec:
    """The spec for ``name``.

    Raises
    ------
    KeyError
        With the list of known properties in the message.
    """
    try:
        return PROPERTIES[name]
    except KeyError:
        raise KeyError(f"unknown property {name!r}; allowed: {', '.join(PROPERTY_NAMES)}") from None
