"""The bound on upstream fetches in flight (``--max-inflight``): slots, taken in FIFO order.

``asyncio.Semaphore`` does the same, but costs every miss a ``locked()`` (a generator over
the waiters) and an ``acquire()`` coroutine even when a slot is free; here a free slot is
one integer decrement (``take``), and only a fetch that finds none waits (``wait``).
"""

from __future__ import annotations

import asyncio
import collections


class Slots:
    """``n`` slots. ``take()`` gets a free one at once or returns False; ``await wait(t)``
    waits up to ``t`` seconds for one, first come first served; ``release()`` hands the slot
    to the oldest live waiter, else frees it. ``free`` is the number of free slots."""

    __slots__ = ("_waiters", "free", "size", "waiting")

    def __init__(self, n: int) -> None:
        self.size = n
        self.free = n
        #: Callers inside :meth:`wait` now.
        self.waiting = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def held(self) -> int:
        """Slots taken now."""
        return self.size - self.free

    @property
    def idle(self) -> bool:
        """Nothing taken and nobody waiting: the object can be dropped."""
        return self.free == self.size and not self.waiting

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
        self.waiting += 1
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            return False
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # handed to us as we were cancelled: pass it on
            raise
        finally:
            self.waiting -= 1
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


class ZoneSlots(Slots):
    """The slots of one zone (:func:`zone_key`), plus ``started``: when each of its fetches
    asking upstream now began, oldest first (a dict keeps insertion order), so "has this
    zone a fetch older than t" is one look at the first value; no timer per fetch."""

    __slots__ = ("started",)

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.started: dict[int, float] = {}

    def slow_since(self, cutoff: float) -> bool:
        """True when a fetch still asking upstream began before ``cutoff``."""
        for t in self.started.values():
            return t < cutoff
        return False


#: Second-level labels under which two-letter country TLDs register names (``co.uk``,
#: ``com.au``, ``ac.jp``...).
_CC_SLDS = frozenset(("co", "com", "net", "org", "gov", "edu", "ac", "or", "ne", "go", "gob",
                      "mil", "nic", "ltd", "plc", "sch", "nom", "gv", "ed", "lg", "ad"))


def zone_key(name: str) -> str:
    """The registrable-domain guess a name's fetches are limited under: its last two labels,
    or three under a country TLD's common second level (``co.uk``, ``com.au``, ``ac.jp``).

    No public-suffix list (a dependency and a file to keep fresh): a wrong guess only
    widens the group (all of ``github.io`` shares one limit) or splits it, and the limits
    are generous for a group that answers. ``name`` is lower-case without trailing dot.
    """
    last = name.rfind(".")
    if last < 0:
        return name
    second = name.rfind(".", 0, last)
    if second < 0:
        return name
    if len(name) - last == 3 and name[second + 1 : last] in _CC_SLDS:
        return name[name.rfind(".", 0, second) + 1 :]
    return name[second + 1 :]
