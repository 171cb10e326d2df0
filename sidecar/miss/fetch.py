"""The miss path: coalesce, bound what is in flight, ask the pools, encode and cache.

Also serve-stale (RFC 8767) and prefetch. The hot path (``handler``) only calls in here when
the cache has no fresh entry, or to start a prefetch.
"""

from __future__ import annotations

import asyncio
import logging
import time

from sidecar.dns.cache import EXPIRES, RCODE, Cache, RawEntry
from sidecar.dns.wire import NXDOMAIN, SERVFAIL, key_type, qname_text
from sidecar.errors import ResolveFailed
from sidecar.miss.coalesce import Coalescer
from sidecar.miss.entry import TtlPolicy, build_entry, servfail_entry
from sidecar.miss.inflight import Slots, ZoneSlots, zone_key
from sidecar.miss.scrub import ScrubPolicy, scrub
from sidecar.miss.soa import SoaFinder
from sidecar.upstream.pool import PoolSet
from sidecar.upstream.records import Answer, Rec

log = logging.getLogger("sidecar.resolver")

#: After a failed refresh, stale answers are served at once for this long before the
#: upstreams are asked again (RFC 8767's "failure recheck", which it bounds at 5 minutes).
STALE_RECHECK = 5.0

#: Fetches that may wait for an in-flight slot, per ``--max-inflight`` slot (with a floor):
#: beyond that a miss is answered SERVFAIL at once instead of parking memory in a queue
#: that cannot drain in time anyway.
QUEUE_PER_SLOT = 2
QUEUE_MIN = 256
#: Longest a fetch waits for a slot: this share of the budget (timeout x tries), floored.
#: A client's stub gives up long before a whole budget spent queueing plus a whole budget
#: spent asking; a SERVFAIL it still reads is better than a retransmission into the queue.
QUEUE_WAIT_SHARE = 0.25
QUEUE_WAIT_MIN = 1.5
#: One zone (:func:`~sidecar.miss.inflight.zone_key`) holds at most 1/ZONE_SHARE of the slots, so
#: a flood under one zone always leaves the rest for others.
ZONE_SHARE = 2
#: A zone with fetches running longer than the slow threshold (a dead or very slow zone)
#: starts no new fetch while it holds 1/SLOW_ZONE_SHARE of the slots: those misses are
#: answered SERVFAIL at once (Unbound's jostle-timeout and dnsmasq's per-server limit, per
#: zone). A zone that answers never counts as slow, whatever its burst.
SLOW_ZONE_SHARE = 16
#: Jostling (Unbound's jostle-timeout): when every slot is taken, a new fetch ends the oldest
#: one that has been asking upstream longer than this share of the per-try timeout (with a
#: floor) and takes its slot. Unbound's 200 ms suits its own queries to authoritative servers;
#: ours go to recursive resolvers, which legitimately take several authoritative round trips
#: for a cold name, so the floor only applies to short ``--timeout`` settings. The value is a
#: floor on the age of what is ended, not the age itself: the oldest fetch goes first, so a
#: fetch is ended only once every older one is gone.
JOSTLE_SHARE = 0.25
JOSTLE_MIN = 0.2


