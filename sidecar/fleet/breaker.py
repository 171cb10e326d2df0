"""A circuit breaker for the shared cache: one failure opens it, a background probe closes it.

The shared cache is an optimisation: a server that fails or overruns its deadline once is
skipped by every lookup until a probe, retried with growing backoff (plus jitter, so a fleet
does not probe in step), succeeds. While the breaker is open a miss costs nothing extra;
each failure costs at most one deadline, and only the lookups already in flight pay it.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Final

log = logging.getLogger("sidecar.fleet")

CLOSED: Final = "closed"
OPEN: Final = "open"
#: A probe is asking the server right now (still skipped by lookups).
PROBING: Final = "probing"

#: First wait before a probe, then doubled per failed probe up to the cap.
BACKOFF_MIN: Final = 0.25
BACKOFF_MAX: Final = 30.0


class Breaker:
    """``allow()``: may a call go to the server now. ``failure(kind)`` opens the breaker and
    starts the probe loop, which calls ``probe()`` (raises or returns False on failure) with
    backoff until it succeeds and closes the breaker. ``close()`` stops the loop."""

    def __init__(self, probe: Callable[[], Awaitable[bool]], *,
                 backoff_min: float = BACKOFF_MIN, backoff_max: float = BACKOFF_MAX) -> None:
        self._probe = probe
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.state = CLOSED
        self.opened = 0        # times it opened
        self.probes = 0        # probes sent
        self.last_error = ""
        self._task: asyncio.Task[None] | None = None

    def allow(self) -> bool:
        return self.state == CLOSED

    def failure(self, why: str) -> None:
        if self.state != CLOSED:
            return
        self.state = OPEN
        self.opened += 1
        self.last_error = why
        log.warning("shared cache skipped after %s; probing it in the background", why)
        self._task = asyncio.get_running_loop().create_task(self._probe_loop())

    async def _probe_loop(self) -> None:
        delay = self.backoff_min
        while True:
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            self.state = PROBING
            self.probes += 1
            try:
                ok = await self._probe()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure of the probe keeps the breaker open
                self.last_error = type(exc).__name__
                ok = False
            if ok:
                self.state = CLOSED
                self._task = None
                log.warning("shared cache reachable again; lookups resume")
                return
            self.state = OPEN
            delay = min(self.backoff_max, delay * 2)

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
