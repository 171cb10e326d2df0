"""Create aiodns resolvers (c-ares channels) fit for a cache that does its own caching.

c-ares >= 1.31 keeps a query cache that is on by default and that pycares 5 gives no argument
for. Left on, a refresh, a prefetch or a health probe within the record's TTL is answered from
that cache and never reaches the upstream (measured: three identical ``query_dns`` calls, one
packet). c-ares also shrinks its per-try timeout to max(250 ms, 5 x RTT) once a server looks
fast. We therefore add two options pycares does not expose, through ``ares_init_options``:
``ARES_OPT_QUERY_CACHE`` with ``qcache_max_ttl = 0`` (cache off) and ``ARES_OPT_MAXTIMEOUTMS``
(no try longer than our own per-try timeout). If a future pycares changes the internals this
relies on, we fall back to a plain channel, log it, and report ``qcache_disabled = False``.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import aiodns
import pycares

log = logging.getLogger(__name__)

# Values from c-ares's ares.h (stable ABI since 1.23).
ARES_OPT_MAXTIMEOUTMS = 1 << 20
ARES_OPT_QUERY_CACHE = 1 << 21

_lock = threading.Lock()
qcache_disabled: bool | None = None  # None until the first channel is made


class _OptionsLib:
    """Stands in for pycares's cffi ``lib`` during one ``Channel()`` call and adds options."""

    def __init__(self, lib: Any, max_timeout_ms: int) -> None:
        self._lib = lib
        self._max_timeout_ms = max_timeout_ms

    def __getattr__(self, name: str) -> Any:
        return getattr(self._lib, name)

    def ares_init_options(self, channel: Any, options: Any, optmask: int) -> int:
        options.qcache_max_ttl = 0
        optmask |= ARES_OPT_QUERY_CACHE
        if self._max_timeout_ms > 0:
            options.maxtimeout = self._max_timeout_ms
            optmask |= ARES_OPT_MAXTIMEOUTMS
        return self._lib.ares_init_options(channel, options, optmask)


def make_resolver(server: str, timeout: float, tries: int = 3,
                  rcvbuf: int | None = None) -> aiodns.DNSResolver:
    """An aiodns resolver for one upstream ``server`` ("ip:port" or "[v6]:port").

    c-ares retransmits within our per-try deadline (``tries`` packets, dynamic timeouts capped
    at ``timeout``); the sidecar enforces the deadline itself with ``asyncio.wait_for``.
    """
    global qcache_disabled
    kwargs: dict[str, Any] = {
        "nameservers": [server],
        "timeout": timeout,
        "tries": tries,
        # No search list, no /etc/hosts: we forward exactly the name we were asked.
        "flags": (pycares.ARES_FLAG_NOSEARCH | pycares.ARES_FLAG_NOCHECKRESP
                  # Keep the UDP socket between queries: without it c-ares opens, connects
                  # and closes a socket for every query that finds none in flight.
                  | pycares.ARES_FLAG_STAYOPEN),
        "ndots": 0,
        "lookups": "b",
    }
    if rcvbuf:
        kwargs["socket_receive_buffer_size"] = rcvbuf
    with _lock:
        real = getattr(pycares, "_lib", None)
        if real is None or not hasattr(real, "ares_init_options"):
            if qcache_disabled is None:
                log.warning("pycares internals changed: c-ares query cache stays on")
            qcache_disabled = False
            return aiodns.DNSResolver(**kwargs)
        pycares._lib = _OptionsLib(real, int(timeout * 1000))
        try:
            resolver = aiodns.DNSResolver(**kwargs)
            qcache_disabled = True
        except Exception as exc:  # pragma: no cover - depends on the installed pycares
            log.warning("cannot disable the c-ares query cache (%s); using a plain channel", exc)
            pycares._lib = real
            resolver = aiodns.DNSResolver(**kwargs)
            qcache_disabled = False
        finally:
            pycares._lib = real
    return resolver
