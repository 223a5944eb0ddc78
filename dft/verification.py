"""Verification of a pseudopotential family against all-electron PBE references.

Two checks per element, both against the ACWF all-electron data in
``data/acwf_fleur_unaries.yaml`` (Bosoni et al., Nat. Rev. Phys. 2024):

- **Structural energy**: the energy difference, eV/atom, between the element's
  ACWF ground-state prototype and one polymorph (bcc - fcc for fcc metals), each
  at its all-electron equilibrium volume. Cheap (two SCF runs) and what exposed
  the ld1.x Pd file.
- **Equation of state**: seven or more SCF energies from -6 % to +6 % around the
  all-electron V0, a Birch-Murnaghan fit, and ACWF's ν and ε metrics plus V0 and B0.

Runs are non-spin-polarised, as in the ACWF set. The verdict per element is
``verified`` (every number within the thresholds below), ``marginal`` (within twice
those) or ``failed``; it is written into the family YAML.

The thresholds ask what formation energies need, not code-to-code agreement:
ACWF's own "good" class (ν ≤ 0.33, ε ≤ 0.20) compares converged all-electron
codes with each other, and is reported next to the verdict. Here ν ≤ 1.0 keeps
V0 within about 1 % (lattice 0.3 %), ε ≤ 0.40 keeps the whole curve close, and
the structural energy within 30 meV/atom keeps non-ground-state environments
from being penalised (the bug that put CuPd above its elements).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Any, Literal

import numpy as np
import yaml
from pymatgen.core import Lattice, Structure

from crystaloop.dft.pseudos import SAFE_LOADER, PseudoFamily
from crystaloop.errors import UserError

Verdict = Literal["verified", "marginal", "failed", "unverified"]
#: Verdict thresholds (see the module docstring): ε (dimensionless) and ν.
EPSILON_GOOD = 0.40
NU_GOOD = 1.0
#: ACWF's "good agreement" class between all-electron codes (Bosoni et al. 2024), for reference.
ACWF_EPSILON_GOOD = 0.20
ACWF_NU_GOOD = 0.33
#: Structural energy difference tolerance, eV/atom: the spread of PBE codes on bcc-fcc.
STRUCTURAL_GOOD_EV = 0.030
#: ν weights of B0 and B1 relative to V0 (ACWF).
NU_WEIGHT_B0 = 1.0 / 20.0
NU_WEIGHT_B1 = 1.0 / 400.0
EV_PER_A3_TO_GPA = 160.21766208
#: Volume scan: ``EOS_POINTS`` volumes evenly spaced over V0 * (1 -/+ ``EOS_SPAN``).
EOS_POINTS = 7
EOS_SPAN = 0.06
#: The preset the checks use, made non-magnetic as in the ACWF protocol.
VERIFY_PRESET = "standard"
VERIFY_OVERRIDES: dict[str, Any] = {"spin_polarization": "off"}


@dataclass(frozen=True)
class EOSReference:
    """An all-electron Birch-Murnaghan fit (per simulation cell)."""

    prototype: str
    e0: float  # eV per cell
    v0: float  # Å^3 per cell
    b0: float  # eV/Å^3
    b1: float
    natoms: int

    @property
    def e0_per_atom(self) -> float:
        """Equilibrium energy, eV/atom."""
        return self.e0 / self.natoms


@dataclass(frozen=True)
class ElementReferenceData:
    """The element's ground-state prototype and the polymorph of its structural check."""

    element: str
    verify: EOSReference
    polymorph: EOSReference

    @property
    def structural_energy(self) -> float:
        """All-electron E(polymorph) - E(verify), eV/atom."""
        return self.polymorph.e0_per_atom - self.verify.e0_per_atom


def acwf_references() -> dict[str, ElementReferenceData]:
    """The shipped all-electron references, by element."""
    text = (resources.files("crystaloop.dft") / "data" / "acwf_fleur_unaries.yaml").read_text()
    data = yaml.load(text, Loader=SAFE_LOADER)
    eos = data["eos"]

    def ref(element: str, prototype: str) -> EOSReference:
        row = eos[f"{element}-X/{prototype}"]
        return EOSReference(prototype, row["E0"], row["V0"], row["B0"], row["B1"], row["natoms"])

    return {
        element: ElementReferenceData(element, ref(element, spec["verify"]), ref(element, spec["polymorph"]))
        for element, spec in data["elements"].items()
    }


def acwf_source() -> str:
    """Where the shipped all-electron numbers come from."""
    text = (resources.files("crystaloop.dft") / "data" / "acwf_fleur_unaries.yaml").read_text()
    return yaml.load(text, Loader=SAFE_LOADER)["source"]


