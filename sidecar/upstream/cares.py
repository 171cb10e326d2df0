"""Create aiodns resolvers (c-ares channels) fit for a cache that does its own caching.

c-ares >= 1.31 keeps a query cache that is on by default and that pycares 5 gives no argument
for. Left on, a refresh, a prefetch or a health probe within the record's TTL is answered from
that cache and never reaches the upstream (three identical ``query_dns`` calls send one
packet). c-ares also shrinks its per-try timeout to max(250 ms, 5 x RTT) once a server looks
fast. We therefore add three options pycares does not expose, through ``ares_init_options``:
``ARES_OPT_QUERY_CACHE`` with ``qcache_max_ttl = 0`` (cache off), ``ARES_OPT_MAXTIMEOUTMS``
(no try longer than our own per-try timeout) and ``ARES_OPT_UDP_MAX_QUERIES`` with
``udp_max_queries = 1``: every upstream query leaves from a fresh socket, so from a port the
kernel picks at random (RFC 5452); an off-path forger then has to guess the port as well as
the 16-bit ID. If a future pycares changes the internals this relies on, we fall back to a
plain channel, log it, and report ``qcache_disabled = False`` (and ``per_query_ports = False``).

Channels are driven by the event loop (:class:`LoopResolver`), not by c-ares' own thread.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import sys
import threading
import weakref
from functools import partial
from typing import Any

import aiodns
import pycares

log = logging.getLogger(__name__)

# Values from c-ares's ares.h (stable ABI since 1.23).
ARES_OPT_UDP_MAX_QUERIES = 1 << 19
ARES_OPT_MAXTIMEOUTMS = 1 << 20
ARES_OPT_QUERY_CACHE = 1 << 21
#: ares.h ``ARES_FLAG_DNS0x20`` (pycares does not export it).
ARES_FLAG_DNS0X20 = 1 << 10

_lock = threading.Lock()
qcache_disabled: bool | None = None  # None until the first channel is made
#: Whether upstream channels send each query from its own socket (None until one is made).
per_query_ports: bool | None = None


class _OptionsLib:
    """Stands in for pycares's cffi ``lib`` during one ``Channel()`` call and adds options."""

    def __init__(self, lib: Any, max_timeout_ms: int, udp_max_queries: int = 0) -> None:
        self._lib = lib
        self._max_timeout_ms = max_timeout_ms
        self._udp_max_queries = udp_max_queries

    def __getattr__(self, name: str) -> Any:
        return getattr(self._lib, name)

    def ares_init_options(self, channel: Any, options: Any, optmask: int) -> int:
        options.qcache_max_ttl = 0
        optmask |= ARES_OPT_QUERY_CACHE
        if self._max_timeout_ms > 0:
            options.maxtimeout = self._max_timeout_ms
            optmask |= ARES_OPT_MAXTIMEOUTMS
        if self._udp_max_queries > 0:
            # c-ares closes a UDP socket once it has carried this many queries (and never
            # hands it a new one); a retransmission is a new query send, so a new socket too.
            options.udp_max_queries = self._udp_max_queries
            optmask |= ARES_OPT_UDP_MAX_QUERIES
        return self._lib.ares_init_options(channel, options, optmask)


#: Longest gap between two timeout checks of a loop-driven channel, seconds: c-ares'
#: shortest retransmission timeout (250 ms), so a retransmission is never late.
TIMER_TICK = 0.25


_FFI: Any = getattr(pycares, "_ffi", None)
# Read at import, before make_resolver ever swaps in an _OptionsLib.
_LIB: Any = getattr(pycares, "_lib", None)
_MISSING = object()


def _direct_calls(channel: Any) -> bool:
    """Whether ``channel`` has the pycares internals the direct c-ares calls below use."""
    return (_FFI is not None and _LIB is not None and hasattr(_LIB, "ares_process_fd")
            and hasattr(_LIB, "ares_timeout") and getattr(channel, "_lock", None) is not None
            and getattr(channel, "_channel", _MISSING) is not _MISSING)


def _process_fd(channel: Any, read_fd: int, write_fd: int) -> None:
    """``channel.process_fd(read_fd, write_fd)``."""
    with channel._lock:
        holder = channel._channel
        if holder is None:
            raise RuntimeError("Channel is destroyed, no new queries allowed")
        _LIB.ares_process_fd(holder[0], read_fd, write_fd)


#: c-ares ``ARES_AI_NUMERICSERV`` (ares.h; pycares exposes it only on its cffi ``lib``).
ARES_AI_NUMERICSERV = getattr(getattr(pycares, "_lib", None), "ARES_AI_NUMERICSERV", 8)


