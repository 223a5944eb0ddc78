"""Shared CLI pieces: output paths checked before work, error lines printed verbatim, unclipped tables."""

from __future__ import annotations

import io

import pytest
from rich.table import Table

from crystaloop.cli._common import _PipeConsole, check_output
from crystaloop.errors import UserError


def test_check_output_refuses_paths_that_cannot_be_written(tmp_path):
    check_output(None)
    check_output(tmp_path / "numbers.json")
    with pytest.raises(UserError, match="is a folder"):
        check_output(tmp_path)
    with pytest.raises(UserError, match="does not exist; create it first"):
        check_output(tmp_path / "missing" / "numbers.json")


def test_bench_output_is_checked_before_the_benchmark_runs(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).parent / "crystaloop"
    args = ["bench", "representation", "--n", "2", "--grid", "8", "--no-compare"]
    result = subprocess.run(
        [str(exe), *args, "--output", str(tmp_path / "nowhere" / "x.json")], capture_output=True, text=True
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "does not exist" in result.stderr


def test_user_input_in_an_error_line_is_printed_as_is():
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).parent / "crystaloop"
    for name in ("[/]x.yaml", "[bold]x.yaml", "a:abc:b.yaml"):
        result = subprocess.run([str(exe), "campaign", "validate", name], capture_output=True, text=True)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert f"campaign file {name} does not exist" in result.stderr


def test_pipe_console_prints_a_table_wider_than_its_width_whole():
    out = io.StringIO()
    console = _PipeConsole(width=80, file=out)
    table = Table()
    for i in range(6):
        table.add_column(f"column_{i}_with_a_long_header")
    table.add_row(*[f"value_{i}_" + "x" * 20 for i in range(6)])
    console.print(table)
    assert "…" not in out.getvalue() and "value_5_" + "x" * 20 in out.getvalue()
    assert console.width == 80
