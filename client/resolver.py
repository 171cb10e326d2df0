"""aiohttp resolver and connector aimed at the sidecar.

``sidecar_resolver()`` is an :class:`aiohttp.resolver.AsyncResolver` whose own aiodns
(c-ares) channel queries the sidecar, tuned for a local hop, with a batch pre-warm.
``sidecar_connector()`` is a :class:`aiohttp.TCPConnector` using it with crawler defaults,
and stamps the TCP connect and TLS handshake for :mod:`client.tracing`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Iterable, Sequence
from typing import Any

import aiohttp
import pycares
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import AsyncResolver

from sidecar.cares import LoopResolver

from .prewarm import (
    DEFAULT_API_URL,
    PrewarmResult,
    PrewarmTable,
    normalize_hosts,
    post_prewarm,
)
from .tracing import current_trace

__all__ = (
    "DEFAULT_ADDRESS",
    "SidecarConnector",
    "SidecarResolver",
    "sidecar_connector",
    "sidecar_resolver",
)

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "127.0.0.1:5353"

#: Per-try timeout of the first query to the sidecar, seconds. c-ares doubles it on every
#: retry and, once it has RTT samples, uses max(250 ms, 5 x average RTT) instead.
DEFAULT_TIMEOUT = 0.5
#: Tries per lookup (each try is one packet to the sidecar).
DEFAULT_TRIES = 3
#: SO_RCVBUF asked for the c-ares UDP socket, bytes (the kernel caps it at
#: net.core.rmem_max): a burst of hundreds of replies overflows the 208 KiB default.
DEFAULT_RECEIVE_BUFFER = 4 * 1024 * 1024
#: c-ares flags: no search-domain expansion (a crawler's names are absolute; with
#: ``ndots:5`` in a pod's resolv.conf every name would first be tried with each search
#: suffix), SERVFAIL/REFUSED returned at once instead of retried (the sidecar already
#: retried its upstreams, a retry only repeats that wait), and the UDP socket kept open
#: between bursts (c-ares otherwise closes it when no query is pending, and the next
#: burst pays for a new socket and its buffer).
DEFAULT_FLAGS = (
    pycares.ARES_FLAG_NOSEARCH | pycares.ARES_FLAG_NOCHECKRESP | pycares.ARES_FLAG_STAYOPEN
)

#: Crawler defaults for the connector (from the seed article): total and per-host
#: connection limits, and aiohttp's own DNS cache kept 300 s (aiohttp ignores record
#: TTLs; the default is 10 s).
CONNECTOR_DEFAULTS: dict[str, Any] = {
    "limit": 200,
    "limit_per_host": 8,
    "use_dns_cache": True,
    "ttl_dns_cache": 300,
}


def _nameservers(address: str | Sequence[str]) -> list[str]:
    """Validate ``"IP"``, ``"IP:PORT"``, ``"[IPv6]:PORT"`` (or a list of them)."""
    items = [address] if isinstance(address, str) else list(address)
    if not items:
        raise ValueError("no sidecar address given")
    for item in items:
        host, port = item, None
        if item.startswith("["):
            host, bracket, rest = item[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else None
            if not bracket or (rest and not rest.startswith(":")):
                host = ""  # invalid
        elif item.count(":") == 1:
            host, port = item.split(":")
        try:
            ipaddress.ip_address(host)
            if port is not None and not 0 < int(port) < 65536:
                raise ValueError
        except ValueError:
            raise ValueError(
                f"bad sidecar address {item!r}: expected IP, IP:PORT or [IPv6]:PORT"
            ) from None
    return items


class SidecarResolver(AsyncResolver):
    """An :class:`aiohttp.resolver.AsyncResolver` querying the sidecar, with a pre-warm.

    Create it with :func:`sidecar_resolver`. ``resolve()`` answers from the pre-warmed
    table (:attr:`prewarmed`) when it holds the host, with no I/O and no suspension;
    otherwise it asks the sidecar through its own c-ares channel. c-ares keeps its own
    in-process query cache (NOERROR and NXDOMAIN, by TTL, up to an hour), so repeated
    lookups of a name usually send no packet either.
    """

    def __init__(
        self,
        address: str | Sequence[str] = DEFAULT_ADDRESS,
        *,
        api_url: str | None = DEFAULT_API_URL,
        api_token: str | None = None,
        prewarm_timeout: float = 30.0,
        name: str | None = None,
        loop: Any = None,
        **aiodns_kwargs: Any,
    ) -> None:
        nameservers = _nameservers(address)
        # What AsyncResolver.__init__ sets, with a loop-driven c-ares channel instead of
        # aiodns's default one on c-ares' event thread, whose thread hop per reply cost
        # the crawler 40-90 us of ~230 us per lookup (see sidecar.cares.LoopResolver).
        # tests/test_client_resolver.py checks this still covers AsyncResolver's attributes.
        self._loop = loop or asyncio.get_running_loop()
        self._manager = None
        self._resolver = LoopResolver(nameservers=nameservers, loop=self._loop, **aiodns_kwargs)
        self.address = address if isinstance(address, str) else ",".join(address)
        self.name = name or f"sidecar@{self.address}"
        self.api_url = api_url
        self.api_token = api_token
        self.prewarm_timeout = prewarm_timeout
        self.prewarmed = PrewarmTable()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """Resolve ``host``: from the pre-warmed table when held, else via the sidecar.

        Raises ``OSError`` chained from the ``aiodns.error.DNSError`` (its ``args[0]`` is
        the c-ares status) like aiohttp's ``AsyncResolver``.
        """
        held = self.lookup_prewarmed(host, port, family)
        if held is not None:
            return held
        _mark_trace(self.name)
        try:
            return await super().resolve(host, port, family)
        except OSError as exc:
            if family != socket.AF_UNSPEC or _ares_code(exc) != ARES_ENODATA:
                raise
            # c-ares merges the two answers: SERVFAIL (or a timeout) for A plus NODATA for
            # AAAA is reported as NODATA. Ask each family alone (NODATA answers come from
            # c-ares' own cache) so a failure is reported as the failure it is.
            for single in (socket.AF_INET, socket.AF_INET6):
                try:
                    return await super().resolve(host, port, single)
                except OSError as single_exc:
                    if _ares_code(single_exc) not in (ARES_ENODATA, ARES_ENOTFOUND):
                        raise
            raise

    def lookup_prewarmed(
        self, host: str, port: int = 0, family: int = socket.AF_INET
    ) -> list[ResolveResult] | None:
        """The pre-warmed answer, or ``None`` (see :meth:`PrewarmTable.lookup`).

        Synchronous; raises ``OSError`` for a held NXDOMAIN/NODATA. Marks the current
        request's trace as answered by ``"<name>/prewarm"`` when it answers.
        """
        if not self.prewarmed:
            return None
        try:
            held = self.prewarmed.lookup(host, port, family)
        except OSError:
            _mark_trace(f"{self.name}/prewarm")
            raise
        if held is not None:
            _mark_trace(f"{self.name}/prewarm")
        return held

    async def prewarm(
        self,
        hosts: Iterable[str],
        *,
        types: Sequence[str] = ("A", "AAAA"),
        session: aiohttp.ClientSession | None = None,
        batch_size: int = 2000,
    ) -> PrewarmResult:
        """Resolve ``hosts`` (names or URLs) in one ``POST /prewarm`` call to the sidecar
        and keep the answers in memory until their TTL expires.

        Afterwards ``resolve()`` serves those hosts without a DNS round trip. Warm both A
        and AAAA (the default) unless the connector's ``family`` asks for one only.
        More than ``batch_size`` names are sent as several calls, one after the other
        (the sidecar takes at most 10,000 names and 1 MiB per call). Raises
        :class:`~client.PrewarmError` when a call fails (answers of the calls that
        succeeded before it are kept).
        """
        if self.api_url is None:
            raise ValueError("this resolver has no api_url; pre-warm needs the sidecar API")
        started = time.perf_counter()
        names = normalize_hosts(hosts)
        result = PrewarmResult(requested=len(names))
        if names:
            self.prewarmed.purge()
        for start in range(0, len(names), max(1, batch_size)):
            payload = await post_prewarm(
                self.api_url,
                names[start : start + max(1, batch_size)],
                types=types,
                token=self.api_token,
                request_timeout=self.prewarm_timeout,
                session=session,
            )
            self.prewarmed.load(payload, types, result)
            elapsed_ms = payload.get("elapsed_ms")
            if elapsed_ms is not None:
                result.server_ms = (result.server_ms or 0.0) + float(elapsed_ms)
        result.elapsed = time.perf_counter() - started
        log.debug("prewarm %s: %s", self.name, result)
        return result

    async def close(self) -> None:
        """Cancel pending queries and destroy the c-ares channel."""
        resolver = self._resolver
        await super().close()
        if resolver is not None and hasattr(resolver, "close"):
            await resolver.close()

    def __repr__(self) -> str:
        return f"<SidecarResolver {self.name} prewarmed={len(self.prewarmed)}>"


ARES_ENODATA = 1
ARES_ENOTFOUND = 4


def _ares_code(exc: BaseException) -> int | None:
    """The c-ares status aiohttp chained under a resolver OSError, if any."""
    cause = exc.__cause__
    args = getattr(cause, "args", ())
    return args[0] if args and isinstance(args[0], int) and cause is not None else None


def _mark_trace(name: str) -> None:
    trace = current_trace()
    if trace is not None:
        trace.resolver = name


def sidecar_resolver(
    address: str | Sequence[str] = DEFAULT_ADDRESS,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    tries: int = DEFAULT_TRIES,
    socket_receive_buffer_size: int = DEFAULT_RECEIVE_BUFFER,
    flags: int = DEFAULT_FLAGS,
    api_url: str | None = DEFAULT_API_URL,
    api_token: str | None = None,
    prewarm_timeout: float = 30.0,
    name: str | None = None,
    **aiodns_kwargs: Any,
) -> SidecarResolver:
    """An ``AsyncResolver`` whose c-ares channel queries only the sidecar at ``address``.

    * ``address``: ``"IP:PORT"`` (``"[::1]:5353"`` for IPv6), a bare IP (port 53), or a
      list of them (c-ares tries them in order).
    * ``timeout`` (seconds) / ``tries``: per-try timeout of the first try and number of
      tries, short for a local hop. c-ares doubles the timeout on each retry and, after a
      few answers, adapts it to max(250 ms, 5 x RTT); on loopback a lookup the sidecar
      cannot answer fails after roughly 1 to 2 s with the defaults.
    * ``socket_receive_buffer_size`` (bytes): SO_RCVBUF of the channel's UDP socket.
    * ``flags``: c-ares flags, default ``NOSEARCH | NOCHECKRESP | STAYOPEN``.
    * ``api_url`` / ``api_token`` / ``prewarm_timeout`` (seconds): the sidecar's HTTP API,
      used by :meth:`SidecarResolver.prewarm`.
    * other keywords go to ``aiodns.DNSResolver`` / ``pycares.Channel`` (``rotate``,
      ``udp_port``, ``local_ip``, ...).

    Must be called with an event loop running (aiohttp's resolvers bind to it).
    """
    return SidecarResolver(
        address,
        api_url=api_url,
        api_token=api_token,
        prewarm_timeout=prewarm_timeout,
        name=name,
        timeout=timeout,
        tries=tries,
        socket_receive_buffer_size=socket_receive_buffer_size,
        flags=flags,
        **aiodns_kwargs,
    )


class SidecarConnector(aiohttp.TCPConnector):
    """A :class:`aiohttp.TCPConnector` that stamps TCP connect and TLS for tracing.

    It wraps the public ``socket_factory`` hook (socket created = TCP connect starts,
    which also proves DNS is done) and the protocol factory asyncio calls once the TCP
    socket is connected, before the TLS handshake (``tcp_end``). The second hook uses
    aiohttp's private ``_factory`` attribute; if a future aiohttp drops it, tracing
    silently falls back to one ``connect`` duration covering TCP and TLS.

    Closes the resolver on ``close()`` when it created it (``owns_resolver``).
    """

    instrumented = True

    def __init__(self, *, owns_resolver: bool = False, **kwargs: Any) -> None:
        user_factory = kwargs.pop("socket_factory", None)

        def socket_factory(addr_info: Any) -> socket.socket:
            trace = current_trace()
            if trace is not None:
                trace._mark_tcp_start()
            if user_factory is not None:
                return user_factory(addr_info)
            family, type_, proto, _, _ = addr_info
            return socket.socket(family=family, type=type_, proto=proto)

        super().__init__(socket_factory=socket_factory, **kwargs)
        self._owns_resolver = owns_resolver
        protocol_factory = getattr(self, "_factory", None)
        if callable(protocol_factory):

            def timed_factory() -> Any:
                trace = current_trace()
                if trace is not None:
                    trace._mark_tcp_end()
                return protocol_factory()

            self._factory = timed_factory
        else:  # pragma: no cover - depends on aiohttp internals
            self.instrumented = False

    @property
    def resolver(self) -> AbstractResolver:
        """The resolver this connector uses."""
        return self._resolver

    async def _resolve_host(self, host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        """Serve pre-warmed hosts before aiohttp's DNS cache machinery.

        aiohttp's cached path starts a task per first lookup of a (host, port), which
        costs an event-loop round trip per request in a burst. A pre-warmed answer is
        returned here directly (honouring its TTL, which aiohttp's cache ignores), with
        the resolve start/end trace signals. Everything else goes to aiohttp.
        """
        lookup = getattr(self._resolver, "lookup_prewarmed", None)
        if lookup is None:
            return await super()._resolve_host(host, port, *args, **kwargs)
        traces = kwargs.get("traces", args[0] if args else None) or ()
        try:
            held = lookup(host, port, self.family)
        except OSError:
            for trace in traces:
                await trace.send_dns_resolvehost_start(host)
            raise
        if held is None:
            return await super()._resolve_host(host, port, *args, **kwargs)
        for trace in traces:
            await trace.send_dns_resolvehost_start(host)
        for trace in traces:
            await trace.send_dns_resolvehost_end(host)
        return held

    async def close(self, *, abort_ssl: bool = False) -> None:
        """Close connections, then the resolver if this connector created it."""
        await super().close(abort_ssl=abort_ssl)
        if self._owns_resolver:
            self._owns_resolver = False
            await self._resolver.close()


def sidecar_connector(
    address: str | Sequence[str] = DEFAULT_ADDRESS,
    *,
    resolver: AbstractResolver | None = None,
    api_url: str | None = DEFAULT_API_URL,
    api_token: str | None = None,
    **kwargs: Any,
) -> SidecarConnector:
    """A ``TCPConnector`` resolving through the sidecar, with crawler defaults.

    Defaults (each overridable by keyword): ``limit=200`` connections in total,
    ``limit_per_host=8``, ``use_dns_cache=True`` with ``ttl_dns_cache=300`` seconds.
    Any other :class:`aiohttp.TCPConnector` keyword is passed through.

    ``resolver``: use this one instead (e.g. a :class:`~client.FailoverResolver`); the
    caller then owns it and closes it. Otherwise ``sidecar_resolver(address, api_url=...,
    api_token=...)`` is created and closed with the connector.
    """
    owns = resolver is None
    if resolver is None:
        resolver = sidecar_resolver(address, api_url=api_url, api_token=api_token)
    options = {**CONNECTOR_DEFAULTS, **kwargs}
    return SidecarConnector(resolver=resolver, owns_resolver=owns, **options)
