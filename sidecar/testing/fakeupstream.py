"""A real (loopback-only) authoritative-style DNS server for tests and benchmarks.

``FakeUpstream`` answers over UDP and TCP (RFC 7766: 2-byte length prefix,
several - possibly pipelined - queries per connection) on the same port, from a
small in-memory ``Zone``.  It behaves like an authoritative server that also
chases CNAMEs inside its own data (so it looks like a recursive resolver to a
stub client), and it supports fault injection (latency, blackholing, forced
rcodes, forced UDP truncation, stripped authority sections, and hostile content: extra
records in any section, a replaced answer, overridden TTLs, a reply hook) that can be
changed at any time while running.

Hostile content, for cache-poisoning tests::

    up.inject("answer", "www.example.test", "A", "6.6.6.6", qname="evil.example.test")
    up.inject("authority", "example.test", "NS", "ns.attacker.test")   # every reply
    up.inject("additional", "ns.attacker.test", "A", "6.6.6.6")
    up.set_answer("x.example.test", ("y.example.test", "A", "10.0.0.9"))
    up.ttl_override = 2**31                                          # every record's TTL

Usage from async tests::

    up = FakeUpstream()
    await up.start()
    ...  # query up.address
    await up.wait_for_queries(1)
    assert up.count("www.example.test", "A") == 1
    await up.stop()

From sync tests (or tests that run the sidecar as a subprocess)::

    up = FakeUpstream()
    up.start_in_thread()
    up.rcode = "SERVFAIL"  # fault attributes may be set from any thread
    up.stop_in_thread()

Standalone (benchmarks, README demo)::

    python tests/fakeupstream.py --port 5300 [--host 127.0.0.1] [--latency 0.05]
                                 [--zone-file FILE] [--no-default-zone]

It only ever binds loopback addresses (127.0.0.0/8 or ::1).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import re
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from dnslib import (
    AAAA,
    CLASS,
    EDNS0,
    NS,
    QTYPE,
    RCODE,
    RD,
    RR,
    TXT,
    DNSLabel,
    DNSRecord,
    ZoneParser,
)

__all__ = [
    "FakeUpstream",
    "Resolution",
    "Zone",
    "default_zone",
    "main",
    "make_rr",
]

log = logging.getLogger("fakeupstream")

#: EDNS UDP payload size we advertise, and the largest UDP reply we send.
EDNS_UDP_SIZE = 1232
#: Largest UDP reply without EDNS (RFC 1035).
PLAIN_UDP_SIZE = 512
#: Requested UDP receive buffer (the kernel caps it at net.core.rmem_max).
UDP_RCVBUF = 4 * 1024 * 1024
#: Maximum number of CNAMEs followed when answering.
MAX_CNAME_HOPS = 8

_NOERROR = RCODE.NOERROR
_NXDOMAIN = RCODE.NXDOMAIN
_REFUSED = RCODE.REFUSED
_ANY = QTYPE.ANY
_CNAME = QTYPE.CNAME
_OPT = QTYPE.OPT
_SOA = QTYPE.SOA
_NS = QTYPE.NS


# --------------------------------------------------------------------------- names


def _canon(name: str | DNSLabel) -> str:
    """Canonical lookup key: lowercased, no trailing dot; the root is ``""``."""
    s = str(name).lower() if isinstance(name, DNSLabel) else name.lower()
    return s[:-1] if s.endswith(".") else s


def _key(name: str | DNSLabel) -> str:
    """Canonical key of a name as dnslib would encode it (handles escapes)."""
    if not isinstance(name, DNSLabel):
        name = DNSLabel(name)
    return _canon(name)


def _wire_text(name: DNSLabel) -> str:
    """The name as received (case preserved), without trailing dot; root is ``"."``."""
    s = str(name)
    if s == ".":
        return s
    return s[:-1] if s.endswith(".") else s


def _parent_keys(key: str) -> list[str]:
    """Proper ancestors of ``key`` (excluding the root)."""
    parts = key.split(".")
    return [".".join(parts[i:]) for i in range(1, len(parts))]


def _qtype_num(qtype: str | int) -> int:
    if isinstance(qtype, int):
        return qtype
    try:
        return int(getattr(QTYPE, qtype.upper()))
    except Exception as e:  # dnslib raises its own BimapError (an AttributeError)
        raise ValueError(f"unknown record type {qtype!r}") from e


def _qtype_name(qtype: int) -> str:
    return QTYPE.get(qtype, f"TYPE{qtype}")


def _rcode_name(rcode: str | int) -> str:
    """Validate an rcode given by name or number; return its canonical name."""
    if isinstance(rcode, int):
        if rcode not in RCODE.forward:
            raise ValueError(f"unknown rcode {rcode!r}")
        return RCODE.forward[rcode]
    try:
        getattr(RCODE, rcode.upper())
    except Exception as e:
        raise ValueError(f"unknown rcode {rcode!r}") from e
    return rcode.upper()


class _NameDict(dict):
    """dict keyed by canonical names (lowercased, trailing dot stripped)."""

    def __init__(self, data: Any = (), convert: Callable[[Any], Any] = lambda v: v) -> None:
        super().__init__()
        self._convert = convert
        self.update(data)

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(_canon(key), self._convert(value))

    def __getitem__(self, key: str) -> Any:
        return super().__getitem__(_canon(key))

    def __delitem__(self, key: str) -> None:
        super().__delitem__(_canon(key))

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and super().__contains__(_canon(key))

    def get(self, key: str, default: Any = None) -> Any:
        return super().get(_canon(key), default)

    def pop(self, key: str, *default: Any) -> Any:
        return super().pop(_canon(key), *default)

    def setdefault(self, key: str, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return self[key]

    def update(self, data: Any = (), **kw: Any) -> None:  # type: ignore[override]
        items = data.items() if hasattr(data, "items") else data
        for k, v in items:
            self[k] = v
        for k, v in kw.items():
            self[k] = v


class _NameSet(set[str]):
    """set of canonical names (lowercased, trailing dot stripped)."""

    def __init__(self, data: Iterable[str] = ()) -> None:
        super().__init__(_canon(n) for n in data)

    def add(self, name: str) -> None:
        super().add(_canon(name))

    def discard(self, name: object) -> None:
        super().discard(_canon(name) if isinstance(name, str) else name)

    def remove(self, name: str) -> None:
        super().remove(_canon(name))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and super().__contains__(_canon(name))

    def update(self, *others: Iterable[str]) -> None:
        for other in others:
            super().update(_canon(n) for n in other)

    def difference_update(self, *others: Iterable[str]) -> None:  # type: ignore[override]
        for other in others:
            super().difference_update(_canon(n) for n in other)

    def __ior__(self, other: Any) -> _NameSet:  # type: ignore[override,misc]
        self.update(other)
        return self

    def __isub__(self, other: Any) -> _NameSet:  # type: ignore[misc]
        self.difference_update(other)
        return self


# --------------------------------------------------------------------------- zone


def _make_rdata(qtype: int, value: Any) -> RD:
    """Build dnslib rdata from its natural text form (or pass an RD through)."""
    if isinstance(value, RD):
        return value
    if qtype == QTYPE.TXT:
        strings = [value] if isinstance(value, str | bytes) else list(value)
        chunks: list[bytes] = []
        for s in strings:
            b = s.encode() if isinstance(s, str) else bytes(s)
            # a character-string holds at most 255 bytes: split longer ones
            chunks.extend(b[i : i + 255] for i in range(0, len(b), 255) or [0])
        return TXT(chunks or [b""])
    if not isinstance(value, str):
        raise TypeError(f"value for {_qtype_name(qtype)} must be a str, got {value!r}")
    if qtype == QTYPE.AAAA:
        # dnslib's parser rejects the dotted forms (::ffff:10.0.0.1, 64:ff9b::10.0.0.1)
        return AAAA(tuple(ipaddress.IPv6Address(value.strip()).packed))
    rrs = list(ZoneParser(f". 0 IN {_qtype_name(qtype)} {value}", origin="."))
    if len(rrs) != 1:
        raise ValueError(f"cannot parse {_qtype_name(qtype)} value {value!r}")
    return rrs[0].rdata


def _rr(owner: DNSLabel, rtype: int, ttl: int, rdata: RD) -> RR:
    return RR(rname=owner, rtype=rtype, rclass=CLASS.IN, ttl=ttl, rdata=rdata)


def make_rr(name: str, qtype: str | int, value: Any, ttl: int = 300) -> RR:
    """A dnslib RR from the natural text form ``Zone.add`` takes (or an ``RD``)."""
    t = _qtype_num(qtype)
    return _rr(DNSLabel(name), t, int(ttl), _make_rdata(t, value))


def _rrs(records: Iterable[RR | tuple]) -> list[RR]:
    return [r if isinstance(r, RR) else make_rr(*r) for r in records]


_SECTIONS = ("answer", "authority", "additional")


@dataclass
class Resolution:
    """Outcome of ``Zone.resolve``: rcode plus answer/authority sections."""

    rcode: int
    answer: list[RR] = field(default_factory=list)
    authority: list[RR] = field(default_factory=list)
    aa: bool = True


@dataclass
class _Dynamic:
    pattern: re.Pattern[str]
    qtype: int
    value: Callable[[re.Match[str]], Any]
    ttl: int


class Zone:
    """In-memory zone data for ``FakeUpstream``; names are case-insensitive.

    Zone apexes are the names that hold an SOA record (``add_zone`` adds one).
    The object may be modified while a server is using it (also from another
    thread): record lists are replaced, never mutated in place.
    """

    def __init__(self) -> None:
        self._records: dict[str, list[RR]] = {}
        self._apexes: set[str] = set()
        self._children: dict[str, int] = {}  # key -> number of names below it (for ENTs)
        self._dynamic: list[_Dynamic] = []
        #: NS target returned for the root "." NS query (health probe)
        self.root_ns = "ns.example.test"
        self.root_ns_ttl = 3600

    # ---- editing

    def add(self, name: str, qtype: str | int, value: Any, ttl: int = 300) -> Zone:
        """Add one record, e.g. ``add("www.example.test", "A", "10.0.0.1")``.

        ``value`` uses the natural text form: ``"10 mail.example.test"`` (MX),
        ``"0 5 5060 sip.example.test"`` (SRV), ``'0 issue "letsencrypt.org"'``
        (CAA), ``"ns.example.test hostmaster.example.test 1 3600 600 86400 60"``
        (SOA).  For TXT a str is one character-string, a list/tuple of strings is
        several character-strings in one record.  A dnslib ``RD`` is also accepted.
        Adding an SOA record makes ``name`` a zone apex.  Returns ``self``.
        """
        t = _qtype_num(qtype)
        self.add_rr(_rr(DNSLabel(name), t, int(ttl), _make_rdata(t, value)))
        return self

    def add_rr(self, rr: RR) -> None:
        """Add a dnslib RR (duplicates of the same rdata replace the old one)."""
        if rr.rtype == _OPT:
            raise ValueError("cannot add an OPT pseudo-record to a zone")
        key = _key(rr.rname)
        old = self._records.get(key, [])
        new = [r for r in old if not (r.rtype == rr.rtype and r.rdata == rr.rdata)]
        new.append(rr)
        if not old:
            for parent in _parent_keys(key):
                self._children[parent] = self._children.get(parent, 0) + 1
        self._records[key] = new
        if rr.rtype == _SOA:
            self._apexes.add(key)

    def remove(self, name: str, qtype: str | int | None = None) -> int:
        """Remove all records of ``name`` (or only those of ``qtype``); returns how many."""
        key = _key(name)
        old = self._records.get(key, [])
        if qtype is None:
            keep: list[RR] = []
        else:
            t = _qtype_num(qtype)
            keep = [r for r in old if r.rtype != t]
        if keep:
            self._records[key] = keep
        elif old:
            del self._records[key]
            for parent in _parent_keys(key):
                n = self._children.get(parent, 0) - 1
                if n > 0:
                    self._children[parent] = n
                else:
                    self._children.pop(parent, None)
        if not any(r.rtype == _SOA for r in keep):
            self._apexes.discard(key)
        return len(old) - len(keep)

    def add_zone(
        self,
        apex: str,
        soa_ttl: int = 3600,
        negative_ttl: int = 60,
        ns: str | None = None,
    ) -> Zone:
        """Declare a zone apex: SOA (minimum = ``negative_ttl``) and one NS record.

        ``ns`` defaults to ``ns.<apex>``; it is also the SOA MNAME.
        """
        apex = apex.rstrip(".")
        ns = ns or f"ns.{apex}"
        self.remove(apex, "SOA")
        self.remove(apex, "NS")
        self.add(
            apex,
            "SOA",
            f"{ns} hostmaster.{apex} 1 3600 600 86400 {int(negative_ttl)}",
            ttl=soa_ttl,
        )
        self.add(apex, "NS", ns, ttl=soa_ttl)
        return self

    def add_dynamic(
        self,
        pattern: str,
        qtype: str | int,
        value: Callable[[re.Match[str]], Any] | Any,
        ttl: int = 300,
    ) -> Zone:
        """Synthesise records for every name fully matching ``pattern``.

        ``pattern`` is a regex matched against the lowercased name without its
        trailing dot; ``value`` is a value (as for ``add``) or a callable taking
        the match and returning one.  Names matching a rule exist (so other
        types are NODATA).  The name must lie under a declared zone.
        """
        fn = value if callable(value) else (lambda _m, _v=value: _v)
        self._dynamic.append(_Dynamic(re.compile(pattern), _qtype_num(qtype), fn, int(ttl)))
        return self

    @classmethod
    def from_text(cls, text: str, origin: str = ".", ttl: int = 300) -> Zone:
        """Parse master-file text (``$ORIGIN``/``$TTL`` supported) via dnslib."""
        zone = cls()
        zone.load_text(text, origin=origin, ttl=ttl)
        return zone

    def load_text(self, text: str, origin: str = ".", ttl: int = 300) -> None:
        """Add the records of master-file text; SOA records declare zone apexes."""
        for rr in ZoneParser(text, origin=origin, ttl=ttl):
            self.add_rr(rr)

    # ---- queries

    @property
    def apexes(self) -> set[str]:
        return set(self._apexes)

    def names(self) -> list[str]:
        return sorted(self._records)

    def get(self, name: str, qtype: str | int | None = None) -> list[RR]:
        """Stored and synthesised records of ``name`` (optionally of one type)."""
        key = _key(name)
        rrs = self._lookup(key, DNSLabel(name))
        if qtype is None:
            return rrs
        t = _qtype_num(qtype)
        return [r for r in rrs if r.rtype == t]

    def find_apex(self, name: str | DNSLabel) -> str | None:
        """Closest enclosing zone apex (canonical) of ``name``, or None."""
        key = name if isinstance(name, str) and name == _canon(name) else _key(name)
        if key in self._apexes:
            return key
        for parent in _parent_keys(key):
            if parent in self._apexes:
                return parent
        return "" if "" in self._apexes and key else None

    def _lookup(self, key: str, owner: DNSLabel) -> list[RR]:
        out = [_rr(owner, r.rtype, r.ttl, r.rdata) for r in self._records.get(key, ())]
        for dyn in self._dynamic:
            m = dyn.pattern.fullmatch(key)
            if m is not None:
                out.append(_rr(owner, dyn.qtype, dyn.ttl, _make_rdata(dyn.qtype, dyn.value(m))))
        return out

    def _negative_soa(self, apex: str) -> list[RR]:
        for r in self._records.get(apex, ()):
            if r.rtype == _SOA:
                ttl = min(r.ttl, r.rdata.times[4])  # RFC 2308 section 5
                return [_rr(r.rname, _SOA, ttl, r.rdata)]
        return []

    def resolve(self, qname: str | DNSLabel, qtype: str | int) -> Resolution:
        """Answer ``qname``/``qtype`` as this server would (see module docstring)."""
        owner = qname if isinstance(qname, DNSLabel) else DNSLabel(qname)
        t = _qtype_num(qtype)
        key = _canon(owner)
        if key == "" and "" not in self._apexes:
            if t in (_NS, _ANY):
                return Resolution(_NOERROR, [_rr(owner, _NS, self.root_ns_ttl, NS(self.root_ns))])
            return Resolution(_REFUSED, aa=False)
        apex = self.find_apex(key)
        if apex is None:
            return Resolution(_REFUSED, aa=False)
        answer: list[RR] = []
        seen = {key}
        while True:
            rrs = self._lookup(key, owner)
            matched = rrs if t == _ANY else [r for r in rrs if r.rtype == t]
            if matched:
                answer.extend(matched)
                return Resolution(_NOERROR, answer)
            cname = next((r for r in rrs if r.rtype == _CNAME), None)
            if cname is not None:
                answer.append(cname)
                target: DNSLabel = cname.rdata.label
                tkey = _canon(target)
                hops = sum(1 for r in answer if r.rtype == _CNAME)
                tapex = self.find_apex(tkey)
                if tkey in seen or hops >= MAX_CNAME_HOPS or tapex is None:
                    # loop, too long, or target outside our data: return the chain so far
                    return Resolution(_NOERROR, answer)
                seen.add(tkey)
                owner, key, apex = target, tkey, tapex
                continue
            exists = bool(rrs) or self._children.get(key, 0) > 0
            return Resolution(_NOERROR if exists else _NXDOMAIN, answer, self._negative_soa(apex))


def default_zone() -> Zone:
    """The zone data the tests, benchmarks and README demo rely on."""
    z = Zone()
    z.add_zone("example.test", soa_ttl=3600, negative_ttl=60)
    z.add("www.example.test", "A", "10.0.0.1", ttl=300)
    z.add("www.example.test", "A", "10.0.0.2", ttl=300)
    z.add("www.example.test", "AAAA", "2001:db8::1", ttl=300)
    z.add("short.example.test", "A", "10.0.0.3", ttl=5)
    z.add("alias.example.test", "CNAME", "www.example.test", ttl=60)
    z.add("alias2.example.test", "CNAME", "alias.example.test", ttl=30)
    z.add("mail.example.test", "A", "10.0.0.25")
    z.add("example.test", "MX", "10 mail.example.test")
    z.add("example.test", "TXT", "v=spf1 -all")
    z.add("example.test", "CAA", '0 issue "letsencrypt.org"')
    z.add("ns.example.test", "A", "10.0.0.53")
    z.add("multi.example.test", "TXT", ["hello world", "second"])
    for i in range(12):
        head = f"big-record-{i:02d}:"
        z.add("big.example.test", "TXT", head + "abcdefghijklmnopqrstuvwxyz"[i] * (200 - len(head)))
    for i in range(1, 41):
        z.add("many.example.test", "A", f"10.1.0.{i}")
    z.add("_sip._udp.example.test", "SRV", "0 5 5060 sip.example.test")
    z.add("sip.example.test", "A", "10.0.0.60")
    z.add("v4only.example.test", "A", "10.0.0.4")
    # synthesised names for benchmarks / crawler tests
    z.add_dynamic(r"h\d+\.example\.test", "A", "127.0.0.1", ttl=300)
    z.add_dynamic(
        r"crawl(\d+)\.example\.test",
        "A",
        lambda m: f"127.0.0.{1 + int(m.group(1)) % 250}",
        ttl=300,
    )
    # reverse zone
    z.add_zone("0.0.10.in-addr.arpa", ns="ns.example.test")
    z.add("1.0.0.10.in-addr.arpa", "PTR", "www.example.test")
    # a second forward zone
    z.add_zone("corp.internal", negative_ttl=30, ns="ns.example.test")
    z.add("git.corp.internal", "A", "10.9.0.1")
    return z


# --------------------------------------------------------------------------- server


def _loopback_host(host: str) -> str:
    if host == "localhost":
        return "127.0.0.1"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"FakeUpstream host must be a loopback IP literal, got {host!r}") from None
    if not ip.is_loopback:
        raise ValueError(f"FakeUpstream only binds loopback addresses, got {host!r}")
    return str(ip)


class _UDPProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: FakeUpstream) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        transport = self.transport

        def send(wire: bytes) -> None:
            if transport is not None and not transport.is_closing():
                transport.sendto(wire, addr)

        self.server._handle(data, "udp", send, None)

    def error_received(self, exc: Exception) -> None:  # e.g. ICMP port unreachable
        log.debug("udp error: %s", exc)


class _TCPProtocol(asyncio.Protocol):
    def __init__(self, server: FakeUpstream) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.pending: set[asyncio.Task[None]] = set()
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server._tcp_conns.add(self)
        self.server.tcp_connections += 1

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while len(self.buf) >= 2:
            n = int.from_bytes(self.buf[:2], "big")
            if len(self.buf) < 2 + n:
                break
            msg = bytes(self.buf[2 : 2 + n])
            del self.buf[: 2 + n]
            self.server._handle(msg, "tcp", self.send, self)

    def send(self, wire: bytes) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            t.write(len(wire).to_bytes(2, "big") + wire)

    def task_done(self, task: asyncio.Task[None]) -> None:
        self.pending.discard(task)
        if self.eof and not self.pending and self.transport is not None:
            self.transport.close()

    def eof_received(self) -> bool:
        # client half-closed: finish the replies still being delayed, then close
        self.eof = True
        return bool(self.pending)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._tcp_conns.discard(self)
        for task in list(self.pending):
            task.cancel()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class FakeUpstream:
    """Loopback DNS server (UDP+TCP on one port) with counters and fault injection."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        zone: Zone | None = None,
        *,
        log_queries: bool = True,
    ) -> None:
        self._host = _loopback_host(host)
        self._port = int(port)
        self.zone: Zone = zone if zone is not None else default_zone()
        #: keep ``log`` (disable for long benchmarks; ``count`` keeps working)
        self.log_queries = log_queries
        # counters
        self.queries = 0
        self.udp_queries = 0
        self.tcp_queries = 0
        self.tcp_connections = 0
        self.replies = 0
        self.log: list[tuple[str, str, str]] = []
        self._counts: dict[tuple[str, str], int] = {}
        self._name_counts: dict[str, int] = {}
        # fault injection
        self.latency: float = 0.0
        self.drop: bool = False
        self.truncate_udp: bool = False
        #: Send negative answers without their SOA (as some forwarders do).
        self.strip_authority: bool = False
        self._rcode: str | None = None
        self._name_latency: _NameDict = _NameDict(convert=float)
        self._name_rcode: _NameDict = _NameDict(convert=_rcode_name)
        self._drop_names: _NameSet = _NameSet()
        # hostile content (see inject / set_answer): per section, for every reply and per qname
        self._extra: dict[str, list[RR]] = {sec: [] for sec in _SECTIONS}
        self._name_extra: _NameDict = _NameDict()
        self._name_answer: _NameDict = _NameDict()
        #: TTL written into every answer and authority record of a reply (None: the zone's)
        self.ttl_override: int | None = None
        #: ``hook(request, reply)`` called on every built reply before it is packed; may
        #: change the dnslib reply in place (case of the question, flags, sections, ...)
        self.reply_hook: Callable[[DNSRecord, DNSRecord], None] | None = None
        # runtime state
        self._lock = threading.Lock()
        self._waiters: list[tuple[int, Callable[[], None]]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.AbstractServer | None = None
        self._tcp_conns: set[_TCPProtocol] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._thread: threading.Thread | None = None
        self._thread_loop: asyncio.AbstractEventLoop | None = None

    # ---- fault-injection attributes (normalising / validating)

    @property
    def rcode(self) -> str | None:
        return self._rcode

    @rcode.setter
    def rcode(self, value: str | int | None) -> None:
        self._rcode = None if value is None else _rcode_name(value)

    @property
    def name_latency(self) -> dict[str, float]:
        return self._name_latency

    @name_latency.setter
    def name_latency(self, value: dict[str, float]) -> None:
        self._name_latency = _NameDict(value, convert=float)

    @property
    def name_rcode(self) -> dict[str, str]:
        return self._name_rcode

    @name_rcode.setter
    def name_rcode(self, value: dict[str, str]) -> None:
        self._name_rcode = _NameDict(value, convert=_rcode_name)

    @property
    def drop_names(self) -> set[str]:
        return self._drop_names

    @drop_names.setter
    def drop_names(self, value: Iterable[str]) -> None:
        self._drop_names = _NameSet(value)

    def clear_faults(self) -> None:
        """Back to normal service: no latency, drops, forced rcodes or truncation."""
        self.latency = 0.0
        self.drop = False
        self.truncate_udp = False
        self.strip_authority = False
        self._rcode = None
        self._name_latency = _NameDict(convert=float)
        self._name_rcode = _NameDict(convert=_rcode_name)
        self._drop_names = _NameSet()
        self._extra = {sec: [] for sec in _SECTIONS}
        self._name_extra = _NameDict()
        self._name_answer = _NameDict()
        self.ttl_override = None
        self.reply_hook = None

    def inject(self, section: str, name: str, qtype: str | int, value: Any, ttl: int = 300,
               *, qname: str | None = None) -> RR:
        """Append a record to ``section`` (``answer``, ``authority`` or ``additional``) of
        every NOERROR/NXDOMAIN reply, or only of replies to ``qname``; returns the RR.

        The zone's own records come first; injected ones follow in the order added. Not
        subject to ``strip_authority`` (which strips the zone's authority records only).
        """
        if section not in _SECTIONS:
            raise ValueError(f"section must be one of {_SECTIONS}, got {section!r}")
        rr = make_rr(name, qtype, value, ttl)
        if qname is None:
            self._extra = {**self._extra, section: [*self._extra[section], rr]}
        else:
            old = self._name_extra.get(qname) or {sec: [] for sec in _SECTIONS}
            self._name_extra[qname] = {**old, section: [*old[section], rr]}
        return rr

    def set_answer(self, qname: str, *records: RR | tuple) -> None:
        """Answer ``qname`` (any type) NOERROR with exactly ``records`` in the answer section
        and no authority, whatever the zone holds; a record is an RR or a ``(name, type,
        value[, ttl])`` tuple. With no records: NOERROR and an empty answer (NODATA without
        SOA). ``clear_faults`` or ``unset_answer`` undoes it."""
        self._name_answer[qname] = _rrs(records)

    def unset_answer(self, qname: str) -> None:
        self._name_answer.pop(qname, None)

    # ---- addresses

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        """Bound port (after ``start``; before, the requested one)."""
        return self._port

    @property
    def address(self) -> str:
        """``"127.0.0.1:PORT"`` (``"[::1]:PORT"`` for IPv6)."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"{host}:{self._port}"

    @property
    def running(self) -> bool:
        return self._udp is not None

    # ---- counters

    def count(self, name: str, qtype: str | None = None) -> int:
        """Queries received for ``name`` (case-insensitive, trailing dot optional)."""
        key = _canon(name)
        if qtype is None:
            return self._name_counts.get(key, 0)
        return self._counts.get((key, qtype.upper()), 0)

    def reset_counts(self) -> None:
        with self._lock:
            self.queries = self.udp_queries = self.tcp_queries = 0
            self.tcp_connections = self.replies = 0
            self.log = []
            self._counts = {}
            self._name_counts = {}

    def _record(self, wire_name: str, key: str, qtype: str, proto: str) -> None:
        with self._lock:
            self.queries += 1
            if proto == "udp":
                self.udp_queries += 1
            else:
                self.tcp_queries += 1
            if self.log_queries:
                self.log.append((wire_name, qtype, proto))
            self._name_counts[key] = self._name_counts.get(key, 0) + 1
            ck = (key, qtype)
            self._counts[ck] = self._counts.get(ck, 0) + 1
            if not self._waiters:
                return
            n = self.queries
            ready = [fire for want, fire in self._waiters if n >= want]
            if ready:
                self._waiters = [w for w in self._waiters if n < w[0]]
        for fire in ready:
            fire()

    async def wait_for_queries(self, n: int, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Return once ``self.queries >= n``; raise ``asyncio.TimeoutError`` otherwise.

        Works from any event loop, including one other than the server's
        (e.g. after ``start_in_thread``).
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()

        def _set() -> None:
            if not fut.done():
                fut.set_result(None)

        def fire() -> None:
            try:
                same = asyncio.get_running_loop() is loop
            except RuntimeError:
                same = False
            if same:
                _set()
            else:
                with contextlib.suppress(RuntimeError):  # waiter's loop closed
                    loop.call_soon_threadsafe(_set)

        entry = (n, fire)
        with self._lock:
            if self.queries >= n:
                return
            self._waiters.append(entry)
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise TimeoutError(  # == asyncio.TimeoutError on 3.11+
                f"fakeupstream received {self.queries} queries, waited for {n}"
            ) from None
        finally:
            with self._lock:
                if entry in self._waiters:
                    self._waiters.remove(entry)

    def wait_for_queries_blocking(self, n: int, timeout: float = 5.0) -> None:
        """Blocking variant of ``wait_for_queries`` for sync tests; raises ``TimeoutError``."""
        event = threading.Event()
        entry = (n, event.set)
        with self._lock:
            if self.queries >= n:
                return
            self._waiters.append(entry)
        try:
            if not event.wait(timeout):
                raise TimeoutError(f"fakeupstream received {self.queries} queries, waited for {n}")
        finally:
            with self._lock:
                if entry in self._waiters:
                    self._waiters.remove(entry)

    # ---- query handling

    def _handle(
        self,
        data: bytes,
        proto: str,
        send: Callable[[bytes], None],
        conn: _TCPProtocol | None,
    ) -> None:
        try:
            req = DNSRecord.parse(data)
        except Exception:  # malformed: ignore silently
            log.debug("ignoring malformed %s packet (%d bytes)", proto, len(data))
            return
        if req.header.qr or not req.questions:
            return  # a response, or no question: not a query we can answer
        q = req.questions[0]
        key = _canon(q.qname)
        self._record(_wire_text(q.qname), key, _qtype_name(q.qtype), proto)
        if self.drop or key in self._drop_names:
            return
        delay = self._name_latency.get(key, self.latency)
        if delay and delay > 0:
            task = asyncio.get_running_loop().create_task(
                self._reply_later(delay, req, proto, send)
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            if conn is not None:
                conn.pending.add(task)
                task.add_done_callback(conn.task_done)
        else:
            self._reply(req, proto, send)

    async def _reply_later(
        self, delay: float, req: DNSRecord, proto: str, send: Callable[[bytes], None]
    ) -> None:
        await asyncio.sleep(delay)
        self._reply(req, proto, send)

    def _reply(self, req: DNSRecord, proto: str, send: Callable[[bytes], None]) -> None:
        try:
            wire = self._build_reply(req, proto)
        except Exception:  # never let odd input kill the server
            log.debug("failed to build a reply", exc_info=True)
            return
        self.replies += 1
        send(wire)

    def _build_reply(self, req: DNSRecord, proto: str) -> bytes:
        reply = req.reply(ra=1, aa=1)  # copies ID, RD, CD, opcode; echoes the question
        h = reply.header
        h.tc = 0
        h.ad = 0
        h.z = 0
        h.rcode = _NOERROR
        q = req.questions[0]

        opt_in = next((rr for rr in req.ar if rr.rtype == _OPT), None)
        if opt_in is not None:
            if opt_in.edns_ver != 0:
                h.aa = 0
                reply.add_ar(EDNS0(ext_rcode=1, udp_len=EDNS_UDP_SIZE))  # BADVERS
                return reply.pack()
            reply.add_ar(EDNS0(udp_len=EDNS_UDP_SIZE))
            limit = min(max(opt_in.edns_len, PLAIN_UDP_SIZE), EDNS_UDP_SIZE)
        else:
            limit = PLAIN_UDP_SIZE

        key = _canon(q.qname)
        forced = self._name_rcode.get(key) or self._rcode
        if h.opcode != 0:
            h.aa = 0
            h.rcode = RCODE.NOTIMP
        elif forced is not None:
            h.rcode = getattr(RCODE, forced)
            h.aa = 1 if h.rcode in (_NOERROR, _NXDOMAIN) else 0
        elif q.qclass not in (CLASS.IN, 255):  # IN or ANY
            h.aa = 0
            h.rcode = _REFUSED
        elif key in self._name_answer:
            reply.rr = list(self._name_answer[key])
        else:
            res = self.zone.resolve(q.qname, q.qtype)
            h.rcode = res.rcode
            h.aa = 1 if res.aa else 0
            reply.rr = res.answer
            reply.auth = [] if self.strip_authority else res.authority
        if h.opcode == 0 and h.rcode in (_NOERROR, _NXDOMAIN):
            self._add_hostile(reply, key)
        if self.reply_hook is not None:
            self.reply_hook(req, reply)

        wire = reply.pack()
        if proto == "udp" and (self.truncate_udp or len(wire) > limit):
            reply.rr = []
            reply.auth = []
            reply.ar = [rr for rr in reply.ar if rr.rtype == _OPT]
            h.tc = 1
            wire = reply.pack()
        return wire

    def _add_hostile(self, reply: DNSRecord, key: str) -> None:
        extra, per_name = self._extra, self._name_extra.get(key)
        for sec, attr in zip(_SECTIONS, ("rr", "auth", "ar"), strict=True):
            add = extra[sec] + (per_name[sec] if per_name else [])
            if add:
                if attr == "ar":  # before the OPT, which by convention comes last
                    reply.ar = add + reply.ar
                else:
                    setattr(reply, attr, getattr(reply, attr) + add)
        ttl = self.ttl_override
        if ttl is not None:
            reply.rr = [_rr(r.rname, r.rtype, ttl, r.rdata) for r in reply.rr]
            reply.auth = [_rr(r.rname, r.rtype, ttl, r.rdata) for r in reply.auth]

    # ---- lifecycle

    async def start(self) -> None:
        """Bind UDP and TCP on the same port (a free one if ``port`` was 0).

        After a ``stop()`` the server can be started again on the same port.
        """
        if self._udp is not None:
            raise RuntimeError("FakeUpstream already started")
        loop = asyncio.get_running_loop()
        attempts = 50 if self._port == 0 else 1
        last_error: OSError | None = None
        for _ in range(attempts):
            udp, _proto = await loop.create_datagram_endpoint(
                lambda: _UDPProtocol(self), local_addr=(self._host, self._port)
            )
            port = udp.get_extra_info("sockname")[1]
            # bursts of queries (benchmarks, or clients on the same event loop as
            # the server) overflow the default ~200 KiB receive buffer: best effort
            with contextlib.suppress(OSError):
                udp.get_extra_info("socket").setsockopt(
                    socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RCVBUF
                )
            try:
                tcp = await loop.create_server(
                    lambda: _TCPProtocol(self), self._host, port, reuse_address=True
                )
            except OSError as e:  # TCP port taken: try another UDP-chosen port
                udp.close()
                last_error = e
                continue
            self._udp, self._tcp, self._port, self._loop = udp, tcp, port, loop
            return
        assert last_error is not None
        raise last_error

    async def stop(self) -> None:
        """Close sockets and connections, cancel delayed replies."""
        udp, tcp = self._udp, self._tcp
        self._udp = self._tcp = None
        if udp is not None:
            udp.close()
        if tcp is not None:
            tcp.close()
        for conn in list(self._tcp_conns):
            conn.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if tcp is not None:
            await tcp.wait_closed()
        self._loop = None

    async def __aenter__(self) -> FakeUpstream:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- running in a background thread

    def start_in_thread(self) -> None:
        """Run the server on its own event loop in a daemon thread (blocking until bound)."""
        if self._thread is not None:
            raise RuntimeError("FakeUpstream already running in a thread")
        ready = threading.Event()
        errors: list[BaseException] = []
        loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.start())
            except BaseException as e:
                errors.append(e)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        thread = threading.Thread(target=run, name=f"fakeupstream-{id(self):x}", daemon=True)
        thread.start()
        ready.wait()
        if errors:
            thread.join()
            raise errors[0]
        self._thread, self._thread_loop = thread, loop

    def stop_in_thread(self) -> None:
        """Stop a server started with ``start_in_thread`` and join its thread."""
        thread, loop = self._thread, self._thread_loop
        if thread is None or loop is None:
            return
        self._thread = self._thread_loop = None
        try:
            asyncio.run_coroutine_threadsafe(self.stop(), loop).result(timeout=10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)

    def __enter__(self) -> FakeUpstream:
        self.start_in_thread()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_in_thread()


# --------------------------------------------------------------------------- CLI


async def _serve(args: argparse.Namespace) -> None:
    zone = Zone() if args.no_default_zone else default_zone()
    if args.zone_file:
        with open(args.zone_file, encoding="utf-8") as f:  # noqa: ASYNC230 - startup only
            zone.load_text(f.read(), origin=args.origin)
    up = FakeUpstream(args.host, args.port, zone, log_queries=False)
    up.latency = args.latency
    await up.start()
    print(f"fakeupstream listening on {up.address}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await up.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fakeupstream", description="Loopback fake DNS upstream (UDP+TCP) for tests"
    )
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to bind")
    parser.add_argument("--port", type=int, default=5300, help="port (0 = pick a free one)")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to each reply")
    parser.add_argument(
        "--zone-file",
        help="master-file format records to serve (added to the default zone; "
        "SOA records declare zone apexes)",
    )
    parser.add_argument("--origin", default=".", help="initial $ORIGIN for --zone-file")
    parser.add_argument(
        "--no-default-zone", action="store_true", help="serve only the --zone-file records"
    )
    args = parser.parse_args(argv)
    try:
        _loopback_host(args.host)
    except ValueError as e:
        parser.error(str(e))
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
