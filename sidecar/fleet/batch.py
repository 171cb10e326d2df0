"""Batching for the shared cache: items added within one event-loop iteration leave together.

A cold burst starts hundreds of fetches within a few event-loop iterations. Sent one
command each, they queue for connections, blow their deadlines and pay redis-py's
per-command work hundreds of times on a core that is already saturated. A Batcher hands
the items added during one loop iteration to one ``run`` call (one pipeline, one round
trip). While ``parallel`` runs are out, new items wait and leave together with the next
run, so batches grow exactly when the server or the loop is slow (Nagle's algorithm for a
request/reply protocol). ``run`` settles whatever its items carry, also on failure and
cancellation: the batcher knows nothing of Redis.

An item added with ``first=True`` leaves ahead of everything queued, and may start a run of
its own beyond ``parallel`` (up to ``reserve`` more): for items somebody is waiting for,
which must not queue behind a backlog of items nobody waits for.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Batcher(Generic[T]):
    """``add(item)`` queues an item; ``run(batch)`` is called with at most ``max_batch`` of
    them, at most ``parallel`` at a time (``parallel + reserve`` while items added with
    ``first=True`` wait), starting in the loop iteration after the first item of a batch was
    added. ``pending``: items queued or in a run. ``drain``/``close``."""

    def __init__(self, run: Callable[[list[T]], Awaitable[None]], *, max_batch: int,
                 parallel: int, reserve: int = 0) -> None:
        if max_batch < 1 or parallel < 1 or reserve < 0:
            raise ValueError("max_batch and parallel must be positive")
        self._run = run
        self.max_batch = max_batch
        self.parallel = parallel
        self.reserve = reserve
        self.first: list[T] = []     # items that leave ahead of the queue
        self.queue: list[T] = []
        self.sending = 0             # items in runs now
        self.batches = 0             # runs started (round trips, when a run is one)
        self._tasks: set[asyncio.Task[None]] = set()
        self._scheduled = False

    @property
    def pending(self) -> int:
        return len(self.first) + len(self.queue) + self.sending

    def add(self, item: T, first: bool = False) -> None:
        (self.first if first else self.queue).append(item)
        self._kick()

    def _can_start(self) -> bool:
        running = len(self._tasks)
        return bool((self.first and running < self.parallel + self.reserve)
                    or (self.queue and running < self.parallel))

    def _kick(self) -> None:
        if self._scheduled or not self._can_start():
            return
        self._scheduled = True
        # call_soon, not now: the other fetches started in this iteration add theirs first.
        asyncio.get_running_loop().call_soon(self._start)

    def _start(self) -> None:
        self._scheduled = False
        loop = asyncio.get_running_loop()
        while self._can_start():
            batch = self.first[:self.max_batch]
            del self.first[:self.max_batch]
            # Within ``parallel`` a run fills up from the queue; a reserved one carries only
            # the items waited for, so it stays small and fast.
            if len(self._tasks) < self.parallel and len(batch) < self.max_batch:
                room = self.max_batch - len(batch)
                batch += self.queue[:room]
                del self.queue[:room]
            self.sending += len(batch)
            self.batches += 1
            task = loop.create_task(self._one(batch))
            self._tasks.add(task)

    async def _one(self, batch: list[T]) -> None:
        try:
            await self._run(batch)
        finally:
            self.sending -= len(batch)
            task = asyncio.current_task()
            if task is not None:
                self._tasks.discard(task)
            self._kick()

    async def drain(self, timeout: float) -> None:
        """Wait at most ``timeout`` seconds until nothing is queued or running."""
        loop = asyncio.get_running_loop()
        until = loop.time() + timeout
        while self.pending and (left := until - loop.time()) > 0:
            if self._tasks:
                await asyncio.wait(list(self._tasks), timeout=left)
            else:
                await asyncio.sleep(0)

    def take_queue(self) -> list[T]:
        """The queued items, removed (to settle them at shutdown)."""
        out = self.first + self.queue
        self.first, self.queue = [], []
        return out

    async def close(self) -> None:
        """Cancel the runs in flight (``run`` settles its items) and wait for them."""
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
