"""Lease waiters are woken by the holder's write (a notice on the fleet's channel), not by
polling; notices are untrusted, published only for keys somebody waits for, and the
waiters fall back to polling while the subscription is down."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.fleet import codec, scripts
from sidecar.fleet.client import EARLY_BYTES, SharedCache
from sidecar.fleet.notify import Notices
from sidecar.testing.redisserver import RedisServer, available
from tests.test_fleet_batch import RoundTrips, caches, commands, entry, keys, until  # noqa: F401

# The redis_server fixture comes with the helpers.
from tests.test_fleet_shared import redis_server  # noqa: F401

pytestmark = pytest.mark.skipif(available() is not None, reason=str(available()))


async def hand_over(holder: SharedCache, waiter: SharedCache, ks: list[bytes]) -> list[Any]:
    """``holder`` takes the leases of ``ks``, ``waiter`` waits for them, then ``holder``
    writes them: what the waiter's lookups return."""
    assert all(e is None for e in await asyncio.gather(
        *(holder.lookup(k, lambda: 0.05) for k in ks)))
    waited = waiter.stats()["leases"]["waited"] + len(ks)
    waits = [asyncio.ensure_future(waiter.lookup(k, lambda: 5.0)) for k in ks]
    await until(lambda: waiter.stats()["leases"]["waited"] == waited)
    now = holder.clock()
    for k in ks:
        holder.put(k, entry(now))
    return await asyncio.gather(*waits)


@pytest.fixture
def acl_user(redis_server: RedisServer) -> Iterator[Callable[[list[str]], str]]:  # noqa: F811
    """``acl_user(argv)``: runs an ``ACL SETUSER dns-sidecar ...`` and gives the URL that logs
    in as that user; the user is deleted at the end."""
    def grant(argv: list[str]) -> str:
        redis_server.cli(*argv)
        return redis_server.url.replace("redis://", "redis://dns-sidecar:s3cret@")

    yield grant
    redis_server.cli("acl", "deluser", "dns-sidecar")


async def test_waiters_are_woken_by_the_holders_write_not_by_polls(caches):  # noqa: F811
    # A tick as long as the lease: the waiters' first read would come when they give up.
    holder, waiter = await caches(), await caches(poll_interval=1.0)
    trips = RoundTrips(waiter)
    got = await hand_over(holder, waiter, keys(200, "n"))
    st = waiter.stats()
    assert all(e is not None for e in got)
    assert st["leases"]["wait_hits"] == 200 and st["notices"]["used"] == 200, st
    assert holder.stats()["notices"]["sent"] == 200
    assert st["batches"]["polls"] == 0 and trips.trips == 1, (st["batches"], trips.trips)


async def test_a_write_nobody_waits_for_publishes_nothing(caches, redis_server):  # noqa: F811
    holder, other = await caches(), await caches()
    ks = keys(20, "q")
    assert all(e is None for e in await asyncio.gather(
        *(holder.lookup(k, lambda: 0.05) for k in ks)))
    before = commands(redis_server)
    now = holder.clock()
    for k in ks:
        holder.put(k, entry(now))
    await holder.flush(5.0)
    after = commands(redis_server)
    assert holder.stats()["writes"] == 20
    assert holder.stats()["notices"]["sent"] == 0
    assert after.get("publish", 0) == before.get("publish", 0)
    assert other.notices.received == 0


async def test_a_notice_before_its_waiter_is_kept_for_it(caches):  # noqa: F811
    """The notice and the lookup's reply come on two connections: the notice may win."""
    sc = await caches()
    k = keys(1, "e")[0]
    data_key = sc.data_key(k)
    value = b"v" * 40
    sc._notice(b"%d:%s%s" % (len(data_key), data_key, value))
    assert await sc._wait_for(data_key, lambda: 0.05) == value
    assert sc.stats()["notices"]["used"] == 1


