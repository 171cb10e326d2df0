"""``GET /metrics``: scraped over real HTTP, parsed with prometheus-client's own text parser,
and compared with the DNS traffic the test sent (and with the fake upstream's own count)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import aiohttp
import dns.asyncquery
import dns.message
import dns.rcode
import dns.rdatatype
import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

import sidecar
from sidecar import Config, HostPort, Sidecar
from sidecar.latency import BUCKETS
from sidecar.metrics import CONTENT_TYPE_LATEST, histogram_buckets
from tests.fakeupstream import FakeUpstream

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def make_config(up: FakeUpstream, **overrides: Any) -> Config:
    cfg = Config(listen=(HostPort("127.0.0.1", 0),), http=HostPort("127.0.0.1", 0),
                 upstreams=(HostPort("127.0.0.1", up.port),), timeout=0.2, tries=1)
    return replace(cfg, **overrides)


@asynccontextmanager
async def running(up: FakeUpstream, **overrides: Any) -> AsyncIterator[Sidecar]:
    sc = Sidecar(make_config(up, **overrides))
    await sc.start()
    try:
        yield sc
    finally:
        await sc.stop(drain=0.5)


@pytest.fixture
async def up() -> AsyncIterator[FakeUpstream]:
    server = FakeUpstream(port=0)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def sc(up: FakeUpstream) -> AsyncIterator[Sidecar]:
    async with running(up) as s:
        yield s


async def dns_query(sc: Sidecar, name: str, rdtype: str = "A", *,
                    tcp: bool = False) -> dns.message.Message:
    q = dns.message.make_query(name, dns.rdatatype.from_text(rdtype))
    port = sc.dns_addresses[0].port
    if tcp:
        return await dns.asyncquery.tcp(q, "127.0.0.1", port=port, timeout=3)
    return await dns.asyncquery.udp(q, "127.0.0.1", port=port, timeout=3)


async def scrape(sc: Sidecar) -> tuple[str, list[Any]]:
    """(content type, parsed families) of one real scrape."""
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://{sc.http_address}/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
            return resp.headers["Content-Type"], list(text_string_to_metric_families(text))


def samples(families: list[Any]) -> Samples:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in families for s in f.samples}


def value(got: Samples, name: str, **labels: str) -> float:
    return got[(name, tuple(sorted(labels.items())))]


def total(got: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, lv), v in got.items() if n == name and want <= set(lv))


async def test_metrics_match_the_traffic(up: FakeUpstream, sc: Sidecar) -> None:
    for _ in range(3):
        await dns_query(sc, "www.example.test")            # 1 miss, 2 hits
    await dns_query(sc, "www.example.test", tcp=True)      # 2 hits over TCP
    await dns_query(sc, "www.example.test", tcp=True)
    reply = await dns_query(sc, "nothere.example.test")    # miss, NXDOMAIN
    assert reply.rcode() == dns.rcode.NXDOMAIN

    ctype, families = await scrape(sc)
    assert ctype == CONTENT_TYPE_LATEST
    got = samples(families)
    server = f"127.0.0.1:{up.port}"
    up_labels = {"pool": ".", "server": server}

    assert value(got, "dns_sidecar_dns_requests_total", proto="udp") == 4
    assert value(got, "dns_sidecar_dns_requests_total", proto="tcp") == 2
    assert value(got, "dns_sidecar_dns_responses_total", rcode="NOERROR") == 5
    assert value(got, "dns_sidecar_dns_responses_total", rcode="NXDOMAIN") == 1
    assert value(got, "dns_sidecar_dns_responses_total", rcode="SERVFAIL") == 0
    assert value(got, "dns_sidecar_cache_hits_total") == 4
    assert value(got, "dns_sidecar_cache_misses_total") == 2
    assert value(got, "dns_sidecar_cache_entries") == len(sc.cache.entries) >= 2
    assert value(got, "dns_sidecar_cache_capacity") == sc.config.cache_size
    for name in ("evictions", "coalesced", "stale_served", "prefetch"):
        assert value(got, f"dns_sidecar_cache_{name}_total") == 0

    # Upstream counters agree with what the fake upstream itself received.
    assert total(got, "dns_sidecar_upstream_requests_total", **up_labels) == up.queries
    assert value(got, "dns_sidecar_upstream_requests_total", outcome="nxdomain",
                 **up_labels) == 1
    assert value(got, "dns_sidecar_upstream_requests_total", outcome="timeout",
                 **up_labels) == 0
    answered = sum(value(got, "dns_sidecar_upstream_requests_total", outcome=o, **up_labels)
                   for o in ("ok", "nxdomain", "nodata"))
    assert answered >= 2

    # Latency histogram: cumulative buckets in seconds, +Inf = count = answers.
    hist = "dns_sidecar_upstream_request_duration_seconds"
    family = next(f for f in families if f.name == hist)
    assert family.type == "histogram"
    buckets = [(float(s.labels["le"]), s.value) for s in family.samples
               if s.name == hist + "_bucket"]
    assert [b for b, _ in buckets] == [*BUCKETS, float("inf")]
    counts = [c for _, c in buckets]
    assert counts == sorted(counts)
    assert counts[-1] == value(got, hist + "_count", **up_labels) == answered
    assert 0 < value(got, hist + "_sum", **up_labels) < answered * 0.2

    assert value(got, "dns_sidecar_upstream_healthy", **up_labels) == 1
    assert value(got, "dns_sidecar_upstream_inflight", **up_labels) == 0
    assert value(got, "dns_sidecar_ready") == 1
    assert value(got, "dns_sidecar_uptime_seconds") > 0
    assert value(got, "dns_sidecar_build_info", version=sidecar.__version__) == 1


async def test_metric_names_and_types(sc: Sidecar) -> None:
    await dns_query(sc, "www.example.test")
    text_families = (await scrape(sc))[1]
    by_name = {f.name: f for f in text_families}
    for f in text_families:
        assert f.name.startswith(("dns_sidecar_", "process_")), f.name
        if f.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in f.samples), f.name
    required = {
        "dns_sidecar_dns_requests": "counter",
        "dns_sidecar_dns_responses": "counter",
        "dns_sidecar_cache_hits": "counter",
        "dns_sidecar_cache_misses": "counter",
        "dns_sidecar_cache_entries": "gauge",
        "dns_sidecar_cache_capacity": "gauge",
        "dns_sidecar_cache_evictions": "counter",
        "dns_sidecar_cache_coalesced": "counter",
        "dns_sidecar_cache_stale_served": "counter",
        "dns_sidecar_cache_prefetch": "counter",
        "dns_sidecar_upstream_requests": "counter",
        "dns_sidecar_upstream_request_duration_seconds": "histogram",
        "dns_sidecar_upstream_healthy": "gauge",
        "dns_sidecar_upstream_inflight": "gauge",
        "dns_sidecar_ready": "gauge",
        "dns_sidecar_uptime_seconds": "gauge",
        "dns_sidecar_build_info": "gauge",
    }
    for name, kind in required.items():
        assert name in by_name, name
        assert by_name[name].type == kind, name
    labels = {name: {k for s in by_name[name].samples for k in s.labels} for name in required}
    assert labels["dns_sidecar_dns_requests"] == {"proto"}
    assert labels["dns_sidecar_dns_responses"] == {"rcode"}
    assert labels["dns_sidecar_upstream_requests"] == {"pool", "server", "outcome"}
    assert labels["dns_sidecar_upstream_request_duration_seconds"] == {"pool", "server", "le"}
    assert labels["dns_sidecar_upstream_healthy"] == {"pool", "server"}
    assert labels["dns_sidecar_build_info"] == {"version"}


async def test_metrics_follow_upstream_failures(up: FakeUpstream, sc: Sidecar) -> None:
    up.drop = True
    for i in range(3):  # three timeouts quarantine the only server
        reply = await dns_query(sc, f"h{i}.example.test")
        assert reply.rcode() == dns.rcode.SERVFAIL
    got = samples((await scrape(sc))[1])
    up_labels = {"pool": ".", "server": f"127.0.0.1:{up.port}"}
    assert value(got, "dns_sidecar_upstream_requests_total", outcome="timeout",
                 **up_labels) >= 3
    assert value(got, "dns_sidecar_dns_responses_total", rcode="SERVFAIL") == 3
    assert value(got, "dns_sidecar_upstream_healthy", **up_labels) == 0
    assert value(got, "dns_sidecar_ready") == 0
    assert value(got, "dns_sidecar_upstream_quarantines_total", **up_labels) >= 1
    # Timeouts are not answers: the duration histogram stays empty.
    assert value(got, "dns_sidecar_upstream_request_duration_seconds_count", **up_labels) == 0


async def test_metrics_include_prewarm(sc: Sidecar) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"http://{sc.http_address}/prewarm",
                             json={"names": ["www.example.test"], "types": ["A"]}) as resp:
            assert resp.status == 200
    got = samples((await scrape(sc))[1])
    assert value(got, "dns_sidecar_prewarm_requests_total") == 1
    assert value(got, "dns_sidecar_prewarm_lookups_total", source="resolver") == 1
    assert value(got, "dns_sidecar_prewarm_lookups_total", source="cache") == 0
    # Pre-warm is not DNS traffic: the DNS counters did not move.
    assert total(got, "dns_sidecar_dns_requests_total") == 0
    assert value(got, "dns_sidecar_cache_misses_total") == 0


async def test_private_registries(up: FakeUpstream, sc: Sidecar) -> None:
    async with running(up) as other:
        await dns_query(other, "www.example.test")
        mine = samples((await scrape(sc))[1])
        theirs = samples((await scrape(other))[1])
    assert total(mine, "dns_sidecar_dns_requests_total") == 0
    assert total(theirs, "dns_sidecar_dns_requests_total") == 1
    global_names = {m.name for m in prometheus_client.REGISTRY.collect()}
    assert not any(n.startswith("dns_sidecar_") for n in global_names)


def test_histogram_buckets_are_cumulative() -> None:
    per_bucket = [0] * (len(BUCKETS) + 1)
    per_bucket[0] = 2   # <= 0.25 ms
    per_bucket[3] = 5   # <= 2.5 ms
    per_bucket[-1] = 1  # past the largest bound
    got = histogram_buckets(per_bucket, 8)
    assert got[0] == ("0.00025", 2.0)
    assert got[3] == ("0.0025", 7.0)
    assert got[len(BUCKETS) - 1] == ("5.0", 7.0)
    assert got[-1] == ("+Inf", 8.0)
