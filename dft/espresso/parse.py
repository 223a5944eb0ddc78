"""pw.x output parsing: ASE's reader plus the few fields it does not extract.

ASE's ``read_espresso_out`` gives structures, energies, forces, stress,
magnetic moments and eigenvalues. Version, wall time, convergence flags,
total magnetisation and error messages are read here because ASE skips them.
"""

from __future__ import annotations

import gzip
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pymatgen.core import Structure
from pymatgen.io.ase import AseAtomsAdaptor

EV_PER_A3_TO_GPA = 160.21766208
_VERSION = re.compile(r"Program PWSCF v\.?\s*(\S+)")
_WALL = re.compile(r"PWSCF\s*:.*CPU\s+(.*)WALL")
_TOTAL_MAG = re.compile(r"total magnetization\s*=\s*(-?[\d.]+)")
_ABS_MAG = re.compile(r"absolute magnetization\s*=\s*([\d.]+)")
_SCF_FAILED = "convergence NOT achieved"
_MAX_STEPS = "The maximum number of steps has been reached"
_RELAX_DONE = ("End of BFGS Geometry Optimization", "End final coordinates", "bfgs converged")
#: BFGS gave up. pw.x 6.7 prints the first on its own line, then "bfgs converged" anyway;
#: later versions print "...: exiting" and "bfgs failed after". WARNING lines (such as
#: "bfgs curvature condition failed") are not failures.
_RELAX_FAILED = re.compile(
    r"^\s*(?:bfgs )?(?:history already reset at previous step|bfgs failed after)", re.M
)
#: "A final scf ..." before pw.x 6.x, "Final scf ..." in 6.x.
_FINAL_SCF = re.compile(r"final scf calculation at the relaxed structure", re.I)


class PwOutputError(ValueError):
    """An output that cannot be read as a pw.x run; the message says why."""


@dataclass
class PwOutput:
    """What a pw.x output says. Energies in eV, forces eV/Å, stress GPa, times s.

    ``band_gap_by_spin`` (up, down) and ``is_half_metal`` are set for spin-polarised runs only.
    """

    path: Path
    version: str | None
    calculation: str | None
    job_done: bool
    scf_converged: bool
    relax_converged: bool | None
    max_steps_reached: bool
    n_ionic_steps: int
    initial_structure: Structure | None
    final_structure: Structure | None
    energy: float | None
    energies: list[float]
    forces: np.ndarray | None
    stress: np.ndarray | None
    total_magnetization: float | None
    band_gap: float | None
    is_metal: bool | None
    fermi_energy: float | None
    wall_time_s: float | None
    errors: list[str] = field(default_factory=list)
    band_gap_by_spin: list[float | None] | None = None
    is_half_metal: bool | None = None
    absolute_magnetization: float | None = None

    @property
    def successful(self) -> bool:
        """Finished, SCF converged and (for relaxations) the geometry converged."""
        return (
            self.job_done
            and self.scf_converged
            and self.relax_converged is not False
            and self.energy is not None
        )


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    return raw.decode("utf-8", errors="replace")


def parse_wall_time(text: str) -> float | None:
    """Seconds from pw.x's last ``PWSCF : ... WALL`` line (formats ``1h 2m``, ``3m 4.5s``)."""
    matches = _WALL.findall(text)
    if not matches:
        return None
    total = 0.0
    for value, unit in re.findall(r"([\d.]+)\s*([hms])", matches[-1]):
        total += float(value) * {"h": 3600.0, "m": 60.0, "s": 1.0}[unit]
    return total


def parse_errors(text: str) -> list[str]:
    """Messages of pw.x's ``%%%%`` error blocks (``Error in routine X (n): message``)."""
    errors = []
    for block in re.findall(r"%{20,}\n(.*?)\n\s*%{20,}", text, re.S):
        lines = [ln.strip() for ln in block.splitlines() if ln.strip()]
        if lines:
            errors.append(" ".join(lines))
    return errors


#: Levels within this of the Fermi level (eV) count as occupied (smearing leaves them fractional).
_FERMI_TOLERANCE = 1e-4
#: Gaps below this (eV) are reported as metallic.
_MIN_GAP = 1e-3


