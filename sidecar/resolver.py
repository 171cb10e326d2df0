"""The miss path: coalesce, bound what is in flight, ask the pools, encode and cache.

Also serve-stale (RFC 8767) and prefetch. The hot path (``handler``) only calls in here when
the cache has no fresh entry, or to start a prefetch.
"""

from __future__ import annotations

import asyncio
import logging
import time

from .cache import EXPIRES, RCODE, Cache, RawEntry
from .coalesce import Coalescer
from .encode import TtlPolicy, build_entry, servfail_entry
from .errors import ResolveFailed
from .inflight import Slots
from .pool import PoolSet
from .scrub import ScrubPolicy, scrub
from .soa import SoaFinder
from .wire import NXDOMAIN, SERVFAIL, key_type, qname_text

log = logging.getLogger("sidecar.resolver")

#: After a failed refresh, stale answers are served at once for this long before the
#: upstreams are asked again (RFC 8767's "failure recheck", which it bounds at 5 minutes).
STALE_RECHECK = 5.0


class Resolver:
    """``lookup(key)`` / ``await resolve(key)`` -> (entry, stale). Never raises: failures
    become SERVFAIL."""

    def __init__(self, cache: Cache, pools: PoolSet, policy: TtlPolicy, *,
                 max_inflight: int = 1024, budget: float = 4.0, serve_stale: int = 0,
                 scrub_policy: ScrubPolicy | None = None) -> None:
        self.cache = cache
        self.scrub_policy = scrub_policy or ScrubPolicy()
        self.pools = pools
        self.policy = policy
        self.serve_stale = serve_stale
        self.budget = budget
        self.coalescer: Coalescer[tuple[RawEntry, bool]] = Coalescer()
        self.soa = SoaFinder(pools)
        self._slots = Slots(max_inflight)
        self.max_inflight = max_inflight
        self.waiting = 0          # fetches queued for a slot right now
        self.shed = 0             # fetches that waited a whole budget for a slot
        self.failed = 0           # fetches that ended in SERVFAIL
        self._recheck: dict[bytes, float] = {}

    @property
    def inflight(self) -> int:
        return len(self.coalescer)

    def lookup(self, key: bytes) -> asyncio.Future[tuple[RawEntry, bool]]:
        """A future of ``(entry, stale)`` for ``key``: the fetch in flight for it (shared
        with other callers: add a done callback or await it through ``asyncio.shield``,
        never cancel it), or a finished future inside a serve-stale recheck window. Read
        the result with :meth:`outcome`."""
        if self.serve_stale:
            until = self._recheck.get(key)
            if until is not None:
                if until > time.monotonic():
                    old = self._usable_stale(key)
                    if old is not None:
                        done = asyncio.get_running_loop().create_future()
                        done.set_result((old, True))
                        return done
                del self._recheck[key]
        return self.coalescer.join(key, lambda: self._fetch(key))

    def outcome(self, fut: asyncio.Future[tuple[RawEntry, bool]]) -> tuple[RawEntry, bool]:
        """The ``(entry, stale)`` of a finished :meth:`lookup`, counting a stale answer as
        served (once per caller)."""
        entry, stale = fut.result()
        if stale:
            self.cache.stale_served += 1
        return entry, stale

    async def resolve(self, key: bytes) -> tuple[RawEntry, bool]:
        """``await`` form of :meth:`lookup` + :meth:`outcome`; cancelling it leaves the fetch
        running for the others."""
        fut = self.lookup(key)
        await asyncio.shield(fut)
        return self.outcome(fut)

    async def close(self) -> None:
        """Cancel every fetch in flight (after the listeners drained) and wait for them."""
        tasks = list(self.coalescer.inflight.values())
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def prefetch(self, key: bytes, entry: RawEntry) -> None:
        """Refresh ``key`` in the background (once per entry; joins a fetch in flight)."""
        self.cache.no_prefetch(key, entry)
        if self.coalescer.joinable(key):
            return
        self.cache.prefetched += 1
        self.coalescer.join(key, lambda: self._fetch(key))

    def _usable_stale(self, key: bytes) -> RawEntry | None:
        old = self.cache.entries.get(key)
        if old is None or old[RCODE] == SERVFAIL:
            return None
        now = time.monotonic()
        if old[EXPIRES] <= now < old[EXPIRES] + self.serve_stale:
            return old
        return None

    async def _fetch(self, key: bytes) -> tuple[RawEntry, bool]:
        try:
            return await self._fetch_inner(key)
        except Exception:
            log.exception("miss path failed for %r", key)
            self.failed += 1
            return servfail_entry(time.monotonic(), self.policy), False

    async def _fetch_inner(self, key: bytes) -> tuple[RawEntry, bool]:
        name = qname_text(key)
        qtype = key_type(key)
        if not self._slots.take():
            self.waiting += 1
            try:
                got = await self._slots.wait(self.budget)
            finally:
                self.waiting -= 1
            if not got:
                self.shed += 1
                log.warning("upstream concurrency bound (%d) full for %.1fs: SERVFAIL for %s",
                            self.max_inflight, self.budget, name)
                return self._failure(key, "shed")
        try:
            pool = self.pools.pool_for(name)
            try:
                answer = await pool.query(name, qtype)
            except ResolveFailed as exc:
                return self._failure(key, exc.kind)
            answer = scrub(name, qtype, answer, self.scrub_policy)
            soa = None
            # (the last record first: a positive answer skips the generator)
            cname_only = (qtype != 5 and answer.answer and answer.answer[-1].type == 5
                          and all(r.type == 5 for r in answer.answer))
            negative = answer.rcode == NXDOMAIN or not answer.answer or cname_only
            if negative and not any(r.type == 6 for r in answer.authority):
                # No SOA came with the negative answer: learn it (soa.py), RFC 2308.
                target = name
                if cname_only:
                    target = qname_text(answer.answer[-1].rdata).lower()
                soa = await self.soa.find(target, include_self=answer.rcode != NXDOMAIN)
        finally:
            self._slots.release()
        now = time.monotonic()
        entry = build_entry(key, qtype, answer, soa, self.policy, now, name)
        if entry[EXPIRES] > now:
            self.cache.put(key, entry)
        else:
            self.cache.delete(key)
        self._recheck.pop(key, None)
        return entry, False

    def _failure(self, key: bytes, kind: str) -> tuple[RawEntry, bool]:
        self.failed += 1
        if self.serve_stale:
            old = self._usable_stale(key)
            if old is not None:
                if len(self._recheck) > 100_000:
                    self._recheck.clear()
                self._recheck[key] = time.monotonic() + STALE_RECHECK
                return old, True
        entry = servfail_entry(time.monotonic(), self.policy)
        if self.policy.servfail_ttl > 0 and not (self.serve_stale and key in self.cache.entries):
            self.cache.put(key, entry)
        return entry, False
