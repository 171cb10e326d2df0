"""The compiled UDP fast path (sidecar/dns/_fastudp.c) against the Python path it mirrors.

Differential: two in-process sidecars on one fake upstream, ``py`` on the Python UDP path and
``fast`` on the compiled one, each with a frozen clock of its own moved in step. Every query
goes to ``py`` and then to ``fast`` over real loopback UDP, and the two must answer the same
bytes (or both stay silent) with the same counter deltas; both see the same sequence, so their
caches, ACL memos and rate limits stay alike. The corpus is the property tests' strategies
(tests/test_wire_properties.py), the fuzzer's packet generator (tests/fuzz/) and hand-picked
edge cases. Then: bursts larger than one batch, and one test per guard of the C code.
"""

from __future__ import annotations

import asyncio
import functools
import os
import random
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import dns.asyncquery
import dns.edns
import dns.flags
import dns.message
import dns.rdatatype
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar import Config, HostPort, Sidecar
from sidecar.dns import fastudp
from sidecar.dns.cache import EXPIRES, HDR, PREFETCH_AT, RCODE, Cache
from sidecar.dns.handler import QueryHandler
from sidecar.dns.listeners import UdpListener, close_listeners, open_listeners
from sidecar.dns.ratelimit import RateLimiter
from sidecar.dns.wire import make_key
from sidecar.testing.fakeupstream import FakeUpstream
from tests.fuzz.fuzz_sidecar import PacketGen
from tests.test_wire_properties import (
    CACHED_PAIRS,
    examples,
    mutated_queries,
    structured_queries,
    valid_queries,
)

pytestmark = pytest.mark.skipif(not fastudp.status()[0],
                                reason=f"compiled UDP path off: {fastudp.status()[1]}")

CLIENT = "127.0.0.1"
BOUND = 5.0  # seconds: any wait in this file


class FrozenClock:
    """The cache's clock, standing still unless moved: both sidecars read the same ages."""

    def __init__(self) -> None:
        self.t = time.monotonic()

    def __call__(self) -> float:
        return self.t


@dataclass
class Side:
    """One sidecar and the client socket that talks to its UDP listener."""

    sc: Sidecar
    clock: FrozenClock
    sock: socket.socket

    @property
    def listener(self) -> UdpListener:
        return self.sc.udp[0]

    def counters(self) -> dict[str, object]:
        h, c, u = self.sc.handler, self.sc.cache, self.listener
        return {"rcodes": list(h.rcodes), "dropped": h.dropped, "truncated": h.truncated,
                "ratelimited": h.ratelimited, "denied": h.denied, "shed": h.client_shed,
                "hits": c.hits, "misses": c.misses, "prefetched": c.prefetched,
                "received": u.received, "errors": u.errors}

    def answered_fast(self) -> int:
        t = self.listener.transport
        return t.fast.answered if isinstance(t, fastudp.FastTransport) else 0

    async def ask(self, data: bytes, loop: asyncio.AbstractEventLoop) -> bytes | None:
        """Send ``data``; its reply, or None once the listener handled it and stayed silent."""
        before = self.listener.received
        pending = len(self.listener.pending)
        self.sock.send(data)
        deadline = time.monotonic() + BOUND
        while self.listener.received == before:
            assert time.monotonic() < deadline, "the listener never read the datagram"
            await asyncio.sleep(0.0005)
        if len(self.listener.pending) > pending or len(self.sc.resolver.coalescer):
            # A miss: its reply comes once the fetch is done.
            try:
                return await asyncio.wait_for(loop.sock_recv(self.sock, 65535), BOUND)
            except TimeoutError:
                return None
        # Anything else is answered (or not) before the listener's callback returns.
        try:
            return self.sock.recv(65535)
        except BlockingIOError:
            return None

    async def settle(self) -> None:
        """Wait for fetches (misses, prefetches) to finish, so the next case starts alike."""
        deadline = time.monotonic() + BOUND
        while len(self.sc.resolver.coalescer) or self.listener.pending:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.002)


