"""Shared fixtures: a real MongoDB-wire server for the whole session.

The suite runs against ``$CRYSTALOOP_TEST_MONGODB_URI`` when it is set (a real
``mongod``), else it starts the embedded ``secantusd-py`` on a free port in a
temporary directory and stops it at the end.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest

from crystaloop.db.server import EmbeddedServer
from crystaloop.settings import CrystaloopSettings, get_settings


@pytest.fixture(scope="session")
def mongo_uri(tmp_path_factory) -> str:
    """URI of the server the suite talks to."""
    uri = os.environ.get("CRYSTALOOP_TEST_MONGODB_URI")
    if uri:
        yield uri
        return
    server = EmbeddedServer(tmp_path_factory.mktemp("crystaloop-db"))
    record = server.start()
    yield record.uri
    server.stop()


@pytest.fixture
def settings(mongo_uri, tmp_path, monkeypatch) -> CrystaloopSettings:
    """Settings pointing at the session server, a fresh database and a temp data_dir.

    The same values are exported as ``CRYSTALOOP_*`` so CLI calls and subprocesses see them.
    """
    db_name = f"test_{uuid.uuid4().hex[:12]}"
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    monkeypatch.setenv("CRYSTALOOP_MONGODB_URI", mongo_uri)
    monkeypatch.setenv("CRYSTALOOP_DATABASE", db_name)
    monkeypatch.setenv("CRYSTALOOP_DATA_DIR", str(data_dir))
    get_settings.cache_clear()
    yield get_settings()
    get_settings.cache_clear()
    from crystaloop.db.connection import _client

    try:
        _client(mongo_uri).drop_database(db_name)
    except Exception:  # the server may already be gone at session end
        pass


@pytest.fixture
def database(settings):
    """A pymongo Database on the session server, dropped after the test."""
    from crystaloop.db import get_database

    return get_database(settings)


@pytest.fixture
def repo_root() -> Path:
    """The repository root."""
    return Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def local_family(tmp_path_factory) -> Path:
    """A real local PBE family built once per session (pw.x's machine only)."""
    if shutil.which("pw.x") is None:
        pytest.skip("pw.x is not installed")
    from crystaloop.dft.pseudos import build_local_family

    dest = tmp_path_factory.mktemp("local-pbe")
    build_local_family(dest)
    return dest


@pytest.fixture
def dft_settings(settings, monkeypatch, local_family):
    """Settings (fresh DB, temp data_dir) using the real local family."""
    monkeypatch.setenv("CRYSTALOOP_PSEUDO_DIR", str(local_family))
    get_settings.cache_clear()
    yield get_settings()
    get_settings.cache_clear()
