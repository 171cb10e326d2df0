"""The ``SecondLevel`` protocol: a cache behind the local one, shared with other sidecars.

The miss path asks it on a local miss before any upstream query, inside the fetch that is
already coalesced per key, and writes upstream answers to it. The implementation
(:class:`sidecar.fleet.client.SharedCache`) lives above the miss path; the protocol keeps the
miss path free of its client library. Every method is best effort: it never raises, and a
second level that cannot answer in time answers None.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from sidecar.dns.cache import RawEntry


class SecondLevel(Protocol):
    async def lookup(self, key: bytes, wait: Callable[[], float]) -> RawEntry | None:
        """The entry for ``key`` (times on the local cache's clock), or None: resolve it.

        On a miss it claims the right to resolve ``key`` for the fleet; when another sidecar
        holds that right, it waits for that sidecar's entry. ``wait()`` is what resolving
        ``key`` here would take (seconds; called only then: it costs a little); the wait is
        about that plus the second level's own round trips, so that it ends when the
        holder's answer is due, not just before."""
        ...

    def late(self, key: bytes) -> asyncio.Future[RawEntry | None] | None:
        """After :meth:`lookup` gave up waiting for another sidecar's entry for ``key``: a
        future of that entry should it still come (None: nothing to wait for). The miss
        path races it against its own upstream answer and cancels the loser."""
        ...

    def put(self, key: bytes, entry: RawEntry) -> None:
        """Store ``entry`` in the background, expiring with it."""
        ...

    def reject(self, key: bytes, reason: str) -> None:
        """An entry :meth:`lookup` returned failed the miss path's checks."""
        ...
