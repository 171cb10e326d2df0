"""Classify a failed request by what failed and in which phase.

:func:`classify` combines the exception type (aiohttp 3.14's hierarchy, including
``ClientConnectorDNSError`` which aiohttp added in 3.10.10), the c-ares status code that
aiohttp chains under a resolver failure, and the request's :class:`~client.Trace`, which
decides where the type alone is ambiguous: aiohttp raises the same plain
:class:`TimeoutError` whichever phase the ``total`` timeout expired in, and the same
``ConnectionTimeoutError`` whether the ``connect`` timeout expired in the connection pool,
in DNS or in TCP connect.
"""

from __future__ import annotations

import asyncio
import errno as _errno
import socket
import ssl
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum

import aiohttp

from .errors import ResolverTimeout, ResolverUnavailable
from .tracing import Trace

try:  # aiodns is a hard dependency, but keep classification usable without it
    from aiodns.error import DNSError as _AiodnsError
except ImportError:  # pragma: no cover
    _AiodnsError = None  # type: ignore[assignment,misc]

try:
    import pycares.errno as _ares_errno

    _ARES_MESSAGES = {
        _ares_errno.strerror(code): code for code in _ares_errno.errorcode if code
    }
except ImportError:  # pragma: no cover
    _ARES_MESSAGES = {}

__all__ = (
    "DNS_CLASSES",
    "RETRYABLE_CLASSES",
    "RETRYABLE_STATUSES",
    "TIMEOUT_CLASSES",
    "ClassCounters",
    "Failure",
    "FailureClass",
    "classify",
    "classify_status",
)

# c-ares status codes (pycares.errno)
ARES_ENODATA = 1
ARES_ESERVFAIL = 3
ARES_ENOTFOUND = 4
ARES_EREFUSED = 6
ARES_ECONNREFUSED = 11
ARES_ETIMEOUT = 12


class FailureClass(StrEnum):
    """What failed. The string values are stable (logs, metrics labels)."""

    POOL_TIMEOUT = "pool_timeout"  #: timed out waiting for a free connection slot
    DNS_TIMEOUT = "dns_timeout"  #: no DNS answer in time (resolver or request timeout)
    DNS_NXDOMAIN = "dns_nxdomain"  #: the name does not exist
    DNS_NODATA = "dns_nodata"  #: the name exists but has no A/AAAA address
    DNS_ERROR = "dns_error"  #: SERVFAIL/REFUSED, resolver unreachable, all resolvers set aside
    CONNECT_TIMEOUT = "connect_timeout"  #: TCP connect (or TLS handshake, phase "tls") timed out
    CONNECT_REFUSED = "connect_refused"  #: the server's port refused the TCP connection
    CONNECT_ERROR = "connect_error"  #: other connect failure (unreachable network/host, ...)
    TLS_ERROR = "tls_error"  #: certificate or TLS handshake failure
    READ_TIMEOUT = "read_timeout"  #: no response (headers or body) in time
    SERVER_DISCONNECTED = "server_disconnected"  #: the server closed/reset mid-request
    PAYLOAD_ERROR = "payload_error"  #: malformed response body (bad encoding, ...)
    HTTP_ERROR = "http_error"  #: a 5xx status, or any status raised (raise_for_status)
    TOO_MANY_REDIRECTS = "too_many_redirects"
    INVALID_URL = "invalid_url"
    TIMEOUT = "timeout"  #: a timeout whose phase is unknown (no trace given)
    CANCELLED = "cancelled"
    OTHER = "other"


DNS_CLASSES = frozenset(
    {
        FailureClass.DNS_TIMEOUT,
        FailureClass.DNS_NXDOMAIN,
        FailureClass.DNS_NODATA,
        FailureClass.DNS_ERROR,
    }
)
TIMEOUT_CLASSES = frozenset(
    {
        FailureClass.POOL_TIMEOUT,
        FailureClass.DNS_TIMEOUT,
        FailureClass.CONNECT_TIMEOUT,
        FailureClass.READ_TIMEOUT,
        FailureClass.TIMEOUT,
    }
)


