"""Plain helpers shared by several test modules (the fixtures built on them are in conftest.py)."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import aiohttp
import dns.asyncquery
import dns.message
import dns.rdatatype

from sidecar import Config, HostPort, Sidecar
from sidecar.testing.fakeupstream import FakeUpstream

# ------------------------------------------------------------------ fake upstreams


@asynccontextmanager
async def fake_upstream() -> AsyncIterator[FakeUpstream]:
    """A started :class:`FakeUpstream` on loopback (port picked by the OS), stopped on exit."""
    server = FakeUpstream()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def hp(up: FakeUpstream) -> HostPort:
    return HostPort("127.0.0.1", up.port)


def upstream_obj(sc, up: FakeUpstream):
    """The sidecar's upstream object (in any pool) that talks to ``up``."""
    (u,) = [u for p in sc.sc.pools.pools for u in p.upstreams if u.addr.port == up.port]
    return u


# ------------------------------------------------------------------ bare Sidecar (API tests)


def make_config(up: FakeUpstream, **overrides: Any) -> Config:
    cfg = Config(listen=(HostPort("127.0.0.1", 0),), http=HostPort("127.0.0.1", 0),
                 upstreams=(HostPort("127.0.0.1", up.port),), timeout=0.2, tries=1)
    return replace(cfg, **overrides)


@asynccontextmanager
async def running(up: FakeUpstream, **overrides: Any) -> AsyncIterator[Sidecar]:
    sc = Sidecar(make_config(up, **overrides))
    await sc.start()
    try:
        yield sc
    finally:
        await sc.stop(drain=0.5)


async def dns_query(sc: Sidecar, name: str, rdtype: str = "A", *,
                    tcp: bool = False) -> dns.message.Message:
    q = dns.message.make_query(name, dns.rdatatype.from_text(rdtype))
    port = sc.dns_addresses[0].port
    if tcp:
        return await dns.asyncquery.tcp(q, "127.0.0.1", port=port, timeout=3)
    return await dns.asyncquery.udp(q, "127.0.0.1", port=port, timeout=3)


#: Ports free_port() handed out in this test run: never handed out twice. The kernel may
#: give a port it just had back again, and callers take two in a row (--listen and --http;
#: once seen in CI as the same port for both).
_handed_out: set[int] = set()


def free_port() -> int:
    """A port free for both UDP and TCP right now, and not handed out before in this run."""
    for _ in range(50):
        t = socket.socket()
        t.bind(("127.0.0.1", 0))
        port = t.getsockname()[1]
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            if port in _handed_out:
                continue
            u.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            u.close()
            t.close()
        _handed_out.add(port)
        return port
    raise RuntimeError("no free port")


# ------------------------------------------------------------------ the HTTP API


def url(sc: Sidecar, path: str) -> str:
    """The URL of ``path`` on a started Sidecar's HTTP API."""
    return f"http://{sc.http_address}{path}"


async def call(http: aiohttp.ClientSession, method: str, target: str,
               **kw: Any) -> tuple[int, Any, aiohttp.ClientResponse]:
    """One HTTP request: (status, JSON or text body, response)."""
    async with http.request(method, target, **kw) as resp:
        if resp.content_type == "application/json":
            return resp.status, await resp.json(), resp
        return resp.status, await resp.text(), resp
