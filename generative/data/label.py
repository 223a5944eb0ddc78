"""CHGNet labels for cubic prototypes: EOS, elastic constants, formation energy.

Per structure (all in the primitive cell):

1. A coarse E(V) scan on a geometric volume grid around the radius-based
   guess, extended up to twice towards lower energy when the minimum sits on an
   edge.
2. A fine 7-point E(V) scan around the coarse minimum, fitted with the
   Birch-Murnaghan EOS (pymatgen): a0 (Å), E0 (eV/atom), B0 (GPa) and the RMS
   fit residual (eV/atom). A structure whose fine scan has no interior minimum
   is rejected with the reason.
3. Clamped-ion cubic elastic constants from CHGNet stresses at a0: one mixed
   strain, uniaxial xx plus engineering shear yz of the same size, applied with
   both signs. Central differences give C11 = dσxx/dε, C12 = dσyy/dε,
   C44 = dσyz/dγ. Ions keep their fractional coordinates (clamped); for B3 and
   L21, whose sites lack inversion symmetry, this overestimates C44.
4. Voigt-Reuss-Hill shear modulus and Poisson ratio from C11, C12, C44. If the
   Born criteria fail (C11 - C12 <= 0, C44 <= 0 or C11 + 2 C12 <= 0) the shear
   modulus and Poisson ratio are left empty and ``mechanically_stable`` is false.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from pymatgen.core import Lattice, Structure

from crystaloop.generative.data.prototypes import Prototype

COARSE_VOLUME_RATIOS = tuple(1.15**k for k in range(-3, 4))
"""Coarse scan: V / V_guess, geometric steps of 15 % in volume."""
FINE_VOLUME_RATIOS = tuple(float(x) for x in np.geomspace(1 / 1.15, 1.15, 7))
"""Fine scan: V / V_coarse_min, spanning the two neighbouring coarse points."""
MAX_COARSE_EXTENSIONS = 4
STRAIN = 0.01
"""Elastic strain amplitude (dimensionless), applied as +STRAIN and -STRAIN."""
MIN_DISTANCE_ANGSTROM = 1.35
MAX_DISTANCE_ANGSTROM = 4.2
"""Scans stay where the nearest-neighbour distance lies in this range (Å); beyond it CHGNet's
graphs explode (compressed) or the atoms no longer interact (expanded)."""
RESIDUAL_TOLERANCE = 2e-3
"""EOS residuals (RMS, eV/atom) above this mark the record as not converged."""
EV_PER_A3_IN_GPA = 160.21766208


@dataclass
class LabelResult:
    """Labels of one prototype, or the reason it was rejected.

    Energies in eV/atom, moduli and elastic constants in GPa, lengths in Å.
    """

    structure_id: str
    a0: float | None = None
    energy_per_atom: float | None = None
    bulk_modulus: float | None = None
    eos_b1: float | None = None
    eos_residual: float | None = None
    c11: float | None = None
    c12: float | None = None
    c44: float | None = None
    shear_modulus: float | None = None
    poisson_ratio: float | None = None
    mechanically_stable: bool | None = None
    formation_energy_per_atom: float | None = None
    converged: bool = False
    reject_reason: str | None = None
    volumes: list[float] = field(default_factory=list)
    energies: list[float] = field(default_factory=list)

    def as_dict(self) -> dict:
        """Plain dict (JSON-ready)."""
        return asdict(self)


def vrh_from_cubic(c11: float, c12: float, c44: float) -> tuple[float, float, float]:
    """Bulk modulus, VRH shear modulus (GPa) and Poisson ratio from cubic C11, C12, C44 (GPa)."""
    bulk = (c11 + 2 * c12) / 3
    g_voigt = (c11 - c12 + 3 * c44) / 5
    g_reuss = 5 * (c11 - c12) * c44 / (4 * c44 + 3 * (c11 - c12))
    shear = 0.5 * (g_voigt + g_reuss)
    poisson = (3 * bulk - 2 * shear) / (2 * (3 * bulk + shear))
    return bulk, shear, poisson


def born_stable(c11: float, c12: float, c44: float) -> bool:
    """Born stability of a cubic crystal."""
    return c11 - c12 > 0 and c44 > 0 and c11 + 2 * c12 > 0


def strained(structure: Structure, eps: float) -> Structure:
    """``structure`` under xx strain ``eps`` plus engineering yz shear ``eps``, ions clamped."""
    strain = np.array([[eps, 0, 0], [0, 0, eps / 2], [0, eps / 2, 0]])
    matrix = structure.lattice.matrix @ (np.eye(3) + strain).T
    return Structure(Lattice(matrix), structure.species, structure.frac_coords)


def fit_eos(volumes: Sequence[float], energies: Sequence[float]) -> tuple[float, float, float, float, float]:
    """Birch-Murnaghan fit of energies (eV/atom) against volumes (Å^3/atom).

    Returns
    -------
    tuple
        V0 (Å^3/atom), E0 (eV/atom), B0 (GPa), B0' and the RMS residual (eV/atom).

    Raises
    ------
    ValueError
        If the fit fails.
    """
    from pymatgen.analysis.eos import EOS

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = EOS("birch_murnaghan").fit(list(volumes), list(energies))
    residual = float(np.sqrt(np.mean((np.asarray(fit.func(np.asarray(volumes))) - energies) ** 2)))
    return float(fit.v0), float(fit.e0), float(fit.b0_GPa), float(fit.b1), residual


class CHGNetLabeller:
    """Batched CHGNet labelling of :class:`Prototype` objects.

    Parameters
    ----------
    batch_size
        Structures per CHGNet forward pass.
    """

    def __init__(self, *, batch_size: int = 32) -> None:
        from chgnet.model import CHGNet

        self.model = CHGNet.load(verbose=False)
        self.batch_size = batch_size
        self.name = f"chgnet-{self.model.version}"

    def energies(self, structures: Sequence[Structure]) -> list[float]:
        """Energies (eV/atom) of ``structures``."""
        if not structures:
            return []
        try:
            out = self.model.predict_structure(list(structures), task="e", batch_size=self.batch_size)
            return [float(r["e"]) for r in out]
        except ValueError:  # CHGNet refuses graphs with isolated atoms; retry one by one
            if len(structures) == 1:
                return [math.nan]
            return [e for s in structures for e in self.energies([s])]

    def stresses(self, structures: Sequence[Structure]) -> list[np.ndarray]:
        """Stress tensors (GPa, 3x3, tensile positive) of ``structures``."""
        if not structures:
            return []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = self.model.predict_structure(list(structures), task="efs", batch_size=self.batch_size)
        return [np.asarray(r["s"], dtype=float).reshape(3, 3) for r in out]

    def label(
        self, prototypes: Sequence[Prototype], references: dict[str, float] | None = None
    ) -> list[LabelResult]:
        """Label ``prototypes`` together (batched scans); formation energies need ``references``."""
        results = {p.structure_id: LabelResult(p.structure_id) for p in prototypes}
        centre = {p.structure_id: p.lattice_guess() ** 3 for p in prototypes}  # conventional volume
        samples: dict[str, dict[float, float]] = {p.structure_id: {} for p in prototypes}

        bounds = {
            p.structure_id: (
                (MIN_DISTANCE_ANGSTROM / p.nearest_neighbour_ratio()) ** 3,
                (MAX_DISTANCE_ANGSTROM / p.nearest_neighbour_ratio()) ** 3,
            )
            for p in prototypes
        }

        def allowed(p: Prototype, v: float) -> bool:
            lo, hi = bounds[p.structure_id]
            return lo <= v <= hi

        def scan(todo: list[Prototype], ratios_of) -> None:
            jobs = [(p, v) for p in todo for v in ratios_of(p) if allowed(p, v)]
            structs = [p.primitive(v ** (1 / 3)) for p, v in jobs]
            for (p, v), e in zip(jobs, self.energies(structs), strict=True):
                if math.isfinite(e):
                    samples[p.structure_id][v] = e

        # Coarse scan, extended towards the lower edge.
        todo = list(prototypes)
        for p in todo:  # keep the coarse grid inside the physical range
            lo, hi = bounds[p.structure_id]
            centre[p.structure_id] = min(max(centre[p.structure_id], lo * 1.15**3), hi / 1.15**3)
        scan(todo, lambda p: [centre[p.structure_id] * r for r in COARSE_VOLUME_RATIOS])
        for _ in range(MAX_COARSE_EXTENSIONS + 1):
            extend = []
            for p in todo:
                pts = sorted(samples[p.structure_id].items())
                if not pts:
                    centre[p.structure_id] = None
                    continue
                i = int(np.argmin([e for _, e in pts]))
                if 0 < i < len(pts) - 1:
                    centre[p.structure_id] = pts[i][0]
                    continue
                edge = pts[i][0]
                step = 1.15**3 if i else 1.15**-3
                new = [edge * step ** (k / 3) for k in (1, 2, 3)]
                centre[p.structure_id] = None
                if any(allowed(p, v) for v in new):
                    extend.append((p, new))
            todo = [p for p, _ in extend]
            if not todo or _ == MAX_COARSE_EXTENSIONS:
                break
            lookup = {p: v for p, v in extend}
            scan(todo, lookup.__getitem__)
        for p in prototypes:
            if centre[p.structure_id] is None:
                results[p.structure_id].reject_reason = (
                    "no E(V) minimum inside the volume scan "
                    f"(nearest neighbours {MIN_DISTANCE_ANGSTROM}-{MAX_DISTANCE_ANGSTROM} A)"
                )

        # Fine scan and EOS fit.
        fine = [p for p in prototypes if centre[p.structure_id] is not None]
        fine_v = {p.structure_id: [centre[p.structure_id] * r for r in FINE_VOLUME_RATIOS] for p in fine}
        jobs = [(p, v) for p in fine for v in fine_v[p.structure_id]]
        energies = self.energies([p.primitive(v ** (1 / 3)) for p, v in jobs])
        per = {p.structure_id: [] for p in fine}
        for (p, _v), e in zip(jobs, energies, strict=True):
            per[p.structure_id].append(e)
        elastic = []
        for p in fine:
            res = results[p.structure_id]
            vpa = [v / p.atoms_per_conventional for v in fine_v[p.structure_id]]
            e = per[p.structure_id]
            res.volumes, res.energies = [round(v, 5) for v in vpa], [round(x, 6) for x in e]
            if not all(map(math.isfinite, e)):
                res.reject_reason = "CHGNet failed on a fine-scan point"
                continue
            i = int(np.argmin(e))
            if i in (0, len(e) - 1):
                res.reject_reason = "no E(V) minimum inside the fine volume scan"
                continue
            try:
                v0, e0, b0, b1, resid = fit_eos(vpa, e)
            except Exception as exc:  # pymatgen raises several types on a failed fit
                res.reject_reason = f"EOS fit failed: {type(exc).__name__}"
                continue
            if not (min(vpa) < v0 < max(vpa)) or not math.isfinite(b0) or b0 <= 0:
                res.reject_reason = "EOS fit minimum outside the fine volume scan or B0 <= 0"
                continue
            res.a0 = (v0 * p.atoms_per_conventional) ** (1 / 3)
            res.energy_per_atom, res.bulk_modulus, res.eos_b1, res.eos_residual = e0, b0, b1, resid
            res.converged = resid < RESIDUAL_TOLERANCE and 0 < b0 < 1000
            elastic.append(p)

        # Elastic constants by +/- strain at a0.
        structs = []
        for p in elastic:
            base = p.primitive(results[p.structure_id].a0)
            structs += [strained(base, STRAIN), strained(base, -STRAIN)]
        stresses = self.stresses(structs)
        for k, p in enumerate(elastic):
            res = results[p.structure_id]
            d = (stresses[2 * k] - stresses[2 * k + 1]) / (2 * STRAIN)
            res.c11, res.c12, res.c44 = float(d[0, 0]), float(0.5 * (d[1, 1] + d[2, 2])), float(d[1, 2])
            res.mechanically_stable = born_stable(res.c11, res.c12, res.c44)
            if res.mechanically_stable:
                _, g, nu = vrh_from_cubic(res.c11, res.c12, res.c44)
                res.shear_modulus, res.poisson_ratio = g, nu
            if references is not None:
                res.formation_energy_per_atom = formation_energy(p, res.energy_per_atom, references)
        return [results[p.structure_id] for p in prototypes]


def formation_energy(prototype: Prototype, energy_per_atom: float, references: dict[str, float]) -> float:
    """Formation energy (eV/atom) from the energy per atom and elemental references (eV/atom)."""
    comp = prototype.primitive(4.0).composition.fractional_composition
    return energy_per_atom - sum(frac * references[el.symbol] for el, frac in comp.items())
