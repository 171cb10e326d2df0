"""The query handler: one DNS message in, one reply (or nothing) out.

``handle`` is the hot path. A fresh cache hit is answered synchronously from the entry's
encoded bytes: the client's ID and question bytes (letter case kept, for DNS 0x20) in front
of the cached sections. A miss returns a :class:`PendingReply`: the listener starts it, adds
a done callback to its fetch (shared by every client asking for the same key) and sends
what ``reply()`` renders; no task per waiting client.
"""

from __future__ import annotations

import asyncio
import time

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
from sidecar.dns.ratelimit import RateLimiter
from sidecar.dns.types import FORWARDABLE
from sidecar.dns.wire import (
    BADVERS,
    CLASS_IN,
    FORMERR,
    MIN_UDP_PAYLOAD,
    NOERROR,
    NOTIMP,
    OPT_RR,
    REFUSED,
    SERVFAIL,
    ParsedQuery,
    error_reply,
    header_only_reply,
    parse_query,
)
from sidecar.errors import WireError
from sidecar.miss.fetch import Resolver

_B2 = (b"\x80", b"\x81")  # QR, plus RD copied from the query
_B2_TC = (b"\x82", b"\x83")
_TC_TAIL = (b"\x00\x01\x00\x00\x00\x00\x00\x00", b"\x00\x01\x00\x00\x00\x00\x00\x01")
TYPE_AAAA = 28
_monotonic = time.monotonic
_ONE_Q = b"\x00\x01\x00\x00\x00\x00\x00\x00"
_ONE_Q_OPT = b"\x00\x01\x00\x00\x00\x00\x00\x01"