@dataclass
class Pair:
    loop: asyncio.AbstractEventLoop
    upstream: FakeUpstream
    py: Side
    fast: Side
    sides: tuple[Side, Side] = field(init=False)

    def __post_init__(self) -> None:
        self.sides = (self.py, self.fast)

    def compare(self, data: bytes, prep: Callable[[Side], None] | None = None
                ) -> tuple[bytes | None, int]:
        """``data`` to both sides (after ``prep`` on each): the reply, and how many replies
        the compiled path sent itself."""
        return self.loop.run_until_complete(self._compare(data, prep))

    async def _compare(self, data: bytes, prep: Callable[[Side], None] | None
                       ) -> tuple[bytes | None, int]:
        out = []
        for side in self.sides:
            reset(side)
            if prep is not None:
                prep(side)
            c0, f0 = side.counters(), side.answered_fast()
            reply = await side.ask(data, self.loop)
            await side.settle()
            c1 = side.counters()
            delta = {k: ([b - a for a, b in zip(v, c1[k], strict=True)] if isinstance(v, list)
                         else c1[k] - v) for k, v in c0.items()}  # type: ignore[operator]
            out.append((reply, delta, side.answered_fast() - f0))
        (r_py, d_py, _), (r_fast, d_fast, fast_sent) = out
        assert r_fast == r_py, f"replies differ for {data.hex()}"
        assert d_fast == d_py, f"counter deltas differ for {data.hex()}"
        assert d_fast["received"] == 1
        return r_fast, fast_sent

    def advance(self, seconds: float) -> None:
        for side in self.sides:
            side.clock.t += seconds


def reset(side: Side) -> None:
    """Every case starts from the default: client allowed (memoized), no rate limit,
    --max-udp-size 1232."""
    h = side.sc.handler
    h.acl._verdicts[CLIENT] = True
    h.ratelimit = None
    h.max_udp_size = 1232


async def _start_side(upstream: FakeUpstream, fast: bool) -> Side:
    clock = FrozenClock()
    import sidecar.server as server

    real_cache = server.Cache
    server.Cache = functools.partial(Cache, clock=clock)  # type: ignore[misc]
    old = os.environ.get(fastudp.ENV_OFF)
    try:
        if fast:
            os.environ.pop(fastudp.ENV_OFF, None)
        else:
            os.environ[fastudp.ENV_OFF] = "1"
        sc = Sidecar(Config(listen=(HostPort("127.0.0.1", 0),), http=None,
                            upstreams=(HostPort("127.0.0.1", upstream.port),), timeout=1.0,
                            tries=2))
        await sc.start()
    finally:
        server.Cache = real_cache  # type: ignore[misc]
        if old is None:
            os.environ.pop(fastudp.ENV_OFF, None)
        else:
            os.environ[fastudp.ENV_OFF] = old
    assert isinstance(sc.udp[0].transport, fastudp.FastTransport) == fast
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.connect(("127.0.0.1", sc.dns_addresses[0].port))
    return Side(sc, clock, sock)


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    """Both sidecars on a loop of their own (hypothesis runs many examples on them), the
    property tests' names cached in each."""
    loop = asyncio.new_event_loop()
    up = FakeUpstream(log_queries=False)
    loop.run_until_complete(up.start())
    py = loop.run_until_complete(_start_side(up, False))
    fast = loop.run_until_complete(_start_side(up, True))
    p = Pair(loop, up, py, fast)
    try:
        for name, rdtype in CACHED_PAIRS:
            p.compare(dns.message.make_query(name, rdtype).to_wire())
        yield p
    finally:
        for side in p.sides:
            side.sock.close()
            loop.run_until_complete(side.sc.stop(drain=0))
            side.sc.handler.acl._verdicts.clear()
        loop.run_until_complete(up.stop())
        loop.close()


