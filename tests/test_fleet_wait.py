"""How long a lease waiter waits: what a plain miss of its own takes right now, plus the
holder's write as long as this sidecar's own such writes take, plus a poll. Under a burst
the loop's lag stretches all three; an estimate from calm times ends the wait just before
the holder's value lands and then pays a plain miss on top (and an upstream query)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sidecar.fleet.batch import Batcher
from sidecar.fleet.client import SharedCache
from sidecar.testing.redisserver import available
from tests.test_fleet_batch import caches, entry, keys  # noqa: F401
from tests.test_fleet_shared import redis_server  # noqa: F401


class _SlowPool:
    """A pool whose upstream has never answered yet (no latency samples) and whose
    queries hang until the test ends."""

    upstreams: list[Any] = []
    timeout = 0.4  # before any answer, the upstream's guess is a quarter of this

    def __init__(self) -> None:
        self.answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def pool_for(self, name: str) -> _SlowPool:
        return self

    async def query(self, name: str, qtype: int) -> Any:
        return await asyncio.shield(self.answer)


class _NoSecond:
    """A second level that never has the value (every fetch goes upstream)."""

    async def lookup(self, key: bytes, wait: Any) -> None:
        return None

    def late(self, key: bytes) -> None:
        return None

    def put(self, key: bytes, entry: Any) -> None:
        pass

    def reject(self, key: bytes, reason: str) -> None:
        pass


def _key(label: str) -> bytes:
    return bytes([len(label)]) + label.encode() + b"\x04test\x00\x00\x01\x00\x01"


async def test_a_plain_miss_costs_what_the_misses_in_flight_already_took() -> None:
    """Misses still unanswered after 0.3 s show that a plain miss takes at least that now,
    whatever the upstream's (here: missing) latency samples say."""
    from sidecar.dns.cache import Cache
    from sidecar.miss.entry import TtlPolicy
    from sidecar.miss.fetch import Fetcher

    pool = _SlowPool()
    fetcher = Fetcher(Cache(100), pool, TtlPolicy(), budget=2.0,  # type: ignore[arg-type]
                      second=_NoSecond())
    try:
        assert fetcher._lease_wait(_key("x")) == pytest.approx(pool.timeout / 4)
        for i in range(10):
            fetcher.lookup(_key(f"h{i}"))
        await asyncio.sleep(0.3)
        fetcher._plain_miss.clear()  # not the estimate reused from before
        assert fetcher._lease_wait(_key("x")) >= 0.3
    finally:
        await fetcher.close()


async def test_items_waited_for_leave_first_even_when_every_run_is_out() -> None:
    started: list[list[str]] = []
    release = asyncio.Event()

    async def run(batch: list[str]) -> None:
        started.append(batch)
        await release.wait()

    b: Batcher[str] = Batcher(run, max_batch=10, parallel=1, reserve=1)
    b.add("a")
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    b.add("b")
    b.add("held", first=True)
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert started == [["a"], ["held"]]  # "b" waits for the one run it may have
    release.set()
    await b.drain(1.0)
    assert started[2:] == [["b"]] and b.pending == 0


@pytest.mark.skipif(available() is not None, reason=str(available()))
async def test_a_waiter_outlasts_a_holder_whose_write_queues_as_long_as_ours(
        caches, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """Round trips are quick, but writes take 0.15-0.2 s from queue to acknowledgement (a
    backlog, a loop behind): the waiter, whose own held values took 0.2 s to be written,
    waits for that and gets the value, instead of giving up after its plain miss and two
    round trips and asking upstream itself."""
    plain = 0.05
    holder, waiter = await caches(), await caches()

    def slow_writes(sc: SharedCache, delay: float) -> None:
        write_batch = sc._write_batch

        async def slow(batch: Any) -> None:
            await asyncio.sleep(delay)
            await write_batch(batch)

        monkeypatch.setattr(sc._writes, "_run", slow)

    slow_writes(waiter, 0.2)
    for k in keys(3, "own"):                  # the waiter held leases before, and wrote them
        assert await waiter.lookup(k, lambda: plain) is None
        waiter.put(k, entry(waiter.clock()))
    await waiter.flush(2.0)
    assert waiter.held_writes.count == 3

    slow_writes(holder, 0.15)
    hits = 0
    for k in keys(3, "q"):
        assert await holder.lookup(k, lambda: plain) is None
        wait = asyncio.ensure_future(waiter.lookup(k, lambda: plain))
        await asyncio.sleep(plain)            # the holder's upstream query
        holder.put(k, entry(holder.clock()))
        hits += await wait is not None
    st = waiter.stats()
    assert hits == 3 and st["leases"]["timeouts"] == 0, st


class _LateSecond(_NoSecond):
    """A second level whose wait gave up; the holder's entry comes (or not) through
    ``theirs``, which the test settles."""

    def __init__(self) -> None:
        self.theirs: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def late(self, key: bytes) -> asyncio.Future[Any]:
        return self.theirs


async def test_a_late_value_from_the_fleet_beats_our_own_slow_upstream_answer() -> None:
    from sidecar.dns.cache import BODY, EXPIRES, Cache
    from sidecar.miss.entry import TtlPolicy
    from sidecar.miss.fetch import Fetcher

    pool = _SlowPool()                                   # our own query never answers
    second = _LateSecond()
    cache = Cache(100)
    fetcher = Fetcher(cache, pool, TtlPolicy(), budget=2.0,  # type: ignore[arg-type]
                      second=second)
    try:
        key = _key("late")
        fut = fetcher.lookup(key)
        await asyncio.sleep(0.05)                         # our upstream query is out
        assert fetcher._slots.free == fetcher.max_inflight - 1
        theirs = entry(fetcher.clock())
        second.theirs.set_result(theirs)
        async with asyncio.timeout(5):                    # ours would hang forever
            got, _ = await fut
        assert got[BODY] == theirs[BODY] and got[EXPIRES] == theirs[EXPIRES]
        assert cache.entries[key] is got                  # in the local cache too
        await asyncio.sleep(0)                            # our query's task ends cancelled
        assert fetcher._slots.free == fetcher.max_inflight, "the upstream slot was not freed"
    finally:
        await fetcher.close()


async def test_our_own_answer_first_stops_listening_for_the_late_one() -> None:
    from sidecar.dns.cache import Cache
    from sidecar.miss.entry import TtlPolicy
    from sidecar.miss.fetch import Fetcher

    pool = _SlowPool()
    second = _LateSecond()
    fetcher = Fetcher(Cache(100), pool, TtlPolicy(), budget=2.0,  # type: ignore[arg-type]
                      second=second)
    try:
        fut = fetcher.lookup(_key("own"))
        await asyncio.sleep(0.05)
        pool.answer.set_exception(OSError("upstream failed"))  # our own answer: a failure
        await fut
        assert second.theirs.cancelled()
    finally:
        await fetcher.close()
