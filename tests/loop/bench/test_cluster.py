"""The scheduling benchmark: its arithmetic on hand-made rows, and a tiny real run per backend."""

from __future__ import annotations

import pytest

from crystaloop.loop.bench.cluster import ClusterBenchRow, efficiency, run_cases, scale_note


def _row(backend: str, workers: int, per_min: float, cpu_ms: float = 10.0) -> ClusterBenchRow:
    return ClusterBenchRow(
        backend=backend, workers=workers, jobs=10, job_s=5.0, killed=0, completed=10, lost=0, duplicated=0,
        retried=0, wall_s=60.0, throughput_per_min=per_min, loop_cpu_ms_per_job=cpu_ms,
        harvest_latency_mean_s=0.5, harvest_latency_max_s=1.0, poll_interval_s=1.0,
    )  # fmt: skip


def test_parallel_efficiency_is_throughput_over_workers_times_one_worker():
    rows = [_row("local", 1, 10.0), _row("local", 4, 36.0), _row("fireworks", 4, 20.0), _row("fireworks", 1, 8.0)]
    efficiency(rows)
    assert [r.parallel_efficiency for r in rows] == pytest.approx([1.0, 0.9, 0.625, 1.0])


def test_scale_note_takes_the_worst_loop_cpu():
    note = scale_note([_row("local", 1, 10.0, cpu_ms=5.0), _row("fireworks", 1, 10.0, cpu_ms=40.0)], per_day=1000)
    assert note["loop_cpu_s_per_day"] == pytest.approx(40.0)
    assert note["db_writes_per_s"] == pytest.approx(7 * 1000 / 86400)


@pytest.mark.parametrize("backend", ["local", "fireworks", "jobflow-remote"])
def test_a_small_run_completes_every_job_once_though_a_worker_is_killed(backend, settings, tmp_path):
    """Three 2-second jobs on two workers, the first one's worker SIGKILLed mid-job: all three end
    harvested, none duplicated, and the killed one was retried."""
    if backend == "jobflow-remote":
        pytest.importorskip("jobflow_remote")
    lines = []
    (row,) = run_cases([backend], [2], jobs=3, job_s=2.0, kill_share=0.34, poll_s=0.5, log=lines.append)
    assert (row.completed, row.lost, row.duplicated) == (3, 0, 0), row.notes
    assert row.killed == 1
    assert row.retried >= 1
    assert row.parallel_efficiency is None  # no one-worker row to compare with
    assert row.harvest_latency_max_s < 30
    assert lines[0] == f"{backend}, 2 worker(s): 3 jobs of 2 s"