def prototype_structure(element: str, prototype: str, volume: float) -> Structure:
    """The ACWF primitive cell of ``prototype`` (FCC, BCC, SC, Diamond) with cell volume ``volume`` Å^3."""
    if prototype == "SC":
        return Structure(Lattice.cubic(volume ** (1 / 3)), [element], [[0, 0, 0]])
    if prototype == "BCC":
        a = (2 * volume) ** (1 / 3)
        h = a / 2
        return Structure(Lattice([[-h, h, h], [h, -h, h], [h, h, -h]]), [element], [[0, 0, 0]])
    a = (4 * volume) ** (1 / 3)
    fcc = Lattice([[0, a / 2, a / 2], [a / 2, 0, a / 2], [a / 2, a / 2, 0]])
    if prototype == "FCC":
        return Structure(fcc, [element], [[0, 0, 0]])
    if prototype == "Diamond":
        return Structure(fcc, [element] * 2, [[0, 0, 0], [0.25, 0.25, 0.25]])
    raise ValueError(f"unknown prototype {prototype}")


def eos_volumes(v0: float, points: int = EOS_POINTS, span: float = EOS_SPAN) -> list[float]:
    """``points`` cell volumes (Å^3) evenly spaced over ``v0 * (1 - span) ... v0 * (1 + span)``."""
    return [float(v) for v in np.linspace(v0 * (1 - span), v0 * (1 + span), points)]


def birch_murnaghan(volume, e0: float, v0: float, b0: float, b1: float):
    """Birch-Murnaghan energy (eV) at ``volume`` (Å^3) for B0 in eV/Å^3."""
    r = (v0 / np.asarray(volume, dtype=float)) ** (2.0 / 3.0)
    return e0 + 9.0 / 16.0 * b0 * v0 * ((r - 1.0) ** 3 * b1 + (r - 1.0) ** 2 * (6.0 - 4.0 * r))


def fit_birch_murnaghan(volumes: Sequence[float], energies: Sequence[float]) -> tuple[float, float, float, float]:
    """``(E0 eV, V0 Å^3, B0 eV/Å^3, B1)`` of a Birch-Murnaghan fit (cubic in V^(-2/3)).

    Raises
    ------
    ValueError
        The energies have no minimum inside the scanned range.
    """
    v = np.asarray(volumes, dtype=float)
    x = v ** (-2.0 / 3.0)
    coeffs = np.polyfit(x, np.asarray(energies, dtype=float), 3)
    d1 = np.polyder(coeffs, 1)
    roots = [r.real for r in np.roots(d1) if abs(r.imag) < 1e-12 and r.real > 0]
    d2 = np.polyder(coeffs, 2)
    minima = [r for r in roots if np.polyval(d2, r) > 0]
    if not minima:
        raise ValueError("no energy minimum in the scanned volumes")
    x0 = min(minima, key=lambda r: abs(r - x.mean()))
    v0 = x0 ** (-1.5)
    e0 = float(np.polyval(coeffs, x0))
    # B0 = V d2E/dV2 and B1 from the third derivative, in terms of x = V^(-2/3).
    dx = -2.0 / 3.0 * v0 ** (-5.0 / 3.0)
    d2x = 10.0 / 9.0 * v0 ** (-8.0 / 3.0)
    d3x = -80.0 / 27.0 * v0 ** (-11.0 / 3.0)
    e1, e2, e3 = (np.polyval(np.polyder(coeffs, k), x0) for k in (1, 2, 3))
    d2e = e2 * dx**2 + e1 * d2x
    d3e = e3 * dx**3 + 3 * e2 * dx * d2x + e1 * d3x
    b0 = v0 * d2e
    b1 = -1.0 - v0 * d3e / d2e
    return e0, float(v0), float(b0), float(b1)


def nu_metric(test: tuple[float, float, float], ref: tuple[float, float, float]) -> float:
    """ACWF ν: 100 x the weighted length of the relative errors of (V0, B0, B1)."""
    rel = [2 * (a - b) / (a + b) for a, b in zip(test, ref, strict=True)]
    return 100.0 * math.sqrt(rel[0] ** 2 + (NU_WEIGHT_B0 * rel[1]) ** 2 + (NU_WEIGHT_B1 * rel[2]) ** 2)


