"""An upstream's answer as records in wire form: :class:`Rec` and :class:`Answer`.

Records arrive with their rdata already in wire form (:mod:`sidecar.upstream.query`); dnslib
only encodes the rdata of the rare types c-ares hands over as decoded objects.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from dnslib import CAA, NAPTR, DNSBuffer

from sidecar.dns.types import RRType
from sidecar.dns.wire import encode_name


class Rec(NamedTuple):
    """One resource record of an upstream reply; ``rdata`` is in wire form (names in it
    uncompressed), ``name`` in presentation form."""

    name: str
    type: int
    ttl: int
    rdata: bytes


@dataclass
class Answer:
    """An upstream's answer: rcode (:class:`~sidecar.dns.types.Rcode` NOERROR or NXDOMAIN, as
    a plain int) and its answer and authority records."""

    rcode: int
    answer: list[Rec] = field(default_factory=list)
    authority: list[Rec] = field(default_factory=list)


def soa_minimum(soa: Rec) -> int:
    """The MINIMUM field of an SOA record (the last 32 bits of its rdata)."""
    return int.from_bytes(soa.rdata[-4:], "big")


def _txt_strings(data: bytes) -> bytes:
    # pycares's query_dns joins a record's character-strings; re-split at the 255-byte limit.
    if not data:
        return b"\x00"
    return b"".join(bytes((len(c),)) + c for c in (data[i : i + 255]
                                                    for i in range(0, len(data), 255)))


def rdata_from_pycares(rtype: int, data: Any) -> bytes | None:
    """Wire rdata for a pycares record data object, or None for a type we cannot encode."""
    if rtype == RRType.A:
        return socket.inet_pton(socket.AF_INET, data.addr)
    if rtype == RRType.AAAA:
        return socket.inet_pton(socket.AF_INET6, data.addr)
    if rtype == RRType.CNAME:
        return encode_name(data.cname)
    if rtype == RRType.NS:
        return encode_name(data.nsdname)
    if rtype == RRType.PTR:
        return encode_name(data.dname)
    if rtype == RRType.MX:
        return struct.pack(">H", data.priority) + encode_name(data.exchange)
    if rtype == RRType.TXT:
        return _txt_strings(data.data)
    if rtype == RRType.SOA:
        return (encode_name(data.mname) + encode_name(data.rname)
                + struct.pack(">IIIII", data.serial, data.refresh, data.retry, data.expire,
                              data.minimum))
    if rtype == RRType.SRV:
        return struct.pack(">HHH", data.priority, data.weight, data.port) + encode_name(
            data.target)
    # The rest have at most one name in their rdata, so dnslib's name compression (relative
    # to this fresh buffer) cannot produce a pointer.
    rd: CAA | NAPTR
    if rtype == RRType.CAA:
        rd = CAA(data.critical, data.tag, data.value)
    elif rtype == RRType.NAPTR:
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
