"""Thin aiohttp client for the dns-sidecar.

Aim aiohttp at the sidecar, fail over when it cannot answer, pre-warm a batch of hosts in
one call, and classify every failure by phase::

    import aiohttp
    from client import sidecar_connector, trace_config, fetch, ClassCounters

    connector = sidecar_connector()
    async with aiohttp.ClientSession(connector=connector,
                                     trace_configs=[trace_config()]) as session:
        await connector.resolver.prewarm(urls)
        counters = ClassCounters()
        result = await fetch(session, urls[0], counters=counters)
        print(result.failure or result.timings)

See docs/client.md.
"""

from .classify import (
    DNS_CLASSES,
    RETRYABLE_CLASSES,
    RETRYABLE_STATUSES,
    TIMEOUT_CLASSES,
    ClassCounters,
    Failure,
    FailureClass,
    classify,
    classify_status,
)
from .errors import PrewarmError, ResolverTimeout, ResolverUnavailable, SidecarClientError
from .failover import FailoverResolver, LookupRecord, ResolverState, failover_resolver
from .fetch import FetchResult, fetch
from .metrics import ClientMetrics
from .prewarm import PrewarmResult, PrewarmTable
from .resolver import SidecarConnector, SidecarResolver, sidecar_connector, sidecar_resolver
from .tracing import PHASES, Timings, Trace, TracingWarning, current_trace, trace_config

__all__ = (
    "DNS_CLASSES",
    "PHASES",
    "RETRYABLE_CLASSES",
    "RETRYABLE_STATUSES",
    "TIMEOUT_CLASSES",
    "ClassCounters",
    "ClientMetrics",
    "FailoverResolver",
    "Failure",
    "FailureClass",
    "FetchResult",
    "LookupRecord",
    "PrewarmError",
    "PrewarmResult",
    "PrewarmTable",
    "ResolverState",
    "ResolverTimeout",
    "ResolverUnavailable",
    "SidecarClientError",
    "SidecarConnector",
    "SidecarResolver",
    "Timings",
    "Trace",
    "TracingWarning",
    "classify",
    "classify_status",
    "current_trace",
    "failover_resolver",
    "fetch",
    "sidecar_connector",
    "sidecar_resolver",
    "trace_config",
)