def q(name: str = "www.example.test", rdtype: str = "A", qid: int = 0x1234,
      edns: int = -1, payload: int = 1232, options: list | None = None,
      rd: bool = True) -> bytes:
    m = dns.message.make_query(name, rdtype, use_edns=edns, payload=payload,
                               options=options or [])
    m.id = qid
    if not rd:
        m.flags &= ~dns.flags.RD
    return m.to_wire()


def entry_of(side: Side, name: str, rdtype: str = "A") -> tuple:
    return side.sc.cache.entries[make_key(name, dns.rdatatype.from_text(rdtype))]


def set_entry(side: Side, name: str, rdtype: str, index: int, value: object) -> None:
    key = make_key(name, dns.rdatatype.from_text(rdtype))
    e = side.sc.cache.entries[key]
    side.sc.cache.entries[key] = e[:index] + (value,) + e[index + 1:]


# ------------------------------------------------------------------------- differential


@examples(300)
@given(data=st.one_of(valid_queries(), structured_queries(), mutated_queries()))
def test_property_corpus_same_bytes(pair, data):
    pair.compare(data)


def test_fuzz_corpus_same_bytes(pair):
    gen = PacketGen(random.Random(19))
    for _ in range(300):
        pair.compare(gen.packet())


def test_common_shapes_are_answered_by_the_compiled_path(pair):
    cookie = dns.edns.GenericOption(10, b"\x01" * 8)
    for data in (q(), q(edns=0), q(edns=0, options=[cookie]), q("WwW.ExAmPlE.TeSt"),
                 q(rd=False), q(edns=0, payload=4096, rd=False), q("example.test", "MX"),
                 q("nope.example.test"), q("1.0.0.10.in-addr.arpa", "PTR", edns=0)):
        reply, fast_sent = pair.compare(data)
        assert reply is not None and fast_sent == 1, data


def test_truncation_same_bytes(pair):
    big = ("big.example.test", "TXT")
    for edns, payload, max_udp in ((-1, 512, 1232), (0, 600, 1232), (0, 100, 1232),
                                   (0, 4096, 600), (0, 4096, 1232), (0, 65535, 65535),
                                   (0, 1232, 512)):
        def prep(side: Side, m: int = max_udp) -> None:
            side.sc.handler.max_udp_size = m

        before = [s.sc.handler.truncated for s in pair.sides]
        reply, fast_sent = pair.compare(q(*big, edns=edns, payload=payload), prep)
        assert reply is not None and fast_sent == 1
        truncated = pair.fast.sc.handler.truncated - before[1] == 1
        assert truncated == bool(reply[2] & 0x02)
    assert pair.fast.sc.handler.truncated > 0


def test_odd_opt_and_shapes_go_to_python(pair):
    base = q()
    opt_v1 = q(edns=1)
    two_q = bytearray(q())
    two_q[5] = 2
    question = q()[12:]
    cases = [
        base[:-1], base[:12], base[:17], base[:18], b"", b"\x12",  # truncated
        bytes([base[0], base[1], base[2] | 0x80]) + base[3:],  # QR=1
        bytes([base[0], base[1], base[2] | 0x10]) + base[3:],  # opcode 2
        bytes(two_q) + question,  # two questions
        q(edns=0) + b"\x00",  # trailing byte after the OPT
        q(edns=0)[:-11] + b"\xc0\x0c" + q(edns=0)[-10:],  # OPT owned by a pointer
        q(edns=0)[:-2] + b"\x00\x05",  # OPT rdlength past the end
        opt_v1,  # EDNS version 1: BADVERS
        q("www.example.test", "A")[:-2] + b"\x00\x03",  # class CH
        q("www.example.test", "ANY"), q("never.example.test"),
        bytes(12 + 4) + b"\x00\x01\x00\x01",
        q(edns=0)[:9] + b"\x01" + q(edns=0)[10:],  # NSCOUNT=1 beside the OPT
        q()[:9] + b"\x01" + q()[10:],  # NSCOUNT=1, no record at all
        q()[:7] + b"\x01" + q()[8:],  # ANCOUNT=1
    ]
    for data in cases:
        _reply, fast_sent = pair.compare(data)
        assert fast_sent == 0, data.hex()


