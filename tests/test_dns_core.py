"""The sidecar's DNS behaviour, queried by real clients over real loopback sockets."""

from __future__ import annotations

import asyncio
import struct

import dns.asyncquery
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from tests.conftest import expire_all, query


def rrset_texts(msg: dns.message.Message, rdtype: str) -> list[str]:
    want = dns.rdatatype.from_text(rdtype)
    return sorted(rd.to_text() for rrset in msg.answer if rrset.rdtype == want for rd in rrset)


@pytest.mark.parametrize(
    ("name", "rdtype", "expected"),
    [
        ("www.example.test", "A", ["10.0.0.1", "10.0.0.2"]),
        ("www.example.test", "AAAA", ["2001:db8::1"]),
        ("alias.example.test", "CNAME", ["www.example.test."]),
        ("example.test", "MX", ["10 mail.example.test."]),
        ("example.test", "TXT", ['"v=spf1 -all"']),
        ("example.test", "NS", ["ns.example.test."]),
        ("_sip._udp.example.test", "SRV", ["0 5 5060 sip.example.test."]),
        ("1.0.0.10.in-addr.arpa", "PTR", ["www.example.test."]),
        ("example.test", "CAA", ['0 issue "letsencrypt.org"']),
    ],
)
async def test_answers_per_type(sidecar, name, rdtype, expected):
    for tcp in (False, True):
        r = await sidecar.query(name, rdtype, tcp=tcp)
        assert r.rcode() == dns.rcode.NOERROR
        assert r.flags & dns.flags.RA and r.flags & dns.flags.QR
        assert not r.flags & dns.flags.AA  # a cache is not authoritative
        assert rrset_texts(r, rdtype) == expected


async def test_soa_answer(sidecar):
    r = await sidecar.query("example.test", "SOA")
    (soa,) = rrset_texts(r, "SOA")
    assert soa.startswith("ns.example.test. hostmaster.example.test. 1 ")


async def test_cname_chain_for_address_query(sidecar):
    r = await sidecar.query("alias2.example.test", "A")
    chain = [(str(rr.name), dns.rdatatype.to_text(rr.rdtype)) for rr in r.answer]
    assert chain == [("alias2.example.test.", "CNAME"), ("alias.example.test.", "CNAME"),
                     ("www.example.test.", "A")]
    assert rrset_texts(r, "A") == ["10.0.0.1", "10.0.0.2"]
    assert rrset_texts(r, "CNAME") == ["alias.example.test.", "www.example.test."]


async def test_ttl_floor_and_cap(make_sidecar):
    sc = await make_sidecar(min_ttl=30, max_ttl=100)
    short = await sc.query("short.example.test")  # upstream TTL 5
    assert short.answer[0].ttl == 30
    www = await sc.query("www.example.test")  # upstream TTL 300
    assert www.answer[0].ttl == 100


async def test_ttl_counts_down_and_second_query_is_a_hit(clock, make_sidecar):
    sidecar = await make_sidecar()
    up = sidecar.upstream
    first = await sidecar.query("www.example.test")
    assert first.answer[0].ttl == 300
    # Age the cache by 7 s instead of waiting 7 s (www is the only name asked).
    clock.advance(7)
    second = await sidecar.query("www.example.test")
    assert second.answer[0].ttl == 293
    assert up.count("www.example.test", "A") == 1
    assert sidecar.cache.hits >= 1


async def test_expired_entry_is_refetched_from_upstream(clock, make_sidecar):
    """The c-ares query cache must not answer a refresh: the upstream sees both queries."""
    sidecar = await make_sidecar()
    up = sidecar.upstream
    await sidecar.query("www.example.test")
    expire_all(sidecar.cache, clock)
    await sidecar.query("www.example.test")
    assert up.count("www.example.test", "A") == 2


async def test_coalescing_500_identical_cold_queries(sidecar):
    up = sidecar.upstream
    up.latency = 0.3
    replies = await asyncio.gather(*(sidecar.query("www.example.test", timeout=5)
                                     for _ in range(500)))
    assert up.count("www.example.test", "A") == 1
    assert all(rrset_texts(r, "A") == ["10.0.0.1", "10.0.0.2"] for r in replies)
    assert len(replies) == 500
    resolver = sidecar.sc.resolver
    assert resolver.coalescer.coalesced + sidecar.cache.hits == 499


async def test_nxdomain_cached_with_soa(sidecar):
    up = sidecar.upstream
    for _ in range(2):
        r = await sidecar.query("nope.example.test")
        assert r.rcode() == dns.rcode.NXDOMAIN
        (soa,) = r.authority
        assert soa.rdtype == dns.rdatatype.SOA and str(soa.name) == "example.test."
        assert 0 < soa.ttl <= 60  # min(SOA TTL, MINIMUM) of the zone
    assert up.count("nope.example.test", "A") == 1


