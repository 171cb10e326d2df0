"""The shared cache: a Valkey/Redis server (or Redis Cluster) as the fleet's second level.

:class:`SharedCache` implements :class:`~sidecar.miss.second.SecondLevel` over redis-py's
asyncio clients. Every call runs under a deadline and behind a circuit breaker
(:mod:`sidecar.fleet.breaker`): the shared cache is never required, so a server that is
down, slow or full costs a lookup at most one deadline, and then nothing until a background
probe finds it healthy again. Values are untrusted (:mod:`sidecar.fleet.codec`).

A burst of misses must not cost a round trip per key: lookups started in one event-loop
iteration leave as one pipeline (:class:`~sidecar.fleet.batch.Batcher`), writes likewise.
Each lookup and each write is one server-side script (:mod:`sidecar.fleet.scripts`): a
lookup that finds the name leased by another sidecar marks it as waited for, and the
holder's write publishes the value to the waiters (:mod:`sidecar.fleet.notify`). While the
subscription is down, waiters are polled by one read per tick. The bounds are on keys
waiting, not on commands.

URL forms (password, username and db as redis-py parses them):

* ``redis://[user:password@]host:port[/db]``: one server;
* ``rediss://...``: the same over TLS;
* ``redis+cluster://[user:password@]host:port`` and ``rediss+cluster://...``: a Redis
  Cluster, discovered from that node (db must be 0).

Keys: ``<prefix>{<name>/<qtype>/<qclass>}`` for values (the name in presentation form,
lower-case, as ``qname_text`` escapes it), the same plus ``/lease`` for the fleet's per-key
lease and ``/wait`` for its waited-for mark; the channel ``<prefix>notices``. An ACL can
confine a sidecar to ``~<prefix>*`` and ``&<prefix>*``. The braces are a Redis Cluster hash
tag: a value, its lease and its mark live in one slot, as a script's keys must.
"""

from __future__ import annotations

import asyncio
import functools
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
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sidecar.config import check_shared_cache_url
from sidecar.dns.cache import EXPIRES, RawEntry
from sidecar.dns.wire import key_type, qname_text
from sidecar.fleet import codec, scripts
from sidecar.fleet.batch import Batcher
from sidecar.fleet.breaker import Breaker
from sidecar.fleet.lanes import Lanes
from sidecar.fleet.notify import Notices
from sidecar.upstream.latency import LatencyTracker

log = logging.getLogger("sidecar.fleet")

