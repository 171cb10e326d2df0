"""The cache snapshot (sidecar/persist): format round trip, TTLs across a restart, damaged and
hostile files, cache bounds, atomic saves, and replies served from loaded entries.

Real Cache objects and real files in tmp_path. Clocks are fakes passed in (the wall clock to
the store, the monotonic one to the cache, ``Cache(..., clock=)``), except where a
QueryHandler answers: there the cache keeps the process's monotonic clock.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import struct
import time
import tracemalloc
import zlib
from pathlib import Path

import dns.message
import dns.rdatatype
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.dns.cache import (
    AGE,
    BODY,
    EXPIRES,
    NEVER,
    OFFSETS,
    PREFETCH_AT,
    STORED,
    Cache,
    Entry,
    entry_size,
    new_entry,
)
from sidecar.dns.handler import QueryHandler
from sidecar.dns.types import Rcode, RRType
from sidecar.dns.wire import make_key
from sidecar.errors import SidecarError
from sidecar.miss.entry import TtlPolicy, build_entry, servfail_entry
from sidecar.persist import snapshot as snap
from sidecar.persist import store as store_mod
from sidecar.persist.snapshot import Decoder, SnapshotError
from sidecar.persist.store import LoadResult, SnapshotStore
from sidecar.upstream.records import Answer, Rec

WALL0 = 1_800_000_000.0
SOA_RDATA = (b"\x03ns1\x07example\x03com\x00\x0ahostmaster\x07example\x03com\x00"
             + struct.pack(">IIIII", 2024010101, 7200, 3600, 1209600, 300))
#: Reasons a damaged file may stop a load with (never "error": that is a bug in the loader).
DAMAGE = {"empty", "foreign", "version", "truncated", "corrupt", "invalid"}


class Clocks:
    """A wall clock and a monotonic clock moving together (or not, via ``jump_wall``)."""

    def __init__(self, wall: float = WALL0, mono: float = 1000.0) -> None:
        self.w, self.m = wall, mono

    def wall(self) -> float:
        return self.w

    def mono(self) -> float:
        return self.m

    def advance(self, seconds: float) -> None:
        self.w += seconds
        self.m += seconds


def new_cache(clocks: Clocks, capacity: int = 1000, memory: int = 64 << 20) -> Cache:
    return Cache(capacity, memory, clock=clocks.mono)


def name_wire(name: str) -> bytes:
    return b"".join(bytes((len(p),)) + p.encode() for p in name.split(".")) + b"\x00"


def a(name: str, last: int, ttl: int = 300) -> Rec:
    return Rec(name, RRType.A, ttl, bytes((192, 0, 2, last)))


def soa(zone: str = "example.com", ttl: int = 3600) -> Rec:
    return Rec(zone, RRType.SOA, ttl, SOA_RDATA)


def shapes() -> list[tuple[str, int, Answer]]:
    """(name, qtype, answer): positive, NXDOMAIN with SOA, NODATA with SOA, CNAME chain."""
    return [
        ("www.example.com", RRType.A, Answer(Rcode.NOERROR, [a("www.example.com", 1),
                                                             a("www.example.com", 2)])),
        ("nx.example.com", RRType.A, Answer(Rcode.NXDOMAIN, [], [soa()])),
        ("www.example.com", RRType.AAAA, Answer(Rcode.NOERROR, [], [soa()])),
        ("alias.example.com", RRType.A, Answer(Rcode.NOERROR, [
            Rec("alias.example.com", RRType.CNAME, 600, name_wire("edge.cdn.example.net")),
            a("edge.cdn.example.net", 9, 120)])),
    ]


def fill(cache: Cache, clocks: Clocks, policy: TtlPolicy | None = None,
         extra: int = 0) -> list[bytes]:
    """Put the four shapes (stored now) and ``extra`` plain A entries; returns the keys in
    insertion order."""
    policy = policy or TtlPolicy()
    keys = []
    for name, qtype, answer in shapes():
        key = make_key(name, qtype)
        cache.put(key, build_entry(key, qtype, answer, None, policy, clocks.m))
        keys.append(key)
    for i in range(extra):
        name = f"host{i}.example.org"
        key = make_key(name, RRType.A)
        cache.put(key, build_entry(key, RRType.A, Answer(Rcode.NOERROR, [a(name, i % 250)]),
                                   None, policy, clocks.m))
        keys.append(key)
    return keys


async def saved(tmp_path: Path, cache: Cache, clocks: Clocks, serve_stale: float = 0,
                name: str = "cache.snap") -> Path:
    path = tmp_path / name
    result = await SnapshotStore(path, 0, cache, serve_stale, wall=clocks.wall).save()
    assert result.ok, result
    return path


def load(path: Path, clocks: Clocks, serve_stale: float = 0, **cache_kw) -> tuple[Cache,
                                                                                  LoadResult]:
    cache = new_cache(clocks, **cache_kw)
    result = SnapshotStore(path, 0, cache, serve_stale, wall=clocks.wall).load()
    assert result.stopped_reason != "error", result
    return cache, result


def ttls(e: tuple) -> list[int]:
    return [struct.unpack_from(">I", e[BODY], off)[0] for off in e[OFFSETS]]


def served_ttls(cache: Cache, key: bytes, mono: float) -> list[int]:
    """The TTLs a hit at ``mono`` would carry (the handler's rendering)."""
    e = cache.entries[key]
    body = cache.rendered_body(key, e, int(mono - e[STORED]))
    return [struct.unpack_from(">I", body, off)[0] for off in e[OFFSETS]]


def record_ends(data: bytes) -> list[int]:
    """The byte offset just past each record of a whole snapshot."""
    dec = Decoder()
    dec.feed(data)
    ends = []
    for _ in dec.records():
        ends.append(dec.offset)
    dec.finish()
    assert dec.complete
    return ends


def record_keys(data: bytes) -> list[bytes]:
    return [r.key for r in snap.decode(data)]


# ---------------------------------------------------------------------- round trip


async def test_round_trip_keeps_every_shape(tmp_path):
    clocks = Clocks()
    cache = new_cache(clocks)
    keys = fill(cache, clocks)
    cache.put(make_key("broken.example.com", RRType.A), servfail_entry(clocks.m, TtlPolicy()))
    path = await saved(tmp_path, cache, clocks)
    later = Clocks(WALL0, mono=5.0)  # a new process: another monotonic origin, no time passed
    loaded, result = load(path, later)
    assert result.stopped_reason == "complete" and result.error is None
    assert result.loaded == 4 and result.skipped_bad == 0
    assert list(loaded.entries) == keys  # SERVFAIL is not saved; the order is kept
    for key in keys:
        old, new = Entry._make(cache.entries[key]), Entry._make(loaded.entries[key])
        assert (new.hdr, new.hdr_edns, new.body, new.offsets, new.rcode) == (
            old.hdr, old.hdr_edns, old.body, old.offsets, old.rcode)
        assert new.expires - later.m == pytest.approx(old.expires - clocks.m)
        assert new.prefetch_at == NEVER
    nx = Entry._make(loaded.entries[keys[1]])
    assert nx.rcode == Rcode.NXDOMAIN and nx.hdr[5:7] == b"\x00\x01"  # NSCOUNT 1: the SOA
    assert SOA_RDATA in nx.body
    nodata = Entry._make(loaded.entries[keys[2]])
    assert nodata.rcode == Rcode.NOERROR and nodata.hdr[3:5] == b"\x00\x00"
    assert SOA_RDATA in nodata.body
    chain = Entry._make(loaded.entries[keys[3]])
    assert chain.hdr[3:5] == b"\x00\x02" and name_wire("edge.cdn.example.net") in chain.body


async def test_ttl_carries_over_and_never_exceeds_what_is_left(tmp_path):
    clocks = Clocks()
    cache = new_cache(clocks)
    keys = fill(cache, clocks)
    clocks.advance(10.4)
    path = await saved(tmp_path, cache, clocks)
    before = {k: cache.entries[k][EXPIRES] - clocks.m for k in keys}
    original = {k: ttls(cache.entries[k]) for k in keys}  # as stored (age 0)
    later = Clocks(clocks.w + 30.0, mono=7.0)  # down 30 s, new monotonic origin
    loaded, result = load(path, later)
    assert result.loaded == 4
    for key in keys:
        e = loaded.entries[key]
        assert e[EXPIRES] - later.m == pytest.approx(before[key] - 30.0)
        for ttl, orig in zip(served_ttls(loaded, key, later.m), original[key], strict=True):
            left = orig - 40.4  # each record's own TTL, 40.4 s after it was stored
            assert left - 2 <= ttl <= left
    # www A: 300 s, stored 40.4 s ago overall -> 259.6 s left, the reply says 259
    assert served_ttls(loaded, keys[0], later.m) == [259, 259]
    later.advance(100)
    assert served_ttls(loaded, keys[0], later.m) == [159, 159]


async def test_wall_clock_going_back_does_not_lengthen_ttls(tmp_path):
    clocks = Clocks()
    cache = new_cache(clocks)
    keys = fill(cache, clocks)
    path = await saved(tmp_path, cache, clocks)
    back = Clocks(WALL0 - 3600, mono=1.0)
    loaded, result = load(path, back)
    assert result.loaded == 4
    for key in keys:
        assert loaded.entries[key][EXPIRES] - back.m == pytest.approx(
            cache.entries[key][EXPIRES] - clocks.m)


async def test_entries_expired_while_down_are_dropped(tmp_path):
    clocks = Clocks()
    cache = new_cache(clocks)
    keys = fill(cache, clocks)  # lifetimes: 300, 300 (negative), 300, 120 (chain's shortest)
    long_key = make_key("long.example.com", RRType.A)
    cache.put(long_key, build_entry(long_key, RRType.A, Answer(
        Rcode.NOERROR, [a("long.example.com", 7, 3600)]), None, TtlPolicy(), clocks.m))
    path = await saved(tmp_path, cache, clocks)
    loaded, result = load(path, Clocks(WALL0 + 200, mono=3.0))
    assert result.loaded == 4 and result.skipped_expired == 1  # the chain (120 s)
    assert keys[3] not in loaded.entries
    loaded, result = load(path, Clocks(WALL0 + 400, mono=3.0))
    assert list(loaded.entries) == [long_key] and result.skipped_expired == 4


async def test_serve_stale_window_is_honoured_at_load_and_at_save(tmp_path):
    clocks = Clocks()
    cache = new_cache(clocks)
    keys = fill(cache, clocks)
    path = await saved(tmp_path, cache, clocks)
    # Down 150 s: the chain (120 s) expired 30 s ago, the others are fresh.
    loaded, result = load(path, Clocks(WALL0 + 150, mono=3.0), serve_stale=60)
    assert result.loaded == 4 and result.skipped_expired == 0
    assert loaded.entries[keys[3]][EXPIRES] - 3.0 == pytest.approx(-30.0)
    # ... 80 s ago: beyond a 60 s window, kept by a 3600 s one.
    assert load(path, Clocks(WALL0 + 200, mono=3.0), serve_stale=60)[1].loaded == 3
    assert load(path, Clocks(WALL0 + 200, mono=3.0), serve_stale=3600)[1].loaded == 4
    # At save time: an entry expired 30 s ago is saved only within the window.
    clocks.advance(150)
    assert record_keys((await saved(tmp_path, cache, clocks, 0, "a")).read_bytes()) == [
        k for k in reversed(keys) if k != keys[3]]
    assert keys[3] in record_keys((await saved(tmp_path, cache, clocks, 60, "b")).read_bytes())


async def test_prefetch_flags_carry_over(tmp_path):
    clocks = Clocks()
    cache = new_cache(clocks)
    policy = TtlPolicy(prefetch=True)
    keys = fill(cache, clocks, policy)  # prefetch at 90% of each lifetime
    cache.no_prefetch(keys[1], cache.entries[keys[1]])  # this one already started
    clocks.advance(110)  # the chain (120 s) is past its prefetch point (108 s)
    path = await saved(tmp_path, cache, clocks)
    later = Clocks(clocks.w, mono=50.0)
    loaded, _ = load(path, later)
    www = loaded.entries[keys[0]]
    assert www[PREFETCH_AT] == pytest.approx(www[EXPIRES] - 0.1 * 190)  # 190 s were left
    assert loaded.entries[keys[1]][PREFETCH_AT] == NEVER
    assert loaded.entries[keys[3]][PREFETCH_AT] <= later.m  # due: the next hit prefetches


# ---------------------------------------------------------------------- missing, damaged


def test_missing_file_starts_cold(tmp_path, caplog):
    clocks = Clocks()
    with caplog.at_level(logging.INFO, "sidecar.snapshot"):
        cache, result = load(tmp_path / "nothing.snap", clocks)
    assert (result.stopped_reason, result.loaded, result.error) == ("missing", 0, None)
    assert not cache.entries
    assert len([r for r in caplog.records if r.name == "sidecar.snapshot"]) == 1


def test_empty_file_is_one_logged_error(tmp_path, caplog):
    path = tmp_path / "cache.snap"
    path.write_bytes(b"")
    cache = new_cache(Clocks())
    store = SnapshotStore(path, 0, cache, wall=Clocks().wall)
    with caplog.at_level(logging.INFO, "sidecar.snapshot"):
        result = store.load()
    assert result.stopped_reason == "empty" and not cache.entries
    assert store.stats()["load_error"] == "empty file"
    lines = [r for r in caplog.records if r.name == "sidecar.snapshot"]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING


@pytest.mark.parametrize("read_chunk", [store_mod.READ_CHUNK, 7])
async def test_truncated_at_every_byte_loads_exactly_the_records_before_the_cut(
        tmp_path, monkeypatch, read_chunk):
    monkeypatch.setattr(store_mod, "READ_CHUNK", read_chunk)  # records across reads, too
    clocks = Clocks()
    cache = new_cache(clocks)
    fill(cache, clocks)
    data = (await saved(tmp_path, cache, clocks)).read_bytes()
    ends = record_ends(data)
    order = record_keys(data)
    whole, _ = load(tmp_path / "cache.snap", clocks)
    cut_path = tmp_path / "cut.snap"
    for cut in range(len(data)):
        cut_path.write_bytes(data[:cut])
        loaded, result = load(cut_path, clocks)
        assert result.stopped_reason in DAMAGE, (cut, result)
        assert result.stopped_reason == ("empty" if cut == 0 else "truncated"), (cut, result)
        n = sum(1 for end in ends if end <= cut)
        assert set(loaded.entries) == set(order[:n]), cut
        for key, e in loaded.entries.items():
            assert e == whole.entries[key]
    cut_path.write_bytes(data)
    assert load(cut_path, clocks)[1].stopped_reason == "complete"


async def test_every_flipped_byte_is_caught_and_nothing_altered_is_loaded(tmp_path):
    clocks = Clocks()
    cache = new_cache(clocks)
    fill(cache, clocks)
    data = (await saved(tmp_path, cache, clocks)).read_bytes()
    ends = record_ends(data)
    order = record_keys(data)
    whole, _ = load(tmp_path / "cache.snap", clocks)
    path = tmp_path / "flipped.snap"
    for pos in range(len(data)):
        for bit in (0x01, 0x80):
            damaged = bytearray(data)
            damaged[pos] ^= bit
            path.write_bytes(bytes(damaged))
            loaded, result = load(path, clocks)
            assert result.stopped_reason in DAMAGE, (pos, bit, result)
            # the records wholly before the damaged one, unaltered
            n = sum(1 for end in ends if end <= pos)
            assert set(loaded.entries) == set(order[:n]), (pos, bit)
            for key, e in loaded.entries.items():
                assert e == whole.entries[key]


def header(version: int = snap.VERSION, magic: bytes = snap.MAGIC,
           saved_at: float = WALL0) -> bytes:
    head = struct.pack(">8sHHd", magic, version, 0, saved_at)
    return head + struct.pack(">I", zlib.crc32(head))


def test_foreign_and_other_version_files_start_cold(tmp_path):
    clocks = Clocks()
    path = tmp_path / "cache.snap"
    for data, reason in ((b"PK\x03\x04 a zip file, not ours" * 4, "foreign"),
                         (header(magic=b"\x89PNG\r\n\x1a\n") + snap.encode_end(0), "foreign"),
                         (header(version=2) + snap.encode_end(0), "version"),
                         (header(version=0) + snap.encode_end(0), "version"),
                         (snap.MAGIC[:5], "truncated"),
                         (header()[:-1] + b"\x00", "corrupt"),
                         (header() + snap.encode_end(0) + b"junk", "invalid")):
        path.write_bytes(data)
        cache, result = load(path, clocks)
        assert result.stopped_reason == reason, (data, result)
        assert not cache.entries and result.error


def raw_record(key: bytes, body: bytes = b"", offsets: tuple[int, ...] = (),
               counts: tuple[int, int, int] = (0, 0, 0), rcode: int = 0, flags: int = 0,
               expires: float = WALL0 + 300, klen: int | None = None,
               blen: int | None = None, noff: int | None = None) -> bytes:
    """A record with a correct CRC and whatever fields the test wants."""
    rec = struct.pack(">HHHBBdHHH", len(key) if klen is None else klen,
                      len(body) if blen is None else blen,
                      len(offsets) if noff is None else noff, rcode, flags, expires, *counts)
    rec += key + body + struct.pack(f">{len(offsets)}H", *offsets)
    return rec + struct.pack(">I", zlib.crc32(rec))


#: What a load may hold at once, whatever the file: a read chunk, the decoder's buffer (its
#: growth holds the old and the new allocation), one record and the walk of its body.
PEAK_BOUND = 8 * store_mod.READ_CHUNK + 4 * snap.MAX_RECORD
GOOD_KEY = make_key("ok.example.com", RRType.A)
GOOD_BODY = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 300, 4) + b"\xc0\x00\x02\x01"


