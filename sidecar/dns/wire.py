"""Raw DNS wire helpers used on the hot path and for error replies.

A full parser (dnslib) builds objects for every section of a message; these helpers touch
only the bytes they need (header, question, OPT), so a cache hit never builds a dnslib
object.
"""

from __future__ import annotations

import struct
from typing import Final, NamedTuple

# RCODE_NAMES is re-exported: stats and the API read the names from here.
from sidecar.dns.types import RCODE_NAMES as RCODE_NAMES
from sidecar.dns.types import Rcode, RRClass, RRType
from sidecar.errors import WireError

# The registries' numbers as plain ints (sidecar.dns.types holds the names): these end up in
# cache entries and index the per-rcode counters. An IntEnum member in an entry tuple would
# keep the tuple tracked by the cyclic GC (see cache.Entry), and a list indexed by one
# leaves CPython's int fast path.
NOERROR: Final = int(Rcode.NOERROR)
FORMERR: Final = int(Rcode.FORMERR)
SERVFAIL: Final = int(Rcode.SERVFAIL)
NXDOMAIN: Final = int(Rcode.NXDOMAIN)
NOTIMP: Final = int(Rcode.NOTIMP)
REFUSED: Final = int(Rcode.REFUSED)
BADVERS: Final = int(Rcode.BADVERS)  # extended rcode, carried in OPT

TYPE_OPT: Final = int(RRType.OPT)
CLASS_IN: Final = int(RRClass.IN)

#: UDP payload size we advertise, in bytes (the DNS flag day value).
OUR_UDP_PAYLOAD: Final = 1232
#: UDP payload every client accepts, in bytes (RFC 1035; RFC 6891 floors a smaller EDNS
#: value to it).
MIN_UDP_PAYLOAD: Final = 512

_H = struct.Struct(">HHHHHH")
_HH = struct.Struct(">HH")

#: Our own OPT record: root name, type OPT, UDP payload :data:`OUR_UDP_PAYLOAD`, extended
#: rcode 0, version 0, no flags, no options.
OPT_RR: Final = b"\x00" + _HH.pack(TYPE_OPT, OUR_UDP_PAYLOAD) + bytes(6)
#: Root name, type and UDP payload of our OPT record: what precedes its extended rcode.
_OPT_HEAD: Final = OPT_RR[:5]
_OPT = struct.Struct(">HHIH")  # type, class (= udp size), ttl (= ext rcode/version/flags), rdlen
#: An OPT record's fixed part, field by field: root name byte, type, UDP payload size,
#: extended rcode, version, flags, rdlength (11 bytes).
OPT_FIXED = struct.Struct(">BHHBBHH")
RR_FIXED = struct.Struct(">HHIH")  # type, class, ttl, rdlength


class ParsedQuery(NamedTuple):
    """What the sidecar needs from a query. ``key`` is the lower-cased question (name wire
    bytes + type + class), the cache key; ``qend`` is the offset just past the question."""

    qid: int
    flags: int
    qend: int
    key: bytes
    qtype: int
    qclass: int
    edns: bool
    udp_size: int
    edns_version: int


def question_end(data: bytes, offset: int = 12) -> int:
    """Offset just past the QNAME starting at ``offset`` (uncompressed names only).

    Raises :class:`WireError` on a pointer, a bad label length or a truncated name.
    """
    n = len(data)
    pos = offset
    total = 0
    while True:
        if pos >= n:
            raise WireError("truncated name")
        length = data[pos]
        if length == 0:
            return pos + 1
        if length > 63:
            raise WireError("bad label length or compression in question")
        pos += length + 1
        total += length + 1
        if total > 254:  # + the root byte: at most 255 octets (RFC 1035)
            raise WireError("name too long")


def parse_query(data: bytes) -> ParsedQuery:
    """Parse header, single question and optional OPT of a query.

    The caller has already checked the header (at least 12 bytes, QR=0, opcode QUERY).
    Raises :class:`WireError` when the message is malformed (answer with FORMERR).
    """
    qid, flags, qd, an, ns, ar = _H.unpack_from(data)
    if qd != 1:
        raise WireError("QDCOUNT must be 1")
    if an or ns:
        raise WireError("query carries answer or authority records")
    qname_end = question_end(data, 12)
    qend = qname_end + 4
    if qend > len(data):
        raise WireError("truncated question")
    qtype, qclass = _HH.unpack_from(data, qname_end)
    edns = False
    udp_size = MIN_UDP_PAYLOAD
    version = 0
    if ar:
        if ar > 1:
            raise WireError("more than one additional record")
        pos = qend
        # The only additional record we understand is OPT, owned by the root.
        if pos + 11 > len(data):
            raise WireError("truncated additional record")
        if data[pos] != 0:
            raise WireError("additional record is not OPT")
        rtype, rclass, ttl, rdlen = _OPT.unpack_from(data, pos + 1)
        if rtype != TYPE_OPT:
            raise WireError("additional record is not OPT")
        if pos + 11 + rdlen > len(data):
            raise WireError("truncated OPT")
        edns = True
        udp_size = max(rclass, MIN_UDP_PAYLOAD)
        version = (ttl >> 16) & 0xFF
    key = data[12:qend].lower()
    return ParsedQuery(qid, flags, qend, key, qtype, qclass, edns, udp_size, version)