@dataclass(frozen=True)
class BandGap:
    """Band gap of a pw.x run, overall and per spin channel. Energies in eV.

    Follows pymatgen's ``BandStructure.get_band_gap``: the run is a metal when a band crosses
    the Fermi level in either channel; otherwise the VBM is the highest occupied level over both
    spins and the CBM the lowest empty level over both, so an insulator whose channels hold
    different numbers of occupied bands (any ferromagnetic insulator) gets a gap, not 0.

    Attributes
    ----------
    gap
        Overall gap; 0.0 for a metal; None when unknown (no empty bands, or no Fermi level).
    is_metal
        A band crosses the Fermi level in at least one channel; None when unknown.
    by_spin
        Spin-polarised runs only: the gap of each channel (up, down); 0.0 for a metallic
        channel, None for a channel with no occupied or no empty levels.
    """

    gap: float | None
    is_metal: bool | None
    by_spin: tuple[float | None, ...] | None = None

    @property
    def is_half_metal(self) -> bool | None:
        """One channel metallic, the other gapped; None for unpolarised or unknown runs."""
        if self.by_spin is None or len(self.by_spin) != 2 or None in self.by_spin:
            return None
        return sorted(g > 0.0 for g in self.by_spin) == [False, True]


UNKNOWN_GAP = BandGap(None, None)


def _channel_gap(eigs: list[np.ndarray], efermi: float) -> tuple[str, float | None, float | None]:
    """``(kind, vbm, cbm)`` of one spin channel; kind is metal, gapped or unknown."""
    below = [e[e <= efermi + _FERMI_TOLERANCE] for e in eigs]
    above = [e[e > efermi + _FERMI_TOLERANCE] for e in eigs]
    if len({len(b) for b in below}) > 1:  # the occupied count changes across k: a band crosses
        return "metal", None, None
    vbm = max((b.max() for b in below if len(b)), default=None)
    cbm = min((a.min() for a in above if len(a)), default=None)
    if any(len(a) == 0 for a in above):  # no empty bands: nothing to measure a gap to
        return "unknown", vbm, None
    if vbm is not None and cbm - vbm < _MIN_GAP:
        return "metal", None, None
    return "gapped", vbm, cbm


def band_gap_from(atoms) -> BandGap:
    """Overall and per-spin band gap from an ASE image's eigenvalues and Fermi level.

    ASE lists the k-points once per spin channel; each channel is judged on its own, then the
    extrema are combined over both (see :class:`BandGap`).
    """
    calc = atoms.calc
    kpts = getattr(calc, "kpts", None)
    if not kpts:
        return UNKNOWN_GAP
    try:
        efermi = calc.get_fermi_level()
    except Exception:  # the calculator raises when the level was not printed
        efermi = None
    if efermi is None:
        return UNKNOWN_GAP
    spins = sorted({k.s for k in kpts})
    channels = [
        _channel_gap([np.asarray(k.eps_n, dtype=float) for k in kpts if k.s == s], efermi) for s in spins
    ]
    by_spin = None
    if len(channels) == 2:
        by_spin = tuple(
            0.0 if kind == "metal" else float(cbm - vbm) if vbm is not None and cbm is not None else None
            for kind, vbm, cbm in channels
        )
    kinds = {kind for kind, _, _ in channels}
    if "metal" in kinds:
        return BandGap(0.0, True, by_spin)
    if "unknown" in kinds:
        return BandGap(None, None, by_spin)
    vbm = max((v for _, v, _ in channels if v is not None), default=None)
    cbm = min(c for _, _, c in channels)
    if vbm is None:  # no electrons at all
        return BandGap(None, None, by_spin)
    gap = float(cbm - vbm)
    if gap < _MIN_GAP:
        return BandGap(0.0, True, by_spin)
    return BandGap(gap, False, by_spin)


