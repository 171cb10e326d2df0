"""Every failure class from a real loopback scenario, classified by exception + trace."""

from __future__ import annotations

import asyncio
import ssl

import aiohttp
import pytest

from client import (
    ClassCounters,
    Failure,
    FailureClass,
    Trace,
    classify,
    fetch,
    sidecar_connector,
    sidecar_resolver,
    trace_config,
)
from tests.client_servers import (
    blackhole_port,
    closed_port,
    make_cert,
    serving_http,
    start_http,
    start_raw,
)

C = FailureClass


@pytest.fixture
async def web():
    async with serving_http("127.0.0.61") as server:  # crawl60.example.test
        yield server


@pytest.fixture
async def session(side):
    """A session as a crawler builds it: sidecar connector (short resolver timeouts for
    the tests) and the tracing config."""
    resolver = sidecar_resolver(side.dns_address, api_url=side.http_url, timeout=0.3, tries=1)
    conn = sidecar_connector(resolver=resolver)
    async with aiohttp.ClientSession(connector=conn, trace_configs=[trace_config()]) as s:
        yield s
    await resolver.close()


async def get(session, url, **kw):
    return await fetch(session, url, **kw)


# --------------------------------------------------------------------------- DNS


async def test_dns_timeout_from_the_resolver(session, side, web):
    side.upstream.drop_names = {"crawl60.example.test"}
    r = await get(session, web.url("crawl60.example.test"))
    assert r.failure.kind is C.DNS_TIMEOUT
    assert (r.failure.phase, r.failure.timer, r.failure.dns_code) == ("dns", "resolver", 12)
    assert isinstance(r.trace.exception, aiohttp.ClientConnectorDNSError)
    assert web.hits == 0


async def test_dns_timeout_from_the_total_timeout(side, web):
    """The seed's case: one total timeout, expired while the lookup was pending."""
    side.upstream.drop_names = {"crawl60.example.test"}
    resolver = sidecar_resolver(side.dns_address, timeout=5.0, tries=2)
    conn = sidecar_connector(resolver=resolver)
    async with aiohttp.ClientSession(connector=conn, trace_configs=[trace_config()]) as s:
        r = await get(s, web.url("crawl60.example.test"), timeout=aiohttp.ClientTimeout(total=0.3))
    await resolver.close()
    exc = r.trace.exception
    assert type(exc) is TimeoutError  # the type alone says nothing about the phase
    assert classify(exc).kind is C.TIMEOUT
    assert r.failure.kind is C.DNS_TIMEOUT
    assert (r.failure.phase, r.failure.timer) == ("dns", "total")
    assert r.trace.dns_start and r.trace.dns_end is None


async def test_dns_timeout_from_the_connect_timeout(side, web):
    side.upstream.drop_names = {"crawl60.example.test"}
    resolver = sidecar_resolver(side.dns_address, timeout=5.0, tries=2)
    conn = sidecar_connector(resolver=resolver)
    async with aiohttp.ClientSession(connector=conn, trace_configs=[trace_config()]) as s:
        r = await get(s, web.url("crawl60.example.test"),
                      timeout=aiohttp.ClientTimeout(connect=0.3))
    await resolver.close()
    assert isinstance(r.trace.exception, aiohttp.ConnectionTimeoutError)
    assert (r.failure.kind, r.failure.phase, r.failure.timer) == (C.DNS_TIMEOUT, "dns", "connect")


async def test_joined_lookup_timeout_is_dns(side, web):
    """A request joining another's in-flight lookup gets dns_cache_hit at once; the
    instrumented connector still tells that its timeout was DNS (aiohttp's DNS cache
    turned back on: sidecar_connector leaves it off)."""
    side.upstream.drop_names = {"crawl60.example.test"}
    resolver = sidecar_resolver(side.dns_address, timeout=5.0, tries=2)
    conn = sidecar_connector(resolver=resolver, use_dns_cache=True)
    async with aiohttp.ClientSession(connector=conn, trace_configs=[trace_config()]) as s:
        timeout = aiohttp.ClientTimeout(total=0.3)
        results = await asyncio.gather(
            *(get(s, web.url("crawl60.example.test"), timeout=timeout) for _ in range(3))
        )
    await resolver.close()
    assert sorted(r.trace.dns_cache for r in results) == ["hit", "hit", "miss"]
    assert [r.failure.kind for r in results] == [C.DNS_TIMEOUT] * 3


async def test_dns_nxdomain(session, web):
    r = await get(session, web.url("nope.example.test"))
    assert (r.failure.kind, r.failure.phase, r.failure.dns_code) == (C.DNS_NXDOMAIN, "dns", 4)
    assert r.failure.is_dns and not r.failure.is_timeout


async def test_dns_nodata(session, web):
    r = await get(session, web.url("example.test"))  # the apex has no A/AAAA
    assert (r.failure.kind, r.failure.dns_code) == (C.DNS_NODATA, 1)