def epsilon_metric(test: tuple[float, float, float], ref: tuple[float, float, float]) -> float:
    """ACWF ε: RMS difference of two EOS over ±6 % of their mean V0, relative to their spread.

    Each tuple is ``(V0 Å^3, B0 eV/Å^3, B1)``; both curves have their minimum at zero energy.
    """
    v_mid = (test[0] + ref[0]) / 2
    grid = np.linspace(0.94 * v_mid, 1.06 * v_mid, 2001)
    e_test = birch_murnaghan(grid, 0.0, *test)
    e_ref = birch_murnaghan(grid, 0.0, *ref)
    num = np.mean((e_test - e_ref) ** 2)
    den = math.sqrt(np.mean((e_test - e_test.mean()) ** 2) * np.mean((e_ref - e_ref.mean()) ** 2))
    return math.sqrt(num / den)


@dataclass
class ElementVerification:
    """Numbers and verdict of one element."""

    element: str
    prototype: str
    polymorph: str
    structural_energy: float | None = None  # eV/atom, this family
    structural_energy_ae: float | None = None  # eV/atom, all-electron
    volumes: list[float] = field(default_factory=list)  # Å^3/atom
    energies: list[float] = field(default_factory=list)  # eV/atom
    v0: float | None = None  # Å^3/atom
    b0_gpa: float | None = None
    b1: float | None = None
    v0_ae: float | None = None
    b0_ae_gpa: float | None = None
    b1_ae: float | None = None
    nu: float | None = None
    epsilon: float | None = None
    ecutwfc: float | None = None
    ecutrho: float | None = None
    reasons: list[str] = field(default_factory=list)
    eos_checked: bool = False  # the EOS was attempted (False for --no-eos)

    @property
    def structural_error(self) -> float | None:
        """This family's structural energy minus the all-electron one, eV/atom."""
        if self.structural_energy is None or self.structural_energy_ae is None:
            return None
        return self.structural_energy - self.structural_energy_ae

    @property
    def verdict(self) -> Verdict:
        """verified / marginal / failed from the structural error, ν and ε."""
        if self.reasons and self.structural_error is None and self.nu is None:
            return "failed"
        ratios = []
        if self.structural_error is not None:
            ratios.append(abs(self.structural_error) / STRUCTURAL_GOOD_EV)
        if self.nu is not None:
            ratios.append(self.nu / NU_GOOD)
        if self.epsilon is not None:
            ratios.append(self.epsilon / EPSILON_GOOD)
        if not ratios:
            return "unverified"
        worst = max(ratios)
        if worst <= 1.0 and not self.reasons:
            return "verified"
        return "marginal" if worst <= 2.0 else "failed"

    def summary(self) -> dict[str, Any]:
        """The numbers stored with the verdict in the family YAML (rounded)."""

        def r(x, n=4):
            return None if x is None else round(float(x), n)

        out = {
            "verdict": self.verdict,
            "structure": self.prototype,
            "structural_check": f"{self.polymorph} - {self.prototype}",
            "structural_energy_ev": r(self.structural_energy),
            "structural_energy_ae_ev": r(self.structural_energy_ae),
            "nu": r(self.nu, 3),
            "epsilon": r(self.epsilon, 3),
            "acwf_good": None
            if self.nu is None or self.epsilon is None
            else bool(self.nu <= ACWF_NU_GOOD and self.epsilon <= ACWF_EPSILON_GOOD),
            "v0_a3": r(self.v0),
            "v0_ae_a3": r(self.v0_ae),
            "b0_gpa": r(self.b0_gpa, 1),
            "b0_ae_gpa": r(self.b0_ae_gpa, 1),
            "ecutwfc_ry": self.ecutwfc,
            "ecutrho_ry": self.ecutrho,
            "reference": "ACWF FLEUR all-electron (Bosoni et al. 2024)",
        }
        if self.reasons:
            out["reasons"] = list(self.reasons)
        return {k: v for k, v in out.items() if v is not None}


#: ``energy_fn(structure) -> total energy in eV`` (a pw.x SCF, or a replay in tests).
EnergyFn = Callable[[Structure], float]


