"""Tests for the loopback fake DNS upstream used by the sidecar tests and benchmarks.

All traffic goes to 127.0.0.1.  Synchronisation uses the server's counters and
``wait_for_queries``; the only timeouts are dnspython query timeouts.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import sys
from pathlib import Path

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from sidecar.testing.fakeupstream import FakeUpstream, Zone, default_zone

LOOPBACK = "127.0.0.1"
TIMEOUT = 2.0


def _query(name: str, rdtype: str = "A", **kw) -> dns.message.Message:
    return dns.message.make_query(name, rdtype, **kw)


async def udp(
    server: FakeUpstream, name: str, rdtype: str = "A", dns_timeout: float = TIMEOUT, **kw
):
    return await dns.asyncquery.udp(
        _query(name, rdtype, **kw), LOOPBACK, port=server.port, timeout=dns_timeout
    )


async def tcp(
    server: FakeUpstream, name: str, rdtype: str = "A", dns_timeout: float = TIMEOUT, **kw
):
    return await dns.asyncquery.tcp(
        _query(name, rdtype, **kw), LOOPBACK, port=server.port, timeout=dns_timeout
    )


def rrsets(
    msg: dns.message.Message, section: str = "answer"
) -> list[tuple[str, str, int, list[str]]]:
    out = []
    for rrset in getattr(msg, section):
        out.append(
            (
                rrset.name.to_text(),
                dns.rdatatype.to_text(rrset.rdtype),
                rrset.ttl,
                sorted(rd.to_text() for rd in rrset),
            )
        )
    return out


async def tcp_connect(server: FakeUpstream):
    return await asyncio.wait_for(asyncio.open_connection(LOOPBACK, server.port), TIMEOUT)


def frame(msg: dns.message.Message | bytes) -> bytes:
    wire = msg if isinstance(msg, bytes) else msg.to_wire()
    return struct.pack("!H", len(wire)) + wire


async def read_frame(reader: asyncio.StreamReader) -> dns.message.Message:
    (n,) = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), TIMEOUT))
    return dns.message.from_wire(await asyncio.wait_for(reader.readexactly(n), TIMEOUT))


# --------------------------------------------------------------------------- answers


async def test_a_answer_udp_and_tcp(up: FakeUpstream) -> None:
    for send in (udp, tcp):
        r = await send(up, "www.example.test", "A")
        assert r.rcode() == dns.rcode.NOERROR
        assert r.flags & dns.flags.AA and r.flags & dns.flags.RA and r.flags & dns.flags.RD
        assert not r.flags & dns.flags.TC
        assert rrsets(r) == [("www.example.test.", "A", 300, ["10.0.0.1", "10.0.0.2"])]
    r = await udp(up, "www.example.test", "AAAA")
    assert rrsets(r) == [("www.example.test.", "AAAA", 300, ["2001:db8::1"])]


async def test_reply_id_and_rd_echoed(up: FakeUpstream) -> None:
    q = _query("www.example.test")
    q.id = 4242
    q.flags &= ~dns.flags.RD
    r = await dns.asyncquery.udp(q, LOOPBACK, port=up.port, timeout=TIMEOUT)
    assert r.id == 4242
    assert not r.flags & dns.flags.RD


async def test_cname_chain_followed(up: FakeUpstream) -> None:
    r = await udp(up, "alias2.example.test", "A")
    assert r.rcode() == dns.rcode.NOERROR
    assert rrsets(r) == [
        ("alias2.example.test.", "CNAME", 30, ["alias.example.test."]),
        ("alias.example.test.", "CNAME", 60, ["www.example.test."]),
        ("www.example.test.", "A", 300, ["10.0.0.1", "10.0.0.2"]),
    ]
    # asking for the CNAME itself returns just the CNAME
    r = await udp(up, "alias2.example.test", "CNAME")
    assert rrsets(r) == [("alias2.example.test.", "CNAME", 30, ["alias.example.test."])]


async def test_nxdomain_with_soa(up: FakeUpstream) -> None:
    r = await udp(up, "nope.example.test", "A")
    assert r.rcode() == dns.rcode.NXDOMAIN
    assert r.flags & dns.flags.AA
    assert r.answer == []
    [soa] = r.authority
    assert soa.name.to_text() == "example.test."
    assert soa.rdtype == dns.rdatatype.SOA
    assert soa.ttl == 60  # min(SOA TTL 3600, SOA minimum 60)
    assert soa[0].minimum == 60


async def test_nxdomain_second_zone_uses_its_negative_ttl(up: FakeUpstream) -> None:
    r = await udp(up, "nope.corp.internal", "A")
    assert r.rcode() == dns.rcode.NXDOMAIN
    assert rrsets(r, "authority")[0][:3] == ("corp.internal.", "SOA", 30)
    r = await udp(up, "git.corp.internal", "A")
    assert rrsets(r) == [("git.corp.internal.", "A", 300, ["10.9.0.1"])]


async def test_nodata_with_soa(up: FakeUpstream) -> None:
    r = await udp(up, "v4only.example.test", "AAAA")
    assert r.rcode() == dns.rcode.NOERROR
    assert r.answer == []
    assert rrsets(r, "authority")[0][:3] == ("example.test.", "SOA", 60)
    r = await udp(up, "v4only.example.test", "A")
    assert rrsets(r) == [("v4only.example.test.", "A", 300, ["10.0.0.4"])]


async def test_empty_non_terminal_is_nodata(up: FakeUpstream) -> None:
    r = await udp(up, "_udp.example.test", "A")
    assert r.rcode() == dns.rcode.NOERROR
    assert r.answer == []
    assert len(r.authority) == 1


async def test_outside_zones_refused(up: FakeUpstream) -> None:
    r = await udp(up, "www.example.com", "A")
    assert r.rcode() == dns.rcode.REFUSED
    assert r.answer == [] and r.authority == []


async def test_root_ns_health_probe_and_apex_soa(up: FakeUpstream) -> None:
    r = await udp(up, ".", "NS")
    assert r.rcode() == dns.rcode.NOERROR
    assert [(n, t, v) for n, t, _ttl, v in rrsets(r)] == [(".", "NS", ["ns.example.test."])]
    r = await udp(up, "example.test", "SOA")
    [(name, rdtype, ttl, [soa])] = rrsets(r)
    assert (name, rdtype, ttl) == ("example.test.", "SOA", 3600)
    assert soa.split()[:2] == ["ns.example.test.", "hostmaster.example.test."]


async def test_other_record_types(up: FakeUpstream) -> None:
    assert rrsets(await udp(up, "example.test", "MX")) == [
        ("example.test.", "MX", 300, ["10 mail.example.test."])
    ]
    assert rrsets(await udp(up, "example.test", "NS"))[0][3] == ["ns.example.test."]
    assert rrsets(await udp(up, "example.test", "TXT"))[0][3] == ['"v=spf1 -all"']
    assert rrsets(await udp(up, "example.test", "CAA"))[0][3] == ['0 issue "letsencrypt.org"']
    assert rrsets(await udp(up, "_sip._udp.example.test", "SRV"))[0][3] == [
        "0 5 5060 sip.example.test."
    ]
    assert rrsets(await udp(up, "1.0.0.10.in-addr.arpa", "PTR"))[0][3] == ["www.example.test."]
    assert rrsets(await udp(up, "short.example.test"))[0][2:] == (5, ["10.0.0.3"])
    assert rrsets(await udp(up, "mail.example.test"))[0][3] == ["10.0.0.25"]
    assert rrsets(await udp(up, "ns.example.test"))[0][3] == ["10.0.0.53"]
    assert rrsets(await udp(up, "sip.example.test"))[0][3] == ["10.0.0.60"]


async def test_synthesised_names(up: FakeUpstream) -> None:
    assert rrsets(await udp(up, "h12345.example.test")) == [
        ("h12345.example.test.", "A", 300, ["127.0.0.1"])
    ]
    r = await udp(up, "h7.example.test", "AAAA")
    assert r.rcode() == dns.rcode.NOERROR and r.answer == [] and len(r.authority) == 1
    assert rrsets(await udp(up, "crawl0.example.test"))[0][3] == ["127.0.0.1"]
    assert rrsets(await udp(up, "crawl249.example.test"))[0][3] == ["127.0.0.250"]
    assert rrsets(await udp(up, "crawl251.example.test"))[0][3] == ["127.0.0.2"]
    assert (await udp(up, "hx.example.test")).rcode() == dns.rcode.NXDOMAIN


async def test_multi_string_txt_is_one_record(up: FakeUpstream) -> None:
    r = await udp(up, "multi.example.test", "TXT")
    [rrset] = r.answer
    assert len(rrset) == 1
    assert list(rrset[0].strings) == [b"hello world", b"second"]


async def test_big_txt_truncated_over_udp_complete_over_tcp(up: FakeUpstream) -> None:
    r = await udp(up, "big.example.test", "TXT")
    assert r.flags & dns.flags.TC
    assert r.answer == []
    assert r.question[0].name.to_text() == "big.example.test."  # question kept
    # even a client advertising EDNS 1232 cannot get it over UDP
    r = await udp(up, "big.example.test", "TXT", use_edns=0, payload=1232)
    assert r.flags & dns.flags.TC and r.answer == []
    r = await tcp(up, "big.example.test", "TXT")
    assert not r.flags & dns.flags.TC
    [rrset] = r.answer
    assert len(rrset) == 12
    assert sum(len(rd.strings[0]) for rd in rrset) >= 12 * 190
    assert up.count("big.example.test", "TXT") == 3


async def test_edns_opt_echoed_and_size_limit(up: FakeUpstream) -> None:
    # 40 A records (~690 bytes): too big for plain UDP, fits with EDNS
    r = await udp(up, "many.example.test")
    assert r.flags & dns.flags.TC and r.answer == [] and r.edns == -1
    r = await udp(up, "many.example.test", use_edns=0, payload=1232)
    assert not r.flags & dns.flags.TC
    assert r.edns == 0 and r.payload == 1232
    assert len(r.answer[0]) == 40
    assert sorted(rd.to_text() for rd in r.answer[0]) == sorted(f"10.1.0.{i}" for i in range(1, 41))
    # a client advertising only 512 gets TC
    r = await udp(up, "many.example.test", use_edns=0, payload=512)
    assert r.flags & dns.flags.TC and r.edns == 0


async def test_0x20_case_echoed(up: FakeUpstream) -> None:
    for send in (udp, tcp):
        r = await send(up, "WwW.ExAmPlE.TeSt", "A")
        assert r.question[0].name.to_text() == "WwW.ExAmPlE.TeSt."
        assert r.answer[0].name.to_text() == "WwW.ExAmPlE.TeSt."
        assert sorted(rd.to_text() for rd in r.answer[0]) == ["10.0.0.1", "10.0.0.2"]
    assert [e[0] for e in up.log] == ["WwW.ExAmPlE.TeSt", "WwW.ExAmPlE.TeSt"]
    assert up.count("www.example.test") == 2


# --------------------------------------------------------------------------- TCP framing


async def test_tcp_several_queries_per_connection(up: FakeUpstream) -> None:
    reader, writer = await tcp_connect(up)
    try:
        queries = [
            _query(n) for n in ("www.example.test", "mail.example.test", "nope.example.test")
        ]
        writer.write(b"".join(frame(q) for q in queries))  # pipelined in one segment
        await writer.drain()
        replies = {}
        for _ in queries:
            r = await read_frame(reader)
            replies[r.id] = r
        for q in queries:
            assert replies[q.id].question[0].name == q.question[0].name
        assert replies[queries[2].id].rcode() == dns.rcode.NXDOMAIN
        # and a query split across writes
        q = _query("ns.example.test")
        data = frame(q)
        writer.write(data[:1])
        await writer.drain()
        writer.write(data[1:])
        r = await read_frame(reader)
        assert r.id == q.id and r.answer[0][0].to_text() == "10.0.0.53"
    finally:
        writer.close()
        await writer.wait_closed()
    assert up.tcp_connections == 1
    assert up.tcp_queries == 4 and up.udp_queries == 0


async def test_tcp_half_close_still_gets_delayed_reply(up: FakeUpstream) -> None:
    up.latency = 0.05
    reader, writer = await tcp_connect(up)
    q = _query("www.example.test")
    writer.write(frame(q))
    writer.write_eof()
    r = await read_frame(reader)
    assert r.id == q.id and len(r.answer[0]) == 2
    assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""  # server closes afterwards
    writer.close()
    await writer.wait_closed()


# --------------------------------------------------------------------------- faults


async def test_drop_mode_times_out_but_counts(up: FakeUpstream) -> None:
    up.drop = True
    with pytest.raises(dns.exception.Timeout):
        await udp(up, "www.example.test", dns_timeout=0.3)
    await up.wait_for_queries(1)
    assert up.queries == 1 and up.count("www.example.test", "A") == 1
    assert up.replies == 0
    up.drop = False
    assert (await udp(up, "www.example.test")).answer


async def test_drop_names_only_blackholes_those(up: FakeUpstream) -> None:
    up.drop_names.add("WWW.example.test.")  # normalised: lowercased, dot stripped
    assert "www.example.test" in up.drop_names
    with pytest.raises(dns.exception.Timeout):
        await udp(up, "www.example.test", dns_timeout=0.3)
    assert (await udp(up, "mail.example.test")).answer
    await up.wait_for_queries(2)
    assert up.count("www.example.test") == 1 and up.count("mail.example.test") == 1


async def test_drop_over_tcp_keeps_connection_open(up: FakeUpstream) -> None:
    up.drop_names = {"www.example.test"}
    reader, writer = await tcp_connect(up)
    try:
        writer.write(frame(_query("www.example.test")) + frame(q2 := _query("mail.example.test")))
        r = await read_frame(reader)
        assert r.id == q2.id  # the dropped one never answers, the next one does
        assert up.count("www.example.test") == 1
    finally:
        writer.close()
        await writer.wait_closed()


async def test_forced_rcode(up: FakeUpstream) -> None:
    up.rcode = "SERVFAIL"
    for send in (udp, tcp):
        r = await send(up, "www.example.test")
        assert r.rcode() == dns.rcode.SERVFAIL
        assert r.answer == [] and r.authority == []
    up.rcode = None
    up.name_rcode["www.example.test"] = "refused"
    assert (await udp(up, "www.example.test")).rcode() == dns.rcode.REFUSED
    assert (await udp(up, "mail.example.test")).rcode() == dns.rcode.NOERROR
    up.name_rcode["mail.example.test"] = "NXDOMAIN"
    r = await udp(up, "mail.example.test")
    assert r.rcode() == dns.rcode.NXDOMAIN and r.answer == []
    with pytest.raises(ValueError):
        up.rcode = "BOGUS"
    with pytest.raises(ValueError):
        up.name_rcode["x.example.test"] = "BOGUS"


async def test_truncate_udp_mode(up: FakeUpstream) -> None:
    up.truncate_udp = True
    r = await udp(up, "www.example.test")
    assert r.flags & dns.flags.TC and r.answer == []
    assert r.question[0].name.to_text() == "www.example.test."
    r = await tcp(up, "www.example.test")
    assert not r.flags & dns.flags.TC and len(r.answer[0]) == 2


async def test_name_latency_does_not_block_other_names(up: FakeUpstream) -> None:
    up.name_latency["www.example.test"] = 30.0
    slow = asyncio.create_task(udp(up, "www.example.test", dns_timeout=60))
    try:
        await up.wait_for_queries(1)  # the slow query has reached the server
        fast = await udp(up, "mail.example.test")
        assert fast.answer[0][0].to_text() == "10.0.0.25"
        assert not slow.done()
        assert up.replies == 1
    finally:
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow


async def test_global_latency_with_per_name_override(up: FakeUpstream) -> None:
    up.latency = 30.0
    up.name_latency["mail.example.test."] = 0  # normalised key
    slow = asyncio.create_task(udp(up, "www.example.test", dns_timeout=60))
    try:
        await up.wait_for_queries(1)
        assert (await udp(up, "MAIL.example.test")).answer
        assert not slow.done()
    finally:
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow


async def test_latency_replies_out_of_order_on_one_tcp_connection(up: FakeUpstream) -> None:
    up.name_latency = {"www.example.test": 30.0}
    reader, writer = await tcp_connect(up)
    try:
        slow, fast = _query("www.example.test"), _query("mail.example.test")
        writer.write(frame(slow) + frame(fast))
        r = await read_frame(reader)
        assert r.id == fast.id  # RFC 7766 6.2.1.1: responses may be sent out of order
        assert up.tcp_queries == 2
    finally:
        writer.close()
        await writer.wait_closed()


async def test_small_latency_still_answers(up: FakeUpstream) -> None:
    up.latency = 0.02
    r = await udp(up, "www.example.test")
    assert len(r.answer[0]) == 2


async def test_faults_can_be_cleared(up: FakeUpstream) -> None:
    up.drop = True
    up.rcode = "SERVFAIL"
    up.truncate_udp = True
    up.latency = 5
    up.clear_faults()
    r = await udp(up, "www.example.test")
    assert r.rcode() == dns.rcode.NOERROR and len(r.answer[0]) == 2


# --------------------------------------------------------------------------- hostile content


async def test_inject_records_per_qname_and_for_every_reply(up: FakeUpstream) -> None:
    up.inject("answer", "www.example.test", "A", "6.6.6.6", ttl=86400, qname="mail.example.test")
    up.inject("authority", "example.test", "NS", "ns.attacker.test")
    up.inject("additional", "ns.attacker.test", "A", "6.6.6.6")
    for send in (udp, tcp):
        r = await send(up, "mail.example.test", use_edns=0)
        assert rrsets(r) == [("mail.example.test.", "A", 300, ["10.0.0.25"]),
                             ("www.example.test.", "A", 86400, ["6.6.6.6"])]
        assert rrsets(r, "authority") == [("example.test.", "NS", 300, ["ns.attacker.test."])]
        assert rrsets(r, "additional") == [("ns.attacker.test.", "A", 300, ["6.6.6.6"])]
        assert r.edns == 0  # the OPT is still there
    # Other names get only the records injected for every reply.
    r = await udp(up, "www.example.test")
    assert rrsets(r) == [("www.example.test.", "A", 300, ["10.0.0.1", "10.0.0.2"])]
    assert len(r.authority) == 1
    # Negative answers carry them too, after the zone's SOA (unless it is stripped).
    r = await udp(up, "nope.example.test")
    assert r.rcode() == dns.rcode.NXDOMAIN
    assert [x.rdtype for x in r.authority] == [dns.rdatatype.SOA, dns.rdatatype.NS]
    up.strip_authority = True
    r = await udp(up, "nope.example.test")
    assert [x.rdtype for x in r.authority] == [dns.rdatatype.NS]
    with pytest.raises(ValueError):
        up.inject("glue", "x.example.test", "A", "1.2.3.4")


async def test_set_answer_replaces_the_zone(up: FakeUpstream) -> None:
    up.set_answer("x.example.test", ("y.example.test", "A", "10.0.0.9", 60))
    for rdtype in ("A", "AAAA"):
        r = await udp(up, "X.example.test", rdtype)
        assert r.rcode() == dns.rcode.NOERROR and r.authority == []
        assert rrsets(r) == [("y.example.test.", "A", 60, ["10.0.0.9"])]
    up.set_answer("www.example.test")
    r = await udp(up, "www.example.test")
    assert r.rcode() == dns.rcode.NOERROR and r.answer == [] and r.authority == []
    up.unset_answer("www.example.test")
    assert len((await udp(up, "www.example.test")).answer[0]) == 2
    # A name outside every zone is answered too (the zone would refuse it).
    up.set_answer("victim.other.test", ("victim.other.test", "A", "6.6.6.6"))
    assert rrsets(await udp(up, "victim.other.test"))[0][3] == ["6.6.6.6"]


async def test_ttl_override_reaches_every_record(up: FakeUpstream) -> None:
    from dnslib import DNSRecord

    async def ttls(name: str) -> set[int]:
        # dnslib, not dnspython: dnspython reads a TTL >= 2^31 as 0 (RFC 2181 section 8)
        loop = asyncio.get_running_loop()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setblocking(False)
            s.connect((LOOPBACK, up.port))
            s.send(_query(name).to_wire())
            reply = DNSRecord.parse(await asyncio.wait_for(loop.sock_recv(s, 65535), TIMEOUT))
        return {rr.ttl for rr in reply.rr + reply.auth}

    up.ttl_override = 2**31
    assert await ttls("alias.example.test") == {2**31}
    assert await ttls("nope.example.test") == {2**31}
    up.ttl_override = 2**32 - 1
    assert await ttls("www.example.test") == {2**32 - 1}
    up.ttl_override = 7
    assert (await tcp(up, "www.example.test")).answer[0].ttl == 7


async def test_reply_hook_can_rewrite_the_reply(up: FakeUpstream) -> None:
    from dnslib import DNSLabel

    def hook(req, reply) -> None:
        reply.q.qname = DNSLabel(str(req.q.qname).upper())  # does not echo the case

    up.reply_hook = hook
    r = await udp(up, "www.example.test")
    assert r.question[0].name.to_text() == "WWW.EXAMPLE.TEST."
    up.reply_hook = lambda req, reply: 1 / 0  # a failing hook: no reply, server keeps going
    with pytest.raises(dns.exception.Timeout):
        await udp(up, "www.example.test", dns_timeout=0.3)
    up.reply_hook = None
    assert (await udp(up, "www.example.test")).rcode() == dns.rcode.NOERROR


async def test_aaaa_dotted_forms(up: FakeUpstream) -> None:
    up.zone.add("mapped.example.test", "AAAA", "::ffff:10.0.0.1")
    up.zone.add("mapped.example.test", "AAAA", "64:ff9b::192.0.2.1")
    r = await udp(up, "mapped.example.test", "AAAA")
    assert sorted(rd.to_text() for rd in r.answer[0]) == ["64:ff9b::c000:201", "::ffff:10.0.0.1"]


async def test_hostile_content_cleared_with_the_faults(up: FakeUpstream) -> None:
    up.inject("answer", "www.example.test", "A", "6.6.6.6")
    up.set_answer("mail.example.test")
    up.ttl_override = 0
    up.reply_hook = lambda req, reply: None
    up.clear_faults()
    assert up.ttl_override is None and up.reply_hook is None
    assert rrsets(await udp(up, "mail.example.test")) == [
        ("mail.example.test.", "A", 300, ["10.0.0.25"])]


# --------------------------------------------------------------------------- robustness


async def test_malformed_packets_ignored(up: FakeUpstream) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    try:
        for junk in (
            b"",
            b"\x00",
            b"\x12\x34\x01",
            b"\xff" * 40,
            b"\x00\x01" + b"\x00" * 10 + b"\x05abc",
        ):
            sock.sendto(junk, (LOOPBACK, up.port))
        response = _query("www.example.test")
        response.flags |= dns.flags.QR  # a response, not a query: ignored
        sock.sendto(response.to_wire(), (LOOPBACK, up.port))
    finally:
        sock.close()
    # TCP: a garbage frame, then a good query on the same connection
    reader, writer = await tcp_connect(up)
    try:
        q = _query("mail.example.test")
        writer.write(frame(b"\xde\xad\xbe\xef") + frame(q))
        r = await read_frame(reader)
        assert r.id == q.id and r.answer
    finally:
        writer.close()
        await writer.wait_closed()
    # the server still answers UDP, and junk was never counted as a query
    assert (await udp(up, "www.example.test")).answer
    assert up.queries == 2
    assert [e[0] for e in up.log] == ["mail.example.test", "www.example.test"]


async def test_unknown_qtype_and_class(up: FakeUpstream) -> None:
    r = await udp(up, "www.example.test", "TYPE65300")
    assert r.rcode() == dns.rcode.NOERROR and r.answer == [] and len(r.authority) == 1
    assert up.log[-1] == ("www.example.test", "TYPE65300", "udp")
    q = dns.message.make_query("version.bind", "TXT", rdclass="CH")
    r = await dns.asyncquery.udp(q, LOOPBACK, port=up.port, timeout=TIMEOUT)
    assert r.rcode() == dns.rcode.REFUSED


# --------------------------------------------------------------------------- counters


async def test_counters_and_log(up: FakeUpstream) -> None:
    await udp(up, "www.example.test", "A")
    await udp(up, "WWW.Example.Test", "AAAA")
    await tcp(up, "alias.example.test", "A")
    await udp(up, ".", "NS")
    assert (up.queries, up.udp_queries, up.tcp_queries) == (4, 3, 1)
    assert up.log == [
        ("www.example.test", "A", "udp"),
        ("WWW.Example.Test", "AAAA", "udp"),
        ("alias.example.test", "A", "tcp"),
        (".", "NS", "udp"),
    ]
    assert up.count("www.example.test") == 2
    assert up.count("WWW.EXAMPLE.TEST.") == 2
    assert up.count("www.example.test", "A") == 1
    assert up.count("www.example.test", "aaaa") == 1
    assert up.count("www.example.test", "MX") == 0
    # the CNAME target is answered from zone data: no separate query for it
    assert up.count("alias.example.test") == 1
    assert up.count(".") == 1
    up.reset_counts()
    assert (up.queries, up.udp_queries, up.tcp_queries, up.log) == (0, 0, 0, [])
    assert up.count("www.example.test") == 0
    await udp(up, "www.example.test")
    await up.wait_for_queries(1)
    assert up.queries == 1


async def test_wait_for_queries(up: FakeUpstream) -> None:
    waiter = asyncio.create_task(up.wait_for_queries(2))
    await udp(up, "www.example.test")
    assert not waiter.done()  # the waiter has run and registered; 1 < 2
    await tcp(up, "www.example.test")
    await asyncio.wait_for(waiter, TIMEOUT)
    await up.wait_for_queries(2)  # already satisfied: returns at once
    with pytest.raises(asyncio.TimeoutError):
        await up.wait_for_queries(3, timeout=0.05)
    assert up._waiters == []


# --------------------------------------------------------------------------- lifecycle


async def test_address_port_and_restart_on_same_port() -> None:
    server = FakeUpstream()
    assert server.port == 0
    await server.start()
    try:
        port = server.port
        assert port > 0
        assert server.address == f"127.0.0.1:{port}"
        assert (await udp(server, "www.example.test")).answer
    finally:
        await server.stop()
    assert not server.running
    with pytest.raises(dns.exception.Timeout):
        await udp(server, "www.example.test", dns_timeout=0.3)
    await server.start()
    try:
        assert server.port == port
        assert (await tcp(server, "www.example.test")).answer
    finally:
        await server.stop()


async def test_taken_port_fails_and_async_context_manager() -> None:
    async with FakeUpstream() as first:
        assert first.running
        assert (await udp(first, "www.example.test")).answer
        # an explicit port that is taken fails instead of silently picking another
        second = FakeUpstream(port=first.port)
        with pytest.raises(OSError):
            await second.start()
        assert not second.running
    assert not first.running


def test_only_loopback_hosts_allowed() -> None:
    for host in ("0.0.0.0", "10.0.0.1", "::", "example.com", "192.168.1.1"):
        with pytest.raises(ValueError):
            FakeUpstream(host=host)
    assert FakeUpstream(host="127.0.0.2").host == "127.0.0.2"
    assert FakeUpstream(host="localhost").host == "127.0.0.1"


async def test_ipv6_loopback() -> None:
    server = FakeUpstream(host="::1")
    try:
        await server.start()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    try:
        assert server.address == f"[::1]:{server.port}"
        q = _query("www.example.test")
        r = await dns.asyncquery.udp(q, "::1", port=server.port, timeout=TIMEOUT)
        assert len(r.answer[0]) == 2
    finally:
        await server.stop()


def test_start_in_thread_sync() -> None:
    server = FakeUpstream()
    server.start_in_thread()
    try:
        q = _query("www.example.test")
        r = dns.query.udp(q, LOOPBACK, port=server.port, timeout=TIMEOUT)
        assert len(r.answer[0]) == 2
        server.rcode = "SERVFAIL"  # set from the main thread while running
        r = dns.query.tcp(_query("www.example.test"), LOOPBACK, port=server.port, timeout=TIMEOUT)
        assert r.rcode() == dns.rcode.SERVFAIL
        server.wait_for_queries_blocking(2)
        assert (server.queries, server.udp_queries, server.tcp_queries) == (2, 1, 1)
        with pytest.raises(TimeoutError):
            server.wait_for_queries_blocking(3, timeout=0.05)
    finally:
        server.stop_in_thread()
    with pytest.raises(ConnectionRefusedError):
        dns.query.tcp(_query("www.example.test"), LOOPBACK, port=server.port, timeout=TIMEOUT)


async def test_thread_server_awaited_from_another_loop() -> None:
    with FakeUpstream() as server:
        server.name_latency["www.example.test"] = 30.0
        waiter = asyncio.create_task(server.wait_for_queries(1))
        slow = asyncio.create_task(udp(server, "www.example.test", dns_timeout=60))
        try:
            await asyncio.wait_for(waiter, TIMEOUT)
            assert (await udp(server, "mail.example.test")).answer
            assert not slow.done()
        finally:
            slow.cancel()
            with pytest.raises(asyncio.CancelledError):
                await slow


async def test_standalone_script(tmp_path: Path) -> None:
    zone_file = tmp_path / "extra.zone"
    zone_file.write_text(
        "$ORIGIN example.test.\n"
        "extra 120 IN A 10.7.7.7\n"
        "$ORIGIN other.test.\n"
        "@ 3600 IN SOA ns.other.test. hostmaster.other.test. 1 3600 600 86400 45\n"
        "www 60 IN A 10.8.8.8\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecar.testing.fakeupstream",
        "--port",
        "0",
        "--host",
        LOOPBACK,
        "--zone-file",
        str(zone_file),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode().strip()
        assert line.startswith("fakeupstream listening on 127.0.0.1:"), line
        port = int(line.rsplit(":", 1)[1])

        async def ask(name: str, rdtype: str = "A") -> dns.message.Message:
            q = _query(name, rdtype)
            return await dns.asyncquery.udp(q, LOOPBACK, port=port, timeout=TIMEOUT)

        assert len((await ask("www.example.test")).answer[0]) == 2  # default zone kept
        assert (await ask("extra.example.test")).answer[0][0].to_text() == "10.7.7.7"
        assert (await ask("www.other.test")).answer[0][0].to_text() == "10.8.8.8"
        r = await ask("nope.other.test")
        assert r.rcode() == dns.rcode.NXDOMAIN and r.authority[0].ttl == 45
    finally:
        if proc.returncode is None:
            proc.terminate()
        rc = await asyncio.wait_for(proc.wait(), 20)
    assert rc == 0, (await proc.stderr.read()).decode()


# --------------------------------------------------------------------------- zone


def test_zone_editing_and_resolution() -> None:
    z = Zone()
    z.add_zone("Lab.Test", negative_ttl=10)
    z.add("A.lab.test", "a", "192.0.2.1", ttl=42)
    z.add("a.lab.test.", "A", "192.0.2.1", ttl=42)  # duplicate: not repeated
    assert [str(r.rdata) for r in z.get("a.LAB.test", "A")] == ["192.0.2.1"]
    z.add("loop1.lab.test", "CNAME", "loop2.lab.test")
    z.add("loop2.lab.test", "CNAME", "loop1.lab.test")
    z.add("out.lab.test", "CNAME", "www.elsewhere.example")
    z.add("dangling.lab.test", "CNAME", "missing.lab.test")
    z.add("long.lab.test", "TXT", "x" * 600)
    z.add("deep.sub.lab.test", "A", "192.0.2.9")

    res = z.resolve("a.lab.test", "A")
    assert res.rcode == 0 and [r.ttl for r in res.answer] == [42]
    assert z.resolve("loop1.lab.test", "A").rcode == 0  # loop: chain returned, no hang
    assert len(z.resolve("loop1.lab.test", "A").answer) == 2
    res = z.resolve("out.lab.test", "A")
    assert res.rcode == 0 and len(res.answer) == 1
    res = z.resolve("dangling.lab.test", "A")  # RFC 6604: rcode of the last name
    assert res.rcode == 3 and len(res.answer) == 1 and res.authority[0].ttl == 10
    [txt] = z.get("long.lab.test", "TXT")
    assert [len(s) for s in txt.rdata.data] == [255, 255, 90]
    assert z.resolve("sub.lab.test", "A").rcode == 0  # empty non-terminal
    assert z.resolve("nothing.lab.test", "A").rcode == 3
    assert z.resolve("lab.other", "A").rcode == 5
    assert z.find_apex("X.A.LAB.TEST.") == "lab.test"

    assert z.remove("a.lab.test", "AAAA") == 0
    assert z.remove("A.LAB.TEST") == 1
    assert z.resolve("a.lab.test", "A").rcode == 3
    assert z.remove("deep.sub.lab.test") == 1
    assert z.resolve("sub.lab.test", "A").rcode == 3  # no longer an ENT
    assert z.remove("lab.test", "SOA") == 1
    assert z.find_apex("a.lab.test") is None


def test_zone_value_forms() -> None:
    z = Zone()
    z.add_zone("v.test")
    z.add("v.test", "MX", "10 mail.v.test")
    z.add("v.test", "TXT", ("one", "two"))
    z.add("_x._tcp.v.test", "SRV", "1 2 3 t.v.test")
    z.add("v.test", "CAA", '0 issue "ca.example"')
    z.add("v.test", "AAAA", "2001:db8::7")
    assert str(z.get("v.test", "MX")[0].rdata) == "10 mail.v.test."
    assert z.get("v.test", "TXT")[0].rdata.data == [b"one", b"two"]
    assert str(z.get("_x._tcp.v.test", "SRV")[0].rdata) == "1 2 3 t.v.test."
    assert str(z.get("v.test", "CAA")[0].rdata) == '0 issue "ca.example"'
    soa = z.get("v.test", "SOA")[0]
    assert soa.ttl == 3600 and soa.rdata.times[4] == 60
    assert str(z.get("v.test", "NS")[0].rdata) == "ns.v.test."
    with pytest.raises(ValueError):
        z.add("v.test", "NOTATYPE", "x")


def test_default_zone_contents() -> None:
    z = default_zone()
    assert z.apexes == {"example.test", "0.0.10.in-addr.arpa", "corp.internal"}
    big = z.get("big.example.test", "TXT")
    assert len(big) == 12 and all(190 <= len(r.rdata.data[0]) <= 210 for r in big)
    assert len({r.rdata.data[0] for r in big}) == 12
    assert len(z.get("many.example.test", "A")) == 40
    assert z.get("v4only.example.test", "AAAA") == []


async def test_port_zero_retries_when_tcp_port_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    real_create_server = loop.create_server
    calls = []

    async def flaky_create_server(*args, **kwargs):
        calls.append(args[2])
        if len(calls) == 1:
            raise OSError(98, "Address already in use")
        return await real_create_server(*args, **kwargs)

    monkeypatch.setattr(loop, "create_server", flaky_create_server)
    async with FakeUpstream() as server:
        # retried after the refusal; a busy host may refuse a real port again (once seen
        # in CI), so the server is on the last port tried, not necessarily the second
        assert len(calls) >= 2 and server.port == calls[-1]
        assert (await tcp(server, "www.example.test")).answer
        assert (await udp(server, "www.example.test")).answer
