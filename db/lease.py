"""One process's hold on a campaign: the lease, its heartbeat, and riding out a lost database.

:class:`CampaignLease` takes a campaign's lease (:meth:`CampaignStore.acquire_lease`), renews it
from a heartbeat thread, and gives it back. Its :meth:`~CampaignLease.call` (or the
:func:`rides_out_outages` decorator) runs a database action again after an outage, reconnecting
in between: with no URI configured that restarts the embedded server. Every step of a campaign is
idempotent, so an interrupted one is simply run again.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from pymongo.database import Database
from pymongo.errors import AutoReconnect, ConnectionFailure, ServerSelectionTimeoutError

from crystaloop.db.campaigns import CampaignStore, LeaseLost
from crystaloop.errors import DatabaseUnavailable, UserError

DB_ERRORS = (AutoReconnect, ConnectionFailure, ServerSelectionTimeoutError)
"""The pymongo errors of a database that went away (as opposed to a bad request)."""

T = TypeVar("T")


class Heartbeat(threading.Thread):
    """Renews a lease every ``interval`` seconds; sets ``lost`` when another process took it."""

    def __init__(self, lease: CampaignLease, *, interval: float) -> None:
        super().__init__(daemon=True, name=f"lease-{lease.name}")
        self.lease, self.interval = lease, interval
        self.stop_event = threading.Event()
        self.lost = False

    def run(self) -> None:
        while not self.stop_event.wait(self.interval):
            try:
                if not self.lease.campaigns.renew_lease(
                    self.lease.name, self.lease.token, ttl_s=self.lease.ttl_s
                ):
                    self.lost = True
                    return
            except DB_ERRORS:  # the main thread rides out the outage; keep trying
                continue


class CampaignLease:
    """The lease a process holds on the campaign ``name``, and the database it holds it in.

    Parameters
    ----------
    name
        The campaign.
    config
        The campaign's config document: a server that came back without its last writes gets
        the campaign again.
    database
        The crystaloop database (replaced by :meth:`reconnect`).
    ttl_s, heartbeat_s
        A lease not renewed within ``ttl_s`` seconds may be taken over; it is renewed every
        ``heartbeat_s``.
    retry_s
        How long :meth:`call` rides out a lost database (s).
    log
        Called with one line per retry.
    """

    def __init__(
        self,
        name: str,
        config: dict[str, Any],
        database: Database,
        *,
        ttl_s: float = 120.0,
        heartbeat_s: float = 20.0,
        retry_s: float = 600.0,
        log: Callable[[str], None] = lambda line: None,
    ) -> None:
        self.name, self.config = name, config
        self.ttl_s, self.heartbeat_s, self.retry_s = ttl_s, heartbeat_s, retry_s
        self.log = log
        self.token: str | None = None
        self.heartbeat: Heartbeat | None = None
        self._use(database)

    def _use(self, database: Database) -> None:
        self.database = database
        self.campaigns = CampaignStore(database)

    # -- holding ---------------------------------------------------------------------------

    def acquire(self, *, replace_dead: bool = True) -> bool:
        """Take the lease (or one whose holder died on this host) and start the heartbeat.

        Returns False when a live process holds it.
        """
        replace = self.campaigns.dead_local_holder(self.name) if replace_dead else None
        lease = self.campaigns.acquire_lease(self.name, ttl_s=self.ttl_s, replace_token=replace)
        if lease is None:
            return False
        self.token = lease.token
        return True

    def start_heartbeat(self) -> None:
        """Renew the lease from a daemon thread until :meth:`release`."""
        self.heartbeat = Heartbeat(self, interval=self.heartbeat_s)
        self.heartbeat.start()

    def check(self) -> None:
        """Raise :class:`LeaseLost` when the heartbeat found the lease taken over."""
        if self.heartbeat is not None and self.heartbeat.lost:
            raise LeaseLost(self.name)

    def release(self) -> None:
        """Stop the heartbeat and give the lease back; a database already gone is ignored."""
        if self.heartbeat is not None:
            self.heartbeat.stop_event.set()
        if self.token is None:
            return
        try:
            self.campaigns.release_lease(self.name, self.token)
        except DB_ERRORS:
            pass

    # -- outages ---------------------------------------------------------------------------

    def reconnect(self) -> None:
        """Connect again after an outage; with no URI configured this restarts the embedded server.

        Raises
        ------
        LeaseLost
            The database is back and another process holds the lease.
        """
        from crystaloop.db import get_database
        from crystaloop.db.connection import _client

        _client.cache_clear()
        try:
            self._use(get_database())
            # A server killed hard may come back without its last writes, the lease among them.
            self.campaigns.ensure(self.name, self.config)
            lease = self.campaigns.acquire_lease(self.name, ttl_s=self.ttl_s, replace_token=self.token)
        except (UserError, *DB_ERRORS):  # not back yet; the caller retries
            return
        if lease is None:
            raise LeaseLost(self.name)
        self.token = lease.token

    def call(self, action: Callable[..., T], *args: Any, what: str = "a database update", **kwargs: Any) -> T:
        """``action(*args, **kwargs)``, run again after each outage for up to ``retry_s`` seconds.

        ``action`` should read the database through this lease (``lease.database``,
        ``lease.campaigns``) when it runs, since a reconnect replaces them.

        Raises
        ------
        DatabaseUnavailable
            The database did not come back in time.
        """
        deadline = time.monotonic() + self.retry_s
        delay = 1.0
        while True:
            try:
                return action(*args, **kwargs)
            except DB_ERRORS as exc:
                if time.monotonic() > deadline:
                    raise DatabaseUnavailable(_outage_message(exc, what)) from None
                self.log(f"  database unreachable ({type(exc).__name__}); retrying in {delay:.0f} s")
                time.sleep(delay)
                delay = min(delay * 2, 30.0)
                self.reconnect()


def rides_out_outages(what: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Decorate a method of an object with a ``lease`` (:class:`CampaignLease`) so that it runs
    through :meth:`CampaignLease.call`: retried after a lost database, ``what`` naming it."""

    def decorate(method: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(method)
        def wrapper(self, *args: Any, **kwargs: Any) -> T:
            return self.lease.call(method, self, *args, what=what, **kwargs)

        return wrapper

    return decorate


def _outage_message(exc: Exception, what: str) -> str:
    from crystaloop.settings import get_settings, redact_uri

    settings = get_settings()
    uri = redact_uri(settings.mongodb_uri) if settings.mongodb_uri else "the embedded server"
    return (
        f"lost MongoDB ({uri}, {type(exc).__name__}) during {what}; nothing done is lost: start the "
        "database and run `crystaloop campaign run` again to resume"
    )
