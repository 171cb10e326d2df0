"""Read-only views of a running sidecar's counters, shared by ``/stats`` and ``/metrics``.

Nothing here writes to the sidecar or keeps state of its own: every function reads the plain
integer counters the DNS path maintains (listeners, handler, cache, coalescer, resolver,
upstreams) at the moment it is called. Each call is synchronous and runs on the event loop
that owns those counters, so a snapshot is consistent (no DNS work interleaves with it).

Attribute reads go through ``getattr`` with a default wherever the core may plausibly rename
or drop a counter, so a missing counter reads as 0 instead of breaking the API.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .wire import RCODE_NAMES

#: Upstream outcomes that are failures, reported under ``errors`` in ``/stats``.
ERROR_KINDS = ("timeout", "servfail", "refused", "unreachable", "error")

#: Key of process-wide reasons (lame duck, not serving) in the ``/readyz`` 503 ``reasons``;
#: the other keys are pool labels.
SIDECAR_REASON_KEY = "sidecar"

#: RCODEs reported as ``queries.<name>`` in ``/stats`` (replies sent with that RCODE).
STATS_RCODES = ("noerror", "formerr", "servfail", "nxdomain", "notimp", "refused")


def num(obj: Any, attr: str) -> int:
    """An integer counter of ``obj`` (0 when the attribute does not exist)."""
    value = getattr(obj, attr, 0)
    return int(value) if isinstance(value, (int, float)) else 0


def transport_counts(sidecar: Any) -> dict[str, int]:
    """DNS messages received per transport: ``{"udp": n, "tcp": n}`` (datagrams, and
    length-prefixed messages over all TCP connections)."""
    return {
        "udp": sum(num(u, "received") for u in getattr(sidecar, "udp", ())),
        "tcp": sum(num(t, "received") for t in getattr(sidecar, "tcp", ())),
    }


def rcode_counts(sidecar: Any) -> dict[str, int]:
    """Replies sent per RCODE name (``"NOERROR"``, ``"NXDOMAIN"``, ...).

    Every RCODE with a name is listed, even at 0 (so dashboards see the series from the
    start); numbered RCODEs without a name appear as their number once they are non-zero.
    """
    counts = list(getattr(getattr(sidecar, "handler", None), "rcodes", ()) or ())
    out: dict[str, int] = {}
    for code, name in sorted(RCODE_NAMES.items()):
        out[name] = int(counts[code]) if code < len(counts) else 0
    for code, value in enumerate(counts):
        if code not in RCODE_NAMES and value:
            out[str(code)] = int(value)
    return out


def coalesced(sidecar: Any) -> int:
    """Queries that joined an upstream fetch already in flight for the same question.

    The coalescer counts them; ``Cache.coalesced`` is read too in case the core moves the
    count there (the larger of the two wins, so a mirrored count is not doubled).
    """
    coalescer = getattr(getattr(sidecar, "resolver", None), "coalescer", None)
    return max(num(coalescer, "coalesced"), num(getattr(sidecar, "cache", None), "coalesced"))


def hit_ratio(hits: int, misses: int) -> float:
    """``hits / (hits + misses)``, 0.0 before any lookup."""
    total = hits + misses
    return hits / total if total else 0.0


def iter_upstreams(sidecar: Any) -> Iterator[tuple[str, Any]]:
    """``(pool label, upstream)`` for every upstream of every pool, default pool first."""
    for pool in getattr(sidecar.pools, "pools", ()):
        label = getattr(pool, "label", None) or getattr(pool, "name", "") or "."
        for upstream in getattr(pool, "upstreams", ()):
            yield label, upstream


def upstream_healthy(upstream: Any) -> bool:
    """True unless the upstream is quarantined."""
    health = getattr(upstream, "health", None)
    healthy = getattr(health, "healthy", None)
    if healthy is None:
        return getattr(health, "state", "healthy") == "healthy"
    return bool(healthy)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


def upstream_stats(pool: str, upstream: Any) -> dict[str, Any]:
    """One element of ``/stats`` ``upstreams``: identity, state, counters, latency (ms).

    ``latency_ms`` values are None until the upstream has answered once; ``p50``/``p99``
    describe its most recent answers, ``ewma`` also counts timeouts as slow answers.
    """
    outcomes = dict(getattr(upstream, "outcomes", {}) or {})
    health = getattr(upstream, "health", None)
    latency = getattr(upstream, "latency", None)
    percentile = getattr(latency, "percentile", None)
    return {
        "pool": pool,
        "address": str(getattr(upstream, "address", "")),
        "state": str(getattr(health, "state", "healthy")),
        "queries": num(upstream, "queries"),
        "inflight": num(upstream, "inflight"),
        "errors": {kind: int(outcomes.get(kind, 0)) for kind in ERROR_KINDS},
        "outcomes": {kind: int(v) for kind, v in outcomes.items()},
        "latency_ms": {
            "ewma": _ms(getattr(latency, "ewma", None)),
            "p50": _ms(percentile(0.5)) if percentile else None,
            "p99": _ms(percentile(0.99)) if percentile else None,
        },
        "consecutive_failures": num(health, "consecutive_failures"),
        "quarantines": num(health, "quarantines"),
        "last_error": str(getattr(health, "last_error", "") or "") or None,
        "probes": num(upstream, "probes"),
    }


def not_ready_reasons(sidecar: Any) -> dict[str, str]:
    """Why the sidecar is not ready, keyed by pool label (``"."`` is the default pool);
    process-wide reasons (lame duck, not serving) are under the key ``"sidecar"``.
    Empty when it is ready."""
    reasons: dict[str, str] = {}
    if not getattr(sidecar, "serving", False):
        reasons[SIDECAR_REASON_KEY] = "not serving DNS"
    elif getattr(sidecar, "lameduck", False):
        reasons[SIDECAR_REASON_KEY] = "lame duck"
    for pool in getattr(sidecar.pools, "pools", ()):
        upstreams = list(getattr(pool, "upstreams", ()))
        if any(upstream_healthy(u) for u in upstreams):
            continue
        label = getattr(pool, "label", None) or "."
        if not upstreams:
            reasons[label] = "no upstream configured"
            continue
        parts = []
        for u in upstreams:
            health = getattr(u, "health", None)
            state = str(getattr(health, "state", "quarantined"))
            last = getattr(health, "last_error", "")
            parts.append(f"{u.address} {state}" + (f" ({last})" if last else ""))
        reasons[label] = "no healthy upstream: " + ", ".join(parts)
    if not reasons and not getattr(sidecar, "ready", True):
        reasons[SIDECAR_REASON_KEY] = "not ready"
    return reasons


def snapshot(sidecar: Any, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``/stats`` document (see the contract): counters since start, times in seconds
    unless the key says ``_ms``. ``extra`` is merged in at the top level."""
    cache = sidecar.cache
    handler = sidecar.handler
    resolver = sidecar.resolver
    transports = transport_counts(sidecar)
    rcodes = rcode_counts(sidecar)
    hits, misses = num(cache, "hits"), num(cache, "misses")
    queries: dict[str, int] = {
        "total": transports["udp"] + transports["tcp"],
        "udp": transports["udp"],
        "tcp": transports["tcp"],
    }
    for name in STATS_RCODES:
        queries[name] = rcodes.get(name.upper(), 0)
    queries["dropped"] = num(handler, "dropped")
    queries["truncated"] = num(handler, "truncated")
    queries["denied"] = num(handler, "denied")
    tcps = list(getattr(sidecar, "tcp", ()))
    doc: dict[str, Any] = {
        "uptime_s": round(float(getattr(sidecar, "uptime", 0.0)), 3),
        "ready": bool(getattr(sidecar, "ready", False)),
        "serving": bool(getattr(sidecar, "serving", False)),
        "lameduck": bool(getattr(sidecar, "lameduck", False)),
        "queries": queries,
        "cache": {
            "entries": len(cache.entries),
            "capacity": num(cache, "capacity"),
            "hits": hits,
            "misses": misses,
            "hit_ratio": round(hit_ratio(hits, misses), 6),
            "evictions": num(cache, "evictions"),
            "coalesced": coalesced(sidecar),
            "stale_served": num(cache, "stale_served"),
            "prefetched": num(cache, "prefetched"),
            "inserts": num(cache, "inserts"),
        },
        "upstreams": [upstream_stats(pool, u) for pool, u in iter_upstreams(sidecar)],
        "pools": [
            {
                "pool": getattr(p, "label", None) or ".",
                "upstreams": len(getattr(p, "upstreams", ())),
                "healthy": sum(1 for u in getattr(p, "upstreams", ()) if upstream_healthy(u)),
                "failures": num(p, "failures"),
            }
            for p in getattr(sidecar.pools, "pools", ())
        ],
        "resolver": {
            "inflight": num(resolver, "inflight"),
            "waiting": num(resolver, "waiting"),
            "shed": num(resolver, "shed"),
            "failed": num(resolver, "failed"),
            "max_inflight": num(resolver, "max_inflight"),
        },
        "tcp": {
            "connections": sum(len(getattr(t, "connections", ())) for t in tcps),
            "accepted": sum(num(t, "accepted") for t in tcps),
            "rejected": sum(num(t, "rejected") for t in tcps),
            "idle_closed": sum(num(t, "idle_closed") for t in tcps),
            "errors": sum(num(t, "errors") for t in tcps),
        },
        "udp": {"errors": sum(num(u, "errors") for u in getattr(sidecar, "udp", ()))},
        "udp_rcvbuf": num(sidecar, "udp_rcvbuf"),
    }
    if extra:
        doc.update(extra)
    return doc
