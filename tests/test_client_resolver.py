"""sidecar_resolver / sidecar_connector / batch pre-warm, against loopback servers only."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time

import aiohttp
import pytest
from aiohttp.resolver import AsyncResolver

from client import (
    FailoverResolver,
    PrewarmError,
    PrewarmTable,
    SidecarConnector,
    SidecarResolver,
    Trace,
    sidecar_connector,
    sidecar_resolver,
    trace_config,
)
from client.resolver import DEFAULT_RECEIVE_BUFFER
from tests.client_servers import (
    BODY,
    PrewarmStandIn,
    SplitRcodeDNS,
    serving_http,
)


def crawl_name(ip: str) -> str:
    """The zone's name for 127.0.0.x: crawl<x-1>.example.test."""
    return f"crawl{int(ip.rsplit('.', 1)[1]) - 1}.example.test"


@pytest.fixture
async def web():
    async with serving_http("127.0.0.21") as server:
        yield server


# --------------------------------------------------------------------------- resolver


async def test_sidecar_resolver_is_an_async_resolver_aimed_at_the_address(side):
    r = sidecar_resolver(side.dns_address, api_url=side.http_url)
    try:
        assert isinstance(r, AsyncResolver)
        assert r._resolver._channel.servers == [side.dns_address]
        got = await r.resolve("crawl20.example.test", 80, socket.AF_UNSPEC)
        assert [(a["host"], a["port"], a["family"]) for a in got] == [
            ("127.0.0.21", 80, socket.AF_INET)
        ]
        # c-ares asked both families, as the docs say
        assert side.upstream.count("crawl20.example.test", "A") == 1
        assert side.upstream.count("crawl20.example.test", "AAAA") == 1
    finally:
        await r.close()


async def test_sidecar_resolver_channel_is_driven_by_the_event_loop(side):
    # SidecarResolver builds its aiodns resolver itself instead of calling
    # AsyncResolver.__init__, so it must override every method of AsyncResolver (none of
    # them may read the attributes __init__ would have set). Fails when aiohttp adds one.
    plain = AsyncResolver(nameservers=[side.dns_address])
    r = sidecar_resolver(side.dns_address, api_url=None)
    try:
        methods = {n for n, v in vars(AsyncResolver).items() if callable(v)}
        methods -= {"__init__", "_resolve_with_query"}  # the latter: aiodns < 1.1 only
        overridden = {n for n in methods if getattr(SidecarResolver, n) is not
                      getattr(AsyncResolver, n)}
        assert methods == overridden, methods - overridden
        assert r._resolver.loop_driven  # c-ares sockets watched by this loop, no thread
        names = [f"crawl{i}.example.test" for i in range(20, 40)]
        got = await asyncio.gather(*(r.resolve(n, 80, socket.AF_INET) for n in names))
        assert [a[0]["host"] for a in got] == [f"127.0.0.{i + 1}" for i in range(20, 40)]
        # The port goes to c-ares as a numeric service (no /etc/services lookup).
        for port in (8443, 80, 0):
            assert (await r.resolve(names[0], port, socket.AF_INET))[0]["port"] == port
    finally:
        await r.close()
        await plain.close()
    assert r._resolver is None


async def test_sidecar_resolver_nxdomain_is_an_oserror_chained_from_dnserror(side):
    r = sidecar_resolver(side.dns_address)
    try:
        with pytest.raises(OSError) as info:
            await r.resolve("nope.example.test", 80, socket.AF_UNSPEC)
        assert info.value.__cause__.args[0] == 4  # ARES_ENOTFOUND
    finally:
        await r.close()


@pytest.mark.parametrize(
    "address",
    ["localhost:5353", "127.0.0.1:0", "127.0.0.1:99999", "[::1", "::1:5353:x", ""],
)
async def test_bad_addresses_are_rejected(address):
    with pytest.raises(ValueError):
        sidecar_resolver(address)


@pytest.mark.parametrize("address", ["127.0.0.1:5353", "127.0.0.1", "[::1]:5353"])
async def test_good_addresses_are_accepted(address):
    r = sidecar_resolver(address)
    await r.close()