DEFAULT_PREFIX: Final = "dns-sidecar:v1:"
#: Deadline of a lookup (seconds): a shared hit must stay far cheaper than an upstream miss.
#: It bounds each batch's round trip (the batch is the unit that meets or misses it).
DEFAULT_DEADLINE: Final = 0.03
#: Background writes and probes may take this many lookup deadlines (a new connection
#: costs a few round trips; nobody waits for a write).
WRITE_DEADLINE_FACTOR: Final = 4
WRITE_DEADLINE_MIN: Final = 0.25
#: Keys queued or in a lookup batch at most; beyond, the miss goes straight upstream
#: (``busy``). A key costs a few hundred bytes while it waits, and a hung server opens the
#: breaker within one deadline, so the bound is about memory, not about the server: it is
#: set far above a cold burst, which now waits in batches instead of for connections.
MAX_READS: Final = 4096
#: Writes queued or in a write batch at most, and their value bytes at most; beyond either,
#: a write is dropped (and counted): a slow server must not collect an unbounded queue.
MAX_WRITES: Final = 4096
MAX_WRITE_BYTES: Final = 4 << 20
#: Notices kept for a waiter whose lookup reply is still on its way: their value bytes at
#: most (and no more of them than ``max_reads``). Anyone who can publish on the channel
#: could otherwise park ``max_reads`` values of the largest size here (~300 MiB).
EARLY_BYTES: Final = 1 << 20
#: Keys in one pipeline at most: a larger batch would hold the loop while redis-py packs and
#: parses it, and one slow batch would delay more lookups.
MAX_BATCH: Final = 512
#: Batches in flight at most, per kind. While they are all out, new keys wait for the next
#: batch, which grows with the backlog: a burst costs a few round trips, not one per key.
READ_BATCHES: Final = 4
WRITE_BATCHES: Final = 2
#: A write batch beyond those, only for values whose lease we hold: the fleet's waiters poll
#: for them, so they must not queue behind other writes (another waiter's own answer to the
#: same name, a prefetch), which nobody waits for.
HELD_WRITE_BATCHES: Final = 1
#: Connections to one server for batches, all opened by ``start()``: one per batch that may
#: be in flight (lookups, writes, the poll). A batch that cannot get one within its
#: deadline is our congestion, not the server's failure: ``busy``, breaker left alone.
#: On a single server these are :class:`~sidecar.fleet.lanes.Lanes`.
WIRES: Final = READ_BATCHES + WRITE_BATCHES + HELD_WRITE_BATCHES + 1
#: The client's own pool: the probe and script loads (on a cluster the batches too).
PROBES: Final = 1
POOL_SIZE: Final = WIRES + PROBES
#: Plus the subscription to the notices, held from start to close.
SUBSCRIPTIONS: Final = 1
#: Lifetime of a lease: how long the fleet defers to a sidecar resolving a name. Longer
#: than any answer takes; a holder that died costs the others only their own wait.
LEASE_TTL: Final = 1.0
#: Lease waiters are woken by the holder's notice; their give-up times are checked every
#: tick. While the notices are down, each tick reads all their keys (one round trip per
#: sidecar whatever the number of waiters): the tick is then the latency a waiter adds.
POLL_INTERVAL: Final = 0.005
#: With the notices up, a read every this many ticks all the same: for a notice lost with
#: a dropped connection, and for holders that do not publish (a fleet mid-upgrade).
BACKSTOP_TICKS: Final = 10
#: The lease wait's percentiles (round trip, our writes) are reused for this long: a burst
#: asks for hundreds of waiters at once, and a percentile sorts its samples.
ESTIMATE_REUSE: Final = 0.01
#: Turns of the event loop (each with a poll of the sockets) a call may still take after its
#: deadline passed, to read a reply that arrived in time (see :class:`_Expiry`).
GRACE_TURNS: Final = 3

#: The scheme suffix that names a Redis Cluster (sidecar.config.SHARED_CACHE_SCHEMES).
_CLUSTER: Final = "+cluster"
_FAILED: Final = object()

ERROR_KINDS: Final = ("timeout", "connection", "server", "corrupt")
#: A value key's length past its prefix at most: a name of 255 octets, each escaped in 4
#: bytes at worst, the tag's braces, type and class.
_MAX_KEY_TAIL: Final = 1100

#: A lookup waiting in a batch: the value key and its caller's future of (value, leased).
_Read = tuple[bytes, "asyncio.Future[Any]"]
#: A write waiting in a batch: value key, value, PX milliseconds, and when it was queued if
#: the fleet waits for it (we hold its lease), else None.
_Write = tuple[bytes, bytes, int, float | None]


class _Waiter:
    """A lookup waiting for another sidecar's value: its key, since when, until when (as
    last estimated), what a plain miss costs (``plain()``), and its future of the value
    (None: gave up; :data:`_FAILED`: the server failed)."""

    __slots__ = ("data_key", "since", "until", "plain", "fut", "late")

    def __init__(self, data_key: bytes, since: float, until: float,
                 plain: Callable[[], float], fut: asyncio.Future[Any]) -> None:
        self.data_key = data_key
        self.since = since
        self.until = until
        self.plain = plain
        self.fut = fut
        #: Gave up, and now only listens for the value until the lease ends (:meth:`late`).
        self.late = False


def parse_url(url: str) -> tuple[str, bool]:
    """(the URL redis-py reads, whether it names a cluster); a ``ValueError``
    (:class:`~sidecar.errors.ConfigError`) for a URL ``--shared-cache`` refuses."""
    check_shared_cache_url(url)
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme.endswith(_CLUSTER):
        return urlunsplit(parts._replace(scheme=scheme[: -len(_CLUSTER)])), True
    return url, False


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
    kwargs: dict[str, Any] = dict(socket_timeout=None, socket_connect_timeout=timeout,
                                  retry=Retry(NoBackoff(), 0))
    if cluster:
        return RedisCluster.from_url(real, max_connections=max_connections, **kwargs)
    return Redis.from_pool(BlockingConnectionPool.from_url(
        real, max_connections=pool_size, timeout=None, **kwargs))


