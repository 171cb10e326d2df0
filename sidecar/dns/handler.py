"""The query handler: one DNS message in, one reply (or nothing) out.

``handle`` is the hot path. It reads the question by the fast parse (the common shape only)
or the full one; a fresh cache hit is then answered synchronously from the entry's encoded
bytes: the client's ID and question bytes (letter case kept, for DNS 0x20) in front of the
cached sections. A miss returns a :class:`PendingReply`: the listener dispatches it with a
way to send (its transport); the reply subscribes to the fetch (shared by every client
asking for the same key) and sends what it renders once the fetch is done; no task per
waiting client.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Final

from sidecar.dns.acl import Acl
from sidecar.dns.cache import (
    AGE,
    BODY,
    EXPIRES,
    HDR,
    HDR_EDNS,
    PREFETCH_AT,
    RCODE,
    STORED,
    Cache,
    RawEntry,
    render,
    stale_body,
)
from sidecar.dns.misspath import MissPath, Outcome
from sidecar.dns.ratelimit import RateLimiter
from sidecar.dns.types import FORWARDABLE, RRType
from sidecar.dns.wire import (
    BADVERS,
    CLASS_IN,
    FORMERR,
    MIN_UDP_PAYLOAD,
    NOERROR,
    NOTIMP,
    OPT_FIXED,
    OPT_RR,
    REFUSED,
    SERVFAIL,
    TYPE_OPT,
    ParsedQuery,
    error_reply,
    header_only_reply,
    parse_query,
)
from sidecar.errors import WireError

_B2 = (b"\x80", b"\x81")  # QR, plus RD copied from the query
_B2_TC = (b"\x82", b"\x83")
_TC_TAIL = (b"\x00\x01\x00\x00\x00\x00\x00\x00", b"\x00\x01\x00\x00\x00\x00\x00\x01")
TYPE_AAAA: Final = int(RRType.AAAA)
# Header counts of the fast parse's shape: QDCOUNT=1, no answer or authority records, and
# no additional record or one (the OPT).
_ONE_Q = b"\x00\x01\x00\x00\x00\x00\x00\x00"
_ONE_Q_OPT = b"\x00\x01\x00\x00\x00\x00\x00\x01"
#: Slots of ``QueryHandler.rcodes``: every 4-bit RCODE and the extended ones we send
#: (BADVERS).
_RCODE_SLOTS = 24


def _track(pending: set[asyncio.Future[Any]], fut: asyncio.Future[Any]) -> None:
    """Keep ``fut`` (a fetch, maybe shared by several clients) in ``pending`` until done,
    so a drain can wait for it."""
    if fut not in pending:
        pending.add(fut)
        fut.add_done_callback(pending.discard)


class PendingReply:
    """A miss. Nothing happens until it is started, which begins (or joins) the fetch for
    its key: a future shared with every client asking for the same key, so never cancel it.
    Dropping an unstarted PendingReply costs nothing.

    Listeners call :meth:`dispatch` with their way to send; :meth:`start` and :meth:`reply`
    are its two halves, for callers that drive the fetch themselves.
    """

    __slots__ = ("data", "deliver", "failed", "handler", "host", "q", "started", "tcp")
    # Set by dispatch() only.
    deliver: Callable[[bytes | None], None]
    failed: Callable[[str], None]

    def __init__(self, handler: QueryHandler, data: bytes, q: ParsedQuery, tcp: bool,
                 host: str = "") -> None:
        self.handler, self.data, self.q, self.tcp, self.host = handler, data, q, tcp, host
        self.started = False

    def dispatch(self, pending: set[asyncio.Future[Any]], deliver: Callable[[bytes | None], None],
                 failed: Callable[[str], None]) -> bool:
        """Start the fetch, keep it in ``pending`` (the listener's, for its drain) until done,
        and once it is call ``deliver`` with this client's reply (None: send nothing).

        ``failed(host)`` is called, inside the ``except`` block (so it can log the
        traceback), when the miss path raises: then ``deliver`` gets None, or, when the
        fetch could not even start, is never called and dispatch returns False. Needs the
        running event loop.
        """
        try:
            fut = self.start()
        except Exception:  # never let one query take the listener down
            failed(self.host)
            return False
        _track(pending, fut)
        self.deliver, self.failed = deliver, failed
        fut.add_done_callback(self._done)
        return True

    def _done(self, fut: asyncio.Future[Outcome]) -> None:
        reply = None
        try:
            reply = self.reply(fut)
        except Exception:
            self.failed(self.host)
        finally:
            self.deliver(reply)  # always: a TCP connection counts its replies still due

    def start(self) -> asyncio.Future[Outcome]:
        """Begin or join the fetch and return its future. Needs the running event loop."""
        fut = self.handler.resolver.lookup(self.q.key)
        # Counted once started (an unstarted reply costs nothing), released in reply().
        self.started = True
        waiting = self.handler.client_pending
        waiting[self.host] = waiting.get(self.host, 0) + 1
        return fut

    def reply(self, fut: asyncio.Future[Outcome]) -> bytes | None:
        """The answer, once ``fut`` (what ``start()`` returned) is done (None: stay
        silent)."""
        if self.started:
            self.started = False
            waiting = self.handler.client_pending
            left = waiting.get(self.host, 1) - 1
            if left > 0:
                waiting[self.host] = left
            else:
                waiting.pop(self.host, None)
        if fut.cancelled():
            return None  # cancelled at shutdown
        return self.handler._finish_miss(self.data, self.q, self.tcp, fut)


Reply = bytes | None | PendingReply

#: Default bound on one client's misses waiting for an upstream, per ``--max-inflight``
#: upstream slot. Generous on purpose: every crawler process on a pod shares 127.0.0.1, and
#: a burst of cold names (A and AAAA each) must pass; what this stops is one address parking
#: an unbounded number of waiters (memory, and the shared queue) behind slow names.
PENDING_PER_CLIENT_PER_SLOT = 4


class QueryHandler:
    """Answers queries from the cache and hands misses to the miss path.

    Counters (read by the stats API): ``rcodes`` (replies per RCODE), ``dropped`` (no reply:
    QR=1 or unreadable header), ``truncated`` (UDP replies sent with TC=1), ``ratelimited``
    (dropped by the rate limit), ``client_shed`` (SERVFAIL because the client already had
    ``max_pending_per_client`` misses waiting).

    "Now" is the cache's clock (:attr:`Cache.clock`), bound once here.
    """

    def __init__(self, cache: Cache, resolver: MissPath, *, acl: Acl | None = None,
                 no_aaaa: bool = False, ratelimit: RateLimiter | None = None,
                 max_udp_size: int = 1232, max_pending_per_client: int | None = None) -> None:
        #: ``--max-udp-size``: cap on any UDP reply, whatever the client advertises.
        self.max_udp_size = max(int(max_udp_size), MIN_UDP_PAYLOAD)
        #: Queries dropped by the rate limit (no reply at all).
        self.ratelimited = 0
        #: Misses started and not yet answered, per client address (UDP and TCP together).
        self.client_pending: dict[str, int] = {}
        if max_pending_per_client is None:
            slots = resolver.max_inflight or 1024
            max_pending_per_client = max(1000, PENDING_PER_CLIENT_PER_SLOT * slots)
        self.max_pending_per_client = max_pending_per_client
        self.client_shed = 0
        self.cache = cache
        self.resolver = resolver
        self.acl = acl or Acl(())
        self.no_aaaa = no_aaaa
        self.ratelimit = ratelimit
        self.rcodes = [0] * _RCODE_SLOTS
        # Bound methods for the hot path: each saves an attribute walk per query.
        self._get = cache.entries.get
        self._touch = cache.used.add
        self._now = cache.clock
        self._acl_get = self.acl.remembered
        self.dropped = 0
        self.truncated = 0
        self.denied = 0

    def handle(self, data: bytes, host: str, tcp: bool, fast: bool = True) -> Reply:
        """Answer one message from ``host`` (the client's IP as a string).

        Returns the reply bytes, None to stay silent, or a :class:`PendingReply`.
        ``fast=False`` skips the fast parse (tests hold the two parses to the same answers).
        """
        # Fast parse, for the common shape: QUERY, one question, no record or one OPT (with
        # version 0, ending the message), the client's verdict memoized, a fresh entry.
        # It guesses where the question ends instead of walking labels: at the message's end,
        # or where an OPT without options would start, else after the name's first zero
        # byte. A wrong guess only misses, and the full parse judges the message: a key
        # found in the cache is a valid question, which the full parse would read to the
        # same end.
        e: RawEntry | None = None
        n = len(data)
        if fast and n > 17 and not data[2] & 0xF8:
            counts = data[4:12]
            qend = 0
            if counts == _ONE_Q:
                qend, edns, udp_size = n, 0, MIN_UDP_PAYLOAD
            elif counts == _ONE_Q_OPT:
                o = n - 11  # where an OPT without options starts: the usual query
                if data[n - 2] or data[n - 1]:
                    o = data.find(0, 12) + 5  # it carries options: it starts after the name
                if o + 11 <= n:
                    root, rtype, size, _ext, version, _flags, rdlen = OPT_FIXED.unpack_from(data, o)
                    if not root and rtype == TYPE_OPT and not version and o + 11 + rdlen == n:
                        # Not floored at 512 here: _reply sends anything up to 512 bytes
                        # before it looks at the advertised size.
                        qend, edns, udp_size = o, 1, size
            if qend > 17:
                question = data[12:qend]
                key = question.lower()
                e = self._get(key)
                if e is not None:
                    now = self._now()
                    if now < e[EXPIRES] and self._acl_get(host):
                        if self.ratelimit is not None and not self.ratelimit.allow(host):
                            self.ratelimited += 1
                            return None
                    else:
                        e = None
        if e is None:
            # Full parse: everything the fast one does not answer.
            q = self._admit(data, host)
            if not isinstance(q, ParsedQuery):
                return q
            key = q.key
            e = self._get(key)
            if e is None or not (now := self._now()) < e[EXPIRES]:
                return self._not_cached(data, q, tcp, host)
            question, edns, udp_size = data[12 : q.qend], q.edns, q.udp_size
        # A fresh hit.
        self._touch(key)
        self.cache.hits += 1
        age = int(now - e[STORED])
        body = e[BODY] if age == e[AGE] else self.cache.rendered_body(key, e, age)
        if now > e[PREFETCH_AT]:
            self.resolver.prefetch(key, e)
        self.rcodes[e[RCODE]] += 1
        return self._reply(data, question, edns, udp_size, e, body, tcp)

    def _admit(self, data: bytes, host: str) -> ParsedQuery | bytes | None:
        """The full parse and every check before the cache: the query to look up, or the
        reply (None: silence)."""
        if len(data) < 12 or data[2] & 0x80:
            self.dropped += 1  # unreadable header, or a response: never answered
            return None
        # Before any reply, NOTIMP and FORMERR included: silence for a rate-limited client,
        # or junk packets from a spoofed source would still be reflected.
        if self.ratelimit is not None and not self.ratelimit.allow(host):
            self.ratelimited += 1
            return None
        if data[2] & 0x78:
            self.rcodes[NOTIMP] += 1
            return header_only_reply(data, NOTIMP)
        try:
            q = parse_query(data)
        except WireError:
            self.rcodes[FORMERR] += 1
            return header_only_reply(data, FORMERR)
        if not self.acl.allowed(host):
            self.denied += 1
            self.rcodes[REFUSED] += 1
            return error_reply(data, q, REFUSED)
        if q.edns_version:
            self.rcodes[BADVERS] += 1  # RFC 6891 6.1.3, cached or not
            return error_reply(data, q, BADVERS)
        return q

    def _not_cached(self, data: bytes, q: ParsedQuery, tcp: bool, host: str) -> Reply:
        """No fresh entry: refuse what we never forward, else a miss."""
        if q.qclass != CLASS_IN:
            self.rcodes[REFUSED] += 1
            return error_reply(data, q, REFUSED)
        if q.qtype not in FORWARDABLE:
            self.rcodes[NOTIMP] += 1
            return error_reply(data, q, NOTIMP)
        if q.qtype == TYPE_AAAA and self.no_aaaa:
            self.rcodes[NOERROR] += 1
            return error_reply(data, q, NOERROR)
        if self.client_pending.get(host, 0) >= self.max_pending_per_client:
            # SERVFAIL at once rather than silence: a stub retransmitting after its timeout
            # would only meet the same bound, and over TCP (RFC 7766) a query left unanswered
            # stalls the client's stream. The reply is no larger than the query.
            self.client_shed += 1
            self.rcodes[SERVFAIL] += 1
            return error_reply(data, q, SERVFAIL)
        self.cache.misses += 1
        return PendingReply(self, data, q, tcp, host)

    def _finish_miss(self, data: bytes, q: ParsedQuery, tcp: bool,
                     fut: asyncio.Future[Outcome]) -> bytes | None:
        e, stale = self.resolver.outcome(fut)
        if stale:
            body = stale_body(e)
        else:
            age = int(self._now() - e[STORED])
            body = e[BODY] if age <= e[AGE] else render(e, age)[BODY]
        self.rcodes[e[RCODE]] += 1
        return self._reply(data, data[12 : q.qend], q.edns, q.udp_size, e, body, tcp)

    def _reply(self, data: bytes, question: bytes, edns: int, udp_size: int, e: RawEntry,
               body: bytes, tcp: bool) -> bytes:
        """The reply to ``data`` from entry ``e`` with ``body`` (its sections as of now):
        the client's ID, RD and ``question`` bytes, our OPT when the client sent one.

        Over UDP a reply above 512 bytes must fit both the client's advertised size
        (``udp_size``) and ``--max-udp-size``; otherwise it is header + question (+ OPT)
        with TC=1, so the client retries over TCP (RFC 7766).
        """
        rd = data[2] & 1
        if edns:
            reply = b"".join((data[:2], _B2[rd], e[HDR_EDNS], question, body, OPT_RR))
        else:
            reply = b"".join((data[:2], _B2[rd], e[HDR], question, body))
        size = len(reply)
        if tcp or size <= MIN_UDP_PAYLOAD or (size <= udp_size and size <= self.max_udp_size):
            return reply
        self.truncated += 1
        return b"".join((data[:2], _B2_TC[rd], e[HDR][:1], _TC_TAIL[edns], question,
                         OPT_RR if edns else b""))
