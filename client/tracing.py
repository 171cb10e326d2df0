"""Per-request phase timestamps from aiohttp client tracing, as curl-style durations.

Usage::

    session = aiohttp.ClientSession(connector=sidecar_connector(),
                                    trace_configs=[trace_config()])
    trace = Trace()
    async with session.get(url, trace_request_ctx=trace) as resp:
        body = await resp.read()          # stamps the end of the transfer
    print(trace.timings())                # Timings(queued=0.0, namelookup=0.0004, ...)

All timestamps are :func:`time.perf_counter` seconds; all durations are seconds.

What aiohttp's signals can and cannot tell (aiohttp 3.14):

* DNS runs inside ``connection_create``; there is no "DNS failed" signal, so a lookup that
  started and never ended is recognised by ``dns_start`` without ``dns_end``.
* With the connector's DNS cache on, a request that joins another request's in-flight
  lookup gets ``dns_cache_hit`` at once, before the lookup is done. Only a connector built
  by :func:`client.sidecar_connector` (which stamps the moment the TCP socket is created)
  can tell that wait apart from a slow TCP connect.
* There is no TCP-connected or TLS signal. :func:`client.sidecar_connector` stamps both
  (``tcp_start``/``tcp_end``), so TCP and TLS are measured separately; with another
  connector ``connect`` covers TCP and TLS together and ``tls`` is ``None`` for https.
* ``on_request_end`` fires when the response *headers* have been parsed (aiohttp's
  "first response bytes"); the body is read afterwards. ``resp.read()``/``text()``/
  ``json()`` fire ``on_response_chunk_received`` and so stamp the end; when streaming,
  call :meth:`Trace.finish` yourself. Errors while reading the body fire no signal.
"""

from __future__ import annotations

import warnings
from collections.abc import MutableMapping
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from time import perf_counter
from types import SimpleNamespace
from typing import Any

import aiohttp

__all__ = (
    "PHASES",
    "Timings",
    "TracingWarning",
    "Trace",
    "current_trace",
    "trace_config",
)

#: Phases of a request in time order (``classify`` reports one of these, or ``None``).
PHASES = ("queue", "dns", "connect", "tls", "request", "response", "transfer")

#: ``Trace.resolver`` when aiohttp's connector answered from its own DNS cache.
CONNECTOR_CACHE = "connector-cache"

_CURRENT: ContextVar[Trace | None] = ContextVar("dns_sidecar_client_trace", default=None)


class TracingWarning(UserWarning):
    """Timings were read from a trace that recorded nothing (no :func:`trace_config`)."""


def current_trace() -> Trace | None:
    """The :class:`Trace` of the request being set up in the current task, if any.

    Set by :func:`trace_config`'s ``on_request_start`` handler and cleared at the request's
    end; resolvers and the instrumented connector use it to annotate the trace. Tasks the
    request starts (aiohttp's DNS lookup task) inherit it.
    """
    return _CURRENT.get()


