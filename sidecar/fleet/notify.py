"""The fleet's notices: one subscription per sidecar to the channel its writes publish on.

A lease waiter learns that the holder's value is in the server from a notice
(:mod:`sidecar.fleet.scripts`), at once and with the value, instead of a poll a tick
later. The subscription is one connection held open from start to close; while it is down
(refused, dropped, not yet up) :attr:`Notices.live` is False and the waiters fall back to
polling. It reconnects in the background with growing backoff; every time it comes up it
calls ``on_up`` so the waiters poll once for what was published while it was down.

The subscriber knows nothing of waiters or values: it hands each message's data to
``on_message``.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import Any, Final

log = logging.getLogger("sidecar.fleet")

#: How long one read of the subscription waits before it reads again: an idle sidecar
#: wakes this often, and then pings; a subscription that stays silent through the next
#: read too (a host gone without closing the connection) is dropped and made again.
IDLE_READ: Final = 5.0
BACKOFF_MIN: Final = 0.25
BACKOFF_MAX: Final = 30.0


class Notices:
    """Subscribes ``pubsub()`` (a redis-py PubSub, new per attempt) to ``channel`` and
    calls ``on_message(data)`` per message. ``start()``, ``close()``; ``live``; counters.
    Without ``pubsub`` (a client that has none) it never starts: waiters poll."""

    def __init__(self, pubsub: Callable[[], Any] | None, channel: bytes,
                 on_message: Callable[[bytes], None], on_up: Callable[[], None], *,
                 deadline: float, idle: float = IDLE_READ) -> None:
        self._pubsub = pubsub
        self.channel = channel
        self._on_message = on_message
        self._on_up = on_up
        self.deadline = deadline
        self.idle = idle
        self.live = False
        self.received = 0      # messages handed on
        self.subscribed = 0    # times the subscription came up
        self.failures = 0      # times it failed or dropped
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._pubsub is None:
            log.info("shared cache notices need pub/sub, which this redis-py client lacks"
                     " (a cluster before redis-py 8); lease waiters poll")
            return
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self.live = False

    async def _run(self) -> None:
        delay = BACKOFF_MIN
        while True:
            if await self._session():
                delay = BACKOFF_MIN
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(BACKOFF_MAX, delay * 2)

    async def _session(self) -> bool:
        """One subscription until it fails; True if it was up."""
        ps = None
        up = False
        assert self._pubsub is not None
        try:
            ps = self._pubsub()
            async with asyncio.timeout(self.deadline):
                await ps.subscribe(self.channel)
            self.live = up = True
            self.subscribed += 1
            self._on_up()
            pinged = False
            while True:
                msg = await ps.get_message(ignore_subscribe_messages=True, timeout=self.idle)
                if msg is None:
                    if pinged:
                        raise TimeoutError("no reply to a ping")
                    async with asyncio.timeout(self.deadline):
                        await ps.ping()
                    pinged = True
                    continue
                pinged = False
                if msg.get("type") == "message":
                    self.received += 1
                    self._on_message(msg["data"])
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # refused (ACL), dropped, timed out: poll until it is back
            self.failures += 1
            log.info("shared cache notices %s (%r); lease waiters poll",
                     "dropped" if up else "unavailable", exc)
        finally:
            self.live = False
            if ps is not None:
                try:
                    await ps.aclose()
                except Exception as exc:  # closing a broken connection
                    log.debug("closing the subscription: %r", exc)
        return up