class LoopResolver(aiodns.DNSResolver):
    """An aiodns resolver whose c-ares sockets are watched by the event loop.

    pycares 5 runs each channel on its own event thread; every reply then crosses threads
    (GIL hand-off, ``call_soon_threadsafe``, a self-pipe wake-up). aiodns keeps a
    ``sock_state_cb`` mode (``loop.add_reader`` + ``process_fd``) for platforms without that
    thread; this class always uses it, and times c-ares' retransmissions from
    ``ares_timeout`` (at most :data:`TIMER_TICK` apart) instead of aiodns's fixed tick. A
    reply is then handled in the loop pass that reads it, with no thread hand-off (the CPU
    this saves per miss and per client lookup is in docs/benchmarks.md).
    The client (:mod:`client.resolver`) uses this class too: one implementation of the
    loop-driven channel. Where aiodns lacks the hooks this needs (or on Windows, where the
    proactor loop has no ``add_reader``) it is a plain aiodns resolver on the event thread.
    """

    @property
    def loop_driven(self) -> bool:
        """True when the event loop, not a c-ares thread, watches the sockets."""
        return not getattr(self, "_event_thread", True)

    def getaddrinfo(self, host: str, family: socket.AddressFamily = socket.AF_UNSPEC,
                    port: int | None = None, proto: int = 0, type: int = 0,
                    flags: int = 0) -> asyncio.Future:
        """aiodns's ``getaddrinfo``; an ``int`` port is passed as a numeric service.

        pycares hands c-ares the port as a string, and without ``ARES_AI_NUMERICSERV``
        c-ares first looks it up as a service name, i.e. glibc reads and parses
        /etc/services on every lookup.
        """
        if isinstance(port, int):
            flags |= ARES_AI_NUMERICSERV
        return super().getaddrinfo(host, family=family, port=port, proto=proto, type=type,
                                   flags=flags)

    def _make_channel(self, **kwargs: Any) -> tuple[bool, pycares.Channel]:
        if not hasattr(self, "_sock_state_cb") or sys.platform == "win32":  # pragma: no cover
            return super()._make_channel(**kwargs)
        ref = weakref.ref(self)
        if self._timeout is not None and self._timeout < TIMER_TICK:
            self._keep_idle_timer = False

        def on_socket(fd: int, readable: bool, writable: bool) -> None:
            this = ref()
            if this is not None:
                this._sock_state_cb(fd, readable, writable)

        return False, pycares.Channel(sock_state_cb=on_socket, timeout=self._timeout, **kwargs)

    # pycares's process_fd and timeout each run a generator-based context manager and
    # allocate cffi objects on every call, and they run for every upstream reply and every
    # socket c-ares opens. These do the same c-ares calls under the same lock (which keeps
    # close() from destroying the channel mid-call) without that.
    #: Whether the timer may outlive the last socket. Each upstream query opens and closes
    #: its own socket, so cancelling the timer then would cost a new timer per query. Left
    #: pending, its next tick finds no socket and ends it (aiodns's ``_timer_cb``); a query
    #: that starts before that is checked by it, at most TIMER_TICK later, as a query that
    #: starts while another is in flight is. Only when no c-ares try can be shorter than
    #: TIMER_TICK; :func:`make_resolver` clears it for shorter tries.
    _keep_idle_timer = True
    _direct: bool | None = None  # whether the channel has those internals; set on first use
    _tv: Any = None  # (maxtv, out) timevals for ares_timeout, made once per resolver

    def _can_call_direct(self) -> bool:
        direct = self._direct
        if direct is None:
            direct = self._direct = _direct_calls(self._channel)
        return direct

    def _fd_callback(self) -> Any:
        # Bound to the channel, as pycares's process_fd is: a watcher never keeps the
        # resolver alive.
        channel = self._channel
        return partial(_process_fd, channel) if self._can_call_direct() else channel.process_fd

    def _next_timeout(self) -> float:
        """``channel.timeout(TIMER_TICK)``: seconds until c-ares next needs a timeout check."""
        channel = self._channel
        if not self._can_call_direct():
            return float(channel.timeout(TIMER_TICK))
        tv = self._tv
        if tv is None:
            maxtv = _FFI.new("struct timeval*")
            maxtv.tv_sec = int(math.floor(TIMER_TICK))
            maxtv.tv_usec = int(math.fmod(TIMER_TICK, 1.0) * 1000000)
            tv = self._tv = (maxtv, _FFI.new("struct timeval*"))
        with channel._lock:
            holder = channel._channel
            if holder is None:
                raise RuntimeError("Channel is destroyed, no new queries allowed")
            result = _LIB.ares_timeout(holder[0], tv[0], tv[1])
        if result == _FFI.NULL:
            return 0.0
        return float(result.tv_sec + result.tv_usec / 1000000.0)

    def _sock_state_cb(self, fd: int, readable: bool, writable: bool) -> None:
        """Watch ``fd`` for exactly what c-ares asks, as of this call.

        aiodns's version only adds watchers while a socket is open: once a TCP socket has
        flushed its query, c-ares asks for "readable only", the write watcher stays, and a
        connected socket is always writable, so the loop spins (``process_fd`` on every
        pass) for as long as the connection lives.
        """
        if not self.loop_driven:  # pragma: no cover - aiodns changed
            return super()._sock_state_cb(fd, readable, writable)
        loop, read_fds, write_fds = self.loop, self._read_fds, self._write_fds
        if readable:
            if fd not in read_fds:
                loop.add_reader(fd, self._fd_callback(), fd, pycares.ARES_SOCKET_BAD)
                read_fds.add(fd)
        elif fd in read_fds:
            read_fds.discard(fd)
            loop.remove_reader(fd)
        if writable:
            if fd not in write_fds:
                loop.add_writer(fd, self._fd_callback(), pycares.ARES_SOCKET_BAD, fd)
                write_fds.add(fd)
        elif fd in write_fds:
            write_fds.discard(fd)
            loop.remove_writer(fd)
        if readable or writable:
            if self._timer is None:
                self._start_timer()
        elif (not read_fds and not write_fds and self._timer is not None
              and not self._keep_idle_timer):
            self._timer.cancel()
            self._timer = None
        return None

    def _start_timer(self) -> None:
        if not self.loop_driven:  # pragma: no cover - aiodns changed
            return super()._start_timer()
        try:
            delay = self._next_timeout()
        except RuntimeError:  # channel closed
            return None
        self._timer = self.loop.call_later(max(delay, 0.001), self._timer_cb)
        return None


