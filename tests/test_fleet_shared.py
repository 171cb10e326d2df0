"""Sidecars sharing one real redis-server as their second-level cache, asked by dnspython over
UDP on loopback, with the fake upstream counting what reaches it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import dns.asyncquery
import dns.message
import dns.rcode
import dns.rdatatype
import pytest
import redis

from sidecar.config import Config, HostPort
from sidecar.dns.cache import BODY
from sidecar.dns.wire import make_key
from sidecar.fleet import codec
from sidecar.fleet.client import SharedCache
from sidecar.server import DnsServer
from sidecar.testing.fakeupstream import FakeUpstream
from sidecar.testing.redisserver import RedisServer, available, tls_available

pytestmark = pytest.mark.skipif(available() is not None, reason=str(available()))

DEADLINE = 0.05


class Node:
    """One in-process DNS side with its shared cache."""

    def __init__(self, server: DnsServer, shared: SharedCache) -> None:
        self.server = server
        self.shared = shared
        self.port = server.dns_addresses[0].port

    async def ask(self, name: str, rdtype: str = "A", timeout: float = 3.0
                  ) -> dns.message.Message:
        q = dns.message.make_query(name, dns.rdatatype.from_text(rdtype))
        return await dns.asyncquery.udp(q, "127.0.0.1", port=self.port, timeout=timeout)


Factory = Callable[..., Awaitable[list[Node]]]


@pytest.fixture
def redis_server() -> Any:
    with RedisServer() as srv:
        yield srv


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream() as up:
        yield up


@pytest.fixture
async def fleet(upstream: FakeUpstream, redis_server: RedisServer) -> AsyncIterator[Factory]:
    nodes: list[Node] = []

    async def make(n: int = 2, url: str | None = None, **shared_kw: Any) -> list[Node]:
        for _ in range(n):
            cfg = Config(listen=(HostPort("127.0.0.1", 0),), http=None,
                         upstreams=(HostPort("127.0.0.1", upstream.port),),
                         timeout=1.0, tries=2, min_ttl=1)
            server = DnsServer(cfg)
            shared = SharedCache(url or redis_server.url, deadline=DEADLINE,
                                 clock=server.cache.clock, **shared_kw)
            shared.breaker.backoff_min = 0.05
            server.resolver.second = shared
            await server.start()
            await shared.start()
            node = Node(server, shared)
            nodes.append(node)
            # A loaded host can miss the first ping's deadline: the tests start from a
            # closed breaker (the probe closes it again within its backoff).
            await wait_state(node, "closed")
        return nodes[-n:]

    try:
        yield make
    finally:
        for node in nodes:
            await node.server.stop(drain=0.5)
            await node.shared.close()


async def settle(*nodes: Node) -> None:
    """Wait for the background writes of ``nodes``."""
    for n in nodes:
        await n.shared.flush(2.0)


def addresses(reply: dns.message.Message) -> set[str]:
    return {rr.to_text() for rrset in reply.answer for rr in rrset}


async def wait_state(node: Node, state: str, seconds: float = 10.0) -> None:
    until = time.monotonic() + seconds
    while node.shared.breaker.state != state:
        assert time.monotonic() < until, f"breaker still {node.shared.breaker.state}"
        await asyncio.sleep(0.02)


# ------------------------------------------------------------------ sharing


async def test_a_name_resolved_by_one_is_answered_by_the_others_without_upstream(fleet, upstream):
    a, b, c = await fleet(3)
    first = await a.ask("www.example.test")
    assert addresses(first) == {"10.0.0.1", "10.0.0.2"}
    await settle(a)
    upstream.reset_counts()
    for node in (b, c):
        reply = await node.ask("www.example.test")
        assert addresses(reply) == {"10.0.0.1", "10.0.0.2"}
    assert upstream.queries == 0
    assert b.shared.stats()["hits"] == 1 and c.shared.stats()["hits"] == 1
    # ... and the shared hit filled b's own cache: the next query is a local hit
    await b.ask("www.example.test")
    assert b.shared.stats()["hits"] == 1 and upstream.queries == 0


@pytest.fixture
def tls_server() -> Any:
    if (why := tls_available()) is not None:
        pytest.skip(why)
    with RedisServer(tls=True) as srv:
        yield srv


async def test_sidecars_share_over_tls_and_refuse_a_server_they_cannot_verify(
        fleet, upstream, tls_server):
    """rediss:// as docs/fleet.md gives it (redis-py's ``ssl_ca_certs``), against a server
    that speaks TLS only: every connection (the batches' lanes, the probe, the notices) is
    TLS. Without the CA the certificate does not verify: no value is read or written, and
    DNS answers all the same."""
    a, b = await fleet(2, url=tls_server.url)
    assert a.shared.stats()["url"].startswith("rediss://")
    first = await a.ask("www.example.test")
    assert addresses(first) == {"10.0.0.1", "10.0.0.2"}
    await settle(a)
    assert a.shared.stats()["writes"] == 1
    upstream.reset_counts()
    assert addresses(await b.ask("www.example.test")) == {"10.0.0.1", "10.0.0.2"}
    assert upstream.queries == 0 and b.shared.stats()["hits"] == 1
    key = a.shared.data_key(make_key("www.example.test", 1)).decode()
    assert tls_server.cli("exists", key).strip() == "1"     # read back through TLS too

    unverified = tls_server.url.partition("?")[0]          # no CA: a self-signed unknown
    cfg = Config(listen=(HostPort("127.0.0.1", 0),), http=None,
                 upstreams=(HostPort("127.0.0.1", upstream.port),), timeout=1.0, min_ttl=1)
    server = DnsServer(cfg)
    shared = SharedCache(unverified, deadline=DEADLINE, clock=server.cache.clock)
    server.resolver.second = shared
    await server.start()
    await shared.start()
    try:
        node = Node(server, shared)
        upstream.reset_counts()
        assert addresses(await node.ask("www.example.test")) == {"10.0.0.1", "10.0.0.2"}
        assert upstream.queries == 1                       # not the fleet's value
        st = shared.stats()
        assert st["hits"] == 0 and st["state"] != "closed", st
        assert st["errors"]["connection"] + st["errors"]["server"] >= 1, st
    finally:
        await server.stop(drain=0.5)
        await shared.close()


async def test_negative_answers_are_shared(fleet, upstream):
    a, b = await fleet(2)
    nx = await a.ask("nope.example.test")
    nodata = await a.ask("v4only.example.test", "AAAA")
    await settle(a)
    upstream.reset_counts()
    nx2 = await b.ask("nope.example.test")
    nodata2 = await b.ask("v4only.example.test", "AAAA")
    assert nx2.rcode() == nx.rcode() == dns.rcode.NXDOMAIN
    assert nodata2.rcode() == dns.rcode.NOERROR and not nodata2.answer and nodata.authority
    assert nodata2.authority[0].rdtype == dns.rdatatype.SOA
    assert upstream.queries == 0


async def test_ttl_is_not_extended_by_the_shared_cache(fleet, upstream, redis_server):
    a, b = await fleet(2)
    first = await a.ask("short.example.test")           # TTL 5
    assert first.answer[0].ttl == 5
    await settle(a)
    pttl = int(redis_server.cli("pttl", a.shared.data_key(make_key("short.example.test", 1))
                                .decode()))
    assert 3000 < pttl <= 5000
    await asyncio.sleep(1.5)
    upstream.reset_counts()
    later = await b.ask("short.example.test")
    assert upstream.queries == 0
    assert later.answer[0].ttl <= 4                       # counted down, never back to 5
    entry = b.server.cache.get(make_key("short.example.test", 1))
    assert entry is not None and entry.remaining(b.server.cache.clock()) <= 3.6


async def test_servfail_is_never_written(fleet, upstream, redis_server):
    (a,) = await fleet(1)
    upstream.rcode = "SERVFAIL"
    reply = await a.ask("h1.example.test")
    assert reply.rcode() == dns.rcode.SERVFAIL
    await settle(a)
    assert redis_server.cli("--scan", "--pattern", "*h1.example.test/1/1").strip() == ""


# ------------------------------------------------------------------ failures


async def test_killing_the_server_loses_no_answer_and_it_recovers(fleet, upstream, redis_server):
    a, b = await fleet(2)
    for i in range(5):
        assert (await a.ask(f"h{i}.example.test")).answer
    redis_server.stop()
    for i in range(5, 25):                                # every answer still comes
        reply = await (a if i % 2 else b).ask(f"h{i}.example.test")
        assert addresses(reply) == {"127.0.0.1"}
    assert a.shared.breaker.state != "closed" and b.shared.breaker.state != "closed"
    assert a.shared.stats()["errors"]["connection"] >= 1
    errors = a.shared.stats()["errors"]["connection"] + a.shared.stats()["errors"]["timeout"]
    redis_server.start()                                  # back, empty, same port
    await wait_state(a, "closed")
    await wait_state(b, "closed")
    assert a.shared.stats()["errors"]["connection"] + a.shared.stats()["errors"]["timeout"] \
        == errors, "an open breaker sends nothing to the server"
    await a.ask("h100.example.test")
    await settle(a)
    upstream.reset_counts()
    assert (await b.ask("h100.example.test")).answer and upstream.queries == 0


async def test_a_hung_server_costs_one_deadline_then_is_skipped(fleet, upstream, redis_server):
    (a,) = await fleet(1)
    await a.ask("h1.example.test")                        # a warm connection
    redis_server.pause()
    try:
        t0 = time.monotonic()
        assert (await a.ask("h2.example.test")).answer
        first = time.monotonic() - t0
        times = []
        for i in range(3, 13):
            t0 = time.monotonic()
            assert (await a.ask(f"h{i}.example.test")).answer
            times.append(time.monotonic() - t0)
        stats = a.shared.stats()
    finally:
        redis_server.resume()
    assert DEADLINE * 0.8 <= first < DEADLINE * 3             # not redis-py's own timeout
    assert max(times) < DEADLINE * 0.8, times            # skipped: no deadline paid again
    assert stats["errors"]["timeout"] == 1 and stats["skipped"] >= 10
    await wait_state(a, "closed")


# ------------------------------------------------------------------ untrusted values


def _plant(srv: RedisServer, data_key: bytes, value: bytes) -> None:
    r = redis.Redis(host="127.0.0.1", port=srv.port)
    try:
        r.set(data_key, value, px=60_000)
    finally:
        r.close()


@pytest.mark.parametrize("kind", ["garbage", "version", "huge", "other-key", "hostile"])
async def test_bad_values_are_ignored_counted_and_never_cached(fleet, upstream, redis_server,
                                                               kind):
    (a,) = await fleet(1)
    key = make_key("www.example.test", 1)
    good = codec.encode(key, _entry(b"\x0a\x00\x00\x01"), 10.0, time.time())
    assert good is not None
    value = {
        "garbage": b"\x00" * 40,
        "version": good[:8] + b"\x00\x02" + good[10:],
        "huge": good[:24] + b"\xff\xff" * 3 + good[30:],
        "other-key": codec.encode(make_key("evil.example.test", 1),
                                  _entry(b"\x06\x06\x06\x06"), 10.0, time.time()),
        # well formed, but an address for another owner name: the scrub refuses it
        "hostile": codec.encode(key, _entry(b"\x06\x06\x06\x06", owner=b"\x04evil\x00"),
                                10.0, time.time()),
    }[kind]
    assert value is not None
    _plant(redis_server, a.shared.data_key(key), value)
    reply = await a.ask("www.example.test")
    assert addresses(reply) == {"10.0.0.1", "10.0.0.2"}   # from upstream, not the plant
    assert upstream.count("www.example.test", "A") == 1
    stats = a.shared.stats()
    assert stats["errors"]["corrupt"] == 1 and stats["hits"] == 0
    cached = a.server.cache.get(key)
    assert cached is not None and b"\x06\x06\x06\x06" not in cached.body
    await settle(a)                                       # our answer replaced the plant
    r = redis.Redis(host="127.0.0.1", port=redis_server.port)
    try:
        raw = r.get(a.shared.data_key(key))
    finally:
        r.close()
    assert raw is not None
    assert b"\x06\x06\x06\x06" not in codec.decode(key, raw, 0.0, time.time())[BODY]


def _entry(addr: bytes, owner: bytes = b"\xc0\x0c"):
    import struct

    from sidecar.dns.cache import new_entry
    body = owner + struct.pack(">HHIH", 1, 1, 300, 4) + addr
    return new_entry(0, 1, 0, 0, body, (len(owner) + 4,), 10.0, 300.0)


# ------------------------------------------------------------------ fleet coalescing


async def test_concurrent_misses_across_three_sidecars_ask_upstream_about_once(fleet, upstream):
    nodes = await fleet(3)
    upstream.latency = 0.03
    names = [f"crawl{i}.example.test" for i in range(40)]

    async def ask_all(node: Node) -> list[dns.message.Message]:
        return await asyncio.gather(*(node.ask(n) for n in names))

    replies = await asyncio.gather(*(ask_all(n) for n in nodes))
    assert all(r.answer for rs in replies for r in rs)
    per_name = [upstream.count(n, "A") for n in names]
    assert sum(per_name) <= len(names) + 4, per_name       # about one each, not three
    won = sum(n.shared.stats()["leases"]["won"] for n in nodes)
    waited = sum(n.shared.stats()["leases"]["waited"] for n in nodes)
    assert won <= len(names) + 4 and waited >= len(names)


async def test_without_the_lease_every_sidecar_asks(fleet, upstream):
    """The counterpart of the test above: what the lease saves."""
    nodes = await fleet(3)
    upstream.latency = 0.03
    for n in nodes:
        n.server.resolver.second = None
    names = [f"crawl{i}.example.test" for i in range(40, 60)]
    await asyncio.gather(*(n.ask(name) for n in nodes for name in names))
    assert sum(upstream.count(n, "A") for n in names) == 3 * len(names)


async def test_writes_beyond_the_bound_are_dropped_and_counted(fleet, upstream, redis_server):
    (a,) = await fleet(1, max_writes=2)
    redis_server.pause()                                   # writes pile up, never finish
    try:
        a.shared.breaker.failure = lambda why: None       # keep it closed for this test
        for i in range(6):
            a.server.resolver.second.put(make_key(f"h{i}.example.test", 1),
                                         _fresh(a.server.cache.clock()))
        stats = a.shared.stats()
    finally:
        redis_server.resume()
    assert stats["writes_inflight"] == 2 and stats["write_drops"] == 4


def _fresh(now: float):
    import struct

    from sidecar.dns.cache import new_entry
    body = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 300, 4) + b"\x7f\x00\x00\x01"
    return new_entry(0, 1, 0, 0, body, (6,), now, 300.0)