#: Classes worth retrying later (the same request may well succeed): timeouts, resolver
#: trouble (SERVFAIL, an unreachable resolver), refused or cut connections. Not retryable:
#: NXDOMAIN/NODATA (the name has no address), TLS errors, malformed bodies, redirect loops,
#: bad URLs, cancellation. ``http_error`` depends on the status (:data:`RETRYABLE_STATUSES`).
RETRYABLE_CLASSES = frozenset(
    {
        FailureClass.POOL_TIMEOUT,
        FailureClass.DNS_TIMEOUT,
        FailureClass.DNS_ERROR,
        FailureClass.CONNECT_TIMEOUT,
        FailureClass.CONNECT_REFUSED,
        FailureClass.CONNECT_ERROR,
        FailureClass.READ_TIMEOUT,
        FailureClass.SERVER_DISCONNECTED,
        FailureClass.TIMEOUT,
    }
)
#: HTTP statuses of ``http_error`` worth retrying (RFC 9110 transient ones, 429).
RETRYABLE_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


@dataclass(frozen=True, slots=True)
class Failure:
    """The result of :func:`classify`.

    * ``kind``: the :class:`FailureClass`.
    * ``phase``: where it failed, one of ``queue dns connect tls request response
      transfer`` (``None`` when unknown).
    * ``timer``: which timeout expired, for timeouts: ``"total"`` (``ClientTimeout.total``
      or an outer ``asyncio.timeout``), ``"connect"`` (``ClientTimeout.connect`` or
      ``sock_connect``; aiohttp does not say which), ``"sock_read"``, ``"resolver"`` (the
      resolver's own timeout: c-ares ETIMEOUT or the failover ``attempt_timeout``) or
      ``"os"`` (the kernel's connect timeout); ``None`` otherwise.
    * ``dns_code``: the c-ares status for DNS failures when known (4 NXDOMAIN, 1 NODATA,
      12 timeout, 11 resolver unreachable, 3 SERVFAIL, 6 REFUSED).
    * ``errno``: the OS error number for connect failures when known.
    * ``status``: the HTTP status for ``http_error`` / ``too_many_redirects``.
    * ``detail``: ``"ExceptionType: message"`` of the exception classified.
    """

    kind: FailureClass
    phase: str | None
    detail: str
    timer: str | None = None
    dns_code: int | None = None
    errno: int | None = None
    status: int | None = None

    @property
    def is_dns(self) -> bool:
        """True for the DNS classes (counted apart from the fetch failures)."""
        return self.kind in DNS_CLASSES

    @property
    def is_timeout(self) -> bool:
        """True for the timeout classes."""
        return self.kind in TIMEOUT_CLASSES

    @property
    def retryable(self) -> bool:
        """Whether retrying the request later may succeed (see :data:`RETRYABLE_CLASSES`)."""
        if self.kind is FailureClass.HTTP_ERROR:
            return self.status in RETRYABLE_STATUSES
        return self.kind in RETRYABLE_CLASSES

    def as_dict(self) -> dict[str, object]:
        """Plain JSON values: ``kind`` as its string, ``retryable`` and ``dns`` added."""
        return {
            "kind": self.kind.value,
            "phase": self.phase,
            "detail": self.detail,
            "timer": self.timer,
            "dns_code": self.dns_code,
            "errno": self.errno,
            "status": self.status,
            "retryable": self.retryable,
            "dns": self.is_dns,
        }

    def __str__(self) -> str:
        extra = f", {self.timer} timer" if self.timer else ""
        return f"{self.kind.value} ({self.phase or '?'}{extra}): {self.detail}"


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """exc, then its causes/contexts (cause preferred), without cycles."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen and len(seen) < 16:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ if cur.__cause__ is not None else cur.__context__


_GAI_KINDS = {
    socket.EAI_NONAME: (FailureClass.DNS_NXDOMAIN, ARES_ENOTFOUND),
    socket.EAI_AGAIN: (FailureClass.DNS_ERROR, None),
    socket.EAI_FAIL: (FailureClass.DNS_ERROR, ARES_ESERVFAIL),
}
if hasattr(socket, "EAI_NODATA"):
    _GAI_KINDS[socket.EAI_NODATA] = (FailureClass.DNS_NODATA, ARES_ENODATA)


def _dns_kind_of_code(code: int | None) -> FailureClass:
    if code == ARES_ENOTFOUND:
        return FailureClass.DNS_NXDOMAIN
    if code == ARES_ENODATA:
        return FailureClass.DNS_NODATA
    if code == ARES_ETIMEOUT:
        return FailureClass.DNS_TIMEOUT
    return FailureClass.DNS_ERROR


def _dns_info(exc: BaseException) -> tuple[FailureClass, int | None, str | None] | None:
    """(kind, c-ares code, timer) from a resolver error chain, or None if not found."""
    fallback: tuple[FailureClass, int | None, str | None] | None = None
    for e in _chain(exc):
        if _AiodnsError is not None and isinstance(e, _AiodnsError):
            code = e.args[0] if e.args and isinstance(e.args[0], int) else None
            kind = _dns_kind_of_code(code)
            return kind, code, "resolver" if kind is FailureClass.DNS_TIMEOUT else None
        if isinstance(e, ResolverTimeout):
            return FailureClass.DNS_TIMEOUT, ARES_ETIMEOUT, "resolver"
        if isinstance(e, ResolverUnavailable):
            if e.__cause__ is None:
                return FailureClass.DNS_ERROR, None, None
            continue
        if isinstance(e, socket.gaierror):
            kind, code = _GAI_KINDS.get(e.errno, (FailureClass.DNS_ERROR, None))  # type: ignore[arg-type]
            return kind, code, None
        if isinstance(e, OSError) and e.errno is None and len(e.args) >= 2 and fallback is None:
            msg = e.args[1]
            if msg in _ARES_MESSAGES:
                code = _ARES_MESSAGES[msg]
                kind = _dns_kind_of_code(code)
                fallback = (kind, code, "resolver" if kind is FailureClass.DNS_TIMEOUT else None)
            elif msg == "DNS lookup failed":  # aiohttp: an answer without usable addresses
                fallback = (FailureClass.DNS_NODATA, None, None)
    return fallback


_TIMEOUT_BY_PHASE = {
    "queue": FailureClass.POOL_TIMEOUT,
    "dns": FailureClass.DNS_TIMEOUT,
    "connect": FailureClass.CONNECT_TIMEOUT,
    "tls": FailureClass.CONNECT_TIMEOUT,
    "request": FailureClass.READ_TIMEOUT,
    "response": FailureClass.READ_TIMEOUT,
    "transfer": FailureClass.READ_TIMEOUT,
}


def classify(exc: BaseException, trace: Trace | None = None) -> Failure:
    """Classify the exception a request raised, using its trace to find the phase.

    ``exc`` is what ``session.request()`` (or reading the body) raised; ``trace`` is the
    request's :class:`~client.Trace` (from :func:`~client.trace_config`). Without a trace
    the class comes from the exception alone, and a plain ``TimeoutError`` is only
    ``timeout`` (phase unknown). The rules, first match wins:

    1. ``CancelledError`` -> ``cancelled``.
    2. A resolver failure (``ClientConnectorDNSError``, a resolver error raised directly,
       or any error while the trace shows a lookup that never ended): the c-ares code in
       the chain decides ``dns_nxdomain`` (4), ``dns_nodata`` (1), ``dns_timeout`` (12,
       or the failover deadline), otherwise ``dns_error`` (11 unreachable, 3 SERVFAIL,
       6 REFUSED, every resolver set aside, ...).
    3. Certificate/SSL errors -> ``tls_error``.
    4. ``SocketTimeoutError`` (``sock_read``) -> ``read_timeout``.
    5. ``ConnectionTimeoutError`` (``connect``/``sock_connect``) and plain ``TimeoutError``
       (``total``): the trace's phase decides: queue -> ``pool_timeout``, dns ->
       ``dns_timeout``, connect/tls -> ``connect_timeout``, later -> ``read_timeout``.
       (The seed's rule, a timeout after a DNS cache miss with no resolve end is a DNS
       timeout, is the dns case.)
    6. ``ClientConnectorError``: ``ECONNREFUSED`` -> ``connect_refused``, ``ETIMEDOUT`` ->
       ``connect_timeout``, otherwise ``connect_error`` (``tls_error`` when the trace shows
       TCP was already connected for https: the handshake was cut).
    7. ``ServerDisconnectedError``, a connection reset, or a body cut short ->
       ``server_disconnected``; other payload errors -> ``payload_error``.
    8. ``TooManyRedirects`` -> ``too_many_redirects``; ``ClientResponseError`` ->
       ``http_error`` (with ``status``); invalid/non-http URLs -> ``invalid_url``.
       (A 5xx response that was not raised is classified by :func:`classify_status`.)
    9. Anything else -> ``other``.
    """
    phase = trace.phase if trace is not None else None
    if phase == "done":
        phase = None
    detail = f"{type(exc).__name__}: {exc}"

    if isinstance(exc, asyncio.CancelledError):
        return Failure(FailureClass.CANCELLED, phase, detail)

    # 2. DNS
    if isinstance(exc, aiohttp.ClientConnectorDNSError) or not isinstance(
        exc, aiohttp.ClientError | TimeoutError
    ):
        info = _dns_info(exc)
        if info is not None or isinstance(exc, aiohttp.ClientConnectorDNSError):
            kind, code, timer = info or (FailureClass.DNS_ERROR, None, None)
            return Failure(kind, "dns", detail, timer=timer, dns_code=code)
    if phase == "dns" and not isinstance(exc, TimeoutError):
        # e.g. ConnectionRefusedError from a custom resolver: the trace says DNS
        kind, code, timer = _dns_info(exc) or (FailureClass.DNS_ERROR, None, None)
        return Failure(kind, "dns", detail, timer=timer, dns_code=code)

    # 3. TLS
    if isinstance(
        exc, aiohttp.ClientSSLError | aiohttp.ServerFingerprintMismatch | ssl.SSLError
    ) or (isinstance(exc, aiohttp.ClientOSError) and _has(exc, ssl.SSLError)):
        return Failure(FailureClass.TLS_ERROR, phase if phase not in (None, "dns") else "tls", detail)

    # 4./5. timeouts
    if isinstance(exc, aiohttp.SocketTimeoutError):
        return Failure(
            FailureClass.READ_TIMEOUT,
            phase if phase in ("request", "response", "transfer") else "response",
            detail,
            timer="sock_read",
        )
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        kind = _TIMEOUT_BY_PHASE.get(phase or "connect", FailureClass.CONNECT_TIMEOUT)
        return Failure(kind, phase or "connect", detail, timer="connect")
    if isinstance(exc, TimeoutError) and not isinstance(exc, aiohttp.ClientError):
        if phase is None:
            return Failure(FailureClass.TIMEOUT, None, detail, timer="total")
        return Failure(_TIMEOUT_BY_PHASE[phase], phase, detail, timer="total")

    # 6. connect
    if isinstance(exc, aiohttp.ClientConnectorError):
        os_err = exc.os_error
        num = getattr(os_err, "errno", None)
        if isinstance(os_err, ConnectionRefusedError) or num == _errno.ECONNREFUSED:
            return Failure(FailureClass.CONNECT_REFUSED, "connect", detail, errno=num)
        if isinstance(os_err, TimeoutError) or num == _errno.ETIMEDOUT:
            return Failure(FailureClass.CONNECT_TIMEOUT, phase if phase == "tls" else "connect",
                           detail, timer="os", errno=num)
        if phase == "tls":  # TCP was up: the handshake was reset or refused
            return Failure(FailureClass.TLS_ERROR, "tls", detail, errno=num)
        return Failure(FailureClass.CONNECT_ERROR, "connect", detail, errno=num)

    # 7. disconnects and bodies
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return Failure(
            FailureClass.SERVER_DISCONNECTED,
            phase if phase in ("request", "response", "transfer") else "response",
            detail,
        )
    if isinstance(exc, aiohttp.ClientPayloadError):
        cut_short = "not completed" in str(exc) or _has(exc, ConnectionError)
        kind = FailureClass.SERVER_DISCONNECTED if cut_short else FailureClass.PAYLOAD_ERROR
        return Failure(kind, "transfer", detail)
    if isinstance(exc, ConnectionError | aiohttp.ClientOSError):
        num = getattr(exc, "errno", None)
        if phase in ("connect", "tls"):
            if num == _errno.ECONNREFUSED:
                return Failure(FailureClass.CONNECT_REFUSED, phase, detail, errno=num)
            return Failure(FailureClass.CONNECT_ERROR, phase, detail, errno=num)
        return Failure(FailureClass.SERVER_DISCONNECTED, phase or "response", detail, errno=num)

    # 8. HTTP level
    if isinstance(exc, aiohttp.TooManyRedirects):
        return Failure(FailureClass.TOO_MANY_REDIRECTS, "response", detail, status=exc.status)
    if isinstance(exc, aiohttp.ClientResponseError):
        return Failure(FailureClass.HTTP_ERROR, "response", detail, status=exc.status)
    if isinstance(exc, aiohttp.InvalidURL | aiohttp.NonHttpUrlClientError):
        return Failure(FailureClass.INVALID_URL, None, detail)

    return Failure(FailureClass.OTHER, phase, detail)


def classify_status(status: int, reason: str | None = None) -> Failure | None:
    """``http_error`` for a 5xx status a request returned without raising, else None.

    4xx are answers about the resource and stay successes unless ``raise_for_status``
    raises them (then :func:`classify` gives ``http_error`` for them too).
    """
    if status >= 500:
        return Failure(FailureClass.HTTP_ERROR, "response", f"HTTP {status} {reason or ''}".rstrip(),
                       status=status)
    return None


def _has(exc: BaseException, kind: type[BaseException]) -> bool:
    return any(isinstance(e, kind) for e in _chain(exc))


class ClassCounters:
    """Counts of request outcomes per :class:`FailureClass`, plus ``ok``.

    ``add(failure)`` after each request (``None`` for a success). DNS failures are kept
    apart: :attr:`dns_failures` sums them and :meth:`prometheus` labels every class, so a
    resolver problem never hides in a generic "fetch failed" count.
    """

    __slots__ = ("_kinds", "_phases")

    def __init__(self) -> None:
        self._kinds: Counter[str] = Counter()
        self._phases: Counter[tuple[str, str]] = Counter()

    def add(self, failure: Failure | None) -> None:
        """Count one request: ``None`` is a success, otherwise its failure."""
        if failure is None:
            self._kinds["ok"] += 1
            return
        self._kinds[failure.kind.value] += 1
        self._phases[(failure.kind.value, failure.phase or "unknown")] += 1

    def __getitem__(self, kind: str) -> int:
        return self._kinds[str(kind)]

    @property
    def total(self) -> int:
        """All requests counted."""
        return sum(self._kinds.values())

    @property
    def failures(self) -> int:
        """All failed requests."""
        return self.total - self._kinds["ok"]

    @property
    def dns_failures(self) -> int:
        """Failed requests whose class is one of :data:`DNS_CLASSES`."""
        return sum(self._kinds[k.value] for k in DNS_CLASSES)

    def snapshot(self) -> dict[str, int]:
        """``{"ok": n, "dns_timeout": n, ...}`` with every class present (zeros too)."""
        out = {"ok": self._kinds["ok"]}
        out.update({k.value: self._kinds[k.value] for k in FailureClass})
        return out

    def by_phase(self) -> dict[str, dict[str, int]]:
        """``{class: {phase: n}}`` for the classes seen."""
        out: dict[str, dict[str, int]] = {}
        for (kind, phase), n in sorted(self._phases.items()):
            out.setdefault(kind, {})[phase] = n
        return out

    def prometheus(self, name: str = "dns_sidecar_client_requests_total") -> str:
        """Prometheus text exposition: one counter sample per class, labelled
        ``class`` and ``dns`` ("true" for the DNS classes)."""
        lines = [
            f"# HELP {name} Requests by outcome class (ok or a failure class).",
            f"# TYPE {name} counter",
        ]
        for kind, n in self.snapshot().items():
            dns = "true" if kind in {k.value for k in DNS_CLASSES} else "false"
            lines.append(f'{name}{{class="{kind}",dns="{dns}"}} {n}')
        return "\n".join(lines) + "\n"

    def __repr__(self) -> str:
        seen = {k: v for k, v in self._kinds.items() if v}
        return f"<ClassCounters {seen}>"
