"""A process's lease on a campaign, its heartbeat, and riding out a lost database."""

from __future__ import annotations

import time

import pytest
from pymongo.errors import AutoReconnect

from crystaloop.db.campaigns import CampaignStore, LeaseLost
from crystaloop.db.lease import CampaignLease, rides_out_outages
from crystaloop.errors import DatabaseUnavailable


@pytest.fixture
def campaigns(database):
    store = CampaignStore(database)
    store.ensure("leased", {"name": "leased"})
    return store


def make_lease(database, **kwargs) -> CampaignLease:
    return CampaignLease("leased", {"name": "leased"}, database, **kwargs)


def test_a_live_holder_keeps_the_lease_until_it_releases_it(database, campaigns):
    other = campaigns.acquire_lease("leased", ttl_s=600, owner="elsewhere:1")
    lease = make_lease(database)
    assert not lease.acquire()
    campaigns.release_lease("leased", other.token)
    assert lease.acquire()
    assert campaigns.get("leased").lease.token == lease.token
    lease.release()
    assert campaigns.get("leased").lease is None


def test_the_heartbeat_renews_the_lease_and_notices_a_takeover(database, campaigns):
    lease = make_lease(database, ttl_s=60, heartbeat_s=0.05)
    assert lease.acquire()
    first = campaigns.get("leased").lease.expires_at
    lease.start_heartbeat()
    try:
        time.sleep(0.4)
        assert campaigns.get("leased").lease.expires_at > first
        lease.check()  # still ours
        campaigns.campaigns.update_one({"name": "leased"}, {"$set": {"lease.token": "taken-over"}})
        lease.heartbeat.join(timeout=5)
        with pytest.raises(LeaseLost):
            lease.check()
    finally:
        lease.release()
    assert campaigns.get("leased").lease.token == "taken-over"  # a lost lease is not released


def test_call_runs_an_action_again_after_the_database_comes_back(database, campaigns):
    lines: list[str] = []
    lease = make_lease(database, retry_s=30, log=lines.append)
    assert lease.acquire()
    attempts = []

    def flaky(x, *, y):
        attempts.append(x)
        if len(attempts) == 1:
            raise AutoReconnect("server went away")
        return x + y

    assert lease.call(flaky, 3, y=4, what="a test update") == 7
    assert attempts == [3, 3]
    assert lines and "database unreachable (AutoReconnect)" in lines[0]
    # The reconnect took the lease again in the (new) connection.
    assert lease.campaigns.get("leased").lease.token == lease.token
    lease.release()


def test_an_outage_longer_than_retry_s_is_one_line_for_the_user(database, campaigns):
    lease = make_lease(database, retry_s=0)

    def down():
        raise AutoReconnect("no server")

    with pytest.raises(DatabaseUnavailable) as info:
        lease.call(down, what="round 2 harvest")
    assert "during round 2 harvest" in info.value.message and "\n" not in info.value.message


def test_a_decorated_method_rides_out_outages(database, campaigns):
    class Recorder:
        def __init__(self, lease):
            self.lease, self.calls = lease, 0

        @rides_out_outages("a recorded update")
        def record(self, value):
            self.calls += 1
            if self.calls == 1:
                raise AutoReconnect("blip")
            return value * 2

    recorder = Recorder(make_lease(database, retry_s=30))
    assert recorder.record(21) == 42 and recorder.calls == 2