def good_record(i: int = 0) -> bytes:
    key = make_key(f"ok{i}.example.com", RRType.A)
    return raw_record(key, GOOD_BODY, (6,), (1, 0, 0))


def test_hostile_lengths_and_counts_are_refused_without_big_allocations(tmp_path):
    clocks = Clocks()
    path = tmp_path / "cache.snap"
    hostile = [
        raw_record(GOOD_KEY, klen=65535),                          # key far too long
        raw_record(b"\x00\x00\x01\x00", klen=4),                   # key too short
        raw_record(GOOD_KEY, blen=65535, noff=65535, counts=(65535, 65535, 65535)),
        raw_record(GOOD_KEY, GOOD_BODY, (6,), (40, 0, 0)),         # counts the body can't hold
        raw_record(GOOD_KEY, GOOD_BODY, (6, 6, 6), (1, 0, 0)),     # more offsets than records
        raw_record(GOOD_KEY, b"\x00" * 65535, blen=65535, counts=(5957, 0, 0))[:-10],
        struct.pack(">HI", 0, 0xFFFFFFFF) + b"\x00\x00\x00\x00",  # end marker, huge count
    ]
    for bad in hostile:
        path.write_bytes(header() + good_record() + bad + snap.encode_end(2))
        tracemalloc.start()
        cache, result = load(path, clocks)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert result.stopped_reason in ("corrupt", "truncated"), result
        assert list(cache.entries) == [make_key("ok0.example.com", RRType.A)]
        assert peak < PEAK_BOUND, peak


