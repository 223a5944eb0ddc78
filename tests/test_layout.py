"""The package layout: four code folders under one ``crystaloop`` package."""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest


@pytest.mark.parametrize("name", ["loop", "generative", "dft", "db"])
def test_subpackage_maps_to_root_folder(name, repo_root):
    module = importlib.import_module(f"crystaloop.{name}")
    assert Path(module.__file__).resolve().parent == repo_root / name


def test_bare_db_and_loop_are_not_this_project(repo_root, tmp_path):
    # Run from an unrelated directory so the repository root is not on sys.path.
    code = (
        "import importlib.util, json\n"
        "out = {}\n"
        "for n in ('db', 'loop', 'generative', 'dft'):\n"
        "    spec = importlib.util.find_spec(n)\n"
        "    out[n] = spec.origin if spec else None\n"
        "print(json.dumps(out))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    import json

    found = json.loads(result.stdout)
    for name, origin in found.items():
        assert origin is None or not str(origin).startswith(str(repo_root)), (name, origin)


def test_every_subpackage_is_listed_in_pyproject(repo_root):
    listed = set(tomllib.loads((repo_root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    for folder in ("loop", "generative", "dft", "db"):
        for init in (repo_root / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(repo_root).parts
            assert "crystaloop." + ".".join(rel) in listed, init


def test_core_packages_do_not_import_loop(repo_root):
    for folder in ("generative", "dft", "db"):
        for path in (repo_root / folder).rglob("*.py"):
            text = path.read_text()
            assert "crystaloop.loop" not in text, path


def test_help_lists_command_groups():
    from typer.testing import CliRunner

    from crystaloop.cli import app

    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for group in ("db", "query", "data", "train", "generate", "dft", "campaign"):
        assert f" {group} " in result.output


def test_console_script_runs():
    result = subprocess.run(
        [str(Path(sys.executable).parent / "crystaloop"), "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0
    assert "campaign" in result.stdout


def test_tests_mirror_the_source(repo_root):
    """Every test module sits under the folder of the package it tests (the CLI under cli/)."""
    allowed = {"loop", "generative", "dft", "db", "cli"}
    tests = repo_root / "tests"
    misplaced = [
        str(path.relative_to(tests))
        for path in tests.rglob("test_*.py")
        if path.parent != tests and path.relative_to(tests).parts[0] not in allowed
    ]
    top_level = sorted(p.name for p in tests.glob("test_*.py"))
    assert not misplaced, misplaced
    assert top_level == ["test_layout.py"], top_level


def test_benchmarks_live_in_one_package(repo_root):
    """Benchmark modules sit in loop/bench/ only, and no library module imports them."""
    bench = repo_root / "loop" / "bench"
    library = [p for folder in ("loop", "generative", "dft", "db") for p in (repo_root / folder).rglob("*.py")]
    strays = [str(p.relative_to(repo_root)) for p in library if "bench" in p.stem and p.parent != bench]
    users = [
        str(p.relative_to(repo_root))
        for p in library
        if bench not in p.parents and "crystaloop.loop.bench" in p.read_text()
    ]
    assert not strays, strays
    assert not users, users
