"""Upstream pools: quarantine, failover, recovery, zone routing, serve-stale, prefetch."""

from __future__ import annotations

import asyncio

import dns.rcode
import pytest

import sidecar.upstream.pool
from sidecar import HostPort
from sidecar.testing.upstreams import idle, wait_for_state
from tests.conftest import expire_all
from tests.helpers import hp, upstream_obj

WAIT = 15.0  # bound on waiting for a state change the prober makes


@pytest.fixture(autouse=True)
def no_exploration(monkeypatch):
    """Tests here depend on the server order; the 5% random exploration would reorder it."""
    monkeypatch.setattr(sidecar.upstream.pool, "EXPLORE_SHARE", 0.0)


async def test_blackholed_server_is_quarantined_and_then_skipped(make_sidecar, upstream,
                                                                second_upstream):
    dead, good = second_upstream, upstream
    dead.drop = True
    sc = await make_sidecar(upstreams=(hp(dead), hp(good)), timeout=0.3, tries=2)
    first = await sc.query("www.example.test")  # dead is tried first (unmeasured), then good
    assert first.answer and dead.count("www.example.test") >= 1  # c-ares may retransmit
    dead_u = upstream_obj(sc, dead)
    await asyncio.wait_for(wait_for_state(dead_u, "quarantined"), WAIT)
    assert dead_u.outcomes["timeout"] >= 1
    before = len(dead.log)
    names = [f"h{i}.example.test" for i in range(30)]
    replies = await asyncio.gather(*(sc.query(n) for n in names))
    assert all(r.rcode() == dns.rcode.NOERROR and r.answer for r in replies)
    assert sum(dead.count(n) for n in names) == 0  # nothing waited on the dead server
    assert good.queries >= 30
    # Only probes ('. NS') reached the dead server since the quarantine.
    assert all(name == "." for name, _t, _p in dead.log[before:])


async def test_recovered_server_is_brought_back_by_the_probe(make_sidecar, upstream):
    sc = await make_sidecar(timeout=0.2, tries=1)
    upstream.drop = True
    u = upstream_obj(sc, upstream)
    r = await sc.query("www.example.test")
    assert r.rcode() == dns.rcode.SERVFAIL
    await asyncio.wait_for(wait_for_state(u, "quarantined"), WAIT)
    upstream.drop = False
    await asyncio.wait_for(wait_for_state(u, "healthy"), WAIT)
    assert u.probes >= 1 and upstream.count(".", "NS") >= 1
    r = await sc.query("mail.example.test")
    assert r.answer


async def test_all_quarantined_pool_still_tries(make_sidecar, upstream):
    sc = await make_sidecar(timeout=0.2, tries=1)
    u = upstream_obj(sc, upstream)
    upstream.drop = True
    await sc.query("www.example.test")
    await asyncio.wait_for(wait_for_state(u, "quarantined"), WAIT)
    upstream.drop = False
    # Before any probe succeeds, a query still goes to the least-bad (only) server.
    r = await sc.query("mail.example.test")
    assert r.rcode() == dns.rcode.NOERROR and r.answer
    assert upstream.count("mail.example.test") == 1


async def test_servfail_fails_over_without_quarantine(make_sidecar, upstream, second_upstream):
    bad, good = second_upstream, upstream
    bad.rcode = "SERVFAIL"
    sc = await make_sidecar(upstreams=(hp(bad), hp(good)))
    for i in range(5):
        r = await sc.query(f"h{i}.example.test")
        assert r.rcode() == dns.rcode.NOERROR and r.answer
    bad_u = upstream_obj(sc, bad)
    assert bad_u.outcomes["servfail"] >= 1
    assert bad_u.state == "healthy"


async def test_refused_fails_over(make_sidecar, upstream, second_upstream):
    bad, good = second_upstream, upstream
    bad.rcode = "REFUSED"
    sc = await make_sidecar(upstreams=(hp(bad), hp(good)))
    r = await sc.query("www.example.test")
    assert r.answer
    assert upstream_obj(sc, bad).outcomes["refused"] == 1


async def test_unreachable_server_fails_over_fast(make_sidecar, upstream, second_upstream):
    gone = second_upstream.port
    await second_upstream.stop()  # nothing listens there now: ICMP port unreachable
    sc = await make_sidecar(upstreams=(HostPort("127.0.0.1", gone), hp(upstream)),
                            timeout=5.0, tries=1)
    # With a 5 s try budget, only a fast failover lets this answer within the client's 3 s.
    r = await sc.query("www.example.test", timeout=3.0)
    assert r.answer
    u = [u for u in sc.sc.pools.default.upstreams if u.addr.port == gone][0]
    await asyncio.wait_for(idle(u), WAIT)
    assert u.queries == 1 and u.outcomes["ok"] == 0
    assert u.outcomes["unreachable"] + u.outcomes["timeout"] == 1


async def test_zone_routing_longest_suffix(make_sidecar, upstream, second_upstream):
    corp = second_upstream
    sc = await make_sidecar(zones=(("corp.internal", (hp(corp),)),))
    r = await sc.query("git.corp.internal")
    assert r.answer
    assert corp.count("git.corp.internal") == 1 and upstream.count("git.corp.internal") == 0
    r = await sc.query("www.example.test")
    assert r.answer
    assert upstream.count("www.example.test") == 1 and corp.count("www.example.test") == 0
    pools = sc.sc.pools
    assert pools.pool_for("a.b.corp.internal").name == "corp.internal"
    assert pools.pool_for("corp.internal").name == "corp.internal"
    assert pools.pool_for("xcorp.internal").name == ""