def test_records_with_valid_crc_but_bad_contents_are_skipped(tmp_path):
    clocks = Clocks()
    path = tmp_path / "cache.snap"
    rr = GOOD_BODY
    bad = [
        raw_record(b"\x05Hello\x03com\x00\x00\x01\x00\x01", rr, (6,), (1, 0, 0)),  # upper case
        raw_record(b"\x50" + b"a" * 10 + b"\x00\x00\x01\x00\x01", rr, (6,), (1, 0, 0)),
        raw_record(b"\x02ab\x03com\x05\x00\x01\x00\x01", rr, (6,), (1, 0, 0)),  # no root end
        raw_record(GOOD_KEY, rr, (7,), (1, 0, 0)),            # offset not at a TTL field
        raw_record(GOOD_KEY, rr + rr, (6, 6), (2, 0, 0)),      # the same TTL twice
        raw_record(GOOD_KEY, rr + b"\x00" * 11, (6,), (1, 0, 0)),  # bytes beyond its records
        raw_record(GOOD_KEY, rr[:-1] + b"\x00" * 11, (6,), (2, 0, 0)),  # rdlength overruns
        raw_record(GOOD_KEY, b"\x7f" + rr[1:], (6,), (1, 0, 0)),  # label longer than 63
        raw_record(GOOD_KEY, rr, (6,), (1, 0, 0), rcode=99),
        raw_record(GOOD_KEY, rr, (6,), (1, 0, 0), flags=0x80),
        raw_record(GOOD_KEY, rr, (6,), (1, 0, 0), expires=float("nan")),
        raw_record(GOOD_KEY, rr, (6,), (1, 0, 0), expires=float("inf")),
        raw_record(GOOD_KEY, rr, (6,), (1, 0, 0), expires=WALL0 + 2.0**32),
    ]
    path.write_bytes(header() + good_record(0) + b"".join(bad) + good_record(1)
                     + snap.encode_end(len(bad) + 2))
    cache, result = load(path, clocks)
    assert result.stopped_reason == "complete"
    assert result.skipped_bad == len(bad) and result.loaded == 2
    # Big but valid-framed records skipped one by one: memory stays at one record's worth.
    # A 10 MB file of big, framed-but-invalid records, skipped one by one: memory stays
    # within PEAK_BOUND (well under the file's size).
    junk = raw_record(GOOD_KEY, b"\x00" * 65535, counts=(5957, 0, 0))
    path.write_bytes(header() + junk * 150 + good_record() + snap.encode_end(151))
    assert path.stat().st_size > 5 * PEAK_BOUND
    tracemalloc.start()
    cache, result = load(path, clocks)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert (result.stopped_reason, result.skipped_bad, result.loaded) == ("complete", 150, 1)
    assert peak < PEAK_BOUND, peak
    # ... and a file of little else gives up early.
    path.write_bytes(header() + raw_record(GOOD_KEY, rcode=99) * (snap.MAX_BAD + 5)
                     + snap.encode_end(snap.MAX_BAD + 5))
    assert load(path, clocks)[1].stopped_reason == "invalid"


