"""The shared cache's batching: a burst of lookups, writes and lease waits costs a few round
trips, not one per key, and the bounds drop (and count) only what is past them."""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from sidecar.dns.cache import RawEntry, new_entry
from sidecar.dns.wire import make_key
from sidecar.fleet import codec
from sidecar.fleet.client import SharedCache
from sidecar.testing.redisserver import RedisServer, available

# The redis_server fixture comes with the helpers.
from tests.test_fleet_shared import redis_server  # noqa: F401

pytestmark = pytest.mark.skipif(available() is not None, reason=str(available()))


class RoundTrips:
    """Counts what ``shared`` sends: each ``_send`` is one round trip (its commands leave
    together on one connection)."""

    def __init__(self, shared: SharedCache) -> None:
        self.trips = 0
        send = shared._send

        async def counted(commands: list[tuple[Any, ...]]) -> list[Any]:
            self.trips += 1
            return await send(commands)

        shared._send = counted  # type: ignore[method-assign]


def commands(srv: RedisServer) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in srv.cli("info", "commandstats").splitlines():
        if line.startswith("cmdstat_"):
            name, _, rest = line.partition(":")
            out[name[len("cmdstat_"):]] = int(rest.split(",")[0].partition("=")[2])
    return out


def entry(now: float, ttl: float = 300.0) -> RawEntry:
    body = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, int(ttl), 4) + b"\x7f\x00\x00\x01"
    return new_entry(0, 1, 0, 0, body, (6,), now, ttl)


async def until(cond: Any, turns: int = 500) -> None:
    """Bounded wait for a state another connection brings (no event to await for it)."""
    for _ in range(turns):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in 5 s")


@pytest.fixture
async def caches(redis_server: RedisServer) -> AsyncIterator[Any]:  # noqa: F811
    """``await caches(**kw)``: a started SharedCache on ``redis_server`` (or ``url``), its
    breaker closed and (unless ``live=False``) its notices subscribed; closed at the end."""
    made: list[SharedCache] = []

    async def make(url: str | None = None, live: bool = True, **kw: Any) -> SharedCache:
        sc = SharedCache(url or redis_server.url, deadline=0.5, **kw)
        made.append(sc)
        await sc.start()
        assert sc.breaker.state == "closed"
        if live:
            await until(lambda: sc.notices.live)
        return sc

    try:
        yield make
    finally:
        for sc in made:
            await sc.close()


def keys(n: int, tag: str = "h") -> list[bytes]:
    return [make_key(f"{tag}{i}.example.test", 1 + 27 * (i % 2)) for i in range(n)]


async def test_a_burst_of_lookups_takes_a_few_round_trips(caches, redis_server):  # noqa: F811
    writer, reader = await caches(), await caches()
    ks = keys(400)
    for k in ks[:200]:                                    # half of them in the shared cache
        writer.put(k, entry(writer.clock()))
    await writer.flush(5.0)
    assert writer.stats()["writes"] == 200
    trips = RoundTrips(reader)
    before = commands(redis_server)
    got = await asyncio.gather(*(reader.lookup(k, lambda: 0.05) for k in ks))
    after = commands(redis_server)
    assert all(e is not None for e in got[:200]) and all(e is None for e in got[200:])
    st = reader.stats()
    assert st["hits"] == 200 and st["leases"]["won"] == 200 and st["busy"] == 0, st
    assert trips.trips <= 2, trips.trips                  # 400 keys: one batch of 400
    # one script per batch (a single server), each of its keys looked up once
    assert after.get("evalsha", 0) - before.get("evalsha", 0) == trips.trips
    assert after.get("get", 0) - before.get("get", 0) == 400
    assert after.get("set", 0) - before.get("set", 0) == 200  # a lease per key not found


async def test_a_burst_of_writes_takes_a_few_round_trips_and_drops_nothing(
        caches, redis_server):  # noqa: F811
    sc = await caches()
    trips = RoundTrips(sc)
    now = sc.clock()
    for k in keys(1000):
        sc.put(k, entry(now))
    await sc.flush(5.0)
    st = sc.stats()
    assert st["writes"] == 1000 and st["write_drops"] == 0, st
    assert trips.trips <= 3, trips.trips                  # 1000 keys in batches of 512
    assert int(redis_server.cli("dbsize")) == 1000


async def test_writes_past_the_key_bound_are_dropped_and_counted(caches):
    sc = await caches(max_writes=50)
    now = sc.clock()
    for k in keys(80):                                    # one iteration: none sent yet
        sc.put(k, entry(now))
    assert sc.stats()["writes_inflight"] == 50
    await sc.flush(5.0)
    st = sc.stats()
    assert st["writes"] == 50 and st["write_drops"] == 30, st


