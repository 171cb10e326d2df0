"""Read-only views of a running sidecar's counters, shared by ``/stats`` and ``/metrics``.

Nothing here writes to the sidecar or keeps state of its own: every function reads the plain
integer counters the DNS path maintains (listeners, handler, cache, coalescer, resolver,
upstreams) at the moment it is called. Each call is synchronous and runs on the event loop
that owns those counters, so a snapshot is consistent (no DNS work interleaves with it).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

from sidecar.dns.wire import RCODE_NAMES
from sidecar.ops import udpdrops as kernel

if TYPE_CHECKING:
    from sidecar.dns.cache import Cache
    from sidecar.dns.handler import QueryHandler
    from sidecar.dns.listeners import TcpListener, UdpListener
    from sidecar.fleet.client import SharedCache
    from sidecar.miss.fetch import Resolver
    from sidecar.miss.prewarm import Prewarmer
    from sidecar.persist.store import SnapshotStore
    from sidecar.upstream.nameserver import Upstream
    from sidecar.upstream.pool import PoolSet


class StatsSource(Protocol):
    """What ``/stats``, ``/readyz`` and ``/metrics`` read of the DNS side: its units and
    its state, never how it is built (:class:`sidecar.server.DnsServer` satisfies it)."""

    cache: Cache
    handler: QueryHandler
    resolver: Resolver
    pools: PoolSet
    prewarm: Prewarmer
    snapshot: SnapshotStore | None
    shared: SharedCache | None
    udp: list[UdpListener]
    tcp: list[TcpListener]
    udp_rcvbuf: int
    serving: bool
    lameduck: bool

    @property
    def ready(self) -> bool: ...

    @property
    def uptime(self) -> float: ...

    @property
    def udp_path(self) -> str: ...

#: Upstream outcomes that are failures, reported under ``errors`` in ``/stats``.
ERROR_KINDS = ("timeout", "servfail", "refused", "unreachable", "error")

#: Key of process-wide reasons (lame duck, not serving) in the ``/readyz`` 503 ``reasons``;
#: the other keys are pool labels.
SIDECAR_REASON_KEY = "sidecar"

#: RCODEs reported as ``queries.<name>`` in ``/stats`` (replies sent with that RCODE).
STATS_RCODES = ("noerror", "formerr", "servfail", "nxdomain", "notimp", "refused")


def transport_counts(sidecar: StatsSource) -> dict[str, int]:
    """DNS messages received per transport: ``{"udp": n, "tcp": n}`` (datagrams, and
    length-prefixed messages over all TCP connections)."""
    return {"udp": sum(u.received for u in sidecar.udp),
            "tcp": sum(t.received for t in sidecar.tcp)}


def rcode_counts(sidecar: StatsSource) -> dict[str, int]:
    """Replies sent per RCODE name (``"NOERROR"``, ``"NXDOMAIN"``, ...).

    Every RCODE with a name is listed, even at 0 (so dashboards see the series from the
    start); numbered RCODEs without a name appear as their number once they are non-zero.
    """
    counts = sidecar.handler.rcodes
    out = {name: counts[code] for code, name in sorted(RCODE_NAMES.items())}
    out.update((str(code), n) for code, n in enumerate(counts) if n and code not in RCODE_NAMES)
    return out


def hit_ratio(hits: int, misses: int) -> float:
    """``hits / (hits + misses)``, 0.0 before any lookup."""
    total = hits + misses
    return hits / total if total else 0.0


def iter_upstreams(sidecar: StatsSource) -> Iterator[tuple[str, Upstream]]:
    """``(pool label, upstream)`` for every upstream of every pool, default pool first."""
    for pool in sidecar.pools.pools:
        for upstream in pool.upstreams:
            yield pool.label, upstream


def pool_stats(sidecar: StatsSource) -> list[dict[str, Any]]:
    """``/stats`` ``pools``: per pool (default first) its label, number of upstreams, how
    many are healthy, and the queries none of them answered."""
    return [{"pool": p.label, "upstreams": len(p.upstreams), "healthy": p.healthy_count(),
             "failures": p.failures} for p in sidecar.pools.pools]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


def upstream_stats(pool: str, upstream: Upstream) -> dict[str, Any]:
    """One element of ``/stats`` ``upstreams``: identity, state, counters, latency (ms).

    ``latency_ms`` values are None until the upstream has answered once; ``p50``/``p99``
    describe its most recent answers, ``ewma`` also counts timeouts as slow answers.
    """
    outcomes = upstream.outcomes
    health = upstream.health
    latency = upstream.latency
    return {
        "pool": pool,
        "address": upstream.address,
        "state": health.state,
        "queries": upstream.queries,
        "inflight": upstream.inflight,
        "errors": {kind: outcomes[kind] for kind in ERROR_KINDS},
        "outcomes": dict(outcomes),
        "latency_ms": {
            "ewma": _ms(latency.ewma),
            "p50": _ms(latency.percentile(0.5)),
            "p99": _ms(latency.percentile(0.99)),
        },
        "consecutive_failures": health.consecutive_failures,
        "quarantines": health.quarantines,
        "last_error": health.last_error or None,
        "probes": upstream.probes,
    }


def tcp_stats(sidecar: StatsSource) -> dict[str, int]:
    """``/stats`` ``tcp``, summed over the TCP listeners: connections open now, and since
    start accepted, rejected (connection bounds, all and per client), closed for idleness,
    and errors; of the guards: ``denied`` (outside ``--allow``, closed at accept),
    ``client_rejected`` (per-client bound), ``slow_closed`` (a query frame not completed
    within the idle timeout), ``overflow_closed`` and ``drain_closed`` (a client that does
    not read its replies: too many bytes unsent, or not drained in time)."""
    tcps = sidecar.tcp
    return {
        "connections": sum(len(t.connections) for t in tcps),
        "accepted": sum(t.accepted for t in tcps),
        "rejected": sum(t.rejected for t in tcps),
        "idle_closed": sum(t.idle_closed for t in tcps),
        "errors": sum(t.errors for t in tcps),
        "denied": sum(t.denied for t in tcps),
        "client_rejected": sum(t.client_rejected for t in tcps),
        "slow_closed": sum(t.slow_closed for t in tcps),
        "overflow_closed": sum(t.overflow_closed for t in tcps),
        "drain_closed": sum(t.drain_closed for t in tcps),
    }


def udp_stats(sidecar: StatsSource) -> dict[str, Any]:
    """``/stats`` ``udp``: socket errors (summed over the UDP listeners); ``kernel_drops``,
    datagrams the kernel dropped on those sockets; ``rcvbuf``, the receive buffer the kernel
    granted each socket (bytes); ``host_rcvbuf_errors``, datagrams dropped for a full receive
    buffer on any UDP socket of the network namespace since boot. The kernel counts are None
    where the kernel does not tell (not Linux). ``path``: ``compiled`` or ``python``, the UDP
    path that serves the hits (docs/fastpath.md)."""
    return {
        "errors": sum(u.errors for u in sidecar.udp),
        "kernel_drops": kernel.udp_socket_drops(u.transport.get_extra_info("socket")
                                                for u in sidecar.udp if u.transport is not None),
        "rcvbuf": sidecar.udp_rcvbuf,
        "host_rcvbuf_errors": kernel.host_rcvbuf_errors(),
        "path": sidecar.udp_path,
    }


def not_ready_reasons(sidecar: StatsSource) -> dict[str, str]:
    """Why the sidecar is not ready, keyed by pool label (``"."`` is the default pool);
    process-wide reasons (lame duck, not serving) are under the key ``"sidecar"``.
    Empty when it is ready."""
    reasons: dict[str, str] = {}
    if not sidecar.serving:
        reasons[SIDECAR_REASON_KEY] = "not serving DNS"
    elif sidecar.lameduck:
        reasons[SIDECAR_REASON_KEY] = "lame duck"
    for pool in sidecar.pools.pools:
        if not pool.upstreams:
            reasons[pool.label] = "no upstream configured"
        elif not pool.healthy_count():
            reasons[pool.label] = "no healthy upstream: " + ", ".join(
                f"{u.address} {u.health.state}"
                + (f" ({u.health.last_error})" if u.health.last_error else "")
                for u in pool.upstreams)
    return reasons


def snapshot(sidecar: StatsSource, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``/stats`` document (see the contract): counters since start, times in seconds
    unless the key says ``_ms``. ``extra`` is merged in at the top level."""
    cache = sidecar.cache
    handler = sidecar.handler
    resolver = sidecar.resolver
    transports = transport_counts(sidecar)
    rcodes = rcode_counts(sidecar)
    doc: dict[str, Any] = {
        "uptime_s": round(sidecar.uptime, 3),
        "ready": sidecar.ready,
        "serving": sidecar.serving,
        "lameduck": sidecar.lameduck,
        "queries": {
            "total": transports["udp"] + transports["tcp"],
            **transports,
            **{name: rcodes[name.upper()] for name in STATS_RCODES},
            "dropped": handler.dropped,
            "truncated": handler.truncated,
            "denied": handler.denied,
            "ratelimited": handler.ratelimited,
        },
        "cache": {
            "entries": len(cache.entries),
            "capacity": cache.capacity,
            "bytes": cache.bytes,
            "memory_limit": cache.memory_limit,
            "hits": cache.hits,
            "misses": cache.misses,
            "hit_ratio": round(hit_ratio(cache.hits, cache.misses), 6),
            "evictions": cache.evictions,
            "coalesced": resolver.coalescer.coalesced,
            "stale_served": cache.stale_served,
            "prefetched": cache.prefetched,
            "inserts": cache.inserts,
            "too_large": cache.too_large,
        },
        "upstreams": [upstream_stats(pool, u) for pool, u in iter_upstreams(sidecar)],
        "pools": pool_stats(sidecar),
        "resolver": {
            "inflight": resolver.inflight,
            "waiting": resolver.waiting,
            "shed": resolver.shed,
            "shed_full": resolver.shed_full,
            "shed_wait": resolver.shed_wait,
            "shed_zone": resolver.shed_zone,
            "shed_client": sidecar.handler.client_shed,
            "jostled": resolver.jostled,
            "waiting_peak": resolver.waiting_peak,
            "failed": resolver.failed,
            "max_inflight": resolver.max_inflight,
        },
        "tcp": tcp_stats(sidecar),
        "udp": udp_stats(sidecar),
        "udp_rcvbuf": sidecar.udp_rcvbuf,
    }
    if sidecar.snapshot is not None:
        doc["snapshot"] = sidecar.snapshot.stats()
    if sidecar.shared is not None:
        doc["shared_cache"] = sidecar.shared.stats()
    if extra:
        doc.update(extra)
    return doc