def _udp_sockets_to(port: int) -> list[socket.socket]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            s = socket.socket(fileno=os.dup(int(fd)))
        except OSError:
            continue
        try:
            if s.type == socket.SOCK_DGRAM and s.getpeername()[1] == port:
                found.append(s)
                continue
        except OSError:
            pass
        s.close()
    return found


def _sysctl(name: str) -> int:
    with open(f"/proc/sys/net/core/{name}") as f:
        return int(f.read())


async def test_receive_buffer_is_enlarged(side):
    rmem_max, rmem_default = _sysctl("rmem_max"), _sysctl("rmem_default")
    if rmem_max <= rmem_default:
        pytest.skip("the kernel caps SO_RCVBUF at its default here")
    r = sidecar_resolver(side.dns_address)
    try:
        await r.resolve("crawl20.example.test", 80, socket.AF_INET)
        socks = _udp_sockets_to(int(side.dns_address.rsplit(":", 1)[1]))
        if not socks:
            pytest.skip("cannot see the c-ares socket through /proc/self/fd")
        try:
            sizes = {s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) for s in socks}
        finally:
            for s in socks:
                s.close()
        assert min(sizes) > rmem_default
        assert min(sizes) >= min(DEFAULT_RECEIVE_BUFFER, rmem_max)
    finally:
        await r.close()


async def test_search_domains_are_not_applied(side, tmp_path):
    # a pod-style resolv.conf: without NOSEARCH c-ares would try the suffixes first
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 127.0.0.1\nsearch svc.cluster.local\noptions ndots:5\n")
    r = sidecar_resolver(side.dns_address, resolvconf_path=str(conf))
    try:
        await r.resolve("crawl20.example.test", 80, socket.AF_INET)
        asked = [name.lower() for name, _, _ in side.upstream.log]
        assert "crawl20.example.test" in asked
        assert not [name for name in asked if "cluster.local" in name]
    finally:
        await r.close()


# --------------------------------------------------------------------------- connector


async def test_connector_crawler_defaults():
    conn = sidecar_connector("127.0.0.1:5353")
    try:
        assert isinstance(conn, aiohttp.TCPConnector)
        assert isinstance(conn, SidecarConnector)
        assert conn.limit == 200
        assert conn.limit_per_host == 8
        assert conn.use_dns_cache is False  # aiohttp's cache ignores TTLs
        assert isinstance(conn.resolver, AsyncResolver)
        # the one private aiohttp name the client uses: fails loudly when aiohttp drops it
        assert conn.instrumented
    finally:
        await conn.close()


async def test_connector_defaults_are_overridable():
    conn = sidecar_connector(
        "127.0.0.1:5353", limit=5, limit_per_host=0, use_dns_cache=True, ttl_dns_cache=10
    )
    try:
        assert (conn.limit, conn.limit_per_host, conn.use_dns_cache) == (5, 0, True)
    finally:
        await conn.close()


async def test_connector_closes_the_resolver_it_made_but_not_a_given_one(side):
    conn = sidecar_connector(side.dns_address)
    made = conn.resolver
    await conn.close()
    assert made._resolver is None  # closed

    given = sidecar_resolver(side.dns_address)
    conn = sidecar_connector(resolver=given)
    await conn.close()
    try:
        assert given._resolver is not None
        await given.resolve("crawl20.example.test", 80, socket.AF_INET)
    finally:
        await given.close()


async def test_request_through_the_connector(side, web):
    conn = sidecar_connector(side.dns_address, api_url=side.http_url)
    async with aiohttp.ClientSession(connector=conn, trace_configs=[trace_config()]) as s:
        trace = Trace()
        async with s.get(web.url(crawl_name(web.host)), trace_request_ctx=trace) as resp:
            assert resp.status == 200
            assert await resp.read() == BODY
    assert trace.resolver == f"sidecar@{side.dns_address}"
    assert trace.phase == "done"


# --------------------------------------------------------------------------- pre-warm


