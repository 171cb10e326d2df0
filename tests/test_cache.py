"""The cache's bound and eviction order (CLOCK), on the Cache object itself."""

from __future__ import annotations

from sidecar.cache import Cache, new_entry


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
