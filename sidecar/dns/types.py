"""Registries of the DNS numbers the sidecar knows by name: one home per concept (as
dnspython's ``dns/rcode.py`` and ``dns/rdatatype.py``).

Members are ``IntEnum``: they compare and hash as the plain numbers on the wire, so the hot
path can keep module-level aliases (``NXDOMAIN = Rcode.NXDOMAIN``) and compare ints.
"""

from __future__ import annotations

from enum import IntEnum


class Rcode(IntEnum):
    """Response codes (RFC 1035 4.1.1; BADVERS is extended, carried in OPT, RFC 6891)."""

    NOERROR = 0
    FORMERR = 1
    SERVFAIL = 2
    NXDOMAIN = 3
    NOTIMP = 4
    REFUSED = 5
    BADVERS = 16


class RRType(IntEnum):
    """Resource record types the sidecar handles or names."""

    A = 1
    NS = 2
    CNAME = 5
    SOA = 6
    PTR = 12
    MX = 15
    TXT = 16
    AAAA = 28
    SRV = 33
    NAPTR = 35
    OPT = 41
    ANY = 255
    CAA = 257


class RRClass(IntEnum):
    """Classes: only IN is served."""

    IN = 1


#: rcode number -> name, for stats and logs.
RCODE_NAMES: dict[int, str] = {int(r): r.name for r in Rcode}

# Query types aiodns's query_dns accepts, by number. ANY is left out on purpose: it is an
# amplification vector and no crawler needs it (RFC 8482).
FORWARDABLE: dict[int, str] = {
    int(t): t.name
    for t in (RRType.A, RRType.AAAA, RRType.CNAME, RRType.MX, RRType.TXT, RRType.NS,
              RRType.SOA, RRType.SRV, RRType.PTR, RRType.CAA, RRType.NAPTR)
}
#: type name -> number, for the forwardable types.
TYPE_NUMBERS: dict[str, int] = {v: k for k, v in FORWARDABLE.items()}
