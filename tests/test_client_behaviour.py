"""The client in a real crawl: honest TTLs, rotation, pre-warm deadline, EDNS, JSON, metrics,
imports. Real aiohttp servers and the real sidecar on loopback."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
import warnings

import aiohttp
import dnslib
import pycares
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from client import (
    ClientMetrics,
    TracingWarning,
    fetch,
    sidecar_connector,
    sidecar_resolver,
    trace_config,
)
from client.resolver import DEFAULT_FLAGS
from tests.client_servers import serving_http


@pytest.fixture
async def web():
    async with serving_http("127.0.0.101") as server:  # crawl100.example.test
        yield server


def test_import_client_loads_no_server_code():
    code = ("import client, sys; mods = sorted(m for m in sys.modules if m == 'dnslib' or "
            "m.startswith('dnslib.') or (m.startswith('sidecar') and m not in "
            "('sidecar', 'sidecar.upstream', 'sidecar.upstream.cares'))); print(mods); sys.exit(1 if mods else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


async def test_lookup_answers_are_held_by_their_ttl_not_longer(side):
    r = sidecar_resolver(side.dns_address, api_url=side.http_url)
    try:
        side.upstream.zone.add("ttl5.example.test", "A", "10.5.0.1", ttl=5)
        await r.resolve("ttl5.example.test", 80, socket.AF_INET)
        asked = side.upstream.count("ttl5.example.test", "A")
        await r.resolve("ttl5.example.test", 80, socket.AF_INET)  # held: no packet
        assert side.upstream.count("ttl5.example.test", "A") == asked
        answer = r.prewarmed._names["ttl5.example.test"].a
        remaining = answer.expires - time.monotonic()
        assert 0 < remaining <= 30  # the sidecar's floor (30 s), never aiohttp's 300 s
        answer.expires = time.monotonic() - 1  # the TTL ran out
        assert r.lookup_prewarmed("ttl5.example.test", 80, socket.AF_INET) is None
    finally:
        await r.close()


class Recorder(asyncio.DatagramProtocol):
    """A DNS responder on 127.0.0.1: A 10.0.0.9 (TTL 60) for every name, NODATA for other
    types; records each query (name, type, whether it carried an EDNS OPT record)."""

    def __init__(self) -> None:
        self.queries: list[tuple[str, int, bool]] = []

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        q = dnslib.DNSRecord.parse(data)
        self.queries.append((str(q.q.qname).rstrip("."), q.q.qtype,
                             any(rr.rtype == 41 for rr in q.ar)))
        reply = q.reply()
        if q.q.qtype == 1:
            reply.add_answer(dnslib.RR(q.q.qname, 1, rdata=dnslib.A("10.0.0.9"), ttl=60))
        self.transport.sendto(reply.pack(), addr)


@pytest.fixture
async def recorder():
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(Recorder,
                                                           local_addr=("127.0.0.1", 0))
    proto.address = f"127.0.0.1:{transport.get_extra_info('sockname')[1]}"
    yield proto
    transport.close()


async def test_concurrent_lookups_of_one_name_are_one_lookup(recorder):
    r = sidecar_resolver(recorder.address, api_url=None)
    try:
        got = await asyncio.gather(*(r.resolve("same.example.test", 80, socket.AF_INET)
                                     for _ in range(8)))
        assert {g[0]["host"] for g in got} == {"10.0.0.9"}
        assert len(recorder.queries) == 1  # one packet, not eight
    finally:
        await r.close()


async def test_addresses_rotate_for_held_hosts_prewarmed_or_looked_up(side):
    r = sidecar_resolver(side.dns_address, api_url=side.http_url)
    try:
        await r.prewarm(["www.example.test"])
        firsts = [(await r.resolve("www.example.test", 80, socket.AF_UNSPEC))[0]["host"]
                  for _ in range(4)]
        assert firsts == ["10.0.0.1", "10.0.0.2", "10.0.0.1", "10.0.0.2"]
        fams = [a["family"] for a in await r.resolve("www.example.test", 80, socket.AF_UNSPEC)]
        assert fams == [socket.AF_INET, socket.AF_INET, socket.AF_INET6]  # order kept
        side.upstream.zone.add("two.example.test", "A", "10.7.0.1")
        side.upstream.zone.add("two.example.test", "A", "10.7.0.2")
        looked = [(await r.resolve("two.example.test", 80, socket.AF_INET))[0]["host"]
                  for _ in range(3)]
        assert looked[1] != looked[2] and set(looked) == {"10.7.0.1", "10.7.0.2"}
    finally:
        await r.close()


async def test_prewarm_a_only_serves_the_default_family(side, web):
    conn = sidecar_connector(side.dns_address, api_url=side.http_url)
    async with aiohttp.ClientSession(connector=conn, trace_configs=[trace_config()]) as s:
        result = await conn.resolver.prewarm(["crawl100.example.test"], types=["A"])
        assert result.warmed == 1
        before = side.upstream.queries
        r = await fetch(s, web.url("crawl100.example.test"))
        assert r.ok and r.trace.resolver.endswith("/prewarm")
        assert side.upstream.queries == before


async def test_prewarm_deadline_returns_what_is_ready(side):
    side.upstream.drop_names = {"crawl110.example.test"}
    r = sidecar_resolver(side.dns_address, api_url=side.http_url)
    names = [f"crawl{i}.example.test" for i in range(110, 120)]
    try:
        started = time.monotonic()
        result = await r.prewarm(names, deadline=0.5)
        elapsed = time.monotonic() - started
        assert result.pending == ["crawl110.example.test"]
        assert result.warmed == 9
        assert all(n in r.prewarmed for n in names[1:])
        assert elapsed < 1.9  # before the sidecar's SERVFAIL (2 s here)
    finally:
        await r.close()


async def test_channel_keeps_edns(recorder):
    """The client's c-ares queries carry an OPT record (answers over 512 bytes over UDP).
    The flag is asked explicitly: passing ``flags`` replaces c-ares' defaults (c-ares 1.34
    still sends OPT without it; the flag keeps that true for any c-ares)."""
    assert DEFAULT_FLAGS & pycares.ARES_FLAG_EDNS
    r = sidecar_resolver(recorder.address, api_url=None)
    try:
        await r.resolve("edns.example.test", 80, socket.AF_INET)
        assert recorder.queries and all(edns for _, _, edns in recorder.queries)
    finally:
        await r.close()


async def test_results_serialise_and_metrics_count(side, web):
    registry = CollectorRegistry()
    metrics = ClientMetrics(registry)
    conn = sidecar_connector(side.dns_address, api_url=side.http_url)
    async with aiohttp.ClientSession(connector=conn, trace_configs=[trace_config()]) as s:
        ok = await fetch(s, web.url("crawl100.example.test"), metrics=metrics)
        bad = await fetch(s, web.url("nope.example.test"), metrics=metrics)
        err = await fetch(s, web.url("crawl100.example.test", "/status/502"), metrics=metrics)
    for result in (ok, bad, err):
        json.loads(result.to_json())
    doc = ok.as_dict()
    assert doc["ok"] and doc["timings"]["total"] > 0 and doc["body_bytes"] > 0
    assert bad.as_dict()["failure"]["kind"] == "dns_nxdomain"
    assert err.as_dict()["failure"] == {**err.failure.as_dict(), "retryable": True}
    text = generate_latest(registry).decode()
    assert 'dns_sidecar_client_requests_total{class="ok",dns="false",retryable="false"} 1.0' \
        in text
    assert 'class="dns_nxdomain",dns="true",retryable="false"} 1.0' in text
    assert 'class="http_error",dns="false",retryable="true"} 1.0' in text
    assert 'dns_sidecar_client_phase_seconds_count{phase="namelookup"} 3.0' in text


async def test_timings_without_trace_config_warn(side, web):
    conn = sidecar_connector(side.dns_address, api_url=side.http_url)
    async with aiohttp.ClientSession(connector=conn) as s:
        r = await fetch(s, web.url("crawl100.example.test"))
    with pytest.warns(TracingWarning, match="trace_config"):
        assert r.timings.total == 0.0
    conn = sidecar_connector(side.dns_address, api_url=side.http_url)
    async with aiohttp.ClientSession(connector=conn, trace_configs=[trace_config()]) as s:
        traced = await fetch(s, web.url("crawl100.example.test"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert traced.timings.total > 0


async def test_dead_domain_crawl_fails_no_healthy_request(side, web):
    """A bounded crawl (2 s at 20 hosts/s, new host each) with one dead-domain lookup: the
    sidecar is never set aside, so no healthy request meets the fallback (which knows
    none of these names, like a system resolver without the internal zone)."""
    from aiohttp.resolver import AsyncResolver

    from client import ClassCounters, FailoverResolver
    from sidecar.testing.fakeupstream import FakeUpstream, Zone

    empty = FakeUpstream(zone=Zone())
    await empty.start()
    side.upstream.drop_names = {"dead.example.test"}
    r = FailoverResolver(sidecar_resolver(side.dns_address, api_url=side.http_url),
                         AsyncResolver(nameservers=[empty.address], timeout=0.5, tries=1),
                         names=["sidecar", "system"])
    conn = sidecar_connector(resolver=r)
    counters = ClassCounters()
    try:
        async with aiohttp.ClientSession(connector=conn, trace_configs=[trace_config()],
                                         timeout=aiohttp.ClientTimeout(total=10)) as s:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            tasks = []
            for i in range(40):
                if i == 5:
                    dead = asyncio.ensure_future(fetch(s, f"http://dead.example.test:{web.port}/"))
                # crawl(250k + 100) resolves to 127.0.0.101, where the web server listens
                url = f"http://crawl{250 * (i + 1) + 100}.example.test:{web.port}/"
                tasks.append(asyncio.ensure_future(fetch(s, url, counters=counters)))
                await asyncio.sleep(max(0.0, t0 + (i + 1) / 20 - loop.time()))
            await asyncio.gather(*tasks)
            dead_result = await dead
        assert counters.failures == 0, counters.snapshot()
        assert dead_result.failure.kind.value == "dns_error"  # the sidecar's SERVFAIL
        assert r.states[0].set_aside == 0
    finally:
        await r.close()
        await empty.stop()
