"""aiohttp resolver and connector aimed at the sidecar.

``sidecar_resolver()`` is an :class:`aiohttp.resolver.AsyncResolver` whose own c-ares channel
queries the sidecar, tuned for a local hop, with one TTL-aware table of answers (pre-warmed
and looked up) and a batch pre-warm. ``sidecar_connector()`` is a :class:`aiohttp.TCPConnector`
using it with crawler defaults (aiohttp's own DNS cache off: it ignores TTLs), and stamps the
TCP connect and TLS handshake for :mod:`client.tracing`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Iterable, Sequence
from typing import Any, Generic, TypeVar, overload

import aiohttp
import pycares
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import AsyncResolver, ThreadedResolver

from sidecar.upstream.cares import LoopResolver

from .errors import PrewarmError
from .prewarm import (
    _FAMILY_OF,
    DEFAULT_API_URL,
    PREWARM_TYPES,
    PrewarmResult,
    PrewarmTable,
    _key,
    check_types,
    dns_error,
    normalize_hosts,
    post_prewarm,
)
from .tracing import current_trace

try:
    from aiodns.error import DNSError as _AiodnsError
except ImportError:  # pragma: no cover
    _AiodnsError = None  # type: ignore[assignment,misc]

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
#: retry (with jitter) and, once it has RTT samples, starts from max(250 ms, 5 x RTT).
DEFAULT_TIMEOUT = 0.5
#: Packets per lookup. Enough that c-ares never gives up before :data:`DEFAULT_LOOKUP_TIMEOUT`
#: even on a warm channel (0.25 s first try, then doubling): c-ares accepts only the reply
#: to its latest try, so it must still be waiting when the sidecar answers a dead name.
DEFAULT_TRIES = 6
#: Deadline of one lookup through the sidecar, seconds. Longer than the sidecar's own
#: budget for a miss (``--timeout`` x ``--tries`` = 4 s by default, then SERVFAIL), so a dead
#: domain comes back as the sidecar's SERVFAIL, an answer, not as a client timeout.
DEFAULT_LOOKUP_TIMEOUT = 5.0
#: SO_RCVBUF asked for the c-ares UDP socket, bytes (the kernel caps it at
#: net.core.rmem_max): a burst of hundreds of replies overflows the 208 KiB default.
DEFAULT_RECEIVE_BUFFER = 4 * 1024 * 1024
#: c-ares flags: no search-domain expansion (a crawler's names are absolute; with
#: ``ndots:5`` in a pod's resolv.conf every name would first be tried with each search
#: suffix), SERVFAIL/REFUSED returned at once instead of retried (the sidecar already
#: retried its upstreams), the UDP socket kept open between bursts, and EDNS kept (setting
#: ``flags`` replaces c-ares' defaults, which include it; without it an answer over 512
#: bytes comes back truncated and costs a TCP round trip).
DEFAULT_FLAGS = (
    pycares.ARES_FLAG_NOSEARCH | pycares.ARES_FLAG_NOCHECKRESP | pycares.ARES_FLAG_STAYOPEN
    | pycares.ARES_FLAG_EDNS
)
#: Default deadline of a whole pre-warm, seconds: below the sidecar's miss budget, so one
#: dead name does not hold the batch until the sidecar gives up on it.
DEFAULT_PREWARM_DEADLINE = 3.0
#: After the pre-warm deadline, how long the names of unfinished calls are asked by DNS
#: (by then the sidecar has most of them in its cache), seconds.
SWEEP_TIMEOUT = 0.5
#: Names asked at once by that sweep.
SWEEP_CONCURRENCY = 256
#: Deadline of one ``GET /healthz``, seconds.
HEALTH_TIMEOUT = 0.5

#: Crawler defaults for the connector: total and per-host connection limits, and aiohttp's
#: DNS cache off (it keeps every answer a fixed time whatever its TTL; the resolver's
#: table honours the TTLs instead, and is served without a lookup task).
CONNECTOR_DEFAULTS: dict[str, Any] = {
    "limit": 200,
    "limit_per_host": 8,
    "use_dns_cache": False,
}

_AI_ADDRCONFIG = socket.AI_ADDRCONFIG
if hasattr(socket, "AI_MASK"):  # pragma: no cover - BSDs
    _AI_ADDRCONFIG &= socket.AI_MASK

ARES_ENODATA = 1
ARES_ENOTFOUND = 4
ARES_ETIMEOUT = 12


def _nameservers(address: str | Sequence[str]) -> list[str]:
    """Validate ``"IP"``, ``"IP:PORT"``, ``"[IPv6]:PORT"`` (or a list of them)."""
    items = [address] if isinstance(address, str) else list(address)
    if not items:
        raise ValueError("no sidecar address given")
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"bad sidecar address {item!r}: expected a string")
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


def _internal_session() -> aiohttp.ClientSession:
    """A session for the sidecar's API (an IP literal): no pooling, and a resolver that
    starts nothing (aiohttp's default would create an aiodns channel and its thread)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(force_close=True, resolver=ThreadedResolver())
    )


