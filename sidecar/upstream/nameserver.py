"""One upstream nameserver: its own c-ares channel, outcome counters, latency and health."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import aiodns
from aiodns.error import DNSError
from pycares.errno import (
    ARES_EBADNAME,
    ARES_EBADRESP,
    ARES_ECANCELLED,
    ARES_ECONNREFUSED,
    ARES_ENODATA,
    ARES_ENOTFOUND,
    ARES_EREFUSED,
    ARES_ESERVFAIL,
    ARES_ETIMEOUT,
    ARES_SUCCESS,
    strerror,
)

from sidecar.config import HostPort
from sidecar.dns.types import FORWARDABLE, Rcode, RRType
from sidecar.errors import UpstreamError
from sidecar.upstream import query as caresquery
from sidecar.upstream.cares import make_resolver
from sidecar.upstream.health import Health
from sidecar.upstream.latency import LatencyTracker
from sidecar.upstream.records import Answer, rec_from_pycares

log = logging.getLogger("sidecar.upstream")
errlog = logging.getLogger("sidecar.resolver_errors")

# Plain ints (not IntEnum members): Answer.rcode ends up in cache entries, which must stay
# tuples of atomic values (see sidecar.dns.cache.Entry).
NOERROR = int(Rcode.NOERROR)
NXDOMAIN = int(Rcode.NXDOMAIN)

#: c-ares status codes (pycares.errno) -> the failure kind they count as.
_FAILURE_KINDS = {ARES_ESERVFAIL: "servfail", ARES_EREFUSED: "refused",
                  ARES_ECONNREFUSED: "unreachable", ARES_ETIMEOUT: "timeout"}
#: Failures that say the server itself is not usable (they count towards quarantine).
#: SERVFAIL and REFUSED do not: both are often about one name (broken authorities, a policy
#: zone), and a resolver that answers at all is alive. They still fail over to the next server.
NETWORK_FAILURES = frozenset(("timeout", "unreachable"))
#: At most one resolver-error log line per server and kind in this many seconds.
LOG_EVERY = 1.0

#: Stands for "no answer within the try's timeout" where a c-ares status is expected.
_TIMED_OUT = -1
#: Replies that c-ares records in the server's RTT metrics (NOERROR or NXDOMAIN answers).
_ANSWERED = (ARES_SUCCESS, ARES_ENODATA, ARES_ENOTFOUND)
#: A fresh c-ares channel times a query with its configured timeout until the server has
#: this many answers in its metrics (c-ares ares_metrics.c ``MIN_COUNT_FOR_AVERAGE``).
CARES_MIN_COUNT = 3
#: Below this much time left in a try, a c-ares timeout ends the try instead of resending.
RESEND_MIN = 0.02
#: Once c-ares times the server's packets from its RTTs, a try still unanswered after this
#: share of it (at least c-ares' 250 ms floor) is resent, so the resend has most of the try.
RESEND_SHARE = 0.125


def _strerror(code: int) -> str:
    """c-ares' message for a status code (pycares may hand it over as bytes)."""
    msg = strerror(code)
    return msg if isinstance(msg, str) else msg.decode("latin-1")


def _fallback_result(fut: asyncio.Future) -> tuple[int, Any]:
    """(code, sections) of a finished ``_ask_query_dns`` task."""
    if fut.cancelled():
        return ARES_ECANCELLED, None
    if fut.exception() is not None:
        return ARES_EBADRESP, None
    return fut.result()


class _Channel:
    """A c-ares channel for resends, counting the answers c-ares has measured on it.

    c-ares times each packet by itself: max(250 ms, 5 x the server's mean RTT) once it has
    a few answers, so after fast answers a 1.5 s reply always arrives after c-ares gave up
    on its socket (and, one query per socket, that socket is closed). A channel with fewer
    than :data:`CARES_MIN_COUNT` measured answers still uses the configured timeout; resends
    go to such a channel, and a channel that has measured enough takes no new ones.
    """

    __slots__ = ("answers", "inflight", "resolver")

    def __init__(self, resolver: aiodns.DNSResolver) -> None:
        self.resolver = resolver
        self.answers = 0
        self.inflight = 0

    @property
    def fresh(self) -> bool:
        return self.answers < CARES_MIN_COUNT


def resend_delay(timeout: float) -> float:
    """When a try of ``timeout`` seconds on a measured channel is resent at the latest."""
    return min(timeout, max(0.25, RESEND_SHARE * timeout))


