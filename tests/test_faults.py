"""Upstream faults against a real sidecar: blackholed, slow, SERVFAIL storm, REFUSED, truncating,
restarting upstreams, with readiness (``/readyz``) followed through quarantine and recovery.

Every await is bounded (client timeouts, ``asyncio.wait_for``, or a polling deadline); no sleep
is used to wait for something to happen. Also runs the fuzz script briefly
(``tests/fuzz/fuzz_sidecar.py``) against a real sidecar process.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import dns.exception
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from sidecar.testing.upstreams import wait_for_state
from tests.helpers import hp, upstream_obj

WAIT = 15.0  # bound on a state change the prober makes (probe back-off starts at 1 s)
REPO = Path(__file__).resolve().parent.parent


def a_records(msg) -> list[str]:
    return sorted(rd.to_text() for rrs in msg.answer if rrs.rdtype == dns.rdatatype.A
                  for rd in rrs)


async def readiness(sc) -> bool:
    """Ready as a probe sees it: GET /readyz when the API runs, else ``Sidecar.ready``."""
    if sc.http_url is None:
        return sc.sc.ready
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.get(sc.http_url + "/readyz") as resp:
            body = await resp.json()
    assert resp.status in (200, 503)
    if resp.status == 503:
        assert body["status"] == "not ready" and body["reasons"]
    else:
        assert body["status"] == "ready"
    return resp.status == 200


async def stats(sc) -> dict | None:
    if sc.http_url is None:
        return None
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.get(sc.http_url + "/stats") as resp:
            assert resp.status == 200
            return await resp.json()


async def poll(condition, bound: float = WAIT, every: float = 0.05) -> None:
    """Wait until ``condition()`` holds (an external state we cannot await), at most ``bound``."""
    deadline = time.monotonic() + bound
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {bound} s")
        await asyncio.sleep(every)


# ------------------------------------------------------------------------------- blackhole


async def test_blackholed_upstream_servfail_quarantine_and_recovery(make_sidecar, upstream):
    sc = await make_sidecar(timeout=0.3, tries=1)
    u = upstream_obj(sc, upstream)
    assert await readiness(sc)
    upstream.drop = True
    # The client's own timeout is the bound: budget 0.3 s plus slack.
    r = await sc.query("www.example.test", timeout=2.0)
    assert r.rcode() == dns.rcode.SERVFAIL
    assert u.outcomes["timeout"] >= 1
    await asyncio.wait_for(wait_for_state(u, "quarantined"), WAIT)  # the prober's failures
    assert not sc.sc.ready and not await readiness(sc)
    if sc.http_url:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
            async with s.get(sc.http_url + "/readyz") as resp:
                body = await resp.json()
        assert resp.status == 503 and upstream.address in body["reasons"]["."]
    upstream.drop = False
    await asyncio.wait_for(wait_for_state(u, "healthy"), WAIT)
    assert sc.sc.ready and await readiness(sc)
    r = await sc.query("mail.example.test", timeout=2.0)
    assert r.rcode() == dns.rcode.NOERROR and a_records(r) == ["10.0.0.25"]


async def test_single_timeout_does_not_flap_readiness(make_sidecar, upstream):
    sc = await make_sidecar(timeout=0.3, tries=1)
    u = upstream_obj(sc, upstream)
    upstream.drop_names = {"lost.example.test"}
    r = await sc.query("lost.example.test", timeout=2.0)
    assert r.rcode() == dns.rcode.SERVFAIL
    await poll(lambda: u.outcomes["timeout"] == 1)
    # suspect (unless its probe already cleared it), never quarantined
    assert u.health.consecutive_failures == 1 or u.probes >= 1
    assert u.health.quarantines == 0
    assert sc.sc.ready and await readiness(sc)
    # The suspect server is probed (". NS" answers) and cleared; readiness holds throughout.
    deadline = time.monotonic() + WAIT
    while not (u.probes >= 1 and u.health.consecutive_failures == 0):
        assert sc.sc.ready, "one timeout made the sidecar not ready"
        assert time.monotonic() < deadline, "the suspect server was never probed"
        await asyncio.sleep(0.05)
    assert u.state == "healthy" and u.health.quarantines == 0
    assert await readiness(sc)
    r = await sc.query("www.example.test", timeout=2.0)
    assert a_records(r) == ["10.0.0.1", "10.0.0.2"]


async def test_two_timeouts_in_a_row_still_ready(make_sidecar, upstream):
    """Quarantine takes three consecutive network failures: two leave the sidecar ready."""
    sc = await make_sidecar(timeout=0.3, tries=1)
    u = upstream_obj(sc, upstream)
    upstream.drop_names = {"lost1.example.test", "lost2.example.test"}
    # At once, so no probe can clear the first failure before the second.
    replies = await asyncio.gather(sc.query("lost1.example.test", timeout=2.0),
                                   sc.query("lost2.example.test", timeout=2.0))
    assert [r.rcode() for r in replies] == [dns.rcode.SERVFAIL] * 2
    await poll(lambda: u.outcomes["timeout"] == 2 and u.inflight == 0)
    assert u.state == "healthy" and u.health.quarantines == 0
    assert sc.sc.ready and await readiness(sc)


# ------------------------------------------------------------------------------- slow


async def test_slow_just_under_the_timeout_answers(make_sidecar, upstream):
    sc = await make_sidecar(timeout=1.0, tries=1)
    upstream.latency = 0.65
    r = await sc.query("www.example.test", timeout=3.0)
    assert r.rcode() == dns.rcode.NOERROR and a_records(r) == ["10.0.0.1", "10.0.0.2"]
    u = upstream_obj(sc, upstream)
    assert u.outcomes["ok"] == 1 and u.outcomes["timeout"] == 0
    assert sc.sc.ready


async def test_slow_just_over_the_timeout_servfails(make_sidecar, upstream):
    sc = await make_sidecar(timeout=0.5, tries=1)
    upstream.latency = 0.7
    r = await sc.query("www.example.test", timeout=3.0)
    assert r.rcode() == dns.rcode.SERVFAIL
    u = upstream_obj(sc, upstream)
    await poll(lambda: u.outcomes["timeout"] == 1)
    assert sc.sc.ready  # one timeout


async def test_slow_first_server_is_hedged_to_the_second(make_sidecar, upstream, second_upstream,
                                                         monkeypatch):
    import sidecar.upstream.pool

    monkeypatch.setattr(sidecar.upstream.pool, "EXPLORE_SHARE", 0.0)  # the configured order, always
    slow, fast = second_upstream, upstream
    slow.latency = 1.2  # just over the 1 s try timeout
    sc = await make_sidecar(upstreams=(hp(slow), hp(fast)), timeout=1.0, tries=2)
    # 0.9 s is shorter than the slow server's answer (1.2 s) and than waiting for its timeout
    # (1 s) before asking the next: only the hedge (after 0.1 s) can answer in time.
    r = await sc.query("www.example.test", timeout=0.9)
    assert r.rcode() == dns.rcode.NOERROR and a_records(r) == ["10.0.0.1", "10.0.0.2"]
    assert slow.count("www.example.test", "A") >= 1 and fast.count("www.example.test", "A") == 1
    assert sc.sc.pools.default.hedged >= 1
    slow_u = upstream_obj(sc, slow)
    await poll(lambda: slow_u.outcomes["timeout"] == 1)  # the losing try still feeds health
    assert sc.sc.ready and await readiness(sc)


# ------------------------------------------------------------------------------- rcodes


async def test_servfail_storm(make_sidecar, upstream):
    sc = await make_sidecar(timeout=0.5, tries=2)
    u = upstream_obj(sc, upstream)
    upstream.rcode = "SERVFAIL"
    names = [f"h{i}.example.test" for i in range(40)]
    replies = await asyncio.gather(*(sc.query(n, timeout=3.0) for n in names))
    assert [r.rcode() for r in replies] == [dns.rcode.SERVFAIL] * len(names)
    assert u.outcomes["servfail"] >= len(names) and u.outcomes["timeout"] == 0
    assert sc.sc.handler.rcodes[dns.rcode.SERVFAIL] >= len(names)
    assert u.state == "healthy" and u.health.consecutive_failures == 0  # not quarantined
    assert sc.sc.ready and await readiness(sc)
    doc = await stats(sc)
    if doc is not None:
        assert doc["queries"]["servfail"] >= len(names)
        (us,) = doc["upstreams"]
        assert us["state"] == "healthy" and us["errors"]["servfail"] >= len(names)
        assert us["errors"]["timeout"] == 0
    upstream.rcode = None
    r = await sc.query("h1000.example.test", timeout=3.0)  # a name not remembered as SERVFAIL
    assert r.rcode() == dns.rcode.NOERROR and a_records(r) == ["127.0.0.1"]


async def test_refused_upstream(make_sidecar, upstream):
    sc = await make_sidecar(timeout=0.5, tries=1)
    u = upstream_obj(sc, upstream)
    upstream.rcode = "REFUSED"
    for tcp in (False, True):
        r = await sc.query(f"h{int(tcp)}.example.test", tcp=tcp, timeout=3.0)
        assert r.rcode() == dns.rcode.SERVFAIL  # the upstream's refusal is not the client's
    assert u.outcomes["refused"] == 2
    assert u.state == "healthy" and sc.sc.ready and await readiness(sc)
    doc = await stats(sc)
    if doc is not None:
        assert doc["upstreams"][0]["errors"]["refused"] == 2


async def test_truncated_udp_answers_are_retried_over_tcp(make_sidecar, upstream):
    sc = await make_sidecar()
    upstream.truncate_udp = True
    r = await sc.query("www.example.test", timeout=3.0)
    assert r.rcode() == dns.rcode.NOERROR and a_records(r) == ["10.0.0.1", "10.0.0.2"]
    assert upstream.tcp_queries >= 1
    assert ("www.example.test", "A", "tcp") in upstream.log
    r = await sc.query("many.example.test", tcp=True, timeout=3.0)
    assert len(a_records(r)) == 40
    assert ("many.example.test", "A", "tcp") in upstream.log


# ------------------------------------------------------------------------------- restart


async def test_upstream_restart_quarantine_and_recovery(make_sidecar, upstream):
    sc = await make_sidecar(timeout=0.3, tries=1)
    u = upstream_obj(sc, upstream)
    port = upstream.port
    await upstream.stop()
    r = await sc.query("www.example.test", timeout=2.0)
    assert r.rcode() == dns.rcode.SERVFAIL
    await asyncio.wait_for(wait_for_state(u, "quarantined"), WAIT)
    assert u.outcomes["unreachable"] + u.outcomes["timeout"] >= 1
    assert not await readiness(sc)
    r = await sc.query("mail.example.test", tcp=True, timeout=2.0)
    assert r.rcode() == dns.rcode.SERVFAIL
    await upstream.start()  # same port
    assert upstream.port == port
    await asyncio.wait_for(wait_for_state(u, "healthy"), WAIT)  # brought back by the prober
    assert upstream.count(".", "NS") >= 1
    assert await readiness(sc)
    for tcp in (False, True):
        r = await sc.query("h7.example.test", tcp=tcp, timeout=2.0)
        assert r.rcode() == dns.rcode.NOERROR and a_records(r) == ["127.0.0.1"]


# ------------------------------------------------------------------------------- known bug


def name_256() -> bytes:
    labels = [b"a" * 63] * 3 + [b"b" * 62]
    wire = b"".join(bytes((len(lb),)) + lb for lb in labels) + b"\x00"
    assert len(wire) == 256
    return wire


async def test_oversized_names_do_not_quarantine_the_upstream(make_sidecar, upstream):
    sc = await make_sidecar(timeout=0.3, tries=1)
    u = upstream_obj(sc, upstream)
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.connect(("127.0.0.1", sc.port))
    try:
        for i in range(3):  # at once, so no probe clears the failures in between
            name = name_256().replace(b"b", bytes((ord("c") + i,)))
            sock.send(struct.pack(">HHHHHH", i, 0x0100, 1, 0, 0, 0) + name + b"\x00\x01\x00\x01")
        rcodes = []
        for _ in range(3):
            reply = await asyncio.wait_for(loop.sock_recv(sock, 4096), 3.0)
            rcodes.append(reply[3] & 0x0F)
    finally:
        sock.close()
    await poll(lambda: u.inflight == 0)
    assert u.state == "healthy" and u.outcomes["timeout"] == 0
    assert sc.sc.ready and await readiness(sc)
    assert rcodes == [dns.rcode.FORMERR] * 3


async def test_stop_leaves_no_upstream_try_running(make_sidecar, upstream):
    sc = await make_sidecar(timeout=2.0, tries=1)
    upstream.drop = True
    client = asyncio.ensure_future(sc.query("www.example.test", timeout=4.0))
    await upstream.wait_for_queries(1)
    await sc.sc.stop(drain=0.2)  # the drain runs out before the 2 s try does
    names = ("Fetcher._fetch",)
    left = [t for t in asyncio.all_tasks() if getattr(t.get_coro(), "__qualname__", "") in names]
    try:
        assert not left, f"still running after stop(): {left}"
    finally:
        if left:
            await asyncio.wait(left, timeout=5.0)
        client.cancel()
        with contextlib.suppress(BaseException):
            await client


async def test_a_failing_miss_path_costs_one_answer_not_the_listener(make_sidecar, upstream,
                                                                     monkeypatch):
    # A bug that raises when a miss starts must not close the UDP socket or the TCP
    # connection: that query goes unanswered (counted as an error), the next ones are served.
    sc = await make_sidecar()
    assert (await sc.query("www.example.test")).answer  # cached before the fault
    resolver = sc.sc.resolver

    def broken(key: bytes):
        raise RuntimeError("injected")

    monkeypatch.setattr(resolver, "lookup", broken)
    with pytest.raises(dns.exception.Timeout):
        await sc.query("mail.example.test", timeout=0.5)
    assert sc.sc.udp[0].errors == 1
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.port)
    for name in ("mail.example.test", "www.example.test"):  # a miss that fails, then a hit
        wire = dns.message.make_query(name, "A", id=7).to_wire()
        writer.write(len(wire).to_bytes(2, "big") + wire)
    size = int.from_bytes(await asyncio.wait_for(reader.readexactly(2), 5), "big")
    reply = dns.message.from_wire(await reader.readexactly(size))
    assert reply.answer and str(reply.question[0].name) == "www.example.test."
    writer.close()
    assert sc.sc.tcp[0].errors == 1
    monkeypatch.undo()
    assert (await sc.query("mail.example.test")).answer  # the UDP listener still serves


# ------------------------------------------------------------------------------- fuzz


def test_fuzz_smoke():
    """The fuzz script, briefly: 3000 packets (10 s cap) at a real sidecar process."""
    proc = subprocess.run(
        [sys.executable, "-m", "tests.fuzz.fuzz_sidecar", "--packets", "3000", "--seconds", "10"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "fuzz_sidecar: OK" in proc.stdout