async def test_end_marker_must_count_the_records(tmp_path):
    clocks = Clocks()
    path = tmp_path / "cache.snap"
    path.write_bytes(header() + good_record(0) + good_record(1) + snap.encode_end(3))
    cache, result = load(path, clocks)
    assert result.stopped_reason == "corrupt" and result.loaded == 2


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_decoder_raises_only_snapshot_error_and_yields_only_original_records(data):
    clocks = Clocks()
    cache = new_cache(clocks)
    fill(cache, clocks, extra=3)
    mono, wall = clocks.m, clocks.w
    blob = snap.encode_header(wall) + b"".join(
        snap.encode_entry(k, e, mono, wall) or b"" for k, e in cache.entries.items()
    ) + snap.encode_end(len(cache))
    originals = set(snap.decode(blob))
    mutated = bytearray(blob)
    for _ in range(data.draw(st.integers(0, 6))):
        kind = data.draw(st.sampled_from(("set", "insert", "delete")))
        pos = data.draw(st.integers(0, max(len(mutated) - 1, 0)))
        if kind == "set" and mutated:
            mutated[pos] = data.draw(st.integers(0, 255))
        elif kind == "insert":
            mutated[pos:pos] = data.draw(st.binary(min_size=1, max_size=40))
        elif mutated:
            del mutated[pos : pos + data.draw(st.integers(1, 40))]
    mutated = mutated[: data.draw(st.integers(0, len(mutated)))]
    step = data.draw(st.integers(1, len(mutated) + 1))  # fed in chunks of this size
    dec = Decoder()
    got: list[snap.Record] = []
    try:
        for i in range(0, len(mutated), step):
            dec.feed(bytes(mutated[i : i + step]))
            got.extend(dec.records())
        dec.finish()
    except SnapshotError as exc:
        assert isinstance(exc, SidecarError) and exc.reason in snap.REASONS
    assert set(got) <= originals


