"""The compiled UDP fast path, when it can run: selection, and the socket's event-loop side.

``sidecar/dns/_fastudp.c`` reads a batch of datagrams per wake-up (``recvmmsg``), answers
the fresh cache hits of the common shape itself, with the handler's exact semantics, sends
them as a batch (``sendmmsg``) and hands every other datagram to the listener's
``datagram_received``, as a datagram transport would. This module decides whether it runs
(Linux, extension built, ``DNS_SIDECAR_NO_FASTPATH`` unset, the listener's ``handle`` the
real :meth:`QueryHandler.handle`), registers the socket with the loop (``add_reader``: both
asyncio's selector loops and uvloop poll a bare descriptor) and stands in for the datagram
transport the listener would otherwise have (:class:`FastTransport`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import socket
import sys
from typing import Any

from sidecar.dns.handler import QueryHandler
from sidecar.dns.wire import OPT_RR

log = logging.getLogger("sidecar.listen")

#: Set to 1 (or true/yes/on) to force the pure-Python UDP path.
ENV_OFF = "DNS_SIDECAR_NO_FASTPATH"
#: Datagrams read per wake-up, per event loop: as many as that loop's own datagram
#: transport hands the listener per wake-up (libuv reads up to 32; asyncio's selector
#: transport one), so misses reach the miss path at the pace they do on the Python path;
#: the batch only saves work on the hits.
UVLOOP_BATCH = 32
ASYNCIO_BATCH = 1
#: Replies held while the kernel's send buffer is full; beyond this they are dropped and
#: counted as errors (a datagram transport would buffer without bound).
BACKLOG_MAX = 4096

_ext: Any = None
_missing = ""
if sys.platform.startswith("linux"):
    try:
        from sidecar.dns import _fastudp as _ext  # type: ignore[attr-defined,no-redef]
    except ImportError as exc:
        _missing = f"extension not built ({exc})"
else:
    _missing = f"not Linux ({sys.platform})"


def missing() -> bool:
    """True when the extension should be there (Linux) but was not built."""
    return _ext is None and sys.platform.startswith("linux")


def status() -> tuple[bool, str]:
    """Whether the fast path would run now, and why (for the start-up log line)."""
    if os.environ.get(ENV_OFF, "").strip().lower() not in ("", "0", "false", "no", "off"):
        return False, f"{ENV_OFF} is set"
    if _ext is None:
        return False, _missing
    return True, "compiled (recvmmsg/sendmmsg)"


class FastTransport(asyncio.DatagramTransport):
    """The listener's transport while the compiled path reads its socket.

    ``sendto`` is for the Python path's replies (misses, errors); the compiled path sends
    its own. Replies the kernel refuses for now wait in a bounded backlog, sent when the
    socket is writable again, as a datagram transport buffers them.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, listener: Any,
                 handler: QueryHandler) -> None:
        super().__init__({"socket": sock, "sockname": sock.getsockname()})
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._listener = listener
        self._backlog: collections.deque[tuple[bytes, Any]] = collections.deque()
        self._closing = False
        uv = type(loop).__module__.startswith("uvloop")
        self.fast = _ext.FastUdp(self._fd, listener, handler, OPT_RR, self._blocked,
                                 UVLOOP_BATCH if uv else ASYNCIO_BATCH)
        self._send_now = self.fast.sendto

    def start(self) -> None:
        self._loop.add_reader(self._fd, self.fast.on_readable)

    def sendto(self, data: bytes | bytearray | memoryview, addr: Any = None) -> None:
        if self._closing:
            return
        if self._backlog:
            self._queue([(bytes(data), addr)])
            return
        try:
            self._send_now(data, addr)
        except BlockingIOError:
            self._blocked([(bytes(data), addr)])
        except OSError as exc:
            self._listener.error_received(exc)

    def _blocked(self, replies: list[tuple[bytes, Any]]) -> None:
        """Called with the replies the kernel would not take now (also by the C side)."""
        if self._closing:
            return
        if not self._backlog:
            self.fast.blocked = 1
            self._loop.add_writer(self._fd, self._flush)
        self._queue(replies)

    def _queue(self, replies: list[tuple[bytes, Any]]) -> None:
        for item in replies:
            if len(self._backlog) >= BACKLOG_MAX:
                self._listener.errors += 1
                continue
            self._backlog.append(item)

    def _flush(self) -> None:
        backlog = self._backlog
        while backlog:
            data, addr = backlog[0]
            try:
                self._send_now(data, addr)
            except BlockingIOError:
                return
            except OSError as exc:
                self._listener.error_received(exc)
            backlog.popleft()
        self._loop.remove_writer(self._fd)
        self.fast.blocked = 0

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._loop.remove_reader(self._fd)
        if self._backlog:
            self._loop.remove_writer(self._fd)
            self._backlog.clear()
        self.fast.close()
        self._sock.close()

    def abort(self) -> None:
        self.close()

    def get_write_buffer_size(self) -> int:
        return sum(len(d) for d, _ in self._backlog)


def is_fast(listener: Any) -> bool:
    """Whether ``listener`` (a ``UdpListener``) is served by the compiled path."""
    return isinstance(getattr(listener, "transport", None), FastTransport)


def attach(loop: asyncio.AbstractEventLoop, sock: socket.socket, listener: Any,
           handle: Any) -> FastTransport | None:
    """Serve ``sock`` for ``listener`` by the compiled path and return its transport; None
    (nothing done) when it does not apply: not available, switched off, or ``handle`` is not
    a :class:`QueryHandler`'s own ``handle`` (a wrapper's semantics are unknown to it)."""
    handler = getattr(handle, "__self__", None)
    if (not status()[0] or not isinstance(handler, QueryHandler)
            or getattr(handle, "__func__", None) is not QueryHandler.handle):
        return None
    transport = FastTransport(loop, sock, listener, handler)
    listener.connection_made(transport)
    transport.start()
    return transport
