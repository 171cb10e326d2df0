"""The bound on upstream fetches in flight (``--max-inflight``): slots, taken in FIFO order.

``asyncio.Semaphore`` does the same, but every miss paid for its ``locked()`` (a generator
over the waiters) and an ``acquire()`` coroutine even when a slot was free; here a free slot
is one integer decrement (``take``), and only a fetch that finds none waits (``wait``).
"""

from __future__ import annotations

import asyncio
import collections


class Slots:
    """``n`` slots. ``take()`` gets a free one at once or returns False; ``await wait(t)``
    waits up to ``t`` seconds for one, first come first served; ``release()`` hands the slot
    to the oldest live waiter, else frees it. ``free`` is the number of free slots."""

    __slots__ = ("_waiters", "free")

    def __init__(self, n: int) -> None:
        self.free = n
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    def take(self) -> bool:
        """Take a free slot now (True), unless none is free or others are waiting (False)."""
        if self.free > 0:
            waiters = self._waiters
            while waiters and waiters[0].done():  # gave up (timed out or cancelled)
                waiters.popleft()
            if not waiters:
                self.free -= 1
                return True
        return False

    async def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a slot: True once it is this caller's (release
        it later), False on timeout (nothing to release)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            return False
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # handed to us as we were cancelled: pass it on
            raise
        return True

    def release(self) -> None:
        """Give a slot back (once per successful ``take``/``wait``)."""
        waiters = self._waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot passes straight to the oldest waiter
                return
        self.free += 1
