"""Campaigns and their rounds: the lease, step records and stop requests.

A campaign document (``campaigns``) holds the lease that lets one process act on
it; each round has a document in ``campaign_rounds`` whose ``steps`` record what
every step did. Every write is one conditional update, so a second process never
acts on a campaign whose lease it does not hold.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pymongo
from pymongo import ReturnDocument
from pymongo.database import Database

from crystaloop.db.documents import CampaignDoc, Lease, RoundDoc, StepRecord, utcnow
from crystaloop.db.store import default_owner


class LeaseLost(RuntimeError):
    """Another process holds (or took over) the campaign's lease."""


class CampaignStore:
    """Campaign documents, leases and round records.

    Parameters
    ----------
    database
        The crystaloop database.
    """

    def __init__(self, database: Database) -> None:
        self.campaigns = database["campaigns"]
        self.rounds = database["campaign_rounds"]
        self.campaigns.create_index("name", unique=True)
        self.rounds.create_index([("campaign", 1), ("round", 1)], unique=True)
        # The loop's per-round reads (what a round selected, submitted, harvested) on the
        # full candidate documents; the store's own queries go through its summaries.
        database["candidates"].create_index([("campaign", 1), ("selected_round", 1), ("state", 1)])

    # -- campaigns -------------------------------------------------------------------------

    def ensure(self, name: str, config: dict[str, Any]) -> CampaignDoc:
        """The campaign ``name``, created with ``config`` if it does not exist yet."""
        found = self.campaigns.find_one({"name": name}, {"_id": 0})
        if found is None:
            try:
                self.campaigns.insert_one(CampaignDoc(name=name, config=config).model_dump())
            except pymongo.errors.DuplicateKeyError:  # created by a concurrent process
                pass
            found = self.campaigns.find_one({"name": name}, {"_id": 0})
        return CampaignDoc.model_validate(found)

    def get(self, name: str) -> CampaignDoc | None:
        """The campaign document, or None."""
        found = self.campaigns.find_one({"name": name}, {"_id": 0})
        return CampaignDoc.model_validate(found) if found else None

    def require(self, name: str) -> CampaignDoc:
        """The campaign document.

        Raises
        ------
        UserError
            No campaign of that name (the line lists the known ones).
        """
        from crystaloop.errors import UserError

        doc = self.get(name)
        if doc is None:
            known = ", ".join(c.name for c in self.list()) or "none yet"
            raise UserError(
                f"no campaign named {name!r} (campaigns: {known}); start one with `crystaloop campaign run FILE`"
            )
        return doc

    def list(self) -> list[CampaignDoc]:
        """Every campaign, newest first."""
        cursor = self.campaigns.find({}, {"_id": 0}).sort("created_at", pymongo.DESCENDING)
        return [CampaignDoc.model_validate(d) for d in cursor]

    def update(self, name: str, token: str | None = None, **fields: Any) -> None:
        """Set fields on the campaign; with ``token``, only while that lease is held.

        Raises
        ------
        LeaseLost
            ``token`` is given and no longer holds the lease.
        """
        query: dict[str, Any] = {"name": name}
        if token is not None:
            query["lease.token"] = token
        result = self.campaigns.update_one(query, {"$set": {**fields, "updated_at": utcnow()}})
        if token is not None and result.matched_count == 0:
            raise LeaseLost(f"campaign {name!r}: the lease was taken over by another process")

    def request_stop(self, name: str) -> bool:
        """Ask the running process to stop after its current step. False if there is no campaign."""
        result = self.campaigns.update_one(
            {"name": name}, {"$set": {"stop_requested": True, "updated_at": utcnow()}}
        )
        return result.matched_count == 1

    # -- lease -----------------------------------------------------------------------------

    def acquire_lease(
        self, name: str, *, ttl_s: float = 120.0, owner: str | None = None, replace_token: str | None = None
    ) -> Lease | None:
        """Take the lease if it is free, expired, already this owner's, or still ``replace_token``.

        ``replace_token`` takes over a lease whose holder is known to be dead (a process of
        this host that no longer exists). Returns None if the lease is held elsewhere.
        """
        now = utcnow()
        owner = owner or default_owner()
        lease = Lease(
            owner=owner, token=uuid.uuid4().hex, heartbeat_at=now, expires_at=now + timedelta(seconds=ttl_s)
        )
        free = [{"lease": None}, {"lease.expires_at": {"$lt": now}}, {"lease.owner": owner}]
        if replace_token:
            free.append({"lease.token": replace_token})
        found = self.campaigns.find_one_and_update(
            {"name": name, "$or": free},
            {"$set": {"lease": lease.model_dump(), "updated_at": now}},
            projection={"_id": 0, "name": 1},
            return_document=ReturnDocument.AFTER,
        )
        return lease if found else None

    def running(self) -> list[str]:
        """Names of the campaigns whose lease is live (held and not expired): a process runs them,
        unless it died on this host (:meth:`dead_local_holder`)."""
        docs = self.campaigns.find({"lease.expires_at": {"$gt": utcnow()}}, {"_id": 0, "name": 1})
        return sorted(d["name"] for d in docs if self.dead_local_holder(d["name"]) is None)

    def dead_local_holder(self, name: str) -> str | None:
        """The token of the lease if its holder is a process of this host that has exited."""
        import os
        import socket

        doc = self.get(name)
        if doc is None or doc.lease is None:
            return None
        host, _, pid = doc.lease.owner.rpartition(":")
        if host != socket.gethostname() or not pid.isdigit():
            return None
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return doc.lease.token
        except PermissionError:  # alive, owned by another user
            return None
        return None

    def renew_lease(self, name: str, token: str, *, ttl_s: float = 120.0) -> bool:
        """Push the lease's expiry forward; False if it was taken over."""
        now = utcnow()
        result = self.campaigns.update_one(
            {"name": name, "lease.token": token},
            {"$set": {"lease.heartbeat_at": now, "lease.expires_at": now + timedelta(seconds=ttl_s)}},
        )
        return result.matched_count == 1

    def release_lease(self, name: str, token: str) -> None:
        """Give the lease up (only if still held with ``token``)."""
        self.campaigns.update_one({"name": name, "lease.token": token}, {"$set": {"lease": None}})

    # -- rounds ----------------------------------------------------------------------------

    def round(self, name: str, number: int) -> RoundDoc | None:
        """One round's document, or None."""
        found = self.rounds.find_one({"campaign": name, "round": number}, {"_id": 0})
        return RoundDoc.model_validate(found) if found else None

    def all_rounds(self, name: str) -> list[RoundDoc]:
        """Every round of the campaign, in order."""
        cursor = self.rounds.find({"campaign": name}, {"_id": 0}).sort("round", pymongo.ASCENDING)
        return [RoundDoc.model_validate(d) for d in cursor]

    def start_round(self, name: str, number: int) -> RoundDoc:
        """The round's document, created if new."""
        self.rounds.update_one(
            {"campaign": name, "round": number},
            {"$setOnInsert": RoundDoc(campaign=name, round=number).model_dump()},
            upsert=True,
        )
        return self.round(name, number)

    def record_step(self, name: str, number: int, step: StepRecord, *, metrics: dict | None = None) -> None:
        """Write a step's record (``running``, ``done`` or ``failed``) on the round's document."""
        fields: dict[str, Any] = {f"steps.{step.name}": step.model_dump()}
        for key, value in (metrics or {}).items():
            fields[f"metrics.{key}"] = value
        self.rounds.update_one({"campaign": name, "round": number}, {"$set": fields})

    def finish_round(self, name: str, number: int, counts: dict[str, int]) -> None:
        """Mark the round finished with its summary counts."""
        self.rounds.update_one(
            {"campaign": name, "round": number}, {"$set": {"counts": counts, "finished_at": utcnow()}}
        )
