"""The cache snapshot format, version 1: pure encode and validating decode, no I/O.

The layout is documented in docs/snapshot.md. In short: a 24-byte header (magic, version,
the wall-clock time of the save, a CRC32), then one record per cache entry, each with its own
CRC32, then an end marker carrying the record count. Times in a snapshot are wall-clock
(``time.time()``) seconds: monotonic clocks do not survive a restart.

Decoding trusts nothing: it is incremental (the caller feeds the file's bytes as it reads
them), every length is checked against fixed bounds before the decoder waits for or slices
the bytes it announces (no record can make it hold more than :data:`MAX_RECORD` bytes), a
record is used only once its CRC matches and its contents validate (name, section walk, TTL
offsets, counts), and the only exception it raises is :class:`SnapshotError`. Damage stops the
decoding at the damaged record: the records before it were each checked and stay usable.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Iterator
from typing import NamedTuple, NoReturn

from sidecar.dns.cache import (
    AGE,
    BODY,
    EXPIRES,
    HDR,
    NEVER,
    OFFSETS,
    PREFETCH_AT,
    RCODE,
    STORED,
    RawEntry,
    new_entry,
)
from sidecar.errors import SidecarError

#: First 8 bytes of every snapshot (a high byte and CR LF catch text-mode copies).
MAGIC = b"\x89DNSSC\r\n"
VERSION = 1

_HEAD = struct.Struct(">8sHHd")  # magic, version, header flags (0), saved_at
_U32 = struct.Struct(">I")
#: Header bytes: magic, version, flags, saved_at, CRC32 of those.
HEADER_SIZE = _HEAD.size + 4
#: Record header: key length, body length, TTL offset count, rcode, flags, expiry (wall
#: clock), then ANCOUNT, NSCOUNT, ARCOUNT (the last 6 bytes are the cache's own header tail).
_REC = struct.Struct(">HHHBBdHHH")
_REC_LEAD = struct.Struct(">HHHBBd")
_COUNTS = struct.Struct(">HHH")
REC_HEAD_SIZE = _REC.size
#: End marker: a key length of 0, then the number of records before it, then a CRC32.
_END = struct.Struct(">HI")
END_SIZE = _END.size + 4

#: Shortest key: the root name (1 byte) plus type and class.
MIN_KEY = 5
#: Longest key: a 255-byte name (RFC 1035 2.3.4) plus type and class.
MAX_KEY = 255 + 4
#: Longest body: a DNS message is at most 65535 bytes (the u16 length field bounds it too).
MAX_BODY = 65535
#: Smallest resource record: a root owner name (1 byte) and the 10 fixed bytes.
MIN_RR = 11
#: Most bytes one record can span, so the most the decoder holds for one record.
MAX_RECORD = REC_HEAD_SIZE + MAX_KEY + MAX_BODY + 2 * (MAX_BODY // MIN_RR) + 4
#: Largest TTL left at save time a record may claim (RFC 2181 section 8: TTLs below 2^31 s).
MAX_REMAINING = float(1 << 31)
#: Records with a matching CRC but invalid contents skipped before the decoder gives up: a
#: file of many is not one the sidecar wrote, and each costs a walk of its body.
MAX_BAD = 1000
#: rcodes a cache entry can have (the 4 bits of the DNS header).
MAX_RCODE = 15

#: Record flag: the entry still had a prefetch to start (``--prefetch``).
FLAG_PREFETCH = 0x01
#: Record flag: ... and that prefetch was already due at save time.
FLAG_PREFETCH_DUE = 0x02
_KNOWN_FLAGS = FLAG_PREFETCH | FLAG_PREFETCH_DUE
#: An armed prefetch after a load starts in the last tenth of the TTL left at save time.
PREFETCH_SHARE = 0.1

#: The reasons a :class:`SnapshotError` can carry.
REASONS = ("empty", "foreign", "version", "truncated", "corrupt", "invalid")


class SnapshotError(SidecarError):
    """The snapshot cannot be (further) read. ``reason`` is one of :data:`REASONS`;
    ``offset`` the byte where reading stopped."""

    def __init__(self, reason: str, message: str, offset: int = 0) -> None:
        super().__init__(message)
        self.reason = reason
        self.offset = offset


class Record(NamedTuple):
    """One decoded and validated record. ``body`` carries the TTLs of the save time,
    ``expires`` is wall-clock seconds; ``an``/``ns``/``ar`` are the section counts."""

    key: bytes
    rcode: int
    an: int
    ns: int
    ar: int
    body: bytes
    offsets: tuple[int, ...]
    expires: float
    flags: int


# ------------------------------------------------------------------------------ encode


def encode_header(saved_at: float) -> bytes:
    """The file header for a save at ``saved_at`` (wall-clock seconds)."""
    head = _HEAD.pack(MAGIC, VERSION, 0, saved_at)
    return head + _U32.pack(zlib.crc32(head))


def encode_end(count: int) -> bytes:
    """The end marker after ``count`` records."""
    end = _END.pack(0, count)
    return end + _U32.pack(zlib.crc32(end))


_offsets_packed: dict[tuple[int, ...], bytes] = {}
_OFFSETS_MEMO = 4096


def _pack_offsets(offs: tuple[int, ...]) -> bytes:
    # Answers of one shape share their offsets: pack each shape once.
    got = _offsets_packed.get(offs)
    if got is None:
        got = struct.pack(f">{len(offs)}H", *offs)
        if len(_offsets_packed) >= _OFFSETS_MEMO:
            _offsets_packed.clear()
        _offsets_packed[offs] = got
    return got


#: Offset counts whose unpacker is kept (a Struct costs ~24 bytes per field: one per
#: count up to MAX_BODY // MIN_RR would cost hundreds of MiB).
_OFFSETS_KEPT = 64
_offsets_structs = [struct.Struct(f">{n}H") for n in range(_OFFSETS_KEPT + 1)]


def _offsets_struct(n: int) -> struct.Struct:
    return _offsets_structs[n] if n <= _OFFSETS_KEPT else struct.Struct(f">{n}H")


def encode_record(key: bytes, rcode: int, an: int, ns: int, ar: int, body: bytes,
                  offsets: tuple[int, ...], expires: float, flags: int = 0) -> bytes:
    """One record (its CRC32 included). ``body`` carries the TTLs of the save time;
    ``expires`` is wall-clock seconds. Raises ValueError for a field outside the format's
    bounds (the store never passes one: :func:`encode_entry` checks first)."""
    if not MIN_KEY <= len(key) <= MAX_KEY or len(body) > MAX_BODY or rcode > MAX_RCODE:
        raise ValueError("key, body or rcode outside the snapshot format's bounds")
    rec = b"".join((_REC.pack(len(key), len(body), len(offsets), rcode, flags, expires,
                              an, ns, ar), key, body, _pack_offsets(offsets)))
    return rec + _U32.pack(zlib.crc32(rec))


def encode_entry(key: bytes, e: RawEntry, mono: float, wall: float) -> bytes | None:
    """The record for the cache's raw entry ``e`` as of monotonic time ``mono`` = wall-clock
    time ``wall`` (the save's one pair of clock readings), or None when it does not fit
    the format (a key or body too long, section counts the body cannot hold, a TTL offset
    outside the body): the decoder would stop at such a record, and one entry must not fail
    a whole save, so it is left out instead.

    The body's TTLs are brought to ``mono`` rounded up to the next whole second, so they
    never claim more than is left; an entry stored or re-rendered after ``mono`` keeps its
    own (lower) TTLs. The expiry is converted to wall-clock time exactly.
    """
    body = e[BODY]
    klen, blen = len(key), len(body)
    if not MIN_KEY <= klen <= MAX_KEY or blen > MAX_BODY:
        return None
    offs = e[OFFSETS]
    hdr = e[HDR]
    an, ns, ar = _COUNTS.unpack_from(hdr, 3)
    nrr = an + ns + ar
    if (nrr > blen // MIN_RR or len(offs) > nrr or (blen and not nrr)
            or (offs and max(offs) + 4 > blen)):
        return None
    delta = math.ceil(mono - e[STORED]) - e[AGE]
    if delta > 0 and offs:
        buf = bytearray(body)
        unpack, pack = _U32.unpack_from, _U32.pack_into
        for off in offs:
            left = unpack(buf, off)[0] - delta
            pack(buf, off, left if left > 0 else 1)
        body = bytes(buf)
    flags = 0
    prefetch_at = e[PREFETCH_AT]
    if prefetch_at != NEVER:
        flags = FLAG_PREFETCH | (FLAG_PREFETCH_DUE if prefetch_at <= mono else 0)
    rec = b"".join((_REC_LEAD.pack(klen, blen, len(offs), e[RCODE] & MAX_RCODE, flags,
                                   wall + (e[EXPIRES] - mono)),
                    hdr[3:9], key, body, _pack_offsets(offs)))
    return rec + _U32.pack(zlib.crc32(rec))


# ------------------------------------------------------------------------------ decode


def valid_key(key: bytes) -> bool:
    """A cache key: a lower-cased wire name of labels of 1-63 bytes ending in the root,
    then type and class."""
    n = len(key) - 4
    if n < 1 or key != key.lower():
        return False
    pos = 0
    while True:
        length = key[pos]
        if length == 0:
            return pos == n - 1
        if length > 63:
            return False
        pos += 1 + length
        if pos >= n:
            return False


def ttl_positions(body: bytes, count: int) -> tuple[int, ...] | None:
    """Offsets of the TTL fields of exactly ``count`` resource records that make up
    ``body`` (owner names as labels or a compression pointer), or None when the body is
    not that."""
    n = len(body)
    pos = 0
    out = []
    for _ in range(count):
        while True:
            if pos >= n:
                return None
            length = body[pos]
            if length >= 0xC0:
                pos += 2
                break
            if length > 63:
                return None
            pos += 1 + length
            if length == 0:
                break
        if pos + 10 > n:
            return None
        out.append(pos + 4)
        pos += 10 + ((body[pos + 8] << 8) | body[pos + 9])
        if pos > n:
            return None
    return tuple(out) if pos == n else None


def check_record(rec: Record, saved_at: float) -> str | None:
    """Why a record whose CRC matched still cannot be used (None: it can)."""
    if rec.rcode > MAX_RCODE or rec.flags & ~_KNOWN_FLAGS:
        return "unknown rcode or flags"
    if not math.isfinite(rec.expires) or rec.expires - saved_at > MAX_REMAINING:
        return "expiry out of range"
    if not valid_key(rec.key):
        return "not a cache key"
    positions = ttl_positions(rec.body, rec.an + rec.ns + rec.ar)
    if positions is None:
        return "body is not its section counts' records"
    offs = rec.offsets
    if offs != positions and (len(set(offs)) != len(offs) or not set(offs) <= set(positions)):
        return "TTL offsets are not the records' TTL fields"
    return None


class Decoder:
    """Reads a snapshot incrementally: ``feed()`` the file's bytes as they are read,
    take the records complete so far from ``records()``, call ``finish()`` at the end of the
    file. It holds at most the bytes fed and not yet consumed: one partial record (at most
    :data:`MAX_RECORD` bytes, whatever the file claims) plus the last chunk fed.

    ``records()`` yields the valid records in file order. It raises :class:`SnapshotError`
    (and nothing else) at the first damage: a file that is foreign, of another version or
    with a damaged header, a record whose lengths or checksum are wrong (the records
    yielded before it were each checked and stay usable). A record whose checksum matches
    but whose contents do not validate is skipped and counted in ``skipped_bad``. Errors are
    sticky: every later call raises the same one.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        #: File offset of ``_buf[0]``.
        self._base = 0
        #: File offset where the next record starts (where reading stopped, after an error).
        self.offset = 0
        #: Records read with a matching checksum (valid or not).
        self.records_read = 0
        self.skipped_bad = 0
        #: The end marker was read (and matched).
        self.complete = False
        #: Wall-clock time of the save, once the header is read.
        self.saved_at: float | None = None
        self.version: int | None = None
        self._fed = 0
        self._error: SnapshotError | None = None

    def feed(self, data: bytes) -> None:
        """Append the next bytes of the file."""
        self._buf += data
        self._fed += len(data)

    def records(self) -> Iterator[Record]:
        """The records complete in what was fed so far."""
        if self._error is not None:
            raise self._error
        try:
            yield from self._records()
        except SnapshotError as exc:
            self._error = exc
            raise
        except Exception as exc:  # the contract: nothing but SnapshotError leaves
            self._error = SnapshotError("invalid", f"unreadable record ({type(exc).__name__})",
                                        self.offset)
            raise self._error from exc

    def finish(self) -> None:
        """The file ended: raise :class:`SnapshotError` unless it ended right after the end
        marker."""
        if self._error is not None:
            raise self._error
        if self.complete:
            if self._fed > self.offset:
                self._fail("invalid", f"{self._fed - self.offset} bytes after the end marker")
            return
        if self._fed == 0:
            self._fail("empty", "empty file")
        if self.saved_at is None:
            self._fail("truncated", f"header cut short at byte {self._fed}")
        if self._fed > self.offset:
            self._fail("truncated", f"record at byte {self.offset} cut short")
        self._fail("truncated", f"file ends at byte {self._fed} without the end marker"
                   f" (after {self.records_read} records)")

    def _fail(self, reason: str, message: str) -> NoReturn:
        self._error = SnapshotError(reason, message, self.offset)
        raise self._error

    def _header(self, buf: bytearray) -> bool:
        if not MAGIC.startswith(bytes(buf[:8])):
            self._fail("foreign", "not a dns-sidecar cache snapshot")
        if len(buf) < HEADER_SIZE:
            return False
        _magic, version, flags, saved_at = _HEAD.unpack_from(buf)
        if _U32.unpack_from(buf, _HEAD.size)[0] != zlib.crc32(buf[: _HEAD.size]):
            self._fail("corrupt", "header checksum mismatch")
        if version != VERSION or flags:
            self._fail("version", f"snapshot version {version} (flags {flags:#x}), this"
                       f" sidecar reads version {VERSION}")
        if not math.isfinite(saved_at) or saved_at <= 0:
            self._fail("corrupt", "save time out of range")
        self.version, self.saved_at = version, saved_at
        self.offset = HEADER_SIZE
        return True

    def _records(self) -> Iterator[Record]:
        # Drop what earlier calls consumed (only here: a suspended call reads the offsets
        # afresh on every record, and feed() only appends).
        consumed = self.offset - self._base
        if consumed:
            del self._buf[:consumed]
            self._base = self.offset
        buf = self._buf
        if self.saved_at is None and not self._header(buf):
            return
        saved_at = self.saved_at
        assert saved_at is not None
        rec_unpack, u32, crc32 = _REC.unpack_from, _U32.unpack_from, zlib.crc32
        head_size = REC_HEAD_SIZE
        while not self.complete:
            base = self._base
            pos = self.offset - base
            size = len(buf)
            if pos + 2 > size:
                return
            if buf[pos] == 0 and buf[pos + 1] == 0:
                if not self._end(buf, pos):
                    return
                break
            if pos + head_size > size:
                return
            klen, blen, noff, rcode, flags, expires, an, ns, ar = rec_unpack(buf, pos)
            nrr = an + ns + ar
            if (not MIN_KEY <= klen <= MAX_KEY or nrr > blen // MIN_RR or noff > nrr
                    or (not nrr and blen)):
                self._fail("corrupt", f"record at byte {self.offset}: lengths out of range")
            a = pos + head_size
            b = a + klen
            c = b + blen
            end = c + 2 * noff
            if end + 4 > size:
                return  # more to come (bounded: the lengths above are)
            # Checked in place; only a record that matches is copied out (key, body).
            with memoryview(buf) as view:
                if crc32(view[pos:end]) != u32(buf, end)[0]:
                    self._fail("corrupt", f"record at byte {self.offset}: checksum mismatch")
                key, body = bytes(view[a:b]), bytes(view[b:c])
            self.offset = base + end + 4
            self.records_read += 1
            rec = Record(key, rcode, an, ns, ar, body,
                         _offsets_struct(noff).unpack_from(buf, c) if noff else (),
                         expires, flags)
            if check_record(rec, saved_at) is not None:
                self.skipped_bad += 1
                if self.skipped_bad > MAX_BAD:
                    self._fail("invalid", f"more than {MAX_BAD} invalid records: not a"
                               " snapshot this sidecar wrote")
                continue
            yield rec

    def _end(self, buf: bytearray, pos: int) -> bool:
        """Read the end marker at ``pos``; False when it is not all there yet."""
        if pos + END_SIZE > len(buf):
            return False
        end = bytes(buf[pos : pos + END_SIZE])
        if _U32.unpack_from(end, _END.size)[0] != zlib.crc32(end[: _END.size]):
            self._fail("corrupt", f"end marker at byte {self.offset}: checksum mismatch")
        count = _END.unpack_from(end)[1]
        if count != self.records_read:
            self._fail("corrupt", f"end marker counts {count} records, the file holds"
                       f" {self.records_read}")
        self.offset += END_SIZE
        self.complete = True
        return True


def decode(data: bytes) -> Iterator[Record]:
    """The valid records of a whole snapshot held in memory (tests, tools); raises
    :class:`SnapshotError` at the first damage, after yielding the records before it."""
    dec = Decoder()
    dec.feed(data)
    yield from dec.records()
    dec.finish()


# ------------------------------------------------------------------------------ to the cache


def to_entry(rec: Record, saved_at: float, wall: float, mono: float) -> RawEntry:
    """The raw cache entry for ``rec``, read at wall-clock time ``wall`` = the cache's
    monotonic time ``mono``.

    The TTL left carries over: the entry expires ``rec.expires - wall`` seconds after
    ``mono`` (negative: already expired, for the caller to drop or keep as stale). Its body
    holds the TTLs of the save, so it counts as stored at the save. A wall clock that went
    back since the save counts as no time passed: a TTL never grows. An armed prefetch starts
    in the last :data:`PREFETCH_SHARE` of the TTL left at the save, at once if it was due.
    """
    now = wall if wall > saved_at else saved_at
    stored = mono - (now - saved_at)
    expires = mono + (rec.expires - now)
    prefetch_at = NEVER
    if rec.flags & FLAG_PREFETCH:
        if rec.flags & FLAG_PREFETCH_DUE:
            prefetch_at = stored
        else:
            prefetch_at = expires - PREFETCH_SHARE * (rec.expires - saved_at)
    return new_entry(rec.rcode, rec.an, rec.ns, rec.ar, rec.body, rec.offsets, stored,
                     expires - stored, prefetch_at)
