"""The cache's bounds (entries and bytes) and eviction order (CLOCK), on the Cache object."""

from __future__ import annotations

import random
import time
import tracemalloc

import pytest

from sidecar.dns import cache as cache_mod
from sidecar.dns.cache import STORED, Cache, entry_size, new_entry
from sidecar.testing.clock import OffsetClock


def _entry() -> tuple:
    return new_entry(0, 0, 0, 0, b"", (), 0.0, 60.0)


def test_used_entries_survive_and_unused_go_first() -> None:
    c = Cache(3)
    for k in (b"a", b"b", b"c"):
        c.put(k, _entry())
    c.used.add(b"a")  # what a hit does
    c.put(b"d", _entry())
    assert set(c.entries) == {b"a", b"c", b"d"} and c.evictions == 1
    c.put(b"e", _entry())  # c: older than a's new place in the queue, never used
    assert set(c.entries) == {b"a", b"d", b"e"}
    c.put(b"f", _entry())  # d is now the oldest unused one
    assert set(c.entries) == {b"a", b"e", b"f"}
    c.put(b"g", _entry())  # a's second chance is spent: it goes like any other
    assert set(c.entries) == {b"e", b"f", b"g"}


def test_bound_holds_under_delete_and_reinsert_churn() -> None:
    c = Cache(100)
    for i in range(20_000):
        k = b"k%d" % (i % 150)
        c.put(k, _entry())
        if i % 3 == 0:
            c.delete(b"k%d" % ((i * 7) % 150))
        if i % 5 == 0 and k in c.entries:
            c.used.add(k)  # a hit
        assert len(c.entries) <= 100
    # the insertion queue does not grow without bound with stale slots
    assert len(c.queue) <= 2 * len(c.entries) + 1024
    assert c.used <= set(c.entries)  # no mark outlives its entry
    c.clear()
    assert not c.entries and not c.queue and not c.used


# ------------------------------------------------------------------ the byte bound


def _sized(n: int, offsets: tuple[int, ...] = (6,)) -> tuple:
    return new_entry(0, 1, 0, 0, b"x" * max(n, 10), offsets, 0.0, 60.0)


def _accounted(c: Cache) -> int:
    return sum(entry_size(k, e) for k, e in c.entries.items())


def test_bytes_follow_every_change() -> None:
    # Both bounds are reached in turn: 3,000 keys of ~900 bytes exceed the 1.5 MB.
    clock = OffsetClock()
    c = Cache(2_000, memory_limit=1_500_000, clock=clock)
    rng = random.Random(7)
    for i in range(20_000):
        k = b"\x05n%04d\x00\x00\x01\x00\x01" % rng.randrange(3_000 if i < 10_000 else 2_500)
        op = rng.randrange(10)
        if op < 5:
            assert c.put(k, _sized(rng.randrange(0, 1_100)))
        elif op == 5:
            c.delete(k)
        elif op == 6 and k in c.entries:
            c.used.add(k)
            c.rendered_body(k, c.entries[k], rng.randrange(1, 50))  # what a hit does
        elif op == 7:
            c.delete_name(k[:-4])
        elif op == 8 and i % 5_000 == 0:
            c.clear()
        elif k in c.entries:
            clock.advance(1.0)  # a second later, a hit re-renders the entry at its new age
            e = c.entries[k]
            c.rendered_body(k, e, int(clock() - e[STORED]))
            c.no_prefetch(k, c.entries[k])
        assert c.bytes <= c.memory_limit and len(c.entries) <= c.capacity
        if i % 100 == 0:
            assert c.bytes == _accounted(c)
    assert c.bytes == _accounted(c) and c.evictions > 1_000


def test_the_byte_bound_evicts_before_the_entry_bound() -> None:
    c = Cache(100_000, memory_limit=1_000_000)
    for i in range(3_000):
        c.put(b"name%d" % i, _sized(500))
    size = entry_size(b"name0", _sized(500))
    assert c.bytes <= 1_000_000 and abs(len(c.entries) - 1_000_000 // size) <= 5
    assert c.evictions == 3_000 - len(c.entries)
    assert b"name2999" in c.entries and b"name0" not in c.entries  # oldest go first


def test_answers_too_large_are_not_stored() -> None:
    big = _sized(61_000)  # a 61 KB TXT answer
    small = Cache(100, memory_limit=8 * 1024 * 1024)
    assert small.max_entry_bytes < 61_000
    small.put(b"t", _sized(100))
    assert small.put(b"t", big) is False
    assert b"t" not in small.entries and small.bytes == 0 and small.too_large == 1
    large = Cache(100, memory_limit=256 * 1024 * 1024)
    assert large.put(b"t", big) and large.bytes == entry_size(b"t", big)


def test_accounted_bytes_match_what_python_allocates() -> None:
    # The accounting must not undercount (the bound would be a lie) nor overcount much.
    n = 20_000
    c = Cache(n * 2, memory_limit=1 << 40)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(n):
            key = b"\x04host" + str(i).encode() + b"\x07example\x03com\x00\x00\x01\x00\x01"
            body = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x01\x2c\x00\x04" + i.to_bytes(4, "big")
            c.put(key, new_entry(0, 1, 0, 0, body * (1 + i % 8), (6,), float(i), 300.0))
        for k in list(c.entries)[::3]:
            c.used.add(k)
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert used <= c.bytes <= 1.5 * used, (used, c.bytes)


def test_interning_table_is_bounded_in_bytes() -> None:
    for i in range(5_000):
        cache_mod._intern(tuple(range(i, i + 1 + i % 400)))  # distinct offset tuples
    assert cache_mod._interned_bytes <= cache_mod.INTERN_MAX_BYTES
    est = sum(cache_mod._intern_size(v) for v in cache_mod._interned)
    assert est == cache_mod._interned_bytes
    huge = tuple(range(10_000))
    assert cache_mod._intern(huge) is huge and huge not in cache_mod._interned


def test_the_cache_clock_is_injected_and_an_offset_clock_only_moves_forward() -> None:
    assert Cache(1).clock is time.monotonic
    clock = OffsetClock()
    c = Cache(1, clock=clock)
    assert c.clock is clock
    before = clock()
    clock.advance(30.0)
    assert clock() - before >= 30.0 - 1e-6 and clock.offset == 30.0  # float sums
    with pytest.raises(ValueError):
        clock.advance(-1.0)
    e = cache_mod.Entry._make(new_entry(0, 0, 0, 0, b"", (), before, 60.0))
    assert e.ttl_at(before) == 60 and e.remaining(before + 70.0) == pytest.approx(-10.0)
    assert e.ttl_at(before + 70.0) == 0
