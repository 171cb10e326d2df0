"""The health and stats HTTP API (``--http``, default ``127.0.0.1:8053``).

Endpoints (JSON unless said otherwise; the OpenAPI document at ``/openapi.json`` is the full
reference, see :mod:`sidecar.ops.openapi`)::

    GET    /healthz              200 {"status": "ok"} while DNS is served, else 503
    GET    /readyz               200 {"status": "ready"}; 503 with reasons per pool
    GET    /stats                counters and state (see sidecar.ops.stats.snapshot)
    GET    /metrics              Prometheus text exposition (sidecar.ops.metrics)
    GET    /cache?name=N&type=T  the cached entry for N/T (type defaults to A), or 404
    DELETE /cache[?name=N[&type=T]]  flush everything, one name (every type), or one entry
    POST   /prewarm              {"names": [...], "types": ["A", "AAAA"]}: resolve into the cache
    POST   /snapshot             write the cache snapshot (--cache-file) now
    GET    /openapi.json         the OpenAPI 3.1 document of this API

The API only reads the sidecar's state, on the sidecar's own event loop; the DNS hot path
never waits for it. Pre-warm batches run on the DNS side (:mod:`sidecar.miss.prewarm`,
which owns their bounds and counters); entries are shown by :mod:`sidecar.ops.present`.

Mutating calls (DELETE, POST) are guarded against browsers, which can be made to send
requests here by any web page (a cross-origin ``text/plain`` or form POST needs no CORS
preflight; DNS rebinding makes a page at ``evil.example`` same-origin with this API):

* a body must be ``application/json`` (415 otherwise); ``POST /prewarm`` must carry one, a
  ``DELETE`` carries none (its parameters are in the query string) and so needs no type;
* without ``--api-token``, the ``Host`` header must name this listener: ``localhost``, a
  loopback IP, or the IP the connection arrived on, any port (421 otherwise). A rebinding
  page sends its own host name, never one of those. With ``--api-token`` set, the bearer
  token (compared in constant time) is required instead and any ``Host`` is accepted: a
  browser attack cannot supply the token, and proxies or service names keep working.

Pre-warm work is bounded per call (:data:`MAX_PREWARM_NAMES`, :data:`MAX_PREWARM_LOOKUPS`)
and across the calls in progress (:data:`PREWARM_BACKLOG` lookups admitted, 429 with
``Retry-After`` past it; :data:`PREWARM_CONCURRENCY` resolving at once; results held within
:data:`PREWARM_RESPONSE_BUDGET` bytes, the rest left out and counted in ``omitted``).

Every error is JSON ``{"error": "..."}`` naming the field at fault, with status 400, 401, 404,
405, 413, 415, 421 or 429 (500 only for a bug, which is logged).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from sidecar.config import HostPort, is_loopback
from sidecar.dns.cache import Entry
from sidecar.dns.types import TYPE_NUMBERS
from sidecar.dns.wire import make_key
from sidecar.errors import StartupError, WireError
from sidecar.miss.prewarm import (  # noqa: F401 (the limits, re-exported for the docs)
    PREWARM_BACKLOG,
    PREWARM_CONCURRENCY,
    PREWARM_RESPONSE_BUDGET,
    Pacer,
)
from sidecar.ops.metrics import CONTENT_TYPE_LATEST, make_registry, render
from sidecar.ops.openapi import openapi_document
from sidecar.ops.present import entry_json, entry_records, rcode_name, result_size
from sidecar.ops.stats import not_ready_reasons, snapshot

if TYPE_CHECKING:
    from sidecar.server import DnsServer as Sidecar

log = logging.getLogger("sidecar.api")

#: Largest request body accepted, in bytes (larger: 413).
MAX_BODY = 1024 * 1024
#: Most names one ``POST /prewarm`` may carry (more: 400 naming ``names``).
MAX_PREWARM_NAMES = 10_000
#: Most lookups (distinct name and type pairs) one call may ask for (more: 400 naming
#: ``names``): the names bound alone would let eleven types multiply a call's work.
MAX_PREWARM_LOOKUPS = 20_000
#: Seconds a refused (429) pre-warm call is told to wait, in ``Retry-After``.
PREWARM_RETRY_AFTER = 1
#: Types pre-warmed when the request names none.
DEFAULT_PREWARM_TYPES = ("A", "AAAA")
#: Seconds a stopping API waits for requests in progress before cancelling them.
SHUTDOWN_TIMEOUT = 1.0
#: Results serialised between two yields to the event loop.
YIELD_EVERY = 200

_SUPPORTED_TYPES = ", ".join(sorted(TYPE_NUMBERS))
# A plain host name (no escapes): accepted without the full label check.
_PLAIN_NAME = re.compile(r"[a-z0-9_*-]{1,63}(?:\.[a-z0-9_*-]{1,63})*")
_JSON = "application/json"
#: Methods that change nothing: open to any Host, no body rules.
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    """An error answer: HTTP ``status`` and a message naming the field at fault."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def error_response(status: int, message: str,
                   headers: dict[str, str] | None = None) -> web.Response:
    """``{"error": message}`` with ``status``."""
    return web.json_response({"error": message}, status=status, headers=headers)


