"""The sidecar's configuration: one immutable value built by the CLI (or by tests)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

from sidecar.errors import ConfigError

DEFAULT_DNS_PORT = 5353
DEFAULT_HTTP_PORT = 8053
UPSTREAM_DEFAULT_PORT = 53


@dataclass(frozen=True, slots=True)
class HostPort:
    """An IP address (v4 or v6, no hostname) and a port."""

    host: str
    port: int

    @property
    def family_v6(self) -> bool:
        return ":" in self.host

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.family_v6 else f"{self.host}:{self.port}"


def parse_hostport(text: str, default_port: int | None = None) -> HostPort:
    """Parse ``IP``, ``IP:PORT`` or ``[IPv6]:PORT``; hostnames are rejected.

    ``default_port`` is used when the text carries no port; without one a port is required.
    Raises :class:`ConfigError` with a short reason.
    """
    text = text.strip()
    if not text:
        raise ConfigError("empty address")
    host: str
    port_text: str | None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ConfigError(f"{text!r}: missing ']'")
        host = text[1:end]
        rest = text[end + 1 :]
        if rest == "":
            port_text = None
        elif rest.startswith(":"):
            port_text = rest[1:]
        else:
            raise ConfigError(f"{text!r}: expected ':PORT' after ']'")
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif text.count(":") > 1:
        host, port_text = text, None  # bare IPv6
    else:
        host, port_text = text, None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"{text!r}: {host!r} is not an IP address") from None
    if port_text is None:
        if default_port is None:
            raise ConfigError(f"{text!r}: a port is required")
        port = default_port
    else:
        if not port_text.isdigit():
            raise ConfigError(f"{text!r}: bad port {port_text!r}")
        port = int(port_text)
        if not 0 <= port <= 65535:
            raise ConfigError(f"{text!r}: port out of range")
    return HostPort(str(ip), port)


def parse_upstreams(text: str) -> tuple[HostPort, ...]:
    """Parse a comma-separated upstream list (port 53 when none is given)."""
    items = [part for part in (p.strip() for p in text.split(",")) if part]
    if not items:
        raise ConfigError("no address given")
    return tuple(parse_hostport(item, UPSTREAM_DEFAULT_PORT) for item in items)


def normalize_zone(suffix: str) -> str:
    """Lower-case a zone suffix and strip dots at either end (``.`` means the root)."""
    z = suffix.strip().lower().strip(".")
    if any(not label for label in z.split(".")) and z:
        raise ConfigError(f"{suffix!r}: empty label")
    return z


def parse_zone(text: str) -> tuple[str, tuple[HostPort, ...]]:
    """Parse ``SUFFIX=ADDR[,ADDR...]``."""
    if "=" not in text:
        raise ConfigError(f"{text!r}: expected SUFFIX=ADDR[,ADDR...]")
    suffix, addrs = text.split("=", 1)
    zone = normalize_zone(suffix)
    if not zone:
        raise ConfigError(f"{text!r}: empty suffix (use --upstream for the default pool)")
    return zone, parse_upstreams(addrs)


def parse_cidrs(text: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """Parse a comma-separated CIDR list (a bare address is a /32 or /128)."""
    nets = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            nets.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ConfigError(f"{part!r} is not a CIDR") from None
    if not nets:
        raise ConfigError("no CIDR given")
    return tuple(nets)


def read_resolv_conf(path: str = "/etc/resolv.conf") -> tuple[HostPort, ...]:
    """The ``nameserver`` lines of a resolv.conf, in order; empty when none can be read."""
    found: list[HostPort] = []
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    addr = parts[1].split("%", 1)[0]  # drop an IPv6 zone id
                    try:
                        found.append(parse_hostport(addr, UPSTREAM_DEFAULT_PORT))
                    except ConfigError:
                        continue
    except OSError:
        return ()
    return tuple(found)


LOOPBACK_NETS = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an IP as text, IPv4-mapped or with a ``%zone`` too) is a loopback
    address; a host name, ``localhost`` included, is not an address and is not."""
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


#: URL schemes of ``--shared-cache`` (redis-py's, plus ``+cluster`` for a Redis Cluster).
SHARED_CACHE_SCHEMES = ("redis", "rediss", "redis+cluster", "rediss+cluster")


