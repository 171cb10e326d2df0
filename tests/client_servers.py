"""Loopback servers for the client tests: HTTP behaviours, TLS, and a /prewarm stand-in.

Everything binds 127.0.0.0/8 only. Nothing here sleeps to synchronise: servers that
must hang wait on an event that is set when they are stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.asyncquery
import dns.message
import dns.rcode
import dns.rdatatype
from aiohttp import web

__all__ = [
    "HttpServer",
    "PrewarmStandIn",
    "RawServer",
    "SplitRcodeDNS",
    "blackhole_port",
    "closed_port",
    "make_cert",
    "serving_http",
    "start_http",
    "start_raw",
]

BODY = b"hello from the test server\n"


# --------------------------------------------------------------------------- HTTP


@dataclass
class HttpServer:
    """An aiohttp.web server on one loopback address and a free port.

    ``hits`` counts requests that reached a handler; ``arrived`` is set at the first.

    Routes: ``/`` (200, :data:`BODY`), ``/status/{code}``, ``/hang`` (headers never
    sent until the server stops), ``/cut`` (headers + part of the body, then the
    connection is closed), ``/stall`` (headers + part of the body, then nothing until
    the server stops), ``/redirect/{n}`` (n redirects, then ``/``).
    """

    host: str
    port: int
    runner: web.AppRunner
    release: asyncio.Event
    hits: int = 0
    scheme: str = "http"
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def _hit(self) -> None:
        self.hits += 1
        self.arrived.set()

    def url(self, hostname: str | None = None, path: str = "/") -> str:
        return f"{self.scheme}://{hostname or self.host}:{self.port}{path}"

    async def stop(self) -> None:
        self.release.set()
        await self.runner.cleanup()


async def start_http(host: str = "127.0.0.1", ssl_context: ssl.SSLContext | None = None
                     ) -> HttpServer:
    release = asyncio.Event()
    holder: dict[str, HttpServer] = {}

    async def index(request: web.Request) -> web.Response:
        holder["s"]._hit()
        return web.Response(body=BODY, content_type="text/plain")

    async def status(request: web.Request) -> web.Response:
        holder["s"]._hit()
        return web.Response(status=int(request.match_info["code"]), text="status\n")

    async def hang(request: web.Request) -> web.Response:
        holder["s"]._hit()
        await release.wait()
        return web.Response(text="too late\n")

    async def cut(request: web.Request) -> web.StreamResponse:
        holder["s"]._hit()
        resp = web.StreamResponse(headers={"Content-Length": "100000"})
        await resp.prepare(request)
        await resp.write(b"x" * 1000)
        assert request.transport is not None
        request.transport.close()  # mid-body: 99000 bytes never come
        return resp

    async def stall(request: web.Request) -> web.StreamResponse:
        holder["s"]._hit()
        resp = web.StreamResponse(headers={"Content-Length": "100000"})
        await resp.prepare(request)
        await resp.write(b"x" * 1000)
        await release.wait()  # the rest of the body never comes while running
        return resp

    async def redirect(request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        raise web.HTTPFound(f"/redirect/{n - 1}" if n > 1 else "/")

    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_get("/status/{code}", status)
    app.router.add_get("/hang", hang)
    app.router.add_get("/cut", cut)
    app.router.add_get("/stall", stall)
    app.router.add_get("/redirect/{n}", redirect)
    runner = web.AppRunner(app, shutdown_timeout=0.1, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, 0, ssl_context=ssl_context)
    await site.start()
    port = runner.addresses[0][1]
    server = HttpServer(host, port, runner, release, scheme="https" if ssl_context else "http")
    holder["s"] = server
    return server


# --------------------------------------------------------------------------- raw TCP



@contextlib.asynccontextmanager
async def serving_http(host: str):
    """:func:`start_http` on ``host``, stopped on exit (the client tests' ``web`` fixtures)."""
    server = await start_http(host)
    try:
        yield server
    finally:
        await server.stop()


@dataclass
class RawServer:
    """A raw TCP server: ``mode="silent"`` reads requests and never answers;
    ``mode="close"`` closes the connection as soon as a request arrives; ``mode="accept-
    close"`` closes every connection right after accepting it (before any byte)."""

    host: str
    port: int
    server: asyncio.AbstractServer
    release: asyncio.Event
    connections: int = 0
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    def url(self, hostname: str | None = None, path: str = "/") -> str:
        return f"http://{hostname or self.host}:{self.port}{path}"

    async def stop(self) -> None:
        self.release.set()
        for w in self.writers:
            w.close()
        self.server.close()
        await self.server.wait_closed()


async def start_raw(host: str, mode: str) -> RawServer:
    release = asyncio.Event()
    holder: dict[str, RawServer] = {}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        srv = holder["s"]
        srv.connections += 1
        srv.writers.append(writer)
        if mode == "accept-close":
            writer.transport.abort()
            return
        with contextlib.suppress(ConnectionError):
            await reader.readuntil(b"\r\n\r\n")
            if mode == "silent":
                await release.wait()
        writer.close()

    server = await asyncio.start_server(handle, host, 0)
    port = server.sockets[0].getsockname()[1]
    raw = RawServer(host, port, server, release)
    holder["s"] = raw
    return raw


def closed_port(host: str) -> int:
    """A port on ``host`` with nothing listening (connect is refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def blackhole_port(host: str):
    """A listening port whose accept queue is full, so new SYNs are dropped and
    connect() hangs (Linux). Yields the port; the sockets close on exit."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((host, 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        # with backlog 0 the queue holds one connection; fill it (and one in flight)
        for _ in range(2):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect((host, port))
            fillers.append(s)
        yield port
    finally:
        for s in fillers:
            s.close()
        listener.close()


class SplitRcodeDNS(asyncio.DatagramProtocol):
    """A DNS server on 127.0.0.1 answering A with SERVFAIL and every other type with
    NOERROR and no records (NODATA): the mix c-ares merges into one status."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.queries: list[str] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        import dnslib

        q = dnslib.DNSRecord.parse(data)
        qtype = dnslib.QTYPE[q.q.qtype]
        self.queries.append(qtype)
        reply = q.reply()
        if qtype == "A":
            reply.header.rcode = dnslib.RCODE.SERVFAIL
        assert self.transport is not None
        self.transport.sendto(reply.pack(), addr)

    @property
    def address(self) -> str:
        assert self.transport is not None
        return f"127.0.0.1:{self.transport.get_extra_info('sockname')[1]}"

    @classmethod
    async def start(cls) -> SplitRcodeDNS:
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_datagram_endpoint(cls, local_addr=("127.0.0.1", 0))
        return proto

    def stop(self) -> None:
        if self.transport is not None:
            self.transport.close()


# --------------------------------------------------------------------------- TLS


def make_cert(directory: Path, hostname: str) -> tuple[Path, Path]:
    """A self-signed certificate (and key) for ``hostname``, made with ``openssl``."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("openssl not found")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1",
         "-subj", f"/CN={hostname}", "-addext", f"subjectAltName=DNS:{hostname}"],
        check=True,
        capture_output=True,
    )
    return cert, key


