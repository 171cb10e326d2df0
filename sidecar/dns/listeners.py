"""UDP and TCP listeners: bytes in from the network, replies out, nothing else.

TCP follows RFC 7766: two-byte length prefix, several (also pipelined) queries per
connection, replies in completion order, an idle timeout, a bound on open connections.

A miss (:class:`~sidecar.dns.handler.PendingReply`) is handed the listener's way to send;
the reply does the rest. Connection timing (idle and drain deadlines) is real time, as the
event loop's timers it pairs with, not the cache's clock.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, cast

from sidecar.config import HostPort
from sidecar.dns import fastudp
from sidecar.dns.reuseport import steer_to
from sidecar.errors import StartupError
from sidecar.log import limit_repeats

if TYPE_CHECKING:
    from sidecar.dns.acl import Acl
    from sidecar.dns.handler import PendingReply, Reply

log = logging.getLogger("sidecar.listen")

#: ``handle(message, client IP, tcp)``: :meth:`sidecar.dns.handler.QueryHandler.handle`.
Handle = Callable[[bytes, str, bool], "Reply"]

#: Queries one TCP connection may have in flight before we stop reading from it.
TCP_MAX_PENDING = 128
#: Unsent reply bytes above which a connection counts as not reading (asyncio's
#: pause_writing): we stop reading its queries until it drains.
TCP_WRITE_HIGH = 64 * 1024
#: Unsent reply bytes above which a connection is dropped (misses answered after the pause
#: still add to it): sixteen replies of the largest size.
TCP_MAX_BUFFERED = 16 * 65537


def _same(udp: UdpListener) -> UdpListener:
    return udp


def _not_connected(data: bytes, addr: tuple) -> None:
    raise RuntimeError("UDP listener not connected")


class UdpListener(asyncio.DatagramProtocol):
    """One UDP socket. ``received`` counts datagrams; ``pending`` holds the fetches its
    clients wait for."""

    def __init__(self, handle: Handle) -> None:
        self.handle = handle
        self.transport: asyncio.DatagramTransport | None = None
        # The transport's sendto, bound once connected (no datagram arrives before).
        self._sendto: Callable[[bytes, tuple], None] = _not_connected
        self.received = 0
        self.errors = 0
        self.pending: set[asyncio.Future] = set()
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        self._sendto = self.transport.sendto

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        if self.closing:
            return
        self.received += 1
        try:
            reply = self.handle(data, addr[0], False)
        except Exception:
            self.errors += 1
            log.exception("handler failed on a UDP query from %s", addr[0])
            return
        if reply is None:
            return
        if type(reply) is bytes:
            self._sendto(reply, addr)
            return
        cast("PendingReply", reply).dispatch(self.pending, partial(self._deliver, addr),
                                             self._miss_failed)

    def _deliver(self, addr: tuple, reply: bytes | None) -> None:
        if reply is not None and self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(reply, addr)

    def _miss_failed(self, host: str) -> None:
        self.errors += 1
        log.exception("miss path failed for a UDP query from %s", host)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors for replies to vanished clients: nothing to do.
        self.errors += 1

    def _hit_failed(self, exc: BaseException | None, host: str | None) -> None:
        """The compiled path's twin of ``datagram_received``'s except block."""
        self.errors += 1
        log.error("handler failed on a UDP query from %s", host, exc_info=exc)


class TcpConnection(asyncio.Protocol):
    """One client TCP connection."""

    def __init__(self, server: TcpListener) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.host = ""
        self.pending = 0
        self.counted = False
        # Idle time counts from the last complete query (or reply), not the last byte: a
        # client trickling one byte at a time must not hold its slot forever.
        self.last_active = time.monotonic()
        self.timer: asyncio.TimerHandle | None = None
        self.drain_timer: asyncio.TimerHandle | None = None
        self.paused_reading = False
        self.write_paused = False
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        srv = self.server
        peer = transport.get_extra_info("peername")
        self.host = host = peer[0] if peer else ""
        if srv.closing or len(srv.connections) >= srv.max_connections:
            srv.rejected += 1
            self.transport.abort()
            return
        acl = srv.acl
        if acl is not None and not acl.allowed(host):
            # Closed before it holds a slot: a denied address gets nothing but REFUSED over
            # TCP anyway, and 256 of its connections would lock out everyone else.
            srv.denied += 1
            self.transport.abort()
            return
        count = srv.per_client.get(host, 0)
        if count >= srv.max_per_client:
            srv.rejected += 1
            srv.client_rejected += 1
            self.transport.abort()
            return
        srv.per_client[host] = count + 1
        self.counted = True
        srv.connections.add(self)
        srv.accepted += 1
        self.transport.set_write_buffer_limits(high=TCP_WRITE_HIGH)
        self.timer = asyncio.get_running_loop().call_later(srv.idle_timeout, self._idle_check)

    def connection_lost(self, exc: Exception | None) -> None:
        srv = self.server
        srv.connections.discard(self)
        if self.counted:
            self.counted = False
            left = srv.per_client.get(self.host, 1) - 1
            if left > 0:
                srv.per_client[self.host] = left
            else:
                srv.per_client.pop(self.host, None)
        for timer in (self.timer, self.drain_timer):
            if timer is not None:
                timer.cancel()
        self.timer = self.drain_timer = None
        self.transport = None

    def _close(self) -> None:
        """Close; drop what the client left unread instead of waiting for it to read."""
        t = self.transport
        if t is None:
            return
        if t.get_write_buffer_size():
            t.abort()
        else:
            t.close()

    def _idle_check(self) -> None:
        if self.transport is None:
            return
        idle = time.monotonic() - self.last_active
        timeout = self.server.idle_timeout
        if self.pending == 0 and idle >= timeout:
            self.server.idle_closed += 1
            if self.buf:
                self.server.slow_closed += 1  # an incomplete query frame
            self._close()
            return
        wait = timeout - idle if self.pending == 0 else timeout
        self.timer = asyncio.get_running_loop().call_later(max(wait, 0.05), self._idle_check)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._process()

    def _process(self) -> None:
        """Dispatch the complete queries in ``buf`` while the client reads its replies and
        has fewer than ``TCP_MAX_PENDING`` misses waiting; the rest waits in ``buf`` (reading
        is paused meanwhile, so ``buf`` holds at most one read)."""
        buf = self.buf
        while len(buf) >= 2 and not self.write_paused and self.pending < TCP_MAX_PENDING:
            size = (buf[0] << 8) | buf[1]
            if len(buf) < 2 + size:
                break
            msg = bytes(buf[2 : 2 + size])
            del buf[: 2 + size]
            self.last_active = time.monotonic()
            self.server.received += 1
            self._dispatch(msg)
            if self.transport is None:
                return
        if self.eof and self.pending == 0 and self.transport is not None and (
                len(buf) < 2 or len(buf) < 2 + ((buf[0] << 8) | buf[1])):
            self.transport.close()  # half-closed and all it sent is answered: flush, close

    def eof_received(self) -> bool:
        # Half-close: keep the write side open until pending replies are out.
        self.eof = True
        if self.pending == 0 and self.transport is not None:
            self._process()
        return True

    def _dispatch(self, msg: bytes) -> None:
        try:
            reply = self.server.handle(msg, self.host, True)
        except Exception:
            self.server.errors += 1
            log.exception("handler failed on a TCP query from %s", self.host)
            return
        if reply is None:
            return
        if type(reply) is bytes:
            self._send(reply)
            return
        self.pending += 1
        if self.pending >= TCP_MAX_PENDING and not self.paused_reading and self.transport:
            self.transport.pause_reading()
            self.paused_reading = True
        if not cast("PendingReply", reply).dispatch(self.server.pending, self._deliver,
                                                    self._miss_failed):
            self.pending -= 1

    def _miss_failed(self, host: str) -> None:
        self.server.errors += 1
        log.exception("miss path failed for a TCP query from %s", host)

    def _deliver(self, reply: bytes | None) -> None:
        self.pending -= 1
        if reply is not None:
            self._send(reply)
        t = self.transport
        if t is None:
            return
        if self.paused_reading and self.pending < TCP_MAX_PENDING // 2 and not self.write_paused:
            t.resume_reading()
            self.paused_reading = False
        if self.buf or self.eof:
            self._process()
            if self.transport is None:
                return
        if self.pending == 0 and (t.is_closing() or not t.is_reading() and self.server.closing):
            t.close()

    def _send(self, reply: bytes) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            t.write(len(reply).to_bytes(2, "big") + reply)
            self.last_active = time.monotonic()
            if t.get_write_buffer_size() > self.server.max_buffered:
                # The client does not read, and the replies of misses it queued before we
                # paused keep coming: drop it rather than hold its replies in memory.
                self.server.overflow_closed += 1
                t.abort()

    def pause_writing(self) -> None:
        # The client does not read its replies: stop reading its queries, and give it
        # until the drain deadline to catch up.
        self.write_paused = True
        if self.transport is not None and not self.paused_reading:
            self.transport.pause_reading()
            self.paused_reading = True
        if self.drain_timer is None and self.transport is not None:
            self.drain_timer = asyncio.get_running_loop().call_later(
                self.server.drain_timeout, self._drain_expired)

    def _drain_expired(self) -> None:
        self.drain_timer = None
        if self.transport is not None and self.write_paused:
            self.server.drain_closed += 1
            self.transport.abort()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.drain_timer is not None:
            self.drain_timer.cancel()
            self.drain_timer = None
        if self.transport is not None and self.paused_reading and self.pending < TCP_MAX_PENDING:
            self.transport.resume_reading()
            self.paused_reading = False
        if self.buf:
            self._process()


class TcpListener:
    """Accepts connections on one address and tracks them.

    Guards against clients that would hold the listener: a client outside ``acl`` is closed
    at accept (``denied``); one address holds at most ``max_per_client`` connections
    (``client_rejected``); replies a client leaves unread are bounded (``overflow_closed``)
    and must drain within ``drain_timeout`` (``drain_closed``); a connection whose client
    has not completed a query for ``idle_timeout`` is closed (``idle_closed``, and
    ``slow_closed`` when it was in the middle of a frame).
    """

    def __init__(self, handle: Handle, max_connections: int, idle_timeout: float, *,
                 acl: Acl | None = None, max_per_client: int | None = None,
                 max_buffered: int = TCP_MAX_BUFFERED,
                 drain_timeout: float | None = None) -> None:
        self.handle = handle
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        if acl is None:
            # The handler's own Acl, when ``handle`` is a bound QueryHandler.handle.
            acl = getattr(getattr(handle, "__self__", None), "acl", None)
        self.acl = acl
        self.max_per_client = (max_per_client if max_per_client is not None
                               else per_client_connections(max_connections))
        self.max_buffered = max_buffered
        self.drain_timeout = idle_timeout if drain_timeout is None else drain_timeout
        self.per_client: dict[str, int] = {}
        self.connections: set[TcpConnection] = set()
        self.pending: set[asyncio.Future] = set()
        self.server: asyncio.base_events.Server | None = None
        self.received = 0
        self.accepted = 0
        self.rejected = 0
        self.denied = 0
        self.client_rejected = 0
        self.idle_closed = 0
        self.slow_closed = 0
        self.overflow_closed = 0
        self.drain_closed = 0
        self.errors = 0
        self.closing = False

    def protocol(self) -> TcpConnection:
        return TcpConnection(self)


def per_client_connections(max_connections: int) -> int:
    """Default connections one client address may hold: a quarter of the slots, so no one
    address can take them all (every crawler process on a pod shares 127.0.0.1, and c-ares
    keeps one TCP connection per channel and server, so it must stay generous)."""
    return max(1, max_connections // 4)


def _udp_socket(addr: HostPort, rcvbuf: int, reuse_port: bool = False
                ) -> tuple[socket.socket, int]:
    family = socket.AF_INET6 if addr.family_v6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        got = 0
        if rcvbuf:
            # SO_RCVBUFFORCE passes net.core.rmem_max when we have CAP_NET_ADMIN; otherwise
            # the kernel silently caps SO_RCVBUF at rmem_max.
            for opt in (getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF):
                if opt is None:
                    continue
                try:
                    sock.setsockopt(socket.SOL_SOCKET, opt, rcvbuf)
                    break
                except OSError:
                    continue
        got = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        sock.bind((addr.host, addr.port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock, got


async def open_listeners(addrs: tuple[HostPort, ...], handle: Handle, *, rcvbuf: int,
                         tcp_max_connections: int, tcp_idle_timeout: float,
                         acl: Acl | None = None, tcp_max_per_client: int | None = None,
                         reuse_port: bool = False
                         ) -> tuple[list[UdpListener], list[TcpListener], list[HostPort], int]:
    """Bind UDP and TCP on every address (same port for both; port 0 picks one).

    ``acl`` (default: the Acl of the handler ``handle`` is bound to) closes denied TCP
    clients at accept. Returns the listeners, the bound addresses and the UDP receive buffer
    the kernel granted. Raises :class:`StartupError` when an address cannot be bound.

    ``reuse_port`` binds with ``SO_REUSEPORT`` beside another sidecar on the same addresses
    and steers new traffic to this process (:mod:`sidecar.dns.reuseport`): the handover of
    a replacement.
    """
    # Repeating lines (tracebacks per packet, shed warnings) are rate limited in every
    # sidecar, in-process ones included; every sidecar module is imported by now.
    limit_repeats()
    loop = asyncio.get_running_loop()
    fast, why = fastudp.status()
    udps: list[UdpListener] = []
    tcps: list[TcpListener] = []
    bound: list[HostPort] = []
    granted = 0
    try:
        for addr in addrs:
            for attempt in range(20):
                try:
                    sock, granted = _udp_socket(addr, rcvbuf, reuse_port)
                except OSError as exc:
                    raise StartupError(f"cannot listen on {addr} (udp): {exc.strerror or exc}") from None
                port = sock.getsockname()[1]
                real = HostPort(addr.host, port)
                tcp = TcpListener(handle, tcp_max_connections, tcp_idle_timeout, acl=acl,
                                  max_per_client=tcp_max_per_client)
                try:
                    tcp.server = await loop.create_server(
                        tcp.protocol, host=real.host, port=port, reuse_address=True,
                        reuse_port=reuse_port or None, backlog=1024)
                except OSError as exc:
                    sock.close()
                    if addr.port == 0 and exc.errno == errno.EADDRINUSE and attempt < 19:
                        continue
                    raise StartupError(
                        f"cannot listen on {real} (tcp): {exc.strerror or exc}") from None
                if reuse_port:
                    # Bound and about to read: from here on, new queries are ours.
                    steer_to(sock)
                    for listening in tcp.server.sockets:
                        steer_to(listening)
                udp = UdpListener(handle)
                if fastudp.attach(loop, sock, udp, handle) is None:
                    if fast:
                        fast, why = False, "the handler is not a QueryHandler's own handle"
                    await loop.create_datagram_endpoint(partial(_same, udp), sock=sock)
                udps.append(udp)
                tcps.append(tcp)
                bound.append(real)
                break
    except BaseException:
        await close_listeners(udps, tcps, drain=0)
        raise
    # Which UDP path runs. A missing extension is an install without a compiler, worth a
    # line at the default level; the rest is the expected state and stays at debug, so the
    # start-up log keeps its one "listening on" line.
    log.log(logging.WARNING if fastudp.missing() else logging.DEBUG, "UDP path: %s (%s)",
            "compiled fast path" if fast else "Python", why)
    return udps, tcps, bound, granted


async def close_listeners(udps: list[UdpListener], tcps: list[TcpListener],
                          drain: float) -> None:
    """Stop taking queries, wait up to ``drain`` seconds for in-flight ones, then close."""
    for u in udps:
        u.closing = True
    for t in tcps:
        t.closing = True
        if t.server is not None:
            t.server.close()
        for conn in list(t.connections):
            if conn.transport is not None:
                if conn.pending == 0:
                    conn.transport.close()
                else:
                    conn.transport.pause_reading()
    pending = set().union(*(u.pending for u in udps), *(t.pending for t in tcps))
    if pending and drain > 0:
        await asyncio.wait(pending, timeout=drain)
    for u in udps:
        if u.transport is not None:
            u.transport.close()
    for t in tcps:
        for conn in list(t.connections):
            conn._close()
        if t.server is not None:
            try:
                await asyncio.wait_for(t.server.wait_closed(), 1.0)
            except TimeoutError:
                pass
