"""The DFT engines: what relaxes a crystal and what its results mean, behind one interface.

An :class:`Engine` hands out its Makers (a relaxation and an element reference, both
jobflow Makers) and answers the questions the rest of crystaloop used to ask by comparing
engine names: the settings that make two results comparable, whether a pseudopotential family
and pw.x are involved, which corrections apply. Two engines exist:

- ``espresso``: pw.x, :mod:`crystaloop.dft.espresso`.
- ``surrogate``: CHGNet, :mod:`crystaloop.dft.surrogate`; its results are labelled as such.

>>> get_engine("surrogate").dft
False
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from crystaloop.errors import UserError

if TYPE_CHECKING:  # the engines load their Makers only when asked: configs import this module
    from jobflow import Maker
    from pymatgen.core import Structure

    from crystaloop.dft.corrections import AnionCorrection


@dataclass(frozen=True)
class Engine(ABC):
    """One way of relaxing crystals and computing their energies.

    Attributes
    ----------
    name
        Recorded on every document the engine produces (``engine``).
    dft
        True for a DFT code on a pseudopotential family (pw.x): the family, its verification,
        magnetic orderings and the anion correction apply to it, and each campaign compares its
        results on a hull of its own. False for a machine-learned estimate, which is compared
        on the CHGNet hull and is never presented as DFT.
    source
        The ``source`` of the training structures it labels (``dft`` or ``surrogate``).
    portable_energies
        Its total energies (eV/atom) share a scale beyond its own settings, so a model may learn
        them; pw.x's depend on the pseudopotentials, and only energy differences are kept.
    properties
        What its relaxation yields: the properties a target window can be verified on.
    caveat
        One line printed under its results, or None.
    """

    name: str
    dft: bool
    source: str
    portable_energies: bool
    properties: tuple[str, ...]
    caveat: str | None = None

    @abstractmethod
    def relax_maker(
        self, preset: str = "fast", overrides: dict[str, Any] | None = None, *, pw_command: str | None = None
    ) -> Maker:
        """The Maker of a variable-cell relaxation with ``preset`` and ``overrides``."""

    @abstractmethod
    def reference_maker(
        self, preset: str = "fast", overrides: dict[str, Any] | None = None, *, pw_command: str | None = None
    ) -> Maker:
        """The Maker of an element reference (cached); ``make(element, structure, compound_elements)``."""

    def with_pw_command(self, maker: Maker, pw_command: str | None) -> Maker:
        """``maker`` running ``pw_command`` (a copy); unchanged when None or for an engine without pw.x."""
        return maker

    def with_orderings(self, overrides: dict[str, Any], orderings: Iterable[str] | None) -> dict[str, Any]:
        """``overrides`` asking for the magnetic ``orderings`` (``fm``, ``afm``), where the engine has them.

        Raises
        ------
        ValueError
            An unknown ordering.
        """
        return dict(overrides)

    @abstractmethod
    def preset_label(self, preset: str, overrides: dict[str, Any]) -> str:
        """The preset part of the DFT cache key (:func:`crystaloop.dft.cache.settings_key`)."""

    def pseudopotential_md5s(self, structure: Structure) -> dict[str, str]:
        """Element -> md5 of the pseudopotential each species of ``structure`` runs with."""
        return {}

    def reference_md5(self, element: str) -> str | None:
        """The md5 of the pseudopotential an element reference is cached under, or None."""
        return None

    @abstractmethod
    def code_version(self, pw_command: str | None = None) -> str:
        """The version string recorded in its task documents (``pw.x 6.7MaX``, ``chgnet 0.3.0``)."""

    def anion_correction(self, preset: str) -> AnionCorrection | None:
        """The shipped anion correction for ``preset`` and the configured family, or None.

        Raises
        ------
        UserError
            The configured pseudopotential family cannot be read.
        """
        return None

    def check(
        self,
        preset: str,
        *,
        structure: Structure | None = None,
        pw_command: str | None = None,
        pw_command_setting: str = "dft.pw_command",
    ) -> None:
        """Refuse in one line what cannot run: an unknown preset, a ``structure`` the family lacks,
        a ``pw_command`` (named ``pw_command_setting``) whose programs are not on PATH.

        Raises
        ------
        UserError
            One of the above.
        """
        return None


@dataclass(frozen=True)
class EspressoEngine(Engine):
    """pw.x (Quantum ESPRESSO), on the configured pseudopotential family."""

    name: str = "espresso"
    dft: bool = True
    source: str = "dft"
    portable_energies: bool = False
    properties: tuple[str, ...] = (
        "formation_energy_per_atom",
        "energy_per_atom",
        "band_gap",
        "energy_above_hull",
    )

    def relax_maker(self, preset="fast", overrides=None, *, pw_command=None) -> Maker:
        from crystaloop.dft.espresso.jobs import QERelaxMaker

        return QERelaxMaker(preset=preset, overrides=dict(overrides or {}), pw_command=pw_command)

    def reference_maker(self, preset="fast", overrides=None, *, pw_command=None) -> Maker:
        from crystaloop.dft.espresso.jobs import ElementReferenceMaker

        return ElementReferenceMaker(preset=preset, overrides=dict(overrides or {}), pw_command=pw_command)

    def with_pw_command(self, maker, pw_command):
        return replace(maker, pw_command=pw_command) if pw_command else maker

    def with_orderings(self, overrides, orderings):
        from crystaloop.dft.magnetism import check_orderings

        chosen = list(check_orderings(orderings or ["fm"]))
        if chosen == ["fm"] or overrides.get("magnetic_orderings") == chosen:
            return dict(overrides)
        return {**overrides, "magnetic_orderings": chosen}

    def preset_label(self, preset, overrides):
        from crystaloop.dft.espresso.jobs import preset_key

        return preset_key(preset, overrides)

    def pseudopotential_md5s(self, structure):
        from crystaloop.dft.pseudos import family_from_settings

        return family_from_settings().md5s_for(structure)

    def reference_md5(self, element):
        from crystaloop.dft.pseudos import family_from_settings

        entry = family_from_settings().pseudopotentials.get(element)
        return entry.md5 if entry is not None else None

    def code_version(self, pw_command=None):
        from crystaloop.dft.espresso.run import pw_version

        return pw_version(pw_command)

    def anion_correction(self, preset):
        from crystaloop.dft.corrections import correction_for
        from crystaloop.dft.espresso.inputs import load_preset
        from crystaloop.dft.pseudos import family_from_settings

        return correction_for(family_from_settings(), load_preset(preset).label)

    def check(self, preset, *, structure=None, pw_command=None, pw_command_setting="dft.pw_command"):
        from crystaloop.dft.espresso.inputs import load_preset

        load_preset(preset)
        if structure is not None:
            from crystaloop.dft.pseudos import family_from_settings

            family_from_settings().require(structure)
        if pw_command:
            from crystaloop.dft.espresso.run import require_executables

            require_executables(pw_command, pw_command_setting)


@dataclass(frozen=True)
class SurrogateEngine(Engine):
    """CHGNet (the bundled pretrained model): fast, offline, never DFT.

    Presets, overrides and pw.x commands are accepted and ignored, so that a campaign switches
    engines by name alone.
    """

    name: str = "surrogate"
    dft: bool = False
    source: str = "surrogate"
    portable_energies: bool = True
    properties: tuple[str, ...] = ("formation_energy_per_atom", "energy_per_atom", "energy_above_hull")
    caveat: str | None = "CHGNet estimate, not DFT."

    def relax_maker(self, preset="fast", overrides=None, *, pw_command=None) -> Maker:
        from crystaloop.dft.surrogate import SurrogateRelaxMaker

        return SurrogateRelaxMaker()

    def reference_maker(self, preset="fast", overrides=None, *, pw_command=None) -> Maker:
        from crystaloop.dft.surrogate import SurrogateElementReferenceMaker

        return SurrogateElementReferenceMaker()

    def preset_label(self, preset, overrides):
        from crystaloop.dft.surrogate import SURROGATE_PRESET

        return SURROGATE_PRESET

    def code_version(self, pw_command=None):
        import chgnet

        return f"chgnet {chgnet.__version__}"


#: The engines by name.
ENGINES: dict[str, Engine] = {engine.name: engine for engine in (EspressoEngine(), SurrogateEngine())}


def get_engine(name: str) -> Engine:
    """The engine called ``name``.

    Raises
    ------
    UserError
        No engine has that name.
    """
    try:
        return ENGINES[name]
    except (KeyError, TypeError):
        raise UserError(f"unknown engine '{name}'; choose {' or '.join(ENGINES)}") from None
