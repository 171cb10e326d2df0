"""Prometheus metrics for a crawler that exposes its own (``prometheus_client``).

::

    metrics = ClientMetrics()                 # registers in prometheus_client.REGISTRY
    result = await fetch(session, url, metrics=metrics)
    # dns_sidecar_client_requests_total{class="dns_timeout",dns="true",retryable="true"}
    # dns_sidecar_client_phase_seconds_bucket{phase="namelookup",le="0.005"} ...
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

from .classify import DNS_CLASSES, FailureClass

if TYPE_CHECKING:  # pragma: no cover
    from .fetch import FetchResult

__all__ = ("PHASE_BUCKETS", "ClientMetrics")

#: Histogram buckets of the phase durations, seconds (a held DNS answer takes microseconds,
#: a dead name up to the lookup deadline).
PHASE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                 2.5, 5.0, 10.0, 30.0)
_PHASES = ("queued", "namelookup", "connect", "tls", "starttransfer", "transfer", "total")
_DNS = {k.value for k in DNS_CLASSES}


class ClientMetrics:
    """Per-phase duration histograms and outcome counters, fed by :meth:`observe`.

    * ``{prefix}_requests_total{class, dns, retryable}``: requests by outcome class
      (``ok`` or a :class:`~client.FailureClass` value);
    * ``{prefix}_phase_seconds{phase}``: durations of the phases of every request that
      got a trace (``phase`` is a :class:`~client.Timings` field name; ``tls`` only when
      measured).

    ``registry``: where to register (default ``prometheus_client.REGISTRY``; a
    ``CollectorRegistry()`` of your own for tests or several crawlers in one process).
    """

    def __init__(self, registry: CollectorRegistry | None = REGISTRY, *,
                 prefix: str = "dns_sidecar_client") -> None:
        self.requests = Counter(f"{prefix}_requests", "Requests by outcome class.",
                                ["class", "dns", "retryable"], registry=registry)
        self.phases = Histogram(f"{prefix}_phase_seconds",
                                "Duration of each request phase, seconds.", ["phase"],
                                buckets=PHASE_BUCKETS, registry=registry)
        # every class present from the start, so rates and alerts see zeros, not gaps
        self.requests.labels("ok", "false", "false")
        for kind in FailureClass:
            self.requests.labels(kind.value, str(kind.value in _DNS).lower(), "false")

    def observe(self, result: FetchResult) -> None:
        """Count one :func:`~client.fetch` result and record its phase durations."""
        failure = result.failure
        if failure is None:
            self.requests.labels("ok", "false", "false").inc()
        else:
            self.requests.labels(failure.kind.value, str(failure.is_dns).lower(),
                                 str(failure.retryable).lower()).inc()
        if result.trace.start is None:
            return
        timings = result.trace.timings()
        for phase in _PHASES:
            value = getattr(timings, phase)
            if value is not None:
                self.phases.labels(phase).observe(value)
