"""Turn an upstream answer (wire records) into a raw cache entry.

Runs once per miss. Records arrive as :class:`Rec` with their rdata already in wire form
(``caresquery``), so an entry is a join of bytes; dnslib only encodes the rdata of the rare
types c-ares hands over as decoded objects.
"""

from __future__ import annotations

import logging
import socket
import struct
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from dnslib import CAA, NAPTR, DNSBuffer

from .cache import NEVER, RawEntry, new_entry
from .wire import NXDOMAIN, RR_FIXED, SERVFAIL, encode_name

log = logging.getLogger(__name__)

# Query types aiodns's query_dns accepts, by number. ANY is left out on purpose: it is an
# amplification vector and no crawler needs it (RFC 8482).
FORWARDABLE: dict[int, str] = {
    1: "A", 28: "AAAA", 5: "CNAME", 15: "MX", 16: "TXT", 2: "NS", 6: "SOA", 33: "SRV",
    12: "PTR", 257: "CAA", 35: "NAPTR",
}
TYPE_NUMBERS = {v: k for k, v in FORWARDABLE.items()}


class Rec(NamedTuple):
    """One resource record of an upstream reply; ``rdata`` is in wire form (names in it
    uncompressed), ``name`` in presentation form."""

    name: str
    type: int
    ttl: int
    rdata: bytes


@dataclass
class Answer:
    """An upstream's answer: rcode (NOERROR/NXDOMAIN) and its answer and authority records."""

    rcode: int
    answer: list[Rec] = field(default_factory=list)
    authority: list[Rec] = field(default_factory=list)


def soa_minimum(soa: Rec) -> int:
    """The MINIMUM field of an SOA record (the last 32 bits of its rdata)."""
    return int.from_bytes(soa.rdata[-4:], "big")


@dataclass(frozen=True)
class TtlPolicy:
    """TTL rules in seconds: floor and cap for data, cap for negative answers."""

    min_ttl: int = 30
    max_ttl: int = 86400
    max_negative_ttl: int = 300
    servfail_ttl: int = 5
    prefetch: bool = False


def _txt_strings(data: bytes) -> bytes:
    # pycares's query_dns joins a record's character-strings; re-split at the 255-byte limit.
    if not data:
        return b"\x00"
    return b"".join(bytes((len(c),)) + c for c in (data[i : i + 255]
                                                    for i in range(0, len(data), 255)))


def rdata_from_pycares(rtype: int, data: Any) -> bytes | None:
    """Wire rdata for a pycares record data object, or None for a type we cannot encode."""
    if rtype == 1:
        return socket.inet_pton(socket.AF_INET, data.addr)
    if rtype == 28:
        return socket.inet_pton(socket.AF_INET6, data.addr)
    if rtype == 5:
        return encode_name(data.cname)
    if rtype == 2:
        return encode_name(data.nsdname)
    if rtype == 12:
        return encode_name(data.dname)
    if rtype == 15:
        return struct.pack(">H", data.priority) + encode_name(data.exchange)
    if rtype == 16:
        return _txt_strings(data.data)
    if rtype == 6:
        return (encode_name(data.mname) + encode_name(data.rname)
                + struct.pack(">IIIII", data.serial, data.refresh, data.retry, data.expire,
                              data.minimum))
    if rtype == 33:
        return struct.pack(">HHH", data.priority, data.weight, data.port) + encode_name(
            data.target)
    # The rest have at most one name in their rdata, so dnslib's name compression (relative
    # to this fresh buffer) cannot produce a pointer.
    if rtype == 257:
        rd = CAA(data.critical, data.tag, data.value)
    elif rtype == 35:
        rd = NAPTR(data.order, data.preference, data.flags.encode(), data.service.encode(),
                   data.regexp.encode(), data.replacement)
    else:
        return None
    buf = DNSBuffer()
    rd.pack(buf)
    return bytes(buf.data)


def rec_from_pycares(rec: Any) -> Rec | None:
    """A :class:`Rec` for a pycares ``DNSRecord`` (the ``query_dns`` fallback path)."""
    rdata = rdata_from_pycares(rec.type, rec.data)
    return None if rdata is None else Rec(rec.name, rec.type, rec.ttl, rdata)


