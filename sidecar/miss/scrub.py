"""What of an upstream's answer may be cached and served: the scrub between pool and cache.

An upstream reply is trusted only for the question it answers (RFC 5452 section 6, the
bailiwick rule of every caching resolver): the records on the question's own CNAME chain,
the records of the asked type at the chain's end, and, for a negative answer, one SOA of a
zone that encloses the name the negative answer is about. Anything else - an extra A for
some other name, NS and glue in authority, an SOA of an unrelated zone - is what a forged or
hostile reply carries to get into a cache, and is dropped here. An answer that keeps no
record of the asked type is NODATA, never an address.

``--private-address`` (Unbound's ``private-address``) then removes A/AAAA records inside
the operator's networks from answers to names outside every ``--zone`` suffix, so a public
name cannot point a crawler at the crawler's own network (DNS rebinding, SSRF). The test is
on the question name, not on the owner at the chain's end: the crawler connects to the name
it asked for, and an attacker's zone can CNAME into an internal-looking name at will. Trust
follows the pool that answered, and that pool is chosen by the question name.

Runs once per miss; the common answer (only records of the asked type at the question
name, nothing in authority) is returned as it came unless ``--private-address`` removes
something from it.
"""

from __future__ import annotations

import functools
import ipaddress
from bisect import bisect_right
from dataclasses import dataclass, field

from sidecar.dns.types import Rcode, RRType
from sidecar.dns.wire import WireError, encode_name
from sidecar.upstream.records import Answer, Rec

# Plain ints: compared per record.
NXDOMAIN = int(Rcode.NXDOMAIN)
_A, _CNAME, _SOA, _AAAA = (int(t) for t in (RRType.A, RRType.CNAME, RRType.SOA, RRType.AAAA))

#: A longer chain is cut (and answers NODATA): resolvers follow 8 to 16 CNAMEs at most.
MAX_CHAIN = 16

#: The top 96 bits of the IPv6 forms that carry an IPv4 address a host will reach as IPv4:
#: IPv4-mapped ``::ffff:0:0/96`` and NAT64's well-known ``64:ff9b::/96`` (RFC 6052).
_V4_IN_V6 = frozenset((0xFFFF, 0x0064FF9B << 64))


