"""``GET /metrics``: scraped over real HTTP, parsed with prometheus-client's own text parser,
and compared with the DNS traffic the test sent (and with the fake upstream's own count)."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path
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
from sidecar import Sidecar
from sidecar.ops import udpdrops as kernel
from sidecar.ops.metrics import CONTENT_TYPE_LATEST, histogram_buckets
from sidecar.testing.fakeupstream import FakeUpstream
from sidecar.testing.upstreams import idle
from sidecar.upstream.latency import BUCKETS
from tests.helpers import dns_query, running

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

LINUX = sys.platform.startswith("linux") and os.path.exists("/proc/net/udp")
linux_only = pytest.mark.skipif(not LINUX, reason="the kernel counters are Linux's /proc/net")


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
        "dns_sidecar_cache_bytes": "gauge",
        "dns_sidecar_cache_memory_limit_bytes": "gauge",
        "dns_sidecar_dns_ratelimited": "counter",
        "dns_sidecar_resolver_shed": "counter",
        "dns_sidecar_api_refused": "counter",
        "dns_sidecar_prewarm_inflight": "gauge",
        "dns_sidecar_prewarm_omitted": "counter",
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
    assert labels["dns_sidecar_api_refused"] == {"reason"}


async def test_hardening_counters(up: FakeUpstream) -> None:
    """Cache bytes and bound (--cache-memory), rate-limit drops and shed fetches are the
    counters of the units that keep them, as they are at scrape time."""
    async with running(up, cache_memory=64) as sc:
        await dns_query(sc, "www.example.test")
        sc.handler.ratelimited += 7  # the counter the rate limit keeps (no slow traffic here)
        sc.resolver.shed += 3
        got = samples((await scrape(sc))[1])
        assert value(got, "dns_sidecar_cache_bytes") == sc.cache.bytes
        assert value(got, "dns_sidecar_cache_memory_limit_bytes") == 64 * 1024 * 1024
        assert value(got, "dns_sidecar_dns_ratelimited_total") == 7
        assert value(got, "dns_sidecar_resolver_shed_total") == 3


async def test_snapshot_metrics(up: FakeUpstream, tmp_path: Path) -> None:
    """With --cache-file: what was loaded, the last save's duration and size, the counts."""
    async with running(up, cache_file=str(tmp_path / "cache.snap")) as sc:
        got = samples((await scrape(sc))[1])
        assert value(got, "dns_sidecar_snapshot_entries_loaded") == 0
        assert value(got, "dns_sidecar_snapshot_saves_total") == 0
        assert not any(n.startswith("dns_sidecar_snapshot_size") for n, _ in got)
        await dns_query(sc, "www.example.test")
        assert sc.snapshot is not None
        result = await sc.snapshot.save()
        got = samples((await scrape(sc))[1])
        assert value(got, "dns_sidecar_snapshot_saves_total") == 1
        assert value(got, "dns_sidecar_snapshot_save_errors_total") == 0
        assert value(got, "dns_sidecar_snapshot_size_bytes") == result.bytes > 0
        assert value(got, "dns_sidecar_snapshot_save_duration_seconds") >= 0
    async with running(up, cache_file=str(tmp_path / "cache.snap")) as sc:
        got = samples((await scrape(sc))[1])
        assert value(got, "dns_sidecar_snapshot_entries_loaded") == len(sc.cache) >= 1
    async with running(up) as sc:  # no --cache-file: no snapshot metrics
        got = samples((await scrape(sc))[1])
        assert not any(n.startswith("dns_sidecar_snapshot") for n, _ in got)


async def test_metrics_follow_upstream_failures(up: FakeUpstream, sc: Sidecar) -> None:
    up.drop = True
    for i in range(3):  # three timeouts quarantine the only server
        reply = await dns_query(sc, f"h{i}.example.test")
        assert reply.rcode() == dns.rcode.SERVFAIL
    # The SERVFAIL leaves at the pool's deadline; the try itself may time out a moment later.
    await asyncio.wait_for(idle(sc.pools.default.upstreams[0]), 5)
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


# ------------------------------------------------------------------ kernel UDP drops