#: RFC 2181 section 8: a TTL with the top bit set is treated as zero (then floored).
TTL_LIMIT = 1 << 31


def negative_ttl(soa_ttl: int, minimum: int, policy: TtlPolicy) -> int:
    """RFC 2308 section 5: min(SOA TTL, SOA MINIMUM), capped by ``--max-negative-ttl``; an
    SOA TTL of 2^31 or more counts as 0 (RFC 2181 section 8), so it is not cached."""
    if soa_ttl >= TTL_LIMIT:
        soa_ttl = 0
    return max(0, min(soa_ttl, minimum, policy.max_negative_ttl))


_QNAME_PTR = b"\xc0\x0c"


def build_entry(key: bytes, qtype: int, answer: Answer, soa: Rec | None,
                policy: TtlPolicy, now: float, qtext: str | None = None) -> RawEntry:
    """Encode ``answer`` as a raw cache entry for ``key`` (one that is already expired when
    nothing may be cached, TTL 0: it still answers the queries waiting for it).

    ``soa`` is the enclosing zone's SOA for NXDOMAIN/NODATA when it did not come in the
    answer's authority section, else None. Data TTLs are clamped to [min_ttl, max_ttl];
    negative answers live for the SOA's negative TTL; the entry expires with its shortest
    TTL. A TTL of 2^31 or more counts as 0 before the floor (RFC 2181 section 8). The answer
    is negative when it is NXDOMAIN, empty, or (for a question other than CNAME) only a CNAME
    chain: the same test the resolver makes, on the scrubbed answer, so a reply with no
    record of the asked type is cached as NODATA whether or not an SOA could be found.
    Owner names equal to the question are written as a pointer to it (so the client's
    0x20 case shows through); other names are written in full. ``qtext``, the question's
    name as :func:`~sidecar.wire.qname_text` gives it, spares encoding owner names that are
    the question.
    """
    qname = key[:-4]
    parts: list[bytes] = []
    offsets: list[int] = []
    ttls: list[int] = []
    pos = 0

    def add(rec: Rec, ttl: int) -> None:
        nonlocal pos
        if qtext is not None and rec.name.lower() == qtext:
            owner = _QNAME_PTR
        else:
            owner = encode_name(rec.name)
            if owner.lower() == qname:
                owner = _QNAME_PTR
        fixed = RR_FIXED.pack(rec.type, 1, ttl, len(rec.rdata))
        parts.append(owner + fixed + rec.rdata)
        offsets.append(pos + len(owner) + 4)
        pos += len(owner) + 10 + len(rec.rdata)

    min_ttl, max_ttl = policy.min_ttl, policy.max_ttl
    for rec in answer.answer:
        ttl = rec.ttl
        ttl = min(max(ttl if ttl < TTL_LIMIT else 0, min_ttl), max_ttl)
        ttls.append(ttl)
        add(rec, ttl)
    an = len(parts)
    if soa is None:
        soa = next((r for r in answer.authority if r.type == 6), None)
    negative = answer.rcode == NXDOMAIN or not an or (
        qtype != 5 and all(r.type == 5 for r in answer.answer))
    if negative and soa is not None:
        nttl = negative_ttl(soa.ttl, soa_minimum(soa), policy)
        ttls.append(nttl)
        add(soa, nttl)
    elif negative:
        # No SOA could be learned: RFC 2308 says such answers should not be cached for long.
        ttls.append(min(policy.max_negative_ttl, policy.servfail_ttl * 6))
    ns = len(parts) - an
    lifetime = min(ttls) if ttls else 0
    body = b"".join(parts)
    rel = tuple(offsets)
    if lifetime <= 0:
        return new_entry(answer.rcode, an, ns, 0, body, rel, now, 0.0)
    prefetch_at = now + lifetime * 0.9 if policy.prefetch and lifetime >= 10 else NEVER
    return new_entry(answer.rcode, an, ns, 0, body, rel, now, lifetime, prefetch_at)


def servfail_entry(now: float, policy: TtlPolicy) -> RawEntry:
    """A SERVFAIL remembered for ``servfail_ttl`` seconds (CoreDNS's ``servfail`` default)."""
    return new_entry(SERVFAIL, 0, 0, 0, b"", (), now, float(policy.servfail_ttl))