def test_acl_and_rate_limit(pair):
    def denied(side: Side) -> None:
        side.sc.handler.acl._verdicts[CLIENT] = False

    def unknown(side: Side) -> None:
        side.sc.handler.acl._verdicts.pop(CLIENT, None)

    def limited(side: Side) -> None:
        rl = RateLimiter(0.001, 1.0)
        rl.buckets[CLIENT] = [0.0, time.monotonic()]
        side.sc.handler.ratelimit = rl

    def allowed(side: Side) -> None:
        side.sc.handler.ratelimit = RateLimiter(0.001, 5.0)

    reply, fast_sent = pair.compare(q(), denied)
    assert reply is not None and reply[3] & 0x0F == 5 and fast_sent == 0  # REFUSED
    reply, fast_sent = pair.compare(q(), unknown)
    assert reply is not None and fast_sent == 0  # the Python path checks and memoizes
    assert pair.fast.sc.handler.acl._verdicts[CLIENT] is True
    reply, fast_sent = pair.compare(q(edns=0), limited)
    assert reply is None and fast_sent == 0
    reply, fast_sent = pair.compare(q(edns=0), allowed)
    assert reply is not None and fast_sent == 1
    for side in pair.sides:
        assert side.sc.handler.ratelimit is None or side.sc.handler.ratelimit.buckets[CLIENT]


def test_ttl_aging_expiry_and_prefetch(pair):
    pair.advance(7)  # TTLs counted down by 7: the body is rendered again on the hit
    reply, fast_sent = pair.compare(q("many.example.test"))
    assert reply is not None and fast_sent == 1
    reply2, _ = pair.compare(q("many.example.test"))
    assert reply2 == reply

    def due(side: Side) -> None:
        set_entry(side, "www.example.test", "AAAA", PREFETCH_AT, side.clock() - 1)

    before = pair.fast.sc.cache.prefetched
    reply, fast_sent = pair.compare(q("www.example.test", "AAAA"), due)
    assert reply is not None and fast_sent == 1 and pair.fast.sc.cache.prefetched == before + 1

    def expired(side: Side) -> None:
        set_entry(side, "example.test", "TXT", EXPIRES, side.clock() - 1)

    reply, fast_sent = pair.compare(q("example.test", "TXT"), expired)
    assert reply is not None and fast_sent == 0


def test_malformed_entries_go_to_python(pair):
    """Guards on the entry: a field of the wrong shape is the Python path's to judge (here
    it raises: no reply, one error on both sides)."""
    def short_hdr(side: Side) -> None:
        set_entry(side, "alias2.example.test", "A", HDR, b"\x80\x00")

    def bad_rcode(side: Side) -> None:
        set_entry(side, "example.test", "NS", RCODE, 30)

    for name, rdtype, prep in (("alias2.example.test", "A", short_hdr),
                               ("example.test", "NS", bad_rcode)):
        _reply, fast_sent = pair.compare(q(name, rdtype), prep)
        assert fast_sent == 0
        for side in pair.sides:
            side.sc.cache.entries.pop(make_key(name, dns.rdatatype.from_text(rdtype)))


# ------------------------------------------------------------------------- bursts