class _Try:
    """One query to one server in flight: ``out`` gets its outcome, from c-ares' reply
    (``reply``) or from the timer (``expire``), whichever comes first.

    The first packet goes out on the server's main channel. Until that channel has a few
    answers, c-ares waits the whole try for it. After that, c-ares gives up on a packet
    after max(250 ms, 5 x the mean RTT) and closes its socket (one query per socket), so a
    slower answer would be lost: the question is then sent once more (a new socket, so a new
    port) on a fresh channel whose c-ares timeout is the try's own, when c-ares gives up or
    after :func:`resend_delay`, whichever is first; the first packet stays open until c-ares
    gives up on it, and the first answer to either wins. A lost packet is resent after
    c-ares' short timeout, and an answer that takes up to the try less the resend delay
    (with the default 2 s: 1.75 s) is still accepted.
    """

    __slots__ = ("deadline", "hedge", "name", "out", "pending", "qtype", "resent", "t0",
                 "timeout", "timer", "upstream")

    def __init__(self, upstream: Upstream, out: asyncio.Future, name: str, qtype: int,
                 timeout: float) -> None:
        self.upstream, self.out, self.name, self.qtype = upstream, out, name, qtype
        self.timeout = timeout
        self.t0 = time.monotonic()
        self.deadline = self.t0 + timeout
        self.timer: asyncio.TimerHandle | None = None
        self.hedge: asyncio.TimerHandle | None = None
        self.resent = False
        self.pending = 1  # packets whose c-ares query has not called back

    def first(self, code: int, sections: Any) -> None:
        """The main channel's reply to the first packet."""
        if code in _ANSWERED:
            self.upstream._main_answers += 1
        self.reply(code, sections)

    def reply(self, code: int, sections: Any) -> None:
        self.pending -= 1
        if code == ARES_ETIMEOUT:
            if self.pending:
                return  # c-ares gave up on one packet; the other may still be answered
            if not self.resent and self.resend():
                return
        if self.timer is not None:
            self.timer.cancel()
        if self.hedge is not None:
            self.hedge.cancel()
        self.upstream._complete(self, code, sections)

    def resend(self) -> bool:
        """Send the question again on a fresh channel, if the try has time left."""
        self.hedge = None
        if (self.resent or self.out.done()
                or self.deadline - time.monotonic() <= RESEND_MIN
                or not self.upstream._resend(self)):
            return False
        self.resent = True
        self.pending += 1
        return True

    def expire(self) -> None:
        if self.hedge is not None:
            self.hedge.cancel()
        self.upstream._complete(self, _TIMED_OUT, None)


OUTCOMES = ("ok", "nxdomain", "nodata", "servfail", "refused", "timeout", "unreachable", "error")


