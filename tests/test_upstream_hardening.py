"""Issue 14 (1, 2, 6): upstream queries an off-path forger cannot answer, no busy loop after a
TCP fallback, and slow upstreams whose answers are still accepted.

RFC 5452: every upstream query from its own random source port (a retransmission too), EDNS
with cookies, optional DNS 0x20. A forger that sends a forged answer with every one of the
65,536 IDs, from the upstream's address and port, to the port the previous query used (all it
could learn) must not get anything served or cached.
"""

from __future__ import annotations

import asyncio
import os
import selectors
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest
from dnslib import DNSLabel

import sidecar.upstream.cares
from sidecar import HostPort
from sidecar.testing.fakeupstream import FakeUpstream
from sidecar.testing.upstreams import idle
from tests.forger import RecordingUpstream, answer, forge
from tests.helpers import free_port, upstream_obj

REPO = Path(__file__).resolve().parent.parent
#: CPU seconds a process may use while idle over IDLE_WINDOW (a busy loop uses all of it).
IDLE_WINDOW = 2.0
IDLE_CPU_BUDGET = 0.3


def a_records(msg: dns.message.Message) -> list[str]:
    return sorted(rd.to_text() for rrs in msg.answer if rrs.rdtype == dns.rdatatype.A
                  for rd in rrs)


@pytest.fixture
async def recorder():
    up = await RecordingUpstream.start()
    try:
        yield up
    finally:
        up.close()


async def recorded_sidecar(make_sidecar, recorder: RecordingUpstream, **kw):
    kw.setdefault("timeout", 2.0)
    kw.setdefault("tries", 1)
    return await make_sidecar(upstreams=(HostPort("127.0.0.1", recorder.port),), **kw)


def cached_addresses(sc) -> bytes:
    return b"".join(entry.body for _key, entry in sc.cache.items())


# ------------------------------------------------------------------ source ports (RFC 5452)


async def test_each_upstream_query_leaves_from_its_own_port(make_sidecar, recorder):
    sc = await recorded_sidecar(make_sidecar, recorder)
    n = 40
    for i in range(n):
        r = await sc.query(f"seq{i}.example.test")
        assert a_records(r) == [RecordingUpstream.ADDRESS]
    ports = [s.port for s in recorder.seen]
    assert len(ports) == n
    # The kernel picks each port at random from ~28k: a repeat now and then is chance.
    assert len(set(ports)) >= n - 3, ports
    # Queries in flight at once each hold their own socket.
    # Held until all n have arrived, so all n are in flight at once.
    recorder.seen.clear()
    recorder.hold = True
    burst = asyncio.gather(*(sc.query(f"burst{i}.example.test") for i in range(n)))
    await recorder.wait_for(n)
    recorder.release()
    replies = await burst
    assert all(a_records(r) == [RecordingUpstream.ADDRESS] for r in replies)
    assert len({s.port for s in recorder.seen}) == n
    assert sidecar.upstream.cares.per_query_ports is True


async def test_a_resent_query_gets_a_new_port(make_sidecar, recorder):
    sc = await recorded_sidecar(make_sidecar, recorder)
    for i in range(5):  # answered fast: c-ares now gives up on a packet after 250 ms
        await sc.query(f"warm{i}.example.test")
    recorder.seen.clear()
    recorder.drop_next = 1
    r = await sc.query("lost.example.test")
    assert a_records(r) == [RecordingUpstream.ADDRESS]
    first, second = recorder.seen
    assert first.question == second.question and first.port != second.port
    assert upstream_obj(sc, recorder).resends == 1


