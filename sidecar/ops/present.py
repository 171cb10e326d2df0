"""Cache entries as JSON: the records of an entry in presentation form (through dnslib),
for ``GET /cache`` and the pre-warm results."""

from __future__ import annotations

import ipaddress
import json
import socket
from typing import Any

from dnslib import QTYPE, RR, DNSRecord

from sidecar.dns.cache import Entry
from sidecar.dns.types import RCODE_NAMES, TYPE_NUMBERS
from sidecar.dns.wire import RR_FIXED, skip_name

_ADDRESS_FAMILIES = {1: socket.AF_INET, 28: socket.AF_INET6}
#: Upper bound of a pre-warm result's JSON without its name and records (keys, type, rcode,
#: a ten-digit TTL, the separator before it).
_RESULT_FIXED_BYTES = 96
#: Record types whose presentation form (an address) needs no JSON escaping.
_ADDRESS_TYPES = frozenset({"A", "AAAA"})


def decode_entry(key: bytes, entry: Entry) -> DNSRecord:
    """Parse a cache entry as a full DNS reply (ID 0), TTLs as of the entry's last render."""
    return DNSRecord.parse(b"\x00\x00\x81" + entry.hdr + key + entry.body)


def _rr_data(rr: RR) -> str:
    if rr.rtype in (1, 28):
        return str(ipaddress.ip_address(str(rr.rdata)))
    return str(rr.rdata)


def entry_records(key: bytes, entry: Entry, qtype: int) -> list[str]:
    """The records a pre-warm reports for an entry: for A/AAAA the addresses at the end of
    any CNAME chain (read straight from the wire bytes), for other types the rdata of the
    answer records of that type in presentation form (via dnslib)."""
    if qtype not in _ADDRESS_FAMILIES:
        return final_records(decode_entry(key, entry), qtype)
    family = _ADDRESS_FAMILIES[qtype]
    msg = b"\x00\x00\x81" + entry.hdr + key + entry.body
    count = int.from_bytes(entry.hdr[3:5], "big")
    pos = 12 + len(key)
    out = []
    for _ in range(count):
        pos = skip_name(msg, pos)
        rtype, _rclass, _ttl, rdlen = RR_FIXED.unpack_from(msg, pos)
        pos += 10
        if rtype == qtype:
            out.append(socket.inet_ntop(family, msg[pos : pos + rdlen]))
        pos += rdlen
    return out


def final_records(msg: DNSRecord, qtype: int) -> list[str]:
    """The rdata (presentation form) of the answer records of type ``qtype``: for A/AAAA
    the addresses at the end of any CNAME chain."""
    return [_rr_data(rr) for rr in msg.rr if rr.rtype == qtype]


def rr_json(rr: RR, aged: int) -> dict[str, Any]:
    return {
        "name": str(rr.rname).rstrip(".") or ".",
        "type": QTYPE.get(rr.rtype, str(rr.rtype)),
        "ttl": max(0, int(rr.ttl) - aged),
        "data": _rr_data(rr),
    }


def rcode_name(rcode: int) -> str:
    return RCODE_NAMES.get(rcode, str(rcode))


def entry_json(name: str, qtype: str, key: bytes, entry: Entry, now: float) -> dict[str, Any]:
    """The ``GET /cache`` document of ``entry`` at ``now`` (the cache's clock): rcode,
    remaining TTL (``ttl`` whole seconds, 0 once expired; ``expires_in`` seconds, negative
    once expired), ``stale``, the records, and every section."""
    msg = decode_entry(key, entry)
    age = now - entry.stored
    aged = max(0, int(age) - entry.age)  # the body's TTLs are as of ``age`` s after storage
    expires_in = entry.expires - now
    return {
        "name": name,
        "type": qtype,
        "rcode": rcode_name(entry.rcode),
        "ttl": max(0, int(expires_in)),
        "expires_in": round(expires_in, 3),
        "age": round(age, 3),
        "stale": expires_in <= 0,
        "records": final_records(msg, TYPE_NUMBERS[qtype]),
        "answer": [rr_json(rr, aged) for rr in msg.rr],
        "authority": [rr_json(rr, aged) for rr in msg.auth],
        "additional": [rr_json(rr, aged) for rr in msg.ar],
    }


def result_size(result: dict[str, Any]) -> int:
    """An upper bound of the bytes ``result`` takes in a pre-warm response (names are
    printable ASCII, so at worst every character is escaped as two; addresses need no
    escaping; other records are measured)."""
    records = result["records"]
    if result["type"] in _ADDRESS_TYPES:
        size = sum(map(len, records)) + 4 * len(records)
    else:
        size = sum(len(json.dumps(r)) + 2 for r in records)
    return _RESULT_FIXED_BYTES + 2 * len(result["name"]) + size
