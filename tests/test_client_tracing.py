"""trace_config(): per-request timestamps and curl-style durations that add up."""

from __future__ import annotations

import asyncio
import ssl

import aiohttp
import pytest

from client import (
    PHASES,
    Timings,
    Trace,
    current_trace,
    fetch,
    sidecar_connector,
    sidecar_resolver,
    trace_config,
)
from tests.client_servers import BODY, make_cert, serving_http, start_http


@pytest.fixture
async def web():
    async with serving_http("127.0.0.81") as server:  # crawl80.example.test
        yield server


@pytest.fixture
async def session(side):
    conn = sidecar_connector(side.dns_address, api_url=side.http_url)
    async with aiohttp.ClientSession(connector=conn, trace_configs=[trace_config()]) as s:
        yield s


def assert_plausible(t: Timings) -> None:
    parts = [t.queued, t.namelookup, t.connect, t.tls or 0.0, t.starttransfer, t.transfer]
    assert all(p >= 0 for p in parts) and t.total >= 0
    assert sum(parts) <= t.total + 1e-9
    curl = t.curl()
    order = ["time_namelookup", "time_connect", "time_pretransfer", "time_starttransfer",
             "time_total"]
    values = [curl[k] for k in order]
    assert values == sorted(values)
    assert all(v >= 0 for v in curl.values())


async def test_fresh_http_request_signals_and_durations(session, web):
    r = await fetch(session, web.url("crawl80.example.test"))
    assert r.ok and r.status == 200 and r.body == BODY
    assert [name for name, _ in r.trace.events] == [
        "request_start",
        "connection_create_start",
        "dns_resolvehost_start",
        "dns_resolvehost_end",
        "tcp_start",
        "tcp_end",
        "connection_create_end",
        "request_headers_sent",
        "request_end",
        "response_chunk",
    ]
    stamps = [t for _, t in r.trace.events]
    assert stamps == sorted(stamps)
    t = r.timings
    assert_plausible(t)
    assert t.namelookup > 0 and t.connect > 0 and t.starttransfer > 0
    assert t.tls == 0.0 and t.reused is False
    assert r.trace.phase == "done"
    assert r.trace.attempts == 1 and r.trace.status == 200


async def test_reused_connection(session, web):
    await fetch(session, web.url("crawl80.example.test"))
    r = await fetch(session, web.url("crawl80.example.test"))
    assert r.trace.reused
    t = r.timings
    assert_plausible(t)
    assert (t.namelookup, t.connect, t.tls, t.reused) == (0.0, 0.0, 0.0, True)


async def test_https_measures_tls_separately(session, tmp_path):
    cert, key = make_cert(tmp_path, "crawl81.example.test")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    server = await start_http("127.0.0.82", ssl_context=server_ctx)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    try:
        r = await fetch(session, server.url("crawl81.example.test"), ssl=client_ctx)
    finally:
        await server.stop()
    assert r.ok, r.failure
    t = r.timings
    assert_plausible(t)
    assert t.tls is not None and t.tls > 0
    assert t.curl()["time_appconnect"] >= t.curl()["time_connect"]


async def test_plain_tcpconnector_cannot_split_tls(side, tmp_path):
    cert, key = make_cert(tmp_path, "crawl82.example.test")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    server = await start_http("127.0.0.83", ssl_context=server_ctx)
    resolver = sidecar_resolver(side.dns_address)
    conn = aiohttp.TCPConnector(resolver=resolver)
    try:
        async with aiohttp.ClientSession(connector=conn, trace_configs=[trace_config()]) as s:
            r = await fetch(s, server.url("crawl82.example.test"),
                            ssl=ssl.create_default_context(cafile=str(cert)))
    finally:
        await server.stop()
        await resolver.close()
    assert r.ok
    assert r.timings.tls is None and r.timings.connect > 0  # connect covers TCP + TLS
    assert_plausible(r.timings)
    assert r.trace.tcp_start is None and not r.trace.instrumented


async def test_queued_requests(side, web):
    conn = sidecar_connector(side.dns_address, limit=1)
    async with aiohttp.ClientSession(connector=conn, trace_configs=[trace_config()]) as s:
        results = await asyncio.gather(*(fetch(s, web.url("crawl80.example.test"))
                                         for _ in range(4)))
    assert all(r.ok for r in results)
    assert sum(r.trace.queued_start is not None for r in results) >= 1
    for r in results:
        assert_plausible(r.timings)


async def test_redirects(session, web):
    r = await fetch(session, web.url("crawl80.example.test", "/redirect/2"))
    assert r.ok and r.status == 200
    assert r.trace.redirects == 2
    assert r.trace.url.endswith(f":{web.port}/")
    assert_plausible(r.timings)


async def test_dict_trace_request_ctx_and_streaming(session, web):
    ctx: dict = {}
    async with session.get(web.url("crawl80.example.test"), trace_request_ctx=ctx) as resp:
        trace = ctx["trace"]
        assert isinstance(trace, Trace)
        assert trace.phase == "transfer"  # headers in, body not read yet
        async for _ in resp.content.iter_any():
            pass
    trace.finish()
    assert trace.phase == "done"
    assert_plausible(trace.timings())


async def test_head_request_is_done_at_headers(session, web):
    trace = Trace()
    async with session.head(web.url("crawl80.example.test"), trace_request_ctx=trace):
        pass
    assert trace.phase == "done"
    assert_plausible(trace.timings())


async def test_current_trace_is_cleared_after_the_request(session, web):
    assert current_trace() is None
    await fetch(session, web.url("crawl80.example.test"))
    assert current_trace() is None


def test_unstarted_trace():
    t = Trace()
    assert t.phase is None
    assert t.timings().total == 0.0
    assert PHASES == ("queue", "dns", "connect", "tls", "request", "response", "transfer")