class Resolver:
    """``lookup(key)`` / ``await resolve(key)`` -> (entry, stale). Never raises: failures
    become SERVFAIL."""

    def __init__(self, cache: Cache, pools: PoolSet, policy: TtlPolicy, *,
                 max_inflight: int = 1024, budget: float = 4.0, serve_stale: int = 0,
                 scrub_policy: ScrubPolicy | None = None, max_waiting: int | None = None,
                 queue_wait: float | None = None, zone_limit: int | None = None,
                 slow_zone_limit: int | None = None, slow_after: float | None = None,
                 jostle_after: float | None = None) -> None:
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
        #: Bound on ``waiting`` (fetches queued for a global or a zone slot).
        self.max_waiting = (max_waiting if max_waiting is not None
                            else max(QUEUE_MIN, QUEUE_PER_SLOT * max_inflight))
        #: Longest wait for a slot (global and zone waits together) before SERVFAIL.
        self.queue_wait = (queue_wait if queue_wait is not None
                           else min(budget, max(QUEUE_WAIT_MIN, budget * QUEUE_WAIT_SHARE)))
        #: Fetches in flight per zone, at most.
        self.zone_limit = (zone_limit if zone_limit is not None
                           else max(min(max_inflight, 4), max_inflight // ZONE_SHARE))
        #: Fetches waiting for one zone's slots, at most: a flood under one zone cannot
        #: fill the whole queue.
        self.zone_max_waiting = max(self.zone_limit, QUEUE_MIN // 4)
        #: Fetches in flight for a zone that has slow ones, beyond which it is shed.
        self.slow_zone_limit = (slow_zone_limit if slow_zone_limit is not None
                                else max(1, max_inflight // SLOW_ZONE_SHARE))
        timeout = getattr(getattr(pools, "default", None), "timeout", budget / 2)
        #: A zone with a fetch still unanswered after this long is slow.
        self.slow_after = (slow_after if slow_after is not None
                           else min(1.0, max(0.2, timeout / 2)))
        #: Under pressure, a fetch asking upstream longer than this may be ended for a new one.
        self.jostle_after = (jostle_after if jostle_after is not None
                             else max(JOSTLE_MIN, timeout * JOSTLE_SHARE))
        self._zones: dict[str, ZoneSlots] = {}
        #: The fetches that may be jostled: token -> (start, task), oldest first (a dict keeps
        #: insertion order, so the candidate is the first item; no timer per fetch).
        self._asking: dict[int, tuple[float, asyncio.Task]] = {}
        #: Jostled fetches whose slot already belongs to the fetch that jostled them.
        self._jostled: set[int] = set()
        self._seq = 0
        self.waiting = 0          # fetches queued for a slot right now
        self.waiting_peak = 0     # the most that were ever queued at once
        self.shed = 0             # fetches answered SERVFAIL without an upstream query
        self.shed_full = 0        # ... because the waiting queue was full
        self.shed_wait = 0        # ... because no slot came within queue_wait
        self.shed_zone = 0        # ... because their zone was slow and at its limit
        self.jostled = 0          # fetches ended (SERVFAIL) to give their slot to a new one
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
        zkey = zone_key(name)
        zones = self._zones
        zone = zones.get(zkey)
        if zone is None:
            zone = zones[zkey] = ZoneSlots(self.zone_limit)
        try:
            return await self._fetch_in_zone(key, name, zone)
        finally:
            if zone.idle and zones.get(zkey) is zone:
                del zones[zkey]

    async def _fetch_in_zone(self, key: bytes, name: str, zone: ZoneSlots
                             ) -> tuple[RawEntry, bool]:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if zone.held >= self.slow_zone_limit and zone.slow_since(now - self.slow_after):
            return self._shed(key, name, "zone")
        deadline = now + self.queue_wait
        if not zone.take():
            if self.waiting >= self.max_waiting or zone.waiting >= self.zone_max_waiting:
                return self._shed(key, name, "full")
            if not await self._wait(zone, self.queue_wait):
                return self._shed(key, name, "wait")
            if (zone.held > self.slow_zone_limit
                    and zone.slow_since(loop.time() - self.slow_after)):
                zone.release()
                return self._shed(key, name, "zone")
        try:
            slots = self._slots
            if not slots.take() and not (slots.free == 0 and self._jostle(loop.time())):
                if self.waiting >= self.max_waiting:
                    return self._shed(key, name, "full")
                if not await self._wait(slots, max(0.0, deadline - loop.time())):
                    return self._shed(key, name, "wait")
            self._seq = token = self._seq + 1
            zone.started[token] = now = loop.time()
            task = asyncio.current_task()
            self._asking[token] = (now, task)  # type: ignore[assignment]
            jostled = False
            try:
                answer, soa = await self._ask(name, key_type(key), token)
            except asyncio.CancelledError:
                if token not in self._jostled:
                    raise
                # Ended by _jostle: answer our clients now instead of going silent (a
                # cancelled fetch means no reply); still raise if shutdown cancels us too.
                if task is not None and task.uncancel() > 0:
                    raise
                jostled = True
            finally:
                del zone.started[token]
                if token in self._jostled:
                    self._jostled.discard(token)  # the slot is the jostler's now
                else:
                    self._asking.pop(token, None)
                    slots.release()
        finally:
            zone.release()
        if jostled:
            self.jostled += 1
            log.warning("all %d upstream slots busy: ended %s after %.2fs for a newer query",
                        self.max_inflight, name, loop.time() - now)
            return self._failure(key, "jostled", store=False)
        if answer is None:
            return self._failure(key, str(soa))
        now = time.monotonic()
        entry = build_entry(key, key_type(key), answer, soa, self.policy, now, name)
        if entry[EXPIRES] > now:
            self.cache.put(key, entry)
        else:
            self.cache.delete(key)
        self._recheck.pop(key, None)
        return entry, False

    def _jostle(self, now: float) -> bool:
        """End the oldest fetch asking upstream since before ``now - jostle_after`` and hand
        its slot to the caller (True); False when there is none that old. The ended fetch
        answers SERVFAIL (see ``_fetch_in_zone``); its upstream tries run on by themselves."""
        asking = self._asking
        oldest = next(iter(asking.items()), None)
        if oldest is None:
            return False
        token, (started, task) = oldest
        if started > now - self.jostle_after:
            return False
        del asking[token]
        self._jostled.add(token)
        task.cancel()
        return True

    async def _wait(self, slots: Slots, timeout: float) -> bool:
        self.waiting += 1
        if self.waiting > self.waiting_peak:
            self.waiting_peak = self.waiting
        try:
            return await slots.wait(timeout)
        finally:
            self.waiting -= 1

    async def _ask(self, name: str, qtype: int, token: int = 0
                   ) -> tuple[Answer | None, Rec | str | None]:
        """``(answer, soa)``: the upstream's answer and, for a negative one that came
        without, the SOA learned by at most one more query (on the same slots); or
        ``(None, kind)`` when no upstream answered."""
        pool = self.pools.pool_for(name)
        try:
            answer = await pool.query(name, qtype)
        except ResolveFailed as exc:
            return None, exc.kind
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
            # The answer is in: no longer jostled (the SOA query may be shared with other
            # fetches, and cancelling a fetch that waits for it would cancel it for all).
            self._asking.pop(token, None)
            soa = await self.soa.find(target, include_self=answer.rcode != NXDOMAIN)
        return answer, soa

    def _shed(self, key: bytes, name: str, why: str) -> tuple[RawEntry, bool]:
        """SERVFAIL (or a stale answer) without asking anyone, not cached: the overload is
        ours, not the name's."""
        self.shed += 1
        if why == "full":
            self.shed_full += 1
            log.warning("upstream queue full (%d waiting for %d slots): SERVFAIL for %s",
                        self.waiting, self.max_inflight, name)
        elif why == "wait":
            self.shed_wait += 1
            log.warning("no upstream slot (of %d) within %.1fs: SERVFAIL for %s",
                        self.max_inflight, self.queue_wait, name)
        else:
            self.shed_zone += 1
            log.warning("zone %s is slow and at its limit (%d in flight): SERVFAIL for %s",
                        zone_key(name), self.slow_zone_limit, name)
        return self._failure(key, "shed", store=False)

    def _failure(self, key: bytes, kind: str, store: bool = True) -> tuple[RawEntry, bool]:
        self.failed += 1
        if self.serve_stale:
            old = self._usable_stale(key)
            if old is not None:
                if len(self._recheck) > 100_000:
                    self._recheck.clear()
                self._recheck[key] = time.monotonic() + STALE_RECHECK
                return old, True
        entry = servfail_entry(time.monotonic(), self.policy)
        if store and self.policy.servfail_ttl > 0 and not (
                self.serve_stale and key in self.cache.entries):
            self.cache.put(key, entry)
        return entry, False
