"""`crystaloop data` commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from crystaloop.cli._common import check_out_dir, console, eta_progress, group
from crystaloop.errors import UserError

app = group("data commands.")


@app.command("build-prior")
def build_prior(
    limit: Annotated[
        int | None, typer.Option(help="Label only the first N structures of the build order.")
    ] = None,
    workers: Annotated[int, typer.Option(help="Worker processes (one torch thread each).")] = 2,
    build_dir: Annotated[
        Path | None, typer.Option(help="Resumable state; default <data_dir>/prior-build[-limitN].")
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(help="Shipped file; default the packaged prior-v1.json.gz (full build) or build_dir."),
    ] = None,
) -> None:
    """Enumerate and label the prior set with CHGNet (resumable), then write the shipped file."""
    import time

    from crystaloop.generative.data import prior
    from crystaloop.generative.data.elements import palette
    from crystaloop.generative.data.references import compute_references, load_references
    from crystaloop.settings import get_settings

    if limit is not None and limit < 1:
        raise UserError(f"--limit must be a positive integer, got {limit}")
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    settings = get_settings()
    suffix = f"-limit{limit}" if limit else ""
    build_dir = build_dir or settings.data_dir / f"prior-build{suffix}"
    output = output or (build_dir / f"{prior.DATASET}.json.gz" if limit else prior.SHIPPED_PATH)
    from chgnet.model import CHGNet

    model = CHGNet.load(verbose=False)
    labeller = f"chgnet-{model.version}"
    cache = build_dir / f"references-{labeller}.json" if limit else None
    t0 = time.perf_counter()
    symbols = sorted({el for p in prior.build_order(limit) for el in p.species})
    if limit is None:
        symbols = list(palette())
    progress, update = eta_progress("labelling", on=console)
    with progress:
        report = prior.build(build_dir, limit=limit, workers=workers, progress=update)
    with console.status(f"elemental references for {len(symbols)} elements"):
        compute_references(symbols, labeller, model=model, cache=cache)
    header = prior.finalize(report.labels_path, output, load_references(labeller, cache), limit=limit)
    console.print(
        f"labelled {report.labelled_now} now, {report.already_done} already done, {report.total} total "
        f"in {time.perf_counter() - t0:.0f} s"
    )
    console.print(
        f"wrote {output} ({output.stat().st_size / 1e6:.2f} MB), content hash {header['content_hash']}"
    )


@app.command("load-prior")
def load_prior(
    path: Annotated[
        Path | None, typer.Option(help="Prior file; default the packaged file of --dataset.")
    ] = None,
    dataset: Annotated[
        str, typer.Option(help="Packaged set: prior-v1 (cubic) or prior-v2 (general cells).")
    ] = "prior-v1",
) -> None:
    """Load the shipped prior set into the ``training_structures`` collection (replaces that dataset)."""
    import time

    from crystaloop.db import get_database
    from crystaloop.db.training import replace_dataset
    from crystaloop.generative.data import prior

    packaged = {"prior-v1": prior.SHIPPED_PATH, "prior-v2": prior.SHIPPED_V2_PATH}
    if dataset not in packaged:
        raise UserError(f"unknown --dataset {dataset!r}; choose prior-v1 or prior-v2")
    t0 = time.perf_counter()
    doc = prior.read_prior(path or packaged[dataset])
    docs = prior.to_documents(doc)
    n = replace_dataset(get_database(), doc["dataset"], docs)
    rejected = sum(1 for d in docs if d["reject_reason"])
    console.print(
        f"loaded {n} structures ({n - rejected} labelled, {rejected} rejected) of {doc['dataset']} "
        f"hash {doc['content_hash'][:16]} in {time.perf_counter() - t0:.1f} s"
    )


@app.command("import-mp")
def import_mp(
    classes: Annotated[
        list[str] | None, typer.Option(
            "--class",
            help="binary, perovskite, heusler, or general: any crystal system, <= 20 sites, within "
            "0.1 eV/atom of the hull (repeatable; default the three cubic classes).",
        )
    ] = None,
    max_per_query: Annotated[int | None, typer.Option(help="Cap on documents per MP search.")] = None,
) -> None:
    """Import cubic binaries, perovskites and Heuslers with their properties from the Materials Project.

    Needs ``pip install 'crystaloop[mp]'`` and ``MP_API_KEY``.
    """
    from crystaloop.db import get_database
    from crystaloop.db.training import upsert_documents
    from crystaloop.generative.data import materials_project

    chosen = classes or list(materials_project.CUBIC_CLASSES)
    with console.status("querying the Materials Project"):
        docs = materials_project.fetch(chosen, max_per_query=max_per_query)
    n = upsert_documents(get_database(), docs)
    console.print(f"imported {n} structures from the Materials Project into training_structures")


@app.command("shards")
def shards(
    out_dir: Annotated[Path, typer.Argument(help="Directory for shard-*.npz and manifest.json.")],
    path: Annotated[Path | None, typer.Option(help="Prior file; default the packaged one.")] = None,
    grid: Annotated[int, typer.Option(help="Voxels per cell edge.")] = 32,
    shard_size: Annotated[int, typer.Option(help="Structures per shard.")] = 256,
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N structures.")] = None,
) -> None:
    """Precompute compressed voxel shards of the prior set (optional; on-the-fly voxelisation is the default).

    Shard files of an earlier set in OUT_DIR that the new manifest does not list are removed.
    """
    from crystaloop.generative.data import prior
    from crystaloop.generative.data.dataset import prior_records
    from crystaloop.generative.data.shards import shard_set_bytes, write_shards
    from crystaloop.properties import LABEL_NAMES

    if grid < 8 or shard_size < 1:
        raise UserError("--grid must be >= 8 and --shard-size >= 1")
    check_out_dir(out_dir, "the shards")
    records = prior_records(path or prior.SHIPPED_PATH, limit=limit)
    progress, update = eta_progress("voxelising", on=console)
    with progress:
        manifest = write_shards(
            records, out_dir, LABEL_NAMES, grid=grid, shard_size=shard_size, progress=update
        )
    size = shard_set_bytes(manifest)
    console.print(f"wrote {len(records)} samples to {manifest.parent} ({size / 1e6:.1f} MB)")


@app.command("bench-loader")
def bench_loader(
    samples: Annotated[int, typer.Option(min=1, help="Structures used for the measurement.")] = 512,
    batch_size: Annotated[int, typer.Option(min=1, help="Batch size (the UNet default is 10).")] = 10,
    batches: Annotated[int, typer.Option(min=1, help="Batches timed per configuration.")] = 20,
    path: Annotated[Path | None, typer.Option(help="Prior file; default the packaged one.")] = None,
) -> None:
    """Samples/s of on-the-fly voxelisation and of shards, against a UNet training step's consumption."""
    import torch
    from rich.table import Table

    from crystaloop.generative.data import prior
    from crystaloop.generative.data.dataset import prior_records
    from crystaloop.loop.bench.loader import measure_loaders

    torch.set_num_threads(max(1, torch.get_num_threads()))
    records = prior_records(path or prior.SHIPPED_PATH, limit=samples)
    results, bytes_per_structure = measure_loaders(records, batch_size=batch_size, batches=batches)
    table = Table(title=f"voxel loader throughput ({len(records)} structures, grid 32)")
    table.add_column("configuration")
    table.add_column("samples/s", justify="right")
    for r in results:
        table.add_row(r.name, f"{r.per_second:.1f}")
    console.print(table)
    console.print(f"shards on disk: {bytes_per_structure / 1e3:.1f} kB per structure")