async def test_serve_stale_when_upstreams_fail(make_sidecar, upstream, clock):
    sc = await make_sidecar(serve_stale=60, timeout=0.2, tries=1)
    await sc.query("www.example.test")
    expire_all(sc.cache, clock, ago=1)
    upstream.drop = True
    r = await sc.query("www.example.test")
    assert r.rcode() == dns.rcode.NOERROR
    assert [rr.ttl for rr in r.answer] == [30]  # RFC 8767 reply TTL
    assert sc.cache.stale_served == 1
    tries = upstream_obj(sc, upstream).queries
    r = await sc.query("www.example.test")  # within the recheck window: no upstream wait
    assert r.answer and upstream_obj(sc, upstream).queries == tries
    assert sc.cache.stale_served == 2


async def test_no_serve_stale_beyond_window(make_sidecar, upstream, clock):
    sc = await make_sidecar(serve_stale=10, timeout=0.2, tries=1)
    await sc.query("www.example.test")
    expire_all(sc.cache, clock, ago=11)
    upstream.drop = True
    r = await sc.query("www.example.test")
    assert r.rcode() == dns.rcode.SERVFAIL


async def test_serve_stale_off_gives_servfail(make_sidecar, upstream, clock):
    sc = await make_sidecar(timeout=0.2, tries=1)
    await sc.query("www.example.test")
    expire_all(sc.cache, clock, ago=1)
    upstream.drop = True
    r = await sc.query("www.example.test")
    assert r.rcode() == dns.rcode.SERVFAIL


async def test_prefetch_refreshes_before_expiry_once(make_sidecar, upstream, clock):
    sc = await make_sidecar(prefetch=True)
    await sc.query("www.example.test")
    ((key, entry),) = sc.cache.items()
    assert entry.prefetch_at < entry.expires  # at 90% of the TTL
    # As if 1 s into the last 10% of the TTL.
    clock.advance(entry.prefetch_at - clock() + 1)
    entry = sc.cache.get(key)
    replies = await asyncio.gather(*(sc.query("www.example.test") for _ in range(20)))
    assert all(r.answer for r in replies)  # all served from the cache
    refresh = list(sc.sc.resolver.coalescer.inflight.values())
    assert len(refresh) <= 1  # one refresh per key, however many hits
    if refresh:
        await refresh[0]
    assert upstream.count("www.example.test", "A") == 2
    fresh = sc.cache.get(key)
    assert fresh.stored > entry.stored and fresh.expires > entry.expires
    assert sc.cache.prefetched == 1


async def test_slow_server_is_hedged_to_the_next(make_sidecar, upstream, second_upstream):
    slow, fast = second_upstream, upstream
    slow.latency = 1.5
    sc = await make_sidecar(upstreams=(hp(slow), hp(fast)), timeout=2.0, tries=1)
    # The client gives up before the slow server answers: only the hedged try can answer.
    r = await sc.query("www.example.test", timeout=1.2)
    assert r.answer
    assert sc.sc.pools.default.hedged == 1
    assert slow.count("www.example.test") >= 1 and fast.count("www.example.test") == 1
    slow_u = upstream_obj(sc, slow)
    await asyncio.wait_for(idle(slow_u), WAIT)  # the losing try is left to finish
    assert slow_u.outcomes["ok"] == 1
    assert slow_u.health.consecutive_failures == 0  # a late answer is still an answer


async def test_lost_upstream_packet_is_retransmitted_within_the_try(make_sidecar, upstream):
    # Upstream channels are driven by the event loop (sidecar.upstream.cares.LoopResolver), not by
    # c-ares' own thread: c-ares' retransmission must still fire, inside one try.
    sc = await make_sidecar(timeout=5.0, tries=1)
    u = upstream_obj(sc, upstream)
    for i in range(5):  # RTT samples, so c-ares' retry timeout adapts below our 5 s
        assert (await sc.query(f"h{i}.example.test")).answer
    assert getattr(u.resolver, "loop_driven", False)
    upstream.drop_names = {"www.example.test"}
    seen = upstream.queries
    pending = asyncio.ensure_future(sc.query("www.example.test"))
    await upstream.wait_for_queries(seen + 1)
    upstream.drop_names = set()
    r = await pending
    assert r.rcode() == dns.rcode.NOERROR and r.answer
    assert upstream.count("www.example.test") == 2
    assert u.outcomes["timeout"] == 0


async def test_a_lone_try_abandoned_by_its_fetch_still_feeds_health(upstream):
    # A fetch ended early (jostled, or its client gone) stops waiting for its pool query;
    # the one try in flight is left to finish, so a late answer (or a timeout) still
    # counts for the server, as a hedged loser's does.
    from sidecar.dns.types import RRType
    from sidecar.upstream.pool import Pool

    upstream.latency = 0.2
    pool = Pool("", [hp(upstream)], timeout=2.0, tries=1)
    (u,) = pool.upstreams
    try:
        fetch = asyncio.ensure_future(pool.query("www.example.test", int(RRType.A)))
        await asyncio.wait_for(upstream.wait_for_queries(1), WAIT)
        fetch.cancel()
        with pytest.raises(asyncio.CancelledError):
            await fetch
        await asyncio.wait_for(idle(u), WAIT)
        assert u.outcomes["ok"] == 1 and u.health.consecutive_failures == 0
    finally:
        await pool.close()
