"""Who may ask and how fast: --allow, --rate-limit; and reloading upstreams keeps the cache."""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import dns.message
import dns.rcode
import pytest

from sidecar import HostPort
from sidecar.testing.fakeupstream import FakeUpstream


async def test_clients_outside_allow_are_refused(make_sidecar):
    sc = await make_sidecar(allow=(ipaddress.ip_network("10.0.0.0/8"),))
    r = await sc.query("www.example.test")
    assert r.rcode() == dns.rcode.REFUSED and not r.answer
    assert sc.upstream.queries == 0
    assert sc.sc.handler.denied == 1


async def test_allow_list_admits_listed_loopback_address(make_sidecar):
    sc = await make_sidecar(allow=(ipaddress.ip_network("127.0.0.1/32"),))
    assert (await sc.query("www.example.test")).answer


async def test_rate_limit_drops_silently(make_sidecar, raw_udp):
    sc = await make_sidecar(rate_limit=5.0, rate_burst=5.0,
                            allow=(ipaddress.ip_network("127.0.0.0/8"),))
    limited = raw_udp(sc.port)
    q = dns.message.make_query("www.example.test", "A")
    for i in range(20):
        q.id = i
        limited.send(q.to_wire())
    got = [dns.message.from_wire(await limited.recv()) for _ in range(5)]
    assert sorted(r.id for r in got) == [0, 1, 2, 3, 4]
    # Another client (127.0.0.2) is not limited; its reply comes after our 20 were handled.
    other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    other.bind(("127.0.0.2", 0))
    other.setblocking(False)
    try:
        loop = asyncio.get_running_loop()
        await loop.sock_sendto(other, q.to_wire(), ("127.0.0.1", sc.port))
        reply = dns.message.from_wire(await asyncio.wait_for(loop.sock_recv(other, 4096), 3))
    finally:
        other.close()
    assert reply.answer
    assert sc.sc.ratelimit.limited == 15
    assert sc.sc.handler.ratelimited == 15  # /stats queries.ratelimited


async def test_reload_swaps_upstreams_and_keeps_cache(make_sidecar, upstream):
    other = FakeUpstream()
    await other.start()
    try:
        sc = await make_sidecar()
        await sc.query("www.example.test")
        await sc.sc.reload(upstreams=(HostPort("127.0.0.1", other.port),))
        r = await sc.query("www.example.test")
        assert r.answer
        assert upstream.count("www.example.test") == 1 and other.count("www.example.test") == 0
        r = await sc.query("mail.example.test")
        assert r.answer and other.count("mail.example.test") == 1
        assert upstream.count("mail.example.test") == 0
        assert [u.address for u in sc.sc.pools.default.upstreams] == [other.address]
    finally:
        await other.stop()


@pytest.mark.parametrize("rate", [1.0])
def test_rate_limiter_refills(rate):
    from sidecar.dns.ratelimit import RateLimiter
    from sidecar.testing.clock import OffsetClock

    clock = OffsetClock()
    rl = RateLimiter(rate, burst=2, clock=clock)
    assert rl.allow("a") and rl.allow("a") and not rl.allow("a")
    clock.advance(1.0)  # one second later
    assert rl.allow("a") and not rl.allow("a")
    assert rl.allow("b")
