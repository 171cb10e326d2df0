"""The DNS side assembled: listeners -> handler -> cache -> miss path -> pools.

:class:`DnsServer` knows nothing of HTTP: the process (:mod:`sidecar.app`) builds it, then
the API over it.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Self

from sidecar.config import Config, HostPort, is_loopback, read_resolv_conf
from sidecar.dns import fastudp
from sidecar.dns.acl import Acl
from sidecar.dns.cache import Cache
from sidecar.dns.handler import QueryHandler
from sidecar.dns.listeners import TcpListener, UdpListener, close_listeners, open_listeners
from sidecar.dns.ratelimit import RateLimiter
from sidecar.errors import StartupError
from sidecar.miss.entry import TtlPolicy
from sidecar.miss.fetch import Resolver
from sidecar.miss.prewarm import Prewarmer
from sidecar.miss.scrub import ScrubPolicy
from sidecar.persist.store import SnapshotStore
from sidecar.upstream import cares
from sidecar.upstream.pool import PoolSet

if TYPE_CHECKING:
    from sidecar.fleet.client import SharedCache

log = logging.getLogger("sidecar")

#: Longest we wait for in-flight queries on shutdown.
DRAIN_SECONDS = 5.0


class DnsServer:
    """A running DNS cache without its API. ``await start()``, then ``dns_addresses`` tells
    where it listens; ``await stop()`` drains and closes."""

    def __init__(self, config: Config) -> None:
        config.validate()
        self.config = config
        self.started_at = time.monotonic()
        self.cache = Cache(config.cache_size, config.cache_memory * 1024 * 1024)
        self.pools = PoolSet(config.upstreams, config.zones, config.timeout, config.tries,
                             case_randomize=config.upstream_0x20)
        self.policy = TtlPolicy(config.min_ttl, config.max_ttl, config.max_negative_ttl,
                                config.servfail_ttl, config.prefetch)
        self.resolver = Resolver(self.cache, self.pools, self.policy,
                                 max_inflight=config.max_inflight,
                                 budget=config.timeout * config.tries,
                                 serve_stale=config.serve_stale,
                                 scrub_policy=ScrubPolicy(config.private_address,
                                                          tuple(z for z, _ in config.zones)))
        self.acl = Acl(config.allow)
        self.ratelimit = (RateLimiter(config.rate_limit, config.rate_burst or None,
                                      v6_prefix=config.rate_limit_v6_prefix)
                          if config.rate_limit > 0 else None)
        self.prewarm = Prewarmer(self.cache, self.resolver, max_inflight=config.max_inflight,
                                 no_aaaa=config.no_aaaa)
        self.handler = QueryHandler(self.cache, self.resolver, acl=self.acl,
                                    no_aaaa=config.no_aaaa, ratelimit=self.ratelimit,
                                    max_udp_size=config.max_udp_size)
        #: The cache snapshot (``--cache-file``); the process loads and saves it (app.py).
        self.snapshot: SnapshotStore | None = (
            SnapshotStore(config.cache_file, config.cache_save_interval, self.cache,
                          serve_stale=config.serve_stale)
            if config.cache_file else None)
        #: The fleet's shared second-level cache (``--shared-cache``), imported only when
        #: configured (it needs the ``shared`` extra: redis-py).
        self.shared: SharedCache | None = None
        if config.shared_cache:
            from sidecar.fleet import client as fleet

            self.shared = fleet.SharedCache(config.shared_cache, config.shared_cache_prefix,
                                      config.shared_cache_timeout, clock=self.cache.clock)
            self.resolver.second = self.shared
        self.udp: list[UdpListener] = []
        self.tcp: list[TcpListener] = []
        self.dns_addresses: list[HostPort] = []
        self.udp_rcvbuf = 0
        self.serving = False
        self.lameduck = False
        self.reloads = 0

    async def start(self) -> None:
        """Bind every listener and start the pools; raise :class:`StartupError` when a
        listener cannot be bound."""
        if not self.config.upstreams:
            raise StartupError("no upstream known; use --upstream")
        own = {(a.host, a.port) for a in self.config.listen}
        for server in self.config.upstreams + tuple(s for _z, ss in self.config.zones for s in ss):
            if (server.host, server.port) in own:
                raise StartupError(f"upstream {server} is this sidecar's own listener (a loop)")
        self.udp, self.tcp, self.dns_addresses, self.udp_rcvbuf = await open_listeners(
            self.config.listen, self.handler.handle, rcvbuf=self.config.udp_rcvbuf,
            tcp_max_connections=self.config.tcp_max_connections,
            tcp_idle_timeout=self.config.tcp_idle_timeout, reuse_port=self.config.reuse_port)
        self.pools.start()
        if self.shared is not None:
            await self.shared.start()  # never raises: DNS works without it
        self.started_at = time.monotonic()
        self.serving = True
        self._warn_exposure()

    def describe(self) -> str:
        """Where it listens and whom it asks, for the start-up log line."""
        zones = "".join(f"; zone {z}: " + ",".join(u.address for u in p.upstreams)
                        for z, p in self.pools.zones.items())
        qcache = "on (could not disable)" if cares.qcache_disabled is False else "off"
        return (f"listening on {', '.join(map(str, self.dns_addresses))} (udp+tcp; udp path "
                f"{self.udp_path}); upstreams "
                f"{','.join(u.address for u in self.pools.default.upstreams)}{zones}; udp "
                f"rcvbuf {self.udp_rcvbuf} bytes; c-ares query cache {qcache}")

    def _warn_exposure(self) -> None:
        public = [a for a in self.dns_addresses if not is_loopback(a.host)]
        if public and self.acl.loopback_only:
            log.warning("listening on %s with the default --allow: only loopback clients will be"
                        " answered (others get REFUSED); set --allow to the clients' CIDRs",
                        ", ".join(map(str, public)))

    async def reload(self, upstreams: tuple[HostPort, ...] | None = None,
                     zones: tuple | None = None) -> None:
        """Replace the upstream configuration without dropping the cache.

        Without arguments, re-read /etc/resolv.conf when the upstreams came from it (SIGHUP).
        """
        cfg = self.config
        if upstreams is None and cfg.resolv_conf:
            upstreams = read_resolv_conf(cfg.resolv_conf) or cfg.upstreams
        upstreams = upstreams or cfg.upstreams
        zones = cfg.zones if zones is None else zones
        await self.pools.reconfigure(upstreams, zones)
        self.config = replace(cfg, upstreams=tuple(upstreams), zones=tuple(zones))
        self.reloads += 1
        log.info("reloaded: upstreams %s%s; cache kept (%d entries)",
                 ",".join(map(str, upstreams)),
                 "".join(f"; zone {z}: " + ",".join(map(str, a)) for z, a in zones),
                 len(self.cache))

    @property
    def udp_path(self) -> str:
        """``compiled`` when every UDP listener runs the compiled fast path
        (sidecar/dns/fastudp.py), else ``python``."""
        fast = bool(self.udp) and all(fastudp.is_fast(u) for u in self.udp)
        return "compiled" if fast else "python"

    @property
    def ready(self) -> bool:
        """Serving, not in lame duck, and every pool has a healthy upstream."""
        return (self.serving and not self.lameduck
                and all(p.healthy_count() > 0 for p in self.pools.pools))

    @property
    def uptime(self) -> float:
        return time.monotonic() - self.started_at

    async def stop(self, drain: float = DRAIN_SECONDS) -> None:
        """Stop taking queries, answer what is in flight (up to ``drain`` s), close all."""
        await self.drain(drain)
        await self.close()

    async def drain(self, drain: float = DRAIN_SECONDS) -> None:
        """Stop taking queries and answer what is in flight (up to ``drain`` s)."""
        self.serving = False
        await close_listeners(self.udp, self.tcp, drain)

    async def close(self) -> None:
        """Close the miss path, the shared cache and the upstream channels (after
        :meth:`drain`)."""
        await self.resolver.close()
        if self.shared is not None:
            await self.shared.close()
        await self.pools.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


#: Net allocations of GC-tracked objects between two young-generation collections
#: (CPython's default is 700).
GC_GEN0_THRESHOLD = 10_000


def tune_gc() -> None:
    """Set the cyclic GC up for a long-running server, once it has started.

    Everything alive now (modules, the loop, listeners) lives as long as the process:
    ``gc.freeze()`` keeps it out of the full collections, which then only walk new objects.
    Every miss holds GC-tracked objects (futures, a task, handles) while it is in flight,
    so with the default threshold a burst of misses runs a young collection every few dozen
    queries; a higher threshold makes them rare (docs/benchmarks.md has the measurement),
    and a young collection then walks at most ~10,000 objects. Cache entries are untracked
    tuples of bytes and numbers: the cache's size does not count here.
    """
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])
