"""`crystaloop dft` commands."""

from __future__ import annotations

from pathlib import Path

import typer

from crystaloop.cli._common import console, group, output_option
from crystaloop.errors import UserError

app = group("dft commands.")
pseudos_app = group("Pseudopotential families.")
app.add_typer(pseudos_app, name="pseudos", help="Build and inspect pseudopotential families.")


@pseudos_app.command("build-local")
def build_local(
    dest: Path = typer.Option(None, "--dest", help="Target directory (default: the settings' pseudo_dir)."),
    ld1: bool = typer.Option(True, "--ld1/--no-ld1", help="Generate PAW potentials with ld1.x."),
    jobs: int = typer.Option(2, "--jobs", min=1, help="ld1.x runs in parallel."),
) -> None:
    """Assemble a real PBE family from this machine's Quantum ESPRESSO files."""
    from rich.table import Table

    from crystaloop.dft.pseudos import CUTOFF_POLICY, build_local_family, load_family
    from crystaloop.settings import get_settings

    target = dest or get_settings().resolved_pseudo_dir()
    report = build_local_family(target, use_ld1=ld1, jobs=jobs)
    family = load_family(report.family_path)
    table = Table(title=f"{family.name}: {len(report.elements)} elements in {target}")
    for column in ("element", "file", "type", "source", "ecutwfc (Ry)", "ecutrho (Ry)"):
        table.add_column(column)
    for element in report.elements:
        entry = family.pseudopotentials[element]
        table.add_row(
            element,
            entry.filename,
            entry.pseudo_type or "",
            entry.source or "",
            f"{entry.ecutwfc:g}",
            f"{entry.ecutrho:g}",
        )
    console.print(table)
    console.print(f"elements: {' '.join(report.elements)}")
    console.print(f"ld1.x succeeded: {' '.join(report.ld1_ok) or '-'}")
    for element, filename in sorted(report.dropped.items()):
        console.print(f"left out: {element} ({filename} failed verification; see docs/dft.md)")
    for name, reason in sorted(report.ld1_failed.items()):
        console.print(f"ld1.x failed: {name}: {reason}", highlight=False)
    if report.rewrapped:
        console.print(f"re-wrapped long lines in: {' '.join(sorted(report.rewrapped))}")
    console.print(f"cutoffs: {CUTOFF_POLICY}", highlight=False)
    console.print(f"family YAML: {report.family_path}")


@pseudos_app.command("show")
def show_family() -> None:
    """Print the configured family: elements, files and cutoffs."""
    from rich.table import Table

    from crystaloop.dft.pseudos import family_from_settings

    family = family_from_settings()
    table = Table(title=f"{family.name} ({family.functional}) in {family.pseudo_dir}")
    for column in ("element", "file", "md5", "ecutwfc (Ry)", "ecutrho (Ry)", "verdict"):
        table.add_column(column)
    for element in family.elements:
        e = family.pseudopotentials[element]
        table.add_row(element, e.filename, e.md5[:10], f"{e.ecutwfc:g}", f"{e.ecutrho:g}", e.verdict)
    console.print(table)


