"""The answer cache: encoded replies keyed by question, bounded (CLOCK), TTLs counting down.

An entry holds the wire bytes of everything after the question (answer, authority and
additional sections, OPT excluded) plus the offsets of its TTL fields. A hit copies those
bytes behind the client's own header and question; TTLs are re-written at most once per
second per entry, so a hit costs a dict lookup and a few byte concatenations.

Time comes from one clock, the cache's (:attr:`Cache.clock`, ``time.monotonic`` unless
injected): entries' ``stored``, ``expires`` and ``prefetch_at`` are seconds on it, and
everything on the DNS path that asks "now" about an entry reads it there.
"""

from __future__ import annotations

import struct
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Final, NamedTuple, TypeAlias, TypeVar

from sidecar.dns.types import RCODE_NAMES
from sidecar.dns.wire import key_type, qname_text

_U32 = struct.Struct(">I")
_COUNTS = struct.Struct(">HHHH")

#: TTL of a stale record in a reply (RFC 8767 section 4 recommends 30 s).
STALE_REPLY_TTL = 30
#: "No prefetch": one shared float instead of a new ``inf`` per entry (24 bytes each).
NEVER = float("inf")

_T = TypeVar("_T", bytes, tuple[int, ...])

_interned: dict[Any, Any] = {}
#: Bound on the interning table, in (estimated) bytes: offset tuples of large answers are
#: big, so a bound of 4096 values alone could hold hundreds of MiB.
INTERN_MAX_BYTES = 1 << 20
#: Values larger than this are not interned (shapes that big rarely repeat).
INTERN_MAX_VALUE = 2048
_interned_bytes = 0


def _intern_size(value: bytes | tuple[int, ...]) -> int:
    """Estimated bytes a value costs in the table (object, its items, the dict slot)."""
    if isinstance(value, bytes):
        return 33 + len(value) + 48
    return 56 + 40 * len(value) + 48  # a tuple of ints (each up to 32 bytes) + the slot


def _intern(value: _T) -> _T:
    """Share identical headers and TTL-offset tuples between entries: answers of the same
    shape have the same ones, and each copy would cost ~50 bytes per entry."""
    global _interned_bytes
    got = _interned.get(value)
    if got is None:
        if len(_interned) < 4096:
            size = _intern_size(value)
            if size <= INTERN_MAX_VALUE and _interned_bytes + size <= INTERN_MAX_BYTES:
                _interned[value] = value
                _interned_bytes += size
        return value
    return got


class Entry(NamedTuple):
    """One cached reply, as the API sees it.

    The cache itself stores the same fields as a plain ``tuple`` (:data:`RawEntry`,
    ``tuple(entry)``): CPython's cyclic GC stops tracking a tuple that holds only atomic
    values (bytes, ints, floats, tuples of those), but never a class instance, and a full
    collection walks every tracked object: with instances, each full collection would stall
    every client for time proportional to the cache's size; plain tuples cost it nothing.
    For the same reason every field must be a plain ``int``/``float``/``bytes``, never an
    ``IntEnum`` member. The hot path indexes the raw tuple (``HDR`` ... ``PREFETCH_AT``);
    other code can view one with ``Entry._make(raw)``.

    ``hdr`` is byte 3 of the header (RA + RCODE) and the four section counts with QDCOUNT=1
    and without our OPT; ``hdr_edns`` the same with ARCOUNT + 1. ``body`` (answer, authority
    and additional sections) carries TTLs as of ``age`` whole seconds after ``stored``; the
    TTL fields sit at ``offsets``. Times are seconds on the cache's clock
    (:attr:`Cache.clock`): the methods that need "now" take it.
    """

    hdr: bytes
    hdr_edns: bytes
    body: bytes
    offsets: tuple[int, ...]
    stored: float
    expires: float
    age: int
    rcode: int
    prefetch_at: float

    def remaining(self, now: float | None = None) -> float:
        """Seconds until expiry at ``now`` (the cache's clock; negative once expired).
        Without ``now``: at ``time.monotonic()``, the default clock's reading."""
        return self.expires - (time.monotonic() if now is None else now)

    def ttl_at(self, now: float) -> int:
        """The TTL a reply carries at ``now`` (the cache's clock): whole seconds left, 0 once
        expired."""
        left = int(self.expires - now)
        return left if left > 0 else 0

    @property
    def rcode_name(self) -> str:
        return RCODE_NAMES.get(self.rcode, str(self.rcode))