async def test_nodata_cached_with_soa(sidecar):
    up = sidecar.upstream
    for _ in range(2):
        r = await sidecar.query("v4only.example.test", "AAAA")
        assert r.rcode() == dns.rcode.NOERROR and not r.answer
        (soa,) = r.authority
        assert str(soa.name) == "example.test." and soa.rdtype == dns.rdatatype.SOA
    assert up.count("v4only.example.test", "AAAA") == 1


async def test_negative_answers_take_one_upstream_query(sidecar):
    # The SOA comes from the reply's authority section: no SOA lookups of the zone.
    up = sidecar.upstream
    before = up.queries
    nx = await sidecar.query("gone.example.test")
    nodata = await sidecar.query("v4only.example.test", "AAAA")
    assert nx.rcode() == dns.rcode.NXDOMAIN and nx.authority[0].rdtype == dns.rdatatype.SOA
    assert not nodata.answer and nodata.authority[0].rdtype == dns.rdatatype.SOA
    assert up.queries - before == 2
    assert up.count("example.test", "SOA") == 0
    assert sidecar.sc.resolver.soa.lookups == 0


async def test_negative_answer_without_soa_learns_it(sidecar):
    # An upstream that strips the authority section: the SOA is learned with SOA queries.
    up = sidecar.upstream
    up.strip_authority = True
    r = await sidecar.query("stripped.example.test")
    assert r.rcode() == dns.rcode.NXDOMAIN
    (soa,) = r.authority
    assert str(soa.name) == "example.test." and 0 < soa.ttl <= 60
    assert up.count("example.test", "SOA") == 1
    r = await sidecar.query("stripped2.example.test")
    assert str(r.authority[0].name) == "example.test."
    assert up.count("example.test", "SOA") == 1  # remembered


async def test_query_dns_path_when_pycares_internals_are_missing(make_sidecar, monkeypatch):
    # Without caresquery (pycares changed), aiodns's query_dns answers and soa.py supplies
    # the SOA that query_dns leaves out of negative answers.
    from sidecar.upstream import query as caresquery
    monkeypatch.setattr(caresquery, "AVAILABLE", False)
    sc = await make_sidecar()
    r = await sc.query("www.example.test")
    assert rrset_texts(r, "A")
    r = await sc.query("absent.example.test")
    assert r.rcode() == dns.rcode.NXDOMAIN and str(r.authority[0].name) == "example.test."
    assert sc.sc.resolver.soa.lookups >= 1
    r = await sc.query("multi.example.test", "TXT")  # query_dns joins the strings
    assert rrset_texts(r, "TXT") == ['"hello worldsecond"']


async def test_txt_character_strings_kept(sidecar):
    r = await sidecar.query("multi.example.test", "TXT")
    assert rrset_texts(r, "TXT") == ['"hello world" "second"']


async def test_negative_ttl_capped(make_sidecar):
    sc = await make_sidecar(max_negative_ttl=10)
    r = await sc.query("nope2.example.test")
    assert r.authority[0].ttl == 10


async def test_negative_answer_for_second_zone_uses_its_soa(sidecar):
    r = await sidecar.query("nothing.corp.internal")
    assert r.rcode() == dns.rcode.NXDOMAIN
    assert str(r.authority[0].name) == "corp.internal."
    assert r.authority[0].ttl <= 30


async def test_large_answer_truncated_over_udp_then_complete_over_tcp(sidecar):
    q = dns.message.make_query("big.example.test", "TXT", use_edns=False)
    udp = await dns.asyncquery.udp(q, "127.0.0.1", port=sidecar.port, timeout=3)
    assert udp.flags & dns.flags.TC
    assert not udp.answer
    assert udp.question[0].name == q.question[0].name
    full, used_tcp = await dns.asyncquery.udp_with_fallback(q, "127.0.0.1", port=sidecar.port,
                                                           timeout=3)
    assert used_tcp
    assert len(rrset_texts(full, "TXT")) == 12


async def test_edns_size_is_honoured(sidecar):
    # 40 A records are ~700 bytes: too big for 512, fine for an EDNS 1232 client.
    plain = await sidecar.query("many.example.test", use_edns=False)
    assert plain.flags & dns.flags.TC and plain.edns < 0
    edns = await sidecar.query("many.example.test", use_edns=0, payload=1232)
    assert not edns.flags & dns.flags.TC and len(rrset_texts(edns, "A")) == 40
    assert edns.edns == 0  # OPT echoed


async def test_opt_only_when_asked(sidecar):
    assert (await sidecar.query("www.example.test", use_edns=False)).edns < 0
    assert (await sidecar.query("www.example.test", use_edns=0)).edns == 0