async def test_dns_servfail_is_dns_error_and_not_retried(side, web):
    side.upstream.name_rcode = {"crawl60.example.test": "SERVFAIL"}
    resolver = sidecar_resolver(side.dns_address, timeout=1.0, tries=3)
    conn = sidecar_connector(resolver=resolver)
    async with aiohttp.ClientSession(connector=conn, trace_configs=[trace_config()]) as s:
        r = await get(s, web.url("crawl60.example.test"))
    await resolver.close()
    assert (r.failure.kind, r.failure.phase, r.failure.dns_code) == (C.DNS_ERROR, "dns", 3)
    sent = side.replies(2)  # SERVFAIL replies of the sidecar
    if sent is not None:
        assert sent == 2  # A + AAAA once each: NOCHECKRESP, c-ares did not retry


async def test_sidecar_down_is_dns_error(session, side, web):
    await side.stop()
    r = await get(session, web.url("crawl60.example.test"))
    assert (r.failure.kind, r.failure.phase, r.failure.dns_code) == (C.DNS_ERROR, "dns", 11)


# --------------------------------------------------------------------------- connect


async def test_connect_refused(session):
    port = closed_port("127.0.0.62")
    r = await get(session, f"http://crawl61.example.test:{port}/")
    assert (r.failure.kind, r.failure.phase) == (C.CONNECT_REFUSED, "connect")
    assert r.trace.dns_end is not None  # DNS was fine: the refusal is the server's


async def test_connect_timeout(session):
    with blackhole_port("127.0.0.63") as port:
        r = await get(session, f"http://crawl62.example.test:{port}/",
                      timeout=aiohttp.ClientTimeout(sock_connect=0.3))
    assert (r.failure.kind, r.failure.phase, r.failure.timer) == (
        C.CONNECT_TIMEOUT, "connect", "connect")
    assert r.trace.tcp_start is not None and r.trace.tcp_end is None


async def test_pool_timeout(session, web):
    url = web.url("crawl60.example.test", "/hang")
    limited = aiohttp.ClientSession(
        connector=sidecar_connector(resolver=session.connector.resolver, limit=1),
        trace_configs=[trace_config()],
    )
    async with limited:
        first = asyncio.ensure_future(get(limited, url))
        await web.arrived.wait()  # the only connection is taken now
        r = await get(limited, web.url("crawl60.example.test"),
                      timeout=aiohttp.ClientTimeout(total=0.3))
        assert (r.failure.kind, r.failure.phase, r.failure.timer) == (
            C.POOL_TIMEOUT, "queue", "total")
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first


# --------------------------------------------------------------------------- TLS


async def test_tls_error_bad_certificate(session, tmp_path):
    cert, key = make_cert(tmp_path, "crawl63.example.test")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    server = await start_http("127.0.0.64", ssl_context=ctx)
    try:
        r = await get(session, server.url("crawl63.example.test"))  # default verification
    finally:
        await server.stop()
    assert (r.failure.kind, r.failure.phase) == (C.TLS_ERROR, "tls")
    assert isinstance(r.trace.exception, aiohttp.ClientConnectorCertificateError)


async def test_tls_handshake_cut_is_tls_error(session):
    raw = await start_raw("127.0.0.68", "accept-close")
    try:
        r = await get(session, f"https://crawl67.example.test:{raw.port}/")
    finally:
        await raw.stop()
    assert (r.failure.kind, r.failure.phase) == (C.TLS_ERROR, "tls")
    assert r.trace.tcp_end is not None


# --------------------------------------------------------------------------- response


async def test_read_timeout_sock_read(session):
    silent = await start_raw("127.0.0.65", "silent")
    try:
        r = await get(session, silent.url("crawl64.example.test"),
                      timeout=aiohttp.ClientTimeout(sock_read=0.3))
    finally:
        await silent.stop()
    assert (r.failure.kind, r.failure.phase, r.failure.timer) == (
        C.READ_TIMEOUT, "response", "sock_read")


async def test_read_timeout_total(session):
    silent = await start_raw("127.0.0.65", "silent")
    try:
        r = await get(session, silent.url("crawl64.example.test"),
                      timeout=aiohttp.ClientTimeout(total=0.3))
    finally:
        await silent.stop()
    assert type(r.trace.exception) is TimeoutError
    assert (r.failure.kind, r.failure.phase, r.failure.timer) == (
        C.READ_TIMEOUT, "response", "total")


async def test_server_disconnected_before_response(session):
    closing = await start_raw("127.0.0.66", "close")
    try:
        r = await get(session, closing.url("crawl65.example.test"))
        assert closing.connections == 2  # aiohttp retried the idempotent GET once
    finally:
        await closing.stop()
    assert (r.failure.kind, r.failure.phase) == (C.SERVER_DISCONNECTED, "response")
    assert r.trace.attempts == 2


async def test_server_disconnected_mid_body(session, web):
    r = await get(session, web.url("crawl60.example.test", "/cut"))
    assert r.status == 200
    assert (r.failure.kind, r.failure.phase) == (C.SERVER_DISCONNECTED, "transfer")
    assert isinstance(r.trace.exception, aiohttp.ClientPayloadError)