def verify_element(
    element: str,
    energy_fn: EnergyFn,
    *,
    eos: bool = True,
    points: int = EOS_POINTS,
    span: float = EOS_SPAN,
    references: dict[str, ElementReferenceData] | None = None,
) -> ElementVerification:
    """Run the structural-energy check and (``eos``) the EOS check of ``element``.

    Raises
    ------
    UserError
        No all-electron reference for the element, or fewer than 7 volumes / a span under 6 %.
    """
    references = references or acwf_references()
    if element not in references:
        raise UserError(
            f"no all-electron reference for {element} in the shipped ACWF data; "
            f"verifiable elements: {' '.join(references)}"
        )
    if eos and (points < EOS_POINTS or span < EOS_SPAN):
        raise UserError(f"the EOS needs at least {EOS_POINTS} volumes over ±{EOS_SPAN:.0%}; raise --points/--span")
    ref = references[element]
    result = ElementVerification(
        element=element,
        prototype=ref.verify.prototype,
        polymorph=ref.polymorph.prototype,
        structural_energy_ae=ref.structural_energy,
        v0_ae=ref.verify.v0 / ref.verify.natoms,
        b0_ae_gpa=ref.verify.b0 * EV_PER_A3_TO_GPA,
        b1_ae=ref.verify.b1,
    )
    try:
        e_ground = energy_fn(prototype_structure(element, ref.verify.prototype, ref.verify.v0))
        e_poly = energy_fn(prototype_structure(element, ref.polymorph.prototype, ref.polymorph.v0))
        result.structural_energy = e_poly / ref.polymorph.natoms - e_ground / ref.verify.natoms
    except RuntimeError as exc:
        result.reasons.append(f"structural check: {exc}")
    if not eos:
        return result
    result.eos_checked = True
    n = ref.verify.natoms
    for volume in eos_volumes(ref.verify.v0, points, span):
        try:
            energy = energy_fn(prototype_structure(element, ref.verify.prototype, volume))
        except RuntimeError as exc:
            result.reasons.append(f"EOS at {volume / n:.3f} Å^3/atom: {exc}")
            continue
        result.volumes.append(volume / n)
        result.energies.append(energy / n)
    if len(result.volumes) >= 5:
        try:
            _, v0, b0, b1 = fit_birch_murnaghan(result.volumes, result.energies)
        except ValueError as exc:
            result.reasons.append(f"EOS fit: {exc}")
        else:
            result.v0, result.b0_gpa, result.b1 = v0, b0 * EV_PER_A3_TO_GPA, b1
            test = (v0, b0, b1)
            ae = (ref.verify.v0 / n, ref.verify.b0, ref.verify.b1)
            result.nu = nu_metric(test, ae)
            result.epsilon = epsilon_metric(test, ae)
    return result


def pwx_energy_fn(
    family: PseudoFamily, *, preset: str = VERIFY_PRESET, overrides: dict[str, Any] | None = None,
    pw_command: str | None = None,
) -> EnergyFn:
    """An ``energy_fn`` that runs one pw.x SCF per structure (non-magnetic, unrecorded)."""
    from crystaloop.dft.espresso.inputs import deep_merge
    from crystaloop.dft.espresso.jobs import QEStaticMaker, run_espresso_task

    merged = deep_merge(VERIFY_OVERRIDES, overrides or {})
    maker = QEStaticMaker(
        name="qe verify", preset=preset, overrides=merged, record=False, pw_command=pw_command
    )

    def energy(structure: Structure) -> float:
        doc = run_espresso_task(maker, structure, calculation="scf", family=family)
        if not doc.successful or doc.energy is None:
            raise RuntimeError("; ".join(doc.reasons) or "pw.x failed")
        return float(doc.energy)

    return energy


#: Verdicts from best to worst.
VERDICT_RANK: tuple[Verdict, ...] = ("verified", "marginal", "failed")
#: Keys of a stored ``verification`` block that the structural check alone sets.
_STRUCTURAL_KEYS = ("structure", "structural_check", "structural_energy_ev", "structural_energy_ae_ev")


def merged_verification(
    result: ElementVerification, stored_verdict: str = "unverified", stored: Mapping[str, Any] | None = None
) -> tuple[Verdict, dict[str, Any]]:
    """``(verdict, numbers)`` to store for ``result`` over an entry's stored verdict and numbers.

    A run with the EOS replaces what was stored. A structural check alone (``--no-eos``)
    updates the structural numbers and keeps the stored EOS numbers and reasons; its verdict
    combines the new structural error with the stored ν and ε and is never better than the
    stored verdict, which may rest on an EOS this run did not repeat.
    """
    if result.eos_checked:
        return result.verdict, result.summary()
    block = dict(stored or {})
    for key in (*_STRUCTURAL_KEYS, "reasons"):
        block.pop(key, None)
    kept_reasons = [r for r in (stored or {}).get("reasons", []) if not r.startswith("structural check")]
    combined = replace(
        result, nu=block.get("nu"), epsilon=block.get("epsilon"), reasons=[*result.reasons, *kept_reasons]
    )
    verdict = combined.verdict
    if stored_verdict in VERDICT_RANK and (
        verdict not in VERDICT_RANK or VERDICT_RANK.index(stored_verdict) > VERDICT_RANK.index(verdict)
    ):
        verdict = stored_verdict
    new = result.summary()
    block.update({k: v for k, v in new.items() if k != "reasons"})
    if combined.reasons:
        block["reasons"] = combined.reasons
    block["verdict"] = verdict
    return verdict, block


