"""The scrub between pool and cache (issue 14 section 1) and ``--private-address`` (section 4).

End-to-end tests run the real :class:`Sidecar` against the fake upstream with hostile content
injected into its replies (extra answer records for a victim name, NS and glue, a foreign SOA,
huge TTLs, an answer with no record for the question) and query it with dnspython; unit and
property tests drive :func:`sidecar.miss.scrub.scrub` directly.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

import dns.message
import dns.rcode
import dns.rdatatype
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.dns.cache import EXPIRES
from sidecar.dns.wire import NOERROR, NXDOMAIN, encode_name, make_key
from sidecar.miss.entry import TtlPolicy, build_entry
from sidecar.miss.scrub import MAX_CHAIN, ScrubPolicy, is_ancestor, scrub
from sidecar.upstream.records import Answer, Rec
from tests.helpers import hp

A, NS, CNAME, SOA, AAAA = 1, 2, 5, 6, 28

# ------------------------------------------------------------------------------ helpers


def rec_a(name: str, ip: str, ttl: int = 300) -> Rec:
    return Rec(name, A, ttl, socket.inet_pton(socket.AF_INET, ip))


def rec_aaaa(name: str, ip: str, ttl: int = 300) -> Rec:
    return Rec(name, AAAA, ttl, socket.inet_pton(socket.AF_INET6, ip))


def rec_cname(name: str, target: str, ttl: int = 300) -> Rec:
    return Rec(name, CNAME, ttl, encode_name(target))


def rec_soa(zone: str, ttl: int = 3600, minimum: int = 60) -> Rec:
    rdata = (encode_name("ns." + zone) + encode_name("hostmaster." + zone)
             + struct.pack(">IIIII", 1, 3600, 600, 86400, minimum))
    return Rec(zone, SOA, ttl, rdata)


def rec_ns(zone: str, target: str) -> Rec:
    return Rec(zone, NS, 300, encode_name(target))


def texts(msg: dns.message.Message, section: str = "answer") -> list[tuple[str, str, str]]:
    return sorted((rrset.name.to_text().lower(), dns.rdatatype.to_text(rrset.rdtype), rd.to_text())
                  for rrset in getattr(msg, section) for rd in rrset)


def cached(sc, name: str, rdtype: str = "A"):
    return sc.cache.get(make_key(name, dns.rdatatype.from_text(rdtype)))


def counts(entry) -> tuple[int, int, int]:
    """(ANCOUNT, NSCOUNT, ARCOUNT) of a cache entry."""
    return struct.unpack(">HHH", entry.hdr[3:9])


NETS = tuple(ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "127.0.0.0/8", "169.254.0.0/16",
    "100.64.0.0/10", "0.0.0.0/8", "::1/128", "::/128", "fc00::/7", "fe80::/10", "::ffff:0:0/96"))


def nets(*cidrs: str) -> tuple:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


NO_POLICY = ScrubPolicy()


# ------------------------------------------------------------------------------ end to end:
# poisoning attempts through the answer


async def test_out_of_bailiwick_answer_record_is_neither_served_nor_cached(make_sidecar, upstream):
    sc = await make_sidecar()
    upstream.inject("answer", "www.example.test", "A", "6.6.6.6", ttl=86400,
                    qname="h1.example.test")
    upstream.inject("answer", "victim.other.test", "A", "6.6.6.6", ttl=86400,
                    qname="h1.example.test")
    r = await sc.query("h1.example.test")
    assert r.rcode() == dns.rcode.NOERROR
    assert texts(r) == [("h1.example.test.", "A", "127.0.0.1")]
    entry = cached(sc, "h1.example.test")
    assert counts(entry)[0] == 1
    assert b"\x06\x06\x06\x06" not in entry.body
    assert cached(sc, "www.example.test") is None and cached(sc, "victim.other.test") is None
    # The victim's own query goes upstream and gets the real records.
    assert upstream.count("www.example.test", "A") == 0
    r = await sc.query("www.example.test")
    assert upstream.count("www.example.test", "A") == 1
    assert texts(r) == [("www.example.test.", "A", "10.0.0.1"), ("www.example.test.", "A", "10.0.0.2")]


async def test_records_after_the_cname_chain_that_do_not_belong_are_dropped(make_sidecar, upstream):
    sc = await make_sidecar()
    # alias2 -> alias -> www, then a forged A for mail and a CNAME off the chain.
    upstream.inject("answer", "mail.example.test", "A", "6.6.6.6", qname="alias2.example.test")
    upstream.inject("answer", "short.example.test", "CNAME", "evil.attacker.test",
                    qname="alias2.example.test")
    upstream.inject("answer", "alias9.example.test", "A", "6.6.6.6", qname="alias2.example.test")
    r = await sc.query("alias2.example.test")
    assert texts(r) == [("alias.example.test.", "CNAME", "www.example.test."),
                        ("alias2.example.test.", "CNAME", "alias.example.test."),
                        ("www.example.test.", "A", "10.0.0.1"),
                        ("www.example.test.", "A", "10.0.0.2")]
    assert counts(cached(sc, "alias2.example.test"))[0] == 4
    for victim, rdtype in (("mail.example.test", "A"), ("short.example.test", "CNAME"),
                           ("short.example.test", "A")):
        assert cached(sc, victim, rdtype) is None
    r = await sc.query("mail.example.test")
    assert texts(r) == [("mail.example.test.", "A", "10.0.0.25")]
    assert upstream.count("mail.example.test", "A") == 1


async def test_authority_ns_and_glue_are_dropped(make_sidecar, upstream):
    sc = await make_sidecar()
    upstream.inject("authority", "example.test", "NS", "ns.attacker.test", qname="h2.example.test")
    upstream.inject("authority", "corp.internal", "NS", "ns.attacker.test", qname="h2.example.test")
    upstream.inject("additional", "ns.attacker.test", "A", "6.6.6.6", qname="h2.example.test")
    upstream.inject("additional", "ns.example.test", "A", "6.6.6.6", qname="h2.example.test")
    r = await sc.query("h2.example.test")
    assert texts(r) == [("h2.example.test.", "A", "127.0.0.1")]
    assert r.authority == [] and r.additional == []
    assert counts(cached(sc, "h2.example.test")) == (1, 0, 0)
    for victim, rdtype in (("example.test", "NS"), ("corp.internal", "NS"),
                           ("ns.attacker.test", "A"), ("ns.example.test", "A")):
        assert cached(sc, victim, rdtype) is None
    r = await sc.query("example.test", "NS")
    assert texts(r) == [("example.test.", "NS", "ns.example.test.")]
    assert upstream.count("example.test", "NS") == 1
    r = await sc.query("ns.example.test")
    assert texts(r) == [("ns.example.test.", "A", "10.0.0.53")]
    assert upstream.count("ns.example.test", "A") == 1


async def test_foreign_soa_is_not_used_for_negative_caching(make_sidecar, upstream):
    sc = await make_sidecar(max_negative_ttl=3600)
    upstream.strip_authority = True
    upstream.inject("authority", "attacker.test", "SOA",
                    "ns.attacker.test evil.attacker.test 1 3600 600 86400 3600", ttl=3600,
                    qname="nope.example.test")
    upstream.inject("authority", "other.example.test", "SOA",   # a descendant, not an ancestor
                    "ns.attacker.test evil.attacker.test 1 3600 600 86400 3600", ttl=3600,
                    qname="nope.example.test")
    r = await sc.query("nope.example.test")
    assert r.rcode() == dns.rcode.NXDOMAIN
    [soa] = r.authority
    # The enclosing zone's SOA, learned with an SOA query, and its negative TTL (60 s).
    assert soa.name.to_text() == "example.test."
    assert soa.ttl <= 60
    assert upstream.count("example.test", "SOA") == 1
    assert cached(sc, "nope.example.test").remaining() <= 60


async def test_first_soa_that_encloses_the_name_is_used(make_sidecar, upstream):
    sc = await make_sidecar(max_negative_ttl=3600)
    upstream.strip_authority = True
    upstream.inject("authority", "attacker.test", "SOA",
                    "ns.attacker.test evil.attacker.test 1 3600 600 86400 3600", ttl=3600,
                    qname="nope.example.test")
    upstream.inject("authority", "example.test", "SOA",
                    "ns.example.test hostmaster.example.test 1 3600 600 86400 45", ttl=3600,
                    qname="nope.example.test")
    r = await sc.query("nope.example.test")
    [soa] = r.authority
    assert soa.name.to_text() == "example.test." and soa[0].minimum == 45
    assert upstream.count("example.test", "SOA") == 0  # no lookup needed


async def test_cname_into_another_zone_keeps_the_target_zone_soa(make_sidecar, upstream):
    # NODATA at the end of a chain: RFC 2308 puts the SOA of the last target's zone in
    # authority, and that is the SOA kept (the resolver would learn the same one otherwise).
    upstream.zone.add("xz.example.test", "CNAME", "git.corp.internal", ttl=300)
    sc = await make_sidecar()
    r = await sc.query("xz.example.test", "AAAA")
    assert r.rcode() == dns.rcode.NOERROR
    assert texts(r) == [("xz.example.test.", "CNAME", "git.corp.internal.")]
    [soa] = r.authority
    assert soa.name.to_text() == "corp.internal."
    assert upstream.count("corp.internal", "SOA") == 0
    assert upstream.count("example.test", "SOA") == 0
    assert cached(sc, "xz.example.test", "AAAA").remaining() <= 30  # corp.internal's 30 s


async def test_answer_with_no_record_for_the_question_is_nodata(make_sidecar, upstream):
    sc = await make_sidecar()
    upstream.set_answer("x.example.test", ("y.example.test", "A", "10.0.0.9"))
    r = await sc.query("x.example.test")
    assert r.rcode() == dns.rcode.NOERROR
    assert r.answer == []
    [soa] = r.authority  # learned: the answer carried none
    assert soa.name.to_text() == "example.test."
    entry = cached(sc, "x.example.test")
    assert counts(entry) == (0, 1, 0)
    assert entry.remaining() <= 60
    assert cached(sc, "y.example.test") is None


@pytest.mark.parametrize("records", [
    [("x.example.test", "AAAA", "2001:db8::9")],                        # wrong type
    [("other.example.test", "CNAME", "www.example.test"),               # a chain, not ours
     ("www.example.test", "A", "10.0.0.1")],
    [("x.example.test", "CNAME", "y.example.test"),                     # a chain ending short
     ("z.example.test", "A", "10.0.0.1")],
])
async def test_other_answers_without_a_record_for_the_question_are_nodata(make_sidecar, upstream,
                                                                        records):
    sc = await make_sidecar()
    upstream.set_answer("x.example.test", *records)
    r = await sc.query("x.example.test")
    assert r.rcode() == dns.rcode.NOERROR
    assert [rs for rs in r.answer if rs.rdtype == dns.rdatatype.A] == []
    assert [rs.rdtype for rs in r.authority] == [dns.rdatatype.SOA]
    assert cached(sc, "x.example.test").remaining() <= 60
    assert cached(sc, "www.example.test") is None


async def test_cname_chain_without_an_soa_is_cached_as_negative(make_sidecar, upstream):
    # A chain that ends nowhere and no SOA to be found: negative, cached briefly (RFC 2308
    # section 5), not for the CNAME's TTL as if it were an answer.
    sc = await make_sidecar(max_negative_ttl=300)
    upstream.set_answer("x.example.test", ("x.example.test", "CNAME", "y.example.test", 86400))
    upstream.name_rcode = {"example.test": "REFUSED", "test": "REFUSED", ".": "REFUSED"}
    r = await sc.query("x.example.test")
    assert r.rcode() == dns.rcode.NOERROR
    assert texts(r) == [("x.example.test.", "CNAME", "y.example.test.")]
    assert cached(sc, "x.example.test").remaining() <= 30


async def test_ttl_of_2_31_or_more_counts_as_zero_then_floored(make_sidecar, upstream):
    sc = await make_sidecar(min_ttl=30, max_ttl=86400)
    for ttl, want in ((2**31, 30), (2**32 - 1, 30), (2**31 - 1, 86400)):
        upstream.ttl_override = ttl
        name = f"h{ttl}.example.test"
        r = await sc.query(name)
        [rrset] = r.answer
        assert rrset.ttl == want, ttl
        assert want - 2 <= cached(sc, name).remaining() <= want


async def test_soa_ttl_of_2_31_is_not_cached(make_sidecar, upstream):
    sc = await make_sidecar()
    upstream.ttl_override = 2**31
    r = await sc.query("nope.example.test")
    assert r.rcode() == dns.rcode.NXDOMAIN
    assert r.authority[0].ttl == 0
    await sc.query("nope.example.test")
    assert upstream.count("nope.example.test", "A") == 2


# ------------------------------------------------------------------------------ end to end:
# --private-address


def corp_zone(upstream) -> tuple:
    return (("corp.internal", (hp(upstream),)),)


async def test_private_addresses_removed_for_a_public_name(make_sidecar, upstream):
    sc = await make_sidecar(private_address=NETS, zones=corp_zone(upstream))
    r = await sc.query("www.example.test")        # 10.0.0.1, 10.0.0.2
    assert r.rcode() == dns.rcode.NOERROR
    assert r.answer == []
    assert [rs.name.to_text() for rs in r.authority] == ["example.test."]
    assert counts(cached(sc, "www.example.test")) == (0, 1, 0)
    # AAAA of www (2001:db8::1) is public and stays.
    r = await sc.query("www.example.test", "AAAA")
    assert texts(r) == [("www.example.test.", "AAAA", "2001:db8::1")]


async def test_only_the_private_addresses_of_a_mixed_answer_go(make_sidecar, upstream):
    upstream.zone.add("mixed.example.test", "A", "192.0.2.7")
    upstream.zone.add("mixed.example.test", "A", "169.254.169.254")
    upstream.zone.add("mixed.example.test", "A", "100.64.1.1")
    upstream.zone.add("mixed.example.test", "A", "198.51.100.7")
    sc = await make_sidecar(private_address=NETS)
    r = await sc.query("mixed.example.test")
    assert texts(r) == [("mixed.example.test.", "A", "192.0.2.7"),
                        ("mixed.example.test.", "A", "198.51.100.7")]


@pytest.mark.parametrize("addr", ["::ffff:10.0.0.1", "::ffff:a00:1", "64:ff9b::10.0.0.1"])
async def test_ipv4_in_ipv6_caught_by_an_ipv4_network(make_sidecar, upstream, addr):
    upstream.zone.add("mapped.example.test", "AAAA", addr)
    upstream.zone.add("mapped.example.test", "AAAA", "2001:db8::5")
    sc = await make_sidecar(private_address=nets("10.0.0.0/8"))
    r = await sc.query("mapped.example.test", "AAAA")
    assert texts(r) == [("mapped.example.test.", "AAAA", "2001:db8::5")]


@pytest.mark.parametrize("addr", ["::1", "::", "fd12:3456::1", "fe80::1", "fd00:ec2::254",
                                  "::ffff:192.0.2.1"])
async def test_ipv6_private_networks(make_sidecar, upstream, addr):
    upstream.zone.add("v6.example.test", "AAAA", addr)
    sc = await make_sidecar(private_address=NETS)
    r = await sc.query("v6.example.test", "AAAA")
    assert r.answer == []


async def test_private_addresses_kept_for_names_under_a_zone(make_sidecar, upstream):
    upstream.zone.add("corp.internal", "A", "10.9.0.2")
    sc = await make_sidecar(private_address=NETS, zones=corp_zone(upstream))
    for name, want in (("git.corp.internal", "10.9.0.1"), ("GIT.Corp.INTERNAL", "10.9.0.1"),
                       ("corp.internal", "10.9.0.2")):
        r = await sc.query(name)
        assert [t[1:] for t in texts(r)] == [("A", want)], name


async def test_a_public_name_cannot_cname_into_a_zone_to_keep_private_addresses(make_sidecar,
                                                                               upstream):
    upstream.zone.add("rebind.example.test", "CNAME", "git.corp.internal")
    sc = await make_sidecar(private_address=NETS, zones=corp_zone(upstream))
    r = await sc.query("rebind.example.test")
    assert r.rcode() == dns.rcode.NOERROR
    assert r.answer == []


async def test_private_addresses_kept_when_the_flag_is_off(make_sidecar, upstream):
    sc = await make_sidecar()
    r = await sc.query("www.example.test")
    assert texts(r) == [("www.example.test.", "A", "10.0.0.1"), ("www.example.test.", "A", "10.0.0.2")]
    upstream.zone.add("mapped.example.test", "AAAA", "::ffff:10.0.0.1")
    r = await sc.query("mapped.example.test", "AAAA")
    assert texts(r) == [("mapped.example.test.", "AAAA", "::ffff:10.0.0.1")]


# ------------------------------------------------------------------------------ unit: scrub()


def test_clean_answer_is_returned_as_it_came():
    ans = Answer(NOERROR, [rec_a("www.example.test", "192.0.2.1"),
                           rec_a("WWW.Example.Test", "192.0.2.2")], [])
    assert scrub("www.example.test", A, ans, NO_POLICY) is ans


def test_positive_answer_loses_its_authority():
    ans = Answer(NOERROR, [rec_a("www.example.test", "192.0.2.1")],
                 [rec_ns("example.test", "ns.attacker.test"), rec_soa("example.test")])
    out = scrub("www.example.test", A, ans, NO_POLICY)
    assert out.answer == ans.answer and out.authority == []


def test_chain_is_followed_case_insensitively_and_in_any_order():
    final = [rec_a("E1.cdn.test", "192.0.2.1"), rec_a("e1.CDN.test", "192.0.2.2")]
    c1, c2 = rec_cname("www.Shop.test", "X.cdn.test"), rec_cname("x.cdn.TEST", "e1.cdn.test")
    ans = Answer(NOERROR, [final[0], c2, rec_a("www.shop.test", "6.6.6.6"), c1, final[1],
                           rec_a("x.cdn.test", "6.6.6.6")], [])
    out = scrub("www.shop.test", A, ans, NO_POLICY)
    assert out.answer == [c1, c2, *final]
    assert out.authority == []


def test_cname_query_gets_the_cname_unchased():
    c = rec_cname("alias.example.test", "www.example.test")
    ans = Answer(NOERROR, [c, rec_cname("www.example.test", "x.test"),
                           rec_a("www.example.test", "6.6.6.6")], [])
    assert scrub("alias.example.test", CNAME, ans, NO_POLICY).answer == [c]


def test_cname_loop_and_endless_chain_have_no_data():
    loop = [rec_cname("a.test", "b.test"), rec_cname("b.test", "a.test"), rec_a("a.test", "6.6.6.6")]
    out = scrub("a.test", A, Answer(NOERROR, loop, []), NO_POLICY)
    assert [r.type for r in out.answer] == [CNAME, CNAME]
    chain = [rec_cname(f"c{i}.test", f"c{i + 1}.test") for i in range(MAX_CHAIN + 4)]
    end = rec_a(f"c{MAX_CHAIN + 4}.test", "192.0.2.1")
    out = scrub("c0.test", A, Answer(NOERROR, [*chain, end], []), NO_POLICY)
    assert all(r.type == CNAME for r in out.answer) and len(out.answer) == MAX_CHAIN


def test_a_looping_chain_keeps_no_soa():
    """The SOA of the question's zone is not about a chain that loops out of it (found by
    test_scrub_properties)."""
    loop = [rec_cname("a.test", "b.test"), rec_cname("b.test", "b.test")]
    out = scrub("a.test", A, Answer(NOERROR, loop, [rec_soa("a.test")]), NO_POLICY)
    assert [r.type for r in out.answer] == [CNAME, CNAME] and out.authority == []


@pytest.mark.parametrize(("qname", "answer", "soa_owner", "kept"), [
    ("nope.example.test", [], "example.test", True),
    ("nope.example.test", [], "nope.example.test", True),             # the name itself (NODATA)
    ("nope.example.test", [], "", True),                              # the root
    ("nope.example.test", [], "attacker.test", False),
    ("nope.example.test", [], "xample.test", False),                  # not at a label boundary
    ("nope.example.test", [], "sub.nope.example.test", False),        # a descendant
    ("a.example.test", [("a.example.test", "b.other.test")], "other.test", True),   # target's zone
    ("a.example.test", [("a.example.test", "b.other.test")], "example.test", False),
])
def test_soa_kept_only_when_it_encloses_the_name_the_answer_is_about(qname, answer, soa_owner,
                                                                    kept):
    soa = rec_soa(soa_owner)
    ans = Answer(NOERROR, [rec_cname(n, t) for n, t in answer],
                 [rec_ns("example.test", "ns.attacker.test"), soa, rec_soa("example.test")])
    out = scrub(qname, A, ans, NO_POLICY)
    if kept:
        assert out.authority == [soa]
    else:
        assert soa not in out.authority


def test_nxdomain_soa_must_enclose_the_question():
    ans = Answer(NXDOMAIN, [], [rec_soa("attacker.test"), rec_soa("example.test"),
                                rec_soa("test")])
    out = scrub("nope.example.test", A, ans, NO_POLICY)
    assert out.rcode == NXDOMAIN and out.answer == []
    assert [r.name for r in out.authority] == ["example.test"]


def test_is_ancestor_walks_labels():
    w = encode_name
    assert is_ancestor(w("example.test"), w("a.example.test"))
    assert is_ancestor(w("a.example.test"), w("a.example.test"))
    assert is_ancestor(b"\x00", w("a.example.test"))
    assert not is_ancestor(w("xample.test"), w("a.example.test"))
    assert not is_ancestor(w("b.a.example.test"), w("a.example.test"))
    # A label that contains the bytes of a shorter name is no boundary.
    assert not is_ancestor(b"\x01t\x04test\x00", b"\x05xy\x01t\x04test\x00")
    assert not is_ancestor(b"", w("a.test"))


def test_in_zone_is_by_label():
    p = ScrubPolicy(NETS, ("corp.internal", "Lab.Test."))
    assert p.in_zone("corp.internal") and p.in_zone("git.corp.internal")
    assert p.in_zone("lab.test") and p.in_zone("a.b.lab.test")
    assert not p.in_zone("xcorp.internal") and not p.in_zone("internal")
    assert not p.in_zone("corp.internal.evil.test")
    # An escaped dot is part of a label: "evil\.corp" is one label under "internal".
    assert not p.in_zone("evil\\.corp.internal")
    assert p.in_zone("evil\\\\.corp.internal")  # an escaped backslash, then a real dot


def test_private_rdata_forms():
    p = ScrubPolicy(nets("10.0.0.0/8", "fc00::/7"))
    v4 = lambda ip: socket.inet_pton(socket.AF_INET, ip)  # noqa: E731
    v6 = lambda ip: socket.inet_pton(socket.AF_INET6, ip)  # noqa: E731
    assert p.private_rdata(A, v4("10.255.255.255")) and p.private_rdata(A, v4("10.0.0.0"))
    assert not p.private_rdata(A, v4("11.0.0.0")) and not p.private_rdata(A, v4("9.255.255.255"))
    assert p.private_rdata(AAAA, v6("fd00::1")) and not p.private_rdata(AAAA, v6("fe00::1"))
    assert p.private_rdata(AAAA, v6("::ffff:10.1.2.3"))
    assert p.private_rdata(AAAA, v6("64:ff9b::10.1.2.3"))
    assert not p.private_rdata(AAAA, v6("::ffff:192.0.2.1"))
    assert not p.private_rdata(AAAA, v6("::10.1.2.3"))   # IPv4-compatible: not reached as IPv4
    assert not ScrubPolicy(nets("fc00::/7")).private_rdata(AAAA, v6("::ffff:10.1.2.3"))
    # Overlapping and adjacent networks merge correctly.
    q = ScrubPolicy(nets("10.0.0.0/8", "10.1.0.0/16", "11.0.0.0/8", "192.168.0.0/16"))
    assert q.private_rdata(A, v4("11.200.0.1")) and q.private_rdata(A, v4("192.168.255.255"))
    assert not q.private_rdata(A, v4("12.0.0.0")) and not q.private_rdata(A, v4("192.169.0.0"))


def test_all_private_means_nodata_about_the_question():
    p = ScrubPolicy(NETS, ())
    ans = Answer(NOERROR, [rec_cname("www.shop.test", "e.cdn.test"), rec_a("e.cdn.test", "10.1.1.1")],
                 [])
    out = scrub("www.shop.test", A, ans, p)
    assert out.answer == [] and out.authority == []


# ------------------------------------------------------------------------------ unit: build_entry


def test_build_entry_cname_only_without_soa_is_negative():
    policy = TtlPolicy(min_ttl=30, max_ttl=86400, max_negative_ttl=300, servfail_ttl=5)
    key = make_key("x.example.test", A)
    ans = Answer(NOERROR, [rec_cname("x.example.test", "y.example.test", 86400)], [])
    e = build_entry(key, A, ans, None, policy, 100.0, "x.example.test")
    assert e[EXPIRES] - 100.0 == 30  # min(max-negative-ttl, 6 x servfail-ttl), not 86400
    # The CNAME itself, asked for, is an answer.
    e = build_entry(make_key("x.example.test", CNAME), CNAME, ans, None, policy, 100.0,
                    "x.example.test")
    assert e[EXPIRES] - 100.0 == 86400


def test_build_entry_huge_ttls():
    policy = TtlPolicy(min_ttl=30, max_ttl=86400, max_negative_ttl=300)
    key = make_key("x.example.test", A)
    e = build_entry(key, A, Answer(NOERROR, [rec_a("x.example.test", "192.0.2.1", 2**31)], []),
                    None, policy, 0.0, "x.example.test")
    assert e[EXPIRES] == 30
    e = build_entry(key, A, Answer(NOERROR, [], [rec_soa("example.test", ttl=2**31)]), None,
                    policy, 0.0, "x.example.test")
    assert e[EXPIRES] == 0.0  # negative TTL 0: answers its waiters, not cached


# ------------------------------------------------------------------------------ properties

NAMES = ["a.test", "b.test", "c.a.test", "test", "d.other.test"]
_name = st.sampled_from(NAMES + [n.upper() for n in NAMES])
_rec = st.one_of(
    st.builds(lambda n, t: rec_cname(n, t), _name, _name),
    st.builds(lambda n: rec_a(n, "192.0.2.1"), _name),
    st.builds(lambda n: rec_a(n, "10.0.0.1"), _name),
    st.builds(lambda n: rec_aaaa(n, "::ffff:10.0.0.1"), _name),
    st.builds(lambda n: rec_ns(n, "ns.attacker.test"), _name),
    st.builds(lambda n: rec_soa(n), _name),
)
_policy = st.sampled_from([NO_POLICY, ScrubPolicy(NETS, ()), ScrubPolicy(NETS, ("a.test",))])


def _chain_names(qname: str, out: Answer) -> list[str]:
    names = [qname]
    for r in out.answer:
        if r.type == CNAME and r.name.lower() == names[-1]:
            names.append(r.rdata.lower().decode("latin-1"))
    return names


@settings(max_examples=400, deadline=None)
@given(qname=st.sampled_from(NAMES), qtype=st.sampled_from([A, AAAA, CNAME, NS]),
       rcode=st.sampled_from([NOERROR, NXDOMAIN]), answer=st.lists(_rec, max_size=8),
       authority=st.lists(_rec, max_size=4), policy=_policy)
def test_scrub_properties(qname, qtype, rcode, answer, authority, policy):
    ans = Answer(rcode, list(answer), list(authority))
    out = scrub(qname, qtype, ans, policy)
    assert out.rcode == rcode
    # Idempotent, and never invents records.
    again = scrub(qname, qtype, out, policy)
    assert (again.answer, again.authority) == (out.answer, out.authority)
    assert all(r in answer for r in out.answer) and all(r in authority for r in out.authority)
    # The answer is a chain from the question, in order, then the asked type at its end.
    cur = encode_name(qname).lower()
    seen_final = False
    for r in out.answer:
        owner = encode_name(r.name).lower()
        assert owner == cur
        if r.type == CNAME and qtype != CNAME:
            assert not seen_final
            cur = r.rdata.lower()
        else:
            assert r.type == qtype
            seen_final = True
    # Authority: nothing, or one SOA enclosing the name the negative answer is about.
    assert len(out.authority) <= 1
    if out.authority:
        assert not seen_final
        [soa] = out.authority
        assert soa.type == SOA and is_ancestor(encode_name(soa.name).lower(), cur)
    # --private-address: no private address for a name outside the zones.
    if policy.private and not policy.in_zone(qname):
        assert not any(policy.private_rdata(r.type, r.rdata) for r in out.answer
                       if r.type in (A, AAAA))