@dataclass(frozen=True, slots=True)
class Timings:
    """Durations of the phases of one request, in seconds.

    The phases are disjoint intervals of the last attempt (after a retry or redirect), so
    ``queued + namelookup + connect + (tls or 0) + starttransfer + transfer <= total``.
    A phase that did not happen (reused connection, IP literal, no body read) is 0.0.

    * ``queued``: waiting for a free connection slot (connector ``limit``/``limit_per_host``).
    * ``namelookup``: DNS resolution (from the resolve start to its end).
    * ``connect``: TCP connect; it includes the TLS handshake when ``tls`` is ``None``.
    * ``tls``: TLS handshake; 0.0 for http, ``None`` when https but not measurable.
    * ``starttransfer``: connection ready until the response headers were parsed
      (sending the request plus the server's time to first byte).
    * ``transfer``: response headers until the body was read (0.0 until it is read).
    * ``total``: request start until the end (or the last event seen).
    """

    queued: float
    namelookup: float
    connect: float
    tls: float | None
    starttransfer: float
    transfer: float
    total: float
    reused: bool = False

    def curl(self) -> dict[str, float]:
        """The same durations as curl's cumulative ``-w`` variables (seconds from start).

        ``time_namelookup``, ``time_connect``, ``time_appconnect`` (0.0 for http, like curl),
        ``time_pretransfer``, ``time_starttransfer`` and ``time_total``. Queueing time is
        counted in ``time_namelookup`` (it comes first), as curl counts everything before
        the name is resolved there.
        """
        namelookup = self.queued + self.namelookup
        connect = namelookup + self.connect
        tls = self.tls or 0.0
        pretransfer = connect + tls
        return {
            "time_namelookup": namelookup,
            "time_connect": connect,
            "time_appconnect": pretransfer if self.tls else 0.0,
            "time_pretransfer": pretransfer,
            "time_starttransfer": pretransfer + self.starttransfer,
            "time_total": self.total,
        }

    def as_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (for logging / JSON)."""
        return asdict(self)


_ATTEMPT_FIELDS = (
    "queued_start",
    "queued_end",
    "create_start",
    "dns_cache",
    "dns_cache_at",
    "dns_start",
    "dns_end",
    "tcp_start",
    "tcp_end",
    "create_end",
    "reused_at",
    "headers_sent",
    "response_at",
)


class Trace:
    """The timestamps of one request (``perf_counter`` seconds; ``None`` = not seen).

    Request-wide: ``start``, ``end``, ``method``, ``url``, ``status``, ``exception``,
    ``attempts`` (connection attempts: aiohttp retries an idempotent request once on a
    dead kept-alive connection), ``redirects``, ``resolver`` (name of the resolver that
    answered, when a resolver of this package did the lookup), ``dns_attempts``
    (``(resolver, outcome)`` pairs from :class:`client.FailoverResolver`) and ``events``
    (every ``(signal, timestamp)`` seen, in order).

    Per attempt (cleared when a retry or redirect starts a new one): ``queued_start``,
    ``queued_end``, ``create_start``, ``dns_cache`` (``"hit"``/``"miss"``),
    ``dns_cache_at``, ``dns_start``, ``dns_end``, ``tcp_start``, ``tcp_end``,
    ``create_end``, ``reused_at``, ``headers_sent``, ``response_at`` (headers parsed).

    Pass one instance per request as ``trace_request_ctx=``; a dict passed there gets the
    trace under the key ``"trace"`` instead.
    """

    __slots__ = (
        "method",
        "url",
        "start",
        "end",
        "status",
        "exception",
        "attempts",
        "redirects",
        "resolver",
        "dns_attempts",
        "instrumented",
        "events",
        "_open",
        *_ATTEMPT_FIELDS,
    )

    def __init__(self) -> None:
        self.method: str | None = None
        self.url: str | None = None
        self.start: float | None = None
        self.end: float | None = None
        self.status: int | None = None
        self.exception: BaseException | None = None
        self.attempts = 0
        self.redirects = 0
        self.resolver: str | None = None
        self.dns_attempts: list[tuple[str, str]] = []
        self.instrumented = False
        self.events: list[tuple[str, float]] = []
        self._open = False
        self._clear_attempt()

    # -- recording ------------------------------------------------------------------

    def _clear_attempt(self) -> None:
        self.queued_start: float | None = None
        self.queued_end: float | None = None
        self.create_start: float | None = None
        self.dns_cache: str | None = None
        self.dns_cache_at: float | None = None
        self.dns_start: float | None = None
        self.dns_end: float | None = None
        self.tcp_start: float | None = None
        self.tcp_end: float | None = None
        self.create_end: float | None = None
        self.reused_at: float | None = None
        self.headers_sent: float | None = None
        self.response_at: float | None = None

    def _event(self, name: str) -> float:
        now = perf_counter()
        self.events.append((name, now))
        return now

    def _begin_attempt(self) -> None:
        """Start a new connection attempt unless one is being set up already."""
        if not self._open:
            self._clear_attempt()
            self._open = True
            self.attempts += 1

    def _request_start(self, method: str, url: str) -> None:
        Trace.__init__(self)  # one Trace per request; reusing one starts it afresh
        self.method = method
        self.url = url
        self.start = self._event("request_start")

    def _mark_tcp_start(self) -> None:
        """Called by the instrumented connector when it creates the TCP socket."""
        if self._open and self.tcp_start is None:
            self.tcp_start = self._event("tcp_start")

    def _mark_tcp_end(self) -> None:
        """Called by the instrumented connector when TCP is connected (before TLS)."""
        if self._open:
            self.tcp_end = self._event("tcp_end")

    def finish(self, exception: BaseException | None = None) -> None:
        """Stamp the end of the request (idempotent), recording ``exception`` if given.

        Needed only when the body is not read with ``read()``/``text()``/``json()``
        or when reading it failed.
        """
        if exception is not None and self.exception is None:
            self.exception = exception
        if self.end is None:
            self.end = self._event("finish")

    # -- reading --------------------------------------------------------------------

    @property
    def is_https(self) -> bool:
        """True when the (last) URL is https/wss."""
        return self.url is not None and self.url.startswith(("https:", "wss:"))

    @property
    def reused(self) -> bool:
        """True when the last attempt reused a kept-alive connection."""
        return self.reused_at is not None

    @property
    def phase(self) -> str | None:
        """The phase the request reached last (one of :data:`PHASES`), ``"done"`` once
        the body was read without error, ``None`` before it started.

        For a failed request this is the phase it failed in: a lookup that started and
        never ended is ``"dns"``, a connection being created after DNS is ``"connect"``
        (``"tls"`` once TCP is up for https on an instrumented connector), headers sent
        but none received is ``"response"``, headers received is ``"transfer"``.
        """
        if self.start is None:
            return None
        if self.response_at is not None:
            if self.end is not None and self.exception is None:
                return "done"
            return "transfer"
        if self.headers_sent is not None:
            return "response"
        if self.create_end is not None or self.reused_at is not None:
            return "request"
        if self.create_start is not None:
            if self.dns_start is not None and self.dns_end is None:
                return "dns"
            if self.tcp_end is not None:
                return "tls" if self.is_https else "connect"
            if self.tcp_start is not None:
                return "connect"
            if self.instrumented and self.dns_cache == "hit" and self.dns_end is None:
                # joined another request's lookup that has not finished
                return "dns"
            return "connect"
        return "queue"

    def timings(self) -> Timings:
        """Phase durations of the last attempt, in seconds (see :class:`Timings`).

        For a failed or unfinished request the phase it stopped in lasts until the end
        (or the last event), so a lookup that timed out shows its wait in ``namelookup``.
        """
        if self.start is None:
            if self.end is not None:  # finished without a single signal
                warnings.warn(
                    "request timings read from a trace that recorded nothing: the session "
                    "has no client.trace_config() in its trace_configs, so every duration "
                    "is 0", TracingWarning, stacklevel=2)
            return Timings(0.0, 0.0, 0.0, None, 0.0, 0.0, 0.0)

        def span(a: float | None, b: float | None) -> float:
            return max(0.0, b - a) if a is not None and b is not None else 0.0

        end = self.end if self.end is not None else self.events[-1][1]
        phase = self.phase
        https = self.is_https

        def closing(stamp: float | None, *phases: str) -> float | None:
            return end if stamp is None and phase in phases else stamp

        queued = span(self.queued_start, closing(self.queued_end, "queue"))
        dns_s = self.dns_start if self.dns_start is not None else self.dns_cache_at
        dns_e = self.dns_end
        if dns_e is None and self.dns_cache == "hit":
            # a real hit connects at once; a joined lookup waits until the socket exists
            dns_e = self.tcp_start if self.tcp_start is not None else self.dns_cache_at
        dns_e = closing(dns_e, "dns")
        namelookup = span(dns_s, dns_e)
        conn_s = dns_e if dns_e is not None else self.create_start
        tls: float | None
        if self.reused_at is not None:
            connect, tls = 0.0, 0.0
        elif self.tcp_end is not None:
            if https:
                connect = span(conn_s, self.tcp_end)
                tls = span(self.tcp_end, closing(self.create_end, "tls"))
            else:  # transport set-up after the TCP connect belongs to connect
                connect = span(conn_s, closing(self.create_end, "connect"))
                tls = 0.0
        else:
            connect = span(conn_s, closing(self.create_end, "connect", "tls"))
            tls = None if https and phase not in ("dns", "queue") else 0.0
        ready = self.create_end if self.create_end is not None else self.reused_at
        starttransfer = span(ready, closing(self.response_at, "request", "response"))
        transfer = span(self.response_at, end)
        total = span(self.start, end)
        return Timings(
            queued=queued,
            namelookup=namelookup,
            connect=connect,
            tls=tls,
            starttransfer=starttransfer,
            transfer=transfer,
            total=total,
            reused=self.reused_at is not None,
        )

    def __repr__(self) -> str:
        return (
            f"<Trace {self.method} {self.url} phase={self.phase} status={self.status} "
            f"attempts={self.attempts} resolver={self.resolver}>"
        )


# -- the TraceConfig ----------------------------------------------------------------------


def _ctx_factory(trace_request_ctx: Any = None) -> SimpleNamespace:
    if isinstance(trace_request_ctx, Trace):
        trace = trace_request_ctx
    else:
        trace = Trace()
        if isinstance(trace_request_ctx, MutableMapping):
            trace_request_ctx["trace"] = trace
    return SimpleNamespace(trace_request_ctx=trace_request_ctx, trace=trace)


async def _on_request_start(session: Any, ctx: Any, params: Any) -> None:
    trace: Trace = ctx.trace
    trace._request_start(params.method, str(params.url))
    connector = getattr(session, "connector", None)
    trace.instrumented = bool(getattr(connector, "instrumented", False))
    _CURRENT.set(trace)


async def _on_queued_start(session: Any, ctx: Any, params: Any) -> None:
    trace: Trace = ctx.trace
    trace._begin_attempt()
    trace.queued_start = trace._event("connection_queued_start")


async def _on_queued_end(session: Any, ctx: Any, params: Any) -> None:
    ctx.trace.queued_end = ctx.trace._event("connection_queued_end")


async def _on_create_start(session: Any, ctx: Any, params: Any) -> None:
    trace: Trace = ctx.trace
    trace._begin_attempt()
    trace.create_start = trace._event("connection_create_start")
    _CURRENT.set(trace)


async def _on_create_end(session: Any, ctx: Any, params: Any) -> None:
    ctx.trace.create_end = ctx.trace._event("connection_create_end")


async def _on_reuseconn(session: Any, ctx: Any, params: Any) -> None:
    trace: Trace = ctx.trace
    trace._begin_attempt()
    trace.reused_at = trace._event("connection_reuseconn")


async def _on_dns_cache_hit(session: Any, ctx: Any, params: Any) -> None:
    trace: Trace = ctx.trace
    trace.dns_cache = "hit"
    trace.resolver = CONNECTOR_CACHE
    trace.dns_cache_at = trace._event("dns_cache_hit")


async def _on_dns_cache_miss(session: Any, ctx: Any, params: Any) -> None:
    trace: Trace = ctx.trace
    trace.dns_cache = "miss"
    trace.dns_cache_at = trace._event("dns_cache_miss")


async def _on_dns_start(session: Any, ctx: Any, params: Any) -> None:
    ctx.trace.dns_start = ctx.trace._event("dns_resolvehost_start")


async def _on_dns_end(session: Any, ctx: Any, params: Any) -> None:
    ctx.trace.dns_end = ctx.trace._event("dns_resolvehost_end")


async def _on_headers_sent(session: Any, ctx: Any, params: Any) -> None:
    trace: Trace = ctx.trace
    trace.url = str(params.url)
    trace.headers_sent = trace._event("request_headers_sent")
    trace._open = False


async def _on_redirect(session: Any, ctx: Any, params: Any) -> None:
    trace: Trace = ctx.trace
    trace._event("request_redirect")
    trace.redirects += 1
    trace.status = params.response.status
    trace._open = False


async def _on_request_end(session: Any, ctx: Any, params: Any) -> None:
    trace: Trace = ctx.trace
    trace.response_at = trace._event("request_end")
    trace.status = params.response.status
    trace.url = str(params.url)
    trace._open = False
    if trace.method == "HEAD":
        trace.end = trace.response_at
    _CURRENT.set(None)


async def _on_request_exception(session: Any, ctx: Any, params: Any) -> None:
    trace: Trace = ctx.trace
    trace._event("request_exception")
    trace._open = False
    trace.finish(params.exception)
    _CURRENT.set(None)


async def _on_response_chunk(session: Any, ctx: Any, params: Any) -> None:
    trace: Trace = ctx.trace
    now = trace._event("response_chunk")
    if trace.end is None or trace.end < now:
        trace.end = now


def trace_config() -> aiohttp.TraceConfig:
    """A :class:`aiohttp.TraceConfig` that records a :class:`Trace` for every request.

    Pass a :class:`Trace` as ``trace_request_ctx=`` to read it afterwards (or a dict, which
    receives it under ``"trace"``). Records: request start, connection queued start/end,
    connection create start/end or reuse, DNS cache hit/miss, resolve start/end, TCP
    socket created / connected (instrumented connectors only), headers sent, response
    headers received, body read, redirect, end or exception.
    """
    tc = aiohttp.TraceConfig(trace_config_ctx_factory=_ctx_factory)  # type: ignore[arg-type]
    tc.on_request_start.append(_on_request_start)
    tc.on_connection_queued_start.append(_on_queued_start)
    tc.on_connection_queued_end.append(_on_queued_end)
    tc.on_connection_create_start.append(_on_create_start)
    tc.on_connection_create_end.append(_on_create_end)
    tc.on_connection_reuseconn.append(_on_reuseconn)
    tc.on_dns_cache_hit.append(_on_dns_cache_hit)
    tc.on_dns_cache_miss.append(_on_dns_cache_miss)
    tc.on_dns_resolvehost_start.append(_on_dns_start)
    tc.on_dns_resolvehost_end.append(_on_dns_end)
    tc.on_request_headers_sent.append(_on_headers_sent)
    tc.on_request_redirect.append(_on_redirect)
    tc.on_request_end.append(_on_request_end)
    tc.on_request_exception.append(_on_request_exception)
    tc.on_response_chunk_received.append(_on_response_chunk)
    return tc
