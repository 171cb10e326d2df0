"""One traced, classified request: the loop body of a crawler."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aiohttp

from .classify import ClassCounters, Failure, classify
from .tracing import Timings, Trace

__all__ = ("FetchResult", "fetch")


@dataclass(slots=True)
class FetchResult:
    """Outcome of :func:`fetch`: ``status`` and ``body`` on success (``body`` is
    ``None`` when not read), ``failure`` otherwise, and the request's ``trace``."""

    url: str
    trace: Trace
    status: int | None = None
    body: bytes | None = None
    failure: Failure | None = None

    @property
    def ok(self) -> bool:
        """True when the request completed without an exception."""
        return self.failure is None

    @property
    def timings(self) -> Timings:
        """The trace's phase durations (seconds)."""
        return self.trace.timings()


async def fetch(
    session: aiohttp.ClientSession,
    url: str,
    *,
    method: str = "GET",
    read: bool = True,
    counters: ClassCounters | None = None,
    **request_kwargs: Any,
) -> FetchResult:
    """Make one request, read the body (``read=True``), and classify any failure.

    The session must carry :func:`~client.trace_config` in its ``trace_configs`` for the
    phases to be known (without it every timeout is just ``timeout``). Other keywords go
    to ``session.request`` (``timeout=``, ``headers=``, ``raise_for_status=``, ...).
    Exceptions are returned as ``FetchResult.failure``, never raised, except
    ``asyncio.CancelledError``. ``counters``, when given, counts the outcome.
    """
    trace = Trace()
    result = FetchResult(url=url, trace=trace)
    try:
        async with session.request(method, url, trace_request_ctx=trace,
                                   **request_kwargs) as resp:
            result.status = resp.status
            if read:
                result.body = await resp.read()
        trace.finish()
    except Exception as exc:
        trace.finish(exc)
        result.failure = classify(exc, trace)
    if counters is not None:
        counters.add(result.failure)
    return result
