"""Concurrent misses for one key share one upstream query.

The first caller starts the fetch as its own task; later callers get the same task. Callers
either add a done callback (the listeners: no task or shield per waiting client) or await
it through ``asyncio.shield``, so a caller that goes away (closed TCP connection, shutdown)
never cancels the fetch for the others. The key is dropped when the fetch ends, so nothing
accumulates per name (unlike a dict of per-host locks).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Coalescer(Generic[T]):
    """``join(key, fetch)``: one ``fetch()`` task per key in flight; ``coalesced`` counts the
    callers that joined an existing fetch."""

    def __init__(self) -> None:
        self.inflight: dict[bytes, asyncio.Task[T]] = {}
        self.coalesced = 0

    def __len__(self) -> int:
        return len(self.inflight)

    def join(self, key: bytes, fetch: Callable[[], Coroutine[Any, Any, T]]) -> asyncio.Future[T]:
        """The task fetching ``key``, started with ``fetch()`` if none is in flight.

        Shared: never cancel it; await it through ``asyncio.shield`` or add a callback."""
        task = self.inflight.get(key)
        if task is not None:
            self.coalesced += 1
        else:
            task = asyncio.get_running_loop().create_task(fetch())
            self.inflight[key] = task
            task.add_done_callback(partial(self._done, key))
        return task

    def _done(self, key: bytes, task: asyncio.Task[T]) -> None:
        if self.inflight.get(key) is task:
            del self.inflight[key]

    def joinable(self, key: bytes) -> bool:
        return key in self.inflight
