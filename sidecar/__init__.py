"""dns-sidecar: a caching DNS server to run beside a crawler.

Listeners -> query handler -> cache -> coalescer -> upstream pools, with an HTTP API that
reads their state. ``Sidecar(Config(...))`` runs one in-process; ``dns-sidecar`` runs the
process.
"""

from .cache import Cache, Entry
from .config import Config, HostPort, parse_hostport
from .errors import (
    ConfigError,
    ResolveFailed,
    SidecarError,
    StartupError,
    UpstreamError,
    WireError,
)
from .server import Sidecar

__version__ = "0.1.0"

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
