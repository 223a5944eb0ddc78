"""Round-trip benchmark of the voxel representation: voxelize, segment the true S and S_B, rebuild.

The benchmark set holds cubic crystals of the paper's three classes, the prior's prototypes
(:mod:`crystaloop.generative.data.prototypes`):

- binaries: rock salt (B1, Fm-3m), CsCl / B2 (Pm-3m) and zinc blende (B3, F-43m);
- ABX3 perovskites (Pm-3m, shifted so that B sits at the cell corner in the standard setting);
- L2₁ X2YZ Heuslers (Fm-3m, 16-atom conventional cell, Y at the origin).

Lattice constants are experimental in scale: they come from sums of radii (ionic for rock salt,
ionic CsCl and perovskites; pymatgen atomic radii for zinc blende, B2 intermetallics and
Heuslers) with a ±3 % random spread. Most structures get a random origin shift; every tenth keeps
the standard setting, with atoms exactly on the cell corners and faces.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from pymatgen.core import Element, Structure

from crystaloop.generative.data.prototypes import Prototype
from crystaloop.generative.decoders.base import to_structure
from crystaloop.generative.decoders.watershed import segment
from crystaloop.generative.measures import matched_site_errors
from crystaloop.generative.radii import ionic_radius
from crystaloop.generative.representation import lattice_from_coordinates, voxelize
from crystaloop.loop.bench.targets import ROUNDTRIP, ROUNDTRIP_SPEED_MS, met

CLASSES = ("rocksalt", "cscl", "zincblende", "perovskite", "heusler")
"""Structure prototypes in the benchmark set."""

# Families of real compounds (cation group, anion group); pairs are drawn within a family.
_ROCKSALT = (
    ("Li Na K Rb Ag", "F Cl Br"),
    ("Li Na K Rb", "I"),
    ("Mg Ca Sr Ba Eu Pb", "O S Se Te"),
    ("Mn Fe Co Ni Cd Zn", "O"),
    ("Sc Ti V Zr Hf Nb", "N"),
)
_CSCL = (("Cs Tl Rb", "Cl Br I"),)
_B2 = ("Fe Co Ni Cu Pd Ru Rh Ag Au Mn Ti Zr", "Al Ga In Zn Ti Si Be Mg Sc Cd")
_ZINCBLENDE = (
    ("Zn Cd Hg Be", "S Se Te"),
    ("Ga In Al B", "N P As Sb"),
    ("Cu Ag", "Cl Br I"),
)
_PEROVSKITE = (
    ("Ca Sr Ba Pb", "Ti Zr Hf Sn", "O"),
    ("La Y Bi Pr Nd", "Al Ga Sc Fe Cr Mn Co Ni V", "O"),
    ("K Na Ag", "Nb Ta", "O"),
    ("K Rb Cs Na", "Mg Zn Mn Fe Co Ni Cu Ca Cd", "F"),
    ("Cs Rb K", "Pb Sn Ge Cd Ca Sr", "Cl Br I"),
)
_HEUSLER = (
    "Fe Co Ni Cu Rh Pd Ag Au Ir Pt Mn Ru",
    "Ti V Cr Mn Fe Zr Hf Nb Sc Y Mo Lu",
    "Al Ga In Si Ge Sn Sb Mg Zn Bi As Pb",
)


@dataclass(frozen=True)
class BenchmarkStructure:
    """One structure of the benchmark set, with its prototype and whether its origin is shifted."""

    name: str
    prototype: str
    structure: Structure
    shifted: bool


def _atomic(symbol: str) -> float:
    radius = Element(symbol).atomic_radius
    return float(radius) if radius is not None else ionic_radius(symbol)


def perovskite_b_at_corner(a: str, b: str, x: str, lattice_constant: float) -> Structure:
    """Cubic ABX3 perovskite with B at the cell corner and A at the body centre."""
    structure = Prototype("perovskite", (a, b, x)).conventional(lattice_constant)
    structure.translate_sites(range(len(structure)), [0.5, 0.5, 0.5])
    return structure


def benchmark_structures(n: int = 2100, seed: int = 0) -> list[BenchmarkStructure]:
    """The round-trip benchmark set: ``n`` cubic structures, the same for the same seed.

    A third are binaries (rock salt, CsCl/B2, zinc blende), a third perovskites and a third
    Heuslers.

    Raises
    ------
    ValueError
        If ``n < 1``.
    """
    if n < 1:
        raise ValueError(f"the benchmark set needs at least one structure; got n={n}")
    rng = np.random.default_rng(seed)
    makers: list[Callable[[], tuple[str, str, Structure]]] = [
        lambda: _random_binary(rng),
        lambda: _random_perovskite(rng),
        lambda: _random_heusler(rng),
    ]
    out = []
    for i in range(n):
        name, prototype, structure = makers[i % 3]()
        shifted = i % 10 != 0
        if shifted:
            structure = Structure(
                structure.lattice,
                structure.species,
                (structure.frac_coords + rng.random(3)) % 1.0,
            )
        out.append(BenchmarkStructure(f"{i:05d}-{name}", prototype, structure, shifted))
    return out


def _spread(rng: np.random.Generator) -> float:
    return float(rng.uniform(0.97, 1.03))


def _pick(rng: np.random.Generator, *groups: str) -> list[str]:
    return [str(rng.choice(group.split())) for group in groups]


def _random_binary(rng):
    kind = ("rocksalt", "cscl", "zincblende")[int(rng.integers(3))]
    if kind == "rocksalt":
        a, b = _pick(rng, *_ROCKSALT[int(rng.integers(len(_ROCKSALT)))])
        # Cation-anion contact, or anion-anion contact (a / sqrt 2 >= 2 r) for large anions.
        constant = max(2.0 * (ionic_radius(a) + ionic_radius(b)), 2.0**1.5 * ionic_radius(b))
        return f"{a}{b}-rocksalt", kind, Prototype("B1", (a, b)).conventional(constant * _spread(rng))
    if kind == "cscl":
        if rng.random() < 0.5:
            a, b = _pick(rng, *_CSCL[0])
            distance = ionic_radius(a) + ionic_radius(b)
        else:
            a, b = _pick(rng, *_B2)
            if a == b:
                b = "Al"
            distance = 0.93 * (_atomic(a) + _atomic(b))
        constant = 2.0 * distance / np.sqrt(3.0) * _spread(rng)
        return f"{a}{b}-cscl", kind, Prototype("B2", (a, b)).conventional(constant)
    a, b = _pick(rng, *_ZINCBLENDE[int(rng.integers(len(_ZINCBLENDE)))])
    constant = 4.0 * (_atomic(a) + _atomic(b)) / np.sqrt(3.0)
    constant = max(constant, 2.0**1.5 * ionic_radius(b))
    return f"{a}{b}-zincblende", kind, Prototype("B3", (a, b)).conventional(constant * _spread(rng))


def _random_perovskite(rng):
    a, b, x = _pick(rng, *_PEROVSKITE[int(rng.integers(len(_PEROVSKITE)))])
    # Shannon crystal radii overestimate B-X distances by about 3 %.
    constant = max(
        0.97 * 2.0 * (ionic_radius(b) + ionic_radius(x)),
        0.97 * np.sqrt(2.0) * (ionic_radius(a) + ionic_radius(x)),
        2.0**1.5 * ionic_radius(x),
    )
    constant *= _spread(rng)
    return f"{a}{b}{x}3-perovskite", "perovskite", perovskite_b_at_corner(a, b, x, constant)


def _random_heusler(rng):
    x, y, z = _pick(rng, *_HEUSLER)
    if y == x:
        y = "Ti"
    neighbour = 0.5 * ((_atomic(x) + _atomic(y)) + (_atomic(x) + _atomic(z)))
    constant = 0.94 * 4.0 * neighbour / np.sqrt(3.0) * _spread(rng)
    # The prototype's Z site (4a) is the origin: Y there, as before the prototypes were shared.
    return f"{x}2{y}{z}-heusler", "heusler", Prototype("L21", (x, z, y)).conventional(constant)


@dataclass(frozen=True)
class RoundTripResult:
    """The round trip of one structure.

    Attributes
    ----------
    n_true, n_predicted : int
        Sites in the input and in the rebuilt structure.
    species_correct : int
        True sites matched (Hungarian, minimum-image distance) to a site of the same species.
    displacement_sum_angstrom : float
        Sum of matched minimum-image distances (Å), in the true lattice.
    n_matched : int
        Matched pairs.
    lattice_abs_error_angstrom : tuple of float
        ``|Δa|, |Δb|, |Δc|`` (Å) of the lattice recovered from the coordinate channels.
    structure_match : bool
        pymatgen ``StructureMatcher().fit`` of input and output.
    voxelize_ms, segment_ms : float
        Wall-clock time of the two steps.
    """

    name: str
    prototype: str
    n_true: int
    n_predicted: int
    species_correct: int
    displacement_sum_angstrom: float
    n_matched: int
    lattice_abs_error_angstrom: tuple[float, float, float]
    structure_match: bool
    voxelize_ms: float
    segment_ms: float


def round_trip(
    item: BenchmarkStructure | Structure,
    grid: int = 32,
    periodic: bool = True,
    matcher=None,
) -> RoundTripResult:
    """Voxelize, segment from the true species and mask, rebuild, and score one structure."""
    from pymatgen.analysis.structure_matcher import StructureMatcher

    if isinstance(item, Structure):
        item = BenchmarkStructure(item.composition.reduced_formula, "custom", item, False)
    structure = item.structure
    start = time.perf_counter()
    voxels = voxelize(structure, grid=grid, periodic=periodic)
    middle = time.perf_counter()
    sites = segment(voxels.species, voxels.mask, periodic=periodic)
    end = time.perf_counter()
    lattice = lattice_from_coordinates(voxels.coords)
    lattice_error = tuple(float(x) for x in np.abs(np.array(lattice.abc) - np.array(structure.lattice.abc)))
    if not sites:
        return RoundTripResult(
            item.name, item.prototype, len(structure), 0, 0, 0.0, 0, lattice_error, False,
            (middle - start) * 1e3, (end - middle) * 1e3,
        )  # fmt: skip
    predicted = to_structure(sites, lattice)
    distances, z_errors = matched_site_errors(
        structure.frac_coords,
        np.array([site.specie.Z for site in structure]),
        predicted.frac_coords,
        np.array([site.specie.Z for site in predicted]),
        structure.lattice,
    )
    matcher = matcher or StructureMatcher()
    return RoundTripResult(
        name=item.name,
        prototype=item.prototype,
        n_true=len(structure),
        n_predicted=len(predicted),
        species_correct=int(np.sum(z_errors == 0)),
        displacement_sum_angstrom=float(distances.sum()),
        n_matched=len(distances),
        lattice_abs_error_angstrom=lattice_error,
        structure_match=bool(matcher.fit(structure, predicted)),
        voxelize_ms=(middle - start) * 1e3,
        segment_ms=(end - middle) * 1e3,
    )


@dataclass(frozen=True)
class RoundTripSummary:
    """Aggregate round-trip metrics over a set of structures."""

    n_structures: int
    exact_site_count_share: float
    mean_abs_site_count_error: float
    species_accuracy: float
    mean_displacement_angstrom: float
    lattice_mae_angstrom: float
    structure_match_share: float
    median_voxelize_ms: float
    median_segment_ms: float

    def failed_targets(self) -> list[str]:
        """Names of the accuracy targets (:data:`~crystaloop.loop.bench.targets.ROUNDTRIP`) this summary misses."""
        return [name for name, target in ROUNDTRIP.items() if not met(getattr(self, name), target)]

    def missed_targets(self) -> list[str]:
        """The accuracy targets missed, then the speed targets (``median_<step>_ms``) missed."""
        slow = [
            f"median_{step}_ms"
            for step, limit in ROUNDTRIP_SPEED_MS.items()
            if getattr(self, f"median_{step}_ms") > limit
        ]
        return self.failed_targets() + slow


def summarize(results: Sequence[RoundTripResult]) -> RoundTripSummary:
    """Aggregate per-structure results (site metrics pooled over all true sites).

    Raises
    ------
    ValueError
        If ``results`` is empty.
    """
    if not results:
        raise ValueError("no round-trip results to summarize")
    n_true = sum(r.n_true for r in results)
    n_matched = sum(r.n_matched for r in results)
    return RoundTripSummary(
        n_structures=len(results),
        exact_site_count_share=float(np.mean([r.n_true == r.n_predicted for r in results])),
        mean_abs_site_count_error=float(np.mean([abs(r.n_true - r.n_predicted) for r in results])),
        species_accuracy=sum(r.species_correct for r in results) / n_true,
        mean_displacement_angstrom=(
            sum(r.displacement_sum_angstrom for r in results) / n_matched if n_matched else np.inf
        ),
        lattice_mae_angstrom=float(np.mean([r.lattice_abs_error_angstrom for r in results])),
        structure_match_share=float(np.mean([r.structure_match for r in results])),
        median_voxelize_ms=float(np.median([r.voxelize_ms for r in results])),
        median_segment_ms=float(np.median([r.segment_ms for r in results])),
    )


def run_round_trip(
    items: Iterable[BenchmarkStructure],
    grid: int = 32,
    periodic: bool = True,
    progress: Callable[[], None] | None = None,
) -> list[RoundTripResult]:
    """Round trip of every item; ``progress`` is called after each."""
    from pymatgen.analysis.structure_matcher import StructureMatcher

    matcher = StructureMatcher()
    results = []
    for item in items:
        results.append(round_trip(item, grid=grid, periodic=periodic, matcher=matcher))
        if progress is not None:
            progress()
    return results


def by_prototype(results: Sequence[RoundTripResult]) -> dict[str, RoundTripSummary | None]:
    """:func:`summarize` per prototype of :data:`CLASSES` (None where the results hold none)."""
    out: dict[str, RoundTripSummary | None] = {}
    for prototype in CLASSES:
        subset = [r for r in results if r.prototype == prototype]
        out[prototype] = summarize(subset) if subset else None
    return out


def result_document(*, n: int, grid: int, seed: int, results: dict[str, Sequence[RoundTripResult]]) -> dict:
    """The JSON of ``bench representation --output``: the summary and the failed structures per variant."""
    from dataclasses import asdict

    return {
        "n": n,
        "grid": grid,
        "seed": seed,
        "summaries": {name: asdict(summarize(rs)) for name, rs in results.items()},
        "failures": {
            name: [r.name for r in rs if r.n_true != r.n_predicted or not r.structure_match]
            for name, rs in results.items()
        },
    }