async def test_forger_that_knows_the_last_port_cannot_answer_the_next_query(make_sidecar,
                                                                            recorder):
    """The attack of issue 14: the real answer is delayed, and 65,536 forged replies (every
    ID) arrive from the upstream's address first. With one fixed source port the forger only
    had to know that port (it could learn it from any earlier query) and guess the ID; now the
    port it knows is closed, and a blind forger would have to guess ~28k ports x 65,536 IDs."""
    # A long try, so the race does not depend on how fast this host sends 65,536 packets.
    sc = await recorded_sidecar(make_sidecar, recorder, timeout=8.0)
    assert a_records(await sc.query("first.example.test")) == [RecordingUpstream.ADDRESS]
    known_port = recorder.seen[-1].port

    recorder.hold = True
    pending = asyncio.ensure_future(sc.query("victim.example.test", timeout=10.0))
    await recorder.wait_for(2)
    victim = recorder.seen[-1]
    t0 = time.monotonic()
    sent = await forge(recorder, known_port, victim.question)
    assert sent == 65536
    forging = time.monotonic() - t0
    recorder.release()  # now the real answer (to every packet of the query)
    r = await pending
    assert r.rcode() == dns.rcode.NOERROR and a_records(r) == [RecordingUpstream.ADDRESS]
    r = await sc.query("victim.example.test")  # from the cache
    assert a_records(r) == [RecordingUpstream.ADDRESS]
    assert b"\x06\x06\x06\x06" not in cached_addresses(sc)
    assert all(seen.port != known_port for seen in recorder.seen[1:])
    print(f"65,536 forged replies sent in {forging:.2f} s")


async def test_a_reply_on_another_querys_socket_is_dropped(make_sidecar, recorder):
    """c-ares matches a reply to the socket its query left from, not only to the ID: a forger
    that learned the port of one query in flight cannot answer another one through it."""
    sc = await recorded_sidecar(make_sidecar, recorder)
    recorder.hold = True
    one = asyncio.ensure_future(sc.query("one.example.test", timeout=5.0))
    await recorder.wait_for(1)
    two = asyncio.ensure_future(sc.query("two.example.test", timeout=5.0))
    await recorder.wait_for(2)
    first, second = recorder.seen
    assert first.port != second.port
    # The exact ID and question of the second query, to the first query's open socket.
    recorder.transport.sendto(answer(second.qid, second.question, "6.6.6.6", 86400),
                              ("127.0.0.1", first.port))
    recorder.release()
    assert a_records(await one) == [RecordingUpstream.ADDRESS]
    assert a_records(await two) == [RecordingUpstream.ADDRESS]
    assert b"\x06\x06\x06\x06" not in cached_addresses(sc)


# ------------------------------------------------------------------ EDNS and 0x20


async def test_upstream_queries_carry_edns_and_a_cookie(make_sidecar, upstream):
    seen: list[tuple[int, list[int]]] = []

    def hook(req, _reply) -> None:
        for rr in req.ar:
            if rr.rtype == 41:
                seen.append((rr.rclass, [opt.code for opt in rr.rdata]))

    upstream.reply_hook = hook
    sc = await make_sidecar()
    r = await sc.query("www.example.test")
    assert a_records(r) == ["10.0.0.1", "10.0.0.2"]
    assert seen, "no OPT record in the upstream query"
    size, codes = seen[0]
    assert size >= 1232 and 10 in codes  # EDNS payload size; COOKIE option (RFC 7873)


async def test_0x20_off_by_default_sends_the_name_as_asked(make_sidecar, upstream):
    sc = await make_sidecar()
    for name in ("www.example.test", "mail.example.test"):
        assert (await sc.query(name)).answer
    assert [n for n, _t, _p in upstream.log] == ["www.example.test", "mail.example.test"]


async def test_0x20_randomises_the_case_and_accepts_an_echo(make_sidecar, upstream):
    sc = await make_sidecar(upstream_0x20=True)
    names = ["www.example.test", "mail.example.test", "v4only.example.test"]
    for name in names:
        r = await sc.query(name)
        assert r.rcode() == dns.rcode.NOERROR and a_records(r), name
    wire = [n for n, _t, _p in upstream.log]
    assert [w.lower() for w in wire] == names
    assert all(w != w.lower() for w in wire), wire  # 2^-14 or less each to stay lower


async def test_0x20_drops_a_reply_that_does_not_echo_the_case(make_sidecar, upstream):
    def lowercase(_req, reply) -> None:
        q = reply.questions[0]
        q.qname = DNSLabel(str(q.qname).lower())

    upstream.reply_hook = lowercase
    sc = await make_sidecar(upstream_0x20=True, timeout=0.3, tries=1)
    r = await sc.query("v4only.example.test", timeout=3.0)
    assert r.rcode() == dns.rcode.SERVFAIL
    assert upstream.count("v4only.example.test") >= 1
    assert b"\x0a\x00\x00\x04" not in cached_addresses(sc)
    # Without 0x20 the same upstream is fine (c-ares compares the question case-blind).
    sc2 = await make_sidecar(timeout=0.3, tries=1)
    r = await sc2.query("v4only.example.test", timeout=3.0)
    assert a_records(r) == ["10.0.0.4"]


