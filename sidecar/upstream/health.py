"""Upstream health: when a server is quarantined, and when it may be probed again.

The first network failure (timeout, unreachable) makes a server *suspect*: live traffic
prefers the others, and the prober checks it every ``SUSPECT_PROBE`` seconds, as CoreDNS's
forward plugin does after an error. ``FAILS_TO_QUARANTINE`` consecutive failures (queries or
probes) quarantine it: it gets no traffic while any other server is usable, and is probed
with exponential back-off (1 s doubling up to 60 s). One answer, to a query or a probe, makes
it healthy again. SERVFAIL and REFUSED do not count: they are usually about one name.
"""

from __future__ import annotations

import time

FAILS_TO_QUARANTINE = 3
SUSPECT_PROBE = 0.5
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
        now = time.monotonic() if now is None else now
        if self.state == HEALTHY and self.consecutive_failures < FAILS_TO_QUARANTINE:
            self.probe_at = now + SUSPECT_PROBE
            return False
        if self.state == HEALTHY:
            self.state = QUARANTINED
            self.quarantines += 1
            self.quarantined_at = now
            self.backoff = BACKOFF_START
            self.probe_at = now + self.backoff
            return True
        return False

    def probe_failed(self, kind: str, now: float | None = None) -> bool:
        """Record a failed probe; True when this starts a quarantine."""
        now = time.monotonic() if now is None else now
        if self.state == HEALTHY:
            return self.failure(kind, now)
        self.last_error = kind
        self.backoff = min(self.backoff * 2, BACKOFF_MAX)
        self.probe_at = now + self.backoff
        return False

    @property
    def suspect(self) -> bool:
        return self.state == HEALTHY and self.consecutive_failures > 0

    def due(self, now: float) -> bool:
        """Whether the prober should check this server now (suspect or quarantined)."""
        return (self.state == QUARANTINED or self.consecutive_failures > 0) and now >= self.probe_at
