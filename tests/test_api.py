"""The health and stats API, over real HTTP against an in-process sidecar and a fake upstream.

Covers every endpoint's status and body, readiness flipping with upstream health, pre-warm
(filling the cache, coalescing with live traffic, bounded concurrency, validation), cache
control, token enforcement, JSON errors, and the OpenAPI document (every documented response
is produced for real and validated against its schema; routes and document agree).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import dns.asyncquery
import dns.message
import dns.rcode
import dns.rdatatype
import pytest
from jsonschema import Draft202012Validator
from openapi_schema_validator import OAS31Validator

import sidecar.ops.api as api_mod
from sidecar import HostPort, Sidecar, StartupError
from sidecar.dns.wire import make_key
from sidecar.ops.api import ApiServer, exposure_warning, parse_name, parse_type
from sidecar.ops.openapi import openapi_document
from sidecar.ops.present import decode_entry, entry_records, final_records
from sidecar.testing.clock import OffsetClock
from sidecar.testing.fakeupstream import FakeUpstream
from tests.helpers import call, dns_query, make_config, running, url

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
#: The kernel's UDP counters are read from Linux's /proc/net.
LINUX = sys.platform.startswith("linux") and os.path.exists("/proc/net/udp")


# ------------------------------------------------------------------ fixtures and helpers



async def wait_ready(http: aiohttp.ClientSession, sc: Sidecar, want: int,
                     deadline: float = 10.0) -> dict[str, Any]:
    """Poll /readyz until it answers ``want`` (an external state change, with a deadline)."""
    end = time.monotonic() + deadline
    while True:
        status, body, _ = await call(http, "GET", url(sc, "/readyz"))
        if status == want:
            return body
        assert time.monotonic() < end, f"/readyz still {status} {body} after {deadline}s"
        await asyncio.sleep(0.05)


# ------------------------------------------------------------------ health


async def test_healthz_ok_while_serving(sc: Sidecar, http: aiohttp.ClientSession) -> None:
    status, body, resp = await call(http, "GET", url(sc, "/healthz"))
    assert (status, body) == (200, {"status": "ok"})
    assert resp.content_type == "application/json"


async def test_healthz_503_when_not_serving(sc: Sidecar, http: aiohttp.ClientSession) -> None:
    sc.serving = False  # what stop() sets first, before the API goes away
    try:
        status, body, _ = await call(http, "GET", url(sc, "/healthz"))
    finally:
        sc.serving = True
    assert (status, body) == (503, {"status": "not serving"})


async def test_readyz_flips_with_upstream_health(up: FakeUpstream, sc: Sidecar,
                                                 http: aiohttp.ClientSession) -> None:
    status, body, _ = await call(http, "GET", url(sc, "/readyz"))
    assert (status, body) == (200, {"status": "ready"})

    up.drop = True
    for i in range(3):  # three timeouts in a row quarantine the only server
        reply = await dns_query(sc, f"h{100 + i}.example.test")
        assert reply.rcode() == dns.rcode.SERVFAIL
    body = await wait_ready(http, sc, 503)
    assert body["status"] == "not ready"
    assert body["lameduck"] is False
    assert set(body["reasons"]) == {"."}
    assert body["reasons"]["."] == (f"no healthy upstream: 127.0.0.1:{up.port} quarantined"
                                    " (timeout)")
    _, stats, _ = await call(http, "GET", url(sc, "/stats"))
    assert stats["ready"] is False
    assert stats["upstreams"][0]["state"] == "quarantined"
    assert stats["upstreams"][0]["errors"]["timeout"] >= 3

    up.drop = False  # the prober notices within its back-off
    assert await wait_ready(http, sc, 200) == {"status": "ready"}


async def test_readyz_lameduck(sc: Sidecar, http: aiohttp.ClientSession) -> None:
    sc.lameduck = True  # what serve() sets on SIGTERM with --lameduck
    status, body, _ = await call(http, "GET", url(sc, "/readyz"))
    assert status == 503
    assert body == {"status": "not ready", "reasons": {"sidecar": "lame duck"}, "lameduck": True}
    sc.lameduck = False
    status, body, _ = await call(http, "GET", url(sc, "/readyz"))
    assert status == 200


async def test_readyz_names_the_failing_zone_pool(up: FakeUpstream,
                                                  http: aiohttp.ClientSession) -> None:
    dead = FakeUpstream(port=0)
    await dead.start()
    dead.drop = True
    try:
        zones = (("corp.internal", (HostPort("127.0.0.1", dead.port),)),)
        async with running(up, zones=zones) as sc:
            for i in range(3):
                reply = await dns_query(sc, f"h{i}.corp.internal")
                assert reply.rcode() == dns.rcode.SERVFAIL
            body = await wait_ready(http, sc, 503)
            assert list(body["reasons"]) == ["corp.internal"]
            assert f"127.0.0.1:{dead.port} quarantined" in body["reasons"]["corp.internal"]
            _, stats, _ = await call(http, "GET", url(sc, "/stats"))
            assert {u["pool"] for u in stats["upstreams"]} == {".", "corp.internal"}
    finally:
        await dead.stop()


# ------------------------------------------------------------------ stats


async def test_stats_counts_the_traffic(up: FakeUpstream, sc: Sidecar,
                                        http: aiohttp.ClientSession) -> None:
    for _ in range(3):
        await dns_query(sc, "www.example.test")           # 1 miss, 2 hits
    await dns_query(sc, "www.example.test", tcp=True)     # hit over TCP
    await dns_query(sc, "www.example.test", tcp=True)
    reply = await dns_query(sc, "nothere.example.test")   # NXDOMAIN, miss
    assert reply.rcode() == dns.rcode.NXDOMAIN

    status, stats, _ = await call(http, "GET", url(sc, "/stats"))
    assert status == 200
    assert {"uptime_s", "queries", "cache", "upstreams"} <= set(stats)
    assert stats["uptime_s"] >= 0
    q = stats["queries"]
    assert {"total", "udp", "tcp", "refused", "formerr", "servfail", "nxdomain",
            "ratelimited"} <= set(q)
    assert (q["total"], q["udp"], q["tcp"]) == (6, 4, 2)
    assert (q["noerror"], q["nxdomain"], q["servfail"], q["refused"], q["formerr"]) == (5, 1, 0,
                                                                                       0, 0)
    c = stats["cache"]
    assert set(c) >= {"entries", "capacity", "bytes", "memory_limit", "hits", "misses",
                      "hit_ratio", "evictions", "coalesced", "stale_served", "prefetched"}
    assert (c["hits"], c["misses"]) == (4, 2)
    assert c["hit_ratio"] == pytest.approx(4 / 6, abs=1e-5)
    assert c["entries"] == len(sc.cache.entries) >= 2
    assert c["capacity"] == sc.config.cache_size
    assert (c["evictions"], c["stale_served"], c["prefetched"]) == (0, 0, 0)
    assert c["bytes"] == sc.cache.bytes
    assert c["memory_limit"] == sc.config.cache_memory * 1024 * 1024 == sc.cache.memory_limit
    assert q["ratelimited"] == sc.handler.ratelimited == 0
    assert stats["api"] == {"refused": {"host": 0, "content_type": 0, "token": 0, "busy": 0}}

    [u] = stats["upstreams"]
    assert u["pool"] == "."
    assert u["address"] == f"127.0.0.1:{up.port}"
    assert u["state"] == "healthy"
    assert u["queries"] >= 2
    assert set(u["errors"]) >= {"timeout", "servfail", "refused", "unreachable"}
    assert u["errors"]["timeout"] == 0
    lat = u["latency_ms"]
    assert set(lat) == {"ewma", "p50", "p99"}
    assert all(isinstance(v, float) and 0 < v < 1000 for v in lat.values())
    assert lat["p50"] <= lat["p99"]
    assert stats["ready"] is True
    assert stats["tcp"]["accepted"] == 2


async def test_stats_udp_kernel_counters(sc: Sidecar, http: aiohttp.ClientSession) -> None:
    await dns_query(sc, "www.example.test")
    _, stats, _ = await call(http, "GET", url(sc, "/stats"))
    udp = stats["udp"]
    assert set(udp) == {"errors", "kernel_drops", "rcvbuf", "host_rcvbuf_errors", "path"}
    assert udp["path"] == sc.udp_path in ("compiled", "python")
    assert udp["rcvbuf"] == stats["udp_rcvbuf"] == sc.udp_rcvbuf > 0
    if LINUX:
        assert isinstance(udp["kernel_drops"], int) and udp["kernel_drops"] >= 0
        assert isinstance(udp["host_rcvbuf_errors"], int) and udp["host_rcvbuf_errors"] >= 0
    else:
        assert udp["kernel_drops"] is None


async def test_stats_latency_null_before_any_answer(sc: Sidecar,
                                                    http: aiohttp.ClientSession) -> None:
    _, stats, _ = await call(http, "GET", url(sc, "/stats"))
    assert stats["upstreams"][0]["latency_ms"] == {"ewma": None, "p50": None, "p99": None}
    assert stats["queries"]["total"] == 0
    assert stats["cache"]["hit_ratio"] == 0.0


# ------------------------------------------------------------------ cache


async def test_cache_get_entry(sc: Sidecar, http: aiohttp.ClientSession) -> None:
    await dns_query(sc, "alias2.example.test")
    status, body, _ = await call(http, "GET",
                                 url(sc, "/cache?name=Alias2.Example.Test.&type=a"))
    assert status == 200
    assert body["name"] == "alias2.example.test"
    assert (body["type"], body["rcode"], body["stale"]) == ("A", "NOERROR", False)
    assert sorted(body["records"]) == ["10.0.0.1", "10.0.0.2"]
    assert 0 < body["ttl"] <= 30  # the chain's shortest TTL (alias2 CNAME, 30 s)
    assert 0 < body["expires_in"] <= 30
    assert [r["type"] for r in body["answer"]] == ["CNAME", "CNAME", "A", "A"]
    assert body["answer"][0] == {"name": "alias2.example.test", "type": "CNAME",
                                 "ttl": body["answer"][0]["ttl"], "data": "alias.example.test."}

    await dns_query(sc, "gone.example.test", "AAAA")
    status, body, _ = await call(http, "GET",
                                 url(sc, "/cache?name=gone.example.test&type=AAAA"))
    assert (status, body["rcode"], body["records"]) == (200, "NXDOMAIN", [])
    assert [r["type"] for r in body["authority"]] == ["SOA"]
    assert 0 < body["ttl"] <= 60


async def test_cache_get_stale_entry(clock: OffsetClock, up: FakeUpstream,
                                     http: aiohttp.ClientSession) -> None:
    async with running(up) as sc:
        await dns_query(sc, "www.example.test")
        key = next(iter(sc.cache.entries))
        clock.advance(sc.cache.get(key).remaining(clock()) + 5)  # as if 5 s past its TTL
        status, body, _ = await call(http, "GET", url(sc, "/cache?name=www.example.test"))
    assert status == 200
    assert body["stale"] is True
    assert body["ttl"] == 0
    assert body["expires_in"] < -4


async def test_cache_get_errors(sc: Sidecar, http: aiohttp.ClientSession) -> None:
    status, body, _ = await call(http, "GET", url(sc, "/cache?name=www.example.test"))
    assert status == 404
    assert body == {"error": "name: www.example.test/A is not in the cache"}
    status, body, _ = await call(http, "GET", url(sc, "/cache"))
    assert status == 400 and body["error"].startswith("name:")
    status, body, _ = await call(http, "GET", url(sc, "/cache?name=www.example.test&type=BOGUS"))
    assert status == 400 and body["error"].startswith("type:") and "BOGUS" in body["error"]
    status, body, _ = await call(http, "GET", url(sc, "/cache?name=a..b"))
    assert status == 400 and body["error"].startswith("name:")
    status, body, _ = await call(http, "GET", url(sc, "/cache?name=" + "x" * 64 + ".test"))
    assert status == 400 and body["error"].startswith("name:")


async def test_cache_delete_name_and_all(up: FakeUpstream, sc: Sidecar,
                                         http: aiohttp.ClientSession) -> None:
    for rdtype in ("A", "AAAA"):
        await dns_query(sc, "www.example.test", rdtype)
    await dns_query(sc, "v4only.example.test")
    status, body, _ = await call(http, "DELETE", url(sc, "/cache?name=WWW.example.test."))
    assert (status, body) == (200, {"deleted": 2, "name": "www.example.test"})
    for rdtype in ("A", "AAAA"):
        status, _, _ = await call(http, "GET",
                                  url(sc, f"/cache?name=www.example.test&type={rdtype}"))
        assert status == 404
    status, _, _ = await call(http, "GET", url(sc, "/cache?name=v4only.example.test"))
    assert status == 200

    up.reset_counts()
    await dns_query(sc, "www.example.test")  # asks the upstream again
    assert up.count("www.example.test", "A") == 1

    status, body, _ = await call(http, "DELETE", url(sc, "/cache?name=www.example.test&type=A"))
    assert (status, body) == (200, {"deleted": 1, "name": "www.example.test", "type": "A"})

    n = len(sc.cache.entries)
    assert n >= 1
    status, body, _ = await call(http, "DELETE", url(sc, "/cache"))
    assert (status, body) == (200, {"deleted": n})
    assert len(sc.cache.entries) == 0

    status, body, _ = await call(http, "DELETE", url(sc, "/cache?type=A"))
    assert status == 400 and body["error"].startswith("type:")
    status, body, _ = await call(http, "DELETE", url(sc, "/cache?name=bad name"))
    assert status == 400 and body["error"].startswith("name:")


# ------------------------------------------------------------------ pre-warm


async def test_prewarm_fills_the_cache(up: FakeUpstream, sc: Sidecar,
                                       http: aiohttp.ClientSession) -> None:
    names = ["WWW.Example.Test.", "alias2.example.test", "nothere.example.test",
             "v4only.example.test", "www.example.test"]  # the last is a duplicate
    status, body, _ = await call(http, "POST", url(sc, "/prewarm"), json={"names": names})
    assert status == 200
    assert set(body) == {"elapsed_ms", "omitted", "results"}
    assert body["omitted"] == 0
    assert isinstance(body["elapsed_ms"], float) and body["elapsed_ms"] > 0
    results = {(r["name"], r["type"]): r for r in body["results"]}
    assert [(r["name"], r["type"]) for r in body["results"]] == [
        ("www.example.test", "A"), ("www.example.test", "AAAA"),
        ("alias2.example.test", "A"), ("alias2.example.test", "AAAA"),
        ("nothere.example.test", "A"), ("nothere.example.test", "AAAA"),
        ("v4only.example.test", "A"), ("v4only.example.test", "AAAA"),
    ]
    for r in body["results"]:
        assert set(r) == {"name", "type", "rcode", "ttl", "records"}
    www = results[("www.example.test", "A")]
    assert www["rcode"] == "NOERROR" and sorted(www["records"]) == ["10.0.0.1", "10.0.0.2"]
    assert 290 <= www["ttl"] <= 300
    assert results[("www.example.test", "AAAA")]["records"] == ["2001:db8::1"]
    alias = results[("alias2.example.test", "A")]  # CNAME chain followed: addresses only
    assert sorted(alias["records"]) == ["10.0.0.1", "10.0.0.2"] and 0 < alias["ttl"] <= 30
    nx = results[("nothere.example.test", "A")]
    assert (nx["rcode"], nx["records"]) == ("NXDOMAIN", []) and 0 < nx["ttl"] <= 60
    nodata = results[("v4only.example.test", "AAAA")]
    assert (nodata["rcode"], nodata["records"]) == ("NOERROR", []) and 0 < nodata["ttl"] <= 60

    # The following DNS lookups are all answered from the cache.
    up.reset_counts()
    hits = sc.cache.hits
    for name, rdtype in results:
        reply = await dns_query(sc, name, rdtype)
        assert dns.rcode.to_text(reply.rcode()) == results[(name, rdtype)]["rcode"]
    assert up.queries == 0
    assert sc.cache.hits - hits == len(results)

    # A second pre-warm is served from the cache too.
    status, again, _ = await call(http, "POST", url(sc, "/prewarm"),
                                  json={"names": ["www.example.test"], "types": ["A"]})
    assert status == 200 and up.queries == 0
    assert sorted(again["results"][0]["records"]) == ["10.0.0.1", "10.0.0.2"]
    _, stats, _ = await call(http, "GET", url(sc, "/stats"))
    assert stats["prewarm"] == {"calls": 2, "cached": 1, "resolved": 8, "inflight": 0,
                                "omitted": 0}


async def test_prewarm_other_types_and_failures(up: FakeUpstream, sc: Sidecar,
                                                http: aiohttp.ClientSession) -> None:
    up.name_rcode["broken.example.test"] = "SERVFAIL"
    status, body, _ = await call(http, "POST", url(sc, "/prewarm"), json={
        "names": ["example.test", "broken.example.test"], "types": ["mx", "TXT"]})
    assert status == 200
    got = {(r["name"], r["type"]): r for r in body["results"]}
    assert got[("example.test", "MX")]["records"] == ["10 mail.example.test."]
    assert got[("example.test", "TXT")]["records"] == ['"v=spf1 -all"']
    assert got[("broken.example.test", "MX")]["rcode"] == "SERVFAIL"
    assert got[("broken.example.test", "MX")]["records"] == []


async def test_prewarm_coalesces_with_live_traffic(up: FakeUpstream,
                                                   http: aiohttp.ClientSession) -> None:
    up.name_latency["h7.example.test"] = 0.5
    async with running(up, timeout=2.0) as sc:
        live = asyncio.ensure_future(dns_query(sc, "h7.example.test"))
        await up.wait_for_queries(1)  # the live query's fetch is in flight
        status, body, _ = await call(http, "POST", url(sc, "/prewarm"),
                                     json={"names": ["h7.example.test"], "types": ["A"]})
        reply = await live
        assert status == 200
        assert body["results"][0]["records"] == ["127.0.0.1"]
        assert reply.rcode() == dns.rcode.NOERROR
        assert up.count("h7.example.test", "A") == 1
        _, stats, _ = await call(http, "GET", url(sc, "/stats"))
        assert stats["cache"]["coalesced"] == 1
        assert stats["prewarm"]["resolved"] == 1


async def test_prewarm_concurrency_is_bounded(up: FakeUpstream,
                                              http: aiohttp.ClientSession) -> None:
    """Lookups resolving at once stay within a quarter of --max-inflight (here 2), over
    two calls running together."""
    up.latency = 0.05
    async with running(up, max_inflight=8, timeout=2.0) as sc:
        assert sc.prewarm.concurrency == 2
        resolver = sc.resolver
        real = resolver.resolve
        now = peak = 0

        async def counting(key: bytes) -> Any:
            nonlocal now, peak
            now += 1
            peak = max(peak, now)
            try:
                return await real(key)
            finally:
                now -= 1

        resolver.resolve = counting  # type: ignore[method-assign]
        calls = [call(http, "POST", url(sc, "/prewarm"),
                      json={"names": [f"h{i}.example.test" for i in range(k, k + 4)],
                            "types": ["A"]}) for k in (1, 11)]
        answers = await asyncio.gather(*calls)
    for status, body, _ in answers:
        assert status == 200
        assert [r["rcode"] for r in body["results"]] == ["NOERROR"] * 4
    assert peak == 2


async def test_prewarm_no_aaaa(up: FakeUpstream, http: aiohttp.ClientSession) -> None:
    async with running(up, no_aaaa=True) as sc:
        status, body, _ = await call(http, "POST", url(sc, "/prewarm"),
                                     json={"names": ["www.example.test"]})
    assert status == 200
    aaaa = body["results"][1]
    assert (aaaa["type"], aaaa["rcode"], aaaa["records"]) == ("AAAA", "NOERROR", [])
    assert up.count("www.example.test", "AAAA") == 0


@pytest.mark.parametrize(("payload", "field"), [
    ({"names": ["www.example.test"], "types": ["A", "BOGUS"]}, "types[1]"),
    ({"names": ["www.example.test"], "types": []}, "types"),
    ({"names": ["www.example.test"], "types": "A"}, "types"),
    ({"names": ["ok.example.test", "a..b"]}, "names[1]"),
    ({"names": ["ok.example.test", "bad name.test"]}, "names[1]"),
    ({"names": ["caf\u00e9.example"]}, "names[0]"),
    ({"names": ["x" * 64 + ".test"]}, "names[0]"),
    ({"names": [".".join(["abcdefghi"] * 30)]}, "names[0]"),
    ({"names": [""]}, "names[0]"),
    ({"names": ["."]}, "names[0]"),
    ({"names": ["www.example.test.."]}, "names[0]"),
    ({"names": [42]}, "names[0]"),
    ({"names": "www.example.test"}, "names"),
    ({"types": ["A"]}, "names"),
    ({"names": [], "type": ["A"]}, "type"),
    (["www.example.test"], "body"),
])
async def test_prewarm_rejects_bad_requests(sc: Sidecar, http: aiohttp.ClientSession,
                                            payload: Any, field: str) -> None:
    status, body, _ = await call(http, "POST", url(sc, "/prewarm"), json=payload)
    assert status == 400, body
    assert set(body) == {"error"}
    assert body["error"].startswith(field + ":"), body


async def test_prewarm_bounds(sc: Sidecar, http: aiohttp.ClientSession) -> None:
    too_many = [f"h{i}.example.test" for i in range(api_mod.MAX_PREWARM_NAMES + 1)]
    status, body, _ = await call(http, "POST", url(sc, "/prewarm"), json={"names": too_many})
    assert status == 400 and body["error"].startswith("names:")
    assert str(api_mod.MAX_PREWARM_NAMES) in body["error"]

    status, body, _ = await call(http, "POST", url(sc, "/prewarm"),
                                 data=b'{"names": [' + b" " * api_mod.MAX_BODY + b"]}",
                                 headers={"Content-Type": "application/json"})
    assert status == 413 and body["error"].startswith("body:")

    for junk in (b"{not json", b"[" * 100_000, b"\xff\xfe", b""):
        status, body, _ = await call(http, "POST", url(sc, "/prewarm"), data=junk,
                                     headers={"Content-Type": "application/json"})
        assert status == 400 and body["error"].startswith("body:"), junk[:10]

    status, body, _ = await call(http, "POST", url(sc, "/prewarm"), json={"names": []})
    assert status == 200 and body["results"] == []


# ------------------------------------------------------------------ tokens and errors


async def test_token_required_on_mutating_calls(up: FakeUpstream,
                                                http: aiohttp.ClientSession) -> None:
    async with running(up, api_token=TOKEN) as sc:
        await dns_query(sc, "www.example.test")
        wrong = {"Authorization": "Bearer nope"}
        basic = {"Authorization": f"Basic {TOKEN}"}
        for headers in ({}, wrong, basic, {"Authorization": TOKEN}):
            status, body, resp = await call(http, "DELETE", url(sc, "/cache"), headers=headers)
            assert status == 401 and body["error"].startswith("Authorization:")
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
            status, body, _ = await call(http, "POST", url(sc, "/prewarm"), headers=headers,
                                         json={"names": ["www.example.test"]})
            assert status == 401 and body["error"].startswith("Authorization:")
        assert len(sc.cache.entries) == 1  # nothing was flushed

        # Reads need no token.
        for path in ("/healthz", "/readyz", "/stats", "/metrics", "/openapi.json",
                     "/cache?name=www.example.test"):
            status, _, _ = await call(http, "GET", url(sc, path))
            assert status == 200, path

        status, body, _ = await call(http, "POST", url(sc, "/prewarm"), headers=AUTH,
                                     json={"names": ["www.example.test"], "types": ["A"]})
        assert status == 200 and body["results"][0]["rcode"] == "NOERROR"
        status, body, _ = await call(http, "DELETE", url(sc, "/cache"),
                                     headers={"Authorization": f"bearer  {TOKEN} "})
        assert (status, body) == (200, {"deleted": 1})


async def test_no_token_configured_allows_mutations(sc: Sidecar,
                                                    http: aiohttp.ClientSession) -> None:
    status, body, _ = await call(http, "DELETE", url(sc, "/cache"))
    assert (status, body) == (200, {"deleted": 0})


async def test_errors_are_json(sc: Sidecar, http: aiohttp.ClientSession) -> None:
    status, body, resp = await call(http, "GET", url(sc, "/nope"))
    assert (status, body) == (404, {"error": "no such endpoint: /nope"})
    status, body, resp = await call(http, "POST", url(sc, "/stats"))
    assert status == 405 and body == {"error": "method POST not allowed on /stats"}
    assert "GET" in resp.headers["Allow"]
    status, body, resp = await call(http, "PUT", url(sc, "/cache"))
    assert status == 405 and "DELETE" in resp.headers["Allow"]


async def test_internal_error_is_json_and_logged(sc: Sidecar, http: aiohttp.ClientSession,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    def boom(*_a: Any, **_k: Any) -> None:
        raise RuntimeError("kaboom")

    monkeypatch.setattr(api_mod, "snapshot", boom)
    with caplog.at_level(logging.ERROR, logger="sidecar.api"):
        status, body, _ = await call(http, "GET", url(sc, "/stats"))
    assert status == 500 and set(body) == {"error"}
    assert "kaboom" in caplog.text
    status, _, _ = await call(http, "GET", url(sc, "/healthz"))
    assert status == 200


# ------------------------------------------------------------------ start-up


async def test_port_in_use_is_a_startup_error(up: FakeUpstream, sc: Sidecar) -> None:
    taken = sc.http_address
    assert taken is not None and taken.port != 0
    other = Sidecar(make_config(up, http=taken))
    with pytest.raises(StartupError, match=f"--http {taken}"):
        await other.start()
    assert other.serving is False


async def test_api_server_reports_bound_port(up: FakeUpstream) -> None:
    sc = Sidecar(make_config(up))
    server = ApiServer(sc)
    addr = await server.start(HostPort("127.0.0.1", 0))
    try:
        assert addr.host == "127.0.0.1" and addr.port > 0
        async with aiohttp.ClientSession() as http:
            status, body, _ = await call(http, "GET", f"http://{addr}/healthz")
        assert (status, body) == (503, {"status": "not serving"})  # listeners not started
    finally:
        await server.stop()
        await sc.pools.close()


def test_exposure_warning() -> None:
    assert exposure_warning(HostPort("127.0.0.1", 8053), None) is None
    assert exposure_warning(HostPort("::1", 8053), None) is None
    assert exposure_warning(HostPort("0.0.0.0", 8053), "tok") is None
    warning = exposure_warning(HostPort("0.0.0.0", 8053), None)
    assert warning is not None and "--api-token" in warning and "0.0.0.0:8053" in warning
    assert exposure_warning(HostPort("::", 8053), "") is not None


async def test_exposure_warning_logged_at_start(up: FakeUpstream,
                                                caplog: pytest.LogCaptureFixture,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # Bind loopback but make the check see a public address: no real exposure in tests.
    monkeypatch.setattr(api_mod, "exposure_warning",
                        lambda addr, token: None if token else f"--http {addr}: exposed")
    with caplog.at_level(logging.WARNING, logger="sidecar.api"):
        async with running(up):
            pass
    assert "exposed" in caplog.text


def test_parse_helpers() -> None:
    assert parse_name(" WWW.Example.TEST. ", "n") == "www.example.test"
    assert parse_name("_sip._udp.example.test", "n") == "_sip._udp.example.test"
    assert parse_type("aaaa", "t") == "AAAA"
    for bad in ("", ".", "a..b", "a b", "\u00e9.test", "x" * 64, "a.."):
        with pytest.raises(api_mod.ApiError) as exc:
            parse_name(bad, "n")
        assert exc.value.status == 400 and exc.value.message.startswith("n:")
    with pytest.raises(api_mod.ApiError):
        parse_type("ANY", "t")


def test_parsed_names_keep_their_cache_key() -> None:
    for name in ("www.example.test", "_sip._udp.example.test", "*.example.test", "a",
                 "x" * 63 + ".test", "a\\.b.test", "a\\032b.test", "-.0"):
        for qtype in (1, 28, 15):
            assert make_key(parse_name(name, "n"), qtype) == make_key(name, qtype), name


async def test_entry_records_match_dnslib(sc: Sidecar) -> None:
    """The wire-level A/AAAA reader agrees with a full dnslib parse of every entry."""
    for name in ("www.example.test", "alias2.example.test", "many.example.test",
                 "v4only.example.test", "nothere.example.test"):
        for rdtype in ("A", "AAAA"):
            await dns_query(sc, name, rdtype)
    checked = 0
    for key, entry in sc.cache.items():
        qtype = int.from_bytes(key[-4:-2], "big")
        if qtype in (1, 28):
            assert entry_records(key, entry, qtype) == final_records(decode_entry(key, entry),
                                                                     qtype)
            checked += 1
    assert checked >= 10
    many = make_key("many.example.test", 1)
    assert len(entry_records(many, sc.cache.get(many), 1)) == 40


# ------------------------------------------------------------------ OpenAPI


def _schema_for(doc: dict[str, Any], path: str, method: str, status: int,
                content_type: str) -> dict[str, Any]:
    op = doc["paths"][path][method.lower()]
    response = op["responses"][str(status)]
    return response["content"][content_type]["schema"]


def _validate(doc: dict[str, Any], schema: dict[str, Any], body: Any) -> None:
    root = {**schema, "components": doc["components"]}
    OAS31Validator(root).validate(body)


async def test_openapi_document_matches_the_routes(sc: Sidecar,
                                                   http: aiohttp.ClientSession) -> None:
    status, doc, _ = await call(http, "GET", url(sc, "/openapi.json"))
    assert status == 200
    assert doc["openapi"].startswith("3.1")
    assert doc == openapi_document(max_names=api_mod.MAX_PREWARM_NAMES,
                                   max_lookups=api_mod.MAX_PREWARM_LOOKUPS,
                                   concurrency=api_mod.PREWARM_CONCURRENCY,
                                   max_body=api_mod.MAX_BODY,
                                   backlog=api_mod.PREWARM_BACKLOG,
                                   response_budget=api_mod.PREWARM_RESPONSE_BUDGET,
                                   retry_after=api_mod.PREWARM_RETRY_AFTER)
    assert doc == openapi_document(**sc._api.limits())
    for schema in doc["components"]["schemas"].values():
        Draft202012Validator.check_schema(schema)
    documented = {(path, method.upper()) for path, ops in doc["paths"].items() for method in ops}
    routes = {(r.resource.canonical, r.method) for r in sc._api.app.router.routes()
              if r.method != "HEAD"}
    assert documented == routes


async def test_openapi_validates_real_responses(up: FakeUpstream, http: aiohttp.ClientSession,
                                                tmp_path: Path) -> None:
    """Produce every documented response for real and validate its body against the
    document; also check that no documented response went unproduced."""
    async with running(up, api_token=TOKEN, cache_file=str(tmp_path / "cache.snap")) as sc:
        _, doc, _ = await call(http, "GET", url(sc, "/openapi.json"))
        seen: set[tuple[str, str, str]] = set()

        async def check(method: str, target: str, want: int, **kw: Any) -> Any:
            status, body, resp = await call(http, method, url(sc, target), **kw)
            assert status == want, (method, target, status, body)
            path = target.split("?")[0]
            ctype = "text/plain" if resp.content_type == "text/plain" else resp.content_type
            _validate(doc, _schema_for(doc, path, method, status, ctype), body)
            seen.add((path, method.lower(), str(status)))
            return body

        await dns_query(sc, "www.example.test")
        await dns_query(sc, "nothere.example.test")
        await check("GET", "/healthz", 200)
        await check("GET", "/readyz", 200)
        await check("GET", "/stats", 200)
        await check("GET", "/metrics", 200)
        await check("GET", "/openapi.json", 200)
        await check("GET", "/cache?name=www.example.test&type=A", 200)
        await check("GET", "/cache?name=nothere.example.test", 200)
        await check("GET", "/cache?name=www.example.test&type=MX", 404)
        await check("GET", "/cache?name=www.example.test&type=X", 400)
        await check("POST", "/prewarm", 200, headers=AUTH,
                    json={"names": ["www.example.test", "alias.example.test", "nothere.test",
                                    "example.test"], "types": ["A", "AAAA", "MX", "TXT"]})
        await check("POST", "/prewarm", 400, headers=AUTH, json={"names": ["a..b"]})
        await check("POST", "/prewarm", 401, json={"names": ["www.example.test"]})
        await check("POST", "/prewarm", 413, headers={**AUTH, "Content-Type": "application/json"},
                    data=b" " * (api_mod.MAX_BODY + 1))
        await check("POST", "/prewarm", 415, headers=AUTH, data="{}")  # text/plain
        await check("DELETE", "/cache", 415, headers=AUTH, data="{}")
        await check("POST", "/snapshot", 200, headers=AUTH, json={})
        await check("POST", "/snapshot", 401, json={})
        await check("POST", "/snapshot", 415, headers=AUTH, data="{}")
        await check("DELETE", "/cache", 400, headers=AUTH, json={"name": "www.example.test"})
        # 429: a slow first call holds the (shrunk) backlog while a second one arrives.
        sc.prewarm.backlog = 1
        up.name_latency["slow.example.test"] = 0.3
        first = asyncio.ensure_future(call(http, "POST", url(sc, "/prewarm"), headers=AUTH,
                                           json={"names": ["slow.example.test"],
                                                 "types": ["A"]}))
        await up.wait_for_queries(up.queries + 1)
        body = await check("POST", "/prewarm", 429, headers=AUTH,
                           json={"names": ["www.example.test"], "types": ["A"]})
        assert (await first)[0] == 200
        sc.prewarm.backlog = api_mod.PREWARM_BACKLOG
        await check("DELETE", "/cache?name=www.example.test", 200, headers=AUTH)
        await check("DELETE", "/cache?name=www.example.test&type=AAAA", 200, headers=AUTH)
        await check("DELETE", "/cache?name=..", 400, headers=AUTH)
        await check("DELETE", "/cache", 401)
        await check("DELETE", "/cache", 200, headers=AUTH)
        sc.lameduck = True
        await check("GET", "/readyz", 503)
        sc.lameduck = False
        sc.serving = False
        await check("GET", "/healthz", 503)
        sc.serving = True

        up.drop = True
        for i in range(3):
            await dns_query(sc, f"h{200 + i}.example.test")
        await wait_ready(http, sc, 503)
        await check("GET", "/readyz", 503)
        await check("GET", "/stats", 200)

        # Errors outside the documented operations are Error documents too.
        error_schema = {"$ref": "#/components/schemas/Error"}
        for method, target, want in (("GET", "/nope", 404), ("POST", "/stats", 405)):
            status, body, _ = await call(http, method, url(sc, target))
            assert status == want
            _validate(doc, error_schema, body)

    # 421 exists only without --api-token (with one, the token is the guard).
    async with running(up) as open_sc:
        for method, path, kw in (("POST", "/prewarm", {"json": {"names": []}}),
                                 ("DELETE", "/cache", {}),
                                 ("POST", "/snapshot", {"json": {}})):
            status, body, _ = await call(http, method, url(open_sc, path),
                                         headers={"Host": "evil.example:8053"}, **kw)
            assert status == 421, body
            _validate(doc, _schema_for(doc, path, method, 421, "application/json"), body)
            seen.add((path, method.lower(), "421"))
        # 404 without --cache-file.
        status, body, _ = await call(http, "POST", url(open_sc, "/snapshot"), json={})
        assert status == 404, body
        _validate(doc, _schema_for(doc, "/snapshot", "POST", 404, "application/json"), body)
        seen.add(("/snapshot", "post", "404"))
    # 503 when the save fails: the folder is not there.
    async with running(up, cache_file=str(tmp_path / "missing" / "cache.snap")) as bad_sc:
        status, body, _ = await call(http, "POST", url(bad_sc, "/snapshot"), json={})
        assert status == 503, body
        _validate(doc, _schema_for(doc, "/snapshot", "POST", 503, "application/json"), body)
        seen.add(("/snapshot", "post", "503"))

    documented = {(path, method, status) for path, ops in doc["paths"].items()
                  for method, op in ops.items() for status in op["responses"]}
    assert documented == seen
