"""What the DNS path needs from the miss path, as a Protocol.

The query handler answers hits itself and hands everything else to a :class:`MissPath`.
Naming the interface here keeps the DNS path below the miss path and the upstreams: nothing
in ``sidecar.dns`` imports them, and the miss path's fetcher (``sidecar.miss.fetch``)
satisfies the protocol structurally, without inheriting from it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, TypeAlias

from sidecar.dns.cache import RawEntry

if TYPE_CHECKING:
    import asyncio

#: What a fetch ends with: the entry to answer from, and whether it is a stale one
#: (serve-stale: its TTLs are rewritten before it is sent).
Outcome: TypeAlias = tuple[RawEntry, bool]


class MissPath(Protocol):
    """The miss path, as the query handler uses it."""

    @property
    def max_inflight(self) -> int:
        """Upstream fetches that may run at once (``--max-inflight``): the handler bounds
        each client's waiting misses by a multiple of it."""
        ...

    def lookup(self, key: bytes) -> asyncio.Future[Outcome]:
        """The fetch for cache key ``key``, begun or joined: shared by every client asking
        for ``key``, so callers add a done callback and never cancel it. Needs the running
        event loop."""
        ...

    def outcome(self, fut: asyncio.Future[Outcome]) -> Outcome:
        """The result of a finished :meth:`lookup`, once per waiting client (it counts a
        stale answer as served)."""
        ...

    def prefetch(self, key: bytes, entry: RawEntry) -> None:
        """Refresh ``key`` in the background: ``entry``, still fresh, is past its
        ``prefetch_at``. Returns at once."""
        ...