@pytest.mark.parametrize("message", [
    b"garbage",
    b"9999999:x",
    b"12:dns-sidecar", # shorter than it says
    b"10:other:keyXXvalue",
    b"%d:dns-sidecar:v1:{a/1/1}" % len(b"dns-sidecar:v1:{a/1/1}"),  # no value
])
async def test_a_message_that_is_no_notice_is_counted_and_ignored(
        caches, redis_server, message):  # noqa: F811
    sc = await caches()
    redis_server.cli("publish", sc.channel.decode(), message.decode())
    await until(lambda: sc.notices.received == 1)
    st = sc.stats()["notices"]
    assert st["bad"] == 1 and st["used"] == 0 and st["live"], st


async def test_a_planted_notice_for_a_waited_key_is_decoded_like_any_value(
        caches, redis_server):  # noqa: F811
    holder, waiter = await caches(), await caches()
    k = keys(1, "z")[0]
    assert await holder.lookup(k, lambda: 0.05) is None
    wait = asyncio.ensure_future(waiter.lookup(k, lambda: 0.05))
    await until(lambda: waiter.stats()["leases"]["waited"] == 1)
    data_key = waiter.data_key(k)
    redis_server.cli("publish", waiter.channel.decode(),
                     f"{len(data_key)}:{data_key.decode()}not a value")
    assert await wait is None                             # resolve it ourselves
    st = waiter.stats()
    assert st["errors"]["corrupt"] == 1 and st["hits"] == 0, st
    assert st["notices"]["used"] == 1 and st["leases"]["timeouts"] == 1, st


async def test_scripts_the_server_lost_are_loaded_again(caches, redis_server):  # noqa: F811
    sc = await caches()
    redis_server.cli("script", "flush")
    ks = keys(3, "f")
    assert all(e is None for e in await asyncio.gather(
        *(sc.lookup(k, lambda: 0.05) for k in ks)))
    now = sc.clock()
    for k in ks:
        sc.put(k, entry(now))
    await sc.flush(5.0)
    st = sc.stats()
    assert st["leases"]["won"] == 3 and st["writes"] == 3, st
    assert st["state"] == "closed" and sum(st["errors"].values()) == 0, st
    assert sc.script_loads == 1
    assert redis_server.cli("script", "exists", scripts.LOOKUP_SHA).strip() == "1"


async def test_a_dropped_subscription_comes_back_and_waiters_get_what_it_missed(
        caches, redis_server):  # noqa: F811
    holder, waiter = await caches(), await caches(backstop_ticks=10**6)
    k = keys(1, "d")[0]
    assert await holder.lookup(k, lambda: 0.05) is None
    wait = asyncio.ensure_future(waiter.lookup(k, lambda: 5.0))
    await until(lambda: waiter.stats()["leases"]["waited"] == 1)
    redis_server.cli("client", "kill", "type", "pubsub")  # both sidecars' subscriptions
    holder.put(k, entry(holder.clock()))                  # published to nobody
    await holder.flush(5.0)
    assert await wait is not None                         # read, not noticed
    await until(lambda: waiter.notices.subscribed == 2)
    assert waiter.notices.failures == 1 and waiter.stats()["notices"]["used"] == 0


async def test_a_subscription_gone_silent_is_made_again(redis_server):  # noqa: F811
    """A server that stops answering without closing the connection (a host gone) must not
    leave the sidecar believing in notices that never come: the idle ping finds it."""
    sc = SharedCache(redis_server.url, deadline=0.2)
    sc.notices.idle = 0.05
    await sc.start()
    try:
        await until(lambda: sc.notices.live)
        redis_server.pause()
        try:
            await until(lambda: sc.notices.failures >= 1)
            assert not sc.notices.live
        finally:
            redis_server.resume()
        await until(lambda: sc.notices.live and sc.notices.subscribed >= 2)
    finally:
        await sc.close()


def _documented_acl() -> list[str]:
    """The ACL SETUSER line docs/fleet.md gives operators, as redis-cli arguments."""
    text = (Path(__file__).parent.parent / "docs" / "fleet.md").read_text()
    line = re.search(r"`ACL SETUSER (dns-sidecar [^`]+)`", text)
    assert line, "docs/fleet.md lost its ACL line"
    return ["acl", "setuser", *line.group(1).replace(">PASSWORD", ">s3cret").split()]