async def test_edns_version_1_gets_badvers(sidecar):
    r = await sidecar.query("www.example.test", use_edns=1)
    assert r.rcode() == dns.rcode.BADVERS


async def test_0x20_case_echoed_exactly(sidecar, raw_udp):
    await sidecar.query("www.example.test")  # cached in lower case
    q = dns.message.make_query("WwW.ExAmPlE.tEsT", "A")
    wire = q.to_wire()
    sock = raw_udp(sidecar.port)
    sock.send(wire)
    reply = await sock.recv()
    qend = 12 + len(b"\x03WwW\x07ExAmPlE\x04tEsT\x00") + 4
    assert reply[:2] == wire[:2]
    assert reply[12:qend] == wire[12:qend]
    r = dns.message.from_wire(reply)
    assert rrset_texts(r, "A") == ["10.0.0.1", "10.0.0.2"]


async def test_malformed_queries(sidecar, raw_udp):
    sock = raw_udp(sidecar.port)
    good = dns.message.make_query("www.example.test", "A")
    good.id = 4242

    # Readable header, broken question: FORMERR with the same ID.
    bad = struct.pack(">HHHHHH", 777, 0x0100, 1, 0, 0, 0) + b"\x40abc"
    sock.send(bad)
    r = dns.message.from_wire(await sock.recv())
    assert r.id == 777 and r.rcode() == dns.rcode.FORMERR

    # Two questions: FORMERR.
    two = struct.pack(">HHHHHH", 778, 0x0100, 2, 0, 0, 0) + (b"\x01a\x00\x00\x01\x00\x01" * 2)
    sock.send(two)
    r = dns.message.from_wire(await sock.recv())
    assert r.id == 778 and r.rcode() == dns.rcode.FORMERR

    # Opcode STATUS: NOTIMP.
    status = struct.pack(">HHHHHH", 779, 0x1000, 0, 0, 0, 0)
    sock.send(status)
    r = dns.message.from_wire(await sock.recv())
    assert r.id == 779 and r.rcode() == dns.rcode.NOTIMP

    # Too short to have a header, and a response (QR=1): no reply at all. The good query
    # sent after them is the next thing that comes back.
    sock.send(b"\x01\x02\x03")
    sock.send(struct.pack(">HHHHHH", 780, 0x8180, 1, 0, 0, 0) + b"\x01a\x00\x00\x01\x00\x01")
    sock.send(good.to_wire())
    r = dns.message.from_wire(await sock.recv())
    assert r.id == 4242 and r.rcode() == dns.rcode.NOERROR
    stats = sidecar.sc.handler
    assert stats.dropped == 2 and stats.rcodes[dns.rcode.FORMERR] == 2


async def test_non_in_class_refused_and_unknown_type_notimp(sidecar):
    r = await sidecar.query("www.example.test", "TXT", rdclass="CH")
    assert r.rcode() == dns.rcode.REFUSED
    r = await sidecar.query("www.example.test", "DNSKEY")
    assert r.rcode() == dns.rcode.NOTIMP


async def test_lru_bound(make_sidecar):
    sc = await make_sidecar(cache_size=3)
    for name in ("h1", "h2", "h3"):
        await sc.query(f"{name}.example.test")
    await sc.query("h1.example.test")  # h1 becomes most recently used
    await sc.query("h4.example.test")  # evicts h2, the least recently used
    assert len(sc.cache) == 3 and sc.cache.evictions == 1
    names = {sc.cache.describe_key(k)[0] for k in sc.cache.entries}
    assert names == {"h1.example.test", "h3.example.test", "h4.example.test"}
    up = sc.upstream
    await sc.query("h1.example.test")
    assert up.count("h1.example.test", "A") == 1
    await sc.query("h2.example.test")
    assert up.count("h2.example.test", "A") == 2


async def test_servfail_on_dead_upstream_within_budget(make_sidecar):
    sc = await make_sidecar(timeout=0.3, tries=2)
    sc.upstream.drop = True
    # The client's own timeout is the bound: budget 0.6 s plus slack.
    r = await sc.query("www.example.test", timeout=1.6)
    assert r.rcode() == dns.rcode.SERVFAIL
    assert sc.upstream.count("www.example.test", "A") >= 1


async def test_upstream_rcode_preserved(sidecar):
    sidecar.upstream.name_rcode = {"broken.example.test": "SERVFAIL"}
    r = await sidecar.query("broken.example.test")
    assert r.rcode() == dns.rcode.SERVFAIL
    sidecar.upstream.name_rcode = {"gone.example.test": "NXDOMAIN"}
    r = await sidecar.query("gone.example.test")
    assert r.rcode() == dns.rcode.NXDOMAIN


