"""An aiohttp resolver that fails over between resolvers, on evidence that one is down.

A crawler meets dead domains all day: a name whose servers never answer is a slow *name*,
not a down *resolver*. So one timeout never sets a resolver aside; only evidence that it
answers nothing does (see :class:`FailoverResolver`). SERVFAIL, NXDOMAIN and NODATA are
answers and go back to the caller.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

from .errors import ResolverTimeout, ResolverUnavailable
from .prewarm import PrewarmResult
from .tracing import current_trace

try:
    from aiodns.error import DNSError as _AiodnsError
except ImportError:  # pragma: no cover
    _AiodnsError = None  # type: ignore[assignment,misc]

__all__ = (
    "DEFAULT_ATTEMPT_TIMEOUT",
    "FailoverResolver",
    "LookupRecord",
    "ResolverState",
    "failover_resolver",
)

log = logging.getLogger(__name__)

#: Hard deadline of one resolver's attempt, seconds: above the sidecar resolver's own
#: lookup deadline (5 s, itself above the sidecar's 4 s budget for a miss), and a cap for
#: members without one (glibc's own retries can take 10 s and more).
DEFAULT_ATTEMPT_TIMEOUT = 6.0
#: Nothing answered for this long while lookups wait: ask the resolver's health check.
DEFAULT_STALL_TIMEOUT = 0.5
#: Distinct names timing out with nothing answered in between that set a resolver aside.
DEFAULT_MAX_TIMEOUTS = 3

# outcomes of one attempt
ANSWER = "answer"  # an answer, positive or negative (NXDOMAIN, NODATA, SERVFAIL): returned
UNREACHABLE = "unreachable"  # could not contact the resolver: evidence it is down
TIMEOUT = "timeout"  # no answer in time: evidence only with nothing else answered
SERVFAIL = "servfail"  # SERVFAIL: an answer, or the next resolver if failover_on_servfail
REFUSED = "refused"  # REFUSED: likewise
SET_ASIDE = "set-aside"  # skipped (or left) because the resolver is set aside

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
    if isinstance(exc, TimeoutError):
        return TIMEOUT
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
        return "system"
    return f"{type(resolver).__name__}#{index}"


class _Attempt:
    __slots__ = ("abandoned", "host", "started", "timeout")

    def __init__(self, host: str, started: float, timeout: asyncio.Timeout) -> None:
        self.host = host
        self.started = started
        self.timeout = timeout
        self.abandoned = False


@dataclass
class ResolverState:
    """Health and counters of one resolver in the chain.

    ``aside_until`` is a ``time.monotonic()`` deadline (0 = in use); ``backoff`` is the
    next back-off period in seconds; ``reason`` why it was last set aside;
    ``last_answer`` when it last answered anything (any rcode). Counters: ``answers``
    (including NXDOMAIN/NODATA/SERVFAIL), ``negative`` (those negative ones), ``failures``
    (unreachable/timeout), ``timeouts``, ``rcode_failovers`` (SERVFAIL/REFUSED passed on
    with ``failover_on_servfail``), ``set_aside`` (times put aside), ``health_checks``.
    """

    name: str
    resolver: AbstractResolver
    aside_until: float = 0.0
    backoff: float = 0.0
    reason: str | None = None
    last_answer: float = 0.0
    answers: int = 0
    negative: int = 0
    failures: int = 0
    timeouts: int = 0
    rcode_failovers: int = 0
    set_aside: int = 0
    health_checks: int = 0
    consecutive_failures: int = 0
    timed_out: set[str] = field(default_factory=set)
    pending: set[_Attempt] = field(default_factory=set)
    watchdog: asyncio.TimerHandle | None = None
    checking: asyncio.Task[None] | None = None

    def available(self, now: float) -> bool:
        return now >= self.aside_until


@dataclass(frozen=True, slots=True)
class LookupRecord:
    """One lookup: ``host``, the resolver that answered (``None`` if none did),
    ``outcome`` (``"answer"`` for any answer, negative ones included; ``"failed"`` when
    nothing answered), ``attempts`` as ``(resolver, outcome)`` pairs and ``elapsed``
    seconds."""

    host: str
    resolver: str | None
    outcome: str
    attempts: tuple[tuple[str, str], ...]
    elapsed: float


class FailoverResolver(AbstractResolver):
    """Try resolvers in order; set one aside only on evidence that it is down.

    ``FailoverResolver()`` with no resolvers is the default chain: the sidecar
    (``sidecar_resolver()`` on 127.0.0.1:5353), then the system resolver
    (``ThreadedResolver``); a public resolver is used only when you name one.

    What each outcome of a resolver's attempt does:

    * addresses, NXDOMAIN, NODATA, and SERVFAIL/REFUSED: an answer, returned or raised to
      the caller at once (SERVFAIL/REFUSED go to the next resolver, without setting this
      one aside, when ``failover_on_servfail`` is true);
    * cannot contact it (c-ares "Could not contact DNS servers": nothing listens on the
      port; connection errors; a destroyed channel): the lookup moves on, and after
      ``max_failures`` such failures in a row the resolver is set aside;
    * a timeout (the resolver's own, glibc ``EAI_AGAIN``, or ``attempt_timeout``): the
      lookup moves on, but the resolver is set aside only when ``max_timeouts`` different
      names have timed out with nothing answered by it since they were asked (a dead
      domain among live ones never counts);
    * nothing answered for ``stall_timeout`` seconds while lookups wait: the resolver's
      ``check_health()`` is asked (the sidecar's ``GET /healthz``), and a failed check
      sets it aside.

    Setting a resolver aside moves the lookups still waiting on it to the next resolver
    at once, so a hung resolver costs the lookups in flight one stall period plus one
    health check, and later lookups nothing. The back-off is ``backoff`` seconds, doubled
    each time it is set aside again without an answer in between, at most
    ``max_backoff``; after it the next lookup tries the resolver again.

    When every resolver has failed or is set aside, :class:`~client.ResolverUnavailable`
    (an ``OSError``, so aiohttp raises ``ClientConnectorDNSError``) is raised at once.

    Which resolver answered: the request's :class:`~client.Trace` (``trace.resolver``,
    ``trace.dns_attempts``), :meth:`answered_by`, :meth:`status`, and the ``on_lookup``
    callback (a :class:`LookupRecord` per lookup). Answers held by a member (pre-warmed or
    cached by TTL) are served first, even while that member is set aside.
    """

    def __init__(
        self,
        *resolvers: AbstractResolver,
        names: Sequence[str] | None = None,
        backoff: float = 5.0,
        max_backoff: float = 60.0,
        max_failures: int = 1,
        max_timeouts: int = DEFAULT_MAX_TIMEOUTS,
        attempt_timeout: float | None = DEFAULT_ATTEMPT_TIMEOUT,
        stall_timeout: float | None = DEFAULT_STALL_TIMEOUT,
        failover_on_servfail: bool = False,
        on_lookup: Callable[[LookupRecord], None] | None = None,
        close_resolvers: bool = True,
        remember_hosts: int = 4096,
    ) -> None:
        if not resolvers:
            from .resolver import sidecar_resolver

            resolvers = (sidecar_resolver(), ThreadedResolver())
            names = names or [getattr(resolvers[0], "name", "sidecar"), "system"]
        if names is not None and len(names) != len(resolvers):
            raise ValueError("names must match resolvers one to one")
        self.states = [
            ResolverState(names[i] if names else _default_name(r, i), r)
            for i, r in enumerate(resolvers)
        ]
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_failures = max(1, max_failures)
        self.max_timeouts = max(1, max_timeouts)
        self.attempt_timeout = attempt_timeout
        self.stall_timeout = stall_timeout
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
        """Per resolver: name, ``available``, ``aside_for`` (seconds left), ``reason``
        and the counters; plain JSON values."""
        now = time.monotonic()
        return [
            {
                "name": s.name,
                "available": s.available(now),
                "aside_for": max(0.0, s.aside_until - now),
                "reason": s.reason,
                "answers": s.answers,
                "negative": s.negative,
                "failures": s.failures,
                "timeouts": s.timeouts,
                "rcode_failovers": s.rcode_failovers,
                "set_aside": s.set_aside,
                "health_checks": s.health_checks,
                "pending": len(s.pending),
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

    def _set_aside(self, state: ResolverState, reason: str) -> None:
        now = time.monotonic()
        if not state.available(now):
            return  # already aside (concurrent lookups do not stretch the period)
        state.backoff = min(self.max_backoff, state.backoff * 2 if state.backoff else self.backoff)
        state.aside_until = now + state.backoff
        state.set_aside += 1
        state.reason = reason
        state.timed_out.clear()
        state.consecutive_failures = 0
        log.warning("resolver %s %s: set aside for %.1f s", state.name, reason, state.backoff)
        if state.pending:
            loop = asyncio.get_running_loop()
            for attempt in list(state.pending):
                attempt.abandoned = True  # move it on to the next resolver now
                attempt.timeout.reschedule(loop.time())

    def _answered_ok(self, state: ResolverState) -> None:
        state.answers += 1
        state.last_answer = time.monotonic()
        state.consecutive_failures = 0
        state.timed_out.clear()
        if state.backoff:
            log.info("resolver %s answers again", state.name)
        state.backoff = 0.0
        state.aside_until = 0.0
        state.reason = None

    def _unreachable(self, state: ResolverState) -> None:
        state.failures += 1
        state.consecutive_failures += 1
        if state.consecutive_failures >= self.max_failures:
            self._set_aside(state, UNREACHABLE)

    def _timed_out(self, state: ResolverState, attempt: _Attempt) -> None:
        state.failures += 1
        state.timeouts += 1
        if state.last_answer >= attempt.started:
            return  # it answered something meanwhile: a slow name, not a down resolver
        state.timed_out.add(attempt.host)
        if len(state.timed_out) >= self.max_timeouts:
            self._set_aside(state, f"{len(state.timed_out)} names timed out, nothing answered")

    def _watch(self, state: ResolverState) -> None:
        """Arm the stall check of ``state`` (one timer per resolver, while lookups wait)."""
        if (self.stall_timeout is None or state.watchdog is not None
                or not callable(getattr(state.resolver, "check_health", None))):
            return
        loop = asyncio.get_running_loop()
        state.watchdog = loop.call_later(self.stall_timeout, self._stall_check, state)

    def _stall_check(self, state: ResolverState) -> None:
        state.watchdog = None
        if not state.pending or self.stall_timeout is None:
            return
        now = time.monotonic()
        quiet_since = max(state.last_answer, min(a.started for a in state.pending))
        if now - quiet_since >= self.stall_timeout and state.checking is None:
            state.checking = asyncio.ensure_future(self._health_check(state, now))
        loop = asyncio.get_running_loop()
        delay = max(0.01, quiet_since + self.stall_timeout - now) if now - quiet_since < \
            self.stall_timeout else self.stall_timeout
        state.watchdog = loop.call_later(delay, self._stall_check, state)

    async def _health_check(self, state: ResolverState, asked: float) -> None:
        try:
            state.health_checks += 1
            healthy = await state.resolver.check_health()  # type: ignore[attr-defined]
            if healthy is False and state.last_answer < asked and state.pending:
                self._set_aside(state, "health check failed")
        except Exception:  # a broken check is no evidence either way
            log.exception("health check of %s failed to run", state.name)
        finally:
            state.checking = None

    # -- AbstractResolver -----------------------------------------------------------

    async def _attempt(self, state: ResolverState, attempt: _Attempt, host: str, port: int,
                       family: int) -> list[ResolveResult]:
        state.pending.add(attempt)
        self._watch(state)
        try:
            async with attempt.timeout:
                return await state.resolver.resolve(host, port, family)  # type: ignore[arg-type]
        except TimeoutError as exc:
            if attempt.abandoned:
                raise _Abandoned() from None
            if attempt.timeout.expired():
                assert self.attempt_timeout is not None
                raise ResolverTimeout(state.name, self.attempt_timeout) from exc
            raise
        finally:
            state.pending.discard(attempt)

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
            if not state.available(time.monotonic()):
                attempts.append((state.name, SET_ASIDE))
                continue
            attempt = _Attempt(host.rstrip(".").lower(), time.monotonic(),
                               asyncio.timeout(self.attempt_timeout))
            try:
                result = await self._attempt(state, attempt, host, port, family)
            except _Abandoned:
                attempts.append((state.name, SET_ASIDE))
                continue
            except Exception as exc:
                outcome = _outcome(exc)
                if outcome is None:
                    raise
                if outcome in (SERVFAIL, REFUSED):
                    if not self.failover_on_servfail:
                        outcome = ANSWER  # the resolver answered; the name failed
                    else:
                        self._answered_ok(state)
                        state.rcode_failovers += 1
                        attempts.append((state.name, outcome))
                        last_exc = exc
                        continue
                if outcome == ANSWER:
                    self._answered_ok(state)
                    state.negative += 1
                    attempts.append((state.name, ANSWER))
                    self._report(host, state.name, ANSWER, attempts, started)
                    raise
                attempts.append((state.name, outcome))
                last_exc = exc
                if outcome == TIMEOUT:
                    self._timed_out(state, attempt)
                else:
                    self._unreachable(state)
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
        """An answer held by any member resolver (pre-warmed or cached by TTL), or ``None``.

        Synchronous (no I/O); valid even while that member is set aside. Raises
        ``OSError`` for a held NXDOMAIN/NODATA, like a lookup would.
        """
        for state in self.states:
            lookup = getattr(state.resolver, "lookup_prewarmed", None)
            if lookup is None:
                continue
            try:
                held = lookup(host, port, family)
            except OSError:
                self._report(host, f"{state.name}/prewarm", ANSWER, [], time.perf_counter())
                raise
            if held is not None:
                table = getattr(state.resolver, "prewarmed", None)
                source = getattr(table, "last_source", "prewarm")
                suffix = "prewarm" if source == "prewarm" else "cache"
                self._report(host, f"{state.name}/{suffix}", ANSWER, [], time.perf_counter())
                return held
        return None

    async def close(self) -> None:
        """Stop the health checks; close every member (unless ``close_resolvers=False``)."""
        for state in self.states:
            if state.watchdog is not None:
                state.watchdog.cancel()
                state.watchdog = None
            if state.checking is not None:
                state.checking.cancel()
        if not self.close_resolvers:
            return
        for state in self.states:
            await state.resolver.close()

    # -- pre-warm -------------------------------------------------------------------

    async def prewarm(self, hosts: Iterable[str], **kwargs: Any) -> PrewarmResult:
        """Pre-warm through the first member resolver that has ``prewarm()`` (the sidecar).

        Never raises (pre-warming is an optimisation): any error, a failed call, bad
        arguments or a resolver without an API, is logged and returned in
        ``PrewarmResult.error`` with whatever was warmed before it; the lookups then go
        through the normal failover path.
        """
        for state in self.states:
            prewarm = getattr(state.resolver, "prewarm", None)
            if prewarm is None:
                continue
            try:
                return await prewarm(hosts, **kwargs)
            except Exception as exc:
                log.warning("prewarm through %s failed: %s", state.name, exc)
                partial = getattr(exc, "result", None)
                result = partial if isinstance(partial, PrewarmResult) else PrewarmResult()
                result.error = f"{type(exc).__name__}: {exc}"
                return result
        return PrewarmResult(error="no resolver in the chain supports prewarm")

    def __repr__(self) -> str:
        return f"<FailoverResolver {[s.name for s in self.states]}>"


class _Abandoned(Exception):
    """The attempt was left because its resolver was set aside meanwhile."""


def failover_resolver(
    address: str | Sequence[str] = "127.0.0.1:5353",
    *,
    fallback_nameservers: Sequence[str] | None = None,
    threaded: bool = True,
    fallback_timeout: float = 2.0,
    fallback_tries: int = 2,
    sidecar_kwargs: dict[str, Any] | None = None,
    **kwargs: Any,
) -> FailoverResolver:
    """The usual chain: the sidecar, then the system's resolver.

    ``FailoverResolver(sidecar_resolver(address, **sidecar_kwargs), ThreadedResolver())``.
    ``fallback_nameservers`` (none by default) puts an ``AsyncResolver`` on those
    nameservers between the two (``timeout=fallback_timeout``, ``tries=fallback_tries``):
    only name public resolvers if internal names (the ones the sidecar's ``--zone``
    routes to an internal resolver) may leave the network. ``threaded=False`` leaves the
    system resolver out. Other keywords go to :class:`FailoverResolver`. Needs a running
    loop.
    """
    from aiohttp.resolver import AsyncResolver

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
        names.append("nameservers@" + ",".join(fallback_nameservers))
    if threaded:
        resolvers.append(ThreadedResolver())
        names.append("system")
    return FailoverResolver(*resolvers, names=names, **kwargs)
