"""The round-trip benchmark of the voxel representation (`crystaloop bench representation`)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from crystaloop.errors import UserError
from crystaloop.generative.data.prototypes import Prototype
from crystaloop.loop.bench.roundtrip import (
    CLASSES,
    benchmark_structures,
    by_prototype,
    perovskite_b_at_corner,
    result_document,
    round_trip,
    run_round_trip,
    summarize,
)
from crystaloop.loop.bench.targets import ROUNDTRIP


def test_benchmark_set_covers_the_three_classes():
    items = benchmark_structures(2100)
    assert len(items) >= 2000
    prototypes = {item.prototype for item in items}
    assert prototypes == {"rocksalt", "cscl", "zincblende", "perovskite", "heusler"}
    assert {len(i.structure) for i in items if i.prototype == "heusler"} == {16}
    assert all(np.allclose(i.structure.lattice.angles, 90) for i in items)
    lengths = [i.structure.lattice.a for i in items]
    assert 2.5 < min(lengths) and max(lengths) < 8.5
    standard = [i for i in items if not i.shifted]
    assert len(standard) >= 100
    on_corner = [i for i in standard if np.any(np.all(i.structure.frac_coords % 1 == 0, axis=1))]
    assert len(on_corner) == len(standard)


def test_round_trip_on_a_small_benchmark_meets_the_targets():
    items = benchmark_structures(51, seed=3)
    periodic = summarize(run_round_trip(items))
    assert periodic.failed_targets() == []
    assert periodic.exact_site_count_share >= 0.99
    assert periodic.mean_displacement_angstrom <= 0.05
    flat = summarize(run_round_trip(items, periodic=False))
    # The paper's non-periodic variant shifts every atom near a face.
    assert flat.mean_displacement_angstrom > 2 * periodic.mean_displacement_angstrom
    assert flat.structure_match_share < periodic.structure_match_share


def test_bench_representation_command(tmp_path):
    from typer.testing import CliRunner

    from crystaloop.cli import app

    output = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "representation", "--n", "6", "--output", str(output)])
    assert result.exit_code == 0, result.output
    payload = json.loads(output.read_text())
    assert set(payload["summaries"]) == {"periodic", "periodic=False"}
    assert payload["summaries"]["periodic"]["n_structures"] == 6
    assert "median segment (ms)" in result.output
    bad = CliRunner().invoke(app, ["bench", "representation", "--n", "0"])
    assert isinstance(bad.exception, UserError)


def test_round_trip_of_a_plain_structure():
    result = round_trip(Prototype("B1", ("Mg", "O")).conventional(4.21))
    assert result.n_true == result.n_predicted == 8
    assert result.structure_match


@pytest.mark.slow
def test_full_round_trip_benchmark_meets_the_targets():
    summary = summarize(run_round_trip(benchmark_structures(2100)))
    assert summary.n_structures >= 2000
    assert summary.failed_targets() == []


def test_perovskite_puts_b_at_the_corner_and_a_at_the_centre():
    structure = perovskite_b_at_corner("Sr", "Ti", "O", 3.905)
    assert structure.composition.reduced_formula == "SrTiO3"
    ti = next(site for site in structure if site.specie.symbol == "Ti")
    sr = next(site for site in structure if site.specie.symbol == "Sr")
    np.testing.assert_allclose(ti.frac_coords % 1.0, [0, 0, 0], atol=1e-9)
    np.testing.assert_allclose(sr.frac_coords, [0.5, 0.5, 0.5], atol=1e-9)
    assert min(structure.distance_matrix[structure.distance_matrix > 0]) == pytest.approx(3.905 / 2)


def test_summary_per_prototype_and_missed_targets():
    items = benchmark_structures(9, seed=1)
    results = run_round_trip(items)
    parts = by_prototype(results)
    assert set(parts) == set(CLASSES)
    assert sum(s.n_structures for s in parts.values() if s is not None) == 9
    summary = summarize(results)
    assert summary.missed_targets()[: len(summary.failed_targets())] == summary.failed_targets()
    document = result_document(n=9, grid=32, seed=1, results={"periodic": results})
    assert document["summaries"]["periodic"]["n_structures"] == 9
    assert set(ROUNDTRIP) <= set(document["summaries"]["periodic"])