@app.command("stats")
def stats(
    path: Annotated[Path | None, typer.Option(help="Prior file; default the packaged one.")] = None,
    figures: Annotated[Path | None, typer.Option(help="Write label histograms (PNG) here.")] = None,
) -> None:
    """Counts per class, rejects by reason and label statistics of a prior file."""
    from crystaloop.generative.data import prior
    from crystaloop.generative.data.stats import plot_histograms, summarize

    file = path or prior.SHIPPED_PATH
    doc = prior.read_prior(file)
    s = summarize(doc)
    console.print(
        f"{doc['dataset']} {file} ({file.stat().st_size / 1e6:.2f} MB) hash {doc['content_hash']}\n"
        f"structures {s['count']}, labelled {s['labelled']} (converged {s['converged']}), "
        f"mechanically unstable {s['mechanically_unstable']}"
    )
    console.print("per prototype: " + ", ".join(f"{k} {v}" for k, v in sorted(s["per_prototype"].items())))
    for reason, n in sorted(s["rejects"].items(), key=lambda kv: -kv[1]):
        console.print(f"rejected {n}: {reason}")
    cols = ("mean", "std", "min", "p5", "median", "p95", "max")
    console.print(
        f"{'label':<26} {'n':>6} " + " ".join(f"{c:>9}" for c in cols), highlight=False, soft_wrap=True
    )
    for key, v in s["labels"].items():
        console.print(
            f"{key:<26} {v['n']:>6} " + " ".join(f"{v[c]:>9.3f}" for c in cols),
            highlight=False,
            soft_wrap=True,
        )
    if "eos_residual_median" in s:
        console.print(
            f"EOS residual (eV/atom): median {s['eos_residual_median']:.2e}, p95 {s['eos_residual_p95']:.2e}"
        )
    if figures:
        for p in plot_histograms(doc, figures):
            console.print(f"wrote {p}")