def header_only_reply(data: bytes, rcode: int) -> bytes:
    """A reply with no sections, used when the question cannot be trusted (FORMERR, NOTIMP).

    Keeps ID and opcode, copies RD, sets QR and RA.
    """
    b2 = 0x80 | (data[2] & 0x79)  # QR + opcode + RD (AA and TC cleared)
    return data[:2] + bytes((b2, 0x80 | (rcode & 0x0F))) + b"\x00" * 8


def error_reply(data: bytes, q: ParsedQuery, rcode: int) -> bytes:
    """A reply echoing the question with no records (SERVFAIL, REFUSED, NOTIMP, BADVERS)."""
    b2 = 0x80 | (data[2] & 0x01)
    if q.edns:
        ext = rcode >> 4
        opt = _OPT_HEAD + bytes((ext, 0, 0, 0)) + b"\x00\x00"
        header = data[:2] + bytes((b2, 0x80 | (rcode & 0x0F))) + b"\x00\x01\x00\x00\x00\x00\x00\x01"
        return header + data[12 : q.qend] + opt
    header = data[:2] + bytes((b2, 0x80 | (rcode & 0x0F))) + b"\x00\x01\x00\x00\x00\x00\x00\x00"
    return header + data[12 : q.qend]


def skip_name(msg: bytes, pos: int) -> int:
    """Offset just past a (possibly compressed) name in a full message."""
    n = len(msg)
    while True:
        if pos >= n:
            raise WireError("truncated name")
        length = msg[pos]
        if length == 0:
            return pos + 1
        if length & 0xC0 == 0xC0:
            return pos + 2
        if length & 0xC0:
            raise WireError("bad label type")
        pos += length + 1


_PLAIN = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-_*"


def qname_text(key: bytes) -> str:
    """The presentation form of the name in a cache key, without the trailing dot.

    Bytes outside letters, digits, '-', '_' and '*' are escaped as ``\\DDD``, dots and
    backslashes inside labels as ``\\.`` and ``\\\\`` (what c-ares expects).
    """
    labels = []
    pos = 0
    while True:
        length = key[pos]
        if length == 0:
            break
        raw = key[pos + 1 : pos + 1 + length]
        # Letters and digits only (the cheapest test), else only bytes that need no escape
        # (a hostname with '-'): both skip the per-character loop.
        if (raw.isalnum() and raw.isascii()) or not raw.translate(None, _PLAIN):
            labels.append(raw.decode("ascii"))
        else:
            out = []
            for ch in raw:
                c = chr(ch)
                if c.isascii() and (c.isalnum() or c in "-_*"):
                    out.append(c)
                elif c in ".\\":
                    out.append("\\" + c)
                else:
                    out.append(f"\\{ch:03d}")
            labels.append("".join(out))
        pos += length + 1
    return ".".join(labels)


def key_type(key: bytes) -> int:
    """The QTYPE of a cache key."""
    return (key[-4] << 8) | key[-3]


def make_key(name: str, qtype: int, qclass: int = CLASS_IN) -> bytes:
    """Build a cache key from a presentation name (used by the API and pre-warm)."""
    wire_name = encode_name(name.strip())
    if len(wire_name) > 255:
        raise WireError("name too long")
    return wire_name.lower() + _HH.pack(qtype, qclass)


def encode_name(name: str) -> bytes:
    """The wire form of a presentation name (c-ares style escapes), case kept, uncompressed."""
    name = name.rstrip(".")
    if not name:
        return b"\x00"
    if "\\" not in name and name.isascii():
        # The common case (ASCII, no escapes), without the per-character escape parser.
        labels = name.encode("ascii").split(b".")
        if all(0 < len(label) < 64 for label in labels):
            return b"".join(bytes((len(label),)) + label for label in labels) + b"\x00"
    out = bytearray()
    for label in _split_labels(name):
        if not label or len(label) > 63:
            raise WireError(f"bad label in {name!r}")
        out.append(len(label))
        out += label
    out.append(0)
    return bytes(out)


def _split_labels(name: str) -> list[bytes]:
    labels: list[bytes] = []
    cur = bytearray()
    i = 0
    while i < len(name):
        c = name[i]
        if c == "\\" and i + 1 < len(name):
            nxt = name[i + 1]
            if nxt.isdigit() and i + 3 < len(name) + 0 and name[i + 1 : i + 4].isdigit():
                cur.append(int(name[i + 1 : i + 4]) & 0xFF)
                i += 4
                continue
            cur += nxt.encode("latin-1")
            i += 2
            continue
        if c == ".":
            labels.append(bytes(cur))
            cur = bytearray()
        else:
            try:
                cur += c.encode("ascii")
            except UnicodeEncodeError:
                raise WireError(f"non-ASCII name {name!r} (use IDNA/punycode)") from None
        i += 1
    labels.append(bytes(cur))
    return labels