def check_shared_cache_url(url: str) -> None:
    """Raise :class:`ConfigError` naming ``--shared-cache`` unless ``url`` is a URL redis-py
    can open: a known scheme, a host, a numeric port, and a numeric db (none for a
    cluster, which has only db 0)."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in SHARED_CACHE_SCHEMES or not parts.netloc:
        raise ConfigError("--shared-cache: expected a redis://, rediss://, redis+cluster://"
                          f" or rediss+cluster:// URL, got {url.split('@')[-1]!r}")
    where = parts.netloc.rpartition("@")[2]
    try:
        parts.port  # noqa: B018 (parsing it is the check)
    except ValueError:
        raise ConfigError(f"--shared-cache: bad port in {where!r}") from None
    if not parts.hostname:
        raise ConfigError(f"--shared-cache: no host in {where!r}")
    db = parts.path.strip("/")
    if db and not db.isdigit():
        raise ConfigError(f"--shared-cache: the path must be a db number, got {db!r}")
    if db not in ("", "0") and "cluster" in parts.scheme.lower():
        raise ConfigError("--shared-cache: a Redis Cluster has only db 0")


@dataclass(frozen=True)
class Config:
    """Everything the sidecar needs to run. Times are in seconds."""

    listen: tuple[HostPort, ...] = (HostPort("127.0.0.1", DEFAULT_DNS_PORT),)
    http: HostPort | None = HostPort("127.0.0.1", DEFAULT_HTTP_PORT)
    upstreams: tuple[HostPort, ...] = ()
    zones: tuple[tuple[str, tuple[HostPort, ...]], ...] = ()
    min_ttl: int = 30
    max_ttl: int = 86400
    max_negative_ttl: int = 300
    servfail_ttl: int = 5
    cache_size: int = 100_000
    timeout: float = 2.0
    tries: int = 2
    serve_stale: int = 0
    prefetch: bool = False
    no_aaaa: bool = False
    allow: tuple = LOOPBACK_NETS
    rate_limit: float = 0.0
    rate_burst: float = 0.0
    api_token: str | None = None
    lameduck: float = 0.0
    cache_file: str | None = None  # the cache snapshot (docs/snapshot.md); None: no warm start
    cache_save_interval: float = 300.0  # 0: only at shutdown
    reuse_port: bool = False  # bind beside another sidecar and take its traffic over
    shared_cache: str | None = None  # Valkey/Redis URL of the fleet's cache (docs/fleet.md)
    shared_cache_prefix: str = "dns-sidecar:v1:"
    shared_cache_timeout: float = 0.03  # deadline of one shared-cache lookup
    max_inflight: int = 1024
    tcp_max_connections: int = 256
    tcp_idle_timeout: float = 10.0
    udp_rcvbuf: int = 8 * 1024 * 1024
    cache_memory: int = 256  # MiB
    max_udp_size: int = 1232
    upstream_0x20: bool = False
    rate_limit_v6_prefix: int = 64
    private_address: tuple = ()
    resolv_conf: str | None = None  # where upstreams were read from (re-read on SIGHUP)
    log_level: str = "info"
    log_format: str = "text"

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first inconsistent setting."""
        if not self.listen:
            raise ConfigError("--listen: at least one address is needed")
        if self.min_ttl < 0:
            raise ConfigError("--min-ttl: must be >= 0")
        if self.max_ttl < 1:
            raise ConfigError("--max-ttl: must be >= 1")
        if self.min_ttl > self.max_ttl:
            raise ConfigError("--min-ttl: must not exceed --max-ttl")
        if self.max_negative_ttl < 0:
            raise ConfigError("--max-negative-ttl: must be >= 0")
        if self.cache_size < 1:
            raise ConfigError("--cache-size: must be >= 1")
        if not self.timeout > 0:
            raise ConfigError("--timeout: must be > 0")
        if self.tries < 1:
            raise ConfigError("--tries: must be >= 1")
        if self.serve_stale < 0:
            raise ConfigError("--serve-stale: must be >= 0")
        if self.max_inflight < 1:
            raise ConfigError("--max-inflight: must be >= 1")
        if self.rate_limit < 0:
            raise ConfigError("--rate-limit: must be >= 0")
        if self.lameduck < 0:
            raise ConfigError("--lameduck: must be >= 0")
        if self.cache_file is not None and not self.cache_file.strip():
            raise ConfigError("--cache-file: empty path")
        if not 0 <= self.cache_save_interval < float("inf"):  # also refuses NaN
            raise ConfigError("--cache-save-interval: must be a finite number >= 0")
        if self.shared_cache is not None:
            check_shared_cache_url(self.shared_cache)
        if not self.shared_cache_prefix:
            raise ConfigError("--shared-cache-prefix: must not be empty")
        if "{" in self.shared_cache_prefix or "}" in self.shared_cache_prefix:
            # The key's hash tag is what follows the prefix: braces here would put every
            # key of a Redis Cluster in one slot.
            raise ConfigError("--shared-cache-prefix: must not contain '{' or '}'")
        if not 0 < self.shared_cache_timeout <= 10:  # also refuses NaN
            raise ConfigError("--shared-cache-timeout: must be between 1 and 10000 ms")
        if self.cache_memory < 1:
            raise ConfigError("--cache-memory: must be >= 1")
        if not 512 <= self.max_udp_size <= 65535:
            raise ConfigError("--max-udp-size: must be between 512 and 65535")
        if not 0 <= self.rate_limit_v6_prefix <= 128:
            raise ConfigError("--rate-limit-v6-prefix: must be between 0 and 128")
