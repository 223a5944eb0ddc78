"""Presets against each other and against reference formation energies: ``bench presets``.

Each compound of the binary test set (``data/binary_testset.yaml`` beside this module) is relaxed with
each preset through :class:`~crystaloop.dft.flows.FormationEnergyMaker`, with element
references at the compound's own cutoffs. Per (compound, preset) the result is stored
as JSON in an output folder, so an interrupted benchmark resumes where it stopped.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pymatgen.core import Lattice, Structure

from crystaloop.dft.pseudos import SAFE_LOADER


def load_testset() -> dict[str, Any]:
    """The shipped binary test set: ``{"source": ..., "compounds": {formula: spec}}``."""
    text = (resources.files("crystaloop.loop.bench") / "data" / "binary_testset.yaml").read_text()
    return yaml.load(text, Loader=SAFE_LOADER)


def compound_structure(spec: dict[str, Any]) -> Structure:
    """The structure of one test-set entry, as a primitive cell.

    ``lattice`` (cubic, fcc or hexagonal) with ``species`` and ``coords``; ``spacegroup`` with
    ``lattice`` (cubic, tetragonal or hexagonal) and Wyckoff ``sites``; or ``aflow``, a label
    of pymatgen's AFLOW prototype library (``formula`` picks the entry).
    """
    if "aflow" in spec:
        from pymatgen.analysis.prototypes import AFLOW_PROTOTYPE_LIBRARY

        entry = next(
            e
            for e in AFLOW_PROTOTYPE_LIBRARY
            if e["tags"]["aflow"] == spec["aflow"]
            and e["snl"].structure.composition.reduced_formula == spec["formula"]
        )
        return entry["snl"].structure.get_primitive_structure()
    kind, value = next(iter(spec["lattice"].items()))
    if kind == "cubic":
        lattice = Lattice.cubic(value)
    elif kind == "hexagonal":
        lattice = Lattice.hexagonal(*value)
    elif kind == "tetragonal":
        lattice = Lattice.tetragonal(*value)
    else:  # fcc: primitive cell of the conventional cube ``value``
        h = value / 2
        lattice = Lattice([[0, h, h], [h, 0, h], [h, h, 0]])
    if "spacegroup" in spec:
        if kind == "fcc":
            lattice = Lattice.cubic(value)
        sites = spec["sites"]
        conventional = Structure.from_spacegroup(
            spec["spacegroup"], lattice, list(sites), list(sites.values())
        )
        return conventional.get_primitive_structure()
    return Structure(lattice, spec["species"], spec["coords"])


@dataclass
class PresetResult:
    """One compound relaxed with one preset."""

    compound: str
    preset: str
    state: str
    formation_energy: float | None  # eV/atom
    a: float | None  # Å, conventional a for cubic/fcc cells, hexagonal a otherwise
    ecutwfc: float | None
    ecutrho: float | None
    below_suggested_cutoffs: bool
    pw_time_s: float  # pw.x wall time of the relaxation and of the references it ran
    wall_s: float
    references_cached: list[str]
    reasons: list[str]
    band_gap: float | None = None  # eV
    magnetic_ordering: str | None = None  # the kept ordering of a spin-polarised run
    orderings: list[dict[str, Any]] | None = None  # every ordering relaxed: energy, moments, gap
    formation_energy_raw: float | None = None  # eV/atom, before any anion correction


def conventional_a(structure: Structure, spec: dict[str, Any]) -> float:
    """The lattice constant comparable with ``exp_a``."""
    if "aflow" in spec or "spacegroup" in spec:
        from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

        return SpacegroupAnalyzer(structure, symprec=0.1).get_conventional_standard_structure().lattice.a
    kind = next(iter(spec["lattice"]))
    if kind == "fcc":
        return (4 * structure.volume) ** (1 / 3)
    if kind == "cubic":
        return structure.volume ** (1 / 3)
    return structure.lattice.a


def run_compound(
    compound: str, preset: str, spec: dict[str, Any], magnetic_orderings: tuple[str, ...] = ("fm",)
) -> PresetResult:
    """Relax ``compound`` with ``preset`` and compute E_f (references at its cutoffs).

    ``magnetic_orderings`` ``("fm", "afm")`` also relaxes the simplest antiferromagnetic
    ordering of a magnetic compound and keeps the lower (the raw E_f is never corrected here).
    """
    from crystaloop.dft.backends import run_local
    from crystaloop.dft.flows import FormationEnergyMaker
    from crystaloop.dft.schemas import ElementReference, FormationEnergyDocument, QETaskDocument

    structure = compound_structure(spec)
    flow = FormationEnergyMaker(
        preset=preset,
        metadata={"benchmark": "bench presets", "compound": compound},
        magnetic_orderings=magnetic_orderings,
    ).make(structure)
    start = time.perf_counter()
    responses = run_local(flow)
    wall = time.perf_counter() - start
    outputs = []
    for job in flow.jobs:
        response = responses.get(job.uuid, {})
        outputs.append(response[max(response)].output if response else None)
    task = next((o for o in outputs if isinstance(o, QETaskDocument)), None)
    formation = next((o for o in outputs if isinstance(o, FormationEnergyDocument)), None)
    cached = sorted(o.element for o in outputs if isinstance(o, ElementReference) and o.cached)
    pw_time = _pw_time([task]) + _reference_pw_time([o for o in outputs if isinstance(o, ElementReference)])
    final = task.final_structure if task is not None else None
    return PresetResult(
        compound=compound,
        preset=preset,
        state=formation.state if formation else "failed",
        formation_energy=formation.formation_energy_per_atom if formation else None,
        a=conventional_a(final, spec) if final is not None else None,
        ecutwfc=formation.ecutwfc if formation else None,
        ecutrho=formation.ecutrho if formation else None,
        below_suggested_cutoffs=bool(formation and formation.below_suggested_cutoffs),
        pw_time_s=pw_time,
        wall_s=wall,
        references_cached=cached,
        reasons=list(formation.reasons) if formation else ["no formation-energy output"],
        band_gap=task.band_gap if task is not None else None,
        magnetic_ordering=task.magnetic_ordering if task is not None else None,
        orderings=[o.model_dump() for o in task.magnetic_orderings] if task is not None else None,
        formation_energy_raw=formation.formation_energy_per_atom_raw if formation else None,
    )


def _pw_time(tasks) -> float:
    """pw.x time of the relaxations, every magnetic ordering included."""
    total = 0.0
    for task in tasks:
        if task is None:
            continue
        if task.magnetic_orderings:
            total += sum(o.wall_time_s or 0.0 for o in task.magnetic_orderings)
        else:
            total += task.wall_time_s or 0.0
    return float(total)


def _reference_pw_time(references) -> float:
    """pw.x time of the references this flow ran (cached ones cost nothing now)."""
    from crystaloop.dft import records

    total = 0.0
    for ref in references:
        if ref.cached:
            continue
        record = records._database()[records.TASKS].find_one(
            {"task_id": ref.task_id}, {"output.wall_time_s": 1}
        )
        total += float((record or {}).get("output", {}).get("wall_time_s") or 0.0)
    return total


def select_runs(compounds: str | None, presets: str):
    """Check a benchmark's ``--compounds`` and ``--presets`` options and that pw.x and the
    family's files are there; return ``(names, preset_names, family)``.

    Raises :class:`~crystaloop.errors.UserError` with one line for whatever is missing.
    """
    from crystaloop.dft.espresso.inputs import load_preset
    from crystaloop.dft.espresso.run import pw_available
    from crystaloop.dft.pseudos import family_from_settings
    from crystaloop.errors import UserError

    testset = load_testset()["compounds"]
    names = [c.strip() for c in compounds.split(",") if c.strip()] if compounds else list(testset)
    unknown = sorted(set(names) - set(testset))
    if unknown:
        raise UserError(f"unknown compounds {', '.join(unknown)}; choose from {', '.join(testset)}")
    preset_names = [p.strip() for p in presets.split(",") if p.strip()]
    for name in preset_names:
        load_preset(name)
    if not pw_available():
        raise UserError("pw.x not found; install quantum-espresso or set CRYSTALOOP_PW_COMMAND")
    family = family_from_settings()
    for name in names:
        family.require(compound_structure(testset[name]))
    return names, preset_names, family


def result_path(out_dir: Path, compound: str, preset: str, afm: bool = False) -> Path:
    """Where one relaxation's JSON lives; an antiferromagnetic trial has its own file."""
    return out_dir / f"{compound}_{preset}{'_afm' if afm else ''}.json"


