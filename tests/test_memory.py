"""Memory that cannot run away (issue 14, section 3): the cache's byte bound, the bounded miss
queue, per-zone limits on fetches in flight, jostling, and SOA learning in at most one query.

Everything runs on loopback against the fake upstream: a real sidecar process for the RSS
figures, the in-process ``Sidecar`` for the rest. Every load is bounded in count.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import sys
import time
import urllib.request

import dns.asyncquery
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from sidecar.testing.fakeupstream import FakeUpstream
from tests.conftest import query
from tests.helpers import free_port

TXT_61K = ["x" * 255] * 240  # one TXT record of 61,440 bytes: over TCP after TC
TXT_6K = ["y" * 255] * 24  # 6,144 bytes: cacheable under an 8 MiB budget


async def wait_until(pred, what: str, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


# ------------------------------------------------------------------ the cache's byte bound


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _stats(http: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{http}/stats", timeout=5) as resp:
        return json.load(resp)


async def _blast(port: int, names: list[str], rdtype: str = "TXT", width: int = 32) -> list:
    """Ask every name once over UDP, ``width`` at a time; the replies (TC=1 for big ones)."""
    todo = iter(names)
    out: list = []

    async def worker() -> None:
        for name in todo:
            q = dns.message.make_query(name, rdtype, use_edns=0, payload=1232)
            out.append(await dns.asyncquery.udp(q, "127.0.0.1", port=port, timeout=10))

    await asyncio.gather(*(worker() for _ in range(width)))
    return out


def _start(up: FakeUpstream, cache_memory: int) -> tuple[subprocess.Popen, int, int]:
    port, http = free_port(), free_port()
    p = subprocess.Popen([sys.executable, "-m", "sidecar", "--listen", f"127.0.0.1:{port}",
                          "--http", f"127.0.0.1:{http}", "--upstream", up.address,
                          "--cache-memory", str(cache_memory), "--timeout", "3"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return p, port, http


async def _rss_growth(up: FakeUpstream, cache_memory: int, names: list[str]
                      ) -> tuple[int, dict]:
    """RSS growth (KiB) of a real sidecar process over one query for each name, and its
    /stats afterwards."""
    p, port, http = _start(up, cache_memory)
    try:
        line = await asyncio.to_thread(p.stderr.readline)
        assert "listening on" in line, line
        await _blast(port, [f"warm{i}.example.test" for i in range(200)], "A")
        before = _rss_kib(p.pid)
        replies = await _blast(port, names, width=16)
        assert all(r.rcode() == dns.rcode.NOERROR for r in replies)
        grown = _rss_kib(p.pid) - before
        stats = await asyncio.to_thread(_stats, http)
    finally:
        p.kill()
        p.wait()
    return grown, stats


async def test_big_answers_do_not_grow_a_real_process_without_bound():
    up = FakeUpstream(log_queries=False)
    up.zone.add_dynamic(r"big\d+\.example\.test", "TXT", TXT_61K)
    up.zone.add_dynamic(r"mid\d+\.example\.test", "TXT", TXT_6K)
    await up.start()
    try:
        big = [f"big{i}.example.test" for i in range(2000)]
        # Under 8 MiB the 61 KB answers are too large to store (answered, not kept); the
        # 1,500 answers of 6 KB that follow are stored until the 8 MiB are full.
        bounded, stats = await _rss_growth(
            up, 8, big + [f"mid{i}.example.test" for i in range(1500)])
        cache = stats["cache"]
        assert cache["entries"] < 1500 + 200  # the 6 KB answers were evicted by bytes
        if "bytes" in cache:  # the stats key (another area) may not be wired in yet
            assert 0 < cache["bytes"] <= cache["memory_limit"] == 8 * 1024 * 1024
        # Under 256 MiB the same 61 KB answers are all stored: what "unbounded" gave.
        unbounded, stats = await _rss_growth(up, 256, big)
        assert stats["cache"]["entries"] >= 2000
    finally:
        await up.stop()
    print(f"RSS growth: --cache-memory 8, 2,000 x 61 KB + 1,500 x 6 KB answers:"
          f" {bounded / 1024:.1f} MiB; --cache-memory 256, 2,000 x 61 KB:"
          f" {unbounded / 1024:.1f} MiB")
    assert unbounded > 2 * bounded


async def test_cache_bytes_stay_under_the_limit_in_a_running_sidecar(make_sidecar):
    sc = await make_sidecar(cache_memory=1)
    sc.upstream.zone.add_dynamic(r"mid\d+\.example\.test", "TXT", ["y" * 200] * 2)
    sc.upstream.zone.add_dynamic(r"big\d+\.example\.test", "TXT", TXT_6K)
    cache = sc.cache
    assert cache.memory_limit == 1024 * 1024
    for r in await _blast(sc.port, [f"mid{i}.example.test" for i in range(3000)]):
        assert r.rcode() == dns.rcode.NOERROR
        assert cache.bytes <= cache.memory_limit
    assert cache.evictions > 0 and len(cache.entries) < 3000
    # 6 KB is over 1/1000 of 1 MiB: answered in full (over TCP), never stored.
    r = await query(sc.port, "big1.example.test", "TXT", tcp=True)
    assert sum(len(s) for rrs in r.answer for rd in rrs for s in rd.strings) == 6120
    assert cache.get(next(k for k in [b"\x04big1\x07example\x04test\x00\x00\x10\x00\x01"])) \
        is None and cache.too_large >= 1


# ------------------------------------------------------------------ the miss queue


async def test_silent_upstream_queue_is_bounded_and_sheds(make_sidecar):
    sc = await make_sidecar(max_inflight=8, timeout=0.5, tries=1)
    res = sc.sc.resolver
    res.max_waiting = 32
    res.queue_wait = 0.3
    up = sc.upstream
    up.drop = True
    # 600 distinct names over 60 zones at once: far beyond 8 in flight + 32 waiting.
    names = [f"n{i}.z{i % 60}.test" for i in range(600)]
    replies = await asyncio.gather(*(query(sc.port, n, timeout=8) for n in names))
    assert [r.rcode() for r in replies] == [dns.rcode.SERVFAIL] * len(names)
    assert res.waiting_peak <= 32
    assert res.shed_full > 0 and res.shed_wait > 0
    assert res.shed == res.shed_full + res.shed_wait + res.shed_zone
    # What was shed never reached the upstream; what did is bounded by the slots' turnover.
    assert up.queries <= len(names) - res.shed
    # Nothing is left behind: no waiter, no zone state, every slot free again.
    assert res.waiting == 0 and not res._zones and res._slots.free == 8
    assert not res.coalescer.inflight


@pytest.mark.parametrize("same_zone", [True, False])
async def test_waiters_give_up_long_before_the_budget(make_sidecar, same_zone):
    # 2 slots, each held 0.6 s by a slow upstream; a waiter gives up after 0.3 s, long
    # before the 2 s budget: the 8 that queued (for the zone's slots, or the global ones)
    # are answered SERVFAIL and never reach the upstream.
    sc = await make_sidecar(max_inflight=2, timeout=1.0, tries=2)
    res = sc.sc.resolver
    res.queue_wait = 0.3
    up = sc.upstream
    zones = ["example.test"] * 10 if same_zone else [f"z{i}.test" for i in range(10)]
    for z in set(zones):
        if z != "example.test":
            up.zone.add_zone(z)
    up.latency = 0.6
    names = [f"w{i}.{z}" for i, z in enumerate(zones)]
    replies = await asyncio.gather(*(query(sc.port, n, timeout=8) for n in names))
    rcodes = [r.rcode() for r in replies]
    assert rcodes.count(dns.rcode.SERVFAIL) == 8 and res.shed_wait == 8
    assert sum(1 for n in names if up.count(n, "A")) == 2


def test_default_queue_bounds():
    from sidecar.dns.cache import Cache
    from sidecar.miss.entry import TtlPolicy
    from sidecar.miss.fetch import Fetcher

    r = Fetcher(Cache(10), object(), TtlPolicy(), max_inflight=1024, budget=4.0)
    assert r.max_waiting == 2048 and r.queue_wait == 1.5 < 4.0
    assert r.zone_limit == 512 and r.slow_zone_limit == 64
    small = Fetcher(Cache(10), object(), TtlPolicy(), max_inflight=2, budget=2.0)
    assert small.max_waiting == 256 and small.zone_limit == 2 and small.slow_zone_limit == 1


# ------------------------------------------------------------------ slow names vs the rest


async def test_a_dead_zone_does_not_starve_healthy_names(make_sidecar):
    sc = await make_sidecar(max_inflight=32, timeout=1.0, tries=2)
    res = sc.sc.resolver
    up = sc.upstream
    up.zone.add_dynamic(r"legit(\d+)\.example\.test", "A",
                        lambda m: f"10.9.{int(m.group(1)) // 256}.{int(m.group(1)) % 256}")
    dead = [f"d{i}.dead.test" for i in range(500)]
    up.drop_names = set(dead)
    flood = [asyncio.ensure_future(query(sc.port, n, timeout=10)) for n in dead[:400]]
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            z = res._zones.get("dead.test")
            peak = max(peak, z.held if z else 0)
            await asyncio.sleep(0.005)

    watcher = asyncio.ensure_future(watch())
    try:
        await wait_until(lambda: "dead.test" in res._zones
                         and res._zones["dead.test"].held == res.zone_limit, "dead zone full")
        await wait_until(lambda: res._zones["dead.test"].slow_since(
            time.monotonic() - res.slow_after), "dead zone slow")
        flood += [asyncio.ensure_future(query(sc.port, n, timeout=10)) for n in dead[400:]]
        latencies = []
        for rnd in range(3):
            batch = range(rnd * 20, rnd * 20 + 20)
            t0 = time.monotonic()
            replies = await asyncio.gather(*(query(sc.port, f"legit{i}.example.test", timeout=10)
                                             for i in batch))
            latencies.append(time.monotonic() - t0)
            for i, r in zip(batch, replies, strict=True):
                assert r.rcode() == dns.rcode.NOERROR
                (rrset,) = r.answer
                assert [rd.to_text() for rd in rrset] == [f"10.9.{i // 256}.{i % 256}"]
        dead_replies = await asyncio.gather(*flood)
    finally:
        watcher.cancel()
    assert {r.rcode() for r in dead_replies} == {dns.rcode.SERVFAIL}
    assert peak <= res.zone_limit < res.max_inflight
    assert res.waiting_peak <= res.zone_max_waiting < res.max_waiting
    assert res.shed_zone >= 100  # the second wave: the zone was slow and at its limit
    # Most of the flood never reached the upstream.
    assert sum(up.count(n, "A") for n in dead) < len(dead) // 2
    print("legit miss batches (20 each) under the flood, s:",
          " ".join(f"{x:.3f}" for x in latencies))


def _newest_asking_older_than(res, age: float) -> bool:
    """Every fetch asking upstream began more than ``age`` seconds ago (none: False)."""
    asking = res._asking
    if not asking:
        return False
    newest = next(reversed(asking.values()))[0]
    return newest < asyncio.get_running_loop().time() - age


async def test_dead_names_in_many_domains_are_jostled_for_healthy_ones(make_sidecar):
    # One never-answered name in each of 600 domains: no zone is ever slow or at its limit,
    # so only jostling frees the 32 slots they hold for the healthy names behind them.
    sc = await make_sidecar(max_inflight=32, timeout=0.6, tries=2)
    res = sc.sc.resolver
    up = sc.upstream
    up.zone.add_dynamic(r"legit(\d+)\.example\.test", "A",
                        lambda m: f"10.8.{int(m.group(1)) // 256}.{int(m.group(1)) % 256}")
    dead = [f"x{i}.dead{i}.test" for i in range(600)]
    up.drop_names = set(dead)
    todo = iter(dead)
    # 32 take the slots and 96 queue behind them.
    flood = [asyncio.ensure_future(query(sc.port, next(todo), timeout=8)) for _ in range(128)]
    legit: list[tuple[int, asyncio.Future]] = []
    for rnd in range(16):
        # Every slot taken is held by a dead name past the jostle timeout, so the 32 queries
        # below (4 healthy, sent last: behind the queue) find each a free slot or one to
        # jostle.
        await wait_until(lambda: len(res._asking) + res._slots.free == 32
                         and _newest_asking_older_than(res, res.jostle_after), "slots dead")
        names = list(itertools.islice(todo, 28))
        wave = [asyncio.ensure_future(query(sc.port, n, timeout=8)) for n in names]
        flood += wave
        legit += [(i, asyncio.ensure_future(query(sc.port, f"legit{i}.example.test",
                                                   timeout=2.0)))
                  for i in range(rnd * 4, rnd * 4 + 4)]
        # The wave has reached the sidecar: each dead name is asked upstream or answered.
        await wait_until(lambda names=names, wave=wave: all(
            up.count(n, "A") or f.done() for n, f in zip(names, wave, strict=True)), "wave")
    await asyncio.gather(*(f for _, f in legit), return_exceptions=True)
    for i, fut in legit:
        r = fut.result()  # a client timeout raises here
        assert r.rcode() == dns.rcode.NOERROR, (i, dns.rcode.to_text(r.rcode()))
        (rrset,) = r.answer
        assert [rd.to_text() for rd in rrset] == [f"10.8.{i // 256}.{i % 256}"]
    dead_replies = await asyncio.gather(*flood)
    assert {r.rcode() for r in dead_replies} == {dns.rcode.SERVFAIL}
    assert res.jostled >= 16 * 4
    assert res.shed == res.shed_full + res.shed_wait + res.shed_zone  # jostled: not shed
    # Every slot came back exactly once: none leaked, none released twice.
    assert res._slots.free == 32 and res.waiting == 0 and not res._zones
    assert not res._asking and not res._jostled and not res.coalescer.inflight
    # A jostled SERVFAIL is our overload, not the name's: never cached.
    assert all(sc.cache.get(k) is None for k in (
        b"\x02x0\x05dead0\x04test\x00\x00\x01\x00\x01",))


async def test_nothing_is_jostled_while_slots_are_free(make_sidecar):
    sc = await make_sidecar(max_inflight=4, timeout=0.6, tries=1)
    res = sc.sc.resolver
    up = sc.upstream
    up.drop_names = {"a.slow1.test", "b.slow2.test"}
    slow = [asyncio.ensure_future(query(sc.port, n, timeout=5)) for n in up.drop_names]
    await wait_until(lambda: len(res._asking) == 2
                     and _newest_asking_older_than(res, res.jostle_after), "slow fetches")
    r = await query(sc.port, "www.example.test")
    assert r.rcode() == dns.rcode.NOERROR and res.jostled == 0
    assert {r.rcode() for r in await asyncio.gather(*slow)} == {dns.rcode.SERVFAIL}
    assert res.jostled == 0 and res._slots.free == 4


async def test_a_fetch_learning_its_soa_is_not_jostled(make_sidecar):
    # Two NXDOMAINs without SOA share one slow SOA lookup (one fetch asks, one waits for
    # it). Ending either would cancel the shared lookup: neither may be jostled, and both
    # still answer NXDOMAIN with the learned SOA.
    sc = await make_sidecar(max_inflight=2, timeout=1.0, tries=1)
    res = sc.sc.resolver
    res.jostle_after = 0.05
    up = sc.upstream
    up.strip_authority = True
    up.name_latency = {"example.test": 0.5}
    negs = [asyncio.ensure_future(query(sc.port, f"n{i}.example.test", timeout=5))
            for i in range(2)]
    await wait_until(lambda: up.count("example.test", "SOA") == 1 and res._slots.free == 0,
                     "SOA lookup under way")
    loop = asyncio.get_running_loop()
    await wait_until(lambda: max(res._zones["example.test"].started.values())
                     < loop.time() - res.jostle_after, "both fetches past jostle_after")
    newcomer = asyncio.ensure_future(query(sc.port, "www.other.test", timeout=5))
    replies = await asyncio.gather(*negs)
    assert [r.rcode() for r in replies] == [dns.rcode.NXDOMAIN] * 2
    assert all(str(r.authority[0].name) == "example.test." for r in replies)
    await newcomer
    assert res.jostled == 0 and res._slots.free == 2


def test_default_jostle_timeout():
    from sidecar.dns.cache import Cache
    from sidecar.miss.entry import TtlPolicy
    from sidecar.miss.fetch import Fetcher
    from sidecar.upstream.pool import PoolSet

    for timeout, expect in ((2.0, 0.5), (0.5, 0.2), (8.0, 2.0)):
        pools = PoolSet([], [], timeout, 2)
        r = Fetcher(Cache(10), pools, TtlPolicy(), budget=timeout * 2)
        assert r.jostle_after == expect


# ------------------------------------------------------------------ SOA learning


LONG = ".".join(f"l{i}" for i in range(59))  # 59 labels + "example.test": 61, +1 = 62


async def test_soa_learning_costs_at_most_one_query(make_sidecar):
    sc = await make_sidecar()
    up = sc.upstream
    up.strip_authority = True
    before = up.queries
    r = await sc.query(f"a.{LONG}.example.test")
    assert r.rcode() == dns.rcode.NXDOMAIN
    (soa,) = r.authority
    assert str(soa.name) == "example.test." and soa.rdtype == dns.rdatatype.SOA
    assert up.queries - before == 2  # the question and one SOA query
    assert up.count("example.test", "SOA") == 1
    before = up.queries
    r = await sc.query(f"b.{LONG}.example.test")
    assert r.rcode() == dns.rcode.NXDOMAIN and str(r.authority[0].name) == "example.test."
    assert up.queries - before == 1  # the zone's SOA is remembered
    # A zone whose apex guess is not served (REFUSED): one lookup (the pool may try it
    # twice), nothing learned, the NXDOMAIN goes out without SOA; the next costs nothing.
    up.zone.add_zone("sub.zone.test")
    before = up.queries
    r = await sc.query(f"c.{LONG}.sub.zone.test")
    assert r.rcode() == dns.rcode.NXDOMAIN and not r.authority
    assert up.queries - before <= 1 + 2 and up.count("zone.test", "SOA") <= 2
    before = up.queries
    r = await sc.query(f"d.{LONG}.sub.zone.test")
    assert r.rcode() == dns.rcode.NXDOMAIN
    assert up.queries - before == 1


async def test_soa_learning_stays_inside_the_inflight_bound(make_sidecar):
    sc = await make_sidecar(max_inflight=2)
    up = sc.upstream
    up.strip_authority = True
    up.latency = 0.02
    outstanding = 0

    async def watch() -> None:
        nonlocal outstanding
        while True:
            outstanding = max(outstanding, up.queries - up.replies)
            await asyncio.sleep(0.002)

    watcher = asyncio.ensure_future(watch())
    try:
        replies = await asyncio.gather(*(sc.query(f"q{i}.{LONG}.example.test", timeout=8)
                                         for i in range(12)))
    finally:
        watcher.cancel()
    assert {r.rcode() for r in replies} == {dns.rcode.NXDOMAIN}
    assert all(str(r.authority[0].name) == "example.test." for r in replies)
    assert outstanding <= 2
    assert up.queries <= 12 + 1


@pytest.mark.parametrize("name, include_self, guess", [
    ("a.b.example.test", False, "example.test"),
    ("example.test", False, "test"),
    ("example.test", True, "example.test"),
    ("test", False, ""),
    ("x.y.shop.co.uk", False, "shop.co.uk"),
])
def test_soa_guess(name, include_self, guess):
    from sidecar.miss.soa import SoaFinder

    assert SoaFinder.guess(name, include_self) == guess


async def test_a_cancelled_soa_waiter_leaves_the_shared_lookup_alone():
    # Two negative answers under one zone share one SOA query; the second fetch waits for
    # the first's. Cancelling the waiter (jostled, shutdown) must not cancel the shared
    # lookup: the asking fetch still learns the SOA and nothing raises.
    from sidecar.dns.types import Rcode, RRType
    from sidecar.miss.soa import SoaFinder
    from sidecar.upstream.records import Answer, Rec

    soa = Rec("example.test", int(RRType.SOA), 300, b"\x00\x00" + bytes(20))
    reply: asyncio.Future = asyncio.get_running_loop().create_future()

    class Pool:
        asked: list[str] = []

        def pool_for(self, name: str) -> Pool:
            return self

        async def query(self, name: str, qtype: int) -> Answer:
            self.asked.append(name)
            return await reply

    pool = Pool()
    finder = SoaFinder(pool)
    asker = asyncio.ensure_future(finder.find("a.example.test", include_self=False))
    await asyncio.sleep(0)  # one loop pass: the asker is waiting for the reply
    assert pool.asked == ["example.test"]
    waiter = asyncio.ensure_future(finder.find("b.example.test", include_self=False))
    await asyncio.sleep(0)  # the waiter is waiting for the asker's lookup
    assert finder._inflight
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    reply.set_result(Answer(int(Rcode.NOERROR), [soa], []))
    assert await asyncio.wait_for(asker, 5) is soa
    assert pool.asked == ["example.test"] and not finder._inflight