def _intervals(nets: tuple, version: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    # Merged, sorted [first, last] address intervals: one bisect per record, however many
    # networks are configured.
    spans = sorted((int(n.network_address), int(n.broadcast_address))
                   for n in nets if n.version == version)
    merged: list[list[int]] = []
    for lo, hi in spans:
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return tuple(m[0] for m in merged), tuple(m[1] for m in merged)


def _inside(addr: int, spans: tuple[tuple[int, ...], tuple[int, ...]]) -> bool:
    i = bisect_right(spans[0], addr) - 1
    return i >= 0 and addr <= spans[1][i]


@dataclass(frozen=True)
class ScrubPolicy:
    """``private``: networks removed from A/AAAA answers for names outside every ``zones``
    suffix (``--private-address``); ``zones``: the ``--zone`` suffixes (lower-case, no dots
    at either end)."""

    private: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    zones: tuple[str, ...] = ()
    # Derived once: address intervals and first bytes per family, the zone suffixes.
    _v4: tuple[tuple[int, ...], tuple[int, ...]] = field(init=False, repr=False, compare=False)
    _v6: tuple[tuple[int, ...], tuple[int, ...]] = field(init=False, repr=False, compare=False)
    _v4_first: frozenset[int] = field(init=False, repr=False, compare=False)
    _v6_first: frozenset[int] = field(init=False, repr=False, compare=False)
    _zones: frozenset[str] = field(init=False, repr=False, compare=False)
    _dotted: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        zones = tuple(z.lower().strip(".") for z in self.zones)
        object.__setattr__(self, "_v4", _intervals(self.private, 4))
        object.__setattr__(self, "_v6", _intervals(self.private, 6))
        # First bytes any network touches: most public addresses are let through on one
        # set lookup. Byte 0 stays in the IPv6 set while IPv4 networks exist (the
        # ::ffff:0:0/96 and 64:ff9b::/96 forms start with it).
        first: dict[int, set[int]] = {4: set(), 6: set()}
        for n in self.private:
            shift = n.max_prefixlen - 8
            first[n.version].update(range(int(n.network_address) >> shift,
                                          (int(n.broadcast_address) >> shift) + 1))
        if first[4]:
            first[6].add(0)
        object.__setattr__(self, "_v4_first", frozenset(first[4]))
        object.__setattr__(self, "_v6_first", frozenset(first[6]))
        object.__setattr__(self, "_zones", frozenset(zones))
        object.__setattr__(self, "_dotted", tuple("." + z for z in zones if z))

    def in_zone(self, name: str) -> bool:
        """Whether ``name`` (lower-case, no trailing dot, as ``qname_text`` writes it) is a
        ``--zone`` suffix or under one. A dot escaped inside a label (``\\.``) is no label
        boundary."""
        if name in self._zones or "" in self._zones:
            return True
        if not name.endswith(self._dotted):
            return False
        for dz in self._dotted:
            if name.endswith(dz):
                i = len(name) - len(dz)   # index of the dot
                j = i
                while j > 0 and name[j - 1] == "\\":
                    j -= 1
                if (i - j) % 2 == 0:
                    return True
        return False

    def private_rdata(self, rtype: int, rdata: bytes) -> bool:
        """Whether an A/AAAA record's address is inside a ``--private-address`` network.

        An AAAA that carries an IPv4 address (IPv4-mapped ``::ffff:a.b.c.d``, which a
        dual-stack socket connects to as IPv4, or NAT64's ``64:ff9b::a.b.c.d``, which a
        NAT64 gateway translates) is also checked against the IPv4 networks: that is the
        form an attacker uses to slip an IPv4 target past a list of IPv4 ranges.
        """
        if rtype == _A:
            return rdata[0] in self._v4_first and _inside(int.from_bytes(rdata, "big"), self._v4)
        if rdata[0] not in self._v6_first:
            return False
        addr = int.from_bytes(rdata, "big")
        if _inside(addr, self._v6):
            return True
        if addr >> 32 in _V4_IN_V6 and self._v4[0]:
            return _inside(addr & 0xFFFFFFFF, self._v4)
        return False


@functools.lru_cache(maxsize=4096)
def _wire(name: str) -> bytes:
    # Owner names are compared in lower-cased wire form: unlike presentation text it has one
    # spelling per name (c-ares and qname_text escape odd bytes differently).
    try:
        return encode_name(name).lower()
    except WireError:
        return b""  # matches no name


def is_ancestor(owner: bytes, name: bytes) -> bool:
    """Whether wire name ``owner`` is ``name`` or one of its ancestors (both lower-case)."""
    if not owner:
        return False
    if len(owner) > len(name):
        return False
    pos = 0
    cut = len(name) - len(owner)
    while pos < cut:
        pos += name[pos] + 1
    return pos == cut and name[pos:] == owner


def scrub(name: str, qtype: int, answer: Answer, policy: ScrubPolicy) -> Answer:
    """The part of ``answer`` (to ``name``/``qtype``; ``name`` lower-case without trailing
    dot) that may be cached: the chain, the asked type at its end, and for a negative
    answer the first SOA of a zone enclosing the name it is about (the question, or the
    chain's last target: RFC 2308 puts that zone's SOA there). Authority is dropped for a
    positive answer (nothing reads it). A CNAME query gets the CNAME at the name, unchased.
    """
    recs = answer.answer
    if recs and answer.rcode != NXDOMAIN:
        for r in recs:
            if r.type != qtype or (r.name != name and r.name.lower() != name):
                break
        else:
            # The common answer: nothing to drop from the answer section.
            if policy.private and qtype in (_A, _AAAA):
                return _private(name, qtype, answer, recs, (), policy)
            if answer.authority:
                return Answer(answer.rcode, recs, [])
            return answer
    end = _wire(name)
    chain: list[Rec] = []
    final: list[Rec] = []
    if recs:
        if qtype != _CNAME:
            cnames: dict[bytes, Rec] = {}
            for r in recs:
                if r.type == _CNAME:
                    cnames.setdefault(_wire(r.name), r)
            if cnames:
                seen = {end}
                while (link := cnames.get(end)) is not None:
                    chain.append(link)
                    end = link.rdata.lower()
                    if end in seen or len(chain) >= MAX_CHAIN:
                        end = b""  # a loop or an endless chain: no data at its end
                        break
                    seen.add(end)
        if end:
            final = [r for r in recs if r.type == qtype and _wire(r.name) == end]
    if final and answer.rcode != NXDOMAIN:
        if policy.private and qtype in (_A, _AAAA):
            return _private(name, qtype, answer, final, chain, policy)
        return Answer(answer.rcode, chain + final, [])
    if not end:
        # A loop or an endless chain has no last target: no zone's SOA is about it (the
        # question's zone is not: the chain leaves it).
        return Answer(answer.rcode, chain, [])
    return Answer(answer.rcode, chain, _soa(answer.authority, end))


def _soa(authority: list[Rec], about: bytes) -> list[Rec]:
    for r in authority:
        if r.type == _SOA and is_ancestor(_wire(r.name), about):
            return [r]
    return []


def _private(name: str, qtype: int, answer: Answer, final: list[Rec], chain: list[Rec] | tuple,
             policy: ScrubPolicy) -> Answer:
    rcode = answer.rcode
    if not policy.in_zone(name):
        private = policy.private_rdata
        keep = [r for r in final if not private(qtype, r.rdata)]
        if not keep:
            # Every address was private: the name has no address a crawler may use. NODATA
            # for the question itself (the chain goes too, so the negative answer and the
            # SOA it needs are about the name that was asked).
            return Answer(rcode, [], [])
        final = keep
    if not chain and final is answer.answer and not answer.authority:
        return answer
    return Answer(rcode, [*chain, *final], [])