async def _burst(sc: Sidecar) -> int:
    """300 queries sent at once, hits and misses mixed: each answered exactly once."""
    t = sc.udp[0].transport
    assert isinstance(t, fastudp.FastTransport)
    host, port = sc.dns_addresses[0].host, sc.dns_addresses[0].port
    await dns.asyncquery.udp(dns.message.make_query("www.example.test", "A"), host, port=port,
                             timeout=3)
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.setblocking(False)
    sock.connect((host, port))
    n, every = 300, 7
    misses = len(range(0, n, every))
    received0, answered0 = sc.udp[0].received, t.fast.answered
    try:
        for i in range(n):  # hits, and fresh names (misses) among them
            name = f"burst{i}.example.test" if i % every == 0 else "www.example.test"
            sock.send(q(name, qid=i, edns=0 if i % 2 else -1))
        ids: list[int] = []
        deadline = time.monotonic() + BOUND
        while len(ids) < n:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{n - len(ids)} queries never answered"
            data = await asyncio.wait_for(loop.sock_recv(sock, 65535), remaining)
            ids.append(struct.unpack_from(">H", data)[0])
        assert sorted(ids) == list(range(n))
        await asyncio.sleep(0.05)
        with pytest.raises(BlockingIOError):
            sock.recv(65535)  # nothing answered twice
    finally:
        sock.close()
    assert sc.udp[0].received - received0 == n
    assert t.fast.answered - answered0 == n - misses
    if t.fast.batch > 1:
        assert t.fast.batches < n  # read in batches, not one datagram per wake-up
    return t.fast.batch


async def test_burst_larger_than_a_batch_answered_once_each(make_sidecar):
    rs = await make_sidecar()
    await _burst(rs.sc)


def test_burst_on_uvloop():
    """The process runs on uvloop by default: the same burst on it (add_reader there is a
    libuv poll handle)."""
    uvloop = pytest.importorskip("uvloop")

    async def run() -> None:
        up = FakeUpstream(log_queries=False)
        await up.start()
        sc = Sidecar(Config(listen=(HostPort("127.0.0.1", 0),), http=None,
                            upstreams=(HostPort("127.0.0.1", up.port),)))
        await sc.start()
        try:
            assert await _burst(sc) == fastudp.UVLOOP_BATCH
        finally:
            await sc.stop(drain=0)
            await up.stop()

    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(run())
    finally:
        loop.close()


# ------------------------------------------------------------------------- guards


async def test_env_forces_the_python_path(make_sidecar, monkeypatch):
    monkeypatch.setenv(fastudp.ENV_OFF, "1")
    rs = await make_sidecar()
    assert not isinstance(rs.sc.udp[0].transport, fastudp.FastTransport)
    assert (await rs.query("www.example.test")).answer


async def test_wrapped_handle_gets_the_python_path(make_sidecar):
    """A handler whose ``handle`` is not QueryHandler's own (a subclass's, here) keeps the
    Python path: the compiled one would skip what the override adds."""
    rs = await make_sidecar()
    seen: list[bytes] = []

    class Counting(QueryHandler):
        def handle(self, data: bytes, host: str, tcp: bool, fast: bool = True):
            seen.append(data)
            return super().handle(data, host, tcp, fast)

    handler = rs.sc.handler
    handler.__class__ = Counting
    udps, tcps, bound, _ = await open_listeners((HostPort("127.0.0.1", 0),), handler.handle,
                                                rcvbuf=0, tcp_max_connections=4,
                                                tcp_idle_timeout=5)
    try:
        assert not isinstance(udps[0].transport, fastudp.FastTransport)
        for _ in range(3):
            m = await dns.asyncquery.udp(dns.message.make_query("www.example.test", "A"),
                                         "127.0.0.1", port=bound[0].port, timeout=3)
            assert m.answer
        assert len(seen) == 3
    finally:
        handler.__class__ = QueryHandler
        await close_listeners(udps, tcps, drain=0)


async def test_closing_listener_answers_nothing(make_sidecar):
    rs = await make_sidecar()
    await rs.query("www.example.test")
    u = rs.sc.udp[0]
    received = u.received
    u.closing = True
    sock = await _send_all(rs, [q()])
    try:
        assert await _collect(sock, 0.3) == []
    finally:
        sock.close()
        u.closing = False
    assert u.received == received


class _Hook:
    """A rate limiter whose ``allow`` runs ``action`` first: a Python call in the middle of
    the compiled path's batch."""

    def __init__(self, action: Callable[[], None]) -> None:
        self.action = action
        self.calls = 0

    def allow(self, host: str) -> bool:
        self.calls += 1
        self.action()
        return True