# Field indices of a raw entry (the order of Entry's fields). Final literals, so the type
# checker knows each field's type in ``e[EXPIRES]``.
HDR: Final = 0
HDR_EDNS: Final = 1
BODY: Final = 2
OFFSETS: Final = 3
STORED: Final = 4
EXPIRES: Final = 5
AGE: Final = 6
RCODE: Final = 7
PREFETCH_AT: Final = 8

#: A raw entry: a plain tuple laid out as :class:`Entry` (hdr, hdr_edns, body, offsets,
#: stored, expires, age, rcode, prefetch_at). Only an annotation: at run time entries are
#: plain tuples, for the GC (see :class:`Entry`).
RawEntry: TypeAlias = tuple[bytes, bytes, bytes, tuple[int, ...], float, float, int, int, float]


def new_entry(rcode: int, an: int, ns: int, ar: int, body: bytes, offsets: tuple[int, ...],
              stored: float, lifetime: float, prefetch_at: float = NEVER) -> RawEntry:
    """A raw entry for a reply with these section counts, living ``lifetime`` seconds from
    ``stored`` (the cache's clock)."""
    rcode = int(rcode)  # an IntEnum member would keep the entry tracked by the GC (see Entry)
    b3 = bytes((0x80 | (rcode & 0x0F),))
    return (_intern(b3 + _COUNTS.pack(1, an, ns, ar)),
            _intern(b3 + _COUNTS.pack(1, an, ns, ar + 1)),
            body, _intern(offsets), stored, stored + lifetime, 0, rcode, prefetch_at)


def render(e: RawEntry, age: int) -> RawEntry:
    """The entry with its body's TTLs brought to ``age`` seconds after storage."""
    delta = age - e[AGE]
    if not delta:
        return e
    buf = bytearray(e[BODY])
    unpack = _U32.unpack_from
    pack = _U32.pack_into
    for off in e[OFFSETS]:
        left = unpack(buf, off)[0] - delta
        pack(buf, off, left if left > 0 else 1)
    return e[:BODY] + (bytes(buf),) + e[OFFSETS:AGE] + (age,) + e[RCODE:]


def stale_body(e: RawEntry) -> bytes:
    """The body with every TTL set to :data:`STALE_REPLY_TTL` (serve-stale replies)."""
    buf = bytearray(e[BODY])
    for off in e[OFFSETS]:
        _U32.pack_into(buf, off, STALE_REPLY_TTL)
    return bytes(buf)


#: Bytes an entry costs beyond its key's and body's lengths: the two bytes objects' headers,
#: the entry tuple, its floats, the dict slot, the queue slot and a share of ``used``
#: (what tracemalloc counts per entry, rounded up; tests/test_cache.py holds the accounting
#: to it).
ENTRY_OVERHEAD = 320
#: Per TTL offset: its slot in the offsets tuple and the int object (when not interned).
OFFSET_COST = 40
#: An answer whose entry would cost more than this share of ``--cache-memory`` is answered
#: but not stored: a few such answers would otherwise evict thousands of ordinary ones.
MAX_ENTRY_SHARE = 1000


def entry_size(key: bytes, e: RawEntry) -> int:
    """The bytes the cache accounts for ``e`` under ``key`` (the same for every rendering of
    ``e``: rendering rewrites TTLs in place, never the body's length)."""
    return len(key) + len(e[BODY]) + OFFSET_COST * len(e[OFFSETS]) + ENTRY_OVERHEAD