# As Linux 6.x writes them (inodes and drop counts edited in).
PROC_NET_UDP = """\
   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
   79: 0100007F:62D4 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1026258 2 0000000094a9559e 17
   99: 0100007F:62E8 00000000:0000 07 00000000:00017900 00:00000000 00000000  1000        0 1089644 2 00000000a07e0cfc 0
"""
PROC_NET_UDP6 = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
14397: 00000000000000000000000001000000:9AC2 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1529680 2 000000009d918326 5
"""
PROC_NET_SNMP = """\
Ip: Forwarding DefaultTTL InReceives
Ip: 1 64 123
Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors IgnoredMulti MemErrors
Udp: 99376295 13055 37126 99427989 37125 0 1 0 0
UdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors IgnoredMulti MemErrors
UdpLite: 0 0 9 0 9 0 0 0 0
"""
PROC_NET_SNMP6 = """\
Ip6InReceives                   \t1200
Udp6InDatagrams                 \t72
Udp6InErrors                    \t4
Udp6RcvbufErrors                \t3
UdpLite6RcvbufErrors            \t9
"""


def test_parse_socket_drops() -> None:
    assert kernel.parse_socket_drops(PROC_NET_UDP, {"1026258", "1529680"}) == {1026258: 17}
    assert kernel.parse_socket_drops(PROC_NET_UDP6, {"1529680"}) == {1529680: 5}
    assert kernel.parse_socket_drops(PROC_NET_UDP, {"0", "1000", "2"}) == {}  # not inodes
    assert kernel.parse_socket_drops(PROC_NET_UDP.splitlines()[0], {"1026258"}) == {}


def test_parse_snmp() -> None:
    udp = kernel.parse_snmp(PROC_NET_SNMP)
    assert (udp["RcvbufErrors"], udp["InErrors"], udp["InCsumErrors"]) == (37125, 37126, 1)
    assert kernel.parse_snmp(PROC_NET_SNMP, "UdpLite")["RcvbufErrors"] == 9
    assert kernel.parse_snmp("Ip: Forwarding\nIp: 1\n") == {}
    assert kernel.parse_snmp6(PROC_NET_SNMP6) == {
        "Udp6InDatagrams": 72, "Udp6InErrors": 4, "Udp6RcvbufErrors": 3}


def test_kernel_readers_on_a_proc_tree(tmp_path: Path) -> None:
    """The readers sum IPv4 and IPv6, and say None (or empty) when the files are missing."""
    assert kernel.read_socket_drops([1026258], str(tmp_path)) is None
    assert kernel.udp_namespace_counters(str(tmp_path)) == {}
    assert kernel.host_rcvbuf_errors(str(tmp_path)) is None

    (tmp_path / "udp").write_text(PROC_NET_UDP)
    (tmp_path / "snmp").write_text(PROC_NET_SNMP)
    assert kernel.read_socket_drops([1026258, 1529680], str(tmp_path)) == {1026258: 17}
    assert kernel.host_rcvbuf_errors(str(tmp_path)) == 37125

    (tmp_path / "udp6").write_text(PROC_NET_UDP6)
    (tmp_path / "snmp6").write_text(PROC_NET_SNMP6)
    assert kernel.read_socket_drops([1026258, 1529680, 7], str(tmp_path)) == {
        1026258: 17, 1529680: 5}
    assert kernel.host_rcvbuf_errors(str(tmp_path)) == 37125 + 3
    counters = kernel.udp_namespace_counters(str(tmp_path))
    assert (counters["InErrors"], counters["Udp6InErrors"]) == (37126, 4)

    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.close()
    assert kernel.socket_inode(closed) is None
    assert kernel.udp_socket_drops([closed], str(tmp_path)) == 0


@linux_only
def test_kernel_counts_real_drops() -> None:
    """A socket with a tiny receive buffer that nobody reads: the kernel drops datagrams
    and the reader finds them by the socket's inode."""
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # the kernel's minimum
        rx.bind(("127.0.0.1", 0))
        assert kernel.udp_socket_drops([rx]) == 0
        for _ in range(50):
            tx.sendto(b"x" * 1000, rx.getsockname())
        drops = kernel.udp_socket_drops([rx])
        assert drops is not None and 0 < drops < 50
        assert kernel.read_socket_drops([kernel.socket_inode(rx)]) == {
            kernel.socket_inode(rx): drops}
    finally:
        rx.close()
        tx.close()


async def test_udp_kernel_metrics(sc: Sidecar) -> None:
    await dns_query(sc, "www.example.test")
    _, families = await scrape(sc)
    by_name = {f.name: f for f in families}
    got = samples(families)
    assert by_name["dns_sidecar_udp_receive_buffer_bytes"].type == "gauge"
    assert value(got, "dns_sidecar_udp_receive_buffer_bytes") == sc.udp_rcvbuf > 0
    if not LINUX:
        assert "dns_sidecar_udp_kernel_drops" not in by_name
        return
    assert by_name["dns_sidecar_udp_kernel_drops"].type == "counter"
    assert value(got, "dns_sidecar_udp_kernel_drops_total") >= 0
    # The sidecar's own sockets are found in the kernel's table (matched by inode).
    inodes = [kernel.socket_inode(u.transport.get_extra_info("socket")) for u in sc.udp]
    assert None not in inodes
    assert set(kernel.read_socket_drops(inodes) or {}) == set(inodes)