async def test_the_documented_acl_is_enough(caches, acl_user):  # noqa: F811
    url = acl_user(_documented_acl())
    holder, waiter = await caches(url), await caches(url, poll_interval=1.0)
    assert all(e is not None for e in await hand_over(holder, waiter, keys(5, "acl")))
    for sc in (holder, waiter):
        st = sc.stats()
        assert sum(st["errors"].values()) == 0 and st["state"] == "closed", st
    assert waiter.stats()["notices"]["used"] == 5


async def test_an_acl_without_the_channel_leaves_waiters_polling(caches, acl_user):  # noqa: F811
    url = acl_user([a for a in _documented_acl() if not a.startswith("&") and a != "+subscribe"])
    holder, waiter = await caches(url, live=False), await caches(url, live=False)
    await until(lambda: waiter.notices.failures >= 1)
    assert all(e is not None for e in await hand_over(holder, waiter, keys(1, "acl-poll")))
    st = waiter.stats()
    assert not st["notices"]["live"] and st["batches"]["polls"] >= 1, st
    assert st["state"] == "closed", st


async def test_a_wait_that_gave_up_still_gets_the_value_for_the_miss_path(caches):  # noqa: F811
    holder, waiter = await caches(), await caches()
    k = keys(1, "late")[0]
    assert await holder.lookup(k, lambda: 0.05) is None
    assert await waiter.lookup(k, lambda: 0.001) is None  # gave up: resolve it ourselves
    late = waiter.late(k)
    assert late is not None and waiter.late(k) is None    # taken once
    holder.put(k, entry(holder.clock()))
    assert await late is not None
    st = waiter.stats()
    assert st["leases"]["timeouts"] == 1 and st["leases"]["late_hits"] == 1, st
    assert st["hits"] == 1 and st["misses"] == 0, st


async def test_no_late_value_without_a_wait_that_gave_up(caches):  # noqa: F811
    sc = await caches()
    k = keys(1, "nolate")[0]
    assert await sc.lookup(k, lambda: 0.05) is None       # the lease is ours: no wait
    assert sc.late(k) is None


async def test_a_client_without_pubsub_leaves_waiters_polling(caches, redis_server):  # noqa: F811
    """redis-py before 8 has no pubsub() on its asyncio cluster client: no notices, and the
    lease waits still end with the value, by polling."""
    holder = await caches()
    waiter = SharedCache(redis_server.url, deadline=0.5)
    waiter.notices = Notices(None, waiter.channel, waiter._notice, waiter._notices_up,
                             deadline=0.5)
    await waiter.start()
    try:
        assert not waiter.notices.live and waiter.notices._task is None
        assert all(e is not None for e in await hand_over(holder, waiter, keys(1, "nopubsub")))
        assert waiter.stats()["batches"]["polls"] >= 1
    finally:
        await waiter.close()


async def test_notices_nobody_waits_for_are_kept_within_their_byte_bound(
        caches, redis_server):  # noqa: F811
    """Anyone who can publish on the channel can send notices for keys nobody waits for:
    what is kept of them for a late waiter stays within EARLY_BYTES, oldest out first."""
    sc = await caches()
    value = "v" * (codec.MAX_VALUE - 8)
    for i in range(40):                                   # 40 x ~76 KiB: ~3 MiB sent
        data_key = sc.data_key(keys(1, f"flood{i}-")[0]).decode()
        redis_server.cli("publish", sc.channel.decode(), f"{len(data_key)}:{data_key}{value}")
    await until(lambda: sc.notices.received == 40)
    kept = sum(len(v) for _t, v in sc._early.values())
    assert kept == sc._early_bytes <= EARLY_BYTES, (kept, sc._early_bytes)
    assert len(sc._early) == EARLY_BYTES // len(value)    # the newest that fit
    assert sc.data_key(keys(1, "flood39-")[0]) in sc._early
