"""Fitted formation-energy corrections: PBE's overbinding of O2, F2 and N2, and its delocalised
d states in transition-metal oxides and fluorides, removed from formation energies.

PBE binds the O2, F2 and N2 molecules too strongly, so oxides, fluorides and nitrides come out
less stable than experiment against them. As in the Materials Project's scheme, each anion X
gets one constant ``c_X`` (eV per X atom), fitted for one pseudopotential family and preset
against experimental formation enthalpies of binary compounds. Plain PBE (no +U) also spreads
the localised 3d electrons of Fe, Ni, Cr, ... over their oxygen or fluorine neighbours and
underbinds their oxides and fluorides a second time; each such metal M gets a constant ``c_M``
(eV per M atom) that applies only in a compound holding a corrected O or F::

    E_f(corrected) = E_f(raw) + sum_X c_X * n_X / N + sum_M c_M * n_M / N

``c_X`` applies to X in a compound where X is more electronegative than some other element
(an oxide's O, not the O of OF2). Elements and their references are never corrected, so a
hull whose phases all pass through :meth:`AnionCorrection.correct` is consistent.

The shipped fits live in ``data/anion_corrections.yaml`` with their data, residuals and
leave-one-out errors; ``crystaloop bench oracle --fit`` writes them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pymatgen.core import Composition, Element

from crystaloop.dft.pseudos import SAFE_LOADER
from crystaloop.errors import UserError

FITS_FILE = "anion_corrections.yaml"
#: Anions a fit may correct.
FITTED_ANIONS = ("O", "F", "N")
#: Metals whose oxides and fluorides a fit may correct (the Materials Project's +U set).
FITTED_METALS = ("V", "Cr", "Mn", "Fe", "Co", "Ni", "Mo", "W")
#: The anions in whose compounds the metal constants apply.
METAL_ANIONS = ("O", "F")


@dataclass(frozen=True)
class AnionCorrection:
    """Per-anion and per-metal constants for one family and preset.

    Parameters
    ----------
    label
        Stored with every corrected energy, e.g. ``anion-fit:local-pbe/demo@1``.
    values
        Anion -> eV per anion atom.
    md5
        Element -> md5 of the pseudopotential the fit used; a family with another file gets none.
    metals
        Metal -> eV per metal atom, applied in compounds with a corrected O or F.
    """

    label: str
    values: dict[str, float]
    md5: dict[str, str] = field(default_factory=dict)
    metals: dict[str, float] = field(default_factory=dict)

    def anions(self, composition: Composition | str) -> list[str]:
        """The corrected anions of ``composition`` (none for an element)."""
        comp = Composition(composition)
        elements = [el for el in comp.elements]
        if len(elements) < 2:
            return []
        least = min(el.X for el in elements)
        return sorted(el.symbol for el in elements if el.symbol in self.values and el.X > least)

    def corrected_metals(self, composition: Composition | str) -> list[str]:
        """The corrected metals of ``composition``: those with a constant, beside a corrected O or F."""
        comp = Composition(composition)
        if not set(self.anions(comp)) & set(METAL_ANIONS):
            return []
        return sorted(el.symbol for el in comp.elements if el.symbol in self.metals)

    def terms(self, composition: Composition | str) -> dict[str, float]:
        """Each applied constant's share of the shift, eV/atom."""
        comp = Composition(composition)
        shift = {x: self.values[x] * comp[x] / comp.num_atoms for x in self.anions(comp)}
        shift |= {m: self.metals[m] * comp[m] / comp.num_atoms for m in self.corrected_metals(comp)}
        return shift

    def per_atom(self, composition: Composition | str) -> float:
        """The shift of the formation energy, eV/atom (0 when no constant applies)."""
        return sum(self.terms(composition).values())

    def correct(self, composition: Composition | str, formation_energy_per_atom: float) -> float:
        """The corrected formation energy, eV/atom."""
        return formation_energy_per_atom + self.per_atom(composition)


NO_CORRECTION = AnionCorrection(label="none", values={})


@dataclass
class AnionFit:
    """A least-squares fit of the constants, with its residuals and leave-one-out errors."""

    values: dict[str, float]
    rows: list[dict[str, Any]]
    loo_mae: float | None
    metals: dict[str, float] = field(default_factory=dict)

    def correction(self, label: str = "fit") -> AnionCorrection:
        """The fitted constants as a correction."""
        return AnionCorrection(label, self.values, metals=self.metals)

    @property
    def mae(self) -> float:
        """Mean absolute residual of the fitted compounds, eV/atom."""
        return float(np.mean([abs(r["residual"]) for r in self.rows])) if self.rows else float("nan")