# ------------------------------------------------------------------ slow upstreams (6)


async def test_steady_slow_upstream_is_answered_after_fast_history(make_sidecar, upstream):
    """1.5 s per answer with --timeout 2: c-ares alone gives up on each packet after
    max(250 ms, 5 x RTT) once it has seen fast answers, and the late reply was lost."""
    sc = await make_sidecar(timeout=2.0, tries=2)
    u = upstream_obj(sc, upstream)
    for i in range(6):  # fast answers first, so c-ares' dynamic timeout is ~250 ms
        assert (await sc.query(f"h{i}.example.test")).answer
    upstream.latency = 1.5
    for name in ("www.example.test", "mail.example.test"):
        r = await sc.query(name, timeout=5.0)
        assert r.rcode() == dns.rcode.NOERROR and r.answer, name
    assert u.outcomes["timeout"] == 0
    assert u.resends >= 2  # c-ares did give up on the first packets
    # Concurrent slow misses too (each resent on a fresh channel, one port per packet).
    replies = await asyncio.gather(*(sc.query(f"h{10 + i}.example.test", timeout=5.0)
                                     for i in range(5)))
    assert all(r.rcode() == dns.rcode.NOERROR and r.answer for r in replies)
    assert u.outcomes["timeout"] == 0


async def test_resends_answered_fast_do_not_shorten_the_next_resends(make_sidecar, recorder):
    """Lost packets resent and answered at once teach c-ares a short timeout on the channel
    they were resent on; a slow answer after that must still be waited for."""
    sc = await recorded_sidecar(make_sidecar, recorder, timeout=2.0, tries=1)
    u = upstream_obj(sc, recorder)
    for i in range(4):
        await sc.query(f"warm{i}.example.test")
    for i in range(4):  # each first packet lost, each resend answered at once
        recorder.drop_next = 1
        assert a_records(await sc.query(f"lossy{i}.example.test")) == ["10.0.0.1"]
    assert u.resends == 4
    recorder.latency = 1.5
    r = await sc.query("slow.example.test", timeout=5.0)
    assert r.rcode() == dns.rcode.NOERROR and a_records(r) == ["10.0.0.1"]
    assert u.outcomes["timeout"] == 0
    await asyncio.wait_for(idle(u), 10)
    assert not u._retired  # channels that measured too much are closed once idle


async def test_slow_answer_after_a_medium_rtt_history(recorder, make_sidecar):
    """150 ms answers make c-ares wait 5 x 150 ms before giving up on a packet; a resend only
    then would leave 1.25 s for a 1.5 s answer. It goes out after resend_delay instead."""
    sc = await recorded_sidecar(make_sidecar, recorder, timeout=2.0, tries=1)
    recorder.latency = 0.15
    for i in range(4):
        assert a_records(await sc.query(f"warm{i}.example.test")) == ["10.0.0.1"]
    recorder.latency = 1.5
    r = await sc.query("slow.example.test", timeout=5.0)
    assert r.rcode() == dns.rcode.NOERROR and a_records(r) == ["10.0.0.1"]
    assert upstream_obj(sc, recorder).outcomes["timeout"] == 0


async def test_steady_slow_upstream_is_answered_from_a_cold_start(make_sidecar, upstream):
    sc = await make_sidecar(timeout=2.0, tries=2)
    upstream.latency = 1.5
    r = await sc.query("www.example.test", timeout=5.0)
    assert r.rcode() == dns.rcode.NOERROR and r.answer
    assert upstream_obj(sc, upstream).outcomes["timeout"] == 0