# --------------------------------------------------------------------------- /prewarm


class PrewarmStandIn:
    """The sidecar's ``POST /prewarm`` contract, answered by querying a DNS server.

    For tests of the client until the sidecar's API can be started in-process. It asks
    ``dns_host:dns_port`` with dnspython and reports, per name and type, the rcode, the
    final addresses (CNAME chains followed) and the TTL (the negative TTL from the SOA
    for NXDOMAIN/NODATA). ``token`` enforces ``Authorization: Bearer``.
    """

    def __init__(self, dns_host: str, dns_port: int, token: str | None = None) -> None:
        self.dns_host = dns_host
        self.dns_port = dns_port
        self.token = token
        self.calls: list[dict[str, Any]] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def _one(self, name: str, qtype: str) -> dict[str, Any]:
        query = dns.message.make_query(name, qtype)
        resp = await dns.asyncquery.udp(query, self.dns_host, port=self.dns_port, timeout=2.0)
        rcode = dns.rcode.to_text(resp.rcode())
        rdtype = dns.rdatatype.from_text(qtype)
        records: list[str] = []
        ttl = 0
        for rrset in resp.answer:
            if rrset.rdtype == rdtype:
                records.extend(r.to_text() for r in rrset)
                ttl = rrset.ttl if not ttl else min(ttl, rrset.ttl)
        if not records:
            for rrset in resp.authority:
                if rrset.rdtype == dns.rdatatype.SOA:
                    ttl = min(rrset.ttl, rrset[0].minimum)
        return {"name": name, "type": qtype, "rcode": rcode, "ttl": ttl, "records": records}

    async def _handle(self, request: web.Request) -> web.Response:
        if self.token and request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response({"error": "unauthorized"}, status=401)
        body = await request.json()
        self.calls.append(body)
        names = body["names"]
        types = body.get("types") or ["A", "AAAA"]
        started = time.perf_counter()
        results = await asyncio.gather(*(self._one(n, t) for n in names for t in types))
        return web.json_response(
            {"elapsed_ms": (time.perf_counter() - started) * 1000, "results": results}
        )

    async def start(self, host: str = "127.0.0.1") -> str:
        app = web.Application()
        app.router.add_post("/prewarm", self._handle)
        self.runner = web.AppRunner(app, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, 0)
        await site.start()
        self.url = f"http://{host}:{self.runner.addresses[0][1]}"
        return self.url

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


# --------------------------------------------------------------------------- DNS target


@dataclass
class ClientTarget:
    """What the client tests talk to: the real in-process sidecar (the ``sidecar``
    fixture of tests/conftest.py, whose upstream is a FakeUpstream) and its
    ``/prewarm`` endpoint.

    While the sidecar runs without its HTTP API (``sidecar.ops.api`` not written yet),
    ``/prewarm`` is served by :class:`PrewarmStandIn`, which resolves through the
    sidecar's own DNS port, so the names land in the sidecar's cache as the real
    endpoint would put them.
    """

    sidecar: Any
    stand_in: PrewarmStandIn | None = None

    @property
    def dns_address(self) -> str:
        return self.sidecar.dns_address

    @property
    def upstream(self) -> Any:
        return self.sidecar.upstream

    @property
    def http_url(self) -> str:
        if self.stand_in is not None:
            return self.stand_in.url
        return self.sidecar.http_url

    def replies(self, rcode: int) -> int | None:
        """Replies with ``rcode`` the sidecar sent (None if it does not tell)."""
        rcodes = getattr(getattr(getattr(self.sidecar, "sc", None), "handler", None),
                         "rcodes", None)
        return None if rcodes is None else rcodes[rcode]

    async def stop(self) -> None:
        """Stop the sidecar: its DNS port closes (queries get ICMP port unreachable)."""
        await self.sidecar.stop()

    async def close(self) -> None:
        if self.stand_in is not None:
            await self.stand_in.stop()


async def client_target(sidecar: Any) -> ClientTarget:
    """Wrap a running sidecar; start the /prewarm stand-in if it has no HTTP API."""
    if sidecar.http_url is not None:
        return ClientTarget(sidecar)
    stand_in = PrewarmStandIn(sidecar.host, sidecar.port)
    await stand_in.start()
    return ClientTarget(sidecar, stand_in)