async def test_writes_past_the_byte_bound_are_dropped_and_counted(caches):
    now = time.monotonic()
    size = len(codec.encode(keys(1)[0], entry(now), now, time.time()) or b"")
    assert size > 0                                       # every value here has this size
    sc = await caches(max_write_bytes=10 * size + size // 2)
    for k in keys(30):
        sc.put(k, entry(now))
    await sc.flush(5.0)
    st = sc.stats()
    assert st["writes"] == 10 and st["write_drops"] == 20, st
    assert st["write_queue_bytes"] == 0


async def test_lease_waiters_are_polled_together_while_the_notices_are_down(
        caches, redis_server):  # noqa: F811
    holder, waiter = await caches(), await caches(backstop_ticks=10**6)
    await waiter.notices.close()                          # what a refused SUBSCRIBE leaves
    ks = keys(200, "w")
    assert all(e is None for e in await asyncio.gather(
        *(holder.lookup(k, lambda: 0.05) for k in ks)))
    assert holder.stats()["leases"]["won"] == 200
    trips = RoundTrips(waiter)
    waits = [asyncio.ensure_future(waiter.lookup(k, lambda: 0.3)) for k in ks]
    await asyncio.sleep(0.05)                             # the holder's upstream time
    now = holder.clock()
    for k in ks:
        holder.put(k, entry(now))
    got = await asyncio.gather(*waits)
    st = waiter.stats()
    assert all(e is not None for e in got)
    assert st["leases"]["waited"] == 200 and st["leases"]["wait_hits"] == 200, st
    assert st["notices"]["used"] == 0, st["notices"]
    # one read of all 200 keys per tick, not one per waiter and tick
    assert st["batches"]["polls"] <= 0.3 / waiter.poll_interval + 2, st["batches"]
    assert trips.trips <= st["batches"]["polls"] + 2, (trips.trips, st["batches"])


async def test_a_waiter_outlasts_a_holder_that_answers_in_a_plain_miss_time(caches):
    """A waiter given ``plain`` (what its own upstream query would take) still gets the
    value of a holder that resolves in exactly that time: the holder's write and our poll
    come on top, so a wait of just ``plain`` would end right before the value arrives."""
    plain = 0.05
    holder, waiter = await caches(), await caches()
    hits = 0
    for k in keys(5, "p"):
        assert await holder.lookup(k, lambda: plain) is None
        wait = asyncio.ensure_future(waiter.lookup(k, lambda: plain))
        await asyncio.sleep(plain)                        # holder: its upstream query
        holder.put(k, entry(holder.clock()))
        hits += await wait is not None
    st = waiter.stats()
    assert hits == 5 and st["leases"]["timeouts"] == 0, st
    assert waiter.lease_wait(plain) <= waiter.lease_ttl


async def test_the_lease_wait_never_passes_the_lease(caches):
    sc = await caches()
    assert sc.lease_wait(5.0) == sc.lease_ttl


async def test_a_reply_in_time_that_a_busy_loop_reads_late_is_no_failure(redis_server):  # noqa: F811
    """The loop runs its timers before it reads its sockets: after a long turn (a burst),
    the deadline must not cancel a reply that is already there and open the breaker."""
    sc = SharedCache(redis_server.url, deadline=0.05)
    await sc.start()
    try:
        redis_server.pause()                              # the batch goes out, no reply yet
        try:
            lookup = asyncio.ensure_future(sc.lookup(keys(1, "g")[0], lambda: 0.05))
            await asyncio.sleep(0.02)
        finally:
            redis_server.resume()                         # it replies within a millisecond
        time.sleep(0.1)  # noqa: ASYNC251 (on purpose: one long turn of the loop past the deadline)
        assert await lookup is None                       # a miss, the lease won
        st = sc.stats()
        assert st["errors"]["timeout"] == 0 and st["state"] == "closed", st
        assert st["leases"]["won"] == 1
    finally:
        await sc.close()


async def two_stored(sc: SharedCache, tag: str) -> list[bytes]:
    """Two keys whose values ``sc`` wrote to the server."""
    ks = keys(2, tag)
    now = sc.clock()
    for k in ks:
        sc.put(k, entry(now))
    await sc.flush(5.0)
    assert sc.stats()["writes"] == 2
    return ks


async def test_a_call_that_timed_out_leaves_no_reply_for_the_next_one(redis_server):  # noqa: F811
    """A batch whose deadline passes mid-read is cancelled; its reply still comes. The lane
    (its own connection) must not hand that reply to the next batch: keys would get each
    other's values (refused by the codec's key check, i.e. counted corrupt, at best)."""
    sc = SharedCache(redis_server.url, deadline=0.05)
    try:
        await sc.start()
        a, b = await two_stored(sc, "lane")
        redis_server.cli("client", "pause", "400", "all")  # replies held for 400 ms
        try:
            assert await sc.lookup(a, lambda: 0.05) is None
            assert sc.stats()["errors"]["timeout"] == 1
        finally:
            redis_server.cli("client", "unpause")
        await until(lambda: sc.breaker.state == "closed")
        got = await sc.lookup(b, lambda: 0.05)
        st = sc.stats()
        assert got is not None and st["hits"] == 1, st
        assert st["errors"]["corrupt"] == 0 and st["rejected"]["key"] == 0, st
    finally:
        await sc.close()


async def test_a_lane_cut_short_while_connecting_is_not_reused_out_of_step(redis_server):  # noqa: F811
    """A lane connects inside a deadline (at start, or again after an error); redis-py's
    handshake sends commands of its own and reads their replies. Cut short by the deadline
    in between, the connection would stay open with a reply still due, and every later
    batch on that lane would read the reply of the call before it."""
    writer = SharedCache(redis_server.url, deadline=0.5)
    sc = SharedCache(redis_server.url, deadline=0.05)
    try:
        await writer.start()
        a, b = await two_stored(writer, "handshake")
        redis_server.cli("client", "pause", "500", "all")  # the handshakes' replies wait
        try:
            await sc.start()                               # its deadline cuts them short
            assert sc.breaker.state != "closed"
        finally:
            redis_server.cli("client", "unpause")
        await until(lambda: sc.breaker.state == "closed")
        got = await asyncio.gather(*(sc.lookup(k, lambda: 0.05) for k in (a, b)))
        st = sc.stats()
        assert all(e is not None for e in got) and st["hits"] == 2, st
        assert st["errors"]["corrupt"] == 0, st
        # and no lane, used since or not, holds a reply nobody asked for
        assert sc._lanes is not None
        for conn in sc._lanes._all:
            pending = getattr(conn, "can_read", None) or conn.can_read_destructive  # < 8.0
            assert not conn.is_connected or not await pending()
    finally:
        await sc.close()
        await writer.close()
