"""Exceptions raised by the client package.

The resolver errors subclass :class:`OSError` on purpose: aiohttp's connector wraps any
``OSError`` a resolver raises in :class:`aiohttp.ClientConnectorDNSError`, which is what
keeps a resolver failure a DNS failure all the way up to the caller (a plain
:class:`TimeoutError` from a resolver would instead surface as a connection timeout).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = (
    "SidecarClientError",
    "PrewarmError",
    "ResolverTimeout",
    "ResolverUnavailable",
)


class SidecarClientError(Exception):
    """Base class of the errors this package defines itself."""


class PrewarmError(SidecarClientError):
    """A ``POST /prewarm`` call to the sidecar failed.

    ``status`` is the HTTP status when the sidecar answered (``None`` when it could not be
    reached or timed out); the original exception, if any, is chained as ``__cause__``.
    """

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        #: what the pre-warm achieved before the failure (a ``PrewarmResult``), when known
        self.result: Any = None


class ResolverTimeout(OSError):
    """One resolver did not answer within :class:`~client.FailoverResolver`'s
    ``attempt_timeout`` (seconds).

    Raised only inside the failover chain; callers see it as the ``__cause__`` of a
    :class:`ResolverUnavailable` when no resolver answered.
    """

    def __init__(self, resolver: str, timeout: float) -> None:
        super().__init__(None, f"resolver {resolver} did not answer within {timeout:g} s")
        self.resolver = resolver
        self.timeout = timeout


class ResolverUnavailable(OSError):
    """No resolver of a :class:`~client.FailoverResolver` could answer a lookup.

    ``attempts`` lists ``(resolver name, outcome)`` for every resolver tried, in order,
    where outcome is ``"unreachable"``, ``"timeout"``, ``"servfail"``/``"refused"`` or
    ``"set-aside"`` (skipped because it is in its back-off period). The last real
    failure, if there was one, is chained as ``__cause__`` (for an aiodns failure that
    is aiohttp's ``OSError`` whose own ``__cause__`` is the ``aiodns.error.DNSError``).
    """

    def __init__(self, host: str, attempts: Sequence[tuple[str, str]]) -> None:
        detail = ", ".join(f"{name}: {outcome}" for name, outcome in attempts) or "no resolvers"
        super().__init__(None, f"no resolver could answer for {host!r} ({detail})")
        self.host = host
        self.attempts = tuple(attempts)

    @property
    def all_set_aside(self) -> bool:
        """True when every resolver was skipped because it is in its back-off period."""
        return all(outcome == "set-aside" for _, outcome in self.attempts)