async def test_any_chunking_of_the_file_decodes_the_same(tmp_path):
    clocks = Clocks()
    cache = new_cache(clocks)
    fill(cache, clocks, extra=20)
    data = (await saved(tmp_path, cache, clocks)).read_bytes()
    whole = list(snap.decode(data))
    for step in (1, 2, 3, 22, 23, 100, 1000):
        dec = Decoder()
        got: list[snap.Record] = []
        for i in range(0, len(data), step):
            dec.feed(data[i : i + step])
            got.extend(dec.records())
        dec.finish()
        assert got == whole and dec.complete and dec.offset == len(data)


# ---------------------------------------------------------------------- cache bounds


async def test_file_bigger_than_the_cache_loads_the_newest_that_fit(tmp_path):
    clocks = Clocks()
    cache = new_cache(clocks)
    keys = fill(cache, clocks, extra=46)
    path = await saved(tmp_path, cache, clocks)
    small, result = load(path, clocks, capacity=10)
    assert (result.stopped_reason, result.loaded, result.error) == ("full", 10, None)
    assert list(small.entries) == keys[-10:]  # the newest ten, in their original order
    assert small.evictions == 0
    limit = sum(entry_size(k, cache.entries[k]) for k in keys[-7:]) + 100
    tight, result = load(path, clocks, capacity=1000, memory=limit)
    assert result.stopped_reason == "full" and list(tight.entries) == keys[-7:]
    assert tight.bytes <= limit and tight.evictions == 0


