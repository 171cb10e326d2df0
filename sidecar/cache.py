"""The answer cache: encoded replies keyed by question, LRU-bounded, TTLs counting down.

An entry holds the wire bytes of everything after the question (answer, authority and
additional sections, OPT excluded) plus the offsets of its TTL fields. A hit copies those
bytes behind the client's own header and question; TTLs are re-written at most once per
second per entry, so a hit costs a dict lookup and a few byte concatenations.
"""

from __future__ import annotations

import struct
import time
from collections import OrderedDict
from collections.abc import Iterator

from .wire import RCODE_NAMES, key_type, qname_text

_U32 = struct.Struct(">I")
_COUNTS = struct.Struct(">HHHH")

#: TTL of a stale record in a reply (RFC 8767 section 4 recommends 30 s).
STALE_REPLY_TTL = 30
#: "No prefetch": one shared float instead of a new ``inf`` per entry (24 bytes each).
NEVER = float("inf")

_interned: dict = {}


def _intern(value):
    """Share identical headers and TTL-offset tuples between entries: answers of the same
    shape have the same ones, and each copy would cost ~50 bytes per entry."""
    got = _interned.get(value)
    if got is None:
        if len(_interned) < 4096:
            _interned[value] = value
        return value
    return got


class Entry:
    """One cached reply.

    ``hdr`` is byte 3 of the header (RA + RCODE) and the four section counts with QDCOUNT=1
    and without our OPT; ``hdr_edns`` the same with ARCOUNT + 1. ``body`` carries TTLs as of
    ``age`` whole seconds after ``stored``. Times are ``time.monotonic()`` seconds.
    """

    __slots__ = ("hdr", "hdr_edns", "body", "offsets", "stored", "expires", "age", "rcode",
                 "prefetch_at", "hits")

    def __init__(self, rcode: int, an: int, ns: int, ar: int, body: bytes,
                 offsets: tuple[int, ...], stored: float, lifetime: float,
                 prefetch_at: float = NEVER) -> None:
        b3 = bytes((0x80 | (rcode & 0x0F),))
        self.hdr = _intern(b3 + _COUNTS.pack(1, an, ns, ar))
        self.hdr_edns = _intern(b3 + _COUNTS.pack(1, an, ns, ar + 1))
        self.body = body
        self.offsets = _intern(offsets)
        self.stored = stored
        self.expires = stored + lifetime
        self.age = 0
        self.rcode = rcode
        self.prefetch_at = prefetch_at
        self.hits = 0

    def render(self, age: int) -> bytes:
        """Bring the body's TTLs to ``age`` seconds after storage and return it."""
        delta = age - self.age
        if delta:
            buf = bytearray(self.body)
            unpack = _U32.unpack_from
            pack = _U32.pack_into
            for off in self.offsets:
                left = unpack(buf, off)[0] - delta
                pack(buf, off, left if left > 0 else 1)
            self.body = bytes(buf)
            self.age = age
        return self.body

    def stale_body(self) -> bytes:
        """The body with every TTL set to :data:`STALE_REPLY_TTL` (serve-stale replies)."""
        buf = bytearray(self.body)
        for off in self.offsets:
            _U32.pack_into(buf, off, STALE_REPLY_TTL)
        return bytes(buf)

    def remaining(self, now: float | None = None) -> float:
        """Seconds until expiry (negative once expired)."""
        return self.expires - (time.monotonic() if now is None else now)

    @property
    def ttl(self) -> int:
        """The TTL a reply carries now: whole seconds left, at least 1 while fresh."""
        left = int(self.expires - time.monotonic())
        return left if left > 0 else 0

    @property
    def rcode_name(self) -> str:
        return RCODE_NAMES.get(self.rcode, str(self.rcode))


class Cache:
    """LRU-bounded mapping of cache key -> :class:`Entry`.

    The key is the lower-cased question section (name wire bytes, type, class). The hot path
    reads ``entries`` directly; everything else goes through the methods. Expired entries stay
    until evicted or replaced, so serve-stale can still use them.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries: OrderedDict[bytes, Entry] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.inserts = 0
        self.stale_served = 0
        self.prefetched = 0

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: bytes) -> Entry | None:
        """The entry for ``key``, fresh or stale, without touching the counters."""
        return self.entries.get(key)

    def put(self, key: bytes, entry: Entry) -> None:
        """Insert or replace; evict least recently used entries beyond the capacity."""
        entries = self.entries
        entries[key] = entry
        entries.move_to_end(key)
        self.inserts += 1
        while len(entries) > self.capacity:
            entries.popitem(last=False)
            self.evictions += 1

    def delete(self, key: bytes) -> bool:
        return self.entries.pop(key, None) is not None

    def delete_name(self, name_wire: bytes) -> int:
        """Remove every type and class of one name (given as lower-cased wire bytes)."""
        n = len(name_wire)
        doomed = [k for k in self.entries if len(k) == n + 4 and k[:n] == name_wire]
        for k in doomed:
            del self.entries[k]
        return len(doomed)

    def clear(self) -> int:
        n = len(self.entries)
        self.entries.clear()
        return n

    def items(self) -> Iterator[tuple[bytes, Entry]]:
        return iter(list(self.entries.items()))

    @staticmethod
    def describe_key(key: bytes) -> tuple[str, int]:
        """(name without trailing dot, qtype) of a key."""
        return qname_text(key), key_type(key)