@pseudos_app.command("verify")
def verify_family(
    elements: str = typer.Option(
        None, "--elements", help="Comma-separated elements (default: every element with a reference)."
    ),
    eos: bool = typer.Option(True, "--eos/--no-eos", help="Also the EOS (ν, ε, V0, B0)."),
    points: int = typer.Option(7, "--points", help="EOS volumes (at least 7)."),
    span: float = typer.Option(0.06, "--span", help="EOS half-range as a fraction of V0 (at least 0.06)."),
    write: bool = typer.Option(
        True, "--write/--no-write", help="Store verdicts and numbers in the family YAML."
    ),
    output: Path = output_option("Also write the numbers as JSON here."),
    fmt: str = typer.Option("table", "--format", help="table or json."),
) -> None:
    """Check the family against all-electron PBE (ACWF): bcc-fcc-type energy, EOS, ν, ε, V0, B0."""
    import json

    from crystaloop.dft.pseudos import family_from_settings
    from crystaloop.dft.verification import (
        EPSILON_GOOD,
        NU_GOOD,
        STRUCTURAL_GOOD_EV,
        acwf_references,
        acwf_source,
        merged_verification,
        pwx_energy_fn,
        result_row,
        verify_element,
        write_verdicts,
    )
    from crystaloop.settings import get_settings

    if fmt not in ("table", "json"):
        raise UserError(f"unknown format '{fmt}'; choose table or json")
    family = family_from_settings()
    references = acwf_references()
    if elements:
        chosen = [e.strip() for e in elements.split(",") if e.strip()]
        missing = family.missing(chosen)
        if missing:
            raise UserError(
                f"family '{family.name}' has no file for {', '.join(missing)}; "
                f"it covers {' '.join(family.elements)}"
            )
    else:
        chosen = [e for e in family.elements if e in references]
    energy_fn = pwx_energy_fn(family)
    results = []
    for element in chosen:
        with console.status(f"verifying {element} (pw.x)"):
            results.append(
                verify_element(element, energy_fn, eos=eos, points=points, span=span, references=references)
            )
        entry = family.pseudopotentials[element]
        results[-1].ecutwfc, results[-1].ecutrho = entry.ecutwfc, entry.ecutrho
    rows = []
    for result in results:
        entry = family.pseudopotentials[result.element]
        verdict, _ = merged_verification(result, entry.verdict, entry.verification)
        rows.append(result_row(result, verdict))
    if write:
        write_verdicts(get_settings().resolved_pseudo_family(), results)
    if output:
        output.write_text(json.dumps({"source": acwf_source(), "elements": rows}, indent=2))
    if fmt == "json":
        print(json.dumps({"source": acwf_source(), "elements": rows}, indent=2))
        return
    console.print(_verify_table(rows, family.name))
    console.print(
        f"verified: |ΔE error| <= {STRUCTURAL_GOOD_EV * 1000:.0f} meV/atom, ν <= {NU_GOOD}, "
        f"ε <= {EPSILON_GOOD}; marginal: within twice those; reference: {acwf_source()}",
        highlight=False,
    )
    if not eos:
        console.print(
            "--no-eos: each verdict also weighs the stored EOS numbers and is never better than the stored verdict"
        )
    if write:
        console.print(f"verdicts written to {get_settings().resolved_pseudo_family()}")


def _verify_table(rows, name: str):
    from rich.table import Table

    table = Table(title=f"{name} against all-electron PBE (ACWF)")
    for column in (
        "element",
        "structure",
        "check",
        "ΔE (eV/atom)",
        "ΔE AE",
        "error (meV)",
        "V0 (Å³/atom)",
        "V0 AE",
        "B0 (GPa)",
        "B0 AE",
        "ν",
        "ε",
        "verdict",
    ):
        table.add_column(column)
    for r in rows:
        table.add_row(
            r["element"],
            r["structure"],
            r["check"],
            _fmt(r["dE_ev"], ".3f"),
            _fmt(r["dE_ae_ev"], ".3f"),
            _fmt(r["dE_error_mev"], ".0f"),
            _fmt(r["v0_a3"], ".3f"),
            _fmt(r["v0_ae_a3"], ".3f"),
            _fmt(r["b0_gpa"], ".1f"),
            _fmt(r["b0_ae_gpa"], ".1f"),
            _fmt(r["nu"], ".2f"),
            _fmt(r["epsilon"], ".2f"),
            r["verdict"],
        )
    return table


def _read_structure(path: Path):
    from pymatgen.core import Structure

    if path.is_dir():
        raise UserError(f"{path} is a folder; give one CIF or POSCAR file")
    if not path.is_file():
        raise UserError(f"{path} does not exist; give a CIF or POSCAR file")
    try:
        structure = Structure.from_file(str(path))
    except Exception as exc:  # pymatgen raises many types for malformed files
        raise UserError(
            f"cannot read a crystal structure from {path} ({type(exc).__name__}); check the file"
        ) from None
    if not structure.is_ordered:
        raise UserError(
            f"{path} has partially occupied sites ({structure.composition.reduced_formula}); "
            "DFT needs an ordered structure: order it first (e.g. pymatgen's OrderDisorderedStructureTransformation)"
        )
    return structure


