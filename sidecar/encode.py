"""Turn an upstream answer (pycares records) into a cache :class:`~sidecar.cache.Entry`.

Runs once per miss, so it uses dnslib for correctness; the hit path never comes here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from dnslib import (
    AAAA,
    CAA,
    CNAME,
    MX,
    NAPTR,
    NS,
    PTR,
    QTYPE,
    RR,
    SOA,
    SRV,
    TXT,
    A,
    DNSHeader,
    DNSLabel,
    DNSQuestion,
    DNSRecord,
)

from .cache import NEVER, RawEntry, new_entry
from .wire import NXDOMAIN, SERVFAIL, rr_ttl_offsets

log = logging.getLogger(__name__)

# Query types aiodns's query_dns accepts, by number. ANY is left out on purpose: it is an
# amplification vector and no crawler needs it (RFC 8482).
FORWARDABLE: dict[int, str] = {
    1: "A", 28: "AAAA", 5: "CNAME", 15: "MX", 16: "TXT", 2: "NS", 6: "SOA", 33: "SRV",
    12: "PTR", 257: "CAA", 35: "NAPTR",
}
TYPE_NUMBERS = {v: k for k, v in FORWARDABLE.items()}


@dataclass
class Answer:
    """An upstream's answer: rcode (NOERROR/NXDOMAIN) and pycares records per section."""

    rcode: int
    answer: list[Any] = field(default_factory=list)
    authority: list[Any] = field(default_factory=list)


@dataclass(frozen=True)
class TtlPolicy:
    """TTL rules in seconds: floor and cap for data, cap for negative answers."""

    min_ttl: int = 30
    max_ttl: int = 86400
    max_negative_ttl: int = 300
    servfail_ttl: int = 5
    prefetch: bool = False


def _txt_strings(data: bytes) -> list[bytes]:
    # c-ares joins a record's character-strings; re-split at the 255-byte limit.
    if not data:
        return [b""]
    return [data[i : i + 255] for i in range(0, len(data), 255)]


def to_rdata(rtype: int, data: Any) -> Any:
    """dnslib rdata for one pycares record data object, or None for a type we cannot encode."""
    if rtype == 1:
        return A(data.addr)
    if rtype == 28:
        return AAAA(data.addr)
    if rtype == 5:
        return CNAME(data.cname)
    if rtype == 15:
        return MX(data.exchange, data.priority)
    if rtype == 16:
        return TXT(_txt_strings(data.data))
    if rtype == 2:
        return NS(data.nsdname)
    if rtype == 6:
        return SOA(data.mname, data.rname,
                   (data.serial, data.refresh, data.retry, data.expire, data.minimum))
    if rtype == 33:
        return SRV(data.priority, data.weight, data.port, data.target)
    if rtype == 12:
        return PTR(data.dname)
    if rtype == 257:
        return CAA(data.critical, data.tag, data.value)
    if rtype == 35:
        return NAPTR(data.order, data.preference, data.flags.encode(), data.service.encode(),
                     data.regexp.encode(), data.replacement)
    return None


def _labels(key: bytes) -> list[bytes]:
    labels = []
    pos = 0
    while key[pos]:
        n = key[pos]
        labels.append(key[pos + 1 : pos + 1 + n])
        pos += n + 1
    return labels


def negative_ttl(soa_ttl: int, soa_minimum: int, policy: TtlPolicy) -> int:
    """RFC 2308 section 5: min(SOA TTL, SOA MINIMUM), capped by ``--max-negative-ttl``."""
    return max(0, min(soa_ttl, soa_minimum, policy.max_negative_ttl))


def build_entry(key: bytes, qtype: int, answer: Answer, soa: Any | None,
                policy: TtlPolicy, now: float) -> RawEntry:
    """Encode ``answer`` as a raw cache entry for ``key`` (one that is already expired when
    nothing may be cached, TTL 0: it still answers the queries waiting for it).

    ``soa`` is the enclosing zone's SOA (a pycares record) for NXDOMAIN/NODATA, or None.
    Data TTLs are clamped to [min_ttl, max_ttl]; negative answers live for the SOA's negative
    TTL; the entry expires with its shortest TTL.
    """
    qname = DNSLabel(_labels(key))
    header = DNSHeader(qr=1, ra=1, rd=1, rcode=answer.rcode)
    msg = DNSRecord(header, q=DNSQuestion(qname, qtype))
    ttls: list[int] = []
    for rec in answer.answer:
        rdata = to_rdata(rec.type, rec.data)
        if rdata is None:
            continue
        ttl = min(max(rec.ttl, policy.min_ttl), policy.max_ttl)
        ttls.append(ttl)
        msg.add_answer(RR(rec.name or ".", rec.type, rdata=rdata, ttl=ttl))
    soa_recs = [r for r in answer.authority if r.type == 6]
    if soa is None and soa_recs:
        soa = soa_recs[0]
    negative = answer.rcode == NXDOMAIN or not msg.rr or (
        qtype not in (5,) and all(r.rtype == 5 for r in msg.rr) and soa is not None)
    if negative and soa is not None:
        nttl = negative_ttl(soa.ttl, soa.data.minimum, policy)
        ttls.append(nttl)
        msg.add_auth(RR(soa.name or ".", QTYPE.SOA, rdata=to_rdata(6, soa.data), ttl=nttl))
    elif negative:
        # No SOA could be learned: RFC 2308 says such answers should not be cached for long.
        ttls.append(min(policy.max_negative_ttl, policy.servfail_ttl * 6))
    lifetime = min(ttls) if ttls else 0
    packed = bytes(msg.pack())
    qend = 12 + len(key)
    an, ns, ar = len(msg.rr), len(msg.auth), len(msg.ar)
    offsets, _ttls, end = rr_ttl_offsets(packed, qend, an + ns + ar)
    body = packed[qend:end]
    rel = tuple(o - qend for o in offsets)
    if lifetime <= 0:
        return new_entry(answer.rcode, an, ns, ar, body, rel, now, 0.0)
    prefetch_at = now + lifetime * 0.9 if policy.prefetch and lifetime >= 10 else NEVER
    return new_entry(answer.rcode, an, ns, ar, body, rel, now, lifetime, prefetch_at)


def servfail_entry(now: float, policy: TtlPolicy) -> RawEntry:
    """A SERVFAIL remembered for ``servfail_ttl`` seconds (CoreDNS's ``servfail`` default)."""
    return new_entry(SERVFAIL, 0, 0, 0, b"", (), now, float(policy.servfail_ttl))
