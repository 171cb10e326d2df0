"""Per-client query rate limit: a token bucket per client address.

Over the limit a query is dropped, never answered: a reply (even REFUSED) would let a
spoofed source turn the sidecar into a reflector. Off by default, because a crawler on
loopback must never be throttled by surprise.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable

_MAX_CLIENTS = 100_000


class RateLimiter:
    """``allow(host)`` spends one token of the bucket of ``host``'s client key (``rate`` per
    second, up to ``burst``); False means drop. ``limited`` counts the drops.

    The key is the IPv4 address, or for IPv6 the ``v6_prefix``-bit network: one host
    usually holds a whole /64 and can send from any of its 2^64 addresses.

    ``clock`` (seconds) times the refill: ``time.monotonic`` unless given, and given the
    cache's clock (:attr:`sidecar.dns.cache.Cache.clock`) the DNS path runs on one clock.
    """

    __slots__ = ("rate", "burst", "buckets", "limited", "v6_prefix", "_keys", "_clock")

    def __init__(self, rate: float, burst: float | None = None, v6_prefix: int = 64, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.v6_prefix = v6_prefix
        self.rate = float(rate)
        self.burst = float(burst) if burst else max(1.0, 2.0 * self.rate)
        self.buckets: dict[str, list[float]] = {}
        self.limited = 0
        # host string -> bucket key, so an IPv6 address is parsed once, not per query.
        self._keys: dict[str, str] = {}

    def key(self, host: str) -> str:
        """The bucket key of ``host``: itself for IPv4, its prefix network for IPv6."""
        if ":" not in host:
            return host
        k = self._keys.get(host)
        if k is None:
            try:
                ip = ipaddress.IPv6Address(host.split("%", 1)[0])
            except ValueError:
                k = host
            else:
                if ip.ipv4_mapped is not None:
                    k = str(ip.ipv4_mapped)
                else:
                    net = ipaddress.IPv6Network((ip, self.v6_prefix), strict=False)
                    k = str(net)
            if len(self._keys) >= _MAX_CLIENTS:
                self._keys.clear()
            self._keys[host] = k
        return k

    def allow(self, host: str) -> bool:
        now = self._clock()
        if ":" in host:
            host = self.key(host)
        b = self.buckets.get(host)
        if b is None:
            if len(self.buckets) >= _MAX_CLIENTS:
                self._prune(now)
            self.buckets[host] = [self.burst - 1.0, now]
            return True
        tokens = b[0] + (now - b[1]) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        b[1] = now
        if tokens < 1.0:
            b[0] = tokens
            self.limited += 1
            return False
        b[0] = tokens - 1.0
        return True

    def _prune(self, now: float) -> None:
        # Forget clients whose bucket has refilled: they lose nothing by being forgotten.
        full = [h for h, (tok, t) in self.buckets.items()
                if tok + (now - t) * self.rate >= self.burst]
        for h in full:
            del self.buckets[h]
        if len(self.buckets) >= _MAX_CLIENTS:
            self.buckets.clear()