async def test_prewarm_posts_one_batch_for_a_and_aaaa_and_serves_from_memory(side):
    r = sidecar_resolver(side.dns_address, api_url=side.http_url)
    hosts = [f"crawl{i}.example.test" for i in range(30, 40)]
    try:
        posts: list[tuple[str, str]] = []
        bodies: list[bytes] = []

        async def on_start(session, ctx, params):
            posts.append((params.method, str(params.url)))

        async def on_chunk(session, ctx, params):
            bodies.append(params.chunk)

        spy = aiohttp.TraceConfig()
        spy.on_request_start.append(on_start)
        spy.on_request_chunk_sent.append(on_chunk)
        async with aiohttp.ClientSession(trace_configs=[spy]) as http:
            result = await r.prewarm(
                hosts + ["http://crawl30.example.test:8080/x", "127.0.0.1"], session=http
            )
        assert posts == [("POST", side.http_url + "/prewarm")]
        call = json.loads(b"".join(bodies))
        assert call["names"] == hosts  # URLs reduced to hosts, deduplicated, IPs dropped
        assert call["types"] == ["A", "AAAA"]
        assert result.requested == 10 and result.warmed == 10
        assert result.failed == {} and result.nxdomain == []
        assert result.server_ms is not None and result.server_ms >= 0
        assert result.elapsed >= 0

        before = side.upstream.queries
        for i in range(30, 40):
            # zero awaits: the coroutine finishes on its first step
            coro = r.resolve(f"crawl{i}.example.test", 443, socket.AF_UNSPEC)
            with pytest.raises(StopIteration) as done:
                coro.send(None)
            got = done.value.value
            assert [(a["host"], a["port"]) for a in got] == [(f"127.0.0.{1 + i}", 443)]
        assert side.upstream.queries == before
        assert r.prewarmed.hits == 10
    finally:
        await r.close()


async def test_prewarmed_lookup_per_family(side):
    r = sidecar_resolver(side.dns_address, api_url=side.http_url)
    try:
        await r.prewarm(["www.example.test", "crawl31.example.test"])
        before = side.upstream.queries
        v4 = await r.resolve("www.example.test", 80, socket.AF_INET)
        v6 = await r.resolve("WWW.example.test.", 80, socket.AF_INET6)
        both = await r.resolve("www.example.test", 80, socket.AF_UNSPEC)
        assert sorted(a["host"] for a in v4) == ["10.0.0.1", "10.0.0.2"]
        assert [a["host"] for a in v6] == ["2001:db8::1"]
        assert [a["family"] for a in both] == [socket.AF_INET] * 2 + [socket.AF_INET6]
        with pytest.raises(OSError) as info:  # held NODATA for AAAA
            await r.resolve("crawl31.example.test", 80, socket.AF_INET6)
        assert info.value.__cause__.args[0] == 1
        assert side.upstream.queries == before
    finally:
        await r.close()


async def test_prewarmed_nxdomain_is_served_as_the_same_error(side):
    r = sidecar_resolver(side.dns_address, api_url=side.http_url)
    try:
        result = await r.prewarm(["nope.example.test"])
        assert result.nxdomain == ["nope.example.test"]
        before = side.upstream.queries
        with pytest.raises(OSError) as info:
            await r.resolve("nope.example.test", 80, socket.AF_UNSPEC)
        assert info.value.__cause__.args[0] == 4
        assert side.upstream.queries == before
    finally:
        await r.close()


async def test_prewarm_failures_are_reported_not_stored(side):
    side.upstream.name_rcode = {"crawl32.example.test": "SERVFAIL"}
    r = sidecar_resolver(side.dns_address, api_url=side.http_url)
    try:
        result = await r.prewarm(["crawl32.example.test", "crawl33.example.test"])
        assert result.warmed == 1
        assert result.failed == {"crawl32.example.test": "SERVFAIL"}
        assert "crawl32.example.test" not in r.prewarmed
        assert r.lookup_prewarmed("crawl32.example.test", 80, socket.AF_UNSPEC) is None
    finally:
        await r.close()


