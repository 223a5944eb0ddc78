"""Fixtures for the DFT layer: the local PBE family, and a fake pw.x that replays real runs.

The fake (``crystaloop.dft.testing.FakePw``) follows atomate2's ``mock_vasp``: reference
folders produced by the real pw.x (``make_references.py``) are keyed by job name; the fake
checks the input it is handed against the reference input, then copies in the reference output.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from crystaloop.dft.testing import FakePw
from crystaloop.settings import get_settings

HERE = Path(__file__).resolve().parent
REFERENCE = HERE / "reference"
FAKE_FAMILY = HERE / "data" / "family.yaml"

requires_pwx = pytest.mark.skipif(shutil.which("pw.x") is None, reason="pw.x is not installed")


@pytest.fixture
def family_settings(settings, monkeypatch, tmp_path):
    """A function that points the settings (fresh DB, temp data_dir) at a copy of a family file."""

    def use(family: Path):
        pseudo_dir = tmp_path / "pseudo"
        pseudo_dir.mkdir(exist_ok=True)
        shutil.copyfile(family, pseudo_dir / "family.yaml")
        monkeypatch.setenv("CRYSTALOOP_PSEUDO_DIR", str(pseudo_dir))
        get_settings.cache_clear()
        return get_settings()

    yield use
    get_settings.cache_clear()


@pytest.fixture
def fake_settings(family_settings):
    """Settings using a copy of four local-family entries."""
    return family_settings(FAKE_FAMILY)


@pytest.fixture
def fake_pw(monkeypatch):
    """Install the fake: ``fake_pw({"qe relax": "si_relax", ...})`` returns the recorder."""
    from crystaloop.dft.espresso import run as pw_run

    def install(mapping: dict[str, str]) -> FakePw:
        fake = FakePw(mapping, REFERENCE)
        monkeypatch.setattr(pw_run, "run_pw", fake)
        # The fake stands in for the executable, so the CLI's up-front check finds it.
        monkeypatch.setattr(pw_run, "missing_executables", lambda pw_command: [])
        return fake

    return install