@app.command("relax")
def relax(
    structure_file: Path = typer.Argument(..., help="Structure file (CIF, POSCAR...)."),
    preset: str = typer.Option("fast", "--preset", help="fast, standard, or a preset YAML."),
    backend: str = typer.Option("local", "--backend", help="local, fireworks or jobflow-remote."),
    engine: str = typer.Option("espresso", "--engine", help="espresso (pw.x) or surrogate (CHGNet)."),
    formation_energy: bool = typer.Option(
        True, "--formation-energy/--no-formation-energy", help="Also compute E_f per atom."
    ),
    worker: str = typer.Option(None, "--worker", help="jobflow-remote worker name."),
    project: str = typer.Option(None, "--project", help="jobflow-remote project name."),
    magnetic_orderings: str = typer.Option(
        "fm",
        "--magnetic-orderings",
        help="fm, or fm,afm: also relax the simplest AFM ordering, keep the lower.",
    ),
    anion_correction: bool = typer.Option(
        False, "--anion-correction/--no-anion-correction", help="Apply the fitted O/F correction to E_f."
    ),
) -> None:
    """Relax one structure (vc-relax) and print the result table."""
    import warnings

    from crystaloop.dft.backends import BACKENDS, run_flow
    from crystaloop.dft.engines import get_engine

    warnings.filterwarnings("ignore", message=".*_symmetry_equiv_pos_as_xyz.*")
    if backend not in BACKENDS:
        raise UserError(f"unknown backend '{backend}'; choose one of {', '.join(BACKENDS)}")
    chosen = get_engine(engine)
    from crystaloop.dft.magnetism import check_orderings

    try:
        orderings = check_orderings(o.strip() for o in magnetic_orderings.split(",") if o.strip())
    except ValueError as exc:
        raise UserError(f"{exc} (--magnetic-orderings)") from None
    structure = _read_structure(structure_file)
    from crystaloop.settings import get_settings

    chosen.check(
        preset,
        structure=structure,
        # workers elsewhere run pw.x for the other backends
        pw_command=get_settings().pw_command if backend == "local" else None,
        pw_command_setting="CRYSTALOOP_PW_COMMAND",
    )
    flow = _build_flow(structure, engine, preset, formation_energy, orderings, anion_correction)
    if backend == "fireworks":
        ids = run_flow(flow, "fireworks")
        console.print(
            f"submitted {len(ids)} Fireworks (ids {ids[0]}-{ids[-1]}); run workers with "
            "'rlaunch -l my_launchpad.yaml rapidfire'"
        )
        return
    if backend == "jobflow-remote":
        if not worker or not project:
            raise UserError("--backend jobflow-remote needs --worker and --project")
        run_flow(flow, "jobflow-remote", project=project, worker=worker)
        console.print(f"submitted to jobflow-remote project {project}; follow with 'jf job list'")
        return
    responses = run_flow(flow, "local", log=True)  # a SIGTERM stops pw.x too (cli.main)
    _print_result(flow, responses)


def _build_flow(
    structure, engine: str, preset: str, formation_energy: bool, orderings=("fm",), anion_correction=False
):
    from jobflow import Flow

    from crystaloop.dft.engines import get_engine
    from crystaloop.dft.flows import FormationEnergyMaker

    if formation_energy:
        maker = FormationEnergyMaker(
            engine=engine, preset=preset, magnetic_orderings=orderings, anion_correction=anion_correction
        )
        return maker.make(structure)
    chosen = get_engine(engine)
    overrides = chosen.with_orderings({}, orderings)
    return Flow([chosen.relax_maker(preset, overrides).make(structure)])


