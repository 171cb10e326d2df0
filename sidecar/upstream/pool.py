"""Upstream pools: server selection, failover inside the time budget, zone routing, probes."""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import Collection, Iterable

from sidecar.config import HostPort
from sidecar.errors import ResolveFailed, UpstreamError
from sidecar.upstream.nameserver import Upstream
from sidecar.upstream.records import Answer

log = logging.getLogger("sidecar.pool")

#: Share of queries sent to a random healthy server other than the fastest, so a server that
#: became faster (or recovered) is noticed without waiting for the fastest one to fail.
EXPLORE_SHARE = 0.05
PROBE_TICK = 0.25
#: A try still unanswered after max(HEDGE_MIN, HEDGE_FACTOR x the server's EWMA RTT)
#: (at most half the timeout) gets the next server asked in parallel.
HEDGE_MIN = 0.1
HEDGE_FACTOR = 4.0


def _consume(fut: asyncio.Future[Answer]) -> None:
    if not fut.cancelled():
        fut.exception()


def _wake(waiter: asyncio.Future[None], _try: asyncio.Future[Answer]) -> None:
    if not waiter.done():  # cancelled: the query was abandoned, the try ran on
        waiter.set_result(None)


class Pool:
    """The servers for one zone suffix (``""`` is the default pool).

    Selection: healthy servers by ascending EWMA RTT (unmeasured first, so every server gets
    measured), with 5% exploration; quarantined servers after them, least recently failed
    first, so an all-quarantined pool still tries someone. A try that times out, is refused,
    SERVFAILs or cannot be sent moves on to the next server while the budget
    (``timeout`` x ``tries``) lasts; NXDOMAIN and NODATA are answers.
    """

    def __init__(self, name: str, servers: Iterable[HostPort], timeout: float, tries: int, *,
                 case_randomize: bool = False) -> None:
        self.name = name
        self.timeout = timeout
        self.tries = tries
        self.case_randomize = case_randomize
        self.upstreams = [self.make_upstream(s) for s in servers]
        self.failures = 0  # queries that no server answered
        self.hedged = 0  # tries started early because the previous one was slow

    def make_upstream(self, server: HostPort) -> Upstream:
        return Upstream(server, self.name or ".", self.timeout,
                        case_randomize=self.case_randomize)

    @property
    def label(self) -> str:
        return self.name or "."

    def healthy_count(self) -> int:
        return sum(1 for u in self.upstreams if u.health.healthy)

    def order(self) -> list[Upstream]:
        """Servers in the order a query tries them (do not modify the list)."""
        if len(self.upstreams) == 1:
            return self.upstreams
        good: list[Upstream] = []
        suspect: list[Upstream] = []
        sick: list[Upstream] = []
        for u in self.upstreams:
            h = u.health
            (good if h.healthy and not h.consecutive_failures else
             suspect if h.healthy else sick).append(u)
        good.sort(key=lambda u: -1.0 if u.latency.ewma is None else u.latency.ewma)
        if len(good) > 1 and random.random() < EXPLORE_SHARE:
            i = random.randrange(1, len(good))
            good[0], good[i] = good[i], good[0]
        suspect.sort(key=lambda u: u.health.consecutive_failures)
        sick.sort(key=lambda u: (u.health.consecutive_failures, u.health.quarantined_at))
        return good + suspect + sick

    def hedge_delay(self, server: Upstream) -> float:
        """How long to wait for ``server`` before also asking the next one (seconds)."""
        ewma = server.latency.ewma
        delay = HEDGE_MIN if ewma is None else max(HEDGE_MIN, HEDGE_FACTOR * ewma)
        return min(delay, self.timeout / 2)

    async def query(self, name: str, qtype: int) -> Answer:
        """Resolve ``name``/``qtype`` (type number) through the pool; raise :class:`ResolveFailed` when nobody answered.

        Tries run one after another, but a try that is slow (past :meth:`hedge_delay`) gets
        the next server asked in parallel, and the first answer wins. Tries that lose the
        race are not cancelled: their outcome still counts for the server's health, so a
        silent server is quarantined even though nobody waited for it.
        """
        order = self.order()
        deadline = time.monotonic() + self.timeout * self.tries
        # Every server gets a chance at fast failures; slow ones are bounded by the deadline.
        attempts = max(self.tries, len(order))
        done: Collection[asyncio.Future[Answer]]
        last = "timeout"
        # (No closure for launching: its cells would cost every query.)
        current = order[0]
        running = {self._start(current, name, qtype, deadline)}
        launched = 1
        try:
            while running:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                can_hedge = launched < min(attempts, len(order))
                if not can_hedge and len(running) == 1:
                    # Nothing to race, and the try's own timer ends it by the deadline:
                    # await it alone (asyncio.wait costs a waiter, callbacks and a timer).
                    # Through a waiter, as asyncio.shield does (with one callback, not two):
                    # cancelling this query (a jostled fetch) then leaves the try to finish,
                    # so its outcome still feeds the server's health, as a hedged loser's.
                    only = next(iter(running))
                    if not only.done():
                        waiter: asyncio.Future[None] = only.get_loop().create_future()
                        only.add_done_callback(functools.partial(_wake, waiter))
                        await waiter
                    done = (only,)
                else:
                    wait = min(left, self.hedge_delay(current)) if can_hedge else left
                    done, _ = await asyncio.wait(running, timeout=wait,
                                                 return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    if can_hedge:
                        self.hedged += 1
                        current = order[launched % len(order)]
                        launched += 1
                        running.add(self._start(current, name, qtype, deadline))
                    continue
                for fut in done:
                    running.discard(fut)
                    exc = fut.exception()
                    if exc is None:
                        return fut.result()
                    if not isinstance(exc, UpstreamError):
                        raise exc
                    last = exc.kind
                    if exc.kind in ("badname", "closed"):
                        running.clear()
                        break
                else:
                    # A failed try moves on at once (no need to wait for a hedge timer).
                    if launched < attempts and deadline - time.monotonic() > 0.001:
                        current = order[launched % len(order)]
                        launched += 1
                        running.add(self._start(current, name, qtype, deadline))
                    continue
                break
        finally:
            for fut in running:
                # Let losing tries finish on their own (their outcome feeds health);
                # retrieve their result so nothing is logged as "never retrieved".
                fut.add_done_callback(_consume)
        self.failures += 1
        raise ResolveFailed(last, launched)

    def _start(self, server: Upstream, name: str, qtype: int, deadline: float
               ) -> asyncio.Future[Answer]:
        """One try on ``server``: its own timeout, cut to what is left before ``deadline``."""
        return server.start(name, qtype, min(self.timeout, deadline - time.monotonic()))

    async def probe_due(self, now: float) -> None:
        """Probe suspect and quarantined servers whose wait has elapsed (concurrently)."""
        due = [u for u in self.upstreams if u.health.due(now)]
        if not due:
            return
        for u in due:
            # Push probe_at forward first so a slow probe is not started twice.
            u.health.probe_at = now + u.timeout + u.health.backoff
        await asyncio.gather(*(u.probe() for u in due), return_exceptions=True)

    async def close(self) -> None:
        """Cancel the tries still in flight (hedged losers too), then close the channels."""
        tries = [fut for u in self.upstreams for fut in u.tries]
        for fut in tries:
            fut.cancel()
        if tries:
            await asyncio.gather(*tries, return_exceptions=True)
        for u in self.upstreams:
            await u.close()


class PoolSet:
    """All pools; routes a name to the pool of its longest matching zone suffix."""

    def __init__(self, default: Iterable[HostPort], zones: Iterable[tuple[str, Iterable[HostPort]]],
                 timeout: float, tries: int, *, case_randomize: bool = False) -> None:
        #: ``--upstream-0x20``: mixed-case upstream queries, replies must echo the case.
        self.case_randomize = case_randomize
        self.default = Pool("", default, timeout, tries, case_randomize=case_randomize)
        self.zones: dict[str, Pool] = {}
        for suffix, servers in zones:
            self.zones[suffix] = Pool(suffix, servers, timeout, tries,
                                      case_randomize=case_randomize)
        self._probe_task: asyncio.Task | None = None

    @property
    def pools(self) -> list[Pool]:
        return [self.default, *self.zones.values()]

    async def reconfigure(self, default: Iterable[HostPort],
                          zones: Iterable[tuple[str, Iterable[HostPort]]]) -> None:
        """Swap in new server lists. A server kept in the same pool keeps its channel, stats
        and health; removed ones are closed. The cache is not touched."""
        old = {(p.name, u.address): u for p in self.pools for u in p.upstreams}
        timeout, tries = self.default.timeout, self.default.tries

        def build(name: str, servers: Iterable[HostPort]) -> Pool:
            pool = Pool(name, (), timeout, tries, case_randomize=self.case_randomize)
            pool.upstreams = [old.pop(key) if (key := (name, str(s))) in old
                              else pool.make_upstream(s) for s in servers]
            return pool

        self.default = build("", default)
        self.zones = {suffix: build(suffix, servers) for suffix, servers in zones}
        for u in old.values():
            await u.close()

    def pool_for(self, name: str) -> Pool:
        """``name`` is lower-case, without trailing dot."""
        if self.zones:
            probe = name
            while True:
                pool = self.zones.get(probe)
                if pool is not None:
                    return pool
                dot = probe.find(".")
                if dot < 0:
                    break
                probe = probe[dot + 1 :]
        return self.default

    def start(self) -> None:
        if self._probe_task is None:
            self._probe_task = asyncio.get_running_loop().create_task(self._probe_loop())

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(PROBE_TICK)
            now = time.monotonic()
            try:
                await asyncio.gather(*(p.probe_due(now) for p in self.pools))
            except Exception:  # pragma: no cover - a probe must never kill the loop
                log.exception("probe round failed")

    async def close(self) -> None:
        if self._probe_task is not None:
            self._probe_task.cancel()
            try:
                await self._probe_task
            except asyncio.CancelledError:
                pass
            self._probe_task = None
        for p in self.pools:
            await p.close()
