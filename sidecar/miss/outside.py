"""An entry from outside the process (the fleet's shared cache) checked like an upstream answer.

Anyone who can write to the shared cache can write any entry, so one read from it is
trusted no more than an upstream reply: its records are parsed back (owner names only as
the question or in full, names inside rdata uncompressed, class IN), run through the same
scrub an upstream answer gets (the question's CNAME chain and the asked type, one enclosing
SOA for a negative answer, ``--private-address``), and the entry is refused unless the scrub
keeps it whole. TTLs may not exceed this sidecar's caps. The snapshot decoder has already
checked the structure (section walk, TTL offsets): this is about meaning.
"""

from __future__ import annotations

import struct

from sidecar.dns.cache import BODY, EXPIRES, HDR, RCODE, RawEntry
from sidecar.dns.types import RRClass, RRType
from sidecar.dns.wire import key_type, qname_text
from sidecar.miss.entry import TtlPolicy
from sidecar.miss.scrub import ScrubPolicy, scrub
from sidecar.upstream.records import Answer, Rec

_RR = struct.Struct(">HHIH")
_COUNTS = struct.Struct(">HHHH")
_QNAME_PTR = b"\xc0\x0c"
_IN = int(RRClass.IN)
_A, _AAAA, _CNAME, _SOA = (int(t) for t in (RRType.A, RRType.AAAA, RRType.CNAME, RRType.SOA))
#: rdata that is one name, and rdata of a fixed prefix then a name (names must be
#: uncompressed: a pointer would make the client read some other part of its reply).
_NAME_RDATA = frozenset((*(int(t) for t in (RRType.CNAME, RRType.NS, RRType.PTR)), 39))  # 39: DNAME
_PREFIXED_NAME = {int(RRType.MX): 2, int(RRType.SRV): 6}
_FIXED_LEN = {_A: 4, _AAAA: 16}
#: Answers and negative answers, never failures.
_RCODES = frozenset((0, 3))
#: Slack on TTL caps (seconds): an entry's expiry and its TTLs are rounded differently.
_SLACK = 1


def _name_end(data: bytes, pos: int, end: int) -> int:
    """End of an uncompressed name at ``pos`` inside ``data[:end]``, or -1."""
    while pos < end:
        length = data[pos]
        if length == 0:
            return pos + 1
        if length > 63:
            return -1
        pos += 1 + length
    return -1


def _rdata_ok(rtype: int, rdata: bytes) -> bool:
    n = len(rdata)
    fixed = _FIXED_LEN.get(rtype)
    if fixed is not None:
        return n == fixed
    if rtype in _NAME_RDATA:
        return _name_end(rdata, 0, n) == n
    skip = _PREFIXED_NAME.get(rtype)
    if skip is not None:
        return n > skip and _name_end(rdata, skip, n) == n
    if rtype == _SOA:
        mid = _name_end(rdata, 0, n)
        return mid > 0 and _name_end(rdata, mid, n) == n - 20
    return True


def _records(key: bytes, body: bytes, count: int) -> list[Rec] | None:
    qtext = qname_text(key)
    out: list[Rec] = []
    pos, n = 0, len(body)
    for _ in range(count):
        if body.startswith(_QNAME_PTR, pos):
            owner, pos = qtext, pos + 2
        else:
            end = _name_end(body, pos, n)
            if end < 0:
                return None
            owner, pos = qname_text(body[pos:end]), end
        if pos + 10 > n:
            return None
        rtype, rclass, ttl, rdlen = _RR.unpack_from(body, pos)
        pos += 10
        rdata = body[pos:pos + rdlen]
        pos += rdlen
        if rclass != _IN or len(rdata) != rdlen or not _rdata_ok(rtype, rdata):
            return None
        out.append(Rec(owner, rtype, ttl, rdata))
    return out if pos == n else None


def check_outside(key: bytes, e: RawEntry, scrub_policy: ScrubPolicy, policy: TtlPolicy,
                  now: float) -> str | None:
    """Why the entry ``e`` for ``key`` (from outside) may not be cached; None when it may."""
    rcode = e[RCODE]
    if rcode not in _RCODES:
        return f"rcode {rcode}"
    _qd, an, ns, ar = _COUNTS.unpack_from(e[HDR], 1)
    if ar:
        return "additional records"
    recs = _records(key, e[BODY], an + ns)
    if recs is None:
        return "records do not parse"
    answer = Answer(rcode, recs[:an], recs[an:])
    negative = rcode != 0 or not any(r.type == key_type(key) for r in answer.answer)
    # A negative answer's CNAME chain may carry data TTLs; the entry lives for the
    # negative TTL.
    cap = (policy.max_negative_ttl if negative else policy.max_ttl) + _SLACK
    if e[EXPIRES] - now > cap or any(r.ttl > policy.max_ttl + _SLACK for r in recs):
        return "TTL beyond this sidecar's cap"
    kept = scrub(qname_text(key), key_type(key), answer, scrub_policy)
    if kept.answer != answer.answer or kept.authority != answer.authority:
        return "records a scrub removes"
    return None