@app.command("build-prior-v2")
def build_prior_v2(
    out: Annotated[Path, typer.Option("--out", help="Build folder: decorations, labels.jsonl and prior-v2.json.gz.")],
    limit: Annotated[int | None, typer.Option(help="Label only the first N decorations of the build order.")] = None,
    workers: Annotated[int, typer.Option(help="Worker processes (one torch thread each).")] = 1,
    seed: Annotated[int, typer.Option(help="Seed of the decoration draw and the build order.")] = 0,
    per_prototype: Annotated[int, typer.Option(help="Most decorations per prototype.")] = 60,
    max_sites: Annotated[int, typer.Option(help="Largest prototype cell kept (sites).")] = 20,
    max_edge: Annotated[float, typer.Option(help="Longest prototype cell edge kept (angstrom).")] = 10.0,
    threshold: Annotated[float, typer.Option(help="Smallest substitution probability kept.")] = 1e-3,
    finalize_only: Annotated[
        bool, typer.Option(help="Label nothing: write prior-v2.json.gz from the labels done so far.")
    ] = False,
    seed_from: Annotated[
        Path | None,
        typer.Option(help="A finished prior-v2.json.gz (e.g. the shipped one) whose records count as done."),
    ] = None,
) -> None:
    """Decorate AFLOW prototypes of every crystal system, relax and label them with CHGNet (resumable).

    A killed build resumes where it stopped when rerun with the same --out and settings.
    ``--finalize-only`` writes the file of a partial build (a build still running in another
    process may go on appending). ``--seed-from`` extends a finished file, such as the shipped
    partial prior-v2, instead of labelling its structures again.
    """
    import time

    from crystaloop.generative.data import prior_v2
    from crystaloop.generative.data.elements import palette
    from crystaloop.generative.data.references import compute_references, load_references

    for name, value, low in (("--limit", limit, 1), ("--workers", workers, 1), ("--per-prototype", per_prototype, 1),
                             ("--max-sites", max_sites, 1)):  # fmt: skip
        if value is not None and value < low:
            raise UserError(f"{name} must be at least {low}, got {value}")
    if not max_edge > 0 or not 0 < threshold < 1:
        raise UserError(f"--max-edge must be positive and --threshold in (0, 1), got {max_edge} and {threshold}")
    prior_v2.check_build_dir(out)
    if seed_from is not None and not seed_from.is_file():
        raise UserError(f"--seed-from {seed_from} not found; pass a prior-v2.json.gz (for example the shipped one)")
    settings = prior_v2.DecorationSettings(seed, max_sites, max_edge, threshold, per_prototype)
    t0 = time.perf_counter()
    with console.status("choosing decorations (ICSD substitution probabilities)"):
        decorations = prior_v2.load_decorations(out, settings, palette())
    console.print(f"{len(decorations)} decorations in {out / prior_v2.DECORATIONS}")
    if seed_from is not None:
        seeded, foreign = prior_v2.seed_labels(out, seed_from, decorations)
        console.print(
            f"seeded {seeded} records from {seed_from}"
            + (f", {foreign} of them drawn outside this build's decorations (kept)" if foreign else "")
        )
    if finalize_only:
        report, _ = prior_v2.labelled_so_far(out, decorations)
    else:
        progress, update = eta_progress("labelling", on=console)
        with progress:
            report = prior_v2.build(out, decorations, limit=limit, workers=workers, progress=update)
    from chgnet.model import CHGNet

    labeller = f"chgnet-{CHGNet.load(verbose=False).version}"
    cache = out / f"references-{labeller}.json"
    symbols = prior_v2.label_elements(report.labels_path)
    compute_references(symbols, labeller, cache=cache)
    output = out / f"{prior_v2.DATASET}.json.gz"
    header = prior_v2.finalize(report.labels_path, output, load_references(labeller, cache))
    per = report.seconds_per_structure
    console.print(
        f"labelled {report.labelled_now} now, {report.already_done} already done, {report.total} in this build "
        f"in {time.perf_counter() - t0:.0f} s" + (f" ({per:.1f} s per structure, {workers} workers)" if per else "")
    )
    console.print(f"wrote {output} ({output.stat().st_size / 1e6:.2f} MB), content hash {header['content_hash']}")