class Upstream:
    """A nameserver of a pool. ``query`` returns an :class:`Answer` or raises
    :class:`UpstreamError`; every outcome is counted and timed here."""

    def __init__(self, addr: HostPort, pool: str, timeout: float, *,
                 case_randomize: bool = False) -> None:
        self.addr = addr
        self.address = str(addr)
        self.pool = pool
        self.timeout = timeout
        #: ``--upstream-0x20``: mixed-case questions, replies must echo the case.
        self.case_randomize = case_randomize
        self._resolver: aiodns.DNSResolver | None = None
        self._resend_channel: _Channel | None = None
        self._retired: set[_Channel] = set()
        self._closing: set[asyncio.Task] = set()
        self._main_answers = 0  # answers c-ares has measured on the main channel
        self.resends = 0  # second packets of a try (see _Try)
        self.queries = 0
        #: The tries in flight: each :meth:`start` future until its outcome is in (counted
        #: and timed), whether or not anyone still waits for it.
        self.tries: set[asyncio.Future[Answer]] = set()
        self.outcomes = dict.fromkeys(OUTCOMES, 0)
        self.latency = LatencyTracker()
        self.health = Health()
        self.probes = 0
        self.closed = False
        self._logged: dict[str, tuple[float, int]] = {}
        #: Called with this upstream after each health transition (quarantined, or healthy
        #: again), once :attr:`state` shows the new state. A listener must not raise.
        self.state_listeners: list[Callable[[Upstream], None]] = []

    @property
    def inflight(self) -> int:
        """Tries to this server in flight (hedged losers included)."""
        return len(self.tries)

    @property
    def state(self) -> str:
        return self.health.state

    def _state_changed(self) -> None:
        for listener in list(self.state_listeners):
            listener(self)

    @property
    def resolver(self) -> aiodns.DNSResolver:
        # Created lazily: aiodns binds the running loop at construction.
        if self._resolver is None:
            if self.closed:
                raise UpstreamError("closed", "the sidecar is stopping", self.address)
            self._resolver = self._make_resolver()
            self._main_answers = 0
        return self._resolver

    def _make_resolver(self, max_timeout: float | None = None) -> aiodns.DNSResolver:
        return make_resolver(self.address, self.timeout, case_randomize=self.case_randomize,
                             max_timeout=max_timeout)

    def _fresh_channel(self) -> _Channel:
        """The channel for resends and probes (see :class:`_Channel`)."""
        if self.closed:
            raise UpstreamError("closed", "the sidecar is stopping", self.address)
        ch = self._resend_channel
        if ch is None or not ch.fresh:
            if ch is not None:
                self._retire(ch)
            ch = self._resend_channel = _Channel(self._make_resolver())
        return ch

    def _retire(self, ch: _Channel) -> None:
        if ch.inflight:
            self._retired.add(ch)
        else:
            self._close_later(ch)

    def _close_later(self, ch: _Channel) -> None:
        task = asyncio.get_running_loop().create_task(ch.resolver.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _submit_fresh(self, name: str, qtype: int, done: Any) -> None:
        """Send on the fresh channel; ``done(code, sections)`` as for ``caresquery.submit``."""
        ch = self._fresh_channel()

        def settled(code: int, sections: Any) -> None:
            ch.inflight -= 1
            if code in _ANSWERED:
                ch.answers += 1
            if not ch.inflight and ch in self._retired:
                self._retired.discard(ch)
                if not self.closed:
                    self._close_later(ch)
            done(code, sections)

        ch.inflight += 1
        try:
            caresquery.submit(ch.resolver._channel, name, qtype, settled)
        except BaseException:
            ch.inflight -= 1
            raise

    def _resend(self, attempt: _Try) -> bool:
        """Send ``attempt``'s question on a fresh channel; False if that cannot be done."""
        try:
            self._submit_fresh(attempt.name, attempt.qtype, attempt.reply)
        except (RuntimeError, UpstreamError):
            return False
        self.resends += 1
        return True

    def start(self, name: str, qtype: int, timeout: float | None = None
              ) -> asyncio.Future[Answer]:
        """Send one try now, of at most ``timeout`` seconds (default: the server's; c-ares may
        retransmit inside it); ``qtype`` is the type number. The future gets the
        :class:`Answer` or an :class:`UpstreamError`.

        A future, not a task: the pool runs and races tries without a task per try, and the
        reply settles it in the same loop pass that read it. Cancelling the future only stops
        waiting (the c-ares query ends by itself).
        """
        timeout = self.timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        out: asyncio.Future[Answer] = loop.create_future()
        self.queries += 1
        self.tries.add(out)
        attempt = _Try(self, out, name, qtype, timeout)
        try:
            resolver = self.resolver
            if caresquery.AVAILABLE:
                attempt.timer = loop.call_later(timeout, attempt.expire)
                caresquery.submit(resolver._channel, name, qtype, attempt.first)
                if self._main_answers >= CARES_MIN_COUNT and not attempt.out.done():
                    # c-ares now times the packet from RTTs and may give up on it long
                    # before the try ends: resend by this time at the latest.
                    attempt.hedge = loop.call_later(resend_delay(timeout), attempt.resend)
            else:
                inner = asyncio.ensure_future(self._ask_query_dns(resolver, name, qtype, timeout))
                inner.add_done_callback(lambda f: self._complete(attempt, *_fallback_result(f)))
        except (RuntimeError, UpstreamError):
            if attempt.timer is not None:
                attempt.timer.cancel()
            self.tries.discard(out)
            out.set_exception(UpstreamError("closed", "channel closed", self.address))
        return out

    def _complete(self, attempt: _Try, code: int, sections: Any) -> None:
        out = attempt.out
        self.tries.discard(out)
        if out.done():
            return  # timed out already, or cancelled at shutdown: nobody waits for this
        try:
            out.set_result(self._outcome(code, sections, attempt))
        except UpstreamError as exc:
            out.set_exception(exc)

    def _outcome(self, code: int, sections: Any, attempt: _Try) -> Answer:
        elapsed = time.monotonic() - attempt.t0
        name, qtype = attempt.name, attempt.qtype
        if code == _TIMED_OUT:
            raise self._fail("timeout", f"no answer in {attempt.timeout:.3g}s", name, qtype,
                             elapsed)
        answer, authority = sections or ((), ())
        if code == ARES_SUCCESS:
            self._ok("ok", elapsed)
            return Answer(NOERROR, list(answer), list(authority))
        if code == ARES_ENOTFOUND:
            self._ok("nxdomain", elapsed)
            return Answer(NXDOMAIN, list(answer), list(authority))
        if code == ARES_ENODATA:
            self._ok("nodata", elapsed)
            # A CNAME chain that ends in NODATA is reported as success by c-ares, so the
            # answer section is empty here.
            return Answer(NOERROR, [], list(authority))
        if code == ARES_ECANCELLED:
            # The channel was closed under us (shutdown): not the server's fault.
            raise UpstreamError("closed", "query cancelled", self.address)
        if code == ARES_EBADNAME:
            # Our name, not the server: no health penalty.
            self.outcomes["error"] += 1
            raise UpstreamError("badname", _strerror(code), self.address)
        kind = _FAILURE_KINDS.get(code, "error")
        raise self._fail(kind, _strerror(code), name, qtype, elapsed)

    async def _ask_query_dns(self, resolver: aiodns.DNSResolver, name: str, qtype: int,
                             timeout: float) -> tuple[int, Any]:
        """The ``query_dns`` path (no authority for NXDOMAIN/NODATA), for when
        :mod:`caresquery` cannot reach pycares's internals."""
        try:
            result = await asyncio.wait_for(resolver.query_dns(name, FORWARDABLE[qtype]),
                                            timeout)
        except TimeoutError:
            return _TIMED_OUT, None
        except DNSError as exc:
            return (exc.args[0] if exc.args else ARES_EBADRESP), None
        recs = [r for r in map(rec_from_pycares, result.answer) if r is not None]
        auth = [r for r in map(rec_from_pycares, result.authority) if r is not None]
        return ARES_SUCCESS, (recs, auth)

    def _ok(self, outcome: str, elapsed: float) -> None:
        self.outcomes[outcome] += 1
        self.latency.observe(elapsed)
        if self.health.success():
            log.info("upstream %s (pool %s) is healthy again", self.address, self.pool)
            self._state_changed()

    def _fail(self, kind: str, message: str, name: str, qtype: int,
              elapsed: float) -> UpstreamError:
        self.outcomes[kind] += 1
        if kind == "timeout":
            self.latency.penalize(elapsed)
        # Resolver errors get their own logger so they can be routed and counted apart
        # from everything else ("a DNSError is not a ClientConnectorError").
        now = time.monotonic()
        last, suppressed = self._logged.get(kind, (0.0, 0))
        if now - last >= LOG_EVERY:
            errlog.warning("upstream %s (pool %s) %s for %s/%s: %s%s", self.address, self.pool,
                           kind, name, FORWARDABLE.get(qtype, qtype), message,
                           f" (+{suppressed} more since last line)" if suppressed else "")
            self._logged[kind] = (now, 0)
        else:
            self._logged[kind] = (last, suppressed + 1)
        if kind in NETWORK_FAILURES and self.health.failure(kind):
            self._quarantined(kind)
        return UpstreamError(kind, message, self.address)

    def _quarantined(self, kind: str) -> None:
        log.warning("upstream %s (pool %s) quarantined after %d consecutive failures (%s)",
                    self.address, self.pool, self.health.consecutive_failures, kind)
        self._state_changed()

    async def probe(self) -> None:
        """One health probe (``. NS``, as CoreDNS's forward plugin sends); updates health.

        Any DNS answer, even SERVFAIL or REFUSED, proves the server is alive; only silence
        or an unreachable port counts as a failure.
        """
        self.probes += 1
        failure = None
        try:
            if caresquery.AVAILABLE:
                # On a fresh channel: its c-ares timeout is the configured one, so a server
                # that is slow, not dead, passes (the main channel may give up at 250 ms).
                fut = asyncio.get_running_loop().create_future()

                def done(code: int, _sections: Any) -> None:
                    if not fut.done():
                        fut.set_result(code)

                self._submit_fresh(".", int(RRType.NS), done)
                code = await asyncio.wait_for(fut, self.timeout)
            else:
                await asyncio.wait_for(self.resolver.query_dns(".", "NS"), self.timeout)
                code = ARES_SUCCESS
        except TimeoutError:
            code = ARES_ETIMEOUT
        except DNSError as exc:
            code = exc.args[0] if exc.args else ARES_EBADRESP
        except (RuntimeError, UpstreamError):
            return  # closed under us
        if code == ARES_ECANCELLED:
            return
        if code == ARES_ECONNREFUSED:
            failure = "unreachable"
        elif code == ARES_ETIMEOUT:
            failure = "timeout"
        if failure is None:
            if self.health.success():
                log.info("upstream %s (pool %s) passed its probe: healthy", self.address,
                         self.pool)
                self._state_changed()
        elif self.health.probe_failed(failure):
            self._quarantined(failure)

    async def close(self) -> None:
        self.closed = True
        resolvers = [ch.resolver for ch in (self._resend_channel, *self._retired)
                     if ch is not None]
        if self._resolver is not None:
            resolvers.append(self._resolver)
        self._resolver = self._resend_channel = None
        self._retired = set()
        for resolver in resolvers:
            try:
                await resolver.close()
            except Exception:  # pragma: no cover - best effort at shutdown
                pass
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
