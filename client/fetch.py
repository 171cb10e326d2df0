"""One traced, classified request: the loop body of a crawler."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp

from .classify import ClassCounters, Failure, classify, classify_status
from .tracing import Timings, Trace

if TYPE_CHECKING:  # pragma: no cover
    from .metrics import ClientMetrics

__all__ = ("FetchResult", "fetch")


@dataclass(slots=True)
class FetchResult:
    """Outcome of :func:`fetch`: ``status`` (whenever a response came) and ``body`` (when
    read), ``failure`` for an exception or a 5xx status, and the request's ``trace``.

    ``as_dict()`` / ``to_json()`` give plain JSON for logs (the body as its length)."""

    url: str
    trace: Trace
    status: int | None = None
    body: bytes | None = None
    failure: Failure | None = None

    @property
    def ok(self) -> bool:
        """True when the request completed without an exception and without a 5xx."""
        return self.failure is None

    @property
    def timings(self) -> Timings:
        """The trace's phase durations (seconds); warns when the session had no
        :func:`~client.trace_config` (they are then all zero)."""
        return self.trace.timings()

    def as_dict(self) -> dict[str, Any]:
        """url, ok, status, body length, failure (``Failure.as_dict()``), timings (with
        ``reused``), resolver and DNS attempts, connection attempts and redirects."""
        trace = self.trace
        return {
            "url": self.url,
            "ok": self.ok,
            "status": self.status,
            "body_bytes": None if self.body is None else len(self.body),
            "failure": None if self.failure is None else self.failure.as_dict(),
            "timings": trace.timings().as_dict() if trace.start is not None else None,
            "resolver": trace.resolver,
            "dns_attempts": [list(a) for a in trace.dns_attempts],
            "attempts": trace.attempts,
            "redirects": trace.redirects,
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict())


async def fetch(
    session: aiohttp.ClientSession,
    url: str,
    *,
    method: str = "GET",
    read: bool = True,
    counters: ClassCounters | None = None,
    metrics: ClientMetrics | None = None,
    **request_kwargs: Any,
) -> FetchResult:
    """Make one request, read the body (``read=True``), and classify any failure.

    The session must carry :func:`~client.trace_config` in its ``trace_configs`` for the
    phases to be known (without it every timeout is just ``timeout``). Other keywords go
    to ``session.request`` (``timeout=``, ``headers=``, ``raise_for_status=``, ...).
    Exceptions are returned as ``FetchResult.failure``, never raised, except
    ``asyncio.CancelledError``; a 5xx response is ``http_error`` (with its status and body)
    whether or not ``raise_for_status`` is set. ``counters`` / ``metrics``
    (:class:`~client.ClientMetrics`), when given, count the outcome.
    """
    trace = Trace()
    result = FetchResult(url=url, trace=trace)
    try:
        async with session.request(method, url, trace_request_ctx=trace,
                                   **request_kwargs) as resp:
            result.status = resp.status
            if read:
                result.body = await resp.read()
            result.failure = classify_status(resp.status, resp.reason)
        trace.finish()
    except Exception as exc:
        trace.finish(exc)
        result.failure = classify(exc, trace)
        if result.status is None and result.failure.status is not None:
            result.status = result.failure.status
    if counters is not None:
        counters.add(result.failure)
    if metrics is not None:
        metrics.observe(result)
    return result
