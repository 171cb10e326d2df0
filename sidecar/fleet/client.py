"""The shared cache: a Valkey/Redis server (or Redis Cluster) as the fleet's second level.

:class:`SharedCache` implements :class:`~sidecar.miss.second.SecondLevel` over redis-py's
asyncio clients. Every call runs under a deadline and behind a circuit breaker
(:mod:`sidecar.fleet.breaker`): the shared cache is never required, so a server that is
down, slow or full costs a lookup at most one deadline, and then nothing until a background
probe finds it healthy again. Values are untrusted (:mod:`sidecar.fleet.codec`).

URL forms (password, username and db as redis-py parses them):

* ``redis://[user:password@]host:port[/db]``: one server;
* ``rediss://...``: the same over TLS;
* ``redis+cluster://[user:password@]host:port`` and ``rediss+cluster://...``: a Redis
  Cluster, discovered from that node (db must be 0).

Keys: ``<prefix>{<name>/<qtype>/<qclass>}`` for values (the name in presentation form,
lower-case, as ``qname_text`` escapes it) and the same plus ``/lease`` for the fleet's
per-key lease, so an ACL can confine a sidecar to ``~<prefix>*``. The braces are a Redis
Cluster hash tag: a value and its lease live in one slot, so the lookup reads the value and
claims the lease in one pipelined round trip.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sidecar.dns.cache import EXPIRES, RawEntry
from sidecar.dns.wire import key_type, qname_text
from sidecar.fleet import codec
from sidecar.fleet.breaker import Breaker
from sidecar.upstream.latency import LatencyTracker

log = logging.getLogger("sidecar.fleet")

DEFAULT_PREFIX: Final = "dns-sidecar:v1:"
#: Deadline of a lookup (seconds): a shared hit must stay far cheaper than an upstream miss.
DEFAULT_DEADLINE: Final = 0.03
#: Background writes and probes may take this many lookup deadlines (a new connection
#: costs a few round trips; nobody waits for a write).
WRITE_DEADLINE_FACTOR: Final = 4
WRITE_DEADLINE_MIN: Final = 0.25
#: Writes in flight at most; beyond, a write is dropped (and counted): a slow server must
#: not collect an unbounded queue of them.
MAX_WRITES: Final = 256
#: Lookups (value and lease in one pipeline, or a poll) in flight at most; beyond, the miss
#: goes straight upstream.
MAX_READS: Final = 512
#: Commands on the wire at once, and connections to one server, all opened by ``start()``: a
#: burst of misses queues for them instead of opening a connection per lookup (a handshake
#: of several round trips under a lookup's deadline: a cold burst used to blow it and open
#: the breaker for everyone). Queueing past a deadline is our congestion, not the server's
#: failure: it is counted as ``busy`` and leaves the breaker alone.
POOL_SIZE: Final = 32
#: Lifetime of a lease: how long the fleet defers to a sidecar resolving a name. Longer
#: than any answer takes; a holder that died costs the others only their own wait.
LEASE_TTL: Final = 1.0
#: Polling while another sidecar holds the lease: first interval, doubled up to the cap.
POLL_MIN: Final = 0.002
POLL_MAX: Final = 0.02

_CLUSTER_SCHEMES: Final = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
_FAILED: Final = object()

ERROR_KINDS: Final = ("timeout", "connection", "server", "corrupt")


def parse_url(url: str) -> tuple[str, bool]:
    """(the URL redis-py reads, whether it names a cluster); ValueError for another scheme."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in _CLUSTER_SCHEMES:
        return urlunsplit(parts._replace(scheme=_CLUSTER_SCHEMES[scheme])), True
    if scheme in ("redis", "rediss"):
        return url, False
    raise ValueError(f"shared cache URL must start with redis://, rediss://, redis+cluster://"
                     f" or rediss+cluster://, not {scheme or url!r}")


