"""Shared fixtures: a fake upstream and real sidecars on loopback (ports picked by the OS)."""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

import aiohttp
import dns.asyncquery
import dns.message
import dns.rdatatype
import pytest

from sidecar import Config, HostPort, Sidecar
from sidecar.dns.cache import Cache
from sidecar.testing.clock import OffsetClock
from sidecar.testing.fakeupstream import FakeUpstream
from tests.client_servers import ClientTarget, client_target
from tests.helpers import fake_upstream, running

HAVE_API = importlib.util.find_spec("sidecar.ops.api") is not None


class RunningSidecar:
    """A started in-process :class:`Sidecar` plus the addresses tests need."""

    def __init__(self, sc: Sidecar, upstream: FakeUpstream) -> None:
        self.sc = sc
        self.upstream = upstream
        addr = sc.dns_addresses[0]
        self.host = addr.host
        self.port = addr.port
        self.dns_address = str(addr)
        self.http_url = (f"http://{sc.http_address.host}:{sc.http_address.port}"
                         if sc.http_address else None)

    @property
    def cache(self):
        return self.sc.cache

    async def stop(self) -> None:
        if self.sc.serving:
            await self.sc.stop(drain=1.0)

    async def query(self, name: str, rdtype: str = "A", *, tcp: bool = False,
                    timeout: float = 3.0, **kw) -> dns.message.Message:
        return await query(self.port, name, rdtype, tcp=tcp, timeout=timeout, host=self.host, **kw)


async def query(port: int, name: str, rdtype: str = "A", *, tcp: bool = False,
                timeout: float = 3.0, host: str = "127.0.0.1", **kw) -> dns.message.Message:
    """One real dnspython query to the sidecar."""
    q = dns.message.make_query(name, dns.rdatatype.from_text(rdtype), **kw)
    if tcp:
        return await dns.asyncquery.tcp(q, host, port=port, timeout=timeout)
    return await dns.asyncquery.udp(q, host, port=port, timeout=timeout)


def base_config(upstream: FakeUpstream, **overrides) -> Config:
    cfg = Config(
        listen=(HostPort("127.0.0.1", 0),),
        http=HostPort("127.0.0.1", 0) if HAVE_API else None,
        upstreams=(HostPort("127.0.0.1", upstream.port),),
        timeout=1.0,
        tries=2,
    )
    return replace(cfg, **overrides)


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    async with fake_upstream() as up:
        yield up


@pytest.fixture
async def make_sidecar(upstream: FakeUpstream
                       ) -> AsyncIterator[Callable[..., Awaitable[RunningSidecar]]]:
    started: list[RunningSidecar] = []

    async def make(**overrides) -> RunningSidecar:
        sc = Sidecar(base_config(upstream, **overrides))
        await sc.start()
        rs = RunningSidecar(sc, upstream)
        started.append(rs)
        return rs

    try:
        yield make
    finally:
        for rs in started:
            await rs.stop()


@pytest.fixture
async def sidecar(make_sidecar) -> RunningSidecar:
    return await make_sidecar()


@pytest.fixture
def clock(monkeypatch) -> OffsetClock:
    """The clock of every sidecar the test then makes (its cache's, which the DNS and the
    miss path read): ``clock.advance(s)`` ages the cache by ``s`` seconds at once."""
    clock = OffsetClock()
    monkeypatch.setattr("sidecar.server.Cache", functools.partial(Cache, clock=clock))
    return clock


def expire_all(cache: Cache, clock: OffsetClock, ago: float = 1.0) -> None:
    """Move ``clock`` until every entry of ``cache`` expired ``ago`` seconds ago (or more),
    instead of waiting."""
    now = clock()
    clock.advance(max(0.0, max(e.expires for _k, e in cache.items()) - now) + ago)


class RawUdp:
    """A bare UDP client socket for malformed packets; replies are read in order."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.connect((host, port))

    def send(self, data: bytes) -> None:
        self.sock.send(data)

    async def recv(self, timeout: float = 3.0) -> bytes:
        loop = asyncio.get_running_loop()
        return await asyncio.wait_for(loop.sock_recv(self.sock, 65535), timeout)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw_udp():
    socks: list[RawUdp] = []

    def make(port: int) -> RawUdp:
        s = RawUdp(port)
        socks.append(s)
        return s

    yield make
    for s in socks:
        s.close()


# ------------------------------------------------------------------ shared by several modules
# Moved here from the test modules that each defined them (helpers in tests/helpers.py).


@pytest.fixture
async def second_upstream() -> AsyncIterator[FakeUpstream]:
    """Another fake upstream, independent of ``upstream`` (test_faults, test_pools, failover)."""
    async with fake_upstream() as up:
        yield up


@pytest.fixture
async def up() -> AsyncIterator[FakeUpstream]:
    """A fake upstream for tests that build their own Sidecar or query it directly
    (test_api, test_metrics, test_fakeupstream)."""
    async with fake_upstream() as server:
        yield server


@pytest.fixture
async def sc(up: FakeUpstream) -> AsyncIterator[Sidecar]:
    """A bare started :class:`Sidecar` on ``up`` with its HTTP API (test_api, test_metrics)."""
    async with running(up) as s:
        yield s


@pytest.fixture
async def side(sidecar: RunningSidecar) -> AsyncIterator[ClientTarget]:
    """The real sidecar with a /prewarm endpoint, as the client tests see it."""
    target = await client_target(sidecar)
    try:
        yield target
    finally:
        await target.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """An aiohttp client session for the HTTP API tests (test_api, test_api_guards)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        yield session


# ------------------------------------------------------------------ real sidecar processes
# For tests/test_snapshot_process.py and tests/test_process_handover.py: a ``python -m
# sidecar`` process whose stderr a thread reads into a list (the process never blocks on a
# full pipe, and a wait sees every line, also those that arrived together).


class SidecarProcess:
    """A real sidecar process; ``lines`` is its stderr so far."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        import os
        import subprocess
        import sys
        import threading

        self.args = args
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.p = subprocess.Popen([sys.executable, "-m", "sidecar", *args],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True, env=full_env)
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.p.stderr is not None
        for line in self.p.stderr:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def index(self, needle: str, start: int = 0) -> int | None:
        """Where the first line from ``start`` on containing ``needle`` is, or None."""
        with self._cond:
            return next((i for i in range(start, len(self.lines)) if needle in self.lines[i]),
                        None)

    def wait_for(self, needle: str, timeout: float = 15.0, start: int = 0) -> int:
        """Wait for a line containing ``needle`` (from line ``start`` on); its index."""
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                found = self.index(needle, start)
                if found is not None:
                    return found
                left = end - time.monotonic()
                if left <= 0 or (self.p.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"{needle!r} not logged by {self.args!r}; "
                                         f"got {self.lines!r}")
                self._cond.wait(min(left, 0.5))

    def matching(self, needle: str) -> list[str]:
        with self._cond:
            return [line for line in self.lines if needle in line]

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM, then the exit code."""
        import signal

        self.p.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float = 20.0) -> int:
        rc = self.p.wait(timeout=timeout)
        self._reader.join(5)
        return rc

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()
        self._reader.join(5)


@pytest.fixture
def sidecar_process():
    """Start real sidecar processes (``sidecar_process(*args, env=...)``); killed at the end."""
    started: list[SidecarProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> SidecarProcess:
        proc = SidecarProcess(list(args), env)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()


@pytest.fixture
def process_upstream():
    """A fake upstream in its own thread, for tests that talk to it from plain threads and
    real processes (its counters are read from the test's thread)."""
    up = FakeUpstream()
    up.start_in_thread()
    yield up
    up.stop_in_thread()
