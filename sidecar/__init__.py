"""dns-sidecar: a caching DNS server to run beside a crawler.

Listeners -> query handler -> cache -> coalescer -> upstream pools, with an HTTP API that
reads their state. ``Sidecar(Config(...))`` runs one in-process; ``dns-sidecar`` runs the
process.

The package face is lazy (PEP 562, as dnspython's): ``import sidecar`` loads nothing else,
so the client can import the loop-driven c-ares channel (:mod:`sidecar.upstream.cares`) without the
server, its listeners, its cache or dnslib. A name below is imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> module that defines it
_LAZY = {
    "Cache": ".cache",
    "Entry": ".cache",
    "Config": ".config",
    "HostPort": ".config",
    "parse_hostport": ".config",
    "ConfigError": ".errors",
    "ResolveFailed": ".errors",
    "SidecarError": ".errors",
    "StartupError": ".errors",
    "UpstreamError": ".errors",
    "WireError": ".errors",
    "Sidecar": ".app",
}

__all__ = [
    "Cache",
    "Config",
    "ConfigError",
    "Entry",
    "HostPort",
    "ResolveFailed",
    "Sidecar",
    "SidecarError",
    "StartupError",
    "UpstreamError",
    "WireError",
    "__version__",
    "parse_hostport",
]

if TYPE_CHECKING:  # pragma: no cover
    from sidecar.app import Sidecar
    from sidecar.config import Config, HostPort, parse_hostport
    from sidecar.dns.cache import Cache, Entry
    from sidecar.errors import (
        ConfigError,
        ResolveFailed,
        SidecarError,
        StartupError,
        UpstreamError,
        WireError,
    )


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sidecar' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
