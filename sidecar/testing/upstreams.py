"""Test probes for upstream state: wait for a health state, wait until no try is in flight,
ask one server directly.

They read what :class:`~sidecar.upstream.nameserver.Upstream` exposes to the product
(``state_listeners``, ``tries``, ``start``), so the product carries no test-only waiting
code. None of them times out by itself: bound each with ``asyncio.wait_for``.
"""

from __future__ import annotations

import asyncio

from sidecar.upstream.nameserver import Upstream
from sidecar.upstream.records import Answer


async def wait_for_state(upstream: Upstream, state: str) -> None:
    """Return once ``upstream`` is in ``state`` ("healthy" or "quarantined")."""
    if upstream.state == state:
        return
    reached: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def listener(u: Upstream) -> None:
        if u.state == state and not reached.done():
            reached.set_result(None)

    upstream.state_listeners.append(listener)
    try:
        await reached
    finally:
        upstream.state_listeners.remove(listener)


async def idle(upstream: Upstream) -> None:
    """Return once no try to ``upstream`` is in flight (hedged losers included), so its
    outcome counters and health include every query sent so far."""
    # A try leaves the set as its future gets its outcome, before anyone waiting wakes. One
    # cancelled under the pool (shutdown) is left to end by itself.
    while pending := [t for t in upstream.tries if not t.done()]:
        await asyncio.wait(pending)


async def ask(upstream: Upstream, name: str, qtype: int, timeout: float | None = None
              ) -> Answer:
    """Ask ``upstream`` once (no pool, no failover), waiting at most ``timeout`` seconds
    (default: the server's); raises :class:`~sidecar.errors.UpstreamError`."""
    return await upstream.start(name, qtype, timeout)
