"""Clients that abuse the listeners (issue 14, section 4), against the real sidecar on loopback:
UDP amplification, TCP slots held by denied or slow or never-reading clients, the rate limit
before any reply, one client's pending misses, and repeated log lines."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct
import time

import dns.asyncquery
import dns.flags
import dns.message
import dns.rcode
import pytest

from sidecar.dns.listeners import TCP_MAX_BUFFERED
from sidecar.dns.ratelimit import RateLimiter
from sidecar.log import REPEATS
from tests.conftest import query

HUGE = "huge.example.test"
LOCAL = (ipaddress.ip_network("127.0.0.1/32"),)


def add_huge(upstream, name: str = HUGE) -> None:
    """A TXT answer of about 61 KB (the size that made the x1090 reflection)."""
    upstream.zone.add(name, "TXT", ["x" * 250] * 240)


async def wait_until(cond, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll a server-side state change that has no event of its own (bounded)."""
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def frame(msg: bytes) -> bytes:
    return struct.pack(">H", len(msg)) + msg


async def closed_by_server(reader: asyncio.StreamReader, timeout: float = 10.0) -> bool:
    """True once the server closed (EOF or reset), reading and discarding what it sent."""
    try:
        async with asyncio.timeout(timeout):
            while await reader.read(65536):
                pass
    except (ConnectionResetError, BrokenPipeError):
        pass
    return True


# ------------------------------------------------------------------ UDP amplification


@pytest.mark.parametrize("cached", [False, True], ids=["miss", "hit"])
async def test_udp_reply_capped_whatever_the_client_advertises(make_sidecar, raw_udp, cached):
    sc = await make_sidecar()
    add_huge(sc.upstream)
    q = dns.message.make_query(HUGE, "TXT", use_edns=0, payload=65535)
    wire = q.to_wire()
    if cached:  # fill the cache over TCP, then the UDP query takes the fast path
        full = await query(sc.port, HUGE, "TXT", tcp=True, use_edns=0)
        assert len(full.to_wire()) > 60_000
    sock = raw_udp(sc.port)
    sock.send(wire)
    reply = await sock.recv()
    assert len(reply) <= 1232
    r = dns.message.from_wire(reply)
    assert r.flags & dns.flags.TC and r.id == q.id and not r.answer
    assert r.question[0].name == q.question[0].name and r.edns == 0
    # The TCP retry gets it whole.
    full = await query(sc.port, HUGE, "TXT", tcp=True, use_edns=0, payload=65535)
    assert len(full.answer[0][0].strings) == 240


async def test_udp_size_is_min_of_advertised_and_cap(make_sidecar):
    sc = await make_sidecar(max_udp_size=4096)
    sc.upstream.zone.add("mid.example.test", "TXT", ["y" * 250] * 8)  # ~2.1 KB
    big = await sc.query("mid.example.test", "TXT", use_edns=0, payload=65535)
    assert not big.flags & dns.flags.TC and len(big.answer[0][0].strings) == 8
    small = await sc.query("mid.example.test", "TXT", use_edns=0, payload=1500)
    assert small.flags & dns.flags.TC and not small.answer
    floor = await sc.query("many.example.test", use_edns=0, payload=100)  # never below 512
    assert floor.flags & dns.flags.TC


# ------------------------------------------------------------------ TCP slots


async def test_tcp_client_outside_allow_closed_at_accept(make_sidecar):
    sc = await make_sidecar(allow=LOCAL, tcp_max_connections=4)
    denied = []
    for _ in range(8):  # twice the slots
        denied.append(await asyncio.open_connection(sc.host, sc.port,
                                                    local_addr=("127.0.0.2", 0)))
    for reader, _w in denied:
        assert await closed_by_server(reader)
    assert sc.sc.tcp[0].denied == 8 and not sc.sc.tcp[0].connections
    # The allowed client gets a slot and its answer.
    r = await query(sc.port, "www.example.test", tcp=True)
    assert r.answer
    for _r, w in denied:
        w.close()


async def test_tcp_per_client_connection_cap(make_sidecar):
    sc = await make_sidecar(tcp_max_connections=8)  # a quarter each: 2
    assert sc.sc.tcp[0].max_per_client == 2
    conns = [await asyncio.open_connection(sc.host, sc.port, local_addr=("127.0.0.2", 0))
             for _ in range(3)]
    assert await closed_by_server(conns[2][0])
    await wait_until(lambda: len(sc.sc.tcp[0].connections) == 2, what="two connections")
    assert sc.sc.tcp[0].client_rejected == 1
    r = await query(sc.port, "www.example.test", tcp=True)  # another address: not capped
    assert r.answer
    conns[0][1].close()
    await wait_until(lambda: sc.sc.tcp[0].per_client.get("127.0.0.2") == 1, what="a release")
    r4, w4 = await asyncio.open_connection(sc.host, sc.port, local_addr=("127.0.0.2", 0))
    q = dns.message.make_query("www.example.test", "A")
    w4.write(frame(q.to_wire()))
    size = struct.unpack(">H", await r4.readexactly(2))[0]
    assert dns.message.from_wire(await r4.readexactly(size)).answer
    for _r, w in (*conns, (r4, w4)):
        w.close()