async def test_entries_larger_than_the_cache_stores_are_skipped(tmp_path):
    clocks = Clocks()
    cache = new_cache(clocks)
    big_key = make_key("big.example.com", RRType.A)
    recs = [a("big.example.com", i) for i in range(60)]
    cache.put(big_key, build_entry(big_key, RRType.A, Answer(Rcode.NOERROR, recs), None,
                                   TtlPolicy(), clocks.m))
    keys = fill(cache, clocks)
    path = await saved(tmp_path, cache, clocks)
    small, result = load(path, clocks, memory=200_000)  # stores entries up to 832 bytes
    assert result.skipped_large == 1 and result.loaded == 4 and list(small.entries) == keys


# ---------------------------------------------------------------------- saving


async def test_failed_rename_leaves_the_old_snapshot_and_logs_one_line(tmp_path, monkeypatch,
                                                                       caplog):
    clocks = Clocks()
    cache = new_cache(clocks)
    keys = fill(cache, clocks)
    path = tmp_path / "cache.snap"
    store = SnapshotStore(path, 0, cache, wall=clocks.wall)
    assert (await store.save()).ok
    before = path.read_bytes()
    cache.delete(keys[0])

    def no_rename(src, dst):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(store_mod.os, "replace", no_rename)
    with caplog.at_level(logging.INFO, "sidecar.snapshot"):
        result = await store.save()
    assert not result.ok and "Permission denied" in (result.error or "")
    lines = [r for r in caplog.records if r.name == "sidecar.snapshot"]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["cache.snap"]
    stats = store.stats()
    assert stats["saves"] == 1 and stats["save_errors"] == 1
    assert stats["last_save_bytes"] == len(before)  # the last good save's numbers
    monkeypatch.undo()
    assert len(load(path, clocks)[0].entries) == 4  # still the old snapshot


async def test_disk_full_while_writing_leaves_the_old_snapshot(tmp_path, monkeypatch):
    clocks = Clocks()
    cache = new_cache(clocks)
    fill(cache, clocks, extra=10)
    path = tmp_path / "cache.snap"
    store = SnapshotStore(path, 0, cache, wall=clocks.wall)
    assert (await store.save()).ok
    before = path.read_bytes()

    def full(fd, buffers):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_mod.os, "writev", full)
    result = await store.save()
    assert not result.ok and "No space" in (result.error or "")
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["cache.snap"]


async def test_save_into_a_missing_folder_fails_softly(tmp_path):
    clocks = Clocks()
    cache = new_cache(clocks)
    fill(cache, clocks)
    store = SnapshotStore(tmp_path / "nope" / "cache.snap", 0, cache, wall=clocks.wall)
    result = await store.save()
    assert not result.ok and store.stats()["save_errors"] == 1
    assert store.stats()["last_save_age"] is None


