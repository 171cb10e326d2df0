"""Shared-cache values: one cache entry as a one-record cache snapshot, and back.

A value is exactly what :mod:`sidecar.persist.snapshot` writes for a snapshot of one entry
(header with the write's wall-clock time, one CRC'd record, end marker), so a value read
back goes through the same validating decoder as a snapshot file: bounded lengths, CRCs,
a version check, the section walk and TTL offsets. A value is untrusted (anyone who can
write to the server can write it): every way it can be wrong is a rejection with a reason,
never an exception and never a cache entry. The miss path then scrubs what passes
(:mod:`sidecar.miss.outside`).

Expiry travels as absolute wall-clock time, so a value read later (or by another sidecar)
carries only the TTL left, never the original one again.
"""

from __future__ import annotations

from typing import Final

from sidecar.dns.cache import EXPIRES, NEVER, PREFETCH_AT, RCODE, RawEntry
from sidecar.persist.snapshot import (
    MAX_RECORD,
    Decoder,
    SnapshotError,
    encode_end,
    encode_entry,
    encode_header,
    to_entry,
)

#: The rcodes a shared value may carry: answers, never failures. A SERVFAIL (ours or a
#: planted one) in the shared cache would spread one sidecar's bad minute to the fleet.
NOERROR: Final = 0
NXDOMAIN: Final = 3
SHAREABLE_RCODES: Final = frozenset((NOERROR, NXDOMAIN))
#: Header (24) + end marker (10) + the largest record: nothing longer is ever a value.
MAX_VALUE: Final = 24 + 10 + MAX_RECORD
#: Entries with less than this left are not written: they would expire in flight.
MIN_REMAINING: Final = 1.0

#: Why a value was rejected (``Rejected.reason``), for the stats.
REASONS: Final = ("corrupt", "version", "key", "expired", "rcode")


class Rejected(Exception):
    """A value that is not a usable entry for the key asked; ``reason`` in :data:`REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def encode(key: bytes, e: RawEntry, mono: float, wall: float) -> bytes | None:
    """The value for ``key``'s entry ``e`` read at monotonic ``mono`` = wall-clock ``wall``,
    or None when it must not be shared (a failure rcode, too little time left, or a shape
    the snapshot format cannot hold). The prefetch mark is not shared: it is the writer's
    policy, and each reader applies its own."""
    if e[RCODE] not in SHAREABLE_RCODES or e[EXPIRES] - mono < MIN_REMAINING:
        return None
    if e[PREFETCH_AT] != NEVER:
        e = e[:PREFETCH_AT] + (NEVER,)
    rec = encode_entry(key, e, mono, wall)
    if rec is None:
        return None
    return encode_header(wall) + rec + encode_end(1)


def decode(key: bytes, value: bytes, mono: float, wall: float) -> RawEntry:
    """The raw cache entry (times on the cache's clock, ``mono`` = wall-clock ``wall``) that
    ``value`` holds for ``key``; raises :class:`Rejected` (and nothing else) otherwise."""
    if len(value) > MAX_VALUE:
        raise Rejected("corrupt", f"value of {len(value)} bytes")
    dec = Decoder()
    dec.feed(value)
    try:
        recs = list(dec.records())
        dec.finish()
    except SnapshotError as exc:
        raise Rejected("version" if exc.reason == "version" else "corrupt", str(exc)) from None
    if len(recs) != 1 or dec.skipped_bad or dec.saved_at is None:
        raise Rejected("corrupt", f"{len(recs)} valid records, {dec.skipped_bad} invalid")
    rec = recs[0]
    if rec.key != key:
        raise Rejected("key", "value stored under another key")
    if rec.rcode not in SHAREABLE_RCODES:
        raise Rejected("rcode", f"rcode {rec.rcode}")
    if rec.flags:
        raise Rejected("corrupt", "flags set")
    # to_entry counts a write time in our future (a writer's clock ahead of ours) as now, so
    # an entry never gets more than the time it had left when it was written.
    entry = to_entry(rec, dec.saved_at, wall, mono)
    if entry[EXPIRES] - mono < MIN_REMAINING:
        raise Rejected("expired", "expired")
    return entry

