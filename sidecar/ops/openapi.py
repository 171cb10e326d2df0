"""The OpenAPI 3.1 document of the health and stats API (served at ``GET /openapi.json``).

Kept true by ``tests/test_api.py``, which validates real responses of every endpoint against
the schemas here and checks that the documented paths and methods are exactly the routes.
"""

from __future__ import annotations

from typing import Any

from sidecar.dns.types import TYPE_NUMBERS

OPENAPI_VERSION = "3.1.0"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(properties: dict[str, Any], required: list[str] | None = None,
         description: str | None = None, additional: bool = True) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties,
                              "required": list(properties) if required is None else required}
    if not additional:
        schema["additionalProperties"] = False
    if description:
        schema["description"] = description
    return schema


_INT = {"type": "integer", "minimum": 0}
_MS = {"type": ["number", "null"], "minimum": 0,
       "description": "milliseconds; null before the first answer"}

_TYPES = sorted(TYPE_NUMBERS)


def _schemas(max_names: int, max_lookups: int, response_budget: int) -> dict[str, Any]:
    return {
        "Error": _obj({"error": {"type": "string",
                                 "description": "what is wrong, naming the field at fault"}},
                      additional=False),
        "Health": _obj({"status": {"type": "string", "enum": ["ok", "not serving"]}}),
        "Ready": _obj({"status": {"const": "ready"}}),
        "NotReady": _obj({
            "status": {"const": "not ready"},
            "reasons": {"type": "object", "additionalProperties": {"type": "string"},
                        "description": "by pool label ('.' is the default pool, otherwise the zone"
                                       " suffix); process-wide reasons (lame duck, not serving)"
                                       " under 'sidecar'"},
            "lameduck": {"type": "boolean"},
        }),
        "Upstream": _obj({
            "pool": {"type": "string", "description": "pool label: '.' or the zone suffix"},
            "address": {"type": "string", "description": "IP:PORT or [IPv6]:PORT"},
            "state": {"type": "string", "enum": ["healthy", "quarantined"]},
            "queries": _INT,
            "inflight": _INT,
            "errors": _obj({k: _INT for k in ("timeout", "servfail", "refused", "unreachable")},
                           description="failed tries by kind ('error': anything else)"),
            "outcomes": {"type": "object", "additionalProperties": _INT,
                         "description": "every try by outcome: ok, nxdomain, nodata, servfail,"
                                        " refused, timeout, unreachable, error"},
            "latency_ms": _obj({"ewma": _MS, "p50": _MS, "p99": _MS}),
            "consecutive_failures": _INT,
            "quarantines": _INT,
            "last_error": {"type": ["string", "null"]},
            "probes": _INT,
        }, required=["pool", "address", "state", "queries", "errors", "latency_ms"]),
        "Stats": _obj({
            "uptime_s": {"type": "number", "minimum": 0, "description": "seconds"},
            "ready": {"type": "boolean"},
            "serving": {"type": "boolean"},
            "lameduck": {"type": "boolean"},
            "queries": _obj({
                "total": {**_INT, "description": "udp + tcp"},
                "udp": {**_INT, "description": "datagrams received"},
                "tcp": {**_INT, "description": "messages received over all connections"},
                **{k: {**_INT, "description": f"replies sent with RCODE {k.upper()}"}
                   for k in ("noerror", "formerr", "servfail", "nxdomain", "notimp", "refused")},
                "dropped": {**_INT, "description": "messages not answered (QR=1, unreadable)"},
                "truncated": {**_INT, "description": "UDP replies sent with TC=1"},
                "denied": {**_INT, "description": "queries refused by --allow"},
                "ratelimited": {**_INT, "description": "queries dropped by --rate-limit (no"
                                                       " reply)"},
            }, required=["total", "udp", "tcp", "refused", "formerr", "servfail", "nxdomain",
                         "ratelimited"]),
            "cache": _obj({
                "entries": _INT, "capacity": _INT,
                "bytes": {**_INT, "description": "bytes held by the cached answers"},
                "memory_limit": {**_INT, "description": "bound on bytes, from --cache-memory"},
                "hits": _INT, "misses": _INT,
                "hit_ratio": {"type": "number", "minimum": 0, "maximum": 1},
                "evictions": _INT, "coalesced": _INT, "stale_served": _INT, "prefetched": _INT,
                "inserts": _INT,
                "too_large": {**_INT, "description": "answers too large to store (over 1/1000"
                                                     " of --cache-memory): answered, not cached"},
            }, required=["entries", "capacity", "bytes", "memory_limit", "hits", "misses",
                         "hit_ratio", "evictions", "coalesced", "stale_served", "prefetched"]),
            "upstreams": {"type": "array", "items": _ref("Upstream")},
            "pools": {"type": "array", "items": _obj({
                "pool": {"type": "string"}, "upstreams": _INT, "healthy": _INT, "failures": _INT})},
            "resolver": _obj({
                "inflight": _INT, "waiting": _INT,
                "shed": {**_INT, "description": "fetches answered SERVFAIL without an upstream"
                                                " query (the next three together)"},
                "shed_full": {**_INT, "description": "... because the waiting queue was full"},
                "shed_wait": {**_INT, "description": "... because no slot freed up in time"},
                "shed_zone": {**_INT, "description": "... because their domain was slow and"
                                                     " at its limit"},
                "shed_client": {**_INT, "description": "queries answered SERVFAIL because"
                                                       " their client had too many misses"
                                                       " pending"},
                "jostled": {**_INT, "description": "fetches ended with SERVFAIL, every slot"
                                                   " taken, to give the oldest slow one's"
                                                   " slot to a new query"},
                "waiting_peak": _INT, "failed": _INT, "max_inflight": _INT}),
            "tcp": _obj({"connections": _INT, "accepted": _INT, "rejected": _INT,
                         "idle_closed": _INT, "errors": _INT, "denied": _INT,
                         "client_rejected": _INT, "slow_closed": _INT, "overflow_closed": _INT,
                         "drain_closed": _INT}),
            "udp": _obj({
                "errors": _INT,
                "kernel_drops": {"type": ["integer", "null"], "minimum": 0,
                                 "description": "datagrams the kernel dropped on the sidecar's"
                                                " UDP sockets (receive buffer full) since they"
                                                " were opened; null where the kernel does not"
                                                " tell (not Linux)"},
                "rcvbuf": {**_INT, "description": "receive buffer the kernel granted each UDP"
                                                  " socket, bytes"},
                "path": {"type": "string", "enum": ["compiled", "python"],
                         "description": "the UDP path serving cache hits: the compiled fast"
                                        " path or the pure-Python one"},
                "host_rcvbuf_errors": {"type": ["integer", "null"], "minimum": 0,
                                       "description": "datagrams dropped for a full receive"
                                                      " buffer on any UDP socket of the"
                                                      " network namespace (IPv4 + IPv6) since"
                                                      " boot; null where the kernel does not"
                                                      " tell"},
            }),
            "udp_rcvbuf": {**_INT, "description": "bytes granted by the kernel (as udp.rcvbuf)"},
            "prewarm": _obj({
                "calls": _INT, "cached": _INT, "resolved": _INT,
                "inflight": {**_INT, "description": "lookups of the calls in progress"},
                "omitted": {**_INT, "description": "results left out of responses for the"
                                                   " response budget"},
            }),
            "api": _obj({"refused": _obj(
                {"host": {**_INT, "description": "421: Host does not name the listener"},
                 "content_type": {**_INT, "description": "415: body not application/json"},
                 "token": {**_INT, "description": "401: missing or wrong bearer token"},
                 "busy": {**_INT, "description": "429: pre-warm backlog full"}},
                description="mutating calls refused, by reason")}),
        }, required=["uptime_s", "queries", "cache", "upstreams"]),
        "Record": _obj({
            "name": {"type": "string"},
            "type": {"type": "string"},
            "ttl": {**_INT, "description": "remaining seconds"},
            "data": {"type": "string", "description": "rdata in presentation form"},
        }),
        "CacheEntry": _obj({
            "name": {"type": "string", "description": "lower-case, no trailing dot"},
            "type": {"type": "string", "enum": _TYPES},
            "rcode": {"type": "string"},
            "ttl": {**_INT, "description": "whole seconds left, 0 once expired"},
            "expires_in": {"type": "number", "description": "seconds, negative once expired"},
            "age": {"type": "number", "minimum": 0, "description": "seconds since stored"},
            "stale": {"type": "boolean", "description": "expired but still held (serve-stale)"},
            "records": {"type": "array", "items": {"type": "string"},
                        "description": "answer rdata of the asked type (A/AAAA: the addresses at"
                                       " the end of the CNAME chain)"},
            "answer": {"type": "array", "items": _ref("Record")},
            "authority": {"type": "array", "items": _ref("Record")},
            "additional": {"type": "array", "items": _ref("Record")},
        }),
        "Deleted": _obj({
            "deleted": {**_INT, "description": "entries removed"},
            "name": {"type": "string"},
            "type": {"type": "string", "enum": _TYPES},
        }, required=["deleted"]),
        "PrewarmRequest": _obj({
            "names": {"type": "array", "items": {"type": "string"},
                      "maxItems": max_names,
                      "description": f"host names (a trailing dot is ignored); at most"
                                     f" {max_names}, and at most {max_lookups} distinct"
                                     " names times types"},
            "types": {"type": "array", "items": {"type": "string", "enum": _TYPES},
                      "minItems": 1, "default": ["A", "AAAA"],
                      "description": "case-insensitive"},
        }, required=["names"], additional=False),
        "PrewarmResult": _obj({
            "name": {"type": "string", "description": "as given, lower-cased, no trailing dot"},
            "type": {"type": "string", "enum": _TYPES},
            "rcode": {"type": "string", "description": "NOERROR, NXDOMAIN, SERVFAIL, ..."},
            "ttl": {**_INT, "description": "remaining seconds, 0 when none"},
            "records": {"type": "array", "items": {"type": "string"},
                        "description": "A/AAAA: the final addresses (CNAME chain followed);"
                                       " other types: rdata in presentation form"},
        }, additional=False),
        "PrewarmResponse": _obj({
            "elapsed_ms": {"type": "number", "minimum": 0},
            "omitted": {**_INT, "description": "results left out: the results of the calls"
                                               f" in progress may hold {response_budget}"
                                               " bytes together (large answers); look the"
                                               " missing names up over DNS"},
            "results": {"type": "array", "items": _ref("PrewarmResult"),
                        "description": "one per distinct (name, type), in request order,"
                                       " except those omitted"},
        }, additional=False),
        "SnapshotSaved": _obj({
            "path": {"type": "string", "description": "the --cache-file written"},
            "entries": {**_INT, "description": "entries written"},
            "skipped": {**_INT, "description": "entries left out (expired beyond the"
                                               " serve-stale window, SERVFAIL, too large)"},
            "bytes": {**_INT, "description": "file size"},
            "seconds": {"type": "number", "minimum": 0, "description": "time the save took"},
        }, additional=False),
    }