async def test_save_yields_to_the_loop_between_slices(tmp_path, monkeypatch):
    clocks = Clocks()
    cache = new_cache(clocks, capacity=5000)
    fill(cache, clocks, extra=3000)
    store = SnapshotStore(tmp_path / "cache.snap", 0, cache, wall=clocks.wall,
                          slice_seconds=0)
    encoded = 0
    real_encode = store_mod.encode_entry

    def counting_encode(*args):
        nonlocal encoded
        encoded += 1
        return real_encode(*args)

    monkeypatch.setattr(store_mod, "encode_entry", counting_encode)
    seen: set[int] = set()  # how far the encoding was each time other work ran
    done = False

    async def other_work() -> None:
        while not done:
            seen.add(encoded)
            await asyncio.sleep(0)

    task = asyncio.get_running_loop().create_task(other_work())
    result = await store.save()
    done = True
    await task
    assert result.ok and result.entries == encoded == 3004
    midway = {n for n in seen if 0 < n < encoded}
    assert len(midway) >= 3004 // store_mod.SLICE_CHECK - 1  # it ran between every slice


async def test_entries_the_format_cannot_hold_are_left_out_not_fatal(tmp_path):
    clocks = Clocks()
    cache = new_cache(clocks)
    keys = fill(cache, clocks)
    odd = make_key("odd.example.com", RRType.A)
    cache.put(odd, new_entry(0, 5, 0, 0, b"x" * 20, (6,), clocks.m, 60.0))  # 5 records?
    odder = make_key("odder.example.com", RRType.A)
    cache.put(odder, new_entry(0, 1, 0, 0, b"x" * 20, (30,), clocks.m, 60.0))  # TTL at 30?
    keys += fill(cache, clocks, extra=3)[4:]
    path = tmp_path / "cache.snap"
    result = await SnapshotStore(path, 0, cache, wall=clocks.wall).save()
    assert result.ok and result.entries == 7 and result.skipped == 2
    loaded, lr = load(path, clocks)
    assert lr.stopped_reason == "complete" and list(loaded.entries) == keys


async def test_cache_changing_during_a_save_is_fine(tmp_path):
    clocks = Clocks()
    cache = new_cache(clocks, capacity=5000)
    keys = fill(cache, clocks, extra=2000)
    store = SnapshotStore(tmp_path / "cache.snap", 0, cache, wall=clocks.wall,
                          slice_seconds=0)
    done = False

    async def churn() -> None:
        i = 0
        while not done:
            cache.delete(keys[i % len(keys)])
            k = make_key(f"new{i}.example.net", RRType.A)
            cache.put(k, build_entry(k, RRType.A, Answer(Rcode.NOERROR, [a("x.y", 1)]), None,
                                     TtlPolicy(), clocks.m))
            i += 1
            await asyncio.sleep(0)

    task = asyncio.get_running_loop().create_task(churn())
    result = await store.save()
    done = True
    await task
    assert result.ok
    loaded, lr = load(tmp_path / "cache.snap", clocks, capacity=5000)
    assert lr.stopped_reason == "complete" and lr.loaded == result.entries > 0


async def test_concurrent_and_cancelled_saves_run_one_at_a_time(tmp_path):
    clocks = Clocks()
    cache = new_cache(clocks, capacity=5000)
    fill(cache, clocks, extra=2000)
    path = tmp_path / "cache.snap"
    store = SnapshotStore(path, 0, cache, wall=clocks.wall, slice_seconds=0)
    first, second = await asyncio.gather(store.save(), store.save())
    assert first.ok and second.ok and store.saves == 2
    caller = asyncio.get_running_loop().create_task(store.save())
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert (await store.save()).ok  # waits for the cancelled caller's save, then saves
    assert store.saves == 4 and sorted(os.listdir(tmp_path)) == ["cache.snap"]
    assert load(path, clocks, capacity=5000)[1].loaded == 2004


