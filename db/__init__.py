"""MongoDB access: connection (URI or embedded server), documents, candidate store, registry."""

from crystaloop.db.connection import get_client, get_database, resolve_uri
from crystaloop.db.documents import COLLECTIONS, CandidateState

__all__ = ["COLLECTIONS", "CandidateState", "get_client", "get_database", "resolve_uri"]