def make_resolver(server: str, timeout: float, tries: int = 1,
                  rcvbuf: int | None = None, *, case_randomize: bool = False,
                  max_timeout: float | None = None) -> aiodns.DNSResolver:
    """An aiodns resolver for one upstream ``server`` ("ip:port" or "[v6]:port").

    One query per UDP socket (a fresh source port each, retransmissions included), EDNS(0)
    with cookies, and with ``case_randomize`` DNS 0x20: the question goes out in random
    letter case and c-ares drops a UDP reply that does not echo it exactly. ``tries``
    packets per query, each timed by c-ares: ``timeout`` until the server has a few answers,
    then max(250 ms, 5 x mean RTT), never longer than ``max_timeout`` (default ``timeout``).
    The sidecar enforces its own deadline per try (``upstream._Try``) and decides about
    resending. ``rcvbuf`` sets SO_RCVBUF on each socket; the default leaves the kernel's:
    a socket carries one query, so a burst of replies does not pile up in one socket's
    buffer. The channel is a :class:`LoopResolver`.
    """
    global qcache_disabled, per_query_ports
    # EDNS(0): fewer answers need a TCP round trip, and c-ares then sends DNS cookies
    # (RFC 7873). c-ares turns it on by itself only when a channel is given no flags.
    flags = (pycares.ARES_FLAG_NOSEARCH | pycares.ARES_FLAG_NOCHECKRESP | pycares.ARES_FLAG_EDNS
             # Keeps an idle TCP connection to the upstream for the next truncated answer.
             # For UDP it is moot: a socket that carried its one query is always closed.
             | pycares.ARES_FLAG_STAYOPEN)
    if case_randomize:
        flags |= ARES_FLAG_DNS0X20
    kwargs: dict[str, Any] = {
        "nameservers": [server],
        "timeout": timeout,
        "tries": tries,
        # No search list, no /etc/hosts: we forward exactly the name we were asked.
        "flags": flags,
        "ndots": 0,
        "lookups": "b",
    }
    if rcvbuf:
        kwargs["socket_receive_buffer_size"] = rcvbuf
    with _lock:
        real = getattr(pycares, "_lib", None)
        if real is None or not hasattr(real, "ares_init_options"):
            if qcache_disabled is None:
                log.warning("pycares internals changed: c-ares query cache stays on and "
                            "upstream queries share one source port")
            qcache_disabled = per_query_ports = False
            return LoopResolver(**kwargs)
        pycares._lib = _OptionsLib(real, int((max_timeout or timeout) * 1000),
                                   udp_max_queries=1)
        try:
            resolver = LoopResolver(**kwargs)
            qcache_disabled = per_query_ports = True
            if (max_timeout or timeout) < TIMER_TICK:
                resolver._keep_idle_timer = False
        except Exception as exc:  # pragma: no cover - depends on the installed pycares
            log.warning("cannot set c-ares options (%s); using a plain channel: query cache "
                        "on, one source port for all upstream queries", exc)
            pycares._lib = real
            resolver = LoopResolver(**kwargs)
            qcache_disabled = per_query_ports = False
        finally:
            pycares._lib = real
    return resolver