async def test_run_saves_periodically_and_not_at_all_for_zero(tmp_path):
    clocks = Clocks()
    cache = new_cache(clocks)
    fill(cache, clocks)
    idle = SnapshotStore(tmp_path / "idle.snap", 0, cache, wall=clocks.wall)
    await asyncio.wait_for(idle.run(), 5)  # returns at once
    assert idle.saves == 0
    store = SnapshotStore(tmp_path / "cache.snap", 0.01, cache, wall=clocks.wall)
    two = asyncio.Event()
    real_save = store.save

    async def counting_save():
        result = await real_save()
        if store.saves >= 2:
            two.set()
        return result

    store.save = counting_save  # type: ignore[method-assign]
    task = asyncio.get_running_loop().create_task(store.run())
    await asyncio.wait_for(two.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert store.saves >= 2 and store.save_errors == 0


async def test_stats(tmp_path):
    clocks = Clocks()
    cache = new_cache(clocks)
    fill(cache, clocks)
    store = SnapshotStore(tmp_path / "cache.snap", 0, cache, wall=clocks.wall)
    assert store.stats()["last_save_age"] is None and store.stats()["saves"] == 0
    result = await store.save()
    clocks.advance(12)
    s = store.stats()
    assert s["last_save_age"] == pytest.approx(12)
    assert s["last_save_bytes"] == result.bytes == (tmp_path / "cache.snap").stat().st_size
    assert s["last_save_entries"] == 4 and s["saves"] == 1 and s["save_errors"] == 0
    fresh = new_cache(clocks)
    loader = SnapshotStore(tmp_path / "cache.snap", 0, fresh, wall=clocks.wall)
    loader.load()
    clocks.advance(3)
    s = loader.stats()
    assert s["entries_loaded"] == 4 and s["load_error"] is None
    assert s["last_save_age"] is None and s["snapshot_age"] == pytest.approx(15)
    assert set(s) >= {"entries_loaded", "last_save_age", "last_save_seconds",
                      "last_save_bytes", "saves", "save_errors", "load_error"}


# ---------------------------------------------------------------------- replies


class _NoMisses:
    max_inflight = 16

    def prefetch(self, key, entry):  # pragma: no cover - no prefetch is armed here
        raise AssertionError("no prefetch expected")


def _ask(handler: QueryHandler, name: str, qtype: str, edns: bool) -> bytes:
    q = dns.message.make_query(name, dns.rdatatype.from_text(qtype),
                               use_edns=0 if edns else False)
    q.id = 4321
    reply = handler.handle(q.to_wire(), "127.0.0.1", False)
    assert isinstance(reply, bytes)
    return reply


def _without_ttls(reply: bytes, e: tuple) -> tuple[bytes, list[int]]:
    qend = reply.index(b"\x00", 12) + 5
    buf = bytearray(reply)
    found = []
    for off in e[OFFSETS]:
        found.append(struct.unpack_from(">I", buf, qend + off)[0])
        buf[qend + off : qend + off + 4] = b"\x00\x00\x00\x00"
    return bytes(buf), found


async def test_replies_from_loaded_entries_match_apart_from_ttls(tmp_path):
    cache = Cache(1000)  # the process's monotonic clock: the handler reads it
    now = time.monotonic()
    keys = []
    for name, qtype, answer in shapes():
        key = make_key(name, qtype)
        cache.put(key, build_entry(key, qtype, answer, None, TtlPolicy(), now - 5))
        keys.append(key)
    before = QueryHandler(cache, _NoMisses())  # type: ignore[arg-type]
    asked = [(n, RRType(t).name, edns) for n, t, _ in shapes() for edns in (0, 1)]
    replies = [_ask(before, n, t, bool(e)) for n, t, e in asked]
    path = tmp_path / "cache.snap"
    assert (await SnapshotStore(path, 0, cache).save()).ok
    loaded = Cache(1000)
    assert SnapshotStore(path, 0, loaded).load().loaded == 4
    after = QueryHandler(loaded, _NoMisses())  # type: ignore[arg-type]
    for (n, t, e), old in zip(asked, replies, strict=True):
        new = _ask(after, n, t, bool(e))
        entry = loaded.entries[make_key(n, dns.rdatatype.from_text(t))]
        old_bytes, old_ttls = _without_ttls(old, entry)
        new_bytes, new_ttls = _without_ttls(new, entry)
        assert new_bytes == old_bytes
        assert all(o - 2 <= x <= o for o, x in zip(old_ttls, new_ttls, strict=True))
        msg = dns.message.from_wire(new)
        assert msg.id == 4321 and msg.question[0].name.to_text().rstrip(".") == n
    assert loaded.entries[keys[0]][AGE] >= 0


def test_load_from_a_missing_folder_says_saves_will_fail(tmp_path, caplog):
    clocks = Clocks()
    store = SnapshotStore(tmp_path / "nope" / "cache.snap", 0, new_cache(clocks),
                          wall=clocks.wall)
    with caplog.at_level(logging.INFO, logger="sidecar.snapshot"):
        result = store.load()
    assert result.loaded == 0 and "does not exist" in (result.error or "")
    (line,) = [r for r in caplog.records if r.name == "sidecar.snapshot"]
    assert line.levelno == logging.WARNING and "save will fail" in line.getMessage()


def test_load_removes_temporary_files_of_killed_saves_only_when_stale(tmp_path):
    path = tmp_path / "cache.snap"
    stale, fresh = tmp_path / ".cache.snap.1.aa.tmp", tmp_path / ".cache.snap.1.bb.tmp"
    other = tmp_path / ".other.snap.1.cc.tmp"
    for f in (stale, fresh, other):
        f.write_bytes(b"x")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    os.utime(other, (old, old))
    clocks = Clocks()
    SnapshotStore(path, 0, new_cache(clocks), wall=clocks.wall).load()
    assert not stale.exists() and fresh.exists() and other.exists()