def redact(url: str) -> str:
    """``url`` without its password (for logs and /stats)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def connect(url: str, timeout: float, max_connections: int,
            pool_size: int = POOL_SIZE) -> Redis | RedisCluster:
    """The redis-py client for ``url``. No retries of its own: the caller's deadline and
    breaker decide. A single server gets ``pool_size`` connections that callers wait for
    (within their own deadline); a cluster's client opens up to ``max_connections`` per node
    (redis-py's cluster client refuses a caller beyond its limit rather than queueing it)."""
    real, cluster = parse_url(url)
    kwargs: dict[str, Any] = dict(socket_timeout=timeout, socket_connect_timeout=timeout,
                                  retry=Retry(NoBackoff(), 0))
    if cluster:
        return RedisCluster.from_url(real, max_connections=max_connections, **kwargs)
    return Redis.from_pool(BlockingConnectionPool.from_url(
        real, max_connections=pool_size, timeout=None, **kwargs))


class SharedCache:
    """The fleet's shared cache at ``url`` under key ``prefix``; lookups give up after
    ``deadline`` seconds. Entry times are on ``clock`` (the local cache's clock).

    ``await start()`` (optional) opens a first connection; ``await close()`` at shutdown.
    """

    def __init__(self, url: str, prefix: str = DEFAULT_PREFIX,
                 deadline: float = DEFAULT_DEADLINE, *,
                 clock: Callable[[], float] = time.monotonic,
                 max_writes: int = MAX_WRITES, max_reads: int = MAX_READS,
                 lease_ttl: float = LEASE_TTL) -> None:
        if deadline <= 0:
            raise ValueError("shared cache deadline must be positive")
        self.url = redact(url)
        self.cluster = parse_url(url)[1]
        self.prefix = prefix
        self._prefix = prefix.encode()
        self.deadline = deadline
        self.write_deadline = max(WRITE_DEADLINE_MIN, WRITE_DEADLINE_FACTOR * deadline)
        self.clock = clock
        self.max_writes = max_writes
        self.max_reads = max_reads
        self.lease_ms = max(1, int(lease_ttl * 1000))
        self._client = connect(url, self.write_deadline, max_reads + max_writes + 8)
        self.breaker = Breaker(self._probe)
        self._token = os.urandom(8).hex()
        self._reads = 0
        self._wire = asyncio.Semaphore(POOL_SIZE)
        self._writes: set[asyncio.Task[None]] = set()
        self.rtt = LatencyTracker()
        self.hits = 0
        self.misses = 0
        self.skipped = 0          # lookups not sent: breaker open
        self.busy = 0             # lookups not sent: max_reads in flight
        self.writes = 0           # values written
        self.write_drops = 0      # not written: max_writes in flight, or breaker open
        self.unshareable = 0      # not written: SERVFAIL, nearly expired, or too large
        self.errors = dict.fromkeys(ERROR_KINDS, 0)
        self.rejected = dict.fromkeys((*codec.REASONS, "scrub"), 0)
        self.lease_won = 0
        self.lease_waited = 0
        self.lease_wait_hits = 0
        self.lease_timeouts = 0

    # ------------------------------------------------------------------ keys

    def data_key(self, key: bytes) -> bytes:
        """``<prefix>{<name>/<qtype>/<qclass>}``: the braces are Redis Cluster's hash tag, so
        the value and its lease (:meth:`lease_key`) hash to one slot and one pipeline."""
        return b"%s{%s/%d/%d}" % (self._prefix, qname_text(key).encode(), key_type(key),
                                  int.from_bytes(key[-2:], "big"))

    def lease_key(self, key: bytes) -> bytes:
        return self.data_key(key) + b"/lease"

    # ------------------------------------------------------------------ SecondLevel

    async def lookup(self, key: bytes, wait: Callable[[], float]) -> RawEntry | None:
        """The shared entry for ``key``, or None: resolve it upstream.

        One round trip reads the value and, in the same pipeline, claims the fleet's lease
        (``SET NX``). A miss whose lease another sidecar holds polls the value for at most
        ``wait()`` seconds. None too whenever the server is not asked (breaker open, too
        many lookups in flight) or fails, and for a value that is unusable."""
        data_key = self.data_key(key)
        got = await self._read(self._get_and_lease, data_key)
        if got is _FAILED:
            return None
        value, leased = got
        if value is not None:
            entry = self._decode(key, value)
            if entry is not None:
                self.hits += 1
                return entry
            # Unusable (often just expired between the two clocks): our own answer will
            # replace it, lease or not.
            self.misses += 1
            return None
        self.misses += 1
        if leased:
            self.lease_won += 1
            return None
        self.lease_waited += 1
        loop = asyncio.get_running_loop()
        until = loop.time() + wait()
        delay = POLL_MIN
        while (left := until - loop.time()) > 0:
            await asyncio.sleep(min(delay, left))
            delay = min(POLL_MAX, 2 * delay)
            value = await self._read(self._client.get, data_key)
            if value is _FAILED:
                break
            if value is not None:
                entry = self._decode(key, value)
                if entry is None:
                    break  # an unusable value stays until our own answer replaces it
                self.hits += 1
                self.lease_wait_hits += 1
                return entry
        self.lease_timeouts += 1
        return None

    def put(self, key: bytes, entry: RawEntry) -> None:
        """Write ``entry`` in the background, expiring with it; never waits, never raises."""
        if not self.breaker.allow() or len(self._writes) >= self.max_writes:
            self.write_drops += 1
            return
        mono, wall = self.clock(), time.time()
        value = codec.encode(key, entry, mono, wall)
        if value is None:
            self.unshareable += 1
            return
        px = int((entry[EXPIRES] - mono) * 1000)
        task = asyncio.get_running_loop().create_task(self._write(self.data_key(key), value, px))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    def reject(self, key: bytes, reason: str) -> None:
        """The miss path found the entry :meth:`get` returned unusable (``reason``): it is
        counted as corrupt and not as a hit."""
        self.hits -= 1
        self.misses += 1
        self.errors["corrupt"] += 1
        self.rejected["scrub"] += 1
        log.warning("shared cache value for %s rejected: %s", qname_text(key), reason)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Open the connections (a failure opens the breaker; never raises)."""
        ok = await self._timed(self._warm(), self.write_deadline)
        if ok is _FAILED:
            log.warning("shared cache %s not reachable at start; DNS works without it",
                        self.url)

    async def flush(self, timeout: float) -> None:
        """Wait at most ``timeout`` seconds for the background writes in flight now."""
        if self._writes:
            await asyncio.wait(list(self._writes), timeout=timeout)

    async def close(self) -> None:
        """Stop probing, give writes in flight one write deadline, close the connections."""
        await self.breaker.close()
        if self._writes:
            await asyncio.wait(list(self._writes), timeout=self.write_deadline)
            for t in list(self._writes):
                t.cancel()
            await asyncio.gather(*self._writes, return_exceptions=True)
        await self._client.aclose()

    def stats(self) -> dict[str, Any]:
        """Counters and state for ``/stats`` (key ``shared_cache``) and the metrics."""
        rtt = self.rtt
        p50, p99 = rtt.percentile(0.5), rtt.percentile(0.99)
        return {
            "url": self.url,
            "cluster": self.cluster,
            "prefix": self.prefix,
            "state": self.breaker.state,
            "breaker_opened": self.breaker.opened,
            "hits": self.hits,
            "misses": self.misses,
            "skipped": self.skipped,
            "busy": self.busy,
            "writes": self.writes,
            "writes_inflight": len(self._writes),
            "write_drops": self.write_drops,
            "unshareable": self.unshareable,
            "errors": dict(self.errors),
            "rejected": dict(self.rejected),
            "leases": {"won": self.lease_won, "waited": self.lease_waited,
                       "wait_hits": self.lease_wait_hits, "timeouts": self.lease_timeouts},
            "rtt_ms": {"ewma": None if rtt.ewma is None else round(rtt.ewma * 1000, 3),
                       "p50": None if p50 is None else round(p50 * 1000, 3),
                       "p99": None if p99 is None else round(p99 * 1000, 3)},
        }

    # ------------------------------------------------------------------ internals

    def _decode(self, key: bytes, value: bytes) -> RawEntry | None:
        try:
            return codec.decode(key, value, self.clock(), time.time())
        except codec.Rejected as exc:
            self.rejected[exc.reason] += 1
            if exc.reason != "expired":  # expiring between the server's clock and ours
                self.errors["corrupt"] += 1
                log.warning("shared cache value for %s rejected (%s): %s",
                            qname_text(key), exc.reason, exc)
            return None

    async def _read(self, command: Callable[..., Awaitable[Any]], *args: Any,
                    **kwargs: Any) -> Any:
        if not self.breaker.allow():
            self.skipped += 1
            return _FAILED
        if self._reads >= self.max_reads:
            self.busy += 1
            return _FAILED
        self._reads += 1
        try:
            if not await self._acquire(self.deadline):
                self.busy += 1
                return _FAILED
            try:
                return await self._timed(command(*args, **kwargs), self.deadline)
            finally:
                self._wire.release()
        finally:
            self._reads -= 1

    async def _acquire(self, deadline: float) -> bool:
        if not self._wire.locked():
            await self._wire.acquire()  # free: returns without suspending
            return True
        try:
            async with asyncio.timeout(deadline):
                await self._wire.acquire()
        except TimeoutError:
            return False
        return True

    async def _get_and_lease(self, data_key: bytes) -> tuple[bytes | None, bool]:
        # Not a transaction (MULTI/EXEC): nothing needs both commands atomic, and a plain
        # pipeline is one write and one read on the socket, on a cluster too (one slot).
        pipe = self._client.pipeline(transaction=False)
        pipe.get(data_key)
        pipe.set(data_key + b"/lease", self._token, nx=True, px=self.lease_ms)
        value, leased = await pipe.execute()
        return value, bool(leased)

    async def _write(self, data_key: bytes, value: bytes, px: int) -> None:
        if not await self._acquire(self.write_deadline):
            self.write_drops += 1
            return
        try:
            if await self._timed(self._client.set(data_key, value, px=px),
                                 self.write_deadline) is not _FAILED:
                self.writes += 1
        finally:
            self._wire.release()

    async def _warm(self) -> None:
        # Concurrent PINGs: each takes a connection of its own, so the pool is full after.
        await asyncio.gather(*(self._client.ping() for _ in range(POOL_SIZE)))

    async def _probe(self) -> bool:
        return await self._timed(self._client.ping(), self.write_deadline,
                                 probe=True) is not _FAILED

    async def _timed(self, call: Awaitable[Any], deadline: float, probe: bool = False) -> Any:
        """``call``'s result, or :data:`_FAILED` after counting the failure and opening the
        breaker (a probe's failure only keeps it open)."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            async with asyncio.timeout(deadline):
                result = await call
        except (TimeoutError, RedisTimeoutError):
            kind = "timeout"
        except (RedisConnectionError, OSError):
            kind = "connection"
        except (RedisError, Exception) as exc:  # an error reply (OOM, NOPERM, cluster down)
            kind = "server"
            log.debug("shared cache error: %r", exc)
        else:
            self.rtt.observe(loop.time() - start)
            return result
        if not probe:
            self.errors[kind] += 1
            self.breaker.failure(kind)
        return _FAILED
