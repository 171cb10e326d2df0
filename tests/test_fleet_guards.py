"""Two guards of the shared cache: the bound on lookups in flight (``max_reads``), and the
rule that a prefetch only takes a shared value that outlives its own entry."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.dns.cache import EXPIRES
from sidecar.dns.wire import make_key
from sidecar.testing.redisserver import available

# The fixtures (fleet, upstream, redis_server) come with the helpers.
from tests.test_fleet_shared import addresses, fleet, redis_server, settle, upstream  # noqa: F401

pytestmark = pytest.mark.skipif(available() is not None, reason=str(available()))


async def test_lookups_past_the_bound_go_straight_upstream_and_are_counted(
        fleet, upstream, redis_server):  # noqa: F811
    (a,) = await fleet(1, max_reads=2)
    redis_server.pause()          # the two lookups let through hang until their deadline
    try:
        replies = await asyncio.gather(*(a.ask(f"h{i}.example.test") for i in range(6)))
        stats = a.shared.stats()
    finally:
        redis_server.resume()
    assert all(addresses(r) == {"127.0.0.1"} for r in replies)
    assert stats["busy"] == 4, stats                 # not sent: they did not wait
    # the two let through paid the deadline, in one batch or two
    assert 1 <= stats["errors"]["timeout"] <= 2, stats
    assert upstream.queries == 6


async def _prefetch(node, key: bytes, local_shift: float) -> None:
    """Prefetch ``key`` on ``node`` whose cached entry expires ``local_shift`` seconds after
    the value in the shared cache (which it wrote itself), and wait for the refresh."""
    cache = node.server.cache
    entry = cache.entries[key]
    moved = entry[:EXPIRES] + (entry[EXPIRES] + local_shift,) + entry[EXPIRES + 1:]
    cache.put(key, moved)
    node.server.resolver.prefetch(key, moved)
    await node.server.resolver.coalescer.inflight[key]


async def test_a_prefetch_refuses_a_shared_value_that_does_not_outlive_its_entry(
        fleet, upstream):  # noqa: F811
    (a,) = await fleet(1)
    key = make_key("www.example.test", 1)
    await a.ask("www.example.test")
    await settle(a)
    assert upstream.count("www.example.test", "A") == 1
    await _prefetch(a, key, +5.0)    # ours outlives the fleet's: it has nothing fresher
    assert upstream.count("www.example.test", "A") == 2
    assert a.shared.stats()["hits"] == 1       # it was read, and refused


async def test_a_prefetch_takes_a_shared_value_that_outlives_its_entry(fleet, upstream):  # noqa: F811
    """The counterpart: another sidecar already refreshed it."""
    (a,) = await fleet(1)
    key = make_key("www.example.test", 1)
    await a.ask("www.example.test")
    await settle(a)
    await _prefetch(a, key, -5.0)
    assert upstream.count("www.example.test", "A") == 1
    assert a.server.cache.entries[key][EXPIRES] > a.server.cache.clock() + 290
