"""The embedded server: start, reuse, stale-record cleanup, stop, and the db CLI."""

from __future__ import annotations

import json

import pytest

from crystaloop.db.server import EmbeddedServer, ping


@pytest.fixture
def server(tmp_path):
    srv = EmbeddedServer(tmp_path / "state")
    yield srv
    srv.stop()


def test_start_reuse_stop(server):
    first = server.start()
    assert ping(first.uri)
    assert server.record_path.exists()
    assert json.loads(server.record_path.read_text())["port"] == first.port
    assert (server.root / "data").is_dir()
    second = server.start()
    assert (second.pid, second.port) == (first.pid, first.port)
    assert server.stop()
    assert not server.record_path.exists()
    assert not ping(first.uri)
    assert not server.stop()


def test_stale_record_is_removed(server):
    server.root.mkdir(parents=True)
    # A pid that cannot exist and a closed port: a record left by a dead server.
    server.record_path.write_text(
        json.dumps({"host": "127.0.0.1", "port": 9, "pid": 2**22 + 12345, "storage_path": "x"})
    )
    assert server.running() is None
    assert not server.record_path.exists()
    record = server.start()
    assert record.pid != 2**22 + 12345 and ping(record.uri)


def test_a_recycled_pid_is_never_signalled(server):
    """A dead server's record whose pid now belongs to another process: stop leaves that one alone."""
    import subprocess

    other = subprocess.Popen(["sleep", "60"])
    try:
        server.root.mkdir(parents=True)
        server.record_path.write_text(
            json.dumps(
                {"host": "127.0.0.1", "port": 9, "pid": other.pid, "storage_path": str(server.storage_path)}
            )
        )
        assert server.running() is None and not server.record_path.exists()
        server.record_path.write_text(
            json.dumps(
                {"host": "127.0.0.1", "port": 9, "pid": other.pid, "storage_path": str(server.storage_path)}
            )
        )
        assert server.stop() is False
        assert other.poll() is None  # still running
    finally:
        other.kill()
        other.wait()


def test_a_live_server_that_does_not_answer_keeps_its_record(server):
    import os
    import signal

    from crystaloop.errors import UserError

    record = server.start()
    os.kill(record.pid, signal.SIGSTOP)
    try:
        with pytest.raises(UserError, match="running but does not answer"):
            server.running()
        assert server.record_path.exists()
    finally:
        os.kill(record.pid, signal.SIGCONT)
    assert server.running() == record
    assert server.stop()


def test_data_survives_restart(server):
    import pymongo

    record = server.start()
    pymongo.MongoClient(record.uri).crystaloop.candidates.insert_one({"k": 1})
    server.stop()
    record = server.start()
    assert pymongo.MongoClient(record.uri).crystaloop.candidates.count_documents({"k": 1}) == 1


def test_db_cli(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from crystaloop.cli import app
    from crystaloop.settings import get_settings

    monkeypatch.delenv("CRYSTALOOP_MONGODB_URI", raising=False)
    monkeypatch.setenv("CRYSTALOOP_DATA_DIR", str(tmp_path))
    get_settings.cache_clear()
    runner = CliRunner()
    try:
        assert "not running" in runner.invoke(app, ["db", "status"]).stdout
        started = runner.invoke(app, ["db", "start"])
        assert started.exit_code == 0 and "embedded database at mongodb://127.0.0.1:" in started.stdout
        status = runner.invoke(app, ["db", "status"])
        assert "candidates" in status.stdout and "training_structures" in status.stdout
        assert "stopped" in runner.invoke(app, ["db", "stop"]).stdout
    finally:
        EmbeddedServer(tmp_path).stop()
        get_settings.cache_clear()