class PendingReply:
    """A miss. Nothing happens until ``start()``, which begins (or joins) the fetch for its
    key and returns that future: shared with every client asking for the same key, so never
    cancel it. Once it is done, ``reply(fut)`` renders this client's answer (None: stay
    silent). Dropping an unstarted PendingReply costs nothing."""

    __slots__ = ("data", "handler", "host", "q", "started", "tcp")

    def __init__(self, handler: QueryHandler, data: bytes, q: ParsedQuery, tcp: bool,
                 host: str = "") -> None:
        self.handler, self.data, self.q, self.tcp, self.host = handler, data, q, tcp, host
        self.started = False

    def start(self) -> asyncio.Future:
        """Needs the running event loop."""
        fut = self.handler.resolver.lookup(self.q.key)
        # Counted once started (an unstarted reply costs nothing), released in reply().
        self.started = True
        waiting = self.handler.client_pending
        waiting[self.host] = waiting.get(self.host, 0) + 1
        return fut

    def reply(self, fut: asyncio.Future) -> bytes | None:
        """The answer, once ``fut`` (what ``start()`` returned) is done."""
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
    """Answers queries from the cache and hands misses to the resolver.

    Counters (read by the stats API): ``rcodes`` (replies per RCODE), ``dropped`` (no reply:
    QR=1 or unreadable header), ``truncated`` (UDP replies sent with TC=1), ``ratelimited``
    (dropped by the rate limit), ``client_shed`` (SERVFAIL because the client already had
    ``max_pending_per_client`` misses waiting).
    """

    def __init__(self, cache: Cache, resolver: Resolver, *, acl: Acl | None = None,
                 no_aaaa: bool = False, ratelimit: RateLimiter | None = None,
                 max_udp_size: int = 1232, max_pending_per_client: int | None = None) -> None:
        #: ``--max-udp-size``: cap on any UDP reply, whatever the client advertises.
        self.max_udp_size = max(int(max_udp_size), MIN_UDP_PAYLOAD)
        #: Queries dropped by the rate limit (no reply at all).
        self.ratelimited = 0
        #: Misses started and not yet answered, per client address (UDP and TCP together).
        self.client_pending: dict[str, int] = {}
        if max_pending_per_client is None:
            slots = getattr(resolver, "max_inflight", 0) or 1024
            max_pending_per_client = max(1000, PENDING_PER_CLIENT_PER_SLOT * slots)
        self.max_pending_per_client = max_pending_per_client
        self.client_shed = 0
        self.cache = cache
        self.resolver = resolver
        self.acl = acl or Acl(())
        self.no_aaaa = no_aaaa
        self.ratelimit = ratelimit
        self.rcodes = [0] * 24
        # Bound methods for the hot path: each saves an attribute walk per query.
        self._get = cache.entries.get
        self._touch = cache.used.add
        self._acl_get = self.acl.cache.get
        self.dropped = 0
        self.truncated = 0
        self.denied = 0

    def handle(self, data: bytes, host: str, tcp: bool) -> Reply:
        """Answer one message from ``host`` (the client's IP as a string).

        Returns the reply bytes, None to stay silent, or a :class:`PendingReply`.
        """
        # Fast path for the common shape: QUERY, one question, no records or one OPT.
        # It finds the question's end with bytes.find instead of walking labels (a zero byte
        # inside a label only yields a key no cache entry can have, and the slow path then
        # judges the message). Measured: 0.5 us here vs 2.4 us for parse_query.
        n = len(data)
        if n >= 17 and not data[2] & 0xF8:
            counts = data[4:12]
            if counts == _ONE_Q or counts == _ONE_Q_OPT:
                qend = data.find(0, 12) + 5
                edns = counts[7]
                if edns:
                    o = qend
                    if (o + 11 <= n and data[o] == 0 and data[o + 1] == 0 and data[o + 2] == 41
                            and data[o + 6] == 0 and o + 11 + ((data[o + 9] << 8) | data[o + 10]) == n):
                        # Not floored at 512 here: any reply up to 512 bytes goes out below
                        # before the advertised size or --max-udp-size is looked at.
                        udp_size = (data[o + 3] << 8) | data[o + 4]
                    else:
                        qend = 0
                elif qend != n:
                    qend = 0
                else:
                    udp_size = 512
                if qend > 17:
                    key = data[12:qend].lower()
                    e = self._get(key)
                    if e is not None:
                        # e is a raw cache tuple: 0 hdr, 1 hdr_edns, 2 body, 4 stored,
                        # 5 expires, 6 age, 7 rcode, 8 prefetch_at (see cache.Entry).
                        now = _monotonic()
                        if now < e[5] and self._acl_get(host):
                            if self.ratelimit is not None and not self.ratelimit.allow(host):
                                self.ratelimited += 1
                                return None
                            self._touch(key)
                            self.cache.hits += 1
                            age = int(now - e[4])
                            body = e[2] if age == e[6] else self.cache.rendered_body(key, e, age)
                            if now > e[8]:
                                self.resolver.prefetch(key, e)
                            self.rcodes[e[7]] += 1
                            rd = data[2] & 1
                            if edns:
                                reply = b"".join((data[:2], _B2[rd], e[1], data[12:qend], body,
                                                  OPT_RR))
                            else:
                                reply = b"".join((data[:2], _B2[rd], e[0], data[12:qend], body))
                            if tcp or len(reply) <= 512 or (len(reply) <= udp_size
                                                            and len(reply) <= self.max_udp_size):
                                return reply
                            # Too big for the client's UDP size or --max-udp-size: TC=1.
                            self.truncated += 1
                            return b"".join((data[:2], _B2_TC[rd], e[0][:1], _TC_TAIL[edns],
                                             data[12:qend], OPT_RR if edns else b""))
        return self._handle_full(data, host, tcp)

    def _handle_full(self, data: bytes, host: str, tcp: bool) -> Reply:
        """Everything the fast path does not answer: full parse, access check, misses."""
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
        allowed = self.acl.cache.get(host)
        if allowed is None:
            allowed = self.acl.check(host)
        if not allowed:
            self.denied += 1
            self.rcodes[REFUSED] += 1
            return error_reply(data, q, REFUSED)
        if q.edns_version:
            self.rcodes[BADVERS] += 1  # RFC 6891 6.1.3, cached or not
            return error_reply(data, q, BADVERS)
        cache = self.cache
        e = cache.entries.get(q.key)
        if e is not None:
            now = time.monotonic()
            if now < e[EXPIRES]:
                cache.used.add(q.key)
                cache.hits += 1
                age = int(now - e[STORED])
                body = e[BODY] if age == e[AGE] else cache.rendered_body(q.key, e, age)
                if now > e[PREFETCH_AT]:
                    self.resolver.prefetch(q.key, e)
                self.rcodes[e[RCODE]] += 1
                return self._reply(data, q, e, body, tcp)
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
        cache.misses += 1
        return self._miss(data, q, tcp, host)

    def _miss(self, data: bytes, q: ParsedQuery, tcp: bool, host: str = "") -> PendingReply:
        return PendingReply(self, data, q, tcp, host)

    def _finish_miss(self, data: bytes, q: ParsedQuery, tcp: bool,
                     fut: asyncio.Future) -> bytes | None:
        e, stale = self.resolver.outcome(fut)
        if stale:
            body = stale_body(e)
        else:
            age = int(time.monotonic() - e[STORED])
            body = e[BODY] if age <= e[AGE] else render(e, age)[BODY]
        self.rcodes[e[RCODE]] += 1
        return self._reply(data, q, e, body, tcp)

    def _reply(self, data: bytes, q: ParsedQuery, e: RawEntry, body: bytes, tcp: bool) -> bytes:
        question = data[12 : q.qend]
        rd = data[2] & 1
        if q.edns:
            reply = b"".join((data[:2], _B2[rd], e[HDR_EDNS], question, body, OPT_RR))
        else:
            reply = b"".join((data[:2], _B2[rd], e[HDR], question, body))
        if tcp or len(reply) <= q.udp_size and len(reply) <= self.max_udp_size:
            return reply
        # Does not fit the client's UDP size: header + question (+ OPT) with TC=1, so the
        # client retries over TCP (RFC 7766).
        self.truncated += 1
        return b"".join((data[:2], _B2_TC[rd], e[HDR][:1], _TC_TAIL[q.edns], question,
                         OPT_RR if q.edns else b""))