class Cache:
    """Bounded mapping of cache key -> :class:`Entry`, evicting by CLOCK (second chance).

    The key is the lower-cased question section (name wire bytes, type, class). The hot path
    reads ``entries`` directly and marks a hit with ``used.add(key)``; everything else goes
    through the methods. Expired entries stay until evicted or replaced, so serve-stale can
    still use them.

    Two bounds, whichever is reached first evicts: ``capacity`` entries and ``memory_limit``
    bytes (``bytes`` is what the entries hold now, by :func:`entry_size`). Entries larger
    than ``max_entry_bytes`` are not stored (``too_large`` counts them).

    Eviction takes the oldest key of the insertion queue; a key hit since it was queued goes
    to the back once instead (its mark is cleared), so an entry in use survives and one
    nobody asked for since it was stored goes first: LRU's behaviour for a cache, without
    LRU's per-entry list node (an ``OrderedDict`` keeps a linked-list node per key; a
    ``dict`` plus this queue keeps one pointer per key).

    ``clock`` (seconds, never going back) is the one source of "now" for the entries: the
    handler and the miss path read :attr:`clock`; tests inject one
    (:class:`sidecar.testing.clock.OffsetClock`) to age entries without waiting.
    """

    def __init__(self, capacity: int, memory_limit: int = 256 * 1024 * 1024, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        #: Seconds; the time base of every entry's ``stored``, ``expires`` and
        #: ``prefetch_at``. Bind it once (``now = cache.clock``) on hot paths.
        self.clock = clock
        self.capacity = capacity
        #: Bound on the bytes held by the cached answers (``--cache-memory``).
        self.memory_limit = memory_limit
        #: Largest entry stored; larger answers are answered but not cached.
        self.max_entry_bytes = max(memory_limit // MAX_ENTRY_SHARE, ENTRY_OVERHEAD + 512)
        #: Bytes held by the cached answers now.
        self.bytes = 0
        self.entries: dict[bytes, RawEntry] = {}
        #: Keys in insertion order, oldest first; may still hold keys deleted since.
        self.queue: deque[bytes] = deque()
        #: Keys hit since they were (re)queued: their second chance.
        self.used: set[bytes] = set()
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.inserts = 0
        self.too_large = 0
        self.stale_served = 0
        self.prefetched = 0

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: bytes) -> Entry | None:
        """A view of the entry for ``key``, fresh or stale, without touching the counters."""
        raw = self.entries.get(key)
        return None if raw is None else Entry._make(raw)

    def rendered_body(self, key: bytes, e: RawEntry, age: int) -> bytes:
        """``e``'s body at ``age``; the re-rendered entry replaces ``e`` (same LRU place,
        same size)."""
        e = render(e, age)
        self.entries[key] = e
        return e[BODY]

    def no_prefetch(self, key: bytes, e: RawEntry) -> None:
        """Mark ``e`` so it starts no (further) prefetch."""
        if self.entries.get(key) is e:
            self.entries[key] = e[:PREFETCH_AT] + (NEVER,)

    def put(self, key: bytes, entry: RawEntry) -> bool:
        """Insert or replace (a replaced entry counts as used); evict beyond either bound.
        False when ``entry`` is too large to store (any older entry for ``key`` is dropped:
        the new answer supersedes it)."""
        size = entry_size(key, entry)
        if size > self.max_entry_bytes:
            self.too_large += 1
            self.delete(key)
            return False
        entries = self.entries
        old = entries.get(key)
        if old is not None:
            self.used.add(key)
            size -= entry_size(key, old)
        else:
            self.queue.append(key)
        entries[key] = entry
        self.bytes += size
        self.inserts += 1
        if len(entries) > self.capacity or self.bytes > self.memory_limit:
            self._evict()
        return True

    def _evict(self) -> None:
        entries, queue, used = self.entries, self.queue, self.used
        while (len(entries) > self.capacity or self.bytes > self.memory_limit) and queue:
            key = queue.popleft()
            e = entries.get(key)
            if e is None:
                continue  # deleted since it was queued
            if key in used:
                used.discard(key)
                queue.append(key)
                continue
            del entries[key]
            self.bytes -= entry_size(key, e)
            self.evictions += 1
        if len(queue) > 2 * len(entries) + 1024:
            # Deleted keys that were stored again left extra slots behind; start afresh.
            self.queue = deque(entries)

    def delete(self, key: bytes) -> bool:
        self.used.discard(key)
        e = self.entries.pop(key, None)
        if e is None:
            return False
        self.bytes -= entry_size(key, e)
        return True

    def delete_name(self, name_wire: bytes) -> int:
        """Remove every type and class of one name (given as lower-cased wire bytes)."""
        n = len(name_wire)
        doomed = [k for k in self.entries if len(k) == n + 4 and k[:n] == name_wire]
        for k in doomed:
            self.delete(k)
        return len(doomed)

    def clear(self) -> int:
        n = len(self.entries)
        self.entries.clear()
        self.queue.clear()
        self.used.clear()
        self.bytes = 0
        return n

    def items(self) -> Iterator[tuple[bytes, Entry]]:
        """(key, view) pairs of a snapshot of the cache, oldest stored first."""
        return iter([(k, Entry._make(e)) for k, e in self.entries.items()])

    @staticmethod
    def describe_key(key: bytes) -> tuple[str, int]:
        """(name without trailing dot, qtype) of a key."""
        return qname_text(key), key_type(key)
