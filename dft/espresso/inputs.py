"""pw.x inputs: versioned presets merged with overrides, written through ASE.

A preset is YAML in ``presets/``. Overrides are deep-merged into a copy; the
preset files and the loaded presets are never modified.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pymatgen.core import Structure
from pymatgen.io.ase import AseAtomsAdaptor
from pymatgen.io.vasp.inputs import Kpoints

from crystaloop.dft.pseudos import SAFE_LOADER, PseudoFamily
from crystaloop.errors import UserError

#: Elements whose presence switches spin polarisation on under ``spin_polarization: auto``.
MAGNETIC_ELEMENTS = frozenset(
    {"Cr", "Mn", "Fe", "Co", "Ni", "V", "Gd", "Eu", "Sm", "Nd", "Tb", "Dy", "Ho", "Er", "Tm"}
)
NAMELISTS = ("control", "system", "electrons", "ions", "cell")
INPUT_FILE = "pw.in"
OUTPUT_FILE = "pw.out"


class Preset(BaseModel):
    """A versioned set of pw.x parameters.

    ``ecutwfc``/``ecutrho`` (Ry) of ``None`` take the family's cutoffs for the structure.
    ``kpoint_density`` is in k-points per reciprocal atom (pymatgen's ``automatic_density``).
    """

    model_config = ConfigDict(extra="forbid")

    name: str
    version: str
    description: str = ""
    ecutwfc: float | None = Field(None, gt=0, description="Ry; None: from the family.")
    ecutrho: float | None = Field(None, gt=0, description="Ry; None: from the family.")
    kpoint_density: float = Field(gt=0, description="k-points per reciprocal atom.")
    spin_polarization: Literal["auto", "on", "off"] = "auto"
    starting_magnetization: float = Field(
        0.4, ge=-1, le=1, description="Fraction of valence charge, on magnetic elements."
    )
    magnetic_orderings: list[Literal["fm", "afm"]] = Field(
        default_factory=lambda: ["fm"],
        description="Orderings relaxed for a magnetic compound; the lowest energy per atom is kept.",
    )
    input_data: dict[str, dict[str, Any]]

    @property
    def label(self) -> str:
        """``name@version``, stored with every result."""
        return f"{self.name}@{self.version}"

    def with_overrides(self, overrides: dict[str, Any] | None) -> Preset:
        """A new preset with ``overrides`` deep-merged into a copy of this one.

        Raises
        ------
        UserError
            The merged preset is invalid.
        """
        if not overrides:
            return self.model_copy(deep=True)
        _reject_namelist_cutoffs(overrides, f"override for preset '{self.name}'", "the override")
        merged = deep_merge(self.model_dump(), overrides)
        try:
            return Preset.model_validate(merged)
        except ValidationError as exc:
            problem = exc.errors()[0]
            where = ".".join(str(p) for p in problem["loc"])
            raise UserError(
                f"invalid override for preset '{self.name}': {where}: {problem['msg']}; "
                "fix the override"
            ) from None


def _reject_namelist_cutoffs(data: dict[str, Any], what: str, where: str) -> None:
    """Refuse ``input_data.system.ecutwfc``/``ecutrho``: the top-level fields set the cutoffs.

    Raises
    ------
    UserError
        ``data`` sets a cutoff inside ``input_data.system``.
    """
    system = ((data.get("input_data") or {}).get("system")) or {}
    for key in ("ecutwfc", "ecutrho"):
        if isinstance(system, dict) and key in system:
            raise UserError(
                f"{what} sets input_data.system.{key}, which the family cutoffs would replace; "
                f"set the top-level '{key}' (Ry) in {where} instead"
            )


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """A new dict: ``update`` merged into a deep copy of ``base`` (nested dicts merge)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def available_presets() -> list[str]:
    """Names of the shipped presets."""
    folder = resources.files("crystaloop.dft.espresso") / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_preset(name: str | Path, overrides: dict[str, Any] | None = None) -> Preset:
    """Load a shipped preset by name (or a YAML path) and merge ``overrides`` into a copy.

    Raises
    ------
    UserError
        Unknown preset or invalid file.
    """
    path = Path(name)
    if path.suffix in {".yaml", ".yml"} and path.is_file():
        text = path.read_text()
    else:
        resource = resources.files("crystaloop.dft.espresso") / "presets" / f"{name}.yaml"
        if not resource.is_file():
            raise UserError(
                f"unknown preset '{name}'; choose one of {', '.join(available_presets())} "
                "or give a YAML path"
            )
        text = resource.read_text()
    try:
        data = yaml.load(text, Loader=SAFE_LOADER)
        preset = Preset.model_validate(data)
    except (yaml.YAMLError, ValidationError) as exc:
        raise UserError(f"preset '{name}' is invalid ({str(exc).splitlines()[0]})") from None
    _reject_namelist_cutoffs(data, f"preset '{name}'", "the preset YAML")
    return preset.with_overrides(overrides)


def kpoint_grid(structure: Structure, kpoint_density: float) -> tuple[int, int, int]:
    """Monkhorst-Pack divisions for ``kpoint_density`` k-points per reciprocal atom."""
    kpts = Kpoints.automatic_density(structure, kpoint_density, force_gamma=False)
    return tuple(int(k) for k in kpts.kpts[0])


def is_spin_polarized(structure: Structure, preset: Preset) -> bool:
    """Whether to run spin-polarised: forced by the preset, or magnetic elements present."""
    if preset.spin_polarization != "auto":
        return preset.spin_polarization == "on"
    return any(el.symbol in MAGNETIC_ELEMENTS for el in structure.composition.elements)


@dataclass
class PwInput:
    """Everything needed to write one pw.x input."""

    structure: Structure
    input_data: dict[str, dict[str, Any]]
    pseudopotentials: dict[str, str]
    kpts: tuple[int, int, int]
    magmoms: list[float] | None = None
    preset: str = ""
    pseudo_md5: dict[str, str] = field(default_factory=dict)
    suggested_cutoffs: tuple[float, float] | None = None

    @property
    def cutoffs(self) -> tuple[float, float]:
        """``(ecutwfc, ecutrho)`` in Ry as written."""
        system = self.input_data["system"]
        return float(system["ecutwfc"]), float(system["ecutrho"])

    @property
    def below_suggested_cutoffs(self) -> bool:
        """True when a cutoff is below the family's suggestion for these elements."""
        if self.suggested_cutoffs is None:
            return False
        wfc, rho = self.cutoffs
        return wfc < self.suggested_cutoffs[0] - 1e-9 or rho < self.suggested_cutoffs[1] - 1e-9

    def write(self, directory: Path | str, filename: str = INPUT_FILE) -> Path:
        """Write the input with ASE's ``write_espresso_in``; returns its path."""
        from ase.io.espresso import write_espresso_in

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atoms = AseAtomsAdaptor.get_atoms(self.structure)
        # The preset alone decides spin: a structure's own ``magmom`` site property (a CHGNet
        # relaxation leaves one) would otherwise make ASE write nspin = 2 and split the species.
        atoms.set_initial_magnetic_moments(self.magmoms)
        path = directory / filename
        with path.open("w") as fh:
            write_espresso_in(
                fh,
                atoms,
                input_data=copy.deepcopy(self.input_data),
                pseudopotentials=self.pseudopotentials,
                kpts=self.kpts,
                crystal_coordinates=True,
            )
        return path


def resolve_cutoffs(
    preset: Preset, family: PseudoFamily, elements: Iterable[str]
) -> tuple[float, float]:
    """``(ecutwfc, ecutrho)`` in Ry for a calculation on ``elements``.

    A preset's fixed cutoffs win; otherwise the maximum of the family's suggestions over
    ``elements``. Element references use the compound's elements here, so a reference
    and its compound always share cutoffs.
    """
    suggested = family.cutoffs_for_elements(elements)
    return (
        preset.ecutwfc if preset.ecutwfc is not None else suggested[0],
        preset.ecutrho if preset.ecutrho is not None else suggested[1],
    )


def build_pw_input(
    structure: Structure,
    preset: Preset,
    family: PseudoFamily,
    *,
    prefix: str = "pwscf",
    cutoff_elements: Iterable[str] | None = None,
) -> PwInput:
    """The pw.x input for ``structure``: preset values, family cutoffs, k-grid and spin.

    Raises
    ------
    UserError
        The family lacks an element of the structure (pw.x is never started).

    ``cutoff_elements`` (default: the structure's) are the elements whose suggested
    cutoffs set ``ecutwfc``/``ecutrho``: an element reference passes its compound's.
    """
    pseudopotentials = family.pseudopotentials_for(structure)
    own = [el.symbol for el in structure.composition.elements]
    elements = sorted(set(own) | set(cutoff_elements or []))
    ecutwfc, ecutrho = resolve_cutoffs(preset, family, elements)
    data = {section: dict(preset.input_data.get(section, {})) for section in NAMELISTS}
    for section, values in preset.input_data.items():
        data.setdefault(section, dict(values))
    # pw.x runs in the job's folder: a relative pseudo_dir would be read from there.
    pseudo_dir = Path(family.pseudo_dir).absolute() if family.pseudo_dir is not None else None
    data["control"].update({"pseudo_dir": str(pseudo_dir), "outdir": "./out", "prefix": prefix})
    data["system"]["ecutwfc"] = ecutwfc
    data["system"]["ecutrho"] = ecutrho
    magmoms = None
    if is_spin_polarized(structure, preset):
        data["system"]["nspin"] = 2
        # An antiferromagnetic trial (dft/magnetism.py) signs the moments with the ``spin`` property.
        spins = structure.site_properties.get("spin") or [1] * len(structure)
        magmoms = [
            preset.starting_magnetization * (-1.0 if spin < 0 else 1.0)
            if site.specie.symbol in MAGNETIC_ELEMENTS
            else 0.0
            for site, spin in zip(structure, spins, strict=True)
        ]
        if not any(magmoms):
            magmoms = [preset.starting_magnetization] * len(structure)
    if data["control"].get("calculation") in {"scf", "nscf"}:
        data.pop("ions", None)
        data.pop("cell", None)
    elif data["control"].get("calculation") == "relax":
        data.pop("cell", None)
    return PwInput(
        structure=structure.copy(),
        input_data={k: v for k, v in data.items() if v},
        pseudopotentials=pseudopotentials,
        kpts=kpoint_grid(structure, preset.kpoint_density),
        magmoms=magmoms,
        preset=preset.label,
        pseudo_md5=family.md5s_for(structure),
        suggested_cutoffs=family.cutoffs_for(structure),
    )