async def test_slow_first_try_fails_over_and_still_counts(make_sidecar, upstream,
                                                          second_upstream, monkeypatch):
    import sidecar.upstream.pool

    monkeypatch.setattr(sidecar.upstream.pool, "EXPLORE_SHARE", 0.0)
    slow, fast = second_upstream, upstream
    sc = await make_sidecar(upstreams=(hp_(slow), hp_(fast)), timeout=2.0, tries=2)
    fast.latency = 0.02  # during the warm-up, so the (later) slow server ranks first
    for i in range(5):
        await sc.query(f"h{i}.example.test")
    assert upstream_obj(sc, slow).outcomes["ok"] >= 3  # c-ares now times it from RTTs
    slow.latency, fast.latency = 1.5, 0.0
    r = await sc.query("www.example.test", timeout=5.0)
    assert r.answer
    # The hedge asked the fast server, which answered first; the resend to the slow one
    # (on a fresh channel) does not replace failing over.
    assert sc.sc.pools.default.hedged >= 1 and fast.count("www.example.test") == 1
    slow_u = upstream_obj(sc, slow)
    await asyncio.wait_for(idle(slow_u), 10)
    assert slow_u.outcomes["timeout"] == 0 and slow_u.outcomes["ok"] >= 1


def hp_(up: FakeUpstream) -> HostPort:
    return HostPort("127.0.0.1", up.port)


# ------------------------------------------------------------------ idle CPU after TCP


def proc_cpu(pid: int) -> float:
    """utime + stime of ``pid`` in seconds (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_cpu(pid: int) -> float:
    before = proc_cpu(pid)
    time.sleep(IDLE_WINDOW)  # the measurement window itself, not a synchronisation
    return proc_cpu(pid) - before


def read_line(p: subprocess.Popen, stream, needle: str, timeout: float = 30.0) -> str:
    sel = selectors.DefaultSelector()
    sel.register(stream, selectors.EVENT_READ)
    end = time.monotonic() + timeout
    lines = []
    while time.monotonic() < end:
        if not sel.select(timeout=end - time.monotonic()):
            break
        line = stream.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return line
    p.kill()
    raise AssertionError(f"{needle!r} not seen; got {lines!r}")


@pytest.fixture
def tcp_upstream():
    up = FakeUpstream()
    up.truncate_udp = True  # every answer needs the TCP fallback
    up.start_in_thread()
    yield up
    up.stop_in_thread()


def test_sidecar_process_idles_after_a_tcp_fallback(tcp_upstream):
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "sidecar", "--listen", f"127.0.0.1:{port}",
                          "--http", "off", "--upstream", tcp_upstream.address],
                         cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        read_line(p, p.stderr, "listening on")
        r = dns.query.udp(dns.message.make_query("www.example.test", "A"), "127.0.0.1",
                          port=port, timeout=5)
        assert a_records(r) == ["10.0.0.1", "10.0.0.2"]
        assert tcp_upstream.tcp_queries >= 1
        used = idle_cpu(p.pid)
        assert used < IDLE_CPU_BUDGET, f"sidecar used {used:.2f} s CPU in {IDLE_WINDOW} s idle"
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


CLIENT = textwrap.dedent("""
    import asyncio, sys
    from sidecar.upstream.cares import LoopResolver

    async def main():
        r = LoopResolver(nameservers=[sys.argv[1]], timeout=2.0, tries=2,
                         flags=__import__("pycares").ARES_FLAG_NOSEARCH
                         | __import__("pycares").ARES_FLAG_STAYOPEN)
        assert r.loop_driven
        res = await r.query_dns("www.example.test", "A")
        print("resolved", sorted(a.data.addr for a in res.answer), flush=True)
        await asyncio.sleep(30)  # idle with the loop running, until the test kills us

    asyncio.run(main())
""")


def test_client_process_idles_after_a_tcp_fallback(tcp_upstream):
    """The client (client.resolver) drives its channel with the same LoopResolver."""
    p = subprocess.Popen([sys.executable, "-c", CLIENT, tcp_upstream.address], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = read_line(p, p.stdout, "resolved")
        assert "10.0.0.1" in line
        assert tcp_upstream.tcp_queries >= 1
        used = idle_cpu(p.pid)
        assert used < IDLE_CPU_BUDGET, f"client used {used:.2f} s CPU in {IDLE_WINDOW} s idle"
    finally:
        p.kill()
        p.wait()