def exposure_warning(addr: HostPort, token: str | None) -> str | None:
    """The start-up warning for an API reachable from other hosts without a token, or None
    (loopback address, or a token is set)."""
    if token or is_loopback(addr.host):
        return None
    return (f"--http {addr} is not a loopback address and no --api-token is set: anyone who"
            " can reach it may flush the cache and trigger lookups (DELETE /cache,"
            " POST /prewarm); set --api-token or bind 127.0.0.1")


def host_of(value: str) -> str | None:
    """The host of a ``Host`` header value (``name``, ``IP``, ``[IPv6]``, each with an
    optional ``:PORT``; a bare IPv6 address is read as one), lower-cased, without brackets
    or port; None when the value cannot be read that way."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        host, rest = value[1:end], value[end + 1 :]
    elif value.count(":") > 1:
        host, rest = value, ""
    else:
        host, sep, port = value.partition(":")
        rest = sep + port
    if rest and not (rest[0] == ":" and rest[1:].isascii() and
                     (rest[1:] == "" or rest[1:].isdigit())):
        return None
    return host or None


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(text.partition("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # a dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d
    return ip


def host_names_listener(host: str | None, local_address: str | None) -> bool:
    """Whether a request's host (from :func:`host_of`) names this API: ``localhost``, a
    loopback IP, or ``local_address``, the IP the connection arrived on (the bound address,
    or with a wildcard bind the address the client used, e.g. the pod IP). The port is not
    compared (port forwarding changes it). A host name other than ``localhost`` never
    matches: it is what a DNS-rebinding page sends."""
    if host is None:
        return False
    if host == "localhost":
        return True
    ip = _ip(host)
    if ip is None or ip.is_unspecified:
        return False
    if ip.is_loopback:
        return True
    return local_address is not None and ip == _ip(local_address)


def is_json_type(value: str | None) -> bool:
    """``Content-Type`` is ``application/json`` (parameters such as charset allowed)."""
    return value is not None and value.partition(";")[0].strip().lower() == _JSON


# ------------------------------------------------------------------ parsing and decoding


def parse_name(raw: object, field: str) -> str:
    """A query name from the request: lower-cased, without trailing dot, validated.

    Raises :class:`ApiError` (400, naming ``field``) for a non-string, an empty name, a name
    with spaces, control or non-ASCII characters (IDNA names must be sent as punycode), an
    empty or over-long label, or a name over 255 octets.
    """
    if not isinstance(raw, str):
        raise ApiError(400, f"{field}: expected a string, got {type(raw).__name__}")
    name = raw.strip().lower()
    if name.endswith("."):
        name = name[:-1]
    if not name:
        raise ApiError(400, f"{field}: empty name")
    if name.endswith("."):
        raise ApiError(400, f"{field}: {raw!r} is not a valid DNS name (empty label)")
    if _PLAIN_NAME.fullmatch(name) and len(name) <= 253:
        return name
    if any(c <= " " or c > "~" for c in name):
        raise ApiError(400, f"{field}: {raw!r} is not a valid DNS name (spaces, control or"
                       " non-ASCII characters; send IDNA names as punycode)")
    try:
        make_key(name, 1)
    except WireError as exc:
        raise ApiError(400, f"{field}: {raw!r} is not a valid DNS name ({exc})") from None
    return name


def parse_type(raw: object, field: str) -> str:
    """A query type name (``A``, ``aaaa``, ...) among those the sidecar forwards; raises
    :class:`ApiError` (400, naming ``field``) otherwise."""
    if not isinstance(raw, str):
        raise ApiError(400, f"{field}: expected a string, got {type(raw).__name__}")
    qtype = raw.strip().upper()
    if qtype not in TYPE_NUMBERS:
        raise ApiError(400, f"{field}: unknown or unsupported type {raw!r} (one of"
                       f" {_SUPPORTED_TYPES})")
    return qtype


# ------------------------------------------------------------------ the server


class ApiServer:
    """The aiohttp application serving the API for one DNS side
    (:class:`~sidecar.server.DnsServer`).

    ``refused`` counts mutating calls refused, by reason: ``host`` (421), ``content_type``
    (415), ``token`` (401), ``busy`` (429). The pre-warm counters and bounds are the DNS
    side's (:attr:`prewarmer`).
    """

    def __init__(self, sidecar: Sidecar) -> None:
        self.sidecar = sidecar
        self.prewarmer = sidecar.prewarm
        token = sidecar.config.api_token
        self._token_digest = hashlib.sha256(token.encode()).digest() if token else None
        self.max_names = MAX_PREWARM_NAMES
        self.max_lookups = MAX_PREWARM_LOOKUPS
        self.refused = {"host": 0, "content_type": 0, "token": 0, "busy": 0}
        self.registry = make_registry(sidecar, self.refused)
        self.app = self._make_app()
        self._runner: web.AppRunner | None = None
        self.address: HostPort | None = None

    def _make_app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY,
                              middlewares=[self._errors, self._guard])
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/stats", self.stats)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/cache", self.cache_get)
        app.router.add_delete("/cache", self.cache_delete)
        app.router.add_post("/prewarm", self.prewarm)
        app.router.add_post("/snapshot", self.snapshot)
        app.router.add_get("/openapi.json", self.openapi)
        return app

    async def start(self, addr: HostPort) -> HostPort:
        """Listen on ``addr`` (port 0: any free port); return the bound address.

        Raises :class:`StartupError` with a one-line reason when it cannot listen.
        """
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False,
                               shutdown_timeout=SHUTDOWN_TIMEOUT)
        await runner.setup()
        site = web.TCPSite(runner, addr.host, addr.port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            reason = exc.strerror or str(exc)
            raise StartupError(f"--http {addr}: cannot listen: {reason}") from None
        self._runner = runner
        sockname = runner.addresses[0]
        self.address = HostPort(addr.host, int(sockname[1]))
        warning = exposure_warning(addr, self.sidecar.config.api_token)
        if warning:
            log.warning("%s", warning)
        return self.address

    async def stop(self) -> None:
        """Stop listening; requests still running after :data:`SHUTDOWN_TIMEOUT` s are
        cancelled."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    # -------------------------------------------------------------- plumbing

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Turn every error into ``{"error": ...}`` JSON (never an HTML page or a crash)."""
        try:
            return await handler(request)
        except ApiError as exc:
            return error_response(exc.status, exc.message, exc.headers)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            headers = {}
            if exc.status == 405:
                headers["Allow"] = exc.headers.get("Allow", "")
                message = f"method {request.method} not allowed on {request.path}"
            elif exc.status == 404:
                message = f"no such endpoint: {request.path}"
            elif exc.status == 413:
                message = f"body: larger than {MAX_BODY} bytes"
            else:
                message = exc.reason
            return error_response(exc.status, message, headers)
        except Exception:
            log.exception("API %s %s failed", request.method, request.path_qs)
            return error_response(500, "internal error (logged by the sidecar)")

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """The browser guards of every mutating route (see the module docstring), before
        its handler reads anything: the token, or without one the ``Host``; then the body's
        type. Unknown paths and methods fall through to their 404/405."""
        if request.method not in _SAFE_METHODS and request.match_info.http_exception is None:
            if self._token_digest is not None:
                self._authorize(request)
            else:
                self._check_host(request)
            self._check_content_type(request)
        return await handler(request)

    def _authorize(self, request: web.Request) -> None:
        """Raise 401 unless the request carries the configured bearer token (or none is
        configured). Both sides are hashed first so the comparison's time does not depend on
        the token's length or content."""
        if self._token_digest is None:
            return
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.strip().partition(" ")
        digest = hashlib.sha256(given.strip().encode("utf-8", "surrogateescape")).digest()
        ok = hmac.compare_digest(digest, self._token_digest)
        if not ok or scheme.lower() != "bearer":
            self.refused["token"] += 1
            raise ApiError(401, "Authorization: a valid 'Bearer TOKEN' is required for"
                           f" {request.method} {request.path}",
                           {"WWW-Authenticate": 'Bearer realm="dns-sidecar"'})

    def _check_host(self, request: web.Request) -> None:
        """421 unless ``Host`` names this listener (:func:`host_names_listener`)."""
        value = request.headers.get("Host")
        transport = request.transport
        sockname = transport.get_extra_info("sockname") if transport is not None else None
        local = sockname[0] if isinstance(sockname, tuple) and sockname else None
        if host_names_listener(host_of(value) if value is not None else None, local):
            return
        self.refused["host"] += 1
        shown = "missing" if value is None else repr(value[:100])
        raise ApiError(421, f"Host: {shown} does not name this API; {request.method}"
                       f" {request.path} accepts localhost, a loopback address or the"
                       " listener's own address (or any Host with --api-token set)")

    def _check_content_type(self, request: web.Request) -> None:
        """415 unless a body is ``application/json``. A POST must carry one; a DELETE
        without a body needs no type (curl -X DELETE sends none, and browsers cannot send
        a DELETE cross-origin without a preflight, which is never granted)."""
        if not (request.body_exists or request.method == "POST"):
            return
        value = request.headers.get("Content-Type")
        if is_json_type(value):
            return
        self.refused["content_type"] += 1
        shown = "missing" if value is None else repr(value[:100])
        raise ApiError(415, f"Content-Type: {shown}; {request.method} {request.path} accepts"
                       f" only {_JSON} bodies", {"Accept": _JSON})

    # -------------------------------------------------------------- health

    async def healthz(self, request: web.Request) -> web.Response:
        """Liveness: 200 ``{"status": "ok"}`` while the listeners serve DNS, else 503
        ``{"status": "not serving"}``."""
        if self.sidecar.serving:
            return web.json_response({"status": "ok"})
        return web.json_response({"status": "not serving"}, status=503)

    async def readyz(self, request: web.Request) -> web.Response:
        """Readiness: 200 ``{"status": "ready"}`` when every pool has a healthy upstream and
        the sidecar is not in lame duck; else 503 with ``reasons`` by pool label."""
        reasons = not_ready_reasons(self.sidecar)
        if not reasons:
            return web.json_response({"status": "ready"})
        return web.json_response(
            {"status": "not ready", "reasons": reasons,
             "lameduck": self.sidecar.lameduck},
            status=503)

    # -------------------------------------------------------------- stats and metrics

    async def stats(self, request: web.Request) -> web.Response:
        """The ``/stats`` document (:func:`sidecar.ops.stats.snapshot`) plus a ``prewarm`` object."""
        return web.json_response(snapshot(self.sidecar, self.stats_extra()))

    def stats_extra(self) -> dict[str, Any]:
        """The API's own part of ``/stats``: ``prewarm`` and ``api``."""
        return {
            "prewarm": self.prewarmer.stats(),
            "api": {"refused": dict(self.refused)},
        }

    async def metrics(self, request: web.Request) -> web.Response:
        """Prometheus text exposition of the sidecar's private registry."""
        body = render(self.registry)
        resp = web.Response(body=body)
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    async def openapi(self, request: web.Request) -> web.Response:
        """The OpenAPI document of this API."""
        return web.json_response(openapi_document(**self.limits()))

    def limits(self) -> dict[str, int]:
        """The limits this server enforces, as :func:`sidecar.ops.openapi.openapi_document`
        takes them."""
        return {"max_names": self.max_names, "max_lookups": self.max_lookups,
                "concurrency": self.prewarmer.concurrency, "max_body": MAX_BODY,
                "backlog": self.prewarmer.backlog,
                "response_budget": self.prewarmer.response_budget,
                "retry_after": PREWARM_RETRY_AFTER}

    # -------------------------------------------------------------- cache

    @staticmethod
    def _query_name(request: web.Request) -> str | None:
        raw = request.query.get("name")
        return None if raw is None else parse_name(raw, "name")

    async def cache_get(self, request: web.Request) -> web.Response:
        """The cached entry for ``name``/``type`` (type defaults to A): rcode, remaining TTL
        (``ttl`` whole seconds, 0 once expired; ``expires_in`` seconds, negative once
        expired), ``stale``, the records, and every section; 404 when not cached."""
        name = self._query_name(request)
        if name is None:
            raise ApiError(400, "name: required query parameter")
        qtype = parse_type(request.query.get("type", "A"), "type")
        key = make_key(name, TYPE_NUMBERS[qtype])
        entry = self.sidecar.cache.get(key)
        if entry is None:
            raise ApiError(404, f"name: {name}/{qtype} is not in the cache")
        return web.json_response(entry_json(name, qtype, key, entry, self.sidecar.cache.clock()))

    async def cache_delete(self, request: web.Request) -> web.Response:
        """Flush: everything (no ``name``), every type of ``name``, or only ``name``/``type``.
        Answers ``{"deleted": n}`` (plus ``name``, ``type`` when given). A body is refused
        (400): ``{"name": ...}`` sent there would otherwise flush everything."""
        if request.body_exists and (await request.read()).strip():
            raise ApiError(400, "body: DELETE /cache takes no body; name and type are query"
                           " parameters")
        name = self._query_name(request)
        raw_type = request.query.get("type")
        cache = self.sidecar.cache
        if name is None:
            if raw_type is not None:
                raise ApiError(400, "type: only valid together with name")
            deleted = cache.clear()
            log.info("API: cache flushed (%d entries)", deleted)
            return web.json_response({"deleted": deleted})
        if raw_type is not None:
            qtype = parse_type(raw_type, "type")
            deleted = int(cache.delete(make_key(name, TYPE_NUMBERS[qtype])))
            log.info("API: cache entry %s/%s deleted", name, qtype)
            return web.json_response({"deleted": deleted, "name": name, "type": qtype})
        deleted = cache.delete_name(make_key(name, 1)[:-4])
        log.info("API: cache entries of %s deleted (%d)", name, deleted)
        return web.json_response({"deleted": deleted, "name": name})

    # -------------------------------------------------------------- snapshot

    async def snapshot(self, request: web.Request) -> web.Response:
        """Write the cache snapshot now (``--cache-file``): 200 with what was written, 404
        without a cache file, 503 when the save failed (the previous file is kept)."""
        store = self.sidecar.snapshot
        if store is None:
            raise ApiError(404, "snapshot: no --cache-file is configured")
        result = await store.save()
        if not result.ok:
            raise ApiError(503, f"snapshot: the save failed ({result.error}); the previous"
                           " file is kept")
        return web.json_response({"path": str(store.path), "entries": result.entries,
                                  "skipped": result.skipped, "bytes": result.bytes,
                                  "seconds": round(result.seconds, 6)})

    # -------------------------------------------------------------- pre-warm

    async def _read_json(self, request: web.Request) -> Any:
        raw = await request.read()  # 413 past client_max_size
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise ApiError(400, f"body: not valid JSON ({exc})") from None

    async def _parse_prewarm(self, body: Any) -> tuple[list[str], list[str]]:
        if not isinstance(body, dict):
            raise ApiError(400, "body: expected a JSON object with 'names' (and 'types')")
        unknown = sorted(set(body) - {"names", "types"})
        if unknown:
            raise ApiError(400, f"{unknown[0]}: unknown field (expected 'names', 'types')")
        if "names" not in body:
            raise ApiError(400, "names: required")
        raw_names = body["names"]
        if not isinstance(raw_names, list):
            raise ApiError(400, "names: expected a list of names")
        if len(raw_names) > self.max_names:
            raise ApiError(400, f"names: {len(raw_names)} names, at most {self.max_names}"
                           " per call")
        raw_types = body.get("types", list(DEFAULT_PREWARM_TYPES))
        if not isinstance(raw_types, list):
            raise ApiError(400, "types: expected a list of types")
        if not raw_types:
            raise ApiError(400, "types: must not be empty")
        types = list(dict.fromkeys(parse_type(t, f"types[{i}]") for i, t in enumerate(raw_types)))
        names: dict[str, None] = {}
        pacer = Pacer()
        for i, raw in enumerate(raw_names):
            names[parse_name(raw, f"names[{i}]")] = None
            if pacer.due():
                await pacer.pause()
        lookups = len(names) * len(types)
        if lookups > self.max_lookups:
            raise ApiError(400, f"names: {len(names)} names x {len(types)} types ="
                           f" {lookups} lookups, at most {self.max_lookups} per call")
        return list(names), types

    async def prewarm(self, request: web.Request) -> web.Response:
        """Resolve every name for every type into the cache; answer per (name, type) with
        rcode, records and remaining TTL, in request order (duplicates once), plus
        ``elapsed_ms`` and ``omitted`` (results left out for the response budget).

        The batch runs on the DNS side (:class:`sidecar.miss.prewarm.Prewarmer`, its
        bounds and counters); here the request is validated and the results are serialised
        in slices, so the event loop (and so DNS) stays responsive however large the batch.
        """
        t0 = time.perf_counter()
        names, types = await self._parse_prewarm(await self._read_json(request))
        jobs = [(name, qtype) for name in names for qtype in types]
        pw = self.prewarmer
        if not pw.admit(len(jobs)):
            self.refused["busy"] += 1
            raise ApiError(429, f"names: {len(jobs)} lookups would pass the pre-warm backlog"
                           f" ({pw.inflight} of {pw.backlog} in progress); retry later",
                           {"Retry-After": str(PREWARM_RETRY_AFTER)})
        qtypes = [TYPE_NUMBERS[qtype] for _name, qtype in jobs]
        keys = [make_key(name, qt) for (name, _qtype), qt in zip(jobs, qtypes, strict=True)]
        no_aaaa_ttl = self.sidecar.config.max_negative_ttl
        now = self.sidecar.cache.clock

        def result(i: int, entry: Entry | None) -> dict[str, Any]:
            name, qtype = jobs[i]
            if entry is None:  # --no-aaaa's local NODATA
                return {"name": name, "type": qtype, "rcode": "NOERROR", "ttl": no_aaaa_ttl,
                        "records": []}
            try:
                records = entry_records(keys[i], entry, qtypes[i])
            except Exception:  # an entry that cannot be parsed: report the rcode, no records
                log.exception("cannot decode the cache entry of %s/%s", name, qtype)
                records = []
            return {"name": name, "type": qtype, "rcode": rcode_name(entry.rcode),
                    "ttl": entry.ttl_at(now()), "records": records}

        results: list[dict[str, Any] | None] | None = None
        held = 0
        try:
            results, held = await pw.run(keys, qtypes, result, result_size)
            kept = [r for r in results if r is not None]
            omitted = len(results) - len(kept)
            elapsed_ms = round((time.perf_counter() - t0) * 1000.0, 3)
            parts = []
            for i in range(0, len(kept), YIELD_EVERY):
                parts.append(json.dumps(kept[i : i + YIELD_EVERY])[1:-1])
                await asyncio.sleep(0)
            text = (f'{{"elapsed_ms": {json.dumps(elapsed_ms)}, "omitted": {omitted},'
                    f' "results": [{", ".join(parts)}]}}')
        finally:
            pw.finish(len(jobs), results, held)
        return web.Response(text=text, content_type=_JSON)