def run_bench(
    compounds: list[str],
    presets: list[str],
    out_dir: Path,
    *,
    orderings: tuple[str, ...] = ("fm",),
    log=print,
) -> list[PresetResult]:
    """Run every (compound, preset) not already in ``out_dir``; return all results there.

    With ``"afm"`` in ``orderings``, magnetic compounds are relaxed in both orderings.
    """
    from crystaloop.dft.magnetism import magnetic_sites

    testset = load_testset()["compounds"]
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for preset in presets:
        for compound in compounds:
            afm = "afm" in orderings and bool(magnetic_sites(compound_structure(testset[compound])))
            path = result_path(out_dir, compound, preset, afm)
            if path.is_file():
                results.append(PresetResult(**json.loads(path.read_text())))
                continue
            log(f"relaxing {compound} with {preset}{' (fm and afm)' if afm else ''}")
            result = run_compound(compound, preset, testset[compound], orderings if afm else ("fm",))
            path.write_text(json.dumps(asdict(result), indent=2))
            results.append(result)
    return results


def summarise(results: list[PresetResult]) -> dict[str, Any]:
    """Per compound and preset: E_f, lattice, errors against experiment and against standard."""
    testset = load_testset()["compounds"]
    by_key = {(r.compound, r.preset): r for r in results}
    rows = []
    for r in results:
        spec = testset[r.compound]
        standard = by_key.get((r.compound, "standard"))
        rows.append(
            {
                **asdict(r),
                "exp_ef": spec["exp_ef"],
                "exp_a": spec["exp_a"],
                "ef_minus_exp": None if r.formation_energy is None else r.formation_energy - spec["exp_ef"],
                "a_error_pct": None if r.a is None else 100 * (r.a - spec["exp_a"]) / spec["exp_a"],
                "ef_minus_standard": None
                if r.formation_energy is None or standard is None or standard.formation_energy is None
                else r.formation_energy - standard.formation_energy,
                "sign_error": r.formation_energy is not None and r.formation_energy > 0 > spec["exp_ef"],
            }
        )
    return {"source": load_testset()["source"], "rows": rows}