async def test_read_timeout_mid_body(session, web):
    # headers arrive, then the body stalls past sock_read
    r = await get(session, web.url("crawl60.example.test", "/stall"),
                  timeout=aiohttp.ClientTimeout(sock_read=0.3))
    assert r.status == 200
    assert (r.failure.kind, r.failure.phase, r.failure.timer) == (
        C.READ_TIMEOUT, "transfer", "sock_read")


async def test_http_error(session, web):
    r = await get(session, web.url("crawl60.example.test", "/status/503"),
                  raise_for_status=True)
    assert (r.failure.kind, r.failure.status) == (C.HTTP_ERROR, 503)
    assert r.failure.retryable and r.status == 503


@pytest.mark.parametrize(("code", "retryable"), [(500, True), (503, True), (501, False)])
async def test_5xx_is_http_error_without_raise_for_status(session, web, code, retryable):
    r = await get(session, web.url("crawl60.example.test", f"/status/{code}"))
    assert not r.ok and r.status == code and r.body == b"status\n"
    assert (r.failure.kind, r.failure.status, r.failure.phase) == (C.HTTP_ERROR, code, "response")
    assert r.failure.retryable is retryable


async def test_4xx_is_a_response_unless_raised(session, web):
    r = await get(session, web.url("crawl60.example.test", "/status/404"))
    assert r.ok and r.status == 404
    raised = await get(session, web.url("crawl60.example.test", "/status/404"),
                       raise_for_status=True)
    assert raised.failure.kind is C.HTTP_ERROR and not raised.failure.retryable


def test_retryable_verdict_per_class():
    verdicts = {k: Failure(k, None, "x").retryable for k in C if k is not C.HTTP_ERROR}
    assert verdicts[C.DNS_TIMEOUT] and verdicts[C.DNS_ERROR] and verdicts[C.READ_TIMEOUT]
    assert verdicts[C.CONNECT_REFUSED] and verdicts[C.SERVER_DISCONNECTED]
    assert not verdicts[C.DNS_NXDOMAIN] and not verdicts[C.DNS_NODATA]
    assert not verdicts[C.TLS_ERROR] and not verdicts[C.INVALID_URL]
    assert not verdicts[C.CANCELLED] and not verdicts[C.TOO_MANY_REDIRECTS]
    assert Failure(C.HTTP_ERROR, "response", "x", status=429).retryable
    assert not Failure(C.HTTP_ERROR, "response", "x", status=403).retryable


async def test_too_many_redirects(session, web):
    r = await get(session, web.url("crawl60.example.test", "/redirect/5"), max_redirects=2)
    assert r.failure.kind is C.TOO_MANY_REDIRECTS


async def test_invalid_url(session):
    r = await get(session, "http://:80/")
    assert r.failure.kind is C.INVALID_URL


# --------------------------------------------------------------------------- classify alone


def test_classify_without_trace():
    assert classify(asyncio.CancelledError()).kind is C.CANCELLED
    assert classify(TimeoutError()).kind is C.TIMEOUT
    assert classify(aiohttp.SocketTimeoutError()).kind is C.READ_TIMEOUT
    assert classify(aiohttp.ConnectionTimeoutError()).kind is C.CONNECT_TIMEOUT
    assert classify(aiohttp.ServerDisconnectedError()).kind is C.SERVER_DISCONNECTED
    assert classify(ValueError("x")).kind is C.OTHER


def test_connection_refused_during_dns_is_dns():
    """ConnectionRefusedError can come from either side: the trace decides."""
    trace = Trace()
    trace._request_start("GET", "http://a.test/")
    trace._begin_attempt()
    trace.create_start = trace.dns_start = 1.0
    assert classify(ConnectionRefusedError(111, "refused"), trace).kind is C.DNS_ERROR
    trace.dns_end = 2.0
    assert classify(ConnectionRefusedError(111, "refused"), trace).kind is C.CONNECT_REFUSED


def test_failure_str_and_counters():
    f = Failure(C.DNS_TIMEOUT, "dns", "TimeoutError: ", timer="total")
    assert str(f) == "dns_timeout (dns, total timer): TimeoutError: "
    counters = ClassCounters()
    counters.add(None)
    counters.add(f)
    counters.add(Failure(C.READ_TIMEOUT, "response", "x"))
    assert (counters.total, counters.failures, counters.dns_failures) == (3, 2, 1)
    snap = counters.snapshot()
    assert snap["ok"] == 1 and snap["dns_timeout"] == 1 and snap["tls_error"] == 0
    assert set(snap) == {"ok"} | {k.value for k in C}
    assert counters.by_phase() == {"dns_timeout": {"dns": 1}, "read_timeout": {"response": 1}}
    text = counters.prometheus()
    assert 'dns_sidecar_client_requests_total{class="dns_timeout",dns="true"} 1' in text
    assert 'dns_sidecar_client_requests_total{class="read_timeout",dns="false"} 1' in text
