"""CHGNet labels for general cells: relaxation, EOS and the clamped-ion elastic tensor.

Per structure:

1. Relax cell and positions with CHGNet's ``StructOptimizer`` (FIRE, Fréchet
   cell filter) to :data:`FMAX`.
2. Birch-Murnaghan fit of a 7-point isotropic E(V) scan around the relaxed
   volume, fractional coordinates fixed: B0 (GPa), the EOS energy (eV/atom) and
   its RMS residual, as prior-v1 fits its cubic scans.
3. The clamped-ion elastic tensor from CHGNet stresses under the six Voigt
   strains of ±:data:`STRAIN`. Voigt-Reuss-Hill shear modulus and Poisson ratio
   from pymatgen's ``ElasticTensor``; ``mechanically_stable`` is the Born
   criterion (every eigenvalue of the 6x6 tensor positive). Clamped ions
   overestimate stiffness where sites have free parameters.

Rejects, stated in ``reject_reason`` (the record is kept, as in prior-v1):

- the relaxation did not reach :data:`FMAX` within :data:`MAX_STEPS`;
- the volume changed by more than a factor :data:`MAX_VOLUME_RATIO` from the
  radius-scaled start;
- a broken structure: two atoms closer than :data:`MIN_PAIR_ANGSTROM`, or an
  atom with no neighbour within :data:`MAX_NEIGHBOUR_ANGSTROM` (CHGNet's
  atom-graph cutoff: such an atom is isolated to the model);
- CHGNet failed, or the E(V) scan has no interior minimum.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
from pymatgen.core import Lattice, Structure

from crystaloop.generative.data.label import fit_eos

FMAX = 0.05
"""Force convergence of the relaxation (eV/Å)."""
MAX_STEPS = 500
MAX_VOLUME_RATIO = 1.5
"""Largest allowed V_final/V_start or V_start/V_final."""
MIN_PAIR_ANGSTROM = 0.7
MAX_NEIGHBOUR_ANGSTROM = 6.0
"""CHGNet 0.3.0's atom-graph cutoff (Å). prior-v1's 4.2 Å scan bound would reject real Cs metal (5.2 Å)."""
EOS_VOLUME_RATIOS = tuple(float(x) for x in np.geomspace(0.94, 1 / 0.94, 7))
STRAIN = 0.01
RESIDUAL_TOLERANCE = 2e-3
"""EOS residuals (RMS, eV/atom) above this mark the record as not converged, as in prior-v1."""


@dataclass
class RelaxResult:
    """Labels of one relaxed structure, or why it was rejected (eV/atom, GPa, Å)."""

    structure_id: str
    energy_per_atom: float | None = None
    bulk_modulus: float | None = None
    eos_b1: float | None = None
    eos_residual: float | None = None
    shear_modulus: float | None = None
    poisson_ratio: float | None = None
    mechanically_stable: bool | None = None
    volume_per_atom: float | None = None
    volume_ratio: float | None = None
    steps: int | None = None
    converged: bool = False
    reject_reason: str | None = None
    structure: dict | None = field(default=None, repr=False)
    """The relaxed structure (pymatgen dict), also for most rejects."""

    def as_dict(self) -> dict:
        """Plain dict (JSON-ready)."""
        return asdict(self)


def broken_reason(structure: Structure) -> str | None:
    """Why ``structure`` is broken (atoms fused, or an atom isolated), or None."""
    centres, _, _, distances = structure.get_neighbor_list(MAX_NEIGHBOUR_ANGSTROM)
    if len(distances) and distances.min() < MIN_PAIR_ANGSTROM:
        return f"broken structure: atoms closer than {MIN_PAIR_ANGSTROM} A"
    if len(set(centres.tolist())) < len(structure):
        return f"broken structure: an atom with no neighbour within {MAX_NEIGHBOUR_ANGSTROM} A"
    return None


def voigt_strained(structure: Structure, index: int, eps: float) -> Structure:
    """``structure`` under Voigt strain component ``index`` (0-5) of size ``eps``, ions clamped."""
    strain = np.zeros((3, 3))
    pairs = ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))
    i, j = pairs[index]
    if i == j:
        strain[i, i] = eps
    else:  # engineering shear eps
        strain[i, j] = strain[j, i] = eps / 2
    matrix = structure.lattice.matrix @ (np.eye(3) + strain).T
    return Structure(Lattice(matrix), structure.species, structure.frac_coords)


class CHGNetRelaxLabeller:
    """Relax and label general cells with CHGNet (one structure at a time, batched scans)."""

    def __init__(self, *, batch_size: int = 32) -> None:
        from chgnet.model import CHGNet, StructOptimizer

        self.model = CHGNet.load(verbose=False)
        self.optimizer = StructOptimizer(model=self.model)
        self.batch_size = batch_size
        self.name = f"chgnet-{self.model.version}"

    def relax(self, structure: Structure) -> tuple[Structure, int, bool]:
        """Relaxed structure, FIRE steps taken and whether ``FMAX`` was reached."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = self.optimizer.relax(
                structure, fmax=FMAX, steps=MAX_STEPS, relax_cell=True, verbose=False
            )
        traj = out["trajectory"]
        forces = np.asarray(traj.forces[-1])
        steps = len(traj.energies)
        reached = bool(np.sqrt((forces**2).sum(axis=1)).max() <= FMAX * 1.05) and steps < MAX_STEPS + 1
        return out["final_structure"], steps, reached

    def _predict(self, structures: list[Structure], task: str) -> list[dict]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return list(self.model.predict_structure(structures, task=task, batch_size=self.batch_size))

    def label(self, structure_id: str, start: Structure) -> RelaxResult:
        """Relax ``start`` and label it; never raises for a bad structure (it is rejected)."""
        res = RelaxResult(structure_id)
        reason = broken_reason(start)
        if reason:
            res.reject_reason = f"start: {reason}"
            return res
        try:
            final, res.steps, reached = self.relax(start)
        except Exception as exc:  # CHGNet/ASE raise many types on an exploding cell
            res.reject_reason = f"CHGNet relaxation failed: {type(exc).__name__}"
            return res
        res.structure = final.as_dict()
        res.volume_per_atom = final.volume / len(final)
        res.volume_ratio = final.volume / start.volume
        if not reached:
            res.reject_reason = f"relaxation not converged to {FMAX} eV/A in {MAX_STEPS} steps"
            return res
        if not (1 / MAX_VOLUME_RATIO <= res.volume_ratio <= MAX_VOLUME_RATIO):
            res.reject_reason = f"volume changed by a factor {res.volume_ratio:.2f} (limit {MAX_VOLUME_RATIO})"
            return res
        reason = broken_reason(final)
        if reason:
            res.reject_reason = reason
            return res
        try:
            self._eos(final, res)
        except (ValueError, RuntimeError) as exc:
            res.reject_reason = f"CHGNet failed on the E(V) scan: {type(exc).__name__}"
        if res.reject_reason is None:
            self._elastic(final, res)
        return res

    def _eos(self, final: Structure, res: RelaxResult) -> None:
        n = len(final)
        scans = []
        for r in EOS_VOLUME_RATIOS:
            s = final.copy()
            s.scale_lattice(final.volume * r)
            scans.append(s)
        energies = [float(o["e"]) for o in self._predict(scans, "e")]
        vpa = [s.volume / n for s in scans]
        if not all(map(math.isfinite, energies)) or int(np.argmin(energies)) in (0, len(energies) - 1):
            res.reject_reason = "no E(V) minimum inside the volume scan around the relaxed cell"
            return
        try:
            v0, e0, b0, b1, resid = fit_eos(vpa, energies)
        except Exception as exc:  # pymatgen raises several types on a failed fit
            res.reject_reason = f"EOS fit failed: {type(exc).__name__}"
            return
        if not (min(vpa) < v0 < max(vpa)) or not math.isfinite(b0) or b0 <= 0:
            res.reject_reason = "EOS fit minimum outside the volume scan or B0 <= 0"
            return
        res.energy_per_atom, res.bulk_modulus, res.eos_b1, res.eos_residual = e0, b0, b1, resid
        res.converged = resid < RESIDUAL_TOLERANCE and 0 < b0 < 1000

    def _elastic(self, final: Structure, res: RelaxResult) -> None:
        from pymatgen.analysis.elasticity import ElasticTensor

        structs = [voigt_strained(final, k, sign * STRAIN) for k in range(6) for sign in (1, -1)]
        stresses = [np.asarray(o["s"], dtype=float).reshape(3, 3) for o in self._predict(structs, "efs")]
        voigt = np.zeros((6, 6))
        idx = ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))
        for k in range(6):
            d = (stresses[2 * k] - stresses[2 * k + 1]) / (2 * STRAIN)
            voigt[:, k] = [d[i, j] for i, j in idx]
        voigt = 0.5 * (voigt + voigt.T)
        tensor = ElasticTensor.from_voigt(voigt)
        res.mechanically_stable = bool(np.linalg.eigvalsh(voigt).min() > 0)
        if res.mechanically_stable:
            res.shear_modulus = float(tensor.g_vrh)
            res.poisson_ratio = float(tensor.homogeneous_poisson)
