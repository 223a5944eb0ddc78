"""Fitted anion corrections: PBE's overbinding of O2 and F2, removed from formation energies.

PBE binds the O2 and F2 molecules too strongly, so oxides and fluorides come out less stable
than experiment against them. As in the Materials Project's scheme, each anion X gets one
constant ``c_X`` (eV per X atom), fitted for one pseudopotential family and preset against
experimental formation enthalpies of binary compounds::

    E_f(corrected) = E_f(raw) + c_X * n_X / N

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

FITS_FILE = "anion_corrections.yaml"
#: Anions a fit may correct.
FITTED_ANIONS = ("O", "F", "N")


@dataclass(frozen=True)
class AnionCorrection:
    """Per-anion constants (eV per anion atom) for one family and preset.

    Parameters
    ----------
    label
        Stored with every corrected energy, e.g. ``anion-fit:local-pbe/demo@1``.
    values
        Anion -> eV per anion atom.
    md5
        Anion -> md5 of the pseudopotential the fit used; a family with another file gets none.
    """

    label: str
    values: dict[str, float]
    md5: dict[str, str] = field(default_factory=dict)

    def anions(self, composition: Composition | str) -> list[str]:
        """The corrected anions of ``composition`` (none for an element)."""
        comp = Composition(composition)
        elements = [el for el in comp.elements]
        if len(elements) < 2:
            return []
        least = min(el.X for el in elements)
        return sorted(el.symbol for el in elements if el.symbol in self.values and el.X > least)

    def per_atom(self, composition: Composition | str) -> float:
        """The shift of the formation energy, eV/atom (0 when no anion applies)."""
        comp = Composition(composition)
        return sum(self.values[x] * comp[x] for x in self.anions(comp)) / comp.num_atoms

    def correct(self, composition: Composition | str, formation_energy_per_atom: float) -> float:
        """The corrected formation energy, eV/atom."""
        return formation_energy_per_atom + self.per_atom(composition)


NO_CORRECTION = AnionCorrection(label="none", values={})


@dataclass
class AnionFit:
    """A least-squares fit of the per-anion constants, with its residuals and leave-one-out errors."""

    values: dict[str, float]
    rows: list[dict[str, Any]]
    loo_mae: float | None

    @property
    def mae(self) -> float:
        """Mean absolute residual of the fitted compounds, eV/atom."""
        return float(np.mean([abs(r["residual"]) for r in self.rows])) if self.rows else float("nan")


def _solve(data: Sequence[tuple[Composition, float, float]], anions: Sequence[str]) -> dict[str, float]:
    """Least squares for ``exp - raw = sum_X c_X x_X`` over ``data`` (composition, raw, exp)."""
    design = np.array([[comp.get_atomic_fraction(Element(x)) for x in anions] for comp, _, _ in data])
    target = np.array([exp - raw for _, raw, exp in data])
    solution, *_ = np.linalg.lstsq(design, target, rcond=None)
    return {x: float(c) for x, c in zip(anions, solution, strict=True)}


def fit_anion_corrections(
    data: Iterable[tuple[str, float, float]], anions: Sequence[str] = FITTED_ANIONS
) -> AnionFit:
    """Fit ``c_X`` to ``(formula, raw E_f, experimental E_f)`` rows (eV/atom).

    Only anions that appear (as the anion) in at least one row are fitted. The leave-one-out
    error refits without each compound in turn and predicts it; a compound whose anion then
    has no other data is left out of it.
    """
    probe = AnionCorrection("probe", dict.fromkeys(anions, 0.0))
    rows = [(Composition(f), float(raw), float(exp)) for f, raw, exp in data]
    rows = [r for r in rows if probe.anions(r[0])]
    present = sorted({x for comp, _, _ in rows for x in probe.anions(comp)})
    if not rows:
        return AnionFit({}, [], None)
    values = _solve(rows, present)
    fitted = AnionCorrection("fit", values)
    out, loo = [], []
    for k, (comp, raw, exp) in enumerate(rows):
        rest = rows[:k] + rows[k + 1 :]
        own = probe.anions(comp)
        others = {x for c, _, _ in rest for x in probe.anions(c)}
        predicted = None
        if set(own) <= others:
            used = sorted(others)
            held = AnionCorrection("loo", _solve(rest, used))
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
    return AnionFit(values, out, float(np.mean(loo)) if loo else None)


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
            )
    return None