def parse_pw_output(path: Path | str, *, strict: bool = True) -> PwOutput:
    """Read a pw.x output file (plain or gzipped).

    With ``strict=False`` an output ASE cannot read still gives the flags read from the
    text (convergence, errors, wall time) with no structures or energies.

    Raises
    ------
    PwOutputError
        Not a pw.x output, or one with no readable configuration; the message names the cause.
    """
    path = Path(path)
    try:
        text = _read_text(path)
    except OSError as exc:
        raise PwOutputError(f"{path}: cannot read ({exc.strerror})") from None
    if "Program PWSCF" not in text:
        raise PwOutputError(f"{path}: not a pw.x output (no 'Program PWSCF' banner)")
    images = _ase_images(path, text, strict)
    version = _VERSION.search(text)
    calc_match = re.search(r"calculation\s*=\s*'([^']+)'", text)
    calculation = calc_match.group(1) if calc_match else None
    max_steps = _MAX_STEPS in text
    if max_steps or _RELAX_FAILED.search(text):
        relax_converged: bool | None = False
    elif any(marker in text for marker in _RELAX_DONE):
        relax_converged = True
    elif "Geometry Optimization" in text or "enthalpy new" in text:
        relax_converged = False
    else:
        relax_converged = None
    adaptor = AseAtomsAdaptor()
    with_energy = [a for a in images if a.calc is not None and a.calc.results.get("energy") is not None]
    last = with_energy[-1] if with_energy else None
    forces = stress = None
    gap = UNKNOWN_GAP
    fermi = None
    if last is not None:
        results = last.calc.results
        if results.get("forces") is not None:
            forces = np.asarray(results["forces"], dtype=float)
        if results.get("stress") is not None:
            from ase.stress import voigt_6_to_full_3x3_stress

            stress = voigt_6_to_full_3x3_stress(np.asarray(results["stress"])) * EV_PER_A3_TO_GPA
        gap = band_gap_from(last)
        try:
            fermi = last.calc.get_fermi_level()
        except Exception:  # not printed
            fermi = None
    mags = _TOTAL_MAG.findall(text)
    abs_mags = _ABS_MAG.findall(text)
    return PwOutput(
        path=path,
        version=version.group(1) if version else None,
        calculation=calculation,
        job_done="JOB DONE" in text,
        scf_converged=_SCF_FAILED not in text,
        relax_converged=relax_converged,
        max_steps_reached=max_steps,
        n_ionic_steps=len(with_energy) - (1 if _FINAL_SCF.search(text) and len(with_energy) > 1 else 0),
        initial_structure=adaptor.get_structure(images[0]) if images else None,
        final_structure=adaptor.get_structure(last if last is not None else images[-1]) if images else None,
        energy=float(last.calc.results["energy"]) if last is not None else None,
        energies=[float(a.calc.results["energy"]) for a in with_energy],
        forces=forces,
        stress=stress,
        total_magnetization=float(mags[-1]) if mags else None,
        absolute_magnetization=float(abs_mags[-1]) if abs_mags else None,
        band_gap=gap.gap,
        is_metal=gap.is_metal,
        band_gap_by_spin=list(gap.by_spin) if gap.by_spin is not None else None,
        is_half_metal=gap.is_half_metal,
        fermi_energy=float(fermi) if fermi is not None else None,
        wall_time_s=parse_wall_time(text),
        errors=parse_errors(text),
    )


_BAND_MARKERS = ("End of self-consistent calculation", "End of band structure calculation")


def _card_mentions_removed(text: str) -> str:
    """Drop messages that mention a card (pw.x prints real cards at column 0); ASE's reader
    takes any mention for a card."""
    return "\n".join(
        ln
        for ln in text.splitlines()
        if not (
            ("ATOMIC_POSITIONS" in ln or "CELL_PARAMETERS" in ln)
            and not ln.startswith(("ATOMIC_POSITIONS", "CELL_PARAMETERS"))
        )
    )


def _read_images(text: str) -> list:
    from ase.io.espresso import read_espresso_out

    cleaned = _card_mentions_removed(text)
    return list(read_espresso_out(io.StringIO(cleaned), index=slice(None), results_required=False))


def _ase_images(path: Path, text: str, strict: bool = True) -> list:
    """ASE's images; on failure retry without the eigenvalue blocks (ASE trips on some)."""
    try:
        images = _read_images(text)
    except Exception as first:  # ASE raises many types on truncated or unusual files
        stripped = "\n".join(ln for ln in text.splitlines() if not any(m in ln for m in _BAND_MARKERS))
        try:
            images = _read_images(stripped)
        except Exception:  # the fallback failed too; report the first error
            if not strict:
                return []
            raise PwOutputError(
                f"{path}: ASE's pw.x reader failed ({type(first).__name__}: {str(first)[:120]})"
            ) from None
    if not images and strict:
        raise PwOutputError(f"{path}: no atomic configuration found")
    return images
