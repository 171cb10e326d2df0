"""Prometheus exposition of the sidecar's counters (``GET /metrics``).

:class:`SidecarCollector` is a custom collector: it reads the plain integer counters of the
DNS path (see :mod:`sidecar.ops.stats`) when Prometheus scrapes, so the hot path never touches a
prometheus-client object. Each sidecar gets its own :class:`~prometheus_client.CollectorRegistry`
(never the global one), so several sidecars in one process (tests) do not collide.

Names follow CoreDNS's where there is a match (``coredns_cache_hits_total`` ->
``dns_sidecar_cache_hits_total``, ``coredns_forward_request_duration_seconds`` ->
``dns_sidecar_upstream_request_duration_seconds``). Counters end in ``_total``, durations are
histograms in seconds. Labels: ``proto`` (udp, tcp), ``rcode`` (NOERROR, NXDOMAIN, ...),
``pool`` (zone suffix, ``.`` for the default pool), ``server`` (upstream ``IP:PORT``),
``outcome`` (ok, nxdomain, nodata, servfail, refused, timeout, unreachable, error).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from sidecar.ops import stats
from sidecar.upstream.latency import BUCKETS

if TYPE_CHECKING:
    from sidecar.ops.stats import StatsSource

PREFIX = "dns_sidecar_"

__all__ = ["CONTENT_TYPE_LATEST", "PREFIX", "SidecarCollector", "make_registry", "render"]


def _version() -> str:
    from sidecar import __version__

    return str(__version__)


def _counter(name: str, doc: str, value: float | None = None,
             labels: tuple[str, ...] = ()) -> CounterMetricFamily:
    # prometheus-client appends the _total suffix itself.
    return CounterMetricFamily(PREFIX + name, doc, value=value, labels=labels or None)


def _gauge(name: str, doc: str, value: float | None = None,
           labels: tuple[str, ...] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, doc, value=value, labels=labels or None)


def histogram_buckets(per_bucket: list[int], count: int) -> list[tuple[str, float]]:
    """Cumulative ``(le, count)`` pairs from per-bucket counts over :data:`BUCKETS` (the
    last per-bucket count is the overflow past the largest bound); ``+Inf`` is ``count``."""
    out: list[tuple[str, float]] = []
    running = 0
    for bound, n in zip(BUCKETS, per_bucket, strict=False):
        running += n
        out.append((floatToGoString(bound), float(running)))
    out.append(("+Inf", float(max(count, running))))
    return out


class SidecarCollector:
    """Reads a :class:`~sidecar.ops.stats.StatsSource` (the DNS side) at scrape time.
    ``refused`` (optional) is the API's count of refused mutating calls, by reason."""

    def __init__(self, sidecar: StatsSource, refused: Mapping[str, int] | None = None) -> None:
        self.sidecar = sidecar
        self.refused = refused

    def describe(self) -> list[Metric]:
        """Nothing up front: the label sets depend on the configuration (collect decides)."""
        return []

    def collect(self) -> Iterator[Metric]:
        """Build every family from the counters as they are now."""
        sc = self.sidecar
        cache = sc.cache
        handler = sc.handler
        resolver = sc.resolver
        tcp = stats.tcp_stats(sc)
        udp = stats.udp_stats(sc)

        m = _counter("dns_requests", "DNS messages received, by transport.", labels=("proto",))
        for proto, n in stats.transport_counts(sc).items():
            m.add_metric([proto], n)
        yield m
        m = _counter("dns_responses", "DNS replies sent, by RCODE.", labels=("rcode",))
        for rcode, n in stats.rcode_counts(sc).items():
            m.add_metric([rcode], n)
        yield m
        yield _counter("dns_dropped", "DNS messages not answered (unreadable header or QR=1).",
                       handler.dropped)
        yield _counter("dns_truncated", "UDP replies sent truncated (TC=1).", handler.truncated)
        yield _counter("dns_denied", "Queries refused by the client ACL.", handler.denied)
        yield _counter("dns_ratelimited", "Queries dropped unanswered by the per-client rate"
                       " limit (--rate-limit).", handler.ratelimited)
        m = _counter("listener_errors", "Errors on the DNS sockets, by transport.",
                     labels=("proto",))
        m.add_metric(["udp"], udp["errors"] or 0)
        m.add_metric(["tcp"], tcp["errors"] or 0)
        yield m

        yield _counter("cache_hits", "Queries answered from a fresh cache entry.", cache.hits)
        yield _counter("cache_misses", "Queries that needed an upstream fetch.", cache.misses)
        yield _gauge("cache_entries", "Entries in the cache (fresh and expired).",
                     len(cache.entries))
        yield _gauge("cache_capacity", "Largest number of cache entries (--cache-size).",
                     cache.capacity)
        yield _gauge("cache_bytes", "Bytes held by the cached answers.", cache.bytes)
        yield _gauge("cache_memory_limit_bytes", "Bound on the bytes of the cached answers"
                     " (--cache-memory).", cache.memory_limit)
        yield _counter("cache_evictions", "Entries evicted to stay within the capacity.",
                       cache.evictions)
        yield _counter("cache_inserts", "Entries stored or replaced.", cache.inserts)
        yield _counter("cache_coalesced", "Misses that joined an upstream fetch in flight.",
                       resolver.coalescer.coalesced)
        yield _counter("cache_stale_served", "Answers served from expired entries (RFC 8767).",
                       cache.stale_served)
        yield _counter("cache_prefetch", "Background refreshes of popular entries started.",
                       cache.prefetched)

        yield _gauge("resolver_inflight", "Upstream fetches in flight (distinct questions).",
                     resolver.inflight)
        yield _gauge("resolver_waiting", "Fetches waiting for an upstream concurrency slot.",
                     resolver.waiting)
        yield _counter("resolver_shed", "Fetches answered SERVFAIL without an upstream query"
                       " (waiting queue full, no slot in time, or a slow domain at its limit).",
                       resolver.shed)
        yield _counter("resolver_failures", "Fetches that ended in SERVFAIL (or stale).",
                       resolver.failed)

        yield from self._upstreams()

        yield _gauge("tcp_connections", "Open DNS-over-TCP connections.", tcp["connections"])
        yield _counter("tcp_connections_accepted", "DNS-over-TCP connections accepted.",
                       tcp["accepted"])
        yield _counter("tcp_connections_rejected", "DNS-over-TCP connections refused at the"
                       " connection bound.", tcp["rejected"])
        yield _counter("tcp_idle_closed", "DNS-over-TCP connections closed for idleness.",
                       tcp["idle_closed"])

        if udp["kernel_drops"] is not None:  # only Linux tells
            yield _counter("udp_kernel_drops", "Datagrams the kernel dropped on the DNS UDP"
                           " sockets (receive buffer full).", udp["kernel_drops"])
        yield _gauge("udp_receive_buffer_bytes", "Receive buffer the kernel granted each DNS"
                     " UDP socket (SO_RCVBUF, bytes).", udp["rcvbuf"])

        pw = sc.prewarm
        m = _counter("prewarm_lookups", "Pre-warm lookups (name and type), by where the"
                     " answer came from.", labels=("source",))
        m.add_metric(["cache"], pw.cached)
        m.add_metric(["resolver"], pw.resolved)
        yield m
        yield _counter("prewarm_requests", "POST /prewarm calls answered.", pw.calls)
        yield _gauge("prewarm_inflight", "Lookups of the POST /prewarm calls in progress.",
                     pw.inflight)
        yield _counter("prewarm_omitted", "Pre-warm results left out of their response"
                       " for the response budget.", pw.omitted)
        if self.refused is not None:
            m = _counter("api_refused", "Mutating API calls refused, by reason: host (421),"
                         " content_type (415), token (401), busy (429).", labels=("reason",))
            for reason, n in self.refused.items():
                m.add_metric([reason], n)
            yield m

        yield from self._snapshot()
        yield from self._shared()

        yield _gauge("ready", "1 when ready (every pool has a healthy upstream, not in lame"
                     " duck), else 0.", 1.0 if sc.ready else 0.0)
        yield _gauge("uptime_seconds", "Seconds since the sidecar started serving.", sc.uptime)
        info = _gauge("build_info", "Always 1; the version is in the label.", labels=("version",))
        info.add_metric([_version()], 1.0)
        yield info

    def _snapshot(self) -> Iterator[Metric]:
        store = self.sidecar.snapshot
        if store is None:
            return
        st = store.stats()
        yield _gauge("snapshot_entries_loaded", "Cache entries loaded from --cache-file at"
                     " start.", st["entries_loaded"])
        if st["snapshot_age"] is not None:
            yield _gauge("snapshot_age_seconds", "Age of the newest snapshot on disk"
                         " (written by this process or the one before).", st["snapshot_age"])
        if st["last_save_seconds"] is not None:
            yield _gauge("snapshot_save_duration_seconds", "Duration of the last successful"
                         " snapshot save.", st["last_save_seconds"])
            yield _gauge("snapshot_size_bytes", "Size of the last snapshot written.",
                         st["last_save_bytes"])
        yield _counter("snapshot_saves", "Snapshot saves that succeeded.", st["saves"])
        yield _counter("snapshot_save_errors", "Snapshot saves that failed (the previous file"
                       " is kept).", st["save_errors"])

    def _shared(self) -> Iterator[Metric]:
        shared = self.sidecar.shared
        if shared is None:
            return
        st = shared.stats()
        yield _counter("shared_cache_hits", "Shared-cache lookups answered.", st["hits"])
        yield _counter("shared_cache_misses", "Shared-cache lookups not answered.",
                       st["misses"])
        yield _counter("shared_cache_skipped", "Shared-cache lookups skipped (breaker open or"
                       " too many in flight).", st["skipped"] + st["busy"])
        yield _counter("shared_cache_writes", "Values written to the shared cache.",
                       st["writes"])
        yield _counter("shared_cache_write_drops", "Writes dropped (bound or breaker).",
                       st["write_drops"])
        m = _counter("shared_cache_errors", "Shared-cache errors, by kind.", labels=("kind",))
        for kind, n in st["errors"].items():
            m.add_metric([kind], n)
        yield m
        yield _gauge("shared_cache_up", "1 while the breaker is closed (the shared cache is"
                     " used), else 0.", 1.0 if st["state"] == "closed" else 0.0)
        yield _counter("shared_cache_breaker_opened", "Times the breaker opened.",
                       st["breaker_opened"])
        m = _counter("shared_cache_notices", "Fleet notices: sent by our writes, received,"
                     " used to wake a waiter, malformed.", labels=("kind",))
        for kind in ("sent", "received", "used", "bad"):
            m.add_metric([kind], st["notices"][kind])
        yield m
        yield _gauge("shared_cache_notices_up", "1 while the subscription to the fleet's notices"
                     " is up (else lease waiters poll).", int(st["notices"]["live"]))
        m = _counter("shared_cache_leases", "Fleet leases, by outcome.", labels=("outcome",))
        for outcome, n in st["leases"].items():
            m.add_metric([outcome], n)
        yield m
        rtt = shared.rtt
        yield HistogramMetricFamily(
            PREFIX + "shared_cache_request_duration_seconds",
            "Round-trip time of shared-cache commands.",
            buckets=histogram_buckets(list(rtt.buckets), rtt.count), sum_value=rtt.total)

    def _upstreams(self) -> Iterator[Metric]:
        labels = ("pool", "server")
        requests = _counter("upstream_requests", "Queries sent to an upstream, by outcome.",
                            labels=(*labels, "outcome"))
        duration = HistogramMetricFamily(
            PREFIX + "upstream_request_duration_seconds",
            "Time an upstream took to answer (answers only; timeouts are counted in"
            " upstream_requests_total{outcome=\"timeout\"}).", labels=labels)
        healthy = _gauge("upstream_healthy", "1 while the upstream is healthy, 0 while"
                         " quarantined.", labels=labels)
        inflight = _gauge("upstream_inflight", "Queries waiting on the upstream now.",
                          labels=labels)
        quarantines = _counter("upstream_quarantines", "Times the upstream was quarantined.",
                               labels=labels)
        probes = _counter("upstream_probes", "Health probes sent to the upstream.",
                          labels=labels)
        pool_healthy = _gauge("pool_healthy_upstreams", "Healthy upstreams of the pool.",
                              labels=("pool",))
        pool_failures = _counter("pool_failures", "Queries no upstream of the pool answered.",
                                 labels=("pool",))
        for pool, u in stats.iter_upstreams(self.sidecar):
            lv = [pool, u.address]
            for outcome, n in u.outcomes.items():
                requests.add_metric([*lv, outcome], n)
            lat = u.latency
            duration.add_metric(lv, histogram_buckets(lat.buckets, lat.count), lat.total)
            healthy.add_metric(lv, 1.0 if u.health.healthy else 0.0)
            inflight.add_metric(lv, u.inflight)
            quarantines.add_metric(lv, u.health.quarantines)
            probes.add_metric(lv, u.probes)
        for p in stats.pool_stats(self.sidecar):
            pool_healthy.add_metric([p["pool"]], p["healthy"])
            pool_failures.add_metric([p["pool"]], p["failures"])
        yield from (requests, duration, healthy, inflight, quarantines, probes, pool_healthy,
                    pool_failures)


def make_registry(sidecar: StatsSource, refused: Mapping[str, int] | None = None, *,
                  process: bool = True) -> CollectorRegistry:
    """A private registry holding a :class:`SidecarCollector` (and, with ``process``, the
    standard ``process_*`` metrics: CPU seconds, resident memory, open fds, start time)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SidecarCollector(sidecar, refused))
    if process:
        from prometheus_client import ProcessCollector

        ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The text exposition (format 0.0.4) of ``registry``; serve it as
    :data:`CONTENT_TYPE_LATEST`."""
    return generate_latest(registry)