def _json(schema: str, description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": _ref(schema)}}}


def _err(description: str) -> dict[str, Any]:
    return _json("Error", description)


_NAME_PARAM = {"name": "name", "in": "query", "schema": {"type": "string"},
               "description": "DNS name, case-insensitive, trailing dot optional"}
_TYPE_PARAM = {"name": "type", "in": "query",
               "schema": {"type": "string", "enum": _TYPES + [t.lower() for t in _TYPES]}}
_AUTH_RESPONSES = {
    "401": _err("missing or wrong bearer token (only when --api-token is set)"),
    "421": _err("the Host header does not name this listener: localhost, a loopback address"
                " or the address the connection arrived on, any port (only without"
                " --api-token; a DNS-rebinding guard)"),
}


def _paths(concurrency: int, max_body: int, max_lookups: int, backlog: int,
           retry_after: int) -> dict[str, Any]:
    return {
        "/healthz": {"get": {
            "summary": "Liveness: the DNS listeners are serving",
            "responses": {"200": _json("Health", "serving DNS"),
                          "503": _json("Health", "not serving DNS (starting or stopping)")},
        }},
        "/readyz": {"get": {
            "summary": "Readiness: every pool has a healthy upstream, not in lame duck",
            "responses": {"200": _json("Ready", "ready"),
                          "503": _json("NotReady", "not ready, with a reason per pool")},
        }},
        "/stats": {"get": {
            "summary": "Counters and state since start",
            "responses": {"200": _json("Stats", "the counters")},
        }},
        "/metrics": {"get": {
            "summary": "Prometheus text exposition (names prefixed dns_sidecar_)",
            "responses": {"200": {"description": "text exposition format",
                                  "content": {"text/plain": {"schema": {"type": "string"}}}}},
        }},
        "/cache": {
            "get": {
                "summary": "One cached entry with its remaining TTL",
                "parameters": [{**_NAME_PARAM, "required": True},
                               {**_TYPE_PARAM, "description": "query type, default A"}],
                "responses": {"200": _json("CacheEntry", "the entry (fresh or stale)"),
                              "400": _err("bad name or type"),
                              "404": _err("not in the cache")},
            },
            "delete": {
                "summary": "Flush the cache, one name (every type), or one name and type",
                "security": [{"bearer": []}],
                "parameters": [_NAME_PARAM,
                               {**_TYPE_PARAM, "description": "only with name: one entry"}],
                "responses": {"200": _json("Deleted", "entries removed"),
                              "400": _err("bad name or type, or a body was sent"),
                              **_AUTH_RESPONSES,
                              "415": _err("a body that is not application/json")},
            },
        },
        "/prewarm": {"post": {
            "summary": "Resolve names into the cache and return their answers",
            "description": "Lookups are coalesced with live traffic and run at most"
                           f" {concurrency} at once over all calls; a fresh cache entry is"
                           " used as it is. The body must be application/json.",
            "security": [{"bearer": []}],
            "requestBody": {"required": True, "content": {
                "application/json": {"schema": _ref("PrewarmRequest")}}},
            "responses": {"200": _json("PrewarmResponse", "one result per name and type"),
                          "400": _err("bad body, name or type, too many names, or more than"
                                      f" {max_lookups} lookups"),
                          **_AUTH_RESPONSES,
                          "413": _err(f"body larger than {max_body} bytes"),
                          "415": _err("Content-Type is not application/json"),
                          "429": {**_err(f"the calls in progress hold {backlog} lookups"
                                         " together; retry after Retry-After seconds"),
                                  "headers": {"Retry-After": {
                                      "schema": {"type": "integer", "minimum": 1},
                                      "description": f"seconds ({retry_after})"}}}},
        }},
        "/snapshot": {"post": {
            "summary": "Write the cache snapshot (--cache-file) now",
            "description": "Atomically (temporary file, fsync, rename); answers run on"
                           " meanwhile. Use it before replacing the process (docs/snapshot.md)."
                           " The body is an empty JSON object: every POST carries"
                           " application/json (a browser guard).",
            "security": [{"bearer": []}],
            "requestBody": {"required": True, "content": {
                "application/json": {"schema": {"type": "object"}}}},
            "responses": {"200": _json("SnapshotSaved", "the snapshot was written"),
                          **_AUTH_RESPONSES,
                          "404": _err("no --cache-file is configured"),
                          "415": _err("Content-Type is not application/json"),
                          "503": _err("the save failed (the previous file is kept)")},
        }},
        "/openapi.json": {"get": {
            "summary": "This document",
            "responses": {"200": {"description": "OpenAPI 3.1 document",
                                  "content": {"application/json": {"schema": {"type": "object"}}}}},
        }},
    }


def openapi_document(*, max_names: int, max_lookups: int, concurrency: int, max_body: int,
                     backlog: int, response_budget: int, retry_after: int) -> dict[str, Any]:
    """The OpenAPI document, built fresh (callers may modify it). The limits are those the
    server enforces (:meth:`sidecar.ops.api.ApiServer.limits`), passed in so they are defined
    in one place."""
    from sidecar import __version__

    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "dns-sidecar API",
            "version": str(__version__),
            "description": "Health, stats, metrics, cache control and pre-warm of the DNS"
                           " sidecar. Every error is JSON {\"error\": ...}; 404 for an unknown"
                           " path and 405 for a wrong method are Error documents too.",
        },
        "paths": _paths(concurrency, max_body, max_lookups, backlog, retry_after),
        "components": {
            "schemas": _schemas(max_names, max_lookups, response_budget),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "--api-token; required only when"
                                                          " it is set"}},
        },
    }
