"""One way to reach MongoDB: a configured URI, or the embedded server."""

from __future__ import annotations

from functools import lru_cache

import pymongo
from pymongo.database import Database
from pymongo.errors import ConfigurationError, OperationFailure, PyMongoError

from crystaloop.db.server import EmbeddedServer
from crystaloop.errors import DatabaseUnavailable
from crystaloop.settings import CrystaloopSettings, get_settings, redact_uri


def resolve_uri(settings: CrystaloopSettings | None = None) -> str:
    """The configured URI, or the embedded server's (started if needed)."""
    settings = settings or get_settings()
    if settings.mongodb_uri:
        return settings.mongodb_uri
    return EmbeddedServer(settings.data_dir).start().uri


@lru_cache(maxsize=8)
def _client(uri: str) -> pymongo.MongoClient:
    return pymongo.MongoClient(uri, serverSelectionTimeoutMS=5000, tz_aware=True)


def get_client(settings: CrystaloopSettings | None = None) -> pymongo.MongoClient:
    """A pinged, cached ``MongoClient``.

    Raises
    ------
    DatabaseUnavailable
        The server does not answer; the message carries the URI without credentials.
    """
    settings = settings or get_settings()
    uri = resolve_uri(settings)
    try:
        client = _client(uri)
        client.admin.command("ping")
    except (ConfigurationError, OperationFailure, PyMongoError, ValueError) as exc:  # ValueError: a bad port
        _client.cache_clear()
        raise DatabaseUnavailable(
            f"cannot reach MongoDB at {redact_uri(uri)} ({type(exc).__name__}); start it, fix "
            "CRYSTALOOP_MONGODB_URI, or unset it to use the embedded server"
        ) from None
    return client


def get_database(settings: CrystaloopSettings | None = None) -> Database:
    """The crystaloop database on the configured server."""
    settings = settings or get_settings()
    return get_client(settings)[settings.database]