def _addresses(result: Any) -> tuple[list[tuple[int, str]], float]:
    """``(family, address)`` pairs of a c-ares ``getaddrinfo`` result, and its TTL (the
    smallest of its records and CNAMEs)."""
    out: list[tuple[int, str]] = []
    ttls: list[float] = []
    for node in result.nodes:
        addr = node.addr
        host = addr[0].decode("ascii") if isinstance(addr[0], bytes) else str(addr[0])
        if node.family == socket.AF_INET6 and len(addr) > 3 and addr[3]:
            # link-local: the address needs its zone to be usable
            try:
                host = f"{host}%{socket.if_indextoname(addr[3])}"
            except OSError:
                host = f"{host}%{addr[3]}"
        if (node.family, host) not in out:
            out.append((node.family, host))
        ttls.append(float(node.ttl))
    ttls.extend(float(c.ttl) for c in getattr(result, "cnames", ()) or ())
    return out, (min(ttls) if ttls else 0.0)


class SidecarResolver(AsyncResolver):
    """An :class:`aiohttp.resolver.AsyncResolver` querying the sidecar, with a pre-warm.

    Create it with :func:`sidecar_resolver`. ``resolve()`` answers from its table
    (:attr:`prewarmed`: pre-warmed answers and the answers of earlier lookups, each until its
    TTL) with no I/O and no suspension, rotating the addresses on every use; otherwise it
    asks the sidecar through its own c-ares channel, one lookup per (name, family) however
    many requests ask at once, within ``lookup_timeout`` seconds. Negative answers are left
    to c-ares' own query cache, which keeps them by their SOA TTL.
    """

    def __init__(
        self,
        address: str | Sequence[str] = DEFAULT_ADDRESS,
        *,
        api_url: str | None = DEFAULT_API_URL,
        api_token: str | None = None,
        prewarm_timeout: float = 30.0,
        lookup_timeout: float | None = DEFAULT_LOOKUP_TIMEOUT,
        name: str | None = None,
        loop: Any = None,
        **aiodns_kwargs: Any,
    ) -> None:
        nameservers = _nameservers(address)
        # Not AsyncResolver.__init__: it would build aiodns's default channel, run by a
        # c-ares thread that hands every reply over to the loop. Every method of
        # AsyncResolver is overridden below, so none of its private attributes is read
        # (tests/test_client_resolver.py fails if aiohttp adds one).
        self._loop = loop or asyncio.get_running_loop()
        self._resolver: Any = LoopResolver(nameservers=nameservers, loop=self._loop,
                                           **aiodns_kwargs)
        self.address = address if isinstance(address, str) else ",".join(address)
        self.name = name or f"sidecar@{self.address}"
        self.api_url = api_url
        self.api_token = api_token
        self.prewarm_timeout = prewarm_timeout
        self.lookup_timeout = lookup_timeout
        self.prewarmed = PrewarmTable()
        self._inflight: dict[tuple[str, int], asyncio.Future[list[tuple[int, str]]]] = {}

    # -- lookups --------------------------------------------------------------------

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """Resolve ``host``: from the table when held, else via the sidecar.

        Raises ``OSError`` chained from the ``aiodns.error.DNSError`` (its ``args[0]`` is
        the c-ares status; 12 when ``lookup_timeout`` expired) like aiohttp's
        ``AsyncResolver``.
        """
        held = self.lookup_prewarmed(host, port, family)
        if held is not None:
            return held
        _mark_trace(self.name)
        try:
            return await self._resolve_once(host, port, family)
        except OSError as exc:
            if family != socket.AF_UNSPEC or _ares_code(exc) != ARES_ENODATA:
                raise
            # c-ares merges the two answers: SERVFAIL (or a timeout) for A plus NODATA for
            # AAAA is reported as NODATA. Ask each family alone (NODATA answers come from
            # c-ares' own cache) so a failure is reported as the failure it is.
            for single in (socket.AF_INET, socket.AF_INET6):
                try:
                    return await self._resolve_once(host, port, single)
                except OSError as single_exc:
                    if _ares_code(single_exc) not in (ARES_ENODATA, ARES_ENOTFOUND):
                        raise
            raise

    async def _resolve_once(self, host: str, port: int, family: int) -> list[ResolveResult]:
        key = (_key(host), int(family))
        fut = self._inflight.get(key)
        if fut is None:
            fut = self._start_lookup(host, key, family)
        try:
            async with asyncio.timeout(self.lookup_timeout):
                # shielded: a waiter that gives up must not cancel the others' lookup
                addresses = await asyncio.shield(fut)
        except TimeoutError:
            if not fut.done():
                err = dns_error(ARES_ETIMEOUT, "Timeout while contacting DNS servers")
                err.__suppress_context__ = True
                raise err  # noqa: B904 - chained from the aiodns error, as c-ares' own
            raise
        except Exception as exc:
            if _AiodnsError is not None and isinstance(exc, _AiodnsError):
                msg = exc.args[1] if len(exc.args) > 1 else "DNS lookup failed"
                raise OSError(None, msg) from exc
            raise
        return [
            ResolveResult(hostname=host, host=addr, port=port, family=fam, proto=0,
                          flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV)
            for fam, addr in addresses
        ]

    def _start_lookup(self, host: str, key: tuple[str, int], family: int
                      ) -> asyncio.Future[list[tuple[int, str]]]:
        if self._resolver is None:
            raise RuntimeError("Channel is destroyed, no new queries allowed")
        inner = self._resolver.getaddrinfo(host, family=family, port=0,
                                           type=socket.SOCK_STREAM, flags=_AI_ADDRCONFIG)
        fut: asyncio.Future[list[tuple[int, str]]] = self._loop.create_future()
        self._inflight[key] = fut

        def done(inner: asyncio.Future[Any]) -> None:
            if self._inflight.get(key) is fut:
                del self._inflight[key]
            if fut.done():
                return
            if inner.cancelled():
                fut.set_exception(_AiodnsError(24, "DNS query cancelled")
                                  if _AiodnsError is not None else OSError(None, "DNS query cancelled"))
            elif inner.exception() is not None:
                fut.set_exception(inner.exception())  # type: ignore[arg-type]
            else:
                addresses, ttl = _addresses(inner.result())
                if not addresses:
                    fut.set_exception(OSError(None, "DNS lookup failed"))
                else:
                    self.prewarmed.store_lookup(host, family, addresses, ttl)
                    fut.set_result(addresses)
                    return
            fut.exception()  # retrieved: nobody may be waiting any more

        inner.add_done_callback(done)
        return fut

    def lookup_prewarmed(
        self, host: str, port: int = 0, family: int = socket.AF_INET
    ) -> list[ResolveResult] | None:
        """The held answer (pre-warmed or looked up), or ``None`` (see
        :meth:`PrewarmTable.lookup`).

        Synchronous; raises ``OSError`` for a held NXDOMAIN/NODATA. Marks the current
        request's trace as answered by ``"<name>/prewarm"`` or ``"<name>/cache"``.
        """
        table = self.prewarmed
        if not table:
            return None
        try:
            held = table.lookup(host, port, family)
        except OSError:
            _mark_trace(f"{self.name}/prewarm")
            raise
        if held is not None and current_trace() is not None:
            source = table.last_source
            _mark_trace(f"{self.name}/{'prewarm' if source == 'prewarm' else 'cache'}")
        return held

    async def check_health(self, timeout: float = HEALTH_TIMEOUT) -> bool | None:
        """``GET /healthz`` of the sidecar: True for a 200 within ``timeout`` seconds, False
        otherwise, None when the resolver has no ``api_url``."""
        if self.api_url is None:
            return None
        url = self.api_url.rstrip("/") + "/healthz"
        try:
            async with _internal_session() as session, session.get(
                url, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, OSError, ValueError):
            return False

    # -- pre-warm -------------------------------------------------------------------

    async def prewarm(
        self,
        hosts: Iterable[str],
        *,
        types: Sequence[str] = PREWARM_TYPES,
        session: aiohttp.ClientSession | None = None,
        batch_size: int = 2000,
        deadline: float | None = DEFAULT_PREWARM_DEADLINE,
    ) -> PrewarmResult:
        """Resolve ``hosts`` (names or URLs) with ``POST /prewarm`` calls to the sidecar
        and keep the answers in memory until their TTL expires.

        Afterwards ``resolve()`` serves those hosts without a DNS round trip. Warm both A
        and AAAA (the default), or ``types=["A"]`` to connect to these hosts over IPv4
        only (served for the connector's default ``AF_UNSPEC`` too). More than
        ``batch_size`` names go as several calls at once (the sidecar takes at most 10,000
        names per call).

        ``deadline`` (seconds, None for none) bounds the whole pre-warm: calls not finished
        by then are dropped, their names asked by DNS for :data:`SWEEP_TIMEOUT` more (the
        sidecar has resolved most of them by then), and what is still unanswered is listed
        in ``result.pending`` and left to normal lookups. Raises
        :class:`~client.PrewarmError` when a call fails (``exc.result`` holds what the
        other calls warmed) and ``ValueError`` for bad ``types`` or no ``api_url``.
        """
        if self.api_url is None:
            raise ValueError("this resolver has no api_url; pre-warm needs the sidecar API")
        wanted = check_types(types)
        started = time.perf_counter()
        names = normalize_hosts(hosts)
        result = PrewarmResult(requested=len(names))
        if not names:
            return result
        self.prewarmed.purge()
        size = max(1, int(batch_size))
        batches = [names[i : i + size] for i in range(0, len(names), size)]
        calls = [asyncio.ensure_future(self._post(batch, wanted, session)) for batch in batches]
        try:
            _, late = await asyncio.wait(calls, timeout=deadline)
        finally:
            for call in calls:
                call.cancel()  # a no-op for the finished ones
        await asyncio.gather(*late, return_exceptions=True)
        error: BaseException | None = None
        pending: list[str] = []
        for batch, call in zip(batches, calls, strict=True):
            if call in late:
                pending.extend(batch)
                continue
            exc = call.exception()
            if exc is not None:
                error = error or exc
                continue
            payload = call.result()
            self.prewarmed.load(payload, wanted, result)
            elapsed_ms = payload.get("elapsed_ms")
            if isinstance(elapsed_ms, int | float):
                result.server_ms = (result.server_ms or 0.0) + float(elapsed_ms)
        if pending:
            await self._sweep(pending, wanted, result)
        result.elapsed = time.perf_counter() - started
        log.debug("prewarm %s: %s", self.name, result)
        if error is not None:
            if isinstance(error, PrewarmError):
                error.result = result
            raise error
        return result

    async def _post(self, names: list[str], types: list[str],
                    session: aiohttp.ClientSession | None) -> dict[str, Any]:
        assert self.api_url is not None
        return await post_prewarm(self.api_url, names, types=types, token=self.api_token,
                                  request_timeout=self.prewarm_timeout, session=session)

    async def _sweep(self, names: list[str], types: list[str], result: PrewarmResult) -> None:
        """Ask ``names`` by DNS for :data:`SWEEP_TIMEOUT`; sort them into ``result``."""
        family = socket.AF_UNSPEC if len(types) == 2 else _FAMILY_OF[types[0]]
        single = types[0] if len(types) == 1 else None
        gate = asyncio.Semaphore(SWEEP_CONCURRENCY)

        async def one(name: str) -> None:
            async with gate:
                await self._resolve_once(name, 0, family)

        tasks = {asyncio.ensure_future(one(n)): n for n in names}
        done, late = await asyncio.wait(tasks, timeout=SWEEP_TIMEOUT)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
        for task, name in tasks.items():
            if task in late:
                result.pending.append(name)
                continue
            exc = task.exception()
            if exc is None:
                result.warmed += 1
                if single is not None:
                    self.prewarmed.mark_single(name, single)
            elif _ares_code(exc) == ARES_ENOTFOUND:
                result.nxdomain.append(name)
            elif _ares_code(exc) == ARES_ETIMEOUT:
                result.pending.append(name)
            else:
                code = _ares_code(exc)
                result.failed[name] = _RCODE_OF_ARES.get(code, "error") if code else "error"

    async def close(self) -> None:
        """Cancel pending queries and destroy the c-ares channel."""
        resolver, self._resolver = self._resolver, None
        if resolver is not None:
            await resolver.close()

    def __repr__(self) -> str:
        return f"<SidecarResolver {self.name} held={len(self.prewarmed)}>"


