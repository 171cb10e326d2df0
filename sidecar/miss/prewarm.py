"""Pre-warm: bounded bulk lookups into the cache, a service of the DNS side.

A batch goes through the miss path exactly like cache misses, so its fetches are coalesced
with live traffic and bounded by the miss path's slots as well as by :attr:`concurrency`.
The HTTP API (``POST /prewarm``) validates a request, asks :meth:`Prewarmer.admit`, runs
the batch and presents the entries; this service owns the bounds and the counters, so the
stats and metrics read them here without knowing HTTP.

Bounds across the batches in progress: :attr:`backlog` lookups admitted; :attr:`concurrency`
waiting on the miss path at once; results held within :attr:`response_budget` bytes (a
result that does not fit is left out and counted in ``omitted``). The serial passes yield
to the event loop every :data:`SLICE_SECONDS`, so DNS keeps being answered however large
the batch.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from sidecar.dns.cache import Cache, Entry, RawEntry
from sidecar.dns.types import RRType

#: Most lookups admitted across the batches in progress; one that would pass it while
#: others run is refused (a batch alone is always admitted).
PREWARM_BACKLOG = 40_000
#: Most pre-warm lookups waiting on the miss path at once, all batches together; never more
#: than a quarter of ``--max-inflight``, so live misses keep the rest of the slots.
PREWARM_CONCURRENCY = 256
#: Bytes of results the batches in progress may hold together.
PREWARM_RESPONSE_BUDGET = 32 * 1024 * 1024
#: Longest a serial pass runs without letting the event loop (and so DNS) run, in seconds.
SLICE_SECONDS = 0.002

T = TypeVar("T")


class Resolves(Protocol):
    """What pre-warm needs of the miss path: a coalesced fetch of one cache key."""

    async def resolve(self, key: bytes) -> tuple[RawEntry, bool]: ...


class Pacer:
    """Tells a long synchronous loop when it has run :data:`SLICE_SECONDS` and should let
    the event loop run (``await pause()``)."""

    __slots__ = ("_until",)

    def __init__(self) -> None:
        self._until = time.perf_counter() + SLICE_SECONDS

    def due(self) -> bool:
        return time.perf_counter() >= self._until

    async def pause(self) -> None:
        await asyncio.sleep(0)
        self._until = time.perf_counter() + SLICE_SECONDS


class Prewarmer:
    """Runs pre-warm batches into ``cache`` through ``resolver``.

    Counters: ``calls`` (batches finished), ``cached`` and ``resolved`` (lookups answered
    from a fresh entry or through the miss path), ``inflight`` (lookups of the batches in
    progress), ``held`` (bytes their results hold), ``omitted`` (results left out for the
    response budget), ``refused`` (batches refused for the backlog).
    """

    def __init__(self, cache: Cache, resolver: Resolves, *, max_inflight: int,
                 no_aaaa: bool = False) -> None:
        self.cache = cache
        self.resolver = resolver
        self.no_aaaa = no_aaaa
        self.backlog = PREWARM_BACKLOG
        self.response_budget = PREWARM_RESPONSE_BUDGET
        self.concurrency = max(1, min(PREWARM_CONCURRENCY, max_inflight // 4))
        self.slots = asyncio.Semaphore(self.concurrency)
        self.calls = 0
        self.cached = 0
        self.resolved = 0
        self.inflight = 0
        self.held = 0
        self.omitted = 0
        self.refused = 0

    def admit(self, lookups: int) -> bool:
        """Whether a batch of ``lookups`` may start now (counted in ``inflight`` until
        :meth:`done`); False (counted in ``refused``) when it would pass the backlog while
        other batches run."""
        if self.inflight and self.inflight + lookups > self.backlog:
            self.refused += 1
            return False
        self.inflight += lookups
        return True

    def finish(self, lookups: int, results: Sequence[object | None] | None, held: int) -> None:
        """A batch admitted for ``lookups`` ended: release it and the ``held`` bytes its
        results hold; ``results`` (None where left out) count it as done, None as failed."""
        self.inflight -= lookups
        self.held -= held
        if results is not None:
            self.omitted += sum(r is None for r in results)
            self.calls += 1

    async def run(self, keys: Sequence[bytes], qtypes: Sequence[int],
                  result: Callable[[int, Entry | None], T],
                  size: Callable[[T], int]) -> tuple[list[T | None], int]:
        """Look every ``keys[i]`` (of type ``qtypes[i]``) up, from the cache or through the
        miss path; ``result(i, entry)`` builds the caller's result as soon as the entry is
        there (entry None: ``--no-aaaa``'s local NODATA), so a batch holds results, never
        entries (which can be 64 KB each). Returns the results (None where the response
        budget left no room) and the bytes they hold (pass them to :meth:`finish`)."""
        n = len(keys)
        results: list[T | None] = [None] * n
        held = 0

        def take(i: int, entry: Entry | None) -> None:
            nonlocal held
            r = result(i, entry)
            s = size(r)
            if self.held + s > self.response_budget:
                return
            self.held += s
            held += s
            results[i] = r

        misses: list[int] = []
        cache = self.cache
        pacer = Pacer()
        now = cache.clock()
        for i in range(n):
            if qtypes[i] == RRType.AAAA and self.no_aaaa:
                take(i, None)  # --no-aaaa: the DNS path answers NODATA without asking anyone
                continue
            entry = cache.get(keys[i])
            if entry is not None and entry.expires > now:
                take(i, entry)
            else:
                misses.append(i)
            if pacer.due():
                await pacer.pause()
                now = cache.clock()
        self.cached += n - len(misses)
        self.resolved += len(misses)

        todo = iter(misses)
        slots = self.slots

        async def worker() -> None:
            for i in todo:
                async with slots:
                    raw, _stale = await self.resolver.resolve(keys[i])
                take(i, Entry._make(raw))

        workers = min(self.concurrency, len(misses))
        try:
            if workers:
                await asyncio.gather(*(worker() for _ in range(workers)))
        except BaseException:
            self.held -= held
            raise
        return results, held

    def stats(self) -> dict[str, int]:
        """The ``prewarm`` object of ``/stats``."""
        return {"calls": self.calls, "cached": self.cached, "resolved": self.resolved,
                "inflight": self.inflight, "omitted": self.omitted}