async def _send_all(rs, datas: list[bytes]) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.connect((rs.host, rs.port))
    for d in datas:
        sock.send(d)
    return sock


async def _collect(sock: socket.socket, wait: float = 0.3) -> list[bytes]:
    out: list[bytes] = []
    loop = asyncio.get_running_loop()
    while True:
        try:
            out.append(await asyncio.wait_for(loop.sock_recv(sock, 65535), wait))
        except TimeoutError:
            return out


async def test_reentrant_read_is_refused(make_sidecar):
    """A Python call inside a batch that reads the socket again (here: the rate limit hook
    calling on_readable, with a new query waiting) must not reuse the batch's buffers: every
    query answered once, with its own ID."""
    rs = await make_sidecar()
    await rs.query("www.example.test")
    t = rs.sc.udp[0].transport
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.connect((rs.host, rs.port))

    def nested() -> None:
        if hook.calls == 1:
            sock.send(q(qid=100))
            t.fast.on_readable()

    hook = _Hook(nested)
    rs.sc.handler.ratelimit = hook  # type: ignore[assignment]
    try:
        for i in range(5):
            sock.send(q(qid=i))
        replies = await _collect(sock)
    finally:
        sock.close()
        rs.sc.handler.ratelimit = None
    assert sorted(struct.unpack_from(">H", r)[0] for r in replies) == [0, 1, 2, 3, 4, 100]


async def test_closed_mid_batch_sends_nothing(make_sidecar):
    """The listener closed by a Python call inside a batch: the batch's replies are dropped
    (the socket is gone), never sent to a closed or reused descriptor."""
    rs = await make_sidecar()
    await rs.query("www.example.test")
    u = rs.sc.udp[0]
    errors = u.errors
    rs.sc.handler.ratelimit = _Hook(u.transport.close)  # type: ignore[assignment]
    sock = await _send_all(rs, [q(qid=i) for i in range(3)])
    try:
        replies = await _collect(sock, 0.2)
    finally:
        sock.close()
        rs.sc.handler.ratelimit = None
    assert replies == []
    assert u.errors == errors


async def test_backlog_when_the_kernel_is_full(make_sidecar):
    """Replies the kernel refuses for now (EAGAIN) wait in the backlog, in order, and go
    out once it takes them again: the compiled path's hits queue behind it too."""
    rs = await make_sidecar()
    await rs.query("www.example.test")
    t = rs.sc.udp[0].transport
    real = t._send_now
    hold = True

    def full(data, addr):
        if hold:
            raise BlockingIOError
        return real(data, addr)

    t._send_now = full
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.connect((rs.host, rs.port))
    try:
        t.sendto(b"first", sock.getsockname())  # refused: the backlog starts
        assert t.fast.blocked == 1 and len(t._backlog) == 1
        answered = t.fast.answered
        sock.send(q(qid=7))  # a hit: built by the compiled path, queued behind "first"
        deadline = time.monotonic() + BOUND
        while len(t._backlog) < 2:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.001)
        assert t.fast.answered == answered + 1
        hold = False
        replies = await _collect(sock, 0.5)
    finally:
        sock.close()
    assert replies[0] == b"first" and len(replies) == 2
    assert struct.unpack_from(">H", replies[1])[0] == 7
    assert not t._backlog and t.fast.blocked == 0


def test_backlog_is_bounded(monkeypatch):
    monkeypatch.setattr(fastudp, "BACKLOG_MAX", 2)
    errors = []

    class L:
        errors = 0

        def error_received(self, exc):
            errors.append(exc)

    t = fastudp.FastTransport.__new__(fastudp.FastTransport)
    t._listener = L()
    t._backlog = __import__("collections").deque()
    t._closing = False
    t._queue([(b"x", None)] * 5)
    assert len(t._backlog) == 2 and t._listener.errors == 3