_RCODE_OF_ARES = {1: "NODATA", 3: "SERVFAIL", 6: "REFUSED"}


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
    lookup_timeout: float | None = DEFAULT_LOOKUP_TIMEOUT,
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
    * ``timeout`` (seconds) / ``tries``: c-ares' first per-try timeout and packets per
      lookup; retries double the timeout, so with the defaults c-ares keeps trying past
      ``lookup_timeout``.
    * ``lookup_timeout`` (seconds): deadline of one lookup (c-ares status 12 after it).
      Keep it above the sidecar's ``--timeout`` x ``--tries`` so the sidecar's SERVFAIL
      for a dead name arrives first.
    * ``socket_receive_buffer_size`` (bytes): SO_RCVBUF of the channel's UDP socket.
    * ``flags``: c-ares flags, default ``NOSEARCH | NOCHECKRESP | STAYOPEN | EDNS``.
    * ``api_url`` / ``api_token`` / ``prewarm_timeout`` (seconds per call): the sidecar's
      HTTP API, used by :meth:`SidecarResolver.prewarm` and ``/healthz`` checks.
    * other keywords go to ``aiodns.DNSResolver`` / ``pycares.Channel`` (``rotate``,
      ``udp_port``, ``local_ip``, ...).

    Must be called with an event loop running (aiohttp's resolvers bind to it).
    """
    return SidecarResolver(
        address,
        api_url=api_url,
        api_token=api_token,
        prewarm_timeout=prewarm_timeout,
        lookup_timeout=lookup_timeout,
        name=name,
        timeout=timeout,
        tries=tries,
        socket_receive_buffer_size=socket_receive_buffer_size,
        flags=flags,
        **aiodns_kwargs,
    )


_R = TypeVar("_R", bound=AbstractResolver)


class SidecarConnector(aiohttp.TCPConnector, Generic[_R]):
    """A :class:`aiohttp.TCPConnector` that stamps TCP connect and TLS for tracing.

    It wraps the public ``socket_factory`` hook (socket created = TCP connect starts,
    which also proves DNS is done) and the protocol factory asyncio calls once the TCP
    socket is connected, before the TLS handshake (``tcp_end``). The second hook is the
    one private name the client still uses (``TCPConnector._factory``; public API has no
    "TCP connected" signal): if a future aiohttp drops it, :attr:`instrumented` is False
    and tracing falls back to one ``connect`` duration covering TCP and TLS.

    :attr:`resolver` is typed after the resolver given (``SidecarConnector[SidecarResolver]``
    from :func:`sidecar_connector` without one), so ``connector.resolver.prewarm(...)``
    type-checks. Closes the resolver on ``close()`` when it created it (``owns_resolver``).
    """

    instrumented = True

    def __init__(self, *, resolver: _R, owns_resolver: bool = False, **kwargs: Any) -> None:
        user_factory = kwargs.pop("socket_factory", None)

        def socket_factory(addr_info: Any) -> socket.socket:
            trace = current_trace()
            if trace is not None:
                trace._mark_tcp_start()
            if user_factory is not None:
                return user_factory(addr_info)
            family, type_, proto, _, _ = addr_info
            return socket.socket(family=family, type=type_, proto=proto)

        super().__init__(resolver=resolver, socket_factory=socket_factory, **kwargs)
        self._sidecar_resolver: _R = resolver
        self._owns_resolver = owns_resolver
        self.instrumented = _wrap_protocol_factory(self)

    @property
    def resolver(self) -> _R:
        """The resolver this connector uses."""
        return self._sidecar_resolver

    async def close(self, *args: Any, **kwargs: Any) -> None:
        """Close connections, then the resolver if this connector created it.

        Arguments go to ``TCPConnector.close`` as given (``abort_ssl=`` exists from
        aiohttp 3.12.11 on).
        """
        await super().close(*args, **kwargs)
        if self._owns_resolver:
            self._owns_resolver = False
            await self._sidecar_resolver.close()


def _wrap_protocol_factory(connector: aiohttp.TCPConnector) -> bool:
    """Stamp "TCP connected" from the protocol factory aiohttp hands asyncio; False when
    aiohttp no longer has the attribute (tests/test_client_resolver.py then fails)."""
    protocol_factory = getattr(connector, "_factory", None)
    if not callable(protocol_factory):  # pragma: no cover - depends on aiohttp internals
        log.warning("aiohttp has no TCPConnector._factory: TLS time is counted in connect")
        return False

    def timed_factory() -> Any:
        trace = current_trace()
        if trace is not None:
            trace._mark_tcp_end()
        return protocol_factory()

    setattr(connector, "_factory", timed_factory)  # noqa: B010 - the private name, once
    return True


@overload
def sidecar_connector(
    address: str | Sequence[str] = ...,
    *,
    resolver: None = None,
    api_url: str | None = ...,
    api_token: str | None = ...,
    **kwargs: Any,
) -> SidecarConnector[SidecarResolver]: ...


@overload
def sidecar_connector(
    address: str | Sequence[str] = ...,
    *,
    resolver: _R,
    api_url: str | None = ...,
    api_token: str | None = ...,
    **kwargs: Any,
) -> SidecarConnector[_R]: ...


def sidecar_connector(
    address: str | Sequence[str] = DEFAULT_ADDRESS,
    *,
    resolver: AbstractResolver | None = None,
    api_url: str | None = DEFAULT_API_URL,
    api_token: str | None = None,
    **kwargs: Any,
) -> SidecarConnector[Any]:
    """A ``TCPConnector`` resolving through the sidecar, with crawler defaults.

    Defaults (each overridable by keyword): ``limit=200`` connections in total,
    ``limit_per_host=8``, and ``use_dns_cache=False``: aiohttp's DNS cache keeps an answer
    for a fixed ``ttl_dns_cache`` whatever its TTL, while the resolver's own table keeps it
    exactly as long as the sidecar said. Any other :class:`aiohttp.TCPConnector` keyword is
    passed through.

    ``resolver``: use this one instead (e.g. a :class:`~client.FailoverResolver`); the
    caller then owns it and closes it. Otherwise ``sidecar_resolver(address, api_url=...,
    api_token=...)`` is created and closed with the connector.
    """
    owns = resolver is None
    if resolver is None:
        resolver = sidecar_resolver(address, api_url=api_url, api_token=api_token)
    options = {**CONNECTOR_DEFAULTS, **kwargs}
    return SidecarConnector(resolver=resolver, owns_resolver=owns, **options)
