"""Thin aiohttp client for the dns-sidecar.

Aim aiohttp at the sidecar, fail over when it cannot answer, pre-warm a batch of hosts in
one call, and classify every failure by phase::

    import aiohttp
    from client import sidecar_connector, trace_config, fetch, ClassCounters

    async with aiohttp.ClientSession(connector=sidecar_connector(),
                                     trace_configs=[trace_config()]) as session:
        await session.connector.resolver.prewarm(urls)
        counters = ClassCounters()
        result = await fetch(session, urls[0], counters=counters)
        print(result.failure or result.timings)

See docs/client.md.
"""

from .classify import (
    DNS_CLASSES,
    TIMEOUT_CLASSES,
    ClassCounters,
    Failure,
    FailureClass,
    classify,
)
from .errors import PrewarmError, ResolverTimeout, ResolverUnavailable, SidecarClientError
from .failover import FailoverResolver, LookupRecord, ResolverState, failover_resolver
from .fetch import FetchResult, fetch
from .prewarm import PrewarmResult, PrewarmTable
from .resolver import SidecarConnector, SidecarResolver, sidecar_connector, sidecar_resolver
from .tracing import PHASES, Timings, Trace, current_trace, trace_config

__all__ = (
    "DNS_CLASSES",
    "PHASES",
    "TIMEOUT_CLASSES",
    "ClassCounters",
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
    "classify",
    "current_trace",
    "failover_resolver",
    "fetch",
    "sidecar_connector",
    "sidecar_resolver",
    "trace_config",
)