async def test_servfail_remembered_only_briefly(clock, make_sidecar):
    sc = await make_sidecar(timeout=0.2, tries=1, servfail_ttl=5)
    sc.upstream.name_rcode = {"mail.example.test": "SERVFAIL"}
    await sc.query("mail.example.test")
    await sc.query("mail.example.test")
    assert sc.upstream.count("mail.example.test", "A") == 1
    (entry,) = [e for k, e in sc.cache.items() if b"mail" in k]
    # stored and expires are monotonic-clock floats: compare the difference approximately.
    assert entry.expires - entry.stored == pytest.approx(5)
    sc.upstream.name_rcode = {}
    expire_all(sc.cache, clock)
    r = await sc.query("mail.example.test")
    assert r.rcode() == dns.rcode.NOERROR


async def test_inflight_bound_queues_instead_of_refusing(make_sidecar):
    sc = await make_sidecar(max_inflight=2)
    sc.upstream.latency = 0.05
    names = [f"h{i}.example.test" for i in range(40)]
    replies = await asyncio.gather(*(sc.query(n, timeout=5) for n in names))
    assert all(r.rcode() == dns.rcode.NOERROR and r.answer for r in replies)
    assert sc.sc.resolver.shed == 0


async def test_tcp_pipelined_queries_on_one_connection(sidecar):
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port)
    ids = []
    blob = b""
    for i, name in enumerate(("www.example.test", "mail.example.test", "nope.example.test")):
        q = dns.message.make_query(name, "A")
        q.id = 100 + i
        ids.append(q.id)
        w = q.to_wire()
        blob += len(w).to_bytes(2, "big") + w
    writer.write(blob)
    await writer.drain()
    got = {}
    for _ in ids:
        size = int.from_bytes(await reader.readexactly(2), "big")
        r = dns.message.from_wire(await reader.readexactly(size))
        got[r.id] = r
    writer.close()
    assert sorted(got) == ids
    assert got[100].answer and got[101].answer
    assert got[102].rcode() == dns.rcode.NXDOMAIN


async def test_tcp_client_gone_mid_miss_leaves_the_shared_fetch_running(make_sidecar, upstream):
    # Clients waiting for a miss are answered from a callback on the shared fetch: one that
    # goes away must not cancel it for the others, nor count as an error.
    sc = await make_sidecar()
    upstream.name_latency = {"www.example.test": 0.3}
    seen = upstream.queries
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.port)
    wire = dns.message.make_query("www.example.test", "A").to_wire()
    writer.write(len(wire).to_bytes(2, "big") + wire)
    await writer.drain()
    await upstream.wait_for_queries(seen + 1)
    writer.close()  # gone before its answer
    r = await sc.query("www.example.test")  # joins the fetch in flight
    assert r.rcode() == dns.rcode.NOERROR and r.answer
    assert upstream.count("www.example.test") == 1
    assert sc.sc.tcp[0].errors == 0 and sc.sc.udp[0].errors == 0


async def test_tcp_idle_connection_closed(make_sidecar):
    sc = await make_sidecar(tcp_idle_timeout=0.2)
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.port)
    assert await asyncio.wait_for(reader.read(), 5) == b""  # EOF from the server
    writer.close()
    assert sc.sc.tcp[0].idle_closed == 1


async def test_tcp_connection_bound(make_sidecar):
    sc = await make_sidecar(tcp_max_connections=1)
    r1, w1 = await asyncio.open_connection("127.0.0.1", sc.port)
    r2, w2 = await asyncio.open_connection("127.0.0.1", sc.port)
    assert await asyncio.wait_for(r2.read(), 5) == b""  # the second is closed at once
    r = await query(sc.port, "www.example.test", tcp=False)
    assert r.answer
    w1.close()
    w2.close()
    assert sc.sc.tcp[0].rejected == 1


async def test_ipv6_listener(make_sidecar):
    import socket

    try:
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        s.bind(("::1", 0))
        s.close()
    except OSError:
        pytest.skip("no IPv6 loopback")
    from sidecar import HostPort

    sc = await make_sidecar(listen=(HostPort("::1", 0),))
    for tcp in (False, True):
        r = await query(sc.port, "www.example.test", host="::1", tcp=tcp)
        assert rrset_texts(r, "A") == ["10.0.0.1", "10.0.0.2"]


async def test_no_aaaa(make_sidecar):
    sc = await make_sidecar(no_aaaa=True)
    r = await sc.query("www.example.test", "AAAA")
    assert r.rcode() == dns.rcode.NOERROR and not r.answer
    assert sc.upstream.count("www.example.test", "AAAA") == 0
    assert (await sc.query("www.example.test", "A")).answer
