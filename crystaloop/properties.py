"""The eight target properties, defined once: name, unit and valid physical range.

Every module that names a property (campaign windows, DB indexes, model heads,
labels) imports it from here.
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
    """

    name: str
    unit: str
    lower: float
    upper: float
    label: str

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
    )
}

PROPERTY_NAMES: tuple[str, ...] = tuple(PROPERTIES)


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