async def test_prewarm_table_expires_by_ttl():
    table = PrewarmTable()
    now = time.monotonic()
    table.store("a.test", "A", "NOERROR", 5, ["10.0.0.1"], now=now - 10)  # expired
    table.store("a.test", "AAAA", "NOERROR", 300, [], now=now)
    table.store("b.test", "A", "NOERROR", 300, ["10.0.0.2"], now=now)
    table.store("b.test", "AAAA", "NOERROR", 300, [], now=now)
    assert table.store("c.test", "A", "NOERROR", 0, ["10.0.0.3"]) is False  # TTL 0
    assert table.store("c.test", "A", "SERVFAIL", 30, []) is False
    assert table.lookup("a.test", 80, socket.AF_UNSPEC) is None
    assert [a["host"] for a in table.lookup("b.test", 80, socket.AF_UNSPEC)] == ["10.0.0.2"]
    assert table.purge() == 0  # a.test still has its AAAA
    table.store("a.test", "AAAA", "NOERROR", 1, [], now=now - 2)
    assert table.purge() == 1
    assert "a.test" not in table and "b.test" in table


async def test_prewarm_table_is_bounded():
    table = PrewarmTable(max_entries=3)
    for i in range(5):
        table.store(f"h{i}.test", "A", "NOERROR", 300, ["10.0.0.1"])
    assert len(table) == 3
    assert "h0.test" not in table and "h4.test" in table


async def test_prewarm_sends_the_token(side):
    stand_in = PrewarmStandIn("127.0.0.1", side.upstream.port, token="s3cret")
    url = await stand_in.start()
    try:
        r = sidecar_resolver(side.dns_address, api_url=url)
        with pytest.raises(PrewarmError) as info:
            await r.prewarm(["crawl34.example.test"])
        assert info.value.status == 401
        await r.close()
        r = sidecar_resolver(side.dns_address, api_url=url, api_token="s3cret")
        assert (await r.prewarm(["crawl34.example.test"])).warmed == 1
        await r.close()
    finally:
        await stand_in.stop()


async def test_prewarm_api_down_raises_and_failover_swallows(side):
    dead = f"http://127.0.0.1:{_free_port()}"
    r = sidecar_resolver(side.dns_address, api_url=dead)
    with pytest.raises(PrewarmError):
        await r.prewarm(["crawl35.example.test"])
    chain = FailoverResolver(r)
    try:
        result = await chain.prewarm(["crawl35.example.test"])
        assert result.error and result.warmed == 0
    finally:
        await chain.close()


async def test_prewarmed_request_skips_dns(side, web):
    conn = sidecar_connector(side.dns_address, api_url=side.http_url)
    async with aiohttp.ClientSession(connector=conn, trace_configs=[trace_config()]) as s:
        name = crawl_name(web.host)
        await conn.resolver.prewarm([name])
        before = side.upstream.queries
        trace = Trace()
        async with s.get(web.url(name), trace_request_ctx=trace) as resp:
            await resp.read()
        assert side.upstream.queries == before
        assert trace.resolver == f"sidecar@{side.dns_address}/prewarm"
        assert resp.status == 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_prewarm_splits_large_batches(side):
    r = sidecar_resolver(side.dns_address, api_url=side.http_url)
    posts = []

    async def on_start(session, ctx, params):
        posts.append(params.url)

    spy = aiohttp.TraceConfig()
    spy.on_request_start.append(on_start)
    try:
        async with aiohttp.ClientSession(trace_configs=[spy]) as http:
            hosts = [f"crawl{i}.example.test" for i in range(100, 125)]
            result = await r.prewarm(hosts, session=http, batch_size=10)
        assert len(posts) == 3
        assert result.requested == 25 and result.warmed == 25
        assert all(h in r.prewarmed for h in hosts)
    finally:
        await r.close()


async def test_servfail_is_not_hidden_behind_nodata():
    """c-ares reports A=SERVFAIL + AAAA=NODATA as NODATA; the resolver reports SERVFAIL."""
    dns_server = await SplitRcodeDNS.start()
    r = sidecar_resolver(dns_server.address)
    try:
        with pytest.raises(OSError) as info:
            await r.resolve("x.example.test", 80, socket.AF_UNSPEC)
        assert info.value.__cause__.args[0] == 3
    finally:
        await r.close()
        dns_server.stop()
