"""The upstream in-flight bound (sidecar.miss.inflight.Slots): FIFO hand-over, no slot leaks; the
per-zone slots and the zone key they are grouped by."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.miss.inflight import Slots, ZoneSlots, zone_key


async def test_take_until_full_then_release_frees():
    s = Slots(2)
    assert s.take() and s.take()
    assert not s.take()
    s.release()
    assert s.free == 1
    assert s.take()


async def test_release_hands_the_slot_to_the_oldest_waiter():
    s = Slots(1)
    assert s.take()
    order: list[str] = []

    async def waiter(tag: str) -> None:
        assert await s.wait(5)
        order.append(tag)

    first = asyncio.create_task(waiter("first"))
    await asyncio.sleep(0)
    second = asyncio.create_task(waiter("second"))
    await asyncio.sleep(0)
    assert not s.take()  # others are queued: no jumping the queue
    s.release()
    await first
    assert order == ["first"] and s.free == 0  # passed on, never freed in between
    s.release()
    await second
    assert order == ["first", "second"]
    s.release()
    assert s.free == 1


async def test_timed_out_waiter_leaks_nothing():
    s = Slots(1)
    assert s.take()
    assert await s.wait(0.01) is False
    s.release()
    assert s.free == 1 and s.take()


async def test_cancelled_waiter_passes_a_handed_slot_on():
    s = Slots(1)
    assert s.take()
    task = asyncio.create_task(s.wait(5))
    await asyncio.sleep(0)
    s.release()  # handed to the waiter ...
    task.cancel()  # ... which is cancelled before it runs
    try:
        await task
    except asyncio.CancelledError:
        pass
    # Either the waiter got the slot (and holds it) or it passed it back: never lost.
    if task.cancelled():
        assert s.free == 1
    else:
        assert task.result() is True and s.free == 0


async def test_the_bound_is_held_under_load():
    s = Slots(3)
    busy = peak = 0

    async def fetch() -> None:
        nonlocal busy, peak
        if not s.take():
            assert await s.wait(5)
        busy += 1
        peak = max(peak, busy)
        await asyncio.sleep(0)
        busy -= 1
        s.release()

    await asyncio.gather(*(fetch() for _ in range(50)))
    assert peak == 3 and s.free == 3


async def test_waiting_held_and_idle_are_counted():
    s = Slots(1)
    assert s.idle and s.held == 0
    assert s.take()
    assert s.held == 1 and not s.idle
    task = asyncio.create_task(s.wait(5))
    await asyncio.sleep(0)
    assert s.waiting == 1
    s.release()
    assert await task and s.waiting == 0 and s.held == 1
    assert await s.wait(0.01) is False and s.waiting == 0  # a timed-out wait is uncounted
    s.release()
    assert s.idle


def test_zone_slow_since_looks_at_the_oldest_fetch():
    z = ZoneSlots(4)
    assert not z.slow_since(100.0)
    z.started.update({1: 10.0, 2: 20.0, 3: 30.0})
    assert z.slow_since(15.0) and not z.slow_since(5.0)
    del z.started[1]  # the oldest answered: the next one decides
    assert not z.slow_since(15.0) and z.slow_since(25.0)


@pytest.mark.parametrize("name, key", [
    ("www.example.com", "example.com"),
    ("a.b.c.example.test", "example.test"),
    ("x.y.shop.co.uk", "shop.co.uk"),
    ("www.abc.com", "abc.com"),
    ("x.github.io", "github.io"),
    ("example.com", "example.com"),
    ("com", "com"),
    ("", ""),
])
def test_zone_key(name, key):
    assert zone_key(name) == key


# ------------------------------------------------------------------ jostling (resolver)


class _StuckPool:
    """A pool whose queries never end, until ``answer`` is set."""

    timeout = 1.0

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.answer: asyncio.Future = asyncio.get_running_loop().create_future()

    def pool_for(self, name: str) -> _StuckPool:
        return self

    async def query(self, name: str, qtype: int):
        self.asked.append(name)
        return await asyncio.shield(self.answer)


def _key(label: str) -> bytes:
    return bytes([len(label)]) + label.encode() + b"\x04test\x00\x00\x01\x00\x01"


def _resolver(pool: _StuckPool, slots: int):
    from sidecar.dns.cache import Cache
    from sidecar.miss.entry import TtlPolicy
    from sidecar.miss.fetch import Fetcher

    return Fetcher(Cache(10), pool, TtlPolicy(), max_inflight=slots, budget=2.0,
                    jostle_after=0.0)


async def _until(pred) -> None:
    for _ in range(1000):
        if pred():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never met")


async def test_jostled_fetch_answers_servfail_and_hands_its_slot_over():
    from sidecar.dns.cache import RCODE
    from sidecar.dns.wire import SERVFAIL

    pool = _StuckPool()
    res = _resolver(pool, 1)
    old = res.lookup(_key("old"))
    await _until(lambda: pool.asked == ["old.test"])
    new = res.lookup(_key("new"))
    # The old fetch answers (a SERVFAIL entry: its clients get a reply, not silence) ...
    entry, stale = await asyncio.wait_for(asyncio.shield(old), 5)
    assert entry[RCODE] == SERVFAIL and not stale and res.jostled == 1
    # ... and the newcomer asks upstream at once, on the old fetch's slot.
    await _until(lambda: pool.asked == ["old.test", "new.test"])
    assert res._slots.free == 0 and res.waiting == 0 and not res._jostled
    assert res.cache.get(_key("old")) is None  # our overload: not cached
    pool.answer.set_exception(RuntimeError("stop"))
    await new
    assert res._slots.free == 1 and not res._asking and res.shed == 0


async def test_a_jostled_fetch_cancelled_at_shutdown_stays_cancelled():
    pool = _StuckPool()
    res = _resolver(pool, 1)
    old = res.lookup(_key("old"))
    await _until(lambda: pool.asked == ["old.test"])
    new = res.lookup(_key("new"))
    await asyncio.sleep(0)  # the newcomer has jostled: the cancel is on its way
    assert res._jostled
    await res.close()  # shutdown cancels both before the jostled one ran
    assert old.cancelled() and new.cancelled()
    assert not res._jostled and not res._asking and res._slots.free == 1


async def test_entry_times_come_from_the_cache_clock():
    # One clock for entry times: storage, expiry and the serve-stale recheck window all read
    # the cache's clock, whatever the event loop's time says.
    from sidecar.dns.cache import EXPIRES, STORED, Cache
    from sidecar.dns.types import Rcode, RRType
    from sidecar.errors import ResolveFailed
    from sidecar.miss.entry import TtlPolicy
    from sidecar.miss.fetch import STALE_RECHECK, Fetcher
    from sidecar.upstream.records import Answer, Rec

    now = [1000.0]
    cache = Cache(10)
    cache.clock = lambda: now[0]
    pool = _StuckPool()
    res = Fetcher(cache, pool, TtlPolicy(min_ttl=60), serve_stale=30)
    pool.answer.set_result(Answer(int(Rcode.NOERROR),
                                  [Rec("www.test", int(RRType.A), 60, b"\x7f\x00\x00\x01")]))
    entry, stale = await res.resolve(_key("www"))
    assert not stale and entry[STORED] == 1000.0 and entry[EXPIRES] == 1060.0
    now[0] = 1070.0  # expired 10 s ago, inside the serve-stale window
    pool.answer = asyncio.get_running_loop().create_future()
    pool.answer.set_exception(ResolveFailed("timeout", 1))
    entry, stale = await res.resolve(_key("www"))
    assert stale and entry[STORED] == 1000.0
    assert res._recheck[_key("www")] == 1070.0 + STALE_RECHECK