@app.command("shares-v2")
def shares_v2(
    path: Annotated[Path, typer.Argument(help="A prior-v2 build folder, its labels.jsonl, or a prior-v2.json.gz.")],
    top: Annotated[int, typer.Option(min=1, help="Prototypes listed (most frequent first).")] = 15,
    fmt: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
) -> None:
    """Shares of a prior-v2 build by crystal system, prototype, decoration kind and charge balance."""
    import json

    from crystaloop.generative.data import prior, prior_v2
    from crystaloop.generative.data.shares import summarize

    if fmt not in ("table", "json"):
        raise UserError(f"unknown format '{fmt}'; choose table or json")
    if path.is_dir():
        path = path / prior_v2.LABELS
    if not path.exists():
        raise UserError(f"{path} not found; pass a build folder of `crystaloop data build-prior-v2` or its output")
    if path.suffix == ".gz":
        records = prior.read_prior(path)["records"]
    else:
        records = list(prior.read_done(path).values())
    s = summarize(records)
    if fmt == "json":
        print(json.dumps(s, indent=2))
        return
    console.print(
        f"{path}: {s['records']} records, {s['labelled']} labelled, {s['rejected']} rejected; "
        f"{s['crystal_system_changed_by_relaxation']} changed crystal system on relaxation",
        highlight=False,
    )
    for reason, n in s["rejects"].items():
        console.print(f"  rejected {n}: {reason}", highlight=False)
    for title, key in (("crystal system", "crystal_system"), ("decoration", "kind"), ("charge balance", "charge_balance")):
        console.print(f"by {title}:", highlight=False)
        for name, v in s[key].items():
            console.print(f"  {name:<20} {v['count']:>6} {100 * v['share']:6.1f} %", highlight=False)
    console.print(
        "pymatgen-balanced by decoration: "
        + ", ".join(f"{k} {v}/{s['kind'][k]['count']}" for k, v in s["pymatgen_balanced_by_kind"].items()),
        highlight=False,
    )
    console.print(f"by prototype ({len(s['prototype'])} prototypes, top {top}):", highlight=False)
    for name, v in list(s["prototype"].items())[:top]:
        console.print(f"  {name:<28} {v['count']:>6} {100 * v['share']:6.1f} %", highlight=False)