async def test_tcp_query_frame_must_complete_within_idle_timeout(make_sidecar):
    sc = await make_sidecar(tcp_idle_timeout=0.5)
    reader, writer = await asyncio.open_connection(sc.host, sc.port)
    writer.write(b"\x01\x00")  # a 256-byte frame, then one byte every 0.1 s (25 s in all)
    closed = asyncio.ensure_future(closed_by_server(reader, timeout=30))
    for _ in range(256):
        done, _p = await asyncio.wait({closed}, timeout=0.1)
        if done:
            break
        writer.write(b"\x00")
    assert closed.done(), "a trickling client kept its slot"
    assert sc.sc.tcp[0].slow_closed == 1 and sc.sc.tcp[0].received == 0
    writer.close()


def never_reading_socket(port: int) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    s.setblocking(False)
    return s


def buffered(sc) -> int:
    return sum(c.transport.get_write_buffer_size() for c in sc.sc.tcp[0].connections
               if c.transport is not None)


async def test_never_reading_client_stops_being_read_and_is_closed(make_sidecar):
    sc = await make_sidecar(tcp_idle_timeout=30)
    add_huge(sc.upstream)
    await sc.query(HUGE, "TXT", tcp=True)  # cached: every query below is a hit
    tcp = sc.sc.tcp[0]
    tcp.drain_timeout = 0.5
    msg = frame(dns.message.make_query(HUGE, "TXT").to_wire())
    s = never_reading_socket(sc.port)
    try:
        s.sendall(msg * 400)  # 24 MB of replies asked for
        await wait_until(lambda: tcp.connections and all(c.write_paused for c in tcp.connections),
                         what="writing paused")
        # Stopped reading queries: what it buffers is bounded by the pause, not by the queries.
        assert buffered(sc) <= TCP_MAX_BUFFERED
        assert tcp.received < 400
        await wait_until(lambda: not tcp.connections, what="the connection closed")
        assert tcp.drain_closed == 1 and tcp.overflow_closed == 0
    finally:
        s.close()


async def test_never_reading_client_closed_at_idle_timeout_with_replies_unsent(make_sidecar):
    sc = await make_sidecar(tcp_idle_timeout=0.5)
    add_huge(sc.upstream)
    await sc.query(HUGE, "TXT", tcp=True)
    tcp = sc.sc.tcp[0]
    tcp.drain_timeout = 60  # only the idle timeout can close it
    s = never_reading_socket(sc.port)
    try:
        s.sendall(frame(dns.message.make_query(HUGE, "TXT").to_wire()) * 200)
        await wait_until(lambda: tcp.connections and buffered(sc) > 0, what="replies buffered")
        await wait_until(lambda: not tcp.connections, what="the connection closed")
        assert tcp.idle_closed == 1
    finally:
        s.close()


async def test_replies_of_queued_misses_bounded_for_a_client_that_does_not_read(make_sidecar):
    sc = await make_sidecar(tcp_idle_timeout=30)
    add_huge(sc.upstream)
    sc.upstream.latency = 0.2  # all 100 queries are waiting on one fetch when it lands
    tcp = sc.sc.tcp[0]
    s = never_reading_socket(sc.port)
    try:
        s.sendall(frame(dns.message.make_query(HUGE, "TXT").to_wire()) * 100)  # 6 MB due
        await wait_until(lambda: tcp.overflow_closed == 1, what="the overflow close")
        assert not tcp.connections
    finally:
        s.close()


# ------------------------------------------------------------------ rate limit


def test_rate_limiter_keys_ipv6_per_prefix():
    rl = RateLimiter(1.0, burst=1, v6_prefix=64)
    same64 = [f"2001:db8:1:2:{i >> 16:x}:{i & 0xFFFF:x}::1" for i in range(1000)]
    assert sum(rl.allow(h) for h in same64) == 1
    assert rl.limited == 999
    other64s = [f"2001:db8:2:{i:x}::1" for i in range(1000)]
    assert all(rl.allow(h) for h in other64s)
    assert rl.allow("fe80::1%eth0") and not rl.allow("fe80::2%eth1")  # scope ignored
    # IPv4 per address, IPv4-mapped IPv6 counted as its IPv4 address.
    assert rl.allow("192.0.2.1") and rl.allow("192.0.2.2") and not rl.allow("::ffff:192.0.2.1")
    fine = RateLimiter(1.0, burst=1, v6_prefix=128)
    assert all(fine.allow(h) for h in same64[:50])
    coarse = RateLimiter(1.0, burst=1, v6_prefix=32)
    assert coarse.allow("2001:db8:1::1") and not coarse.allow("2001:db8:ffff::1")