class SharedCache:
    """The fleet's shared cache at ``url`` under key ``prefix``; lookups give up after
    ``deadline`` seconds. Entry times are on ``clock`` (the local cache's clock).

    ``await start()`` (optional) opens the connections; ``await close()`` at shutdown.
    """

    def __init__(self, url: str, prefix: str = DEFAULT_PREFIX,
                 deadline: float = DEFAULT_DEADLINE, *,
                 clock: Callable[[], float] = time.monotonic,
                 max_writes: int = MAX_WRITES, max_reads: int = MAX_READS,
                 max_write_bytes: int = MAX_WRITE_BYTES, max_batch: int = MAX_BATCH,
                 lease_ttl: float = LEASE_TTL, poll_interval: float = POLL_INTERVAL,
                 backstop_ticks: int = BACKSTOP_TICKS) -> None:
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
        self.max_write_bytes = max_write_bytes
        self.lease_ttl = lease_ttl
        self.lease_ms = max(1, int(lease_ttl * 1000))
        self.poll_interval = poll_interval
        self.backstop_ticks = backstop_ticks
        self._client = connect(url, self.write_deadline, 2 * POOL_SIZE,
                               (POOL_SIZE if self.cluster else PROBES) + SUBSCRIPTIONS)
        #: A single server's batches go over connections of their own (one command each).
        self._lanes = (None if isinstance(self._client, RedisCluster)
                       else Lanes(self._client.connection_pool, WIRES))
        self.breaker = Breaker(self._probe)
        self.channel = self._prefix + scripts.CHANNEL_SUFFIX
        # redis-py's asyncio cluster client has pubsub() from 8.0 on; before, a cluster's
        # waiters poll.
        self.notices = Notices(getattr(self._client, "pubsub", None), self.channel,
                               self._notice, self._notices_up, deadline=self.write_deadline)
        self._token = os.urandom(8).hex()
        self._wire = asyncio.Semaphore(WIRES)
        self._lookups: Batcher[_Read] = Batcher(self._lookup_batch, max_batch=max_batch,
                                                parallel=READ_BATCHES)
        self._writes: Batcher[_Write] = Batcher(self._write_batch, max_batch=max_batch,
                                                parallel=WRITE_BATCHES,
                                                reserve=HELD_WRITE_BATCHES)
        #: value key -> when we won its lease (event-loop time), until our answer is written.
        self._held: dict[bytes, float] = {}
        self._write_bytes = 0
        #: value key -> the lookups waiting for it.
        self._waiters: dict[bytes, list[_Waiter]] = {}
        self._nwaiters = 0
        #: value key -> (when, value) of notices that came before their waiter: the notice
        #: and the lookup's reply travel on two connections.
        self._early: dict[bytes, tuple[float, bytes]] = {}
        self._early_bytes = 0
        #: value key -> (since when, future of the value) of waits that gave up, until the
        #: miss path takes the future (:meth:`late`).
        self._late: dict[bytes, tuple[float, asyncio.Future[Any]]] = {}
        self._poller: asyncio.Task[None] | None = None
        self._ticks = 0
        self._resync = False
        self.polls = 0
        self.notices_sent = 0     # our writes that published a notice
        self.notices_used = 0     # notices that woke a waiter
        self.notices_bad = 0      # messages on the channel that were not a notice
        self.script_loads = 0     # pipelines that found the scripts missing
        self.rtt = LatencyTracker()
        #: From queueing to acknowledged, of the values whose lease we held: what the fleet's
        #: waiters wait for after the holder's answer (queue and loop lag included).
        self.held_writes = LatencyTracker()
        self._estimates = (0.0, 0.0, 0.0)  # valid until, round trip p90, held write p90
        self.hits = 0
        self.misses = 0
        self.skipped = 0          # lookups not sent: breaker open
        self.busy = 0             # lookups not sent: max_reads waiting, or no connection
        self.writes = 0           # values written
        self.write_drops = 0      # not written: bound reached, no connection, or breaker open
        self.unshareable = 0      # not written: SERVFAIL, nearly expired, or too large
        self.errors = dict.fromkeys(ERROR_KINDS, 0)
        self.rejected = dict.fromkeys((*codec.REASONS, "scrub"), 0)
        self.lease_won = 0
        self.lease_waited = 0
        self.lease_wait_hits = 0
        self.lease_timeouts = 0
        self.lease_late_hits = 0  # given up, then the value came before our own answer

    # ------------------------------------------------------------------ keys

    def data_key(self, key: bytes) -> bytes:
        """``<prefix>{<name>/<qtype>/<qclass>}``: the braces are Redis Cluster's hash tag, so
        the value, its lease and its wait mark (the suffixes of :mod:`~sidecar.fleet.scripts`)
        hash to one slot, as a script's keys must."""
        return _data_key(self._prefix, key)

    # ------------------------------------------------------------------ SecondLevel

    async def lookup(self, key: bytes, wait: Callable[[], float]) -> RawEntry | None:
        """The shared entry for ``key``, or None: resolve it upstream.

        The key joins the next lookup batch, which reads the values and claims the fleet's
        leases of all its keys in one pipelined round trip. A miss whose lease another
        sidecar holds waits for that sidecar's value (:meth:`lease_wait` of ``wait()``),
        which its write publishes to us. None too whenever the server is not asked (breaker
        open, too many keys waiting) or fails, and for a value that is unusable."""
        if not self.breaker.allow():
            self.skipped += 1
            return None
        if self._lookups.pending >= self.max_reads:
            self.busy += 1
            return None
        data_key = self.data_key(key)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._lookups.add((data_key, fut))
        got = await fut
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
            self._hold(data_key)
            return None
        self.lease_waited += 1
        value = await self._wait_for(data_key, wait)
        if value is not None and value is not _FAILED:
            entry = self._decode(key, value)
            if entry is not None:  # an unusable value stays until our answer replaces it
                self.hits += 1
                self.lease_wait_hits += 1
                return entry
        self.lease_timeouts += 1
        return None

    def lease_wait(self, plain: float) -> float:
        """How long a lease waiter waits, given ``plain``: what resolving the name itself
        would take. The holder's answer comes after its upstream time plus its write and our
        next poll (the poll also a tick late), so a shorter wait would nearly always expire
        just before the value arrives and then pay the plain miss on top. The write is
        reckoned as long as ours take when others wait for them (queue and loop lag
        included: the holder runs the same code in the same burst), or a round trip before
        we held a lease; the poll as a round trip. Both are measured here, and each call is
        bounded by its deadline. Never past the lease: a holder still silent then has
        died."""
        now = asyncio.get_running_loop().time()
        until, rtt, write = self._estimates
        if until <= now:
            rtt = self.rtt.percentile(0.9) or self.deadline
            write = max(rtt, self.held_writes.percentile(0.9) or 0.0)
            self._estimates = (now + ESTIMATE_REUSE, rtt, write)
        return min(self.lease_ttl, plain + write + rtt + self.poll_interval)

    def late(self, key: bytes) -> asyncio.Future[RawEntry | None] | None:
        """After :meth:`lookup` gave up waiting for ``key``: a future of the holder's entry,
        should its value still come within the lease (None: the wait did not give up, or
        the server failed). Cancelling it stops the listening."""
        if not self._late:  # no wait gave up: the common case costs no key
            return None
        got = self._late.pop(self.data_key(key), None)
        if got is None:
            return None
        fut = got[1]
        if fut.done() and (fut.cancelled() or fut.result() is None or fut.result() is _FAILED):
            return None
        return asyncio.ensure_future(self._late_entry(key, fut))

    async def _late_entry(self, key: bytes, value: asyncio.Future[Any]) -> RawEntry | None:
        got = await value
        if got is None or got is _FAILED:
            return None
        entry = self._decode(key, got)
        if entry is not None:  # the lookup's miss turned out a hit (reject() may undo it)
            self.hits += 1
            self.misses -= 1
            self.lease_late_hits += 1
        return entry

    def _hold(self, data_key: bytes) -> None:
        """Remember that the fleet waits for our value of ``data_key`` (:meth:`put` sends it
        ahead of other writes). A fetch that fails writes nothing: its key is forgotten with
        the lease."""
        now = asyncio.get_running_loop().time()
        if len(self._held) >= self.max_writes:
            self._held = {k: t for k, t in self._held.items() if now - t < self.lease_ttl}
            if len(self._held) >= self.max_writes:
                return  # the value then merely queues like any other write
        self._held[data_key] = now

    def put(self, key: bytes, entry: RawEntry) -> None:
        """Write ``entry`` in the next write batch, expiring with it; never waits, never
        raises."""
        if not self.breaker.allow() or self._writes.pending >= self.max_writes:
            self.write_drops += 1
            return
        mono, wall = self.clock(), time.time()
        value = codec.encode(key, entry, mono, wall)
        if value is None:
            self.unshareable += 1
            return
        if self._write_bytes + len(value) > self.max_write_bytes:
            self.write_drops += 1
            return
        self._write_bytes += len(value)
        px = int((entry[EXPIRES] - mono) * 1000)
        data_key = self.data_key(key)
        if self._held.pop(data_key, None) is not None:
            self._writes.add((data_key, value, px, asyncio.get_running_loop().time()), first=True)
        else:
            self._writes.add((data_key, value, px, None))

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
        """Open the connections, load the scripts and subscribe to the notices (a failure
        opens the breaker; never raises)."""
        self.notices.start()
        ok = await self._timed(self._warm(), self.write_deadline)
        if ok is _FAILED:
            log.warning("shared cache %s not reachable at start; DNS works without it",
                        self.url)

    async def flush(self, timeout: float) -> None:
        """Wait at most ``timeout`` seconds for the writes queued or in flight now."""
        await self._writes.drain(timeout)

    async def close(self) -> None:
        """Stop probing and polling, give queued writes one write deadline, close the
        connections. Lookups still waiting get None."""
        await self.breaker.close()
        await self.notices.close()
        await self._writes.drain(self.write_deadline)
        self._write_bytes = 0
        self.write_drops += len(self._writes.take_queue())
        await self._writes.close()
        for _data_key, fut in self._lookups.take_queue():
            _settle(fut, _FAILED)
        await self._lookups.close()
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        for ws in self._waiters.values():
            for w in ws:
                _settle(w.fut, _FAILED)
        self._waiters = {}
        self._nwaiters = 0
        if self._lanes is not None:
            await self._lanes.close()
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
            "writes_inflight": self._writes.pending,
            "write_queue_bytes": self._write_bytes,
            "write_drops": self.write_drops,
            "unshareable": self.unshareable,
            "errors": dict(self.errors),
            "rejected": dict(self.rejected),
            "leases": {"won": self.lease_won, "waited": self.lease_waited,
                       "wait_hits": self.lease_wait_hits, "timeouts": self.lease_timeouts,
                       "late_hits": self.lease_late_hits},
            "batches": {"lookups": self._lookups.batches, "writes": self._writes.batches,
                        "polls": self.polls},
            "notices": {"live": self.notices.live, "sent": self.notices_sent,
                        "received": self.notices.received, "used": self.notices_used,
                        "bad": self.notices_bad, "subscribed": self.notices.subscribed,
                        "failures": self.notices.failures},
            "rtt_ms": {"ewma": None if rtt.ewma is None else round(rtt.ewma * 1000, 3),
                       "p50": None if p50 is None else round(p50 * 1000, 3),
                       "p99": None if p99 is None else round(p99 * 1000, 3)},
        }

    # ------------------------------------------------------------------ batches

    async def _lookup_batch(self, batch: list[_Read]) -> None:
        """Values and leases of ``batch`` in one round trip; every future gets its pair or
        :data:`_FAILED` (also when cancelled at shutdown)."""
        got: Any = _FAILED
        try:
            if not self.breaker.allow():
                self.skipped += len(batch)
            elif not await self._acquire(self.deadline):
                self.busy += len(batch)
            else:
                try:
                    got = await self._timed(self._get_and_lease([k for k, _ in batch]),
                                            self.deadline)
                finally:
                    self._wire.release()
        finally:
            if got is _FAILED:
                for _k, fut in batch:
                    _settle(fut, _FAILED)
            else:
                for (_k, fut), pair in zip(batch, got, strict=True):
                    _settle(fut, pair)

    async def _get_and_lease(self, keys: list[bytes]) -> list[tuple[bytes | None, bool]]:
        # A single server: one script for the batch. A cluster: one per key (a script's keys
        # must share a slot).
        commands = []
        for group in ([keys] if not self.cluster else [[k] for k in keys]):
            args = [x for k in group
                    for x in (k, k + scripts.LEASE_SUFFIX, k + scripts.WAIT_SUFFIX)]
            commands.append(("EVALSHA", scripts.LOOKUP_SHA, len(args), *args,
                             self._token, self.lease_ms))
        flat = [x for reply in await self._scripted(commands) for x in reply]
        return [(flat[i], bool(flat[i + 1])) for i in range(0, len(flat), 2)]

    async def _scripted(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """The replies of ``commands`` (scripts by SHA); a server that lost the scripts
        (restart, SCRIPT FLUSH, a new cluster node) gets them loaded and the commands once
        more. Both scripts may run twice: a lookup finds its own lease, a write publishes
        to nobody."""
        try:
            return await self._send(commands)
        except NoScriptError:
            self.script_loads += 1
            await self._load_scripts()
        return await self._send(commands)

    async def _send(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """The replies of ``commands``: on a single server over a lane of our own, on a
        cluster as a pipeline (not a transaction) that redis-py routes by slot and sends to
        every node at once."""
        if self._lanes is not None:
            return await self._lanes.call(commands)
        pipe = self._client.pipeline(transaction=False)
        for c in commands:
            pipe.execute_command(*c)
        return list(await pipe.execute())

    async def _load_scripts(self) -> None:
        for sha, text in scripts.SCRIPTS:
            loaded = await self._client.script_load(text)
            if isinstance(loaded, dict):  # a cluster: one reply per primary
                loaded = set(loaded.values())
            if loaded != sha and loaded != {sha}:
                raise RedisError(f"script loaded as {loaded!r}, not {sha}")

    async def _write_batch(self, batch: list[_Write]) -> None:
        try:
            if not self.breaker.allow():
                self.write_drops += len(batch)
                return
            if not await self._acquire(self.write_deadline):
                self.write_drops += len(batch)
                return
            try:
                commands = []
                for group in [batch] if not self.cluster else [[w] for w in batch]:
                    ks = [x for k, _v, _px, _q in group for x in (k, k + scripts.WAIT_SUFFIX)]
                    argv = [x for _k, v, px, _q in group for x in (v, px)]
                    commands.append(("EVALSHA", scripts.WRITE_SHA, len(ks), *ks,
                                     self.channel, *argv))
                published = await self._timed(self._scripted(commands), self.write_deadline)
                if published is not _FAILED:
                    self.writes += len(batch)
                    self.notices_sent += sum(published)
                    now = asyncio.get_running_loop().time()
                    for *_kvp, queued in batch:
                        if queued is not None:
                            self.held_writes.observe(now - queued)
            finally:
                self._wire.release()
        finally:
            self._write_bytes -= sum(len(v) for _k, v, _px, _q in batch)

    # ------------------------------------------------------------------ lease waiters

    def _wait_for(self, data_key: bytes, plain: Callable[[], float]) -> asyncio.Future[Any]:
        """A future of the value at ``data_key`` once another sidecar wrote it: None after
        :meth:`lease_wait` without, :data:`_FAILED` when the server failed or too many
        wait."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        now = loop.time()
        early = self._early.pop(data_key, None)
        if early is not None:
            self._early_bytes -= len(early[1])
        if early is not None and now - early[0] < self.lease_ttl:
            self.notices_used += 1
            fut.set_result(early[1])
            return fut
        if self._nwaiters >= self.max_reads:
            self.busy += 1
            fut.set_result(_FAILED)
            return fut
        w = _Waiter(data_key, now, now + self.lease_wait(plain()), plain, fut)
        self._waiters.setdefault(data_key, []).append(w)
        self._nwaiters += 1
        if self._poller is None:
            self._poller = loop.create_task(self._poll_loop())
        return fut

    def _notice(self, message: bytes) -> None:
        """A notice from the channel: wake the waiters of its key with its value, or keep
        it briefly for a waiter whose lookup reply is still on its way."""
        try:
            data_key, value = scripts.parse_notice(
                message, self._prefix, len(self._prefix) + _MAX_KEY_TAIL, codec.MAX_VALUE)
        except scripts.BadNotice as exc:
            self.notices_bad += 1
            log.debug("shared cache notice ignored: %s", exc)
            return
        waiters = self._waiters.pop(data_key, None)
        if waiters is None:
            self._keep_early(data_key, value)
            return
        self._nwaiters -= len(waiters)
        for w in waiters:
            if not w.fut.done():
                self.notices_used += 1
                w.fut.set_result(value)

    def _keep_early(self, data_key: bytes, value: bytes) -> None:
        # Most notices are for keys nobody here waits for (other sidecars' waits): kept for
        # one lease at most, within the count and byte bounds, oldest out first (the dict
        # is in arrival order).
        now = asyncio.get_running_loop().time()
        early = self._early
        old = early.pop(data_key, None)
        if old is not None:
            self._early_bytes -= len(old[1])
        early[data_key] = (now, value)
        self._early_bytes += len(value)
        while (len(early) > self.max_reads or self._early_bytes > EARLY_BYTES
               or now - next(iter(early.values()))[0] >= self.lease_ttl):
            _t, gone = early.pop(next(iter(early)))
            self._early_bytes -= len(gone)

    def _notices_up(self) -> None:
        """The subscription is (back) up: what was published while it was down comes from
        one read."""
        self._resync = True

    async def _poll_loop(self) -> None:
        """Until nobody waits: every tick, give up on the waits that are due; read the
        waited-for keys when the notices are down, just came up, or every
        ``backstop_ticks`` ticks."""
        loop = asyncio.get_running_loop()
        try:
            while self._waiters:
                await asyncio.sleep(self.poll_interval)
                self._ticks += 1
                now = loop.time()
                for w in self._live_waiters():
                    if w.until <= now:
                        if w.late:
                            _settle(w.fut, None)
                            continue
                        # Estimated again when due, from what a miss costs now: a burst
                        # slows the holder's answer and our own misses alike.
                        w.until = w.since + self.lease_wait(w.plain())
                        if w.until <= now:
                            self._give_up(w, now)
                self._prune()
                if not self._waiters:
                    break
                if self.notices.live and not self._resync \
                        and self._ticks % self.backstop_ticks:
                    continue
                self._resync = False
                keys = list(self._waiters)[:MAX_BATCH * 4]
                values = await self._read_values(keys)
                if values is _FAILED:
                    for w in self._live_waiters():
                        _settle(w.fut, _FAILED)
                else:
                    for k, v in zip(keys, values, strict=True):
                        for w in self._waiters.get(k, ()) if v is not None else ():
                            _settle(w.fut, v)
                self._prune()
        finally:
            self._poller = None

    def _give_up(self, w: _Waiter, now: float) -> None:
        """End ``w``'s wait (the lookup answers None) and keep listening for its value
        until the lease ends, for the miss path to race against its own answer."""
        gave_up, w.fut = w.fut, asyncio.get_running_loop().create_future()
        w.late = True
        w.until = w.since + self.lease_ttl
        late = self._late
        if len(late) >= self.max_reads:  # futures the miss path never took
            for k in [k for k, (t, _f) in late.items() if now - t >= self.lease_ttl]:
                del late[k]
            if len(late) >= self.max_reads:
                _settle(late.pop(next(iter(late)))[1], None)
        late[w.data_key] = (now, w.fut)
        _settle(gave_up, None)

    def _live_waiters(self) -> list[_Waiter]:
        return [w for ws in self._waiters.values() for w in ws if not w.fut.done()]

    def _prune(self) -> None:
        """Forget the waiters that are settled."""
        live: dict[bytes, list[_Waiter]] = {}
        n = 0
        for k, ws in self._waiters.items():
            ws = [w for w in ws if not w.fut.done()]
            if ws:
                live[k] = ws
                n += len(ws)
        self._waiters = live
        self._nwaiters = n

    async def _read_values(self, keys: list[bytes]) -> Any:
        if not self.breaker.allow():
            return _FAILED
        if not await self._acquire(self.deadline):
            return _FAILED
        self.polls += 1
        try:
            if self.cluster:  # MGET's keys must share a slot
                return await self._timed(self._send([("GET", k) for k in keys]), self.deadline)
            got = await self._timed(self._send([("MGET", *keys)]), self.deadline)
            return got if got is _FAILED else got[0]
        finally:
            self._wire.release()

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

    async def _warm(self) -> None:
        # Every connection a batch may use is opened now: one opened inside a lookup's
        # deadline could cost the deadline. A single server: the lanes, and one PING for
        # the pool's connection (the probe, script loads). A cluster: concurrent PINGs to
        # every node, each taking a connection of its own, so each node's pool is full
        # after (a lookup batch goes to all of them at once).
        if self._lanes is not None:
            await self._lanes.open()
            await self._client.ping()
        else:
            await asyncio.gather(*(self._client.ping(target_nodes=RedisCluster.ALL_NODES)
                                   for _ in range(POOL_SIZE)))
        await self._load_scripts()

    async def _probe(self) -> bool:
        return await self._timed(self._client.ping(), self.write_deadline,
                                 probe=True) is not _FAILED

    async def _timed(self, call: Awaitable[Any], deadline: float, probe: bool = False) -> Any:
        """``call``'s result, or :data:`_FAILED` after counting the failure and opening the
        breaker (a probe's failure only keeps it open)."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        expiry = timer = None
        try:
            async with asyncio.timeout(None) as cm:
                expiry = _Expiry(cm, GRACE_TURNS)
                # cancelled when done: a timer left behind wakes an idle loop once per call
                timer = loop.call_at(start + deadline, expiry.fire)
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
        finally:
            if expiry is not None:
                expiry.active = False
            if timer is not None:
                timer.cancel()
        if not probe:
            self.errors[kind] += 1
            self.breaker.failure(kind)
        return _FAILED


class _Expiry:
    """Ends ``cm`` (an ``asyncio.timeout``) once fired and then ``turns`` more turns of the
    loop, each with a look at the sockets. A loop busy with a burst runs its timers before
    it reads the sockets, so a reply that came in time could otherwise be cancelled unread
    and open the breaker for our own lag; a server that did not answer costs a few turns
    more than its deadline."""

    __slots__ = ("cm", "turns", "active")

    def __init__(self, cm: asyncio.Timeout, turns: int) -> None:
        self.cm = cm
        self.turns = turns
        self.active = True

    def fire(self) -> None:
        if not self.active:
            return
        loop = asyncio.get_running_loop()
        if self.turns > 0:
            self.turns -= 1
            loop.call_soon(self.fire)  # runs after the loop's next poll of its sockets
        else:
            self.cm.reschedule(loop.time())


@functools.lru_cache(maxsize=MAX_READS)
def _data_key(prefix: bytes, key: bytes) -> bytes:
    # Memoized: a miss asks for its key on lookup and again on write, and the name's
    # presentation form is most of a lookup's own CPU.
    return b"%s{%s/%d/%d}" % (prefix, qname_text(key).encode(), key_type(key),
                              int.from_bytes(key[-2:], "big"))


def _settle(fut: asyncio.Future[Any], result: Any) -> None:
    if not fut.done():
        fut.set_result(result)
