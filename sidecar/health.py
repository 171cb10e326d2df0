"""Upstream health: when a server is quarantined, and when it may be probed again.

A server is quarantined after ``FAILS_TO_QUARANTINE`` consecutive network failures (timeout,
unreachable, REFUSED). SERVFAIL does not count: it usually says the *name's* authorities are
broken, not the resolver, and quarantining a resolver for it would punish the whole pool.
While quarantined, the prober sends a cheap query when ``probe_at`` comes; each failed probe
doubles the wait (1 s up to 60 s), one good answer (probe or query) makes it healthy again.
"""

from __future__ import annotations

import time

FAILS_TO_QUARANTINE = 3
BACKOFF_START = 1.0
BACKOFF_MAX = 60.0

HEALTHY = "healthy"
QUARANTINED = "quarantined"


class Health:
    """Quarantine state of one upstream. Times are ``time.monotonic()`` seconds."""

    __slots__ = ("state", "consecutive_failures", "backoff", "probe_at", "quarantined_at",
                 "quarantines", "last_error")

    def __init__(self) -> None:
        self.state = HEALTHY
        self.consecutive_failures = 0
        self.backoff = BACKOFF_START
        self.probe_at = 0.0
        self.quarantined_at = 0.0
        self.quarantines = 0
        self.last_error = ""

    @property
    def healthy(self) -> bool:
        return self.state == HEALTHY

    def success(self) -> bool:
        """Record an answer; True when this ends a quarantine."""
        self.consecutive_failures = 0
        if self.state == HEALTHY:
            return False
        self.state = HEALTHY
        self.backoff = BACKOFF_START
        return True

    def failure(self, kind: str, now: float | None = None) -> bool:
        """Record a network failure; True when this starts a quarantine."""
        self.last_error = kind
        self.consecutive_failures += 1
        if self.state == HEALTHY and self.consecutive_failures >= FAILS_TO_QUARANTINE:
            now = time.monotonic() if now is None else now
            self.state = QUARANTINED
            self.quarantines += 1
            self.quarantined_at = now
            self.backoff = BACKOFF_START
            self.probe_at = now + self.backoff
            return True
        return False

    def probe_failed(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.backoff = min(self.backoff * 2, BACKOFF_MAX)
        self.probe_at = now + self.backoff

    def due(self, now: float) -> bool:
        return self.state == QUARANTINED and now >= self.probe_at
