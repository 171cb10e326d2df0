"""The ``SecondLevel`` protocol: a cache behind the local one, shared with other sidecars.

The miss path asks it on a local miss before any upstream query, inside the fetch that is
already coalesced per key, and writes upstream answers to it. The implementation
(:class:`sidecar.fleet.client.SharedCache`) lives above the miss path; the protocol keeps the
miss path free of its client library. Every method is best effort: it never raises, and a
second level that cannot answer in time answers None.
"""

from __future__ import annotations

from typing import Protocol

from sidecar.dns.cache import RawEntry


class SecondLevel(Protocol):
    async def get(self, key: bytes) -> RawEntry | None:
        """The entry for ``key`` (times on the local cache's clock), or None."""
        ...

    async def lease(self, key: bytes, wait: float) -> RawEntry | None:
        """Claim the right to resolve ``key`` for the fleet. None: resolve it (we hold the
        lease, or the second level could not say); an entry: another sidecar resolved it
        while we waited, at most ``wait`` seconds."""
        ...

    def put(self, key: bytes, entry: RawEntry) -> None:
        """Store ``entry`` in the background, expiring with it."""
        ...

    def reject(self, key: bytes, reason: str) -> None:
        """An entry :meth:`get` or :meth:`lease` returned failed the miss path's checks."""
        ...