def _solve(
    data: Sequence[tuple[Composition, float, float]], params: Sequence[str], probe: AnionCorrection
) -> AnionCorrection | None:
    """Least squares for ``exp - raw = sum_p c_p x_p`` over ``data`` (composition, raw, exp).

    None when the data cannot separate the constants (fewer independent rows than constants).
    """
    design = np.array(
        [
            [float(p in probe.terms(comp)) * comp.get_atomic_fraction(Element(p)) for p in params]
            for comp, _, _ in data
        ]
    )
    target = np.array([exp - raw for _, raw, exp in data])
    solution, _, rank, _ = np.linalg.lstsq(design, target, rcond=None)
    if rank < len(params):
        return None
    fitted = dict(zip(params, (float(c) for c in solution), strict=True))
    return AnionCorrection(
        "fit",
        {p: c for p, c in fitted.items() if p in probe.values},
        metals={p: c for p, c in fitted.items() if p in probe.metals},
    )


def fit_anion_corrections(
    data: Iterable[tuple[str, float, float]],
    anions: Sequence[str] = FITTED_ANIONS,
    metals: Sequence[str] = FITTED_METALS,
) -> AnionFit:
    """Fit ``c_X`` and ``c_M`` to ``(formula, raw E_f, experimental E_f)`` rows (eV/atom).

    Only constants that apply to at least one row are fitted. The leave-one-out error refits
    without each compound in turn and predicts it; a compound with a constant that then has no
    other data (or whose refit the rest cannot determine) is left out of it. Raises
    :class:`~crystaloop.errors.UserError` when the rows cannot determine the constants.
    """
    probe = AnionCorrection("probe", dict.fromkeys(anions, 0.0), metals=dict.fromkeys(metals, 0.0))
    rows = [(Composition(f), float(raw), float(exp)) for f, raw, exp in data]
    rows = [r for r in rows if probe.terms(r[0])]
    if not rows:
        return AnionFit({}, [], None)
    present = sorted({p for comp, _, _ in rows for p in probe.terms(comp)})
    fitted = _solve(rows, present, probe)
    if fitted is None:
        raise UserError(
            f"the fit rows ({', '.join(c.reduced_formula for c, _, _ in rows)}) cannot separate the "
            f"constants of {', '.join(present)}; add compounds or fit fewer constants"
        )
    out, loo = [], []
    for k, (comp, raw, exp) in enumerate(rows):
        rest = rows[:k] + rows[k + 1 :]
        others = {p for c, _, _ in rest for p in probe.terms(c)}
        predicted = None
        held = _solve(rest, sorted(others), probe) if set(probe.terms(comp)) <= others else None
        if held is not None:
            predicted = held.correct(comp, raw)
            loo.append(abs(predicted - exp))
        corrected = fitted.correct(comp, raw)
        out.append(
            {
                "formula": comp.reduced_formula,
                "raw": raw,
                "corrected": corrected,
                "experiment": exp,
                "residual": corrected - exp,
                "loo_predicted": predicted,
                "loo_error": None if predicted is None else predicted - exp,
            }
        )
    return AnionFit(fitted.values, out, float(np.mean(loo)) if loo else None, metals=fitted.metals)


def load_fits(path: Path | None = None) -> list[dict[str, Any]]:
    """The shipped fits (or those in ``path``): a list of ``{family, preset, values, md5, ...}``."""
    text = path.read_text() if path else (resources.files("crystaloop.dft") / "data" / FITS_FILE).read_text()
    return list((yaml.load(text, Loader=SAFE_LOADER) or {}).get("fits") or [])


def correction_for(family, preset_label: str, path: Path | None = None) -> AnionCorrection | None:
    """The shipped fit for ``family`` (a PseudoFamily) and ``preset_label`` (``name@version``).

    None when no fit matches: another preset, or an anion whose file differs from the fit's.
    """
    for fit in load_fits(path):
        if fit["preset"] != preset_label:
            continue
        md5 = dict(fit.get("md5") or {})
        entries = family.pseudopotentials
        if all(x in entries and entries[x].md5 == h for x, h in md5.items()):
            return AnionCorrection(
                label=f"anion-fit:{fit['family']}/{preset_label}",
                values={x: float(v) for x, v in fit["values"].items()},
                md5=md5,
                metals={m: float(v) for m, v in (fit.get("metals") or {}).items()},
            )
    return None
