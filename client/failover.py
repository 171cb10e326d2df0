"""An aiohttp resolver that fails over between resolvers and backs off from failing ones."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import AsyncResolver, ThreadedResolver

from .errors import PrewarmError, ResolverTimeout, ResolverUnavailable
from .prewarm import PrewarmResult
from .tracing import current_trace

try:
    from aiodns.error import DNSError as _AiodnsError
except ImportError:  # pragma: no cover
    _AiodnsError = None  # type: ignore[assignment,misc]

__all__ = ("FailoverResolver", "LookupRecord", "ResolverState", "failover_resolver")

log = logging.getLogger(__name__)

# outcomes of one attempt
ANSWER = "answer"  # an answer, positive or negative (NXDOMAIN, NODATA): returned as is
UNREACHABLE = "unreachable"  # could not contact the resolver: set aside
TIMEOUT = "timeout"  # no answer in time: set aside
SERVFAIL = "servfail"  # SERVFAIL: next resolver for this lookup (configurable)
REFUSED = "refused"  # REFUSED: next resolver for this lookup (configurable)

_ARES_OUTCOMES = {
    1: ANSWER,  # ENODATA
    4: ANSWER,  # ENOTFOUND (NXDOMAIN)
    8: ANSWER,  # EBADNAME
    3: SERVFAIL,  # ESERVFAIL
    6: REFUSED,  # EREFUSED
    11: UNREACHABLE,  # ECONNREFUSED: could not contact
    12: TIMEOUT,  # ETIMEOUT
    10: UNREACHABLE,  # EBADRESP
    13: UNREACHABLE,  # EOF
    16: UNREACHABLE,  # EDESTRUCTION
}
_GAI_OUTCOMES = {
    socket.EAI_NONAME: ANSWER,
    socket.EAI_AGAIN: TIMEOUT,  # glibc: "temporary failure": no server answered
    socket.EAI_FAIL: SERVFAIL,
}
if hasattr(socket, "EAI_NODATA"):
    _GAI_OUTCOMES[socket.EAI_NODATA] = ANSWER


def _outcome(exc: BaseException) -> str | None:
    """Sort a resolver exception; ``None`` means "not a resolver failure, re-raise"."""
    if isinstance(exc, ResolverTimeout):
        return TIMEOUT
    cause = exc.__cause__
    if _AiodnsError is not None and isinstance(cause, _AiodnsError):
        code = cause.args[0] if cause.args else None
        if code == 24:  # ECANCELLED: the resolver was closed/cancelled under us
            return None
        return _ARES_OUTCOMES.get(code, UNREACHABLE)  # type: ignore[arg-type]
    if isinstance(exc, socket.gaierror):
        return _GAI_OUTCOMES.get(exc.errno, UNREACHABLE)  # type: ignore[arg-type]
    if isinstance(exc, ResolverUnavailable):  # a nested FailoverResolver
        return UNREACHABLE
    if isinstance(exc, OSError):
        if exc.errno is None and exc.args[1:2] == ("DNS lookup failed",):
            return ANSWER  # aiohttp: an answer without usable addresses
        return UNREACHABLE
    if isinstance(exc, RuntimeError):  # e.g. "Channel is destroyed"
        return UNREACHABLE
    return None


def _default_name(resolver: AbstractResolver, index: int) -> str:
    name = getattr(resolver, "name", None)
    if isinstance(name, str) and name:
        return name
    if isinstance(resolver, ThreadedResolver):
        return "threaded"
    if isinstance(resolver, AsyncResolver):
        inner = getattr(resolver, "_resolver", None)
        servers = getattr(getattr(inner, "_channel", None), "servers", None)
        if servers:
            return "async@" + ",".join(servers)
        return f"async#{index}"
    return f"{type(resolver).__name__}#{index}"


@dataclass
class ResolverState:
    """Health and counters of one resolver in the chain.

    ``aside_until`` is a ``time.monotonic()`` deadline (0 = in use); ``backoff`` is the
    next back-off period in seconds. Counters: ``answers`` (including NXDOMAIN/NODATA),
    ``negative`` (NXDOMAIN/NODATA among them), ``failures`` (unreachable/timeout),
    ``rcode_failovers`` (SERVFAIL/REFUSED passed on), ``set_aside`` (times put aside),
    ``consecutive_failures``.
    """

    name: str
    resolver: AbstractResolver
    aside_until: float = 0.0
    backoff: float = 0.0
    answers: int = 0
    negative: int = 0
    failures: int = 0
    rcode_failovers: int = 0
    set_aside: int = 0
    consecutive_failures: int = 0

    def available(self, now: float) -> bool:
        return now >= self.aside_until


@dataclass(frozen=True, slots=True)
class LookupRecord:
    """One lookup: ``host``, the resolver that answered (``None`` if none did),
    ``outcome`` (``"answer"``, ``"nxdomain"`` / ``"nodata"`` style answers are
    ``"answer"``; ``"failed"`` when nothing answered), ``attempts`` as
    ``(resolver, outcome)`` pairs and ``elapsed`` seconds."""

    host: str
    resolver: str | None
    outcome: str
    attempts: tuple[tuple[str, str], ...]
    elapsed: float


class FailoverResolver(AbstractResolver):
    """Try resolvers in order; put one aside for a while when it cannot be reached.

    ``FailoverResolver(sidecar, public, threaded)`` asks ``sidecar`` first. If a resolver
    cannot be contacted (c-ares ECONNREFUSED "Could not contact DNS servers", connection
    errors) or does not answer in time (c-ares ETIMEOUT, glibc EAI_AGAIN, or
    ``attempt_timeout``), the lookup moves on to the next resolver and, after
    ``max_failures`` consecutive such failures, the resolver is put aside for a back-off
    period: ``backoff`` seconds, doubled each time it is put aside again without an
    answer in between, at most ``max_backoff``. After the period the next lookup tries it
    again; an answer resets it.

    NXDOMAIN and NODATA are answers: they are raised to the caller at once, never
    failed over. SERVFAIL/REFUSED move the lookup to the next resolver (without putting
    the resolver aside) when ``failover_on_servfail`` is true, else they are raised.

    When every resolver has failed or is set aside, :class:`~client.ResolverUnavailable`
    (an ``OSError``, so aiohttp raises ``ClientConnectorDNSError``) is raised at once.

    Which resolver answered: the request's :class:`~client.Trace` (``trace.resolver``,
    ``trace.dns_attempts``), :meth:`answered_by` (last answer per host), :attr:`states`
    (counters per resolver), and the ``on_lookup`` callback (a :class:`LookupRecord`
    per lookup).

    Pre-warmed answers of member resolvers (:meth:`prewarm`) are served first, even
    while that resolver is set aside.
    """

    def __init__(
        self,
        *resolvers: AbstractResolver,
        names: Sequence[str] | None = None,
        backoff: float = 5.0,
        max_backoff: float = 60.0,
        max_failures: int = 1,
        attempt_timeout: float | None = None,
        failover_on_servfail: bool = True,
        on_lookup: Callable[[LookupRecord], None] | None = None,
        close_resolvers: bool = True,
        remember_hosts: int = 4096,
    ) -> None:
        if not resolvers:
            raise ValueError("FailoverResolver needs at least one resolver")
        if names is not None and len(names) != len(resolvers):
            raise ValueError("names must match resolvers one to one")
        self.states = [
            ResolverState(names[i] if names else _default_name(r, i), r)
            for i, r in enumerate(resolvers)
        ]
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_failures = max(1, max_failures)
        self.attempt_timeout = attempt_timeout
        self.failover_on_servfail = failover_on_servfail
        self.on_lookup = on_lookup
        self.close_resolvers = close_resolvers
        self._answered: OrderedDict[str, str] = OrderedDict()
        self._remember = remember_hosts

    # -- reporting ------------------------------------------------------------------

    def answered_by(self, host: str) -> str | None:
        """Name of the resolver that last answered for ``host`` (recent hosts only)."""
        return self._answered.get(host.rstrip(".").lower())

    def status(self) -> list[dict[str, Any]]:
        """Per resolver: name, ``available``, ``aside_for`` (seconds left) and counters."""
        now = time.monotonic()
        return [
            {
                "name": s.name,
                "available": s.available(now),
                "aside_for": max(0.0, s.aside_until - now),
                "answers": s.answers,
                "negative": s.negative,
                "failures": s.failures,
                "rcode_failovers": s.rcode_failovers,
                "set_aside": s.set_aside,
            }
            for s in self.states
        ]

    def _remember_answer(self, host: str, name: str) -> None:
        key = host.rstrip(".").lower()
        self._answered[key] = name
        self._answered.move_to_end(key)
        if len(self._answered) > self._remember:
            self._answered.popitem(last=False)

    def _report(self, host: str, name: str | None, outcome: str,
                attempts: list[tuple[str, str]], started: float) -> None:
        trace = current_trace()
        if trace is not None:
            trace.resolver = name
            trace.dns_attempts = list(attempts)
        if name is not None:
            self._remember_answer(host, name)
        if self.on_lookup is not None:
            self.on_lookup(LookupRecord(host, name, outcome, tuple(attempts),
                                        time.perf_counter() - started))

    # -- health ---------------------------------------------------------------------

    def _failed(self, state: ResolverState, outcome: str) -> None:
        state.failures += 1
        state.consecutive_failures += 1
        now = time.monotonic()
        if state.consecutive_failures < self.max_failures or not state.available(now):
            return  # below the threshold, or already aside (concurrent lookups)
        state.backoff = min(self.max_backoff, state.backoff * 2 if state.backoff else self.backoff)
        state.aside_until = now + state.backoff
        state.set_aside += 1
        log.warning("resolver %s %s: set aside for %.1f s", state.name, outcome, state.backoff)

    def _answered_ok(self, state: ResolverState) -> None:
        state.answers += 1
        state.consecutive_failures = 0
        if state.backoff:
            log.info("resolver %s answers again", state.name)
        state.backoff = 0.0
        state.aside_until = 0.0

    # -- AbstractResolver -----------------------------------------------------------

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """Resolve ``host`` with the first resolver that can answer (see the class doc)."""
        started = time.perf_counter()
        held = self.lookup_prewarmed(host, port, family)
        if held is not None:
            return held

        attempts: list[tuple[str, str]] = []
        last_exc: BaseException | None = None
        for state in self.states:
            now = time.monotonic()
            if not state.available(now):
                attempts.append((state.name, "set-aside"))
                continue
            try:
                if self.attempt_timeout is None:
                    result = await state.resolver.resolve(host, port, family)
                else:
                    try:
                        async with asyncio.timeout(self.attempt_timeout):
                            result = await state.resolver.resolve(host, port, family)
                    except TimeoutError as exc:
                        raise ResolverTimeout(state.name, self.attempt_timeout) from exc
            except Exception as exc:
                outcome = _outcome(exc)
                if outcome is None:
                    raise
                if outcome == ANSWER:
                    self._answered_ok(state)
                    state.negative += 1
                    attempts.append((state.name, ANSWER))
                    self._report(host, state.name, ANSWER, attempts, started)
                    raise
                attempts.append((state.name, outcome))
                last_exc = exc
                if outcome in (SERVFAIL, REFUSED):
                    if not self.failover_on_servfail:
                        self._report(host, state.name, outcome, attempts, started)
                        raise
                    state.rcode_failovers += 1
                    continue
                self._failed(state, outcome)
                continue
            self._answered_ok(state)
            attempts.append((state.name, ANSWER))
            self._report(host, state.name, ANSWER, attempts, started)
            return result

        self._report(host, None, "failed", attempts, started)
        raise ResolverUnavailable(host, attempts) from last_exc

    def lookup_prewarmed(
        self, host: str, port: int = 0, family: int = socket.AF_INET
    ) -> list[ResolveResult] | None:
        """A pre-warmed answer held by any member resolver, or ``None``.

        Synchronous (no I/O); valid even while that member is set aside. Raises
        ``OSError`` for a held NXDOMAIN/NODATA, like a lookup would.
        """
        for state in self.states:
            lookup = getattr(state.resolver, "lookup_prewarmed", None)
            if lookup is None:
                continue
            name = f"{state.name}/prewarm"
            try:
                held = lookup(host, port, family)
            except OSError:
                self._report(host, name, ANSWER, [], time.perf_counter())
                raise
            if held is not None:
                self._report(host, name, ANSWER, [], time.perf_counter())
                return held
        return None

    async def close(self) -> None:
        """Close every member resolver (unless ``close_resolvers=False``)."""
        if not self.close_resolvers:
            return
        for state in self.states:
            await state.resolver.close()

    # -- pre-warm -------------------------------------------------------------------

    async def prewarm(self, hosts: Iterable[str], **kwargs: Any) -> PrewarmResult:
        """Pre-warm through the first member resolver that has ``prewarm()`` (the sidecar).

        Never raises for a failed call: pre-warming is an optimisation, so the error is
        logged and returned in ``PrewarmResult.error``; the lookups then go through
        the normal failover path.
        """
        for state in self.states:
            prewarm = getattr(state.resolver, "prewarm", None)
            if prewarm is None:
                continue
            try:
                return await prewarm(hosts, **kwargs)
            except PrewarmError as exc:
                log.warning("prewarm through %s failed: %s", state.name, exc)
                return PrewarmResult(error=str(exc))
        return PrewarmResult(error="no resolver in the chain supports prewarm")

    def __repr__(self) -> str:
        return f"<FailoverResolver {[s.name for s in self.states]}>"


def failover_resolver(
    address: str | Sequence[str] = "127.0.0.1:5353",
    *,
    fallback_nameservers: Sequence[str] | None = ("1.1.1.1", "8.8.8.8"),
    threaded: bool = True,
    fallback_timeout: float = 2.0,
    fallback_tries: int = 2,
    sidecar_kwargs: dict[str, Any] | None = None,
    **kwargs: Any,
) -> FailoverResolver:
    """The usual chain: the sidecar, then pinned public nameservers, then the system.

    ``FailoverResolver(sidecar_resolver(address, **sidecar_kwargs), AsyncResolver(
    nameservers=fallback_nameservers, timeout=fallback_timeout, tries=fallback_tries),
    ThreadedResolver())``; pass ``fallback_nameservers=None`` or ``threaded=False`` to
    leave those out. Other keywords go to :class:`FailoverResolver`. Needs a running loop.
    """
    from .resolver import sidecar_resolver

    resolvers: list[AbstractResolver] = [sidecar_resolver(address, **(sidecar_kwargs or {}))]
    names = [resolvers[0].name]  # type: ignore[attr-defined]
    if fallback_nameservers:
        resolvers.append(
            AsyncResolver(
                nameservers=list(fallback_nameservers),
                timeout=fallback_timeout,
                tries=fallback_tries,
            )
        )
        names.append("public@" + ",".join(fallback_nameservers))
    if threaded:
        resolvers.append(ThreadedResolver())
        names.append("threaded")
    return FailoverResolver(*resolvers, names=names, **kwargs)