async def test_rate_limit_before_any_reply_and_counted(make_sidecar, raw_udp):
    sc = await make_sidecar(rate_limit=5.0, rate_burst=5.0)
    sock = raw_udp(sc.port)
    base = dns.message.make_query("www.example.test", "A").to_wire()
    formerr = base[:4] + b"\x00\x02" + base[6:]  # QDCOUNT 2, one question
    notimp = base[:2] + bytes((base[2] | 0x10,)) + base[3:]  # opcode 2 (STATUS)
    for i in range(20):
        pkt = formerr if i % 2 else notimp
        sock.send(struct.pack(">H", i) + pkt[2:])
    got = [await sock.recv() for _ in range(5)]
    assert sorted(struct.unpack(">H", r[:2])[0] for r in got) == [0, 1, 2, 3, 4]
    # The UDP listener handles datagrams in order: once another client's query is answered,
    # all 20 were handled.
    other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    other.bind(("127.0.0.2", 0))
    other.setblocking(False)
    try:
        loop = asyncio.get_running_loop()
        await loop.sock_sendto(other, base, ("127.0.0.1", sc.port))
        await asyncio.wait_for(loop.sock_recv(other, 4096), 3)
    finally:
        other.close()
    with pytest.raises(BlockingIOError):
        sock.sock.recv(4096)
    assert sc.sc.handler.ratelimited == 15


# ------------------------------------------------------------------ pending misses per client


async def test_pending_misses_bounded_per_client(make_sidecar):
    sc = await make_sidecar()
    h = sc.sc.handler
    assert h.max_pending_per_client >= 1000  # the default lets a crawler's burst through
    h.max_pending_per_client = 5
    sc.upstream.latency = 0.3
    names = [f"n{i}.example.test" for i in range(4)]
    first = [asyncio.ensure_future(query(sc.port, n, tcp=False)) for n in names]
    tcp_first = asyncio.ensure_future(query(sc.port, "tcp0.example.test", tcp=True))
    await wait_until(lambda: h.client_pending.get("127.0.0.1") == 5, what="5 pending")
    over = [await query(sc.port, f"over{i}.example.test", tcp=tcp) for i, tcp in
            enumerate((False, True, False))]
    assert [r.rcode() for r in over] == [dns.rcode.SERVFAIL] * 3 and h.client_shed == 3
    # Another address is not held back by this one's queue.
    r = await dns.asyncquery.udp(dns.message.make_query("www.example.test", "A"), sc.host,
                                 port=sc.port, source="127.0.0.2", timeout=3)
    assert r.rcode() == dns.rcode.NOERROR
    for r in await asyncio.gather(*first, tcp_first):
        assert r.rcode() in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN)
    assert not h.client_pending
    # A shed query was answered, not cached: asked again, it goes upstream.
    r = await query(sc.port, "over0.example.test")
    assert r.rcode() != dns.rcode.SERVFAIL


async def test_default_lets_a_burst_of_1000_cold_names_through(make_sidecar):
    sc = await make_sidecar()
    sc.upstream.latency = 0.05
    results = await asyncio.gather(*(query(sc.port, f"c{i}.example.test", timeout=10)
                                     for i in range(1000)))
    assert all(r.rcode() != dns.rcode.SERVFAIL for r in results)
    assert sc.sc.handler.client_shed == 0


# ------------------------------------------------------------------ log lines


async def test_repeated_warnings_are_rate_limited(make_sidecar, caplog):
    sc = await make_sidecar(max_inflight=1, timeout=0.2, tries=1)
    sc.upstream.drop = True  # silent: every query but the first is shed
    caplog.set_level(logging.WARNING, logger="sidecar")
    before = REPEATS.suppressed
    t0 = time.monotonic()
    results = await asyncio.gather(*(query(sc.port, f"s{i}.example.test", timeout=10)
                                     for i in range(300)))
    elapsed = time.monotonic() - t0
    assert all(r.rcode() == dns.rcode.SERVFAIL for r in results)
    per_template: dict[str, int] = {}
    for rec in caplog.records:
        per_template[str(rec.msg)] = per_template.get(str(rec.msg), 0) + 1
    assert sum(per_template.values()) > 0
    assert max(per_template.values()) <= REPEATS.per_second * (int(elapsed) + 2)
    assert REPEATS.suppressed - before >= 100
    # The next line of that template to pass says how many were dropped.
    for st in REPEATS.state.values():
        st[0] -= 1.0  # as if a second went by
    caplog.clear()
    await asyncio.gather(*(query(sc.port, f"again{i}.example.test", timeout=10)
                           for i in range(3)))
    assert any("similar lines suppressed" in rec.getMessage() for rec in caplog.records)