def write_verdicts(family_path, results: Sequence[ElementVerification]) -> None:
    """Store each result's verdict and numbers in the family YAML (other entries untouched).

    A result without the EOS is merged into the stored numbers (see :func:`merged_verification`).
    """
    from pathlib import Path

    path = Path(family_path)
    data = yaml.load(path.read_text(), Loader=SAFE_LOADER)
    for result in results:
        entry = data["pseudopotentials"].get(result.element)
        if entry is None:
            continue
        entry["verdict"], entry["verification"] = merged_verification(
            result, entry.get("verdict", "unverified"), entry.get("verification")
        )
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def result_row(result: ElementVerification, verdict: str | None = None) -> dict[str, Any]:
    """One element's numbers as a flat dict (for tables and JSON); ``verdict`` replaces the result's."""
    error = result.structural_error
    return {
        "element": result.element,
        "structure": result.prototype,
        "check": f"{result.polymorph}-{result.prototype}",
        "dE_ev": result.structural_energy,
        "dE_ae_ev": result.structural_energy_ae,
        "dE_error_mev": None if error is None else 1000 * error,
        "v0_a3": result.v0,
        "v0_ae_a3": result.v0_ae,
        "b0_gpa": result.b0_gpa,
        "b0_ae_gpa": result.b0_ae_gpa,
        "nu": result.nu,
        "epsilon": result.epsilon,
        "volumes_a3": result.volumes,
        "energies_ev": result.energies,
        "verdict": verdict or result.verdict,
        "reasons": result.reasons,
    }


def campaign_dft_problems(
    elements: Sequence[str],
    *,
    preset: str,
    family: PseudoFamily | None = None,
    allow_unverified: bool = False,
    override_hint: str = "--allow-unverified",
) -> tuple[list[str], list[str]]:
    """``(warnings, refusals)`` for a campaign over ``elements`` with ``preset``: one line each.

    Warns when the preset fixes cutoffs below the family's suggestion for an element (its
    results are then not converged; 'fast' at 25/200 Ry collapses NiO by 21 %). Refuses the
    elements the family lacks, and those whose verdict is not ``verified`` unless
    ``allow_unverified`` (then they are a warning); the refusal names ``override_hint``.

    Raises
    ------
    UserError
        Unknown preset, or no family configured.
    """
    from crystaloop.dft.espresso.inputs import load_preset
    from crystaloop.dft.pseudos import family_from_settings

    family = family or family_from_settings()
    loaded = load_preset(preset)
    wanted = sorted({str(e) for e in elements})
    warnings: list[str] = []
    refusals: list[str] = []
    missing = family.missing(wanted)
    if missing:
        refusals.append(
            f"family '{family.name}' has no pseudopotential for {', '.join(missing)}; "
            f"drop them from the campaign or add files to the family (it covers {' '.join(family.elements)})"
        )
    present = [e for e in wanted if e not in missing]
    low = []
    for element in present:
        entry = family.pseudopotentials[element]
        wfc = loaded.ecutwfc if loaded.ecutwfc is not None else entry.ecutwfc
        rho = loaded.ecutrho if loaded.ecutrho is not None else entry.ecutrho
        if wfc < entry.ecutwfc or rho < entry.ecutrho:
            low.append(f"{element} ({entry.ecutwfc:g}/{entry.ecutrho:g})")
    if low:
        warnings.append(
            f"preset '{loaded.name}' sets cutoffs {loaded.ecutwfc:g}/{loaded.ecutrho:g} Ry, below the "
            f"family's suggestion for {', '.join(low)} Ry; their energies are not converged: use "
            "--preset demo or standard"
        )
    unverified = [e for e in present if family.verdict(e) != "verified"]
    if unverified:
        named = ", ".join(f"{e} ({family.verdict(e)})" for e in unverified)
        if allow_unverified:
            warnings.append(
                f"elements not verified against all-electron PBE in family '{family.name}': {named}; "
                "their formation energies may be wrong (allowed by the override)"
            )
        else:
            refusals.append(
                f"elements not verified against all-electron PBE in family '{family.name}': {named}; "
                f"drop them, run 'crystaloop dft pseudos verify', or allow them with {override_hint}"
            )
    return warnings, refusals
