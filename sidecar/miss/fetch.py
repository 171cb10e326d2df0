"""The miss path: coalesce, bound what is in flight, ask the pools, encode and cache.

Also serve-stale (RFC 8767) and prefetch. The hot path (``handler``) only calls in here when
the cache has no fresh entry, or to start a prefetch.

With a second level (the fleet's shared cache, :mod:`sidecar.miss.second`), a fetch asks it
first: a usable entry fills the local cache and no upstream is asked; otherwise the fleet's
lease decides whether this sidecar asks upstream or waits briefly for another's answer, and
an upstream answer is written back in the background.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from sidecar.dns.cache import EXPIRES, NEVER, PREFETCH_AT, RCODE, Cache, RawEntry
from sidecar.dns.types import Rcode, RRType
from sidecar.dns.wire import key_type, qname_text
from sidecar.errors import ResolveFailed
from sidecar.miss.coalesce import Coalescer
from sidecar.miss.entry import TtlPolicy, build_entry, servfail_entry
from sidecar.miss.inflight import Slots, ZoneSlots, zone_key
from sidecar.miss.outside import check_outside
from sidecar.miss.scrub import ScrubPolicy, scrub
from sidecar.miss.second import SecondLevel
from sidecar.miss.soa import SoaFinder
from sidecar.upstream.pool import PoolSet
from sidecar.upstream.records import Answer, Rec

log = logging.getLogger("sidecar.resolver")

# Plain ints for the per-miss comparisons (an IntEnum member costs more to compare).
NXDOMAIN = int(Rcode.NXDOMAIN)
SERVFAIL = int(Rcode.SERVFAIL)
_CNAME = int(RRType.CNAME)
_SOA = int(RRType.SOA)

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
#: What a plain miss costs, for the second level's lease waiters (which add their own round
#: trips): the p90 of how long this sidecar's misses to the pool take from start to answer
#: (those in flight counted at their age so far), at least the pool's recent p90 answer
#: time, within these bounds (the floor covers an unmeasured or very fast upstream; the
#: ceiling a waiter's patience with a dead holder).
LEASE_WAIT_MIN = 0.02
LEASE_WAIT_MAX = 1.0
#: That estimate is reused for this long (seconds) per pool.
PLAIN_MISS_REUSE = 0.01
#: Completed misses per pool the estimate remembers (the most recent).
MISS_TIMES = 256


class MissTimes:
    """How long this sidecar's misses to one pool take right now, from the start of the
    fetch to its answer: slot waits, the loop's own lag and an SOA query included, which a
    waiter's own miss would pay as well (the upstream's latency alone is measured from the
    packet out to the answer read, and under a burst it is a fraction of this).

    Misses still in flight count at their age so far: in a burst the first answers are the
    fast ones, and the samples of completed misses alone would say misses are quick exactly
    while most of them are still waiting. Every sample is a real miss's duration or a lower
    bound of it, so the percentile never exceeds what those misses take."""

    __slots__ = ("done", "asking")

    def __init__(self) -> None:
        self.done: deque[float] = deque(maxlen=MISS_TIMES)
        #: token -> start (event-loop time) of the misses in flight.
        self.asking: dict[int, float] = {}

    def percentile(self, q: float, now: float) -> float | None:
        samples = list(self.done)
        samples += [now - t for t in self.asking.values()]
        if not samples:
            return None
        samples.sort()
        return samples[min(len(samples) - 1, max(0, int(round(q * (len(samples) - 1)))))]


class Fetcher:
    """The miss path behind the handler: ``lookup(key)`` / ``await resolve(key)`` ->
    ``(entry, stale)``, ``prefetch(key, entry)``, ``close()``. Never raises: failures become
    SERVFAIL.

    Entry times (storage, expiry, prefetch, serve-stale windows, learned SOAs) are read from
    the cache's clock, so a test that moves that clock sees one consistent time; waits for
    slots and the ages of fetches in flight (jostling, slow zones) are event-loop time, as
    the I/O they bound is.
    """

    def __init__(self, cache: Cache, pools: PoolSet, policy: TtlPolicy, *,
                 max_inflight: int = 1024, budget: float = 4.0, serve_stale: int = 0,
                 scrub_policy: ScrubPolicy | None = None, max_waiting: int | None = None,
                 queue_wait: float | None = None, zone_limit: int | None = None,
                 slow_zone_limit: int | None = None, slow_after: float | None = None,
                 jostle_after: float | None = None,
                 second: SecondLevel | None = None) -> None:
        self.cache = cache
        #: The fleet's shared cache behind this one (None: none); may be set before start.
        self.second = second
        #: Monotonic seconds for everything tied to entry times (the cache's clock).
        self.clock: Callable[[], float] = getattr(cache, "clock", time.monotonic)
        self.scrub_policy = scrub_policy or ScrubPolicy()
        self.pools = pools
        self.policy = policy
        self.serve_stale = serve_stale
        self.budget = budget
        self.coalescer: Coalescer[tuple[RawEntry, bool]] = Coalescer()
        self.soa = SoaFinder(pools, clock=self.clock)
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
        self._asking: dict[int, tuple[float, asyncio.Task[Any]]] = {}
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
        #: Per pool (by id): (valid until, what a plain miss costs), for lease waiters.
        self._plain_miss: dict[int, tuple[float, float]] = {}
        #: Per pool (by id): how long its misses take (only with a second level).
        self._miss_times: dict[int, MissTimes] = {}

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
                if until > self.clock():
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
        now = self.clock()
        if old[EXPIRES] <= now < old[EXPIRES] + self.serve_stale:
            return old
        return None

    async def _fetch(self, key: bytes) -> tuple[RawEntry, bool]:
        try:
            second = self.second
            if second is not None:
                shared = await self._from_second(key, second)
                if shared is not None:
                    return shared, False
                late = second.late(key)
                if late is not None:
                    return await self._race(key, second, late)
            return await self._fetch_inner(key)
        except Exception:
            log.exception("miss path failed for %r", key)
            self.failed += 1
            return servfail_entry(self.clock(), self.policy), False

    async def _fetch_inner(self, key: bytes) -> tuple[RawEntry, bool]:
        name = qname_text(key)
        zkey = zone_key(name)
        zones = self._zones
        zone = zones.get(zkey)
        if zone is None:
            zone = zones[zkey] = ZoneSlots(self.zone_limit)
        times = None
        token, start = 0, 0.0
        if self.second is not None:  # only lease waiters ask how long misses take
            pool = id(self.pools.pool_for(name))
            times = self._miss_times.get(pool)
            if times is None:
                times = self._miss_times[pool] = MissTimes()
            self._seq = token = self._seq + 1
            times.asking[token] = start = asyncio.get_running_loop().time()
        try:
            result = await self._fetch_in_zone(key, name, zone)
            if times is not None and result[0][RCODE] != SERVFAIL:
                times.done.append(asyncio.get_running_loop().time() - start)
            return result
        finally:
            if times is not None:
                del times.asking[token]
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
            if task is not None:  # always, as a coalesced fetch runs as its own task
                self._asking[token] = (now, task)
            jostled = False
            failed: str | None = None
            try:
                answer, soa = await self._ask(name, key_type(key), token)
            except ResolveFailed as exc:
                failed = exc.kind
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
        if failed is not None:
            return self._failure(key, failed)
        now = self.clock()
        entry = build_entry(key, key_type(key), answer, soa, self.policy, now, name)
        if entry[EXPIRES] > now:
            self.cache.put(key, entry)
            if self.second is not None:
                self.second.put(key, entry)
        else:
            self.cache.delete(key)
        self._recheck.pop(key, None)
        return entry, False

    async def _race(self, key: bytes, second: SecondLevel,
                    late: asyncio.Future[RawEntry | None]) -> tuple[RawEntry, bool]:
        """Our own upstream answer or the holder's late one, whichever comes first and is
        usable: a wait that gave up just before the holder's value landed costs neither the
        client an upstream miss on top nor the fleet more than the query already sent."""
        own = asyncio.ensure_future(self._fetch_inner(key))
        try:
            await asyncio.wait((own, late), return_when=asyncio.FIRST_COMPLETED)
            theirs = (None if own.done() or late.cancelled() or late.exception() is not None
                      else late.result())
            if theirs is not None:
                entry = self._take_second(key, theirs, second)
                if entry is not None:
                    return entry, False  # ours is cancelled below: its slot is freed
            return await own
        finally:
            late.cancel()
            if not own.done():
                own.cancel()

    async def _from_second(self, key: bytes, second: SecondLevel) -> RawEntry | None:
        """The second level's entry for ``key``, now in the local cache; None: ask upstream."""
        entry = await second.lookup(key, lambda: self._lease_wait(key))
        return None if entry is None else self._take_second(key, entry, second)

    def _take_second(self, key: bytes, entry: RawEntry, second: SecondLevel) -> RawEntry | None:
        """``entry`` from the second level, checked and put in the local cache; None:
        unusable, or no fresher than ours."""
        now = self.clock()
        why = check_outside(key, entry, self.scrub_policy, self.policy, now)
        if why is not None:
            second.reject(key, why)
            return None
        old = self.cache.entries.get(key)
        if old is not None and old[EXPIRES] >= entry[EXPIRES]:
            return None  # a prefetch: the fleet has nothing fresher than ours
        if self.policy.prefetch and entry[EXPIRES] - now >= 10:
            entry = entry[:PREFETCH_AT] + (now + 0.9 * (entry[EXPIRES] - now),)
        elif entry[PREFETCH_AT] != NEVER:
            entry = entry[:PREFETCH_AT] + (NEVER,)
        self.cache.put(key, entry)
        self._recheck.pop(key, None)
        return entry

    def _lease_wait(self, key: bytes) -> float:
        """What resolving ``key`` ourselves would take now: the p90 of this sidecar's misses
        to its pool (:class:`MissTimes`), at least the fastest healthy upstream's recent p90
        (a quarter of the timeout before any answer), within the fetch budget."""
        pool = self.pools.pool_for(qname_text(key))
        now = asyncio.get_running_loop().time()
        cached = self._plain_miss.get(id(pool))
        if cached is not None and cached[0] > now:
            return cached[1]
        times = [p for u in pool.upstreams if u.health.healthy
                 and (p := u.latency.percentile(0.9)) is not None]
        guess = min(times) if times else pool.timeout / 4
        misses = self._miss_times.get(id(pool))
        if misses is not None:
            # A waiter's own miss would sit in the same queues and the same lag as ours do.
            took = misses.percentile(0.9, now)
            if took is not None and took > guess:
                guess = took
        wait = min(LEASE_WAIT_MAX, self.budget, max(LEASE_WAIT_MIN, guess))
        # A burst asks this for hundreds of waiters at once; percentiles sort their samples.
        self._plain_miss[id(pool)] = (now + PLAIN_MISS_REUSE, wait)
        return wait

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
                   ) -> tuple[Answer, Rec | None]:
        """``(answer, soa)``: the upstream's answer and, for a negative one that came
        without, the SOA learned by at most one more query (on the same slots). Raises
        :class:`ResolveFailed` when no upstream answered."""
        answer = await self.pools.pool_for(name).query(name, qtype)
        answer = scrub(name, qtype, answer, self.scrub_policy)
        soa = None
        # (the last record first: a positive answer skips the generator)
        cname_only = (qtype != _CNAME and answer.answer and answer.answer[-1].type == _CNAME
                      and all(r.type == _CNAME for r in answer.answer))
        negative = answer.rcode == NXDOMAIN or not answer.answer or cname_only
        if negative and not any(r.type == _SOA for r in answer.authority):
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
                self._recheck[key] = self.clock() + STALE_RECHECK
                return old, True
        entry = servfail_entry(self.clock(), self.policy)
        if store and self.policy.servfail_ttl > 0 and not (
                self.serve_stale and key in self.cache.entries):
            self.cache.put(key, entry)
        return entry, False


#: The former name, until sidecar/server.py and sidecar/dns/handler.py import ``Fetcher``.
Resolver = Fetcher
