"""Turn a scrubbed upstream answer into a raw cache entry (once per miss): TTL floor and cap,
RFC 2308 negative TTLs, owner names compressed to the question.
"""

from __future__ import annotations

from dataclasses import dataclass

from sidecar.dns.cache import NEVER, RawEntry, new_entry
from sidecar.dns.types import Rcode, RRClass, RRType
from sidecar.dns.wire import RR_FIXED, encode_name
from sidecar.upstream.records import Answer, Rec, soa_minimum

# Plain ints: an entry holds its rcode, and entries stay tuples of atomic values (see
# sidecar.dns.cache.Entry); the type comparisons run per record.
NXDOMAIN = int(Rcode.NXDOMAIN)
SERVFAIL = int(Rcode.SERVFAIL)
_IN = int(RRClass.IN)
_CNAME = int(RRType.CNAME)
_SOA = int(RRType.SOA)


@dataclass(frozen=True)
class TtlPolicy:
    """TTL rules in seconds: floor and cap for data, cap for negative answers."""

    min_ttl: int = 30
    max_ttl: int = 86400
    max_negative_ttl: int = 300
    servfail_ttl: int = 5
    prefetch: bool = False


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
    name as :func:`~sidecar.dns.wire.qname_text` gives it, spares encoding owner names that are
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
        fixed = RR_FIXED.pack(rec.type, _IN, ttl, len(rec.rdata))
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
        soa = next((r for r in answer.authority if r.type == _SOA), None)
    negative = answer.rcode == NXDOMAIN or not an or (
        qtype != _CNAME and all(r.type == _CNAME for r in answer.answer))
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