def _print_result(flow, responses) -> None:
    from rich.table import Table

    from crystaloop.dft.engines import get_engine
    from crystaloop.dft.schemas import FormationEnergyDocument, QETaskDocument

    task = formation = None
    for job in flow.jobs:
        response = responses.get(job.uuid, {})
        output = response[max(response)].output if response else None
        if isinstance(output, QETaskDocument) and task is None:
            task = output
        if isinstance(output, FormationEnergyDocument):
            formation = output
    if task is None:
        raise UserError("the relaxation did not run; see the job log above")
    table = Table(title=f"{task.formula_pretty}: {task.state} (engine: {task.engine})")
    table.add_column("quantity")
    table.add_column("value")
    final = task.final_structure
    rows = [
        ("task id", task.task_id),
        ("engine", task.engine),
        ("preset", task.input.preset),
        ("cutoffs (Ry)", _cutoffs(task)),
        ("state", task.state),
        ("energy per atom (eV/atom)", _fmt(task.energy_per_atom)),
        (
            "formation energy (eV/atom)",
            _fmt(formation.formation_energy_per_atom if formation else None),
        ),
        (
            "anion correction",
            f"{formation.anion_correction} ({formation.anion_correction_per_atom:+.3f} eV/atom; raw "
            f"{_fmt(formation.formation_energy_per_atom_raw)})"
            if formation and formation.anion_correction != "none"
            else "none",
        ),
        (
            "magnetic ordering",
            ", ".join(
                f"{o.ordering} {_fmt(o.energy_per_atom, '.4f')} eV/atom"
                + (" (kept)" if o.ordering == task.magnetic_ordering else "")
                for o in task.magnetic_orderings
            )
            or (task.magnetic_ordering or "-"),
        ),
        ("lattice a, b, c (Å)", " ".join(f"{x:.4f}" for x in final.lattice.abc) if final else "-"),
        ("volume per atom (Å³)", _fmt(final.volume / len(final) if final else None)),
        ("band gap (eV)", _fmt(task.band_gap)),
        ("total magnetisation (μB/cell)", _fmt(task.total_magnetization)),
        ("absolute magnetisation (μB/cell)", _fmt(task.absolute_magnetization)),
        ("ionic steps", str(task.n_ionic_steps)),
        ("engine wall time (s)", _fmt(task.wall_time_s, ".2f")),
        ("corrections", str(len(task.corrections))),
        ("reasons", "; ".join(task.reasons) or "-"),
        ("directory", task.dir_name or "-"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    if task.input.below_suggested_cutoffs:
        console.print(
            f"[bold yellow]cutoffs {task.input.ecutwfc:g}/{task.input.ecutrho:g} Ry are below the "
            f"family's suggestion {task.input.suggested_ecutwfc:g}/{task.input.suggested_ecutrho:g} Ry"
            "[/]: energies and lattice are not converged; use --preset demo or standard."
        )
    caveat = get_engine(task.engine).caveat
    if caveat:
        console.print(f"[bold yellow]engine: {task.engine}[/] - {caveat}")


def _cutoffs(task) -> str:
    if task.input.ecutwfc is None:
        return "-"
    flag = " (below the family's suggestion)" if task.input.below_suggested_cutoffs else ""
    return f"{task.input.ecutwfc:g}/{task.input.ecutrho:g}{flag}"


def _fmt(value, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


@app.command("status")
def status(limit: int = typer.Option(10, "--limit", min=0, help="Rows per state.")) -> None:
    """List DFT jobs by state."""
    from rich.table import Table

    from crystaloop.dft.records import tasks_by_state

    grouped = tasks_by_state()
    if not grouped:
        console.print("no DFT tasks yet")
        return
    summary = ", ".join(f"{state}: {len(docs)}" for state, docs in sorted(grouped.items()))
    console.print(f"dft_tasks: {summary}")
    table = Table()
    for column in (
        "state",
        "task id",
        "formula",
        "engine",
        "preset",
        "E (eV/atom)",
        "E_f (eV/atom)",
        "reasons",
    ):
        table.add_column(column)
    for state, docs in sorted(grouped.items()):
        for doc in docs[:limit]:
            table.add_row(
                state,
                doc["task_id"][:8],
                doc.get("reduced_formula") or "-",
                doc["engine"],
                doc.get("preset") or "-",
                _fmt(doc.get("energy_per_atom")),
                _fmt(doc.get("formation_energy_per_atom")),
                "; ".join(doc.get("reasons") or [])[:60] or "-",
            )
    console.print(table)


@app.command("remote-config")
def remote_config(
    name: str = typer.Option("crystaloop", "--name", help="jobflow-remote project name."),
    scheduler: str = typer.Option("slurm", "--scheduler", help="slurm, pbs or shell."),
    host: str = typer.Option("localhost", "--host", help="Cluster login host."),
    worker: str = typer.Option(None, "--worker", help="Worker name (default: the scheduler's, e.g. slurm)."),
    work_dir: str = typer.Option("/scratch/crystaloop/jobs", "--work-dir", help="Job folders, on scratch."),
    pre_run: str = typer.Option(
        None, "--pre-run", help="Shell lines before each job (default: activate this Python environment)."
    ),
    partition: str = typer.Option(None, "--partition", help="SLURM partition (PBS queue) of every job."),
    account: str = typer.Option(None, "--account", help="Account charged for every job."),
    walltime: str = typer.Option(None, "--walltime", help="Default wall time, [D-]HH:MM:SS."),
    out: Path = typer.Option(Path("~/.jfremote"), "--out", help="Where jf looks for projects."),
    force: bool = typer.Option(False, "--force", help="Replace an existing project file."),
) -> None:
    """Write a jobflow-remote project YAML whose queue and JobStore are crystaloop's MongoDB."""
    import re

    from crystaloop.dft.backends import remote_project_config, write_remote_project

    if scheduler not in ("slurm", "pbs", "shell"):
        raise UserError(f"unknown scheduler '{scheduler}'; choose slurm, pbs or shell")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name.startswith("."):
        raise UserError(f"--name {name!r}: use letters, digits, '_', '-' or '.', e.g. crystaloop")
    target = out.expanduser() / f"{name}.yaml"
    if target.exists() and not force:
        raise UserError(f"{target} exists; pass --force to replace it, or another --name")
    if out.expanduser().exists() and not out.expanduser().is_dir():
        raise UserError(f"--out {out} is a file; pass the folder jf reads projects from")
    config = remote_project_config(
        name,
        scheduler=scheduler,
        host=host,
        worker=worker,
        work_dir=work_dir,
        pre_run=pre_run,
        partition=partition,
        account=account,
        walltime=walltime,
    )
    path = write_remote_project(config, out)
    console.print(f"wrote {path}; check it with 'jf project check -p {name}'")


@app.command("fireworks-config")
def fireworks_config(
    out: Path = typer.Option(Path("."), "--out", help="Folder for the worker files."),
    ping_s: int = typer.Option(60, "--ping-s", min=1, help="Seconds between a running job's pings."),
    force: bool = typer.Option(False, "--force", help="Replace existing files."),
) -> None:
    """Write a FireWorks worker's files: my_launchpad.yaml, jobflow.yaml (its job store), FW_config.yaml.

    Workers run ``JOBFLOW_CONFIG_FILE=jobflow.yaml FW_CONFIG_FILE=FW_config.yaml rlaunch -l
    my_launchpad.yaml rapidfire``; the Fireworks themselves carry no database address.
    """
    import yaml

    from crystaloop.db.connection import resolve_uri
    from crystaloop.dft.backends import worker_jobflow_config
    from crystaloop.settings import get_settings

    settings = get_settings()
    folder = out.expanduser()
    files = {
        "my_launchpad.yaml": {"host": resolve_uri(settings), "name": settings.database, "uri_mode": True},
        "jobflow.yaml": worker_jobflow_config(settings),
        "FW_config.yaml": {"PING_TIME_SECS": ping_s},
    }
    existing = [name for name in files if (folder / name).exists()]
    if existing and not force:
        raise UserError(f"{folder / existing[0]} exists; pass --force to replace it, or another --out")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, content in files.items():
            (folder / name).write_text(yaml.safe_dump(content, sort_keys=False))
            (folder / name).chmod(0o600)  # the URI may hold a password
    except OSError as exc:
        raise UserError(
            f"cannot write into {folder} ({exc.strerror or exc}); pass --out a folder you can write to"
        ) from None
    console.print(
        f"wrote {', '.join(files)} in {folder}; set execution.lost_after_s well above {ping_s} s "
        f"(e.g. {4 * ping_s})",
        highlight=False,
    )
