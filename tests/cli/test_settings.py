"""Settings: env prefix, YAML file, and credential redaction."""

from __future__ import annotations

from pathlib import Path

import pytest

from crystaloop.errors import ConfigError
from crystaloop.settings import CrystaloopSettings, redact_uri


def test_env_prefix_and_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("CRYSTALOOP_PW_COMMAND", "mpirun -np 4 pw.x")
    monkeypatch.setenv("CRYSTALOOP_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("CRYSTALOOP_MONGODB_URI", raising=False)
    s = CrystaloopSettings()
    assert s.pw_command == "mpirun -np 4 pw.x"
    assert s.data_dir == tmp_path
    assert s.uses_embedded_db
    assert s.device == "auto"
    assert s.resolved_pseudo_dir() == tmp_path / "pseudo" / "local-pbe"


def test_yaml_file_is_read_and_env_wins(monkeypatch, tmp_path):
    path = tmp_path / "settings.yaml"
    path.write_text("database: fromyaml\npw_command: pw.x -nk 2\n")
    monkeypatch.setenv("CRYSTALOOP_SETTINGS_FILE", str(path))
    monkeypatch.setenv("CRYSTALOOP_DATABASE", "fromenv")
    s = CrystaloopSettings()
    assert s.database == "fromenv"
    assert s.pw_command == "pw.x -nk 2"


def test_the_data_dirs_settings_file_is_read(monkeypatch, tmp_path):
    (tmp_path / "settings.yaml").write_text("database: from_data_dir\n")
    monkeypatch.delenv("CRYSTALOOP_SETTINGS_FILE", raising=False)
    monkeypatch.delenv("CRYSTALOOP_DATABASE", raising=False)
    monkeypatch.setenv("CRYSTALOOP_DATA_DIR", str(tmp_path))
    assert CrystaloopSettings().database == "from_data_dir"


def test_a_bad_setting_is_one_config_error_naming_it(monkeypatch, tmp_path):
    from crystaloop.settings import get_settings

    monkeypatch.setenv("CRYSTALOOP_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CRYSTALOOP_DEVICE", "gpu")
    get_settings.cache_clear()
    try:
        with pytest.raises(ConfigError, match="setting device: .*'gpu'.*CRYSTALOOP_DEVICE"):
            get_settings()
    finally:
        get_settings.cache_clear()


def test_missing_settings_file_is_a_config_error(monkeypatch, tmp_path):
    monkeypatch.setenv("CRYSTALOOP_SETTINGS_FILE", str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="does not exist"):
        CrystaloopSettings()


def test_default_data_dir_prefers_local(monkeypatch, tmp_path):
    monkeypatch.delenv("CRYSTALOOP_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert CrystaloopSettings().data_dir == Path.home() / ".crystaloop"
    (tmp_path / ".crystaloop").mkdir()
    assert CrystaloopSettings().data_dir == tmp_path / ".crystaloop"


def test_credentials_never_shown(monkeypatch):
    uri = "mongodb+srv://alice:s3cret@cluster0.example.net/db?retryWrites=true"
    monkeypatch.setenv("CRYSTALOOP_MONGODB_URI", uri)
    s = CrystaloopSettings()
    assert s.mongodb_uri == uri
    for text in (repr(s), str(s), s.safe_uri, redact_uri(uri)):
        assert "s3cret" not in text and "alice" not in text
    assert s.safe_uri == "mongodb+srv://***@cluster0.example.net/db?retryWrites=true"


def test_unreachable_database_message_has_no_credentials(monkeypatch):
    from crystaloop.db.connection import get_client
    from crystaloop.errors import DatabaseUnavailable

    monkeypatch.setenv("CRYSTALOOP_MONGODB_URI", "mongodb://bob:hunter2@127.0.0.1:9/")
    s = CrystaloopSettings()
    import crystaloop.db.connection as conn

    monkeypatch.setattr(conn, "_client", _short_timeout_client)
    with pytest.raises(DatabaseUnavailable) as info:
        get_client(s)
    assert "hunter2" not in info.value.message and "bob" not in info.value.message
    assert "127.0.0.1:9" in info.value.message


def _short_timeout_client(uri):
    import pymongo

    return pymongo.MongoClient(uri, serverSelectionTimeoutMS=300)


_short_timeout_client.cache_clear = lambda: None


@pytest.mark.parametrize("name", ["a.b", "has space", "x$y", "a/b", ""])
def test_a_database_name_mongodb_refuses_is_one_config_error(monkeypatch, tmp_path, name):
    from crystaloop.settings import get_settings

    monkeypatch.setenv("CRYSTALOOP_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CRYSTALOOP_DATABASE", name)
    get_settings.cache_clear()
    try:
        with pytest.raises(ConfigError, match="setting database: .*cannot hold.*CRYSTALOOP_DATABASE"):
            get_settings()
    finally:
        get_settings.cache_clear()


def test_a_uri_with_a_bad_port_is_database_unavailable(monkeypatch):
    from crystaloop.db.connection import get_client
    from crystaloop.errors import DatabaseUnavailable

    monkeypatch.setenv("CRYSTALOOP_MONGODB_URI", "mongodb://h:99999")
    with pytest.raises(DatabaseUnavailable, match="cannot reach MongoDB at mongodb://h:99999"):
        get_client(CrystaloopSettings())
